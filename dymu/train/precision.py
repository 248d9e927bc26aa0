"""Mixed precision and channels-last memory layout for the training stages.

One :class:`Precision` per stage, built from ``run.precision`` and ``run.channels_last``,
owns every line of a training step that depends on them:

- ``fp32`` (the default) changes nothing: :meth:`Precision.autocast` is a null context,
  :meth:`Precision.backward` is ``loss.backward()`` and :meth:`Precision.step` is
  ``optimizer.step()``, so a default run performs exactly the operations it did before
  mixed precision existed.
- ``bf16`` runs the image network under ``torch.autocast`` with bfloat16 (CPU or CUDA).
  bfloat16 keeps float32's exponent range, so gradients neither underflow nor overflow and
  no loss scaling is needed.
- ``fp16`` runs it under autocast with float16 (CUDA only) and scales the loss with a
  ``GradScaler``: float16's 5-bit exponent flushes gradients below ~6e-8 to zero, so the
  loss is multiplied by a scale S before ``backward`` and the gradients divided by S before
  the step; steps whose gradients hold an inf or NaN are skipped and S is halved
  (Micikevicius et al. 2018, "Mixed Precision Training", section 3.2).

Only the network's forward runs under autocast. Its outputs are cast back to float32
(:meth:`Precision.fp32`) before the task losses, so losses, loss weights, regularisers and
hypernets always compute in float32, whatever autocast's per-op policy on the device is.

Channels-last (NHWC) is a layout only: convolution weights and input images are stored
with the channel axis innermost, which lets cuDNN pick its tensor-core kernels. Results
equal the NCHW ones up to float rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor, nn

from dymu.config import RunConfig
from dymu.errors import UserError

Kind = Literal["fp32", "bf16", "fp16"]
M = TypeVar("M", bound=nn.Module)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SCALER_KEY = "grad_scaler"
"""Checkpoint entry of the fp16 GradScaler's state (absent for fp32 and bf16)."""


class Precision:
    """The autocast dtype, loss scaling and memory layout of one stage's training steps.

    Use it as::

        prec = Precision.from_config(cfg.run, device)
        model = prec.prepare(model)                # before building the optimizer
        with prec.autocast():
            out = model(prec.to_input(image))
        loss = loss_fn(prec.fp32(out), target)     # float32 losses
        opt.zero_grad(set_to_none=True)
        prec.backward(loss)
        prec.step(opt)
    """

    def __init__(self, *, kind: Kind, device: torch.device, channels_last: bool = False) -> None:
        """
        Args:
            kind: ``fp32``, ``bf16`` or ``fp16``.
            device: the device the stage trains on (autocast's device type comes from it).
            channels_last: store 4-D weights and input images as NHWC.

        Raises:
            UserError: fp16 without CUDA, or bf16 on a GPU without bfloat16 support.
        """
        device = torch.device(device)
        if kind not in ("fp32", "bf16", "fp16"):
            raise UserError(f"run.precision must be fp32, bf16 or fp16, got {kind!r}")
        if kind == "fp16" and device.type != "cuda":
            raise UserError(
                f"run.precision=fp16 needs a CUDA device (this run uses {device.type}); "
                "use bf16 or fp32"
            )
        if kind == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("run.precision=bf16: this GPU has no bfloat16 support; use fp16")
        self.kind: Kind = kind
        self.device = device
        self.channels_last = channels_last
        # Loss scaling only for float16: bfloat16 has float32's exponent range.
        self.scaler = torch.amp.GradScaler("cuda") if kind == "fp16" else None

    @classmethod
    def from_config(cls, run: RunConfig, device: torch.device) -> Precision:
        """The precision that ``run.precision`` and ``run.channels_last`` ask for."""
        return cls(kind=run.precision, device=device, channels_last=run.channels_last)

    @property
    def mixed(self) -> bool:
        """True when the forward runs under autocast (bf16 or fp16)."""
        return self.kind != "fp32"

    def describe(self) -> dict[str, Any]:
        """What a stage's record notes: ``{"dtype": ..., "channels_last": ...}``."""
        return {"dtype": self.kind, "channels_last": self.channels_last}

    # ----------------------------------------------------------------- forward

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context the network's forward runs in (a null context for fp32)."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.kind])

    def to_input(self, x: Tensor) -> Tensor:
        """An input image batch ``[B, C, H, W]`` in the layout of the prepared modules."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def fp32(self, outputs: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        """The network's outputs as float32, for the losses (returned unchanged for fp32)."""
        if not self.mixed:
            return outputs
        return {k: v.float() for k, v in outputs.items()}

    # ----------------------------------------------------------------- layout

    def prepare(self, module: M) -> M:
        """Put ``module``'s 4-D parameters and buffers in channels-last layout, in place
        (nothing for the default layout). Call it before building the optimizer."""
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        return module

    def release(self, module: M) -> M:
        """Give ``module`` back the standard (NCHW) layout after training, in place, so
        that what a stage returns or saves is laid out as in a default run."""
        if self.channels_last:
            module.to(memory_format=torch.contiguous_format)
        return module

    # ----------------------------------------------------------------- backward and step

    def backward(self, loss: Tensor) -> None:
        """``loss.backward()``; for fp16, of the loss times the scaler's current scale."""
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()``; for fp16, on unscaled gradients, skipped when they hold an
        inf or NaN, and followed by the scaler's update of its scale."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    # ----------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint extras: the GradScaler's state for fp16 (its scale and growth
        tracker, so a resumed run scales as an uninterrupted one), nothing otherwise."""
        if self.scaler is None:
            return {}
        return {SCALER_KEY: self.scaler.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from a checkpoint record holding what :meth:`state_dict` gave.

        Raises:
            UserError: an fp16 run resumes from a checkpoint without scaler state.
        """
        if self.scaler is None:
            return
        if SCALER_KEY not in state:
            raise UserError("checkpoint holds no fp16 GradScaler state; delete it or drop --resume")
        self.scaler.load_state_dict(state[SCALER_KEY])
