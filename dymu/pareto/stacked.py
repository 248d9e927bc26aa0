"""K models of one architecture, stacked along a leading K dimension and run together.

:class:`ParetoSet` is what the Pareto sets of :mod:`dymu.pareto.transfer` train and what
``dymu baselines`` uses for its K static models: every parameter and buffer of a template
network becomes one ``[K, ...]`` tensor (``torch.func.stack_module_state``), and the K
models run as one batched computation (``torch.vmap(functional_call)``, BatchNorm
included) or, where that measured slower (CPUs), in turn on the same storage.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state

from dymu.errors import UserError

__all__ = ["EXECUTIONS", "INITS", "ParetoSet", "select_output"]

INITS = ("same", "seeded")
"""How :class:`ParetoSet` initialises its K models (see its docstring)."""

EXECUTIONS = ("vmap", "loop")
"""How :class:`ParetoSet` runs its K models (see its docstring)."""


def _set_tensor(root: nn.Module, name: str, value: Tensor, *, parameter: bool) -> None:
    """Replace the parameter or buffer ``name`` (dotted path) of ``root`` by ``value``."""
    owner_name, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    if parameter:
        owner._parameters[leaf] = value  # an nn.Parameter
    else:
        owner._buffers[leaf] = value


def _reinitialise(module: nn.Module, seed: int) -> None:
    """Draw fresh weights for ``module`` from ``seed``: every submodule's reset_parameters().

    Runs under a forked RNG, so the caller's random stream is left as it was. A parameter
    owned by a module without ``reset_parameters`` could not be re-drawn and would silently
    stay equal across models, so it is an error.
    """
    for name, sub in module.named_modules():
        if any(True for _ in sub.parameters(recurse=False)) and not hasattr(
            sub, "reset_parameters"
        ):
            raise UserError(
                f"ParetoSet(init='seeded'): module {name or '<root>'} ({type(sub).__name__}) owns "
                "parameters but has no reset_parameters(); use init='same'"
            )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for sub in module.modules():
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()


def _check_template(template: nn.Module) -> None:
    """Reject templates that cannot be stacked or cannot run under vmap, with one line."""
    if not isinstance(template, nn.Module):
        raise UserError(f"ParetoSet: template must be an nn.Module, got {type(template).__name__}")
    params = list(template.named_parameters())
    if not params:
        raise UserError("ParetoSet: the template has no parameters")
    for name, p in params:
        if isinstance(p, nn.parameter.UninitializedParameter):
            raise UserError(
                f"ParetoSet: parameter {name} is uninitialised (lazy module); run the template "
                "once on an example input before stacking it"
            )
    for name, m in template.named_modules():
        if (
            isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats
            and m.momentum is None
        ):
            # The cumulative average reads num_batches_tracked as a Python number, which
            # vmap cannot do for a per-model (batched) counter.
            raise UserError(
                f"ParetoSet: BatchNorm {name} has momentum=None (cumulative average), which "
                "cannot run under vmap; give it a momentum such as 0.1"
            )


def select_output(tree: Any, k: int) -> Any:
    """Model k's slice of a vmapped output: every tensor leaf ``t`` -> ``t[k]``."""
    if isinstance(tree, Tensor):
        return tree[k]
    if isinstance(tree, Mapping):
        return {key: select_output(value, k) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return _rebuild(tree, [select_output(value, k) for value in tree])
    return tree


def _rebuild(like: list | tuple, items: list[Any]) -> list | tuple:
    """A list, tuple or namedtuple of the type of ``like`` holding ``items``."""
    if hasattr(like, "_fields"):  # namedtuple: positional constructor
        return type(like)(*items)
    return type(like)(items)


def _stack_trees(trees: Sequence[Any]) -> Any:
    """K outputs of the same structure -> one output whose tensors gain a leading K dim."""
    first = trees[0]
    if isinstance(first, Tensor):
        return torch.stack(list(trees))
    if isinstance(first, Mapping):
        return {key: _stack_trees([t[key] for t in trees]) for key in first}
    if isinstance(first, (list, tuple)):
        return _rebuild(first, [_stack_trees(parts) for parts in zip(*trees, strict=True)])
    return first


class ParetoSet(nn.Module):
    """K models of one architecture, stacked, run as one batched computation.

    Every parameter and buffer of the template becomes one tensor [K, ...] (model k's
    copy at index k), stored under the template's own names in :attr:`stacked` (a copy of
    the template that only holds the stacked tensors: never call it directly). ``forward``
    is ``torch.vmap`` over ``torch.func.functional_call``, so each layer of the K models is
    one batched kernel rather than K Python calls, and an optimizer over
    :meth:`parameters` sees K models' weights as ordinary leaf tensors [K, ...].

    BatchNorm: in training mode, ``F.batch_norm`` updates ``running_mean`` / ``running_var``
    in place. torch.func's documented workaround (``replace_all_batch_norm_modules_``)
    drops the running statistics altogether, which would make eval mode meaningless. Here
    the buffers are stacked like the parameters and passed through vmap with the
    parameters (in_dims 0), so each model's in-place update lands in its own row of the
    stacked buffer and every model keeps its own running statistics, exactly as if it ran
    alone (tested). BatchNorm with ``momentum=None`` (cumulative average) reads the batch
    counter as a Python number, which vmap cannot, and is refused.

    Execution: ``"vmap"`` (default) is the batched computation above and the one to use on
    a GPU, where one kernel per layer replaces K launches. On a CPU, vmap's batching rules
    add layout copies (grouped convolutions on channel-blocked tensors, pooling and the
    BatchNorm affine as separate passes): ``benchmarks/transfer_pareto.py`` measured one
    training step of K = 20 LeNet-style nets with BatchNorm (batch 64, one thread) about
    10% *slower* under vmap than a Python loop over 20 separate models, and ``"loop"``
    about 10% faster than the separate models. ``"loop"`` keeps the same stacked storage
    (same parameters, optimizer, transfer and :meth:`model`) but calls the template once
    per model on row k of every stacked tensor (``unbind`` views, so gradients and
    BatchNorm's in-place updates land in the stacked tensors); the two modes compute the
    same numbers (tested).

    Randomness (dropout) draws different numbers for each model (``randomness="different"``)
    unless told otherwise; seed torch before the forward for reproducible masks.

    Args:
        template: any ``nn.Module`` returning a tensor or a (nested) dict/list/tuple of
            tensors, e.g. a dict task -> output. Its training mode is copied; it is not
            modified and not kept as a submodule.
        num_models: K >= 1.
        init: ``"same"`` (default): every model starts from the template's weights, so the
            K models differ only through their objectives (a controlled comparison, and
            what a transfer between similar subproblems presumes). ``"seeded"``: model k is
            re-initialised by every submodule's ``reset_parameters()`` under
            ``torch.manual_seed(seed + k)``, like K separately constructed networks.
        seed: base seed of ``init="seeded"``.
        randomness: vmap's randomness mode, ``"different"`` or ``"same"``.
        execution: ``"vmap"`` or ``"loop"`` (see above); may be changed later through
            the attribute of the same name.

    Raises:
        UserError: K < 1, an unknown ``init`` or ``execution``, a template without
            parameters, with lazy (uninitialised) parameters, with BatchNorm
            ``momentum=None``, or (seeded) with a parameter-owning module lacking
            ``reset_parameters``.
    """

    def __init__(
        self,
        template: nn.Module,
        num_models: int,
        *,
        init: str = "same",
        seed: int = 0,
        randomness: str = "different",
        execution: str = "vmap",
    ) -> None:
        super().__init__()
        _check_template(template)
        if not isinstance(num_models, int) or num_models < 1:
            raise UserError(f"ParetoSet: num_models must be an integer >= 1, got {num_models!r}")
        if init not in INITS:
            raise UserError(f"ParetoSet: unknown init {init!r}; choose one of: {', '.join(INITS)}")
        if randomness not in ("different", "same"):
            raise UserError(
                f"ParetoSet: randomness must be 'different' or 'same', got {randomness!r}"
            )
        if execution not in EXECUTIONS:
            raise UserError(
                f"ParetoSet: unknown execution {execution!r}; choose one of: "
                f"{', '.join(EXECUTIONS)}"
            )
        copies = [copy.deepcopy(template) for _ in range(num_models)]
        if init == "seeded":
            for k, model in enumerate(copies):
                _reinitialise(model, seed + k)
        params, buffers = stack_module_state(copies)  # name -> [K, ...]
        self.num_models = num_models
        self.init = init
        self.randomness = randomness
        self.execution = execution
        self.stacked = copy.deepcopy(template)
        for name, value in params.items():
            _set_tensor(
                self.stacked, name, nn.Parameter(value, value.requires_grad), parameter=True
            )
        for name, value in buffers.items():
            _set_tensor(self.stacked, name, value, parameter=False)
        # A private copy (in a tuple, so nn.Module does not register it) that model(k)
        # clones; it holds the architecture, never the trained weights.
        self._blueprint = (copy.deepcopy(template),)
        self.train(template.training)

    def extra_repr(self) -> str:
        return f"num_models={self.num_models}, init={self.init!r}, execution={self.execution!r}"

    def stacked_tensors(self, *, buffers: bool = True) -> list[tuple[str, Tensor]]:
        """(name, tensor [K, ...]) for every parameter and (optionally) buffer, tied once."""
        out = list(self.stacked.named_parameters())
        if buffers:
            out += list(self.stacked.named_buffers())
        return out

    def forward(self, *inputs: Any, per_model: bool = False) -> Any:
        """All K models on the same input (or each on its own input).

        Args:
            *inputs: the template's positional inputs, e.g. an image batch [B, C, H, W].
            per_model: False (default): every model reads the same ``inputs`` (vmap in_dims
                None, no copies). True: every input tensor has a leading K dimension and
                model k reads slice k.

        Returns:
            The template's output with a leading K dimension on every tensor: [K, B, ...]
            for a tensor, {task: [K, B, ...]} for a dict.
        """
        params = dict(self.stacked.named_parameters())  # name -> [K, ...]
        buffers = dict(self.stacked.named_buffers())  # name -> [K, ...]

        def run(p: dict[str, Tensor], b: dict[str, Tensor], args: tuple[Any, ...]) -> Any:
            return functional_call(self.stacked, (p, b), args)

        if self.execution == "loop":
            rows_p = {name: t.unbind(0) for name, t in params.items()}  # [K, ...] -> K x [...]
            rows_b = {name: t.unbind(0) for name, t in buffers.items()}
            outputs = [
                run(
                    {name: rows[k] for name, rows in rows_p.items()},
                    {name: rows[k] for name, rows in rows_b.items()},
                    select_output(inputs, k) if per_model else inputs,
                )
                for k in range(self.num_models)
            ]
            return _stack_trees(outputs)
        if self.execution != "vmap":
            raise UserError(
                f"ParetoSet: unknown execution {self.execution!r}; choose one of: "
                f"{', '.join(EXECUTIONS)}"
            )
        batched = torch.vmap(
            run, in_dims=(0, 0, 0 if per_model else None), randomness=self.randomness
        )
        return batched(params, buffers, inputs)

    def model(self, k: int) -> nn.Module:
        """An independent copy of model k as a plain template-shaped module.

        For evaluation, export or checkpointing of one member of the set: its parameters
        and buffers are clones of row k of the stacked tensors (same device and dtype), so
        training the copy does not touch the set. Its training mode follows the set's.

        Raises:
            UserError: k outside [0, K).
        """
        if not isinstance(k, int) or not 0 <= k < self.num_models:
            raise UserError(f"ParetoSet.model: k must be in [0, {self.num_models}), got {k!r}")
        module = copy.deepcopy(self._blueprint[0])
        made: dict[int, Tensor] = {}  # id(stacked tensor) -> its slice, so ties stay tied
        for name, value in self.stacked.named_parameters(remove_duplicate=False):
            if id(value) not in made:
                made[id(value)] = nn.Parameter(value.detach()[k].clone(), value.requires_grad)
            _set_tensor(module, name, made[id(value)], parameter=True)
        for name, value in self.stacked.named_buffers(remove_duplicate=False):
            if id(value) not in made:
                made[id(value)] = value[k].clone()
            _set_tensor(module, name, made[id(value)], parameter=False)
        return module.train(self.training)
