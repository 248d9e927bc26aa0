"""Execute any tree on the anchor's weights, computing each used node exactly once."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn
from torch.func import functional_call

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
    """

    def __init__(self, streams: TreeStreams | Anchor, tree: TreeSpec) -> None:
        super().__init__()
        streams = TreeStreams.of(streams)
        self._sources = streams.sources(tree)  # [L][N]; refuses a tree of another shape
        self._adapts = [[streams.takes_offsets(s) for s in row] for row in self._sources]
        self.anchor = streams.tuned
        self.private = streams.stage0  # registered, so .to() moves both
        self.tree = tree.canonical()
        self._used = self.tree.used()

    def source(self, layer: int, stream: int) -> Anchor:
        """The weights node (layer, stream) runs (``layer = L - 1`` also: task ``stream``'s
        head)."""
        return self._sources[layer][stream]

    def forward(
        self,
        image: Tensor,
        bn_offsets: Mapping[tuple[int, int], Mapping[str, Tensor]] | None = None,
    ) -> dict[str, Tensor]:
        """Every task's head output; ``bn_offsets`` (from the weight hypernet) are added to
        the BatchNorm affine parameters of the nodes they name, except private nodes (those
        that run stage 0's weights), so that a task that shares nothing keeps its
        single-task network exactly."""
        size = (image.shape[-2], image.shape[-1])
        nodes: dict[tuple[int, int], Tensor] = {}
        for layer, used in enumerate(self._used):
            for j, is_used in enumerate(used):
                if not is_used:
                    continue
                x = image if layer == 0 else nodes[(layer - 1, self.tree.parents[layer - 1][j])]
                module = self.source(layer, j).streams[j].layers[layer]
                adapted = bn_offsets is not None and self._adapts[layer][j]
                deltas = bn_offsets.get((layer, j)) if adapted else None
                if deltas:
                    own = dict(module.named_parameters())
                    shifted = {name: own[name] + d for name, d in deltas.items()}
                    nodes[(layer, j)] = functional_call(module, shifted, (x,))
                else:
                    nodes[(layer, j)] = module(x)
        out = {}
        for j, task in enumerate(self.anchor.tasks):
            path = [nodes[(layer, s)] for layer, s in enumerate(self.tree.path(j))]
            out[task.name] = self.source(len(self._used) - 1, j).run_head(j, path, size)
        return out
