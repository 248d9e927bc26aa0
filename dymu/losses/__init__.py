"""Losses of the search stages (METHOD.md 1.5; DESIGN.md "Budget")."""

from __future__ import annotations

from dymu.losses.branching import (
    active_mask,
    budget_penalty,
    budget_target,
    expected_flops,
    l_active,
    l_inactive,
    omega,
    omega_budget,
    p_use,
    task_loss,
)

__all__ = [
    "active_mask",
    "budget_penalty",
    "budget_target",
    "expected_flops",
    "l_active",
    "l_inactive",
    "omega",
    "omega_budget",
    "p_use",
    "task_loss",
]
