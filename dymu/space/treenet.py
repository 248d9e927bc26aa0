"""Execute any tree on the anchor's weights, computing each used node exactly once."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from dymu.models import slim
from dymu.models.anchor import Anchor
from dymu.models.streams import TreeStreams
from dymu.space.tree import TreeSpec

Node = tuple[int, int]


class TreeNet(nn.Module):
    """A tree run on the streams: node (l, j) is stream j's layer l fed its parent's output.

    Only used nodes run (unused ones are pruned), each once per forward, so the compute is
    exactly the tree's FLOPs. The no-sharing tree on one set of weights reproduces
    :meth:`Anchor.forward`.

    ``streams`` says which weights each node runs (:class:`~dymu.models.streams.TreeStreams`:
    with the private-node rule, a task that shares nothing keeps its single-task network);
    a plain :class:`Anchor` runs every node on its weights.

    A tree with widths runs each node on its first channels (:mod:`dymu.models.slim`). A
    node in a narrowed context (narrower than full width, or after such a node on its path:
    :meth:`~dymu.space.tree.TreeSpec.narrowed`; either way its inputs are not those its
    running statistics describe) normalises with statistics of its own configuration, as
    universally slimmable networks recalibrate every layer: ``bn_stats`` (``{(layer,
    stream): {"<bn>.running_mean": ..., "<bn>.running_var": ...}}``, from :meth:`calibrate`)
    where given, else each batch's own, in training and evaluation alike; the other nodes
    keep their running statistics.
    """

    def __init__(
        self,
        streams: TreeStreams | Anchor,
        tree: TreeSpec,
        bn_stats: Mapping[Node, Mapping[str, Tensor]] | None = None,
    ) -> None:
        super().__init__()
        streams = TreeStreams.of(streams)
        self._sources = streams.sources(tree)  # [L][N]; refuses a tree of another shape
        self._adapts = [[streams.takes_offsets(s) for s in row] for row in self._sources]
        self.anchor = streams.tuned
        self.private = streams.stage0  # registered, so .to() moves every set
        self.narrow = streams.narrow
        self.tree = tree.canonical()
        self._used = self.tree.used()
        self._narrowed = self.tree.narrowed()  # [L][N]: nodes on their own statistics
        self._skeletons = slim.Skeletons()
        self.bn_stats = bn_stats
        self._record: dict[Node, dict[str, list]] | None = None  # set while calibrating

    @torch.no_grad()
    def calibrate(
        self,
        images: Iterable[Tensor],
        bn_offsets: Mapping[tuple[int, int], Mapping[str, Tensor]] | None = None,
    ) -> dict[Node, dict[str, Tensor]]:
        """BatchNorm statistics of every node in a narrowed context for this configuration:
        each normalises with batch statistics while the mean and (biased) variance of every
        BatchNorm's input are accumulated over all of ``images`` (batches ``[B, 3, H, W]``),
        as universally slimmable networks recalibrate each width after training. Feed them
        back as ``bn_stats`` (and to :func:`~dymu.compile.materialize.materialize`)."""
        self._record = {}
        try:
            for image in images:
                self(image, bn_offsets)
            record = self._record
        finally:
            self._record = None
        out: dict[Node, dict[str, Tensor]] = {}
        for node, per_bn in record.items():
            out[node] = {}
            for name, (total, squares, count, dtype) in per_bn.items():
                mean = total / count
                var = (squares / count - mean * mean).clamp_min(0.0)
                out[node][f"{name}.running_mean"] = mean.to(dtype)
                out[node][f"{name}.running_var"] = var.to(dtype)
        return out

    def _run_narrow(self, node: Node, module: nn.Module, x: Tensor, shifted: dict) -> Tensor:
        """A node in a narrowed context, on calibrated or batch statistics (class doc)."""
        width = self.tree.width(*node)
        stats = None if self.bn_stats is None or self._record is not None else self.bn_stats
        if stats is not None and node in stats:
            sk = self._skeletons.layer(module, x.shape[1], width)
            return slim.run(module, sk, x, state={**shifted, **stats[node]})
        sk = self._skeletons.layer(module, x.shape[1], width, batch_stats=True)
        if self._record is None:
            return slim.run(module, sk, x, state=shifted)
        per_bn = self._record.setdefault(node, {})
        hooks = [
            m.register_forward_pre_hook(functools.partial(_accumulate, per_bn, name))
            for name, m in sk.named_modules()
            if isinstance(m, nn.BatchNorm2d)
        ]
        try:
            return slim.run(module, sk, x, state=shifted)
        finally:
            for h in hooks:
                h.remove()

    def _run_slim_head(
        self, source: Anchor, j: int, feats: list[Tensor], size: tuple[int, int]
    ) -> Tensor:
        """Task j's head reading the (possibly narrowed) features of its path."""
        head = source.heads[source.tasks[j].name]
        low = feats[head.low_layer] if head.low_layer is not None else None
        sk = self._skeletons.head(head, feats[-1].shape[1], None if low is None else low.shape[1])
        return slim.run(head, sk, feats[-1], low, size)

    def source(self, layer: int, stream: int) -> Anchor:
        """The weights node (layer, stream) runs (``layer = L - 1`` also: task ``stream``'s
        head)."""
        return self._sources[layer][stream]

    def forward(
        self,
        image: Tensor,
        bn_offsets: Mapping[tuple[int, int], Mapping[str, Tensor]] | None = None,
        shared: dict[tuple, Tensor] | None = None,
        nodes: dict[Node, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Every task's head output; ``bn_offsets`` (from the weight hypernet) are added to
        the BatchNorm affine parameters of the nodes they name, except private nodes (those
        that run stage 0's weights), so that a task that shares nothing keeps its
        single-task network exactly.

        ``shared``: a dict kept across the trees of one batch (the joint stage's sandwich).
        A node is named by the weights it runs and its whole path from the image, a head by
        its task, weights and path, so every node and head two trees have in common runs
        once and both trees read it: the same outputs and gradients as running each tree
        on its own, for a part of the compute (the sandwich's trees share their trunk). Not
        with ``bn_offsets``, which differ per tree.

        ``nodes``: filled with every used node's output, ``{(layer, stream): [B, C, h, w]}``
        (feature distillation reads them).
        """
        if shared is not None and bn_offsets is not None:
            raise ValueError("TreeNet: shared nodes and bn_offsets do not mix")
        cache: dict[tuple, Tensor] = {} if shared is None else shared
        size = (image.shape[-2], image.shape[-1])
        keys: dict[tuple[int, int], tuple] = {}  # (layer, j) -> the node's name in the cache
        for layer, used in enumerate(self._used):
            for j, is_used in enumerate(used):
                if not is_used:
                    continue
                parent = None if layer == 0 else keys[(layer - 1, self.tree.parents[layer - 1][j])]
                source = self.source(layer, j)
                width = self.tree.width(layer, j)
                key = keys[(layer, j)] = (layer, j, id(source), parent, width)
                if key in cache:
                    continue
                x = image if parent is None else cache[parent]
                module = source.streams[j].layers[layer]
                adapted = bn_offsets is not None and self._adapts[layer][j]
                deltas = bn_offsets.get((layer, j)) if adapted else None
                own = dict(module.named_parameters()) if deltas else {}
                shifted = {name: own[name] + d for name, d in deltas.items()} if deltas else {}
                if self._narrowed[layer][j]:
                    cache[key] = self._run_narrow((layer, j), module, x, shifted)
                elif deltas:
                    cache[key] = functional_call(module, shifted, (x,))
                else:
                    cache[key] = module(x)
        if nodes is not None:
            nodes.update({node: cache[key] for node, key in keys.items()})
        out = {}
        last = len(self._used) - 1
        for j, task in enumerate(self.anchor.tasks):
            path = tuple(keys[(layer, s)] for layer, s in enumerate(self.tree.path(j)))
            source = self.source(last, j)
            key = ("head", j, id(source), path)
            if key not in cache:
                feats = [cache[k] for k in path]
                cache[key] = (
                    self._run_slim_head(source, j, feats, size)
                    if self.tree.widths is not None
                    else source.run_head(j, feats, size)
                )
            out[task.name] = cache[key]
        return out


def _accumulate(per_bn: dict[str, list], name: str, module: nn.Module, args: tuple) -> None:
    """Forward pre-hook: add a BatchNorm input's per-channel sums (float64) to ``per_bn``."""
    x = args[0].detach().double()  # [B, C, h, w]
    total, squares = x.sum((0, 2, 3)), x.pow(2).sum((0, 2, 3))
    count = x.numel() // x.shape[1]
    if name in per_bn:
        old = per_bn[name]
        per_bn[name] = [old[0] + total, old[1] + squares, old[2] + count, old[3]]
    else:
        per_bn[name] = [total, squares, count, args[0].dtype]
