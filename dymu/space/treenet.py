"""Execute any tree on the anchor's weights, computing each used node exactly once."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn
from torch.func import functional_call

from dymu.models.anchor import Anchor
from dymu.space.tree import TreeSpec

Node = tuple[int, int]


class TreeNet(nn.Module):
    """A tree run on the anchor: node (l, j) is stream j's layer l fed its parent's output.

    Only used nodes run (unused ones are pruned), each once per forward, so the compute is
    exactly the tree's FLOPs. The no-sharing tree reproduces :meth:`Anchor.forward`.

    With ``private`` (the stage-0 streams, METHOD.md 1.9) the tree's private nodes
    (:meth:`TreeSpec.private`: on their own stream's path, for their own task alone) and
    the heads above them run ``private``'s weights, the other nodes ``anchor``'s (the joint
    stage's tree-aware ones): a task that shares nothing keeps its single-task network.
    """

    def __init__(self, anchor: Anchor, tree: TreeSpec, private: Anchor | None = None) -> None:
        super().__init__()
        if (tree.num_tasks, tree.num_layers) != (len(anchor.tasks), anchor.num_layers):
            raise ValueError(
                f"tree for {tree.num_tasks} tasks x {tree.num_layers} layers does not fit an "
                f"anchor of {len(anchor.tasks)} x {anchor.num_layers}"
            )
        self.anchor = anchor
        self.private = private
        self.tree = tree.canonical()
        self._used = self.tree.used()
        self._private = self.tree.private() if private is not None else None

    def source(self, layer: int, stream: int) -> Anchor:
        """The streams node (layer, stream) runs: ``private`` for private nodes, else the
        anchor (``layer = L - 1`` also says whose head task ``stream`` reads)."""
        if self._private is not None and self._private[layer][stream]:
            return self.private
        return self.anchor

    def forward(
        self,
        image: Tensor,
        bn_offsets: Mapping[tuple[int, int], Mapping[str, Tensor]] | None = None,
    ) -> dict[str, Tensor]:
        """Every task's head output; ``bn_offsets`` (from the weight hypernet) are added to
        the BatchNorm affine parameters of the nodes they name."""
        size = (image.shape[-2], image.shape[-1])
        nodes: dict[tuple[int, int], Tensor] = {}
        for layer, used in enumerate(self._used):
            for j, is_used in enumerate(used):
                if not is_used:
                    continue
                x = image if layer == 0 else nodes[(layer - 1, self.tree.parents[layer - 1][j])]
                module = self.source(layer, j).streams[j].layers[layer]
                deltas = bn_offsets.get((layer, j)) if bn_offsets is not None else None
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
