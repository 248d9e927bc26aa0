"""Fault injection: kill -9, concurrent writers, damaged artifacts, bad output folders and a
code payload in a checkpoint, each against the real command line on a tiny config.

Every case asserts the exit code, that stderr is exactly one line naming the file (or the
process) at fault, and which files are left. Subprocesses run in sessions of their own and
are killed with their children when a test ends (``tests/procs.py``).
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import yaml
from procs import dymu_cmd, run_session, session
from tiny import TINY

from dymu.cli.main import main
from dymu.io import clean_stale

STAGES = ("stage0", "joint", "stage1", "stage2")
"""Stages with a checkpoint (``RUN/<stage>/checkpoint.pt``), in the order they run."""

LONG = ["stage0.epochs=3", "joint.steps=30", "stage1.steps=40", "stage2.steps=30"]
"""Long enough that every stage holds a checkpoint for a while (about half a second)."""

TIMEOUT = 240


def _fault_args(cache: Path) -> list[str]:
    return [*TINY, *LONG, "run.checkpoint_every=5", f"data.cache_dir={cache}"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted tiny search (subprocess) and its config overrides."""
    root = tmp_path_factory.mktemp("faults")
    args = _fault_args(root / "cache")
    run = root / "reference"
    code, _, err = run_session(dymu_cmd("search", "--run", str(run), *args), root, "ref", TIMEOUT)
    assert code == 0, err[-2000:]
    return run, args


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    return lines[0]


def _temporaries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.name.endswith(".tmp"))


def _wait_for(predicate, proc, what: str, timeout: float = TIMEOUT) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the process ended before {what}"
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.002)


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns(".dymu.lock"))
    return dest


# --------------------------------------------------------------------------- kill -9


def test_kill_9_in_every_stage_then_resume_gives_identical_artifacts(reference, tmp_path):
    ref, args = reference
    run = tmp_path / "run"
    for i, stage in enumerate(STAGES):
        cmd = dymu_cmd("search", "--run", str(run), *(["--resume"] if i else []), *args)
        with session(cmd, tmp_path, f"cut{i}") as proc:
            checkpoint = run / stage / "checkpoint.pt"
            _wait_for(checkpoint.exists, proc, f"a {stage} checkpoint")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert not (run / "report.json").exists()
    # The lock of the killed process is gone with it: the next run takes it over.
    cmd = dymu_cmd("search", "--run", str(run), "--resume", *args)
    code, _, err = run_session(cmd, tmp_path, "resumed", TIMEOUT)
    assert code == 0, err[-2000:]
    for name in [*sorted(p.name for p in ref.glob("*.safetensors")), "report.json"]:
        assert (run / name).read_bytes() == (ref / name).read_bytes(), name
    assert _temporaries(run) == []
    assert not any((run / stage / "checkpoint.pt").exists() for stage in STAGES)


