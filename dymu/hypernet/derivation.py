"""How a (preference, budget) becomes the configuration it runs, with or without widths.

Trees alone: the edge hnet's tree (:meth:`EdgeHypernet.tree`). In a slimmable space
(``model.widths``, METHOD.md 1.11) every budget at which a full-width tree fits still gets
that same tree, so widths cannot cost those budgets anything; below the cheapest tree the
edge hnet's parents are repaired to the budget on both axes
(:func:`~dymu.space.derive_widths.derive_configuration`), with a width distribution that
follows the preference by ECMT's rule (:func:`~dymu.space.derive_widths.preference_omega`):
the nodes that serve the tasks the preference weighs least are narrowed first. The widths
come from that rule, not from a hypernetwork: stages 1 and 2 train full-width trees.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch

from dymu.hypernet.edge import EdgeHypernet
from dymu.space.derive import argmax_tree
from dymu.space.derive_widths import derive_configuration, preference_omega
from dymu.space.graph import anchor_flops, min_flops, width_costs
from dymu.space.tree import TreeSpec


@dataclass
class Derivation:
    """The configuration for every (preference, budget); see the module docstring."""

    edge: EdgeHypernet
    plain: nx.DiGraph
    """The full-width space stages 1 and 2 were trained on."""
    slim: nx.DiGraph | None = None
    """The same space priced at ``model.widths`` (None: trees alone)."""
    strength: float = 10.0
    """ECMT's rule: log-probability per width step per unit of preference served."""

    @property
    def space(self) -> nx.DiGraph:
        """The space that prices every configuration this derives."""
        return self.plain if self.slim is None else self.slim

    @property
    def widths(self) -> list[float]:
        """The widths a node may run at, ascending ([1.0] for trees alone)."""
        wc = None if self.slim is None else width_costs(self.slim)
        return [1.0] if wc is None else list(wc.widths)

    def min_fraction(self) -> float:
        """The cheapest configuration's FLOPs as a fraction of the anchor's."""
        return min_flops(self.space) / anchor_flops(self.space)

    def tree_fits(self, budget: float) -> bool:
        """Whether a full-width tree fits ``budget`` (then widths change nothing there)."""
        return budget * anchor_flops(self.plain) >= min_flops(self.plain)

    def __call__(self, preference, budget: float) -> TreeSpec:
        """The configuration for ``preference`` ([N]) at ``budget`` (a FLOPs fraction)."""
        edge = self.edge
        r = torch.as_tensor(preference, dtype=torch.float32, device=edge.task_embed.device)
        if self.slim is None or self.tree_fits(budget):
            return edge.tree(r, budget, self.plain)
        alpha = edge.alpha(r, budget).detach().cpu().double().numpy()  # [L-1, N, N]
        omega = preference_omega(
            argmax_tree(alpha), r.cpu().double().numpy(), len(self.widths), self.strength
        )  # [L, N, K]
        trunk = edge.trunk_preference(r)
        return derive_configuration(alpha, omega, self.slim, budget, preference=trunk)
