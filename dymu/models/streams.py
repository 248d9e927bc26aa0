"""Which weights each node of a tree runs: one object that every tree executor asks.

Where the joint stage ran (METHOD.md 1.9) a tree has two sets of stream weights to draw on:
the joint stage's tree-aware copy (``tuned``) and the independent single-task streams of
stage 0. The private-node rule says which one a node runs: a node on its own stream's path,
for its own task alone (:meth:`~dymu.space.tree.TreeSpec.private`), and the head above it
run stage 0's weights, so a task that shares nothing keeps its single-task network; every
other node runs the tuned weights. Without a joint stage there is one set and no rule.

With widths (METHOD.md 1.11) a third set may join: the width stage's ``narrow`` copy,
which every node in a narrowed context runs (the node or one before it on its path narrower
than full width, :meth:`~dymu.space.tree.TreeSpec.narrowed`), and the head above such a
node. Full-width trees never touch it, so training narrow configurations cannot cost a
full-width tree anything.

:class:`~dymu.space.treenet.TreeNet`, :class:`~dymu.models.mixture.MixtureNet` (relaxed, on
parent mixtures) and :func:`~dymu.compile.materialize.materialize` all take a
:class:`TreeStreams`, so the rule is written once, here.
"""

from __future__ import annotations

from dataclasses import dataclass

from dymu.models.anchor import Anchor


@dataclass(frozen=True)
class TreeStreams:
    """The stream weights trees run on, and the private-node rule.

    Attributes:
        tuned: the weights of shared and post-split nodes (the joint stage's, or stage 0's
            when no joint stage ran).
        stage0: the weights private nodes and their heads run; None when every node runs
            ``tuned`` (no joint stage, or a caller that wants one set of weights).
        narrow: the weights nodes in a narrowed context and their heads run (the width
            stage's); None: they run ``tuned``, sliced.
    """

    tuned: Anchor
    stage0: Anchor | None = None
    narrow: Anchor | None = None

    @classmethod
    def of(cls, streams: TreeStreams | Anchor) -> TreeStreams:
        """``streams`` itself, or one set of weights for every node."""
        return streams if isinstance(streams, TreeStreams) else cls(streams)

    @property
    def tasks(self) -> list:
        return self.tuned.tasks

    @property
    def num_layers(self) -> int:
        return self.tuned.num_layers

    def modules(self) -> list[Anchor]:
        """The distinct sets of weights (one to three), e.g. to move or freeze them."""
        return [m for m in (self.tuned, self.stage0, self.narrow) if m is not None]

    def sources(self, tree) -> list[list[Anchor]]:
        """``sources[l][j]``: the weights node (l, j) of ``tree`` runs; row ``L - 1`` also
        gives task j's head (it reads node (L - 1, j), and is private, or narrowed,
        exactly when that node is). A tree of another shape than the streams is a
        ValueError."""
        if (tree.num_tasks, tree.num_layers) != (len(self.tasks), self.num_layers):
            raise ValueError(
                f"tree for {tree.num_tasks} tasks x {tree.num_layers} layers does not fit an "
                f"anchor of {len(self.tasks)} x {self.num_layers}"
            )
        private = tree.private() if self.stage0 is not None else None
        narrowed = tree.narrowed() if self.narrow is not None else None
        out = []
        for layer in range(tree.num_layers):
            row = []
            for j in range(tree.num_tasks):
                if narrowed is not None and narrowed[layer][j]:
                    row.append(self.narrow)
                elif private is not None and private[layer][j]:
                    row.append(self.stage0)
                else:
                    row.append(self.tuned)
            out.append(row)
        return out

    def takes_offsets(self, source: Anchor) -> bool:
        """Whether a node that runs ``source`` (one of :meth:`sources`) takes the weight
        hypernet's adaptation: every node but the private ones, which run stage 0 exactly,
        so that a task that shares nothing keeps its single-task network."""
        return self.stage0 is None or source is not self.stage0

    def adapted(self, tree) -> bool:
        """Whether any used node of ``tree`` takes the weight hypernet's adaptation: False
        when every used node is private (the anchor tree under the private-node rule), whose
        outputs then do not depend on the preference."""
        sources = self.sources(tree)
        return any(
            self.takes_offsets(sources[layer][j]) for layer, j in tree.canonical().used_nodes()
        )

    def to(self, device) -> TreeStreams:
        """Both sets moved to ``device`` (in place, as ``nn.Module.to``) and in eval mode."""
        for m in self.modules():
            m.to(device).eval()
        return self

    def eval(self) -> TreeStreams:
        for m in self.modules():
            m.eval()
        return self
