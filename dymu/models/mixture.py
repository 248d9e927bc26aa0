"""The anchor with soft parent choices: the network stage 1 trains the edge hypernet on.

Every node runs (the streams stacked, :mod:`dymu.models.stacked`), and node (l, j) reads
the mixture of layer l-1's outputs weighted by its parent weights v[l-1, j, :] — one tensor
contraction per layer (METHOD.md 1.4: x(l, j) = sum_i v[l-1, j, i] y(l-1, i)). With one-hot
weights it computes exactly the tree they encode.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dymu.models.anchor import Anchor
from dymu.models.stacked import StackedLayers


def path_weights(v: Tensor) -> Tensor:
    """[..., L, N, N]: entry [..., l, j, i] is the weight of node (l, i) on task j's path.

    Task j's head reads node (L-1, j); going down, q[l-1] = q[l] @ v[l-1], i.e. the weight
    of a node is the parent weight it receives from the nodes of the path above it. Leading
    dimensions of ``v`` [..., L-1, N, N] (one set of parent weights per draw) carry over.
    """
    num_layers, n = v.shape[-3] + 1, v.shape[-1]
    q = [torch.eye(n, dtype=v.dtype, device=v.device).expand(*v.shape[:-3], n, n)]
    for layer in range(num_layers - 1, 0, -1):
        q.append(q[-1] @ v[..., layer - 1, :, :])  # [..., N(tasks), N] @ [..., N, N]
    return torch.stack(q[::-1], dim=-3)


class MixtureNet(nn.Module):
    """All nodes of the anchor, each fed a parent mixture; heads read their task's path."""

    def __init__(self, anchor: Anchor) -> None:
        super().__init__()
        self.anchor = anchor
        self.backbone = StackedLayers(anchor.streams)

    def forward(self, image: Tensor, v: Tensor) -> dict[str, Tensor]:
        """Every task's head output for parent weights v (rows sum to 1).

        ``v`` is [L-1, N, N] for the whole batch, or [G, L-1, N, N]: G draws, the batch split
        into G equal consecutive groups, group g run with ``v[g]`` (stage 1 averages its
        loss over several (preference, budget) draws per step this way).
        """
        n = len(self.anchor.tasks)
        size = (image.shape[-2], image.shape[-1])
        batch = image.shape[0]
        if v.dim() == 3:
            v = v.unsqueeze(0)  # [1, L-1, N, N]
        groups = v.shape[0]
        if batch % groups:
            raise ValueError(f"a batch of {batch} cannot be split into {groups} equal groups")
        v = v.repeat_interleave(batch // groups, dim=0)  # [B, L-1, N, N]: one set per image
        y = self.backbone.layers[0](image.repeat(1, n, 1, 1))  # [B, N * C, H, W]
        feats = [y]
        for layer in range(1, len(self.backbone.layers)):
            b, nc, h, w = y.shape
            streams = y.view(b, n, nc // n, h, w)  # [B, N, C, H, W]
            mixed = torch.einsum("bji,bichw->bjchw", v[:, layer - 1].to(y), streams)
            y = self.backbone.layers[layer](mixed.reshape(b, nc, h, w))
            feats.append(y)
        q = path_weights(v)  # [B, L, N, N]
        out = {}
        for j, task in enumerate(self.anchor.tasks):
            head = self.anchor.heads[task.name]
            last = feats[-1]
            high = last.view(last.shape[0], n, -1, *last.shape[-2:])[:, j]  # [B, C, H, W]
            low = None
            if head.low_layer is not None:
                f = feats[head.low_layer]
                f = f.view(f.shape[0], n, -1, *f.shape[-2:])  # [B, N, C, H, W]
                low = torch.einsum("bi,bichw->bchw", q[:, head.low_layer, j].to(f), f)
            out[task.name] = head(high.contiguous(), low, size)
        return out
