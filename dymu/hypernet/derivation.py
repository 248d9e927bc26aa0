"""How a (preference, budget) becomes the configuration it runs, with or without widths.

Trees alone: the edge hnet's tree (:meth:`EdgeHypernet.tree`). In a slimmable space
(``model.widths``, METHOD.md 1.11) a budget at which a full-width tree fits gets that same
tree, so widths cannot cost it anything, unless the tree spends less than ``slim.fill`` of
the budget (a coarse space's gaps: on a two-task space every budget from 0.61 to 0.76
gets the 0.61 tree). Below the cheapest tree, and in such a gap, the edge hnet's parents
are repaired to the budget on both axes
(:func:`~dymu.space.derive_widths.derive_configuration`), with a width distribution that
follows the preference by ECMT's rule (:func:`~dymu.space.derive_widths.preference_omega`):
the nodes that serve the tasks the preference weighs least are narrowed first. The widths
come from that rule, not from a hypernetwork: stages 1 and 2 train full-width trees.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np
import torch

from dymu.config import SlimConfig
from dymu.hypernet.edge import EdgeHypernet
from dymu.space.derive import argmax_tree
from dymu.space.derive_widths import (
    derive_configuration,
    preference_omega,
    widened_from_narrowest,
)
from dymu.space.graph import anchor_flops, min_flops, width_costs
from dymu.space.tree import TreeSpec

FILL_STEP = 0.01
"""The budget step at which ``fill`` probes the edge hnet for the next richer tree."""


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
    fill: float = 0.0
    """A budget whose full-width tree spends less than this fraction of it runs the
    configuration with widths instead, where that spends more (0: never)."""

    @classmethod
    def of(
        cls, edge: EdgeHypernet, plain: nx.DiGraph, slim: nx.DiGraph | None, rule: SlimConfig
    ) -> Derivation:
        """The derivation a run's config (its ``slim`` section) asks for."""
        return cls(edge, plain, slim, rule.strength, rule.fill)

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
        """Whether a full-width tree fits ``budget`` (then it runs one, unless ``fill``)."""
        return budget * anchor_flops(self.plain) >= min_flops(self.plain)

    def __call__(self, preference, budget: float) -> TreeSpec:
        """The configuration for ``preference`` ([N]) at ``budget`` (a FLOPs fraction)."""
        r = torch.as_tensor(preference, dtype=torch.float32, device=self.edge.task_embed.device)
        if self.slim is None:
            return self.edge.tree(r, budget, self.plain)
        if not self.tree_fits(budget):
            return self._slim(r, budget)
        tree = self.edge.tree(r, budget, self.plain)
        spent = tree.flops(self.plain)
        if spent >= self.fill * budget * anchor_flops(self.plain):
            return tree
        config = self._fill(r, budget)
        return config if config is not None and config.flops(self.slim) > spent else tree

    def _fill(self, r: torch.Tensor, budget: float) -> TreeSpec | None:
        """The first tree the edge hnet derives above ``budget`` (budgets probed in steps of
        :data:`FILL_STEP`) that fits it with narrowed nodes: from the narrowest widths,
        widened where the preference's width distribution minds it most per FLOP while the
        budget allows (:func:`~dymu.space.derive_widths.spend_budget`). None when the next
        richer tree does not fit even at the narrowest widths."""
        full = anchor_flops(self.plain)
        limit = budget * full
        richer = None
        for b in np.arange(budget + FILL_STEP, 1.0 + FILL_STEP, FILL_STEP):
            richer = self.edge.tree(r, min(float(b), 1.0), self.plain)
            if richer.flops(self.plain) > limit:
                break
        if richer is None or richer.flops(self.plain) <= limit:
            return None
        omega = preference_omega(richer, r.cpu().double().numpy(), len(self.widths), self.strength)
        return widened_from_narrowest(richer, self.slim, budget, omega)

    def _slim(self, r: torch.Tensor, budget: float) -> TreeSpec:
        """The configuration with widths for ``r`` at ``budget`` (the module docstring)."""
        edge = self.edge
        alpha = edge.alpha(r, budget).detach().cpu().double().numpy()  # [L-1, N, N]
        omega = preference_omega(
            argmax_tree(alpha), r.cpu().double().numpy(), len(self.widths), self.strength
        )  # [L, N, K]
        trunk = edge.trunk_preference(r)
        return derive_configuration(alpha, omega, self.slim, budget, preference=trunk)
