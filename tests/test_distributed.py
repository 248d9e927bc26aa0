"""Data-parallel training: 2 CPU processes (gloo) under torchrun take the single-process
step on the same global batch; the pieces that make it so, one by one."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from procs import run_session
from tiny import TINY as _TINY
from tiny import stop_after_first_checkpoint

import dymu.train.stage0 as stage0
from dymu import dist
from dymu.config import load_config
from dymu.data import get_builder
from dymu.data.batches import iterate, random_hflip
from dymu.errors import UserError
from dymu.models.global_batch import GlobalBatchDropout, GlobalBatchNorm
from dymu.run import resolve_device
from dymu.tasks import build_task
from dymu.train import parallel

# SGD for stage 0 and the joint stage: Adam divides each update by the root of the squared
# gradients, so a weight whose gradient is float noise (a dilated ASPP tap that only ever
# sees padding) moves by a noise-sized fraction of the learning rate; SGD passes noise
# through at its own size.
TINY = [*_TINY, "stage0.epochs=2", "stage0.optimizer=sgd", "joint.optimizer=sgd"]

# What every worker starts with: its output folder and config from the command line, and
# every file write of a rank other than 0 made an error (dymu writes through atomic_path).
PREAMBLE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import torch

    import dymu.io, dymu.models.anchor, dymu.train.checkpoint
    from dymu.config import load_config
    from dymu import dist

    torch.set_num_threads(1)
    out, cfg = Path(sys.argv[1]), load_config(None, sys.argv[2:])
    rank = dist.rank()
    if rank != 0:
        def refuse(path):
            raise AssertionError(f"rank {rank} wrote {path}")
        for module in (dymu.io, dymu.models.anchor, dymu.train.checkpoint):
            module.atomic_path = refuse
    """
)

# Each rank runs a fresh stage 0 (joining the process group lazily, as the CLI does), then a
# resumed one in the same group.
WORKER = PREAMBLE + textwrap.dedent(
    """
    import dymu.train.stage0 as stage0
    from dymu.run import start_run

    start_run(cfg, out / "fresh")
    anchor, _ = stage0.train_stage0(cfg, out / "fresh")
    torch.save(anchor.state_dict(), out / f"fresh-rank{rank}.pt")
    sums = dist.all_reduce_sums({"rank": rank + 1, "one": 1})
    (out / f"sums-rank{rank}.json").write_text(json.dumps(sums))
    anchor, _ = stage0.train_stage0(cfg, out / "resumed", resume=True)
    torch.save(anchor.state_dict(), out / f"resumed-rank{rank}.pt")
    dist.teardown()
    """
)


def _torchrun(tmp_path, worker: str, overrides: list[str]) -> str:
    """Run ``worker`` on 2 CPU processes under torchrun (output folder tmp_path/out, then
    the config overrides as its arguments); its stdout, after checking it succeeded."""
    (tmp_path / "worker.py").write_text(worker)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    args = [str(tmp_path / "worker.py"), str(tmp_path / "out"), *overrides]
    # Output to files, not pipes, and a session of its own, killed with torchrun's workers
    # when this returns or raises, after a hang's timeout included.
    code, stdout, stderr = run_session([*cmd, *args], tmp_path, "torchrun", timeout=420)
    assert code == 0, stderr[-3000:]
    return stdout


def _cfg(tmp_path, *extra):
    return load_config(None, [*TINY, f"data.cache_dir={tmp_path / 'cache'}", *extra])


def _assert_same_weights(got, want, atol):
    assert got.keys() == want.keys()
    for k in want:
        if want[k].is_floating_point():
            torch.testing.assert_close(got[k], want[k], atol=atol, rtol=0, msg=k)
        else:  # num_batches_tracked
            assert torch.equal(got[k], want[k]), k


