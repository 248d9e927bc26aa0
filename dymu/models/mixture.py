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
from dymu.models.streams import TreeStreams


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


def private_weights(v: Tensor, q: Tensor | None = None) -> Tensor:
    """[..., L, N]: the probability that node (l, j) is private (:meth:`TreeSpec.private`)
    given that task j's path runs through it, under independent parent choices ``v``
    [..., L-1, N, N]: every node below it on stream j picks its own stream's parent, and no
    other task's path visits stream j at or below layer l. One-hot ``v`` gives exactly
    ``TreeSpec.private`` on the nodes of each task's own path. ``q``: ``path_weights(v)``
    when the caller has it already.
    """
    n = v.shape[-1]
    q = path_weights(v) if q is None else q  # [..., L, N(tasks), N(nodes)]
    others = 1.0 - torch.eye(n, dtype=v.dtype, device=v.device)  # [N, N] k != j
    # Prod_{k != j} (1 - q[l, k, j]): no other task's path at node (l, j).
    alone = torch.prod(1.0 - q * others, dim=-2)  # [..., L, N]
    own = torch.diagonal(v, dim1=-2, dim2=-1)  # [..., L-1, N]: v[l-1, j, j]
    own = torch.cat([torch.ones_like(own[..., :1, :]), own], dim=-2)  # [..., L, N]
    return torch.cumprod(own * alone, dim=-2)  # over layers 0..l


class MixtureNet(nn.Module):
    """All nodes of the anchor, each fed a parent mixture; heads read their task's path.

    With the private-node rule (:class:`~dymu.models.streams.TreeStreams` holding stage 0's
    streams, METHOD.md 1.9) the network runs trees as :class:`~dymu.space.treenet.TreeNet`
    does, relaxed: node (l, j) outputs ``rho * y0(l, j) + (1 - rho) * y(l, j)``, where
    ``y0`` is stage 0's stream j on the image (the single-task network), ``y`` the node on
    its parent mixture and ``rho`` :func:`private_weights`; each head likewise mixes stage
    0's head on ``y0`` with its own. A tree that shares nothing then computes the stage-0
    anchor exactly.
    """

    def __init__(self, streams: TreeStreams | Anchor) -> None:
        super().__init__()
        streams = TreeStreams.of(streams)
        self.anchor = streams.tuned
        self.backbone = StackedLayers(self.anchor.streams)
        self.private = streams.stage0
        self.private_backbone = (
            StackedLayers(self.private.streams) if self.private is not None else None
        )

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
        stacked = image.repeat(1, n, 1, 1)  # [B, N * 3, H, W]
        q = path_weights(v)  # [B, L, N, N]
        feats0, rho = None, None
        if self.private is not None:
            with torch.no_grad():
                feats0 = self.private_backbone(image)  # L x [B, N * C, H, W]
            rho = private_weights(v, q)  # [B, L, N]
        y = self._private_mix(self.backbone.layers[0](stacked), 0, feats0, rho)
        feats = [y]
        for layer in range(1, len(self.backbone.layers)):
            b, nc, h, w = y.shape
            streams = y.view(b, n, nc // n, h, w)  # [B, N, C, H, W]
            mixed = torch.einsum("bji,bichw->bjchw", v[:, layer - 1].to(y), streams)
            y = self.backbone.layers[layer](mixed.reshape(b, nc, h, w))
            y = self._private_mix(y, layer, feats0, rho)
            feats.append(y)
        out = {}
        for j, task in enumerate(self.anchor.tasks):
            head = self.anchor.heads[task.name]
            high = _stream(feats[-1], n, j)  # [B, C, H, W]
            low = None
            if head.low_layer is not None:
                f = feats[head.low_layer]
                f = f.view(f.shape[0], n, -1, *f.shape[-2:])  # [B, N, C, H, W]
                low = torch.einsum("bi,bichw->bchw", q[:, head.low_layer, j].to(f), f)
            out[task.name] = head(high.contiguous(), low, size)
            if self.private is not None:
                head0 = self.private.heads[task.name]
                low0 = (
                    _stream(feats0[head0.low_layer], n, j) if head0.low_layer is not None else None
                )
                with torch.no_grad():
                    out0 = head0(_stream(feats0[-1], n, j).contiguous(), low0, size)
                r = rho[:, -1, j].to(out0).view(-1, *[1] * (out0.dim() - 1))  # [B, 1, ...]
                out[task.name] = r * out0 + (1 - r) * out[task.name]
        return out

    @staticmethod
    def _private_mix(y: Tensor, layer: int, feats0, rho) -> Tensor:
        """``y`` [B, N * C, H, W] with each node's stage-0 output mixed in by rho."""
        if feats0 is None:
            return y
        b, nc, h, w = y.shape
        n = rho.shape[-1]
        r = rho[:, layer].to(y).view(b, n, 1, 1, 1)  # [B, N, 1, 1, 1]
        y0 = feats0[layer].view(b, n, nc // n, h, w)
        mixed = r * y0 + (1 - r) * y.view(b, n, nc // n, h, w)  # [B, N, C, H, W]
        return mixed.reshape(b, nc, h, w)


def _stream(f: Tensor, n: int, j: int) -> Tensor:
    """Stream j's channels of a stacked feature map [B, N * C, H, W] -> [B, C, H, W]."""
    return f.view(f.shape[0], n, -1, *f.shape[-2:])[:, j]
