"""Task affinity estimators (installed as ``dymu.affinity``).

Reads a trained anchor and measures how related its tasks are (METHOD.md 1.3). This
package holds the estimators as pure functions on features, gradients and losses, the
``affinity.json`` record and its heatmap; running the network is the caller's job.

- :func:`rsa` (with :func:`similarity_matrix`, :func:`rsa_layer`): representation
  similarity analysis over layers, the paper's estimator.
- :func:`gradient_cosine`: cosine of task gradients on shared parameters.
- :func:`lookahead_affinity` (with :func:`virtual_step_losses`): TAG's lookahead.
- :class:`AffinityResult`: the record saved as ``affinity.json``; :func:`affinity_png`
  draws it.
"""

from __future__ import annotations

from dymu.affinity.gradients import (
    RunningMean,
    gradient_cosine,
    lookahead_affinity,
    virtual_step_losses,
)
from dymu.affinity.plot import affinity_png
from dymu.affinity.result import METHODS, AffinityResult, load
from dymu.affinity.rsa import normalise_rows, rsa, rsa_layer, similarity_matrix

__all__ = [
    "METHODS",
    "AffinityResult",
    "RunningMean",
    "affinity_png",
    "gradient_cosine",
    "load",
    "lookahead_affinity",
    "normalise_rows",
    "rsa",
    "rsa_layer",
    "similarity_matrix",
    "virtual_step_losses",
]
