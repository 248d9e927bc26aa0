"""Training: stage 0 (single-task streams) and the loops later stages share."""