def test_kill_9_during_export_leaves_no_bundle_and_a_rerun_completes(reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "bundle"
    cmd = dymu_cmd("export", "--run", str(ref), "--budget", "1", "--grid", "2", "--out", str(out))
    with session(cmd, tmp_path, "export") as proc:
        _wait_for(lambda: any(tmp_path.glob(".bundle.*.tmp/*")), proc, "the staging folder")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not out.exists()
    assert _temporaries(tmp_path), "the kill should have left a staging folder to clean"
    code, _, err = run_session(cmd, tmp_path, "export2", TIMEOUT)
    assert code == 0, err[-2000:]
    assert (out / "manifest.json").is_file()
    assert not list(tmp_path.glob(".bundle.*"))  # the killed export's staging is gone


# --------------------------------------------------------------------------- concurrency


def test_a_second_writer_and_a_reader_are_refused_while_a_search_writes(reference, tmp_path):
    ref, args = reference
    run = _copy(ref, tmp_path / "run")
    # Retrains stage 2 for a long time: a writer that holds the lock until it is killed.
    writer_cmd = dymu_cmd("search", "--run", str(run), *args, "stage2.steps=1000000")
    with session(writer_cmd, tmp_path, "writer") as writer:
        lock = run / ".dymu.lock"
        _wait_for(
            lambda: lock.is_file() and f"process {writer.pid} " in lock.read_text(),
            writer,
            "the writer's lock",
        )
        cmd = dymu_cmd("search", "--run", str(run), *args, "run.seed=1")
        code, _, err = run_session(cmd, tmp_path, "second", TIMEOUT)
        assert code == 2
        assert f"in use by process {writer.pid} " in _one_line(err)
        cmd = dymu_cmd("sample", "--run", str(run), "--preference", "0.2,0.3,0.5", "--budget", "1")
        code, _, err = run_session(cmd, tmp_path, "reader", TIMEOUT)
        assert code == 2
        assert f"in use by process {writer.pid} " in _one_line(err)
        assert writer.poll() is None
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["run"]["seed"] == 0 and config["stage2"]["steps"] == 1000000
    # Killed with its session: the kernel dropped its lock, and a reader gets in.
    code, _, err = run_session(cmd, tmp_path, "after", TIMEOUT)
    assert code == 0, err


# --------------------------------------------------------------------------- damaged files

ARTIFACTS = {
    "config.yaml": "env.json",
    "anchor.safetensors": "edge_hnet.safetensors",
    "joint.safetensors": "weight_hnet.safetensors",
    "edge_hnet.safetensors": "weight_hnet.safetensors",
    "weight_hnet.safetensors": "edge_hnet.safetensors",
    "space.json": "anchor.json",
    "anchor.json": "joint.json",
    "joint.json": "edge_hnet.json",
    "edge_hnet.json": "weight_hnet.json",
    "weight_hnet.json": "anchor.json",
}
"""Each artifact that ``dymu export`` reads, and the one swapped into its place."""


def _damage(path: Path, how: str, partner: Path) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "random":
        path.write_bytes(os.urandom(max(len(data), 64)))
    else:  # swapped with another artifact
        path.write_bytes(partner.read_bytes())


@pytest.fixture(scope="module")
def pristine(reference, tmp_path_factory):
    return _copy(reference[0], tmp_path_factory.mktemp("pristine") / "run")


@pytest.mark.parametrize("how", ["truncated", "empty", "random", "swapped"])
@pytest.mark.parametrize("name", sorted(ARTIFACTS))
def test_a_damaged_artifact_is_one_line_naming_it(pristine, tmp_path, capsys, name, how):
    run = _copy(pristine, tmp_path / "run")
    _damage(run / name, how, run / ARTIFACTS[name])
    before = sorted(p.name for p in run.iterdir())
    out = tmp_path / "bundle"
    code = main(["export", "--run", str(run), "--budget", "1", "--out", str(out)])
    line = _one_line(capsys.readouterr().err)
    assert code == 2, line
    assert name in line, line
    assert not out.exists() and not list(tmp_path.glob(".bundle.*"))
    assert sorted(p.name for p in run.iterdir() if p.name != ".dymu.lock") == before


@pytest.mark.parametrize("name", ["config.yaml", "space.json", "edge_hnet.safetensors"])
def test_sample_names_a_damaged_artifact(pristine, tmp_path, capsys, name):
    run = _copy(pristine, tmp_path / "run")
    _damage(run / name, "random", run)
    code = main(["sample", "--run", str(run), "--preference", "0.2,0.3,0.5", "--budget", "1"])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and name in line, line


def test_a_pickle_payload_in_a_checkpoint_is_refused_and_never_runs(reference, tmp_path, capsys):
    import pickle

    ref, args = reference
    run = _copy(ref, tmp_path / "run")
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for name in ("edge_hnet.safetensors", "edge_hnet.json", "weight_hnet.safetensors"):
        (run / name).unlink()
    (run / "stage1").mkdir(exist_ok=True)
    (run / "stage1" / "checkpoint.pt").write_bytes(pickle.dumps({"step": 1, "x": Payload()}))
    code = main(["search", "--run", str(run), "--resume", *args])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and "stage1/checkpoint.pt" in line, line
    assert "weights_only" not in line
    assert not marker.exists()
    assert not (run / "edge_hnet.safetensors").exists()


# --------------------------------------------------------------------------- paths and names


@pytest.mark.parametrize("kind", ["proc", "sys", "existing empty", "under a file"])
def test_an_unwritable_or_existing_out_is_refused_before_any_work(pristine, tmp_path, capsys, kind):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    (tmp_path / "empty").mkdir()
    out = {
        "proc": Path("/proc/dymu-out"),
        "sys": Path("/sys/dymu-out"),
        "existing empty": tmp_path / "empty",
        "under a file": blocker / "out",
    }[kind]
    code = main(["export", "--run", str(pristine), "--budget", "1", "--out", str(out)])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and str(out) in line, line
    assert not list((tmp_path / "empty").iterdir()) and blocker.read_text() == "x"


def test_an_unknown_tensorrt_version_is_refused_before_the_export(pristine, tmp_path, capsys):
    out = tmp_path / "bundle"
    args = ["--budget", "1", "--trt-version", "9.9", "--out", str(out)]
    code = main(["export", "--run", str(pristine), *args])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and "9.9" in line, line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "override, word",
    [("model.backbone=nope", "backbone"), ("data.name=nope", "dataset"), ("data.tasks=[x]", "x")],
)
def test_unknown_names_are_refused_by_config_and_search_before_writing(
    tmp_path, capsys, override, word
):
    assert main(["config", override]) == 2
    assert word in _one_line(capsys.readouterr().err)
    run = tmp_path / "run"
    assert main(["search", "--run", str(run), "run.device=cpu", override]) == 2
    assert word in _one_line(capsys.readouterr().err)
    assert not run.exists()


def test_a_negative_preference_gets_its_own_message(pristine, capsys):
    code = main(["sample", "--run", str(pristine), "--preference", "-0.1,0.6,0.5", "--budget", "1"])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and "must be >= 0" in line, line


def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = 2**22 + 12345  # above Linux's largest pid: no such process
    (tmp_path / "stage1").mkdir()
    stale = [
        tmp_path / f".edge_hnet.safetensors.{dead}.abc123.tmp",
        tmp_path / "stage1" / f".checkpoint.pt.{dead}.x_1.tmp",
    ]
    for p in stale:
        p.write_bytes(b"half")
    staging = tmp_path / f".bundle.{dead}.q9.tmp"
    (staging / "tree").mkdir(parents=True)
    live = tmp_path / f".report.json.{os.getpid()}.zz.tmp"
    live.write_bytes(b"being written")
    assert clean_stale(tmp_path, recursive=True) == 3
    assert _temporaries(tmp_path) == [live]
