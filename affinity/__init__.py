"""Task affinity estimators (installed as ``dymu.affinity``).

Reads a trained anchor and measures how related its tasks are (METHOD.md 1.3).
"""