def test_two_processes_take_the_single_process_steps(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    single, _ = stage0.train_stage0(cfg, tmp_path / "single")
    # An interrupted single-process run: its epoch-1 checkpoint is what 2 ranks resume.
    stop_after_first_checkpoint(
        monkeypatch, stage0, lambda: stage0.train_stage0(cfg, tmp_path / "out" / "resumed")
    )

    stdout = _torchrun(tmp_path, WORKER, [*TINY, f"data.cache_dir={tmp_path / 'cache'}"])
    out = tmp_path / "out"
    want = single.state_dict()
    for phase in ("fresh", "resumed"):
        ranks = [torch.load(out / f"{phase}-rank{r}.pt", weights_only=True) for r in (0, 1)]
        _assert_same_weights(ranks[1], ranks[0], atol=0)  # every rank returns rank 0's files
        # Only float reassociation differs: the all-reduce adds two half-batch gradients,
        # global batch norm sums two shards' statistics. Measured at most 4e-7 after 6
        # steps; sharding mistakes (per-rank batch norm, per-rank flips or dropout) move
        # weights and running statistics by 6e-3 to 0.2.
        _assert_same_weights(ranks[0], want, atol=1e-5)
    record = json.loads((out / "fresh" / "anchor.json").read_text())
    assert record["train"]["processes"] == 2
    assert json.loads((out / "fresh" / "env.json").read_text())["processes"] == 2
    assert (out / "fresh" / "config.yaml").is_file()
    for r in (0, 1):
        assert json.loads((out / f"sums-rank{r}.json").read_text()) == {"rank": 3.0, "one": 2.0}
    assert "stage 0: resuming after epoch 1/2" in stdout


# The whole search on each rank: fresh, then resumed from a single-process stage-1
# checkpoint; rank 1 may write no file.
SEARCH_WORKER = PREAMBLE + textwrap.dedent(
    """
    import time

    import dymu.search
    from dymu.search import run_search

    # Rank 1 reaches the affinity check only after rank 0 has written affinity.json, as a
    # slow rank may: every rank must still take rank 0's branch (it hung here once).
    affinity_hash, late = dymu.search.affinity_hash, [rank == 1]
    def slow_affinity_hash(cfg):
        if late and late.pop():
            time.sleep(5)
        return affinity_hash(cfg)
    dymu.search.affinity_hash = slow_affinity_hash

    for phase in ("fresh", "resumed", "stage2"):
        report = run_search(cfg, out / phase, resume=phase == "resumed")
        (out / f"{phase}-report-rank{rank}.json").write_text(json.dumps(report))
    dist.teardown()
    """
)

# Stage 1 with 3 draws on a global batch of 6: each rank holds 3 images, so one draw's
# group is split between the ranks.
SEARCH = [*TINY, "stage1.batch_size=6", "stage1.draws=3"]


def _weights(run, *names: str) -> dict[str, torch.Tensor]:
    """The tensors of the named safetensors files of a run, keys prefixed by the file."""
    from safetensors.torch import load_file

    return {f"{n}.{k}": v for n in names for k, v in load_file(str(run / n)).items()}


# Trained without a discrete choice: the joint stage's trees come from a seeded generator,
# stage 1 mixes parents softly. Stage 2 trains on argmax trees of the edge hypernet, which
# float noise of the two-process stage 1 can flip on some CPU, so it is compared only
# where both ran on the same edge hypernet file (the "stage2" phase).
CONTINUOUS = ("joint.safetensors", "edge_hnet.safetensors")


@pytest.fixture(scope="module")
def single_search(tmp_path_factory):
    """A finished single-process search (SEARCH config) and its overrides."""
    from dymu.search import run_search

    tmp = tmp_path_factory.mktemp("single")
    overrides = [*SEARCH, f"data.cache_dir={tmp / 'cache'}"]
    report = run_search(load_config(None, overrides), tmp / "run")
    return tmp / "run", overrides, report


def test_two_processes_run_the_single_process_search(tmp_path, monkeypatch, single_search):
    import dymu.train.engine as engine
    import dymu.train.stage1 as stage1
    from dymu.search import run_search

    run, overrides, single = single_search
    # A checkpoint after stage-1 step 2 ...
    cfg = load_config(None, [*overrides, "run.checkpoint_every=2"])
    stop_after_first_checkpoint(  # ... where a single process is stopped; 2 ranks resume
        monkeypatch,
        engine,
        lambda: run_search(cfg, tmp_path / "out" / "resumed"),
        stage="stage1",
    )
    assert (tmp_path / "out" / "resumed" / stage1.CHECKPOINT).is_file()
    # The single-process run without its stage 2: the 2 ranks train it on the same edge
    # hypernet file, so on the same derived trees.
    shutil.copytree(run, tmp_path / "out" / "stage2")
    for name in ("weight_hnet.safetensors", "weight_hnet.json", "report.json"):
        (tmp_path / "out" / "stage2" / name).unlink()
    stdout = _torchrun(tmp_path, SEARCH_WORKER, overrides)

    out = tmp_path / "out"
    # Float reassociation only (two half-batch gradients summed): measured at most 1.7e-7
    # after 6 + 4 steps; a group's loss weighted by the wrong share (all of it on each rank)
    # moves the edge hypernet by 1.3e-4.
    for phase in ("fresh", "resumed"):
        _assert_same_weights(_weights(out / phase, *CONTINUOUS), _weights(run, *CONTINUOUS), 1e-5)
        for name in ("joint.json", "edge_hnet.json", "weight_hnet.json"):
            if phase == "fresh" or name != "joint.json":  # resumed: joint came from 1 process
                assert json.loads((out / phase / name).read_text())["processes"] == 2
    name = "weight_hnet.safetensors"
    _assert_same_weights(_weights(out / "stage2", name), _weights(run, name), atol=1e-4)
    for phase in ("fresh", "resumed", "stage2"):
        reports = [json.loads((out / f"{phase}-report-rank{r}.json").read_text()) for r in (0, 1)]
        assert reports[0] == reports[1]  # rank 1 returns what rank 0 wrote
    # Evaluated on the same trees, the hypervolumes agree (the baseline is stage 0's).
    hv = {k: v for k, v in single["hypervolume"].items() if isinstance(v, float)}
    got = json.loads((out / "stage2-report-rank0.json").read_text())["hypervolume"]
    assert hv and {k: got[k] for k in hv} == pytest.approx(hv, rel=1e-3)
    assert (out / "fresh" / "affinity.json").is_file() and (out / "fresh" / "space.json").is_file()
    assert "stage 1: resuming after step 2/6" in stdout


# Every baseline on each rank, in a copy of a finished single-process search run.
BASELINES_WORKER = PREAMBLE + textwrap.dedent(
    """
    from dymu.baselines.run import run_baselines

    report = run_baselines(cfg, out / "run")
    (out / f"report-rank{rank}.json").write_text(json.dumps(report))
    dist.teardown()
    """
)

BASELINES = [
    "baselines.methods=[static,phn_bn,weighting]",
    "baselines.weightings=[equal,dwa,mgda_ub,pcgrad,tensioner]",
    "baselines.epochs=2",
    "baselines.batch_size=8",
    "baselines.towers.gamma=0.5",
]


def test_two_processes_train_the_single_process_baselines(tmp_path, single_search):
    from dymu.baselines.run import run_baselines

    search, overrides, _ = single_search
    shutil.copytree(search, tmp_path / "single")
    shutil.copytree(search, tmp_path / "out" / "run")
    want = run_baselines(load_config(None, [*overrides, *BASELINES]), tmp_path / "single")
    _torchrun(tmp_path, BASELINES_WORKER, [*overrides, *BASELINES])

    out = tmp_path / "out"
    reports = [json.loads((out / f"report-rank{r}.json").read_text()) for r in (0, 1)]
    assert reports[0] == reports[1]  # rank 1 returns what rank 0 wrote
    for method in ("static", "phn_bn", "weighting"):
        single = json.loads((tmp_path / "single" / "baselines" / f"{method}.json").read_text())
        two = json.loads((out / "run" / "baselines" / f"{method}.json").read_text())
        assert [p["label"] for p in two["points"]] == [p["label"] for p in single["points"]]
        # Test losses of every trained model. Float reassociation only, but Adam turns the
        # float noise of a gradient that is ~0 (a weight that only ever sees padding) into
        # lr-sized steps: measured up to 1.7e-3 relative (PHN-BN), 4e-5 for the rest; batch
        # norms per rank instead of global move PHN-BN's losses by 35%.
        for got, ref in zip(two["points"], single["points"], strict=True):
            np.testing.assert_allclose(
                got["losses"], ref["losses"], rtol=5e-3, err_msg=f"{method} {got['label']}"
            )
    single = json.loads((tmp_path / "single" / "baselines" / "weighting.json").read_text())
    two = json.loads((out / "run" / "baselines" / "weighting.json").read_text())
    # The coefficients of every step: measured 1.8e-4 on one CPU and 2.3e-3 on another
    # (the min-norm solve magnifies the gradients' reassociation noise).
    for name in ("mgda_ub", "tensioner"):
        np.testing.assert_allclose(
            two["log"][name]["weights"], single["log"][name]["weights"], atol=1e-2
        )
    # PCGrad's coefficients are ill-conditioned where gradients nearly cancel (its combined
    # gradient is not): after the first step, 1e-7 differences grow to 3e-2 in them.
    np.testing.assert_allclose(
        two["log"]["pcgrad"]["weights"][0], single["log"]["pcgrad"]["weights"][0], atol=1e-5
    )
    assert reports[0]["methods"].keys() == want["methods"].keys()


def test_shards_tile_a_batch_in_rank_order():
    x = torch.arange(12)
    parts = [dist.Shard(r, 3).take(x) for r in range(3)]
    assert [p.tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert dist.WHOLE.part(5) == slice(0, 5)
    with pytest.raises(UserError, match="a batch of 10 does not split evenly over 3"):
        dist.Shard(1, 3).part(10)


class _Listed(torch.utils.data.Dataset):
    """Not an ArrayDataset, so :func:`iterate` goes through a DataLoader."""

    def __init__(self, ds) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int):
        return self.ds[index]


@pytest.mark.parametrize("loader", [False, True])
def test_iterate_gives_each_rank_its_part_of_the_same_global_batches(tmp_path, loader):
    cfg = load_config(None, [*_TINY, f"data.cache_dir={tmp_path}"])
    ds = get_builder("synthscenes").load(cfg.data, "train")  # 24 images: 4 batches of 6
    ds = _Listed(ds) if loader else ds
    kwargs = {"shuffle": True, "seed": 7, "drop_last": True}
    whole = [b["image"] for b in iterate(ds, 6, **kwargs)]
    per_rank = [
        [b["image"] for b in iterate(ds, 6, **kwargs, shard=dist.Shard(r, 3))] for r in range(3)
    ]
    assert len(whole) == 4 and all(len(p) == 4 for p in per_rank)
    for i, batch in enumerate(whole):
        torch.testing.assert_close(torch.cat([p[i] for p in per_rank]), batch, rtol=0, atol=0)


def test_flips_are_tossed_for_the_global_batch(tmp_path):
    cfg = load_config(None, [*_TINY, f"data.cache_dir={tmp_path}"])
    builder = get_builder("synthscenes")
    ds = builder.load(cfg.data, "val")
    tasks = [build_task(s) for s in builder.info_for(cfg.data).select(cfg.data.tasks)]
    batch = ds.batch(list(range(8)))
    want = random_hflip(batch, tasks, torch.Generator().manual_seed(3))
    assert not torch.equal(want["image"], batch["image"])  # the seed does flip something
    parts = []
    for r in range(2):
        part = dist.Shard(r, 2)
        local = {k: part.take(v) for k, v in batch.items()}
        parts.append(random_hflip(local, tasks, torch.Generator().manual_seed(3), part))
    for key in batch:
        torch.testing.assert_close(torch.cat([p[key] for p in parts]), want[key], rtol=0, atol=0)


def test_global_batch_dropout_is_the_whole_batch_dropout_sharded():
    x = torch.randn(6, 5, 3, 3)
    torch.manual_seed(11)
    want = F.dropout(x, 0.3, training=True)
    parts = []
    for r in range(3):
        torch.manual_seed(11)  # every rank's generator is seeded alike
        part = dist.Shard(r, 3)
        parts.append(GlobalBatchDropout(0.3, part).train()(part.take(x)))
    torch.testing.assert_close(torch.cat(parts), want, rtol=0, atol=0)
    assert torch.equal(GlobalBatchDropout(0.3, dist.Shard(0, 3)).eval()(x), x)


@pytest.fixture
def one_process_group(tmp_path):
    """A real gloo process group of one rank (its all-reduces are identities)."""
    torch_dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.parametrize("momentum", [0.1, None])
def test_global_batchnorm_equals_batchnorm(one_process_group, momentum):
    torch.manual_seed(0)
    ref = torch.nn.BatchNorm2d(4, momentum=momentum)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    ours = GlobalBatchNorm.from_batchnorm(ref)
    assert ours.weight is ref.weight and ours.running_var is ref.running_var  # shared
    twin = torch.nn.BatchNorm2d(4, momentum=momentum)
    twin.load_state_dict(ref.state_dict())
    for _ in range(2):  # two steps: the running statistics move twice
        x = 3 + 2 * torch.randn(5, 4, 6, 7)
        x_ours, x_twin = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ours, y_twin = ours(x_ours), twin(x_twin)
        torch.testing.assert_close(y_ours, y_twin, atol=1e-5, rtol=1e-5)
        g = torch.randn_like(x)
        (y_ours * g).sum().backward()
        (y_twin * g).sum().backward()
        torch.testing.assert_close(x_ours.grad, x_twin.grad, atol=1e-5, rtol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(twin, name), msg=name)
    torch.testing.assert_close(ref.weight.grad, twin.weight.grad)
    torch.testing.assert_close(ref.bias.grad, twin.bias.grad)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(ours.eval()(x), twin.eval()(x))


def test_data_parallel_changes_nothing_in_one_process():
    module = torch.nn.Sequential(torch.nn.BatchNorm2d(2), torch.nn.Dropout(0.5))
    with parallel.data_parallel(module, torch.device("cpu")) as step:
        assert step is module
    assert [type(m) for m in module] == [torch.nn.BatchNorm2d, torch.nn.Dropout]


def test_bad_launches_fail_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserError, match=r"stage0.batch_size=8 does not split evenly over 3"):
        stage0.train_stage0(_cfg(tmp_path), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before any work
    with pytest.raises(UserError, match="nccl backend needs a CUDA device"):
        dist.setup(torch.device("cpu"), backend="nccl")
    with pytest.raises(UserError, match=r"run\.device=cuda:1 names one GPU for all 3"):
        resolve_device("cuda:1")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(UserError, match="WORLD_SIZE='two' is not an integer"):
        dist.world_size()


def test_rank_helpers_read_torchruns_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)
    assert dist.shard() == dist.WHOLE
    with dist.session(torch.device("cpu")) as distributed:
        assert distributed is False  # nothing to join
        assert not torch_dist.is_initialized()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert (dist.rank(), dist.world_size(), dist.local_rank()) == (3, 4, 1)
    assert not dist.is_main() and dist.shard() == dist.Shard(3, 4)
    assert dist.per_rank_batch(32, "stage0.batch_size") == 8
