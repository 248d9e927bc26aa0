"""Edge hypernet (METHOD.md 1.4): a preference and a budget in, a parent distribution out.

The input embedding is ``p = sum_i r_i e_i + c e_c`` with learned embeddings of size 32, as
in the paper. dymu's caller gives the FLOPs budget ``b``; the hypernet turns it into the
paper's frugality knob ``c = (1 - b) / (1 - b_min)`` clipped to [0, 1], where ``b_min`` is the
cheapest tree's share of the anchor's FLOPs (stored with the weights). Feeding ``b`` itself
would leave the network only the narrow range ``[b_min, 1]`` to tell budgets apart. An MLP
with two hidden layers of 100 (ReLU) feeds L-1 heads of size N x N: row j of head l is the
parent distribution alpha[l, j] of node (l, j). Training samples parents with Gumbel-softmax
on log alpha (soft mixtures, or hard one-hot with a straight-through gradient); inference
takes the argmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class EdgeHypernet(nn.Module):
    """(r [N], b) -> parent logits [L-1, N, N] for an anchor of N streams and L layers.

    Args:
        num_tasks: N.
        num_layers: L (layers per stream); parents are chosen for layers 1..L-1.
        embed_dim: size of the preference and budget embeddings (32 in the paper).
        hidden: width of the two hidden layers (100 in the paper).
        self_bias: initial logit bonus of each node's own stream as parent, so training
            starts near the anchor (no sharing), whose weights were trained on their own
            stream's features [choice; 0 gives uniform parents].
        min_budget: ``b_min``, the cheapest tree's FLOPs fraction in the space (a buffer,
            saved with the weights).
        trunk: ``stage1.trunk``, how :meth:`tree` picks the stream of shared nodes.
    """

    def __init__(
        self,
        num_tasks: int,
        num_layers: int,
        *,
        embed_dim: int = 32,
        hidden: int = 100,
        self_bias: float = 2.0,
        min_budget: float = 0.0,
        trunk: str = "edge",
    ) -> None:
        super().__init__()
        if trunk not in ("edge", "preference"):
            raise ValueError(f"trunk must be 'edge' or 'preference', got {trunk!r}")
        self.trunk = trunk  # stage1.trunk: who picks the stream of shared nodes
        if num_layers < 2:
            raise ValueError("an edge hypernet needs at least 2 layers (parents for layer 1+)")
        if not 0.0 <= min_budget < 1.0:
            raise ValueError(f"min_budget must be in [0, 1), got {min_budget}")
        self.num_tasks, self.num_layers = num_tasks, num_layers
        self.task_embed = nn.Parameter(torch.randn(num_tasks, embed_dim) * 0.1)  # e_i
        self.budget_embed = nn.Parameter(torch.randn(embed_dim) * 0.1)  # e_c
        self.register_buffer("min_budget", torch.tensor(float(min_budget)))
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.heads = nn.Linear(hidden, (num_layers - 1) * num_tasks * num_tasks)
        with torch.no_grad():
            self.heads.weight.mul_(0.1)
            eye = torch.eye(num_tasks).expand(num_layers - 1, -1, -1)  # [L-1, N, N]
            self.heads.bias.copy_(self_bias * eye.reshape(-1))

    def frugality(self, b: Tensor | float) -> Tensor:
        """The paper's knob ``c = (1 - b) / (1 - b_min)`` in [0, 1] for a budget ``b``."""
        b = torch.as_tensor(b, dtype=self.budget_embed.dtype, device=self.budget_embed.device)
        return ((1.0 - b) / (1.0 - self.min_budget)).clamp(0.0, 1.0)

    def forward(self, r: Tensor, b: Tensor | float) -> Tensor:
        """Parent logits [..., L-1, N, N] (row j of layer l: logits over parents of node (l, j))
        for preferences r [..., N] and budgets b [...] (a batch of draws, or one)."""
        c = self.frugality(b)
        p = r.to(self.task_embed) @ self.task_embed + c[..., None] * self.budget_embed  # [..., E]
        logits = self.heads(self.mlp(p))  # [..., (L-1) * N * N]
        return logits.view(*p.shape[:-1], self.num_layers - 1, self.num_tasks, self.num_tasks)

    def alpha(self, r: Tensor, b: Tensor | float) -> Tensor:
        """Parent probabilities [L-1, N, N] (rows sum to 1)."""
        return self(r, b).softmax(-1)

    @torch.no_grad()
    def tree(self, r: Tensor, b: float, space):
        """The derived tree for (r, b) in ``space``: argmax parents repaired to the budget
        (:func:`~dymu.space.derive.derive_tree`), with ``trunk: preference`` its shared nodes
        on the preferred task's stream."""
        from dymu.space.derive import derive_tree

        r = torch.as_tensor(r, dtype=torch.float32, device=self.task_embed.device)
        return derive_tree(self.alpha(r, b).cpu(), space, b, self.trunk_preference(r))

    def trunk_preference(self, r: Tensor) -> Tensor | None:
        """What derivation moves shared nodes by (``preference`` of
        :func:`~dymu.space.derive.derive_tree`): ``r`` under ``trunk: preference``, else
        None (the parents' own streams)."""
        return r.detach().cpu() if self.trunk == "preference" else None


def sample_parents(
    logits: Tensor,
    temperature: float,
    *,
    hard: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Gumbel-softmax parent weights v [L-1, N, N] from logits (= log alpha up to a constant).

    v = softmax((log alpha + g) / temperature), g ~ Gumbel(0, 1) i.i.d. With ``hard`` the
    forward value is the one-hot argmax and the gradient is that of the soft sample
    (straight-through estimator).
    """
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    gumbel = -torch.log(-torch.log(u.clamp(1e-10, 1.0 - 1e-7)))
    soft = F.softmax((F.log_softmax(logits, -1) + gumbel) / temperature, dim=-1)
    if not hard:
        return soft
    one_hot = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft)
    return one_hot + soft - soft.detach()


def temperature(step: int, start: float = 5.0, decay: float = 0.97, every: int = 300) -> float:
    """Gumbel-softmax temperature at a training step: start * decay ** (step // every)."""
    return start * decay ** (step // every)
