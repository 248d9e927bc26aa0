"""Mixed precision and channels-last in the training stages: bf16 losses track fp32's on a
few real steps of stages 0-2, fp16 without CUDA is one clear error, channels-last is a
layout only, and (on a GPU) fp16's loss scaling skips bad steps and is checkpointed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny import TINY

import dymu.train.stage0 as stage0
from dymu.config import load_config
from dymu.data import get_builder
from dymu.errors import UserError
from dymu.models.anchor import StackedAnchor, build_anchor
from dymu.space.anchor_space import anchor_space
from dymu.train.checkpoint import load_checkpoint, save_checkpoint
from dymu.train.precision import SCALER_KEY, Precision
from dymu.train.stage1 import train_stage1
from dymu.train.stage2 import train_stage2

# bfloat16 keeps 8 significant bits: each rounding errs by at most 2^-9 ~ 2e-3 relative.
# A loss is a mean over thousands of pixels, whose independent rounding errors mostly
# cancel; over a few steps Adam's early, sign-like updates can amplify them. 1e-2 (about
# five ulps of bf16) is loose enough for that and still fails on a wrong cast, a missing
# fp32 loss or a broken scaler, which move the loss by O(1).
BF16_RTOL = 1e-2


def _scales(anchor, val):
    """[N] w_i as dymu search computes them (dymu.train.scales)."""
    from dymu.train.scales import loss_scales

    return loss_scales(anchor, val, torch.device("cpu"))


def _cfg(tmp_path, *extra):
    return load_config(None, [*TINY, f"data.cache_dir={tmp_path / 'cache'}", *extra])


@pytest.fixture
def step_losses(monkeypatch):
    """Every loss the stages pass to ``Precision.backward``, in order."""
    seen: list[float] = []
    original = Precision.backward

    def spy(self, loss):
        seen.append(loss.item())
        original(self, loss)

    monkeypatch.setattr(Precision, "backward", spy)
    return seen


def _rel(a: list[float], b: list[float]) -> torch.Tensor:
    a_t, b_t = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return (a_t - b_t).abs() / a_t.abs()


def test_bf16_losses_of_stages_0_to_2_track_fp32(tmp_path, step_losses):
    runs = {}
    for kind in ("fp32", "bf16"):
        cfg = _cfg(tmp_path, "stage0.epochs=2", f"run.precision={kind}")
        step_losses.clear()
        anchor, record = stage0.train_stage0(cfg, tmp_path / kind)
        s0 = list(step_losses)
        space = anchor_space(anchor, (32, 32))
        builder = get_builder("synthscenes")
        train, val = builder.load(cfg.data, "train"), builder.load(cfg.data, "val")
        w = _scales(anchor, val)  # [N] loss scales
        step_losses.clear()
        edge, rec1 = train_stage1(cfg, tmp_path / kind, anchor, space, torch.eye(3), train, w)
        s1 = list(step_losses)
        step_losses.clear()
        _, rec2 = train_stage2(cfg, tmp_path / kind, anchor, space, edge, train, w)
        runs[kind] = (s0, s1, list(step_losses), record, rec1, rec2)

    fp32, bf16 = runs["fp32"], runs["bf16"]
    for stage, steps in enumerate((6, 6, 4)):  # 2 epochs of 3 batches; stage1/2.steps
        assert len(fp32[stage]) == len(bf16[stage]) == steps
        rel = _rel(fp32[stage], bf16[stage])
        assert rel.max() < BF16_RTOL, (stage, rel)
        assert rel.max() > 0, stage  # autocast really ran: bf16 rounding moved the losses
    for kind, (*_, rec0, rec1, rec2) in runs.items():
        for rec in (rec0, rec1, rec2):
            assert rec["precision"] == {"dtype": kind, "channels_last": False}
    # bf16 artifacts are other artifacts than fp32 ones, at every stage: the precision is in
    # each stage's spec.
    for k, stage in ((3, "stage0"), (4, "stage1"), (5, "stage2")):
        assert bf16[k]["config_hash"] != fp32[k]["config_hash"], stage
        assert bf16[k]["spec"]["precision"] == "bf16" and fp32[k]["spec"]["precision"] == "fp32"
    saved = json.loads((tmp_path / "bf16" / stage0.ANCHOR_JSON).read_text())
    assert saved["precision"]["dtype"] == "bf16"


def test_fp16_without_cuda_is_one_clear_error():
    with pytest.raises(UserError, match="fp16 needs CUDA") as info:
        load_config(None, ["run.device=cpu", "run.precision=fp16"])
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="fp16 needs a CUDA device") as info:
        Precision(kind="fp16", device=torch.device("cpu"))
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="must be"):
        load_config(None, ["run.precision=fp8"])


def test_fp32_and_bf16_add_nothing_to_checkpoints():
    for kind in ("fp32", "bf16"):
        prec = Precision(kind=kind, device=torch.device("cpu"))
        assert prec.state_dict() == {}
        prec.load_state_dict({})  # nothing to restore, nothing required


def test_channels_last_is_a_layout_only(tmp_path):
    """One training step (BN in train mode, dropouts off: their masks are drawn in memory
    order, so they differ by layout) gives the same losses and gradients in NHWC.

    The gradients are compared on the semseg and depth losses: the normals loss divides by
    the predicted normal's length (``F.normalize``), which is tiny at some pixels of a fresh
    head, so its gradient amplifies any rounding difference (to ~1e-2 here) by design.
    """
    cfg = _cfg(tmp_path)
    builder = get_builder("synthscenes")
    builder.prepare(cfg.data)
    specs = list(builder.info_for(cfg.data).select(cfg.data.tasks))
    batch = next(iter(torch.utils.data.DataLoader(builder.load(cfg.data, "train"), 8)))
    results = []
    for channels_last in (False, True):
        stacked = StackedAnchor(build_anchor(cfg.model, specs, seed=0)).train()
        for m in stacked.modules():
            if isinstance(m, torch.nn.Dropout):
                m.eval()
        prec = Precision(kind="fp32", device=torch.device("cpu"), channels_last=channels_last)
        prec.prepare(stacked)
        conv = next(p for p in stacked.parameters() if p.dim() == 4)
        assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
        with prec.autocast():
            out = stacked(prec.to_input(batch["image"]))
        out = prec.fp32(out)
        losses = {t.name: t.loss(out[t.name], batch[t.name]) for t in stacked.tasks}
        prec.backward(losses["semseg"] + losses["depth"])
        grads = {n: p.grad for n, p in stacked.named_parameters() if p.grad is not None}
        results.append(({k: v.item() for k, v in losses.items()}, grads))
        prec.release(stacked)
        assert conv.is_contiguous()
    (loss_a, grad_a), (loss_b, grad_b) = results
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert grad_a.keys() == grad_b.keys() and len(grad_a) > 0
    for name, g in grad_a.items():
        assert (g - grad_b[name]).norm() <= 1e-4 * g.norm() + 1e-8, name


def test_a_channels_last_stage0_run_saves_a_standard_anchor(tmp_path):
    cfg = _cfg(tmp_path, "run.channels_last=true")
    anchor, record = stage0.train_stage0(cfg, tmp_path / "run")
    assert record["precision"] == {"dtype": "fp32", "channels_last": True}
    assert record["config_hash"] == stage0.stage0_hash(_cfg(tmp_path))  # a layout only
    assert all(p.is_contiguous() for p in anchor.parameters())
    state = load_file(str(tmp_path / "run" / stage0.ANCHOR_WEIGHTS))
    assert all(torch.isfinite(v).all() for v in state.values())


@pytest.mark.gpu
def test_fp16_scaler_skips_overflowing_steps_and_is_checkpointed(tmp_path):
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 4, 3).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    prec = Precision(kind="fp16", device=device)
    x = torch.randn(2, 3, 8, 8, device=device)
    with prec.autocast():
        out = model(x)
    assert out.dtype == torch.float16
    start = prec.scaler.get_scale()
    before = model.weight.detach().clone()
    prec.backward(prec.fp32({"y": out})["y"].sum() * float("inf"))  # overflowing gradients
    prec.step(opt)
    assert torch.equal(model.weight, before)  # the step was skipped
    assert prec.scaler.get_scale() == start / 2  # and the scale halved

    save_checkpoint(tmp_path / "c.pt", "h", 1, model, opt, sched, **prec.state_dict())
    again = Precision(kind="fp16", device=device)
    again.load_state_dict(load_checkpoint(tmp_path / "c.pt", "h", "test", model, opt, sched))
    assert again.scaler.get_scale() == start / 2
    with pytest.raises(UserError, match="GradScaler"):
        again.load_state_dict({"step": 1})
    assert SCALER_KEY in torch.load(tmp_path / "c.pt", weights_only=True)


@pytest.mark.gpu
def test_fp16_stage0_losses_track_fp32(tmp_path, step_losses):
    runs = {}
    for kind in ("fp32", "fp16"):
        step_losses.clear()
        cfg = _cfg(tmp_path, "run.device=cuda", "stage0.epochs=2", f"run.precision={kind}")
        stage0.train_stage0(cfg, tmp_path / kind)
        runs[kind] = list(step_losses)
    # float16 has 11 significant bits, three more than bfloat16: the bf16 bound holds.
    assert _rel(runs["fp32"], runs["fp16"]).max() < BF16_RTOL
