"""Task weighting strategies for shared multi-task models (the "x weighting" of LibMTL).

Build one by name and call it once per training step instead of ``loss.backward()``::

    weighting = build_weighting("mgda_ub", num_tasks=3)
    weights = weighting.backward(losses, shared_params, representation=z)  # losses: [T]
    optimizer.step()
    ...
    weighting.epoch_end(mean_epoch_losses)  # [T]; only DWA uses it

Strategies: ``equal`` (fixed weights / linear scalarisation), ``uncertainty`` (Kendall et
al. 2018), ``dwa`` (Liu et al. 2019), ``mgda_ub`` (Sener & Koltun 2018), ``pcgrad`` (Yu et
al. 2020), ``tensioner`` (Nakamura et al. 2022). See :mod:`dymu.weighting.base` for the
gradient contract.
"""

from __future__ import annotations

from dymu.weighting.base import (
    WEIGHTINGS,
    GradientWeighting,
    LossWeighting,
    Weighting,
    build_weighting,
    weighting_options,
)
from dymu.weighting.min_norm import min_norm_point, min_norm_weights
from dymu.weighting.strategies import (
    MGDA,
    DynamicWeightAverage,
    Equal,
    PCGrad,
    Uncertainty,
    pcgrad_coefficients,
)
from dymu.weighting.tensioner import Tensioner

__all__ = [
    "MGDA",
    "WEIGHTINGS",
    "DynamicWeightAverage",
    "Equal",
    "GradientWeighting",
    "LossWeighting",
    "PCGrad",
    "Tensioner",
    "Uncertainty",
    "Weighting",
    "build_weighting",
    "min_norm_point",
    "min_norm_weights",
    "pcgrad_coefficients",
    "weighting_options",
]
