"""Pareto hypernetworks: one network maps a preference ray to a whole model (METHOD.md 2).

A *Pareto hypernetwork* (PHN; Navon, Shamsian, Chechik, Fetaya, "Learning the Pareto Front
with Hypernetworks", ICLR 2021; Lin, Yang, Zhang, Kwong, "Controllable Pareto Multi-Task
Learning", arXiv 2010.06313) generates the parameters of a *target* network from a
preference ray ``r`` on the simplex. Trained with a fresh ray every step and a scalarisation
of the task losses for that ray (:mod:`dymu.pareto.epo`), it learns the whole Pareto front
at once; at run time any ray picks a trade-off without retraining.

:class:`ParetoHypernet` wraps any ``nn.Module`` (run through ``torch.func.functional_call``,
so buffers such as BatchNorm running statistics keep working) and generates all of its
parameters or a name-selected subset; the rest stay the target's own, shared by every ray
and trained normally. :func:`phn_bn` is the "BN-only" variant (PHN-BN) that generates only
the affine parameters of the normalisation layers. :func:`train_phn` is the training loop
(Dirichlet rays, Adam, linear or EPO scalarisation).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from dymu import dist
from dymu.errors import UserError
from dymu.pareto.epo import SOLVERS, EPOSolver, linear_weights, task_gradients
from dymu.train.engine import Stateless, StepLoop

__all__ = [
    "NORM_TYPES",
    "ParetoHypernet",
    "check_ray",
    "norm_affine_names",
    "phn_bn",
    "select_parameters",
    "train_phn",
]

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*d, SyncBatchNorm, InstanceNorm*d, lazy ones
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
)
"""Module types whose ``weight`` / ``bias`` :func:`phn_bn` generates."""

Select = Callable[[str, Tensor], bool] | Sequence[str] | None
"""Which target parameters a hypernet generates: a predicate on ``(name, parameter)``,
names (a name also selects every parameter under a module of that name: ``"heads"``
selects ``"heads.left.weight"``), or None for all of them."""


def select_parameters(target: nn.Module, select: Select) -> list[str]:
    """Names of ``target``'s parameters chosen by ``select``, in ``named_parameters`` order.

    Raises:
        UserError: a listed name matches no parameter, or nothing is selected.
    """
    named = [(n, p) for n, p in target.named_parameters() if p.is_floating_point()]
    if select is None:
        chosen = [n for n, _ in named]
    elif callable(select):
        chosen = [n for n, p in named if select(n, p)]
    else:
        wanted = [select] if isinstance(select, str) else list(select)
        for w in wanted:
            if not any(n == w or n.startswith(f"{w}.") for n, _ in named):
                sample = ", ".join(n for n, _ in named[:8])
                more = ", ..." if len(named) > 8 else ""
                raise UserError(
                    f"ParetoHypernet: no parameter or module named {w!r} in the target; "
                    f"its parameters are: {sample}{more}"
                )
        chosen = [n for n, _ in named if any(n == w or n.startswith(f"{w}.") for w in wanted)]
    if not chosen:
        raise UserError("ParetoHypernet: the selection picks no parameter of the target")
    return chosen


def norm_affine_names(target: nn.Module) -> list[str]:
    """Names of the affine ``weight`` / ``bias`` of every normalisation layer in ``target``.

    A normalisation layer is an instance of :data:`NORM_TYPES`; layers built with
    ``affine=False`` / ``elementwise_affine=False`` have no such parameters and add none.
    """
    owners = {
        f"{prefix}.{attr}" if prefix else attr
        for prefix, module in target.named_modules()
        if isinstance(module, NORM_TYPES)
        for attr in ("weight", "bias")
        if isinstance(getattr(module, attr, None), nn.Parameter)
    }
    return [n for n, _ in target.named_parameters() if n in owners]


def check_ray(ray: Tensor | Sequence[float], num_tasks: int, *, atol: float = 1e-4) -> Tensor:
    """``ray`` as a float tensor [T] on the simplex, or a one-line UserError saying why not.

    The sum may miss 1 by ``atol`` (float32 Dirichlet draws do by ~1e-7).
    """
    r = torch.as_tensor(ray)
    r = r if r.is_floating_point() else r.float()

    def shown() -> list[float]:
        return [round(v, 6) for v in r.detach().reshape(-1).tolist()]

    if r.ndim != 1 or r.shape[0] != num_tasks:
        raise UserError(
            f"preference must hold {num_tasks} weights (shape [{num_tasks}]), got shape "
            f"{list(r.shape)}: {shown()}"
        )
    if not bool(torch.isfinite(r).all()):
        raise UserError(f"preference must be finite, got {shown()}")
    if bool((r < 0).any()):
        raise UserError(f"preference weights must be >= 0, got {shown()}")
    total = float(r.sum())
    if abs(total - 1.0) > atol:
        raise UserError(f"preference must sum to 1 (within {atol:g}), got {shown()} = {total:g}")
    return r


class ParetoHypernet(nn.Module):
    """A chunked hypernetwork that generates a target network's parameters from a ray.

    Architecture (PHN's ray MLP 100-100-100, chunked as in Lin et al. 2020 and von Oswald
    et al., ICLR 2020): the N selected parameters are laid out as one vector cut into
    ``C = ceil(N / S)`` chunks of ``S = chunk_size`` entries. For chunk c, with a learned
    chunk embedding ``z_c`` [E],

        h_c = MLP([r, z_c])            Linear(T+E, H) - ReLU - Linear(H, H) - ReLU - Linear(H, H)
        block_c = W_out h_c + b_out    Linear(H, S), shared by all chunks

    and the blocks are concatenated, cut to N and reshaped into the selected parameters.
    Sharing ``W_out`` is what makes chunking cheap (``H * S`` weights instead of ``H * N``);
    while ``C <= H`` it restricts no single ray's parameters, since any [C, S] matrix of
    blocks (rank <= C <= H) factors as ``[h_1 ... h_C]^T W_out^T``. ``chunk_size >= N``
    gives one chunk: PHN's unchunked head.

    Initialisation (the generated parameters start at the target's own): every selected
    parameter is generated as ``theta_k(r) = theta_k^0 + delta_k(r)``, where ``theta_k^0``
    is the target's parameter as passed in (frozen: ``requires_grad`` is switched off on the
    target) and ``delta`` is the hypernet output above, whose output layer starts at zero.
    So at step 0 the model is exactly the target for every ray, with whatever
    initialisation (default, or pre-trained) the target came with; training moves away
    from it like ordinary training would. Generating the parameters from scratch instead
    (PHN) makes the starting weights a random function of the ray whose scale differs per
    layer unless each output block is rescaled by hand; and for a subset of parameters
    (heads, PHN-BN on a pre-trained backbone) it would throw the trained values away.

    ``model(x, r)`` runs ``torch.func.functional_call(target, generated, (x,))``: the target
    keeps its buffers (BatchNorm running statistics update in train mode) and may return
    anything (a dict task -> output for dymu's multi-task models).

    Attributes:
        target: the wrapped network; its unselected parameters are trained with the hypernet.
        names: the generated parameters' names in the target, in layout order.
        total: N, the number of generated scalars.
        num_chunks: C.
        chunk_size: S.
    """

    def __init__(
        self,
        target: nn.Module,
        *,
        num_tasks: int,
        select: Select = None,
        hidden: int = 100,
        chunk_size: int = 2048,
        chunk_embedding: int = 32,
    ) -> None:
        """
        Args:
            target: the network to generate (any ``nn.Module``); taken over, not copied.
            num_tasks: T, the length of a preference ray.
            select: which parameters to generate (:data:`Select`); None = all.
            hidden: H, the width of the three ray-MLP layers (PHN: 100).
            chunk_size: S, entries per chunk (capped at N).
            chunk_embedding: E, size of each learned chunk embedding.
        """
        super().__init__()
        for name, value in (
            ("num_tasks", num_tasks),
            ("hidden", hidden),
            ("chunk_size", chunk_size),
            ("chunk_embedding", chunk_embedding),
        ):
            if not isinstance(value, int) or value < 1:
                raise UserError(f"ParetoHypernet: {name} must be an integer >= 1, got {value!r}")
        self.target = target
        self.num_tasks = num_tasks
        self.names = tuple(select_parameters(target, select))
        own = dict(target.named_parameters())
        self.shapes = tuple(own[n].shape for n in self.names)
        self.numels = tuple(own[n].numel() for n in self.names)
        self.total = sum(self.numels)
        for n in self.names:
            own[n].requires_grad_(False)  # theta^0: the constant the offsets are added to
        self.chunk_size = min(chunk_size, self.total)
        self.num_chunks = math.ceil(self.total / self.chunk_size)
        self.chunk_embed = nn.Parameter(torch.randn(self.num_chunks, chunk_embedding))
        self.mlp = nn.Sequential(
            nn.Linear(num_tasks + chunk_embedding, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
        )
        self.head = nn.Linear(hidden, self.chunk_size)
        nn.init.zeros_(self.head.weight)  # delta(r) = 0: the model starts at the target
        nn.init.zeros_(self.head.bias)

    def hypernet_parameters(self) -> list[nn.Parameter]:
        """The hypernet's own parameters (chunk embeddings, MLP, head), not the target's."""
        return [self.chunk_embed, *self.mlp.parameters(), *self.head.parameters()]

    def offsets(self, ray: Tensor | Sequence[float]) -> Tensor:
        """delta(r): all generated offsets as one vector [N] (layout order of :attr:`names`)."""
        r = check_ray(ray, self.num_tasks).to(self.chunk_embed)
        inputs = torch.cat([r.expand(self.num_chunks, -1), self.chunk_embed], dim=1)  # [C, T+E]
        blocks = self.head(self.mlp(inputs))  # [C, T+E] -> [C, H] -> [C, S]
        return blocks.reshape(-1)[: self.total]  # [C, S] -> [C*S] -> [N]

    def generate(self, ray: Tensor | Sequence[float]) -> dict[str, Tensor]:
        """The selected parameters for ``ray``: ``{name: theta^0 + delta}`` in their shapes."""
        flat = self.offsets(ray)
        out = {}
        for name, shape, delta in zip(
            self.names, self.shapes, flat.split(self.numels), strict=True
        ):
            base = self.target.get_parameter(name)
            out[name] = base + delta.view(shape).to(base.dtype)  # [numel] -> shape
        return out

    def forward(self, x: Any, preference: Tensor | Sequence[float], *args: Any, **kwargs: Any):
        """Run the target on ``x`` (and any further arguments) with the parameters of ``r``."""
        return functional_call(self.target, self.generate(preference), (x, *args), kwargs)

    @torch.no_grad()
    def materialize(self, preference: Tensor | Sequence[float]) -> nn.Module:
        """A plain copy of the target holding the parameters of ``preference`` (for export)."""
        import copy

        net = copy.deepcopy(self.target)
        for name, value in self.generate(preference).items():
            net.get_parameter(name).copy_(value)
        return net.requires_grad_(True)

    def extra_repr(self) -> str:
        return (
            f"num_tasks={self.num_tasks}, generated={len(self.names)} tensors / {self.total} "
            f"values, chunks={self.num_chunks}x{self.chunk_size}"
        )


def phn_bn(
    target: nn.Module,
    *,
    num_tasks: int,
    hidden: int = 100,
    chunk_size: int = 2048,
    chunk_embedding: int = 32,
) -> ParetoHypernet:
    """PHN-BN: a :class:`ParetoHypernet` that generates only normalisation affine parameters.

    The weight and bias of every BatchNorm / InstanceNorm / LayerNorm / GroupNorm / RMSNorm
    (:func:`norm_affine_names`); all other parameters are shared across rays. The cheapest
    PHN for a large target: a few thousand generated values move every feature map.

    Raises:
        UserError: the target has no normalisation layer with affine parameters.
    """
    names = norm_affine_names(target)
    if not names:
        raise UserError("phn_bn: the target has no normalisation layer with affine parameters")
    return ParetoHypernet(
        target,
        num_tasks=num_tasks,
        select=names,
        hidden=hidden,
        chunk_size=chunk_size,
        chunk_embedding=chunk_embedding,
    )


# --------------------------------------------------------------------------- training


def default_inputs(batch: Any) -> Any:
    """The network input of a batch: ``batch["image"]`` (dymu's samples), ``batch[0]`` of a
    tuple or list (``TensorDataset``), or the batch itself when it is a tensor."""
    if isinstance(batch, Mapping):
        if "image" not in batch:
            raise UserError(
                f"train_phn: a dict batch needs an 'image' entry (or pass inputs=), got keys "
                f"{sorted(batch)}"
            )
        return batch["image"]
    if isinstance(batch, list | tuple):
        return batch[0]
    return batch


def _to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (dict, tuple, list, or bare) moved to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def train_phn(
    model: ParetoHypernet,
    batches: Iterable[Any],
    loss_fn: Callable[[Any, Any], Tensor],
    *,
    steps: int,
    lr: float = 1e-4,
    solver: str = "linear",
    alpha: float = 0.2,
    seed: int = 0,
    weight_decay: float = 0.0,
    inputs: Callable[[Any], Any] = default_inputs,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    desc: str = "phn",
    run_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train a Pareto hypernetwork: one Dirichlet ray per step, Adam on all trainable weights.

    Per step (PHN, Navon et al. 2021, Algorithm 1): draw ``r ~ Dirichlet(alpha, ..., alpha)``
    (``numpy.random.default_rng(seed)``), run ``model(inputs(batch), r)``, get the task
    losses ``L = loss_fn(outputs, batch)`` [T] (task t paired with ``r_t``), weigh them
    with ``w = r`` (``solver="linear"``, PHN-LS) or the EPO weights for ``(L, grad L, r)``
    (``solver="epo"``, PHN-EPO; gradients over every trainable parameter, as in the
    reference) and take one Adam step on ``sum_t w_t L_t`` (``w`` detached).

    Contract for dymu's multi-task targets, which return ``{task: output}``: ``loss_fn``
    receives that dict and the batch and returns ``torch.stack([L_task for task in
    tasks])``, in the order the rays use.

    Args:
        model: the hypernet (its target's unselected parameters train too).
        batches: an iterable of batches; re-iterated when it runs out (a DataLoader gives
            epochs), unless it is a one-shot iterator, which must last ``steps`` batches.
            Tensors in a batch (bare, dict, tuple, list) are moved to the model's device.
        loss_fn: ``(outputs, batch) -> Tensor [T]``.
        steps: optimisation steps.
        lr: Adam learning rate (PHN's MultiMNIST trainer: 1e-4).
        solver: ``"linear"`` or ``"epo"``.
        alpha: Dirichlet concentration of the training rays (PHN: 0.2).
        seed: seed of the ray draws (data order and weight init are the caller's).
        weight_decay: Adam weight decay.
        inputs: picks the network input out of a batch (:func:`default_inputs`).
        on_step: called as ``on_step(step, record)`` after every step.
        desc: the progress bar's text and the training log's name.
        run_dir: where ``logs/<desc>.jsonl`` (the scalarised and per-task losses every 10
            steps) goes; None writes no log.

    Returns:
        ``{"solver", "steps", "lr", "alpha", "seed", "rays" [steps][T], "losses"
        [steps][T], "weights" [steps][T], "step_s" [steps], "total_s"}`` plus, for EPO,
        ``"epo_moves"``: how many steps balanced, descended or fell back. ``step_s`` runs
        from fetching the batch to the optimiser step (``on_step`` excluded); ``total_s``
        is the whole loop.

    Raises:
        UserError: bad arguments, a loss vector of the wrong shape, or too few batches.
    """
    _check_phn(solver, steps, alpha, lr)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    step = _PHNStep(
        model, loss_fn, inputs, _cycle(batches, steps), np.random.default_rng(seed), alpha,
        params, optimizer, EPOSolver() if solver == "epo" else None, on_step,
    )  # fmt: skip
    loop = StepLoop(
        name=desc, label=desc, desc=desc, run_dir=run_dir, checkpoint=None, config_hash="",
        steps=steps, every=steps, model=model, optimizer=optimizer, scheduler=None, step=step,
        show=("loss",),
    )  # fmt: skip
    model.train()
    start = time.perf_counter()
    loop.run()
    history: dict[str, Any] = {"solver": solver, "steps": steps, "lr": lr, "alpha": alpha}
    history.update(seed=seed, **step.history, total_s=time.perf_counter() - start)
    if step.epo is not None:
        history["epo_moves"] = step.moves
    return history


class _PHNStep(Stateless):
    """One step of :func:`train_phn` (a fresh ray, the scalarised loss, one Adam step),
    called by its :class:`~dymu.train.engine.StepLoop`; keeps the per-step history."""

    def __init__(self, model, loss_fn, inputs, stream, rng, alpha, params, optimizer, epo, on_step):
        self.model, self.loss_fn, self.inputs, self.stream = model, loss_fn, inputs, stream
        self.rng, self.alpha, self.params, self.optimizer = rng, alpha, params, optimizer
        self.epo, self.on_step = epo, on_step
        self.device = model.chunk_embed.device
        self.history: dict[str, list] = {"rays": [], "losses": [], "weights": [], "step_s": []}
        self.moves = {"balance": 0, "descent": 0, "fallback": 0}

    def __call__(self, i: int, log: bool) -> dict[str, float] | None:
        tic = time.perf_counter()
        t = self.model.num_tasks
        batch = _to_device(next(self.stream), self.device)
        ray = self.rng.dirichlet([self.alpha] * t)
        ray = torch.as_tensor(ray, dtype=torch.float32, device=self.device)
        losses = self.loss_fn(self.model(self.inputs(batch), ray), batch)
        if not isinstance(losses, Tensor) or losses.shape != (t,):
            got = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise UserError(f"train_phn: loss_fn must return a tensor [{t}], got {got}")
        self.optimizer.zero_grad(set_to_none=True)
        if self.epo is not None:
            weights = _epo_gradients(self.epo, losses, ray, self.params)
            self.moves[self.epo.last_move] += 1
        else:
            weights = linear_weights(ray)
            (weights * losses).sum().backward()
        dist.average_gradients(self.params)  # under torchrun: the global batch's gradient
        self.optimizer.step()
        record = {
            "ray": ray.tolist(),
            "losses": losses.detach().tolist(),
            "weights": weights.tolist(),
            "step_s": time.perf_counter() - tic,
        }
        self.history["rays"].append(record["ray"])
        for key in ("losses", "weights", "step_s"):
            self.history[key].append(record[key])
        if self.on_step is not None:
            self.on_step(i, record)
        if not log:
            return None
        # This rank's losses (the logged curve; the step itself used the global gradient).
        scalarised = float((weights.detach() * losses.detach()).sum())
        return {"loss": scalarised, **{f"loss_{k}": v for k, v in enumerate(record["losses"])}}


def _check_phn(solver: str, steps: Any, alpha: float, lr: float) -> None:
    """Refuse bad arguments of :func:`train_phn` with one line."""
    if solver not in SOLVERS:
        raise UserError(f"unknown PHN solver {solver!r}; choose one of: {', '.join(SOLVERS)}")
    if not isinstance(steps, int) or steps < 1:
        raise UserError(f"train_phn: steps must be an integer >= 1, got {steps!r}")
    if not (alpha > 0 and math.isfinite(alpha)):
        raise UserError(f"train_phn: alpha (Dirichlet) must be > 0, got {alpha}")
    if not lr > 0:
        raise UserError(f"train_phn: lr must be > 0, got {lr}")
    if solver == "epo" and dist.is_distributed():
        raise UserError(
            "train_phn: the EPO solver is not data-parallel (its weights would come from each "
            "process's part of the batch); use solver linear, or run without torchrun"
        )


def _cycle(batches: Iterable[Any], steps: int) -> Iterator[Any]:
    """``batches`` again and again (epochs), or once when it is a one-shot iterator, which
    must then last ``steps`` batches."""
    one_shot = iter(batches) is batches
    step = 0
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
            step += 1
        if one_shot:
            raise UserError(f"train_phn: the batch iterator ran out after {step} of {steps} steps")
        if empty:
            raise UserError("train_phn: batches yields nothing")


def _epo_gradients(epo: EPOSolver, losses: Tensor, ray: Tensor, params: list) -> Tensor:
    """Set every parameter's gradient to that of sum_t w_t L_t with the EPO weights w for
    (L, grad L, ray), and return w [T]."""
    grads = task_gradients(losses, params)  # [T, P]
    weights = epo.weights(losses, grads, ray)
    # grad of sum_t w_t L_t (w constant) is w @ G: no third backward pass needed.
    flat = weights.to(grads.dtype) @ grads  # [T] @ [T, P] -> [P]
    for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
        p.grad = g.view_as(p).to(p.dtype)
    return weights
