"""Task affinity by representation similarity analysis (RSA), METHOD.md 1.3.

Two task streams are related when they arrange the same images alike: if images that look
similar to stream i also look similar to stream j, the two streams learned compatible
features and can share a layer. RSA measures this without aligning channels, because it
only compares the image-by-image similarity matrices of the streams (Kriegeskorte et al.,
"Representational similarity analysis", Front. Syst. Neurosci. 2008; used for multi-task
branching by Dwivedi & Roig, CVPR 2019 and by Vandenhende et al., "Branched multi-task
networks", BMVC 2020, which DYMU follows).

Everything is computed in float64: the affinity is a difference of similarity matrices,
and float32 rounding would show up as spurious affinity between identical streams.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["normalise_rows", "rsa", "rsa_layer", "similarity_matrix"]


def similarity_matrix(features: Tensor) -> Tensor:
    """Pearson correlation between the K images of one stream at one layer.

    ``S[a, b] = <x_a - mean(x_a), x_b - mean(x_b)> / (||x_a - mean(x_a)|| ||x_b - mean(x_b)||)``
    where ``x_a`` is image a's flattened feature map (METHOD.md 1.3 step 2). This is
    ``numpy.corrcoef`` on the rows, except that an image whose features are constant (a
    dead layer, an all-zero ReLU output) correlates 0 with everything, itself included,
    instead of NaN: it carries no information about how the stream arranges images.

    Args:
        features: ``[K, ...]``, the features of K images (any trailing shape, e.g.
            ``[K, C, H, W]``). Gradients are not tracked.

    Returns:
        ``[K, K]`` float64 on the features' device, symmetric, values in [-1, 1].

    Raises:
        ValueError: no images, or NaN / inf among the features.
    """
    if features.dim() < 1 or features.shape[0] < 1:
        raise ValueError(
            f"features must be [K, ...] with K >= 1, got shape {tuple(features.shape)}"
        )
    k = features.shape[0]
    x = features.detach().reshape(k, -1).to(torch.float64)  # [K, ...] -> [K, P]
    if x.shape[1] == 0:
        raise ValueError("features have no elements per image")
    if not torch.isfinite(x).all():
        raise ValueError("features contain NaN or inf")
    # Exactly constant rows, found before centring: centring a constant row in floating point
    # can leave ~1e-17 residues that normalisation would blow up into a random direction.
    lo, hi = x.aminmax(dim=1)  # [K], [K]
    informative = (hi > lo).unsqueeze(1)  # [K, 1]
    x = x - x.mean(dim=1, keepdim=True)
    norm = x.norm(dim=1, keepdim=True)  # [K, 1]
    x = torch.where(informative, x / norm.clamp_min(torch.finfo(x.dtype).tiny), 0.0)
    return (x @ x.T).clamp_(-1.0, 1.0)  # [K, P] @ [P, K] -> [K, K]


def normalise_rows(d: Tensor) -> Tensor:
    """Divide each row of a non-negative matrix by its maximum (METHOD.md 1.3 step 4).

    With a zero diagonal (a distance matrix) this maps row i to [0, 1] with 0 at i itself
    and 1 at the task farthest from i. A row of zeros (every task at distance 0 from i)
    stays zeros rather than becoming NaN.

    Args:
        d: ``[..., N, N]`` non-negative.

    Returns:
        ``[..., N, N]``, same dtype.
    """
    row_max = d.amax(dim=-1, keepdim=True)  # [..., N, 1]
    return torch.where(row_max > 0, d / row_max.clamp_min(torch.finfo(d.dtype).tiny), 0.0)


def rsa_layer(sims: Tensor) -> Tensor:
    """RSA affinity of N streams at one layer from their similarity matrices.

    METHOD.md 1.3 steps 3-4: ``D(i, j) = ||S_i - S_j||_F``; each row of D is divided by
    its maximum, and ``A = 1 - D / max_j D(i, j)``.

    Because the normalisation is per row, A is in general *not* symmetric: row i measures
    every task relative to reference task i, so ``A[i, j]`` is "how close j is to i,
    compared with the task farthest from i". The diagonal is 1, and every row that has a
    task at non-zero distance holds an exact 0 (its farthest task). This is kept as the
    method states it; a consumer that needs a symmetric matrix can average A and A.T. With
    N = 2 the off-diagonal is always 0 unless the streams are identical, so RSA only ranks
    tasks when N >= 3.

    Args:
        sims: ``[N, K, K]``, one similarity matrix per stream (from
            :func:`similarity_matrix`), all over the same K images in the same order.

    Returns:
        ``A``: ``[N, N]`` float64, values in [0, 1], diagonal 1.
    """
    if sims.dim() != 3 or sims.shape[1] != sims.shape[2] or sims.shape[0] < 1:
        raise ValueError(f"sims must be [N, K, K] with N >= 1, got shape {tuple(sims.shape)}")
    n = sims.shape[0]
    flat = sims.detach().to(torch.float64).reshape(1, n, -1)  # [N, K, K] -> [1, N, K*K]
    # All stream pairs at once. The direct mode sums squared differences instead of using
    # ||a||^2 + ||b||^2 - 2ab, whose cancellation would give identical streams a tiny
    # non-zero distance that row normalisation would then inflate to 1.
    d = torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist")[0]  # [N, N]
    return 1.0 - normalise_rows(d)


def rsa(features: Sequence[Sequence[Tensor]]) -> tuple[Tensor, Tensor]:
    """RSA task affinity over several layers (METHOD.md 1.3, all steps).

    Each stream's similarity matrix is one ``[K, P] @ [P, K]`` product (all image pairs at
    once); streams are converted to float64 one at a time so that only one stream's
    features are copied in memory, and the distances between all streams come from one
    call (:func:`rsa_layer`).

    Args:
        features: ``features[l][i]`` is ``[K, ...]``, stream i's features of the same K
            images at layer l. Every layer has the same N streams; the trailing shape may
            differ between layers (and between streams).

    Returns:
        ``(per_layer, mean)``: ``per_layer`` is ``[L, N, N]`` (one :func:`rsa_layer`
        matrix per layer), ``mean`` is ``[N, N]``, the mean over layers (step 5). Both
        float64; row i is relative to reference task i (see :func:`rsa_layer`).

    Raises:
        ValueError: no layers or streams, or layers with different N or K.
    """
    if len(features) == 0 or len(features[0]) == 0:
        raise ValueError("rsa needs at least one layer with at least one stream")
    n = len(features[0])
    k = features[0][0].shape[0] if features[0][0].dim() > 0 else 0
    per_layer = []
    for li, layer in enumerate(features):
        if len(layer) != n:
            raise ValueError(f"layer {li} has {len(layer)} streams, layer 0 has {n}")
        for i, f in enumerate(layer):
            if f.dim() < 1 or f.shape[0] != k:
                raise ValueError(
                    f"layer {li} stream {i} has features of shape {tuple(f.shape)}, "
                    f"expected [K={k}, ...] like layer 0 stream 0"
                )
        sims = torch.stack([similarity_matrix(f) for f in layer])  # N x [K, K] -> [N, K, K]
        per_layer.append(rsa_layer(sims))
    stacked = torch.stack(per_layer)  # L x [N, N] -> [L, N, N]
    return stacked, stacked.mean(dim=0)
