"""Execute any tree on the anchor's weights, computing each used node exactly once."""

from __future__ import annotations

from torch import Tensor, nn

from dymu.models.anchor import Anchor
from dymu.space.tree import TreeSpec


class TreeNet(nn.Module):
    """A tree run on the anchor: node (l, j) is stream j's layer l fed its parent's output.

    Only used nodes run (unused ones are pruned), each once per forward, so the compute is
    exactly the tree's FLOPs. The no-sharing tree reproduces :meth:`Anchor.forward`.
    """

    def __init__(self, anchor: Anchor, tree: TreeSpec) -> None:
        super().__init__()
        if (tree.num_tasks, tree.num_layers) != (len(anchor.tasks), anchor.num_layers):
            raise ValueError(
                f"tree for {tree.num_tasks} tasks x {tree.num_layers} layers does not fit an "
                f"anchor of {len(anchor.tasks)} x {anchor.num_layers}"
            )
        self.anchor = anchor
        self.tree = tree.canonical()
        self._used = self.tree.used()

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        size = (image.shape[-2], image.shape[-1])
        streams = self.anchor.streams
        nodes: dict[tuple[int, int], Tensor] = {}
        for layer, used in enumerate(self._used):
            for j, is_used in enumerate(used):
                if not is_used:
                    continue
                x = image if layer == 0 else nodes[(layer - 1, self.tree.parents[layer - 1][j])]
                nodes[(layer, j)] = streams[j].layers[layer](x)
        out = {}
        for j, task in enumerate(self.anchor.tasks):
            path = [nodes[(layer, s)] for layer, s in enumerate(self.tree.path(j))]
            out[task.name] = self.anchor.run_head(j, path, size)
        return out
