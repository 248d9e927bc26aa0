"""A run directory gets the resolved config and the environment, atomically."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from dymu.config import from_dict, load_config
from dymu.errors import UserError
from dymu.io import atomic_path, write_json
from dymu.run import resolve_device, start_run


def test_start_run_writes_config_and_env(tmp_path):
    cfg = load_config(None, ["run.device=cpu", "data.size=[32, 32]"])
    run = start_run(cfg, tmp_path / "runs" / "r1")
    assert from_dict(yaml.safe_load((run / "config.yaml").read_text())) == cfg
    env = json.loads((run / "env.json").read_text())
    assert env["device"] == "cpu"
    assert env["packages"]["torch"] == torch.__version__.split("+")[0] or env["packages"]["torch"]
    assert {"python", "dymu", "cuda_available", "gpus", "cpu_count"} <= set(env)
    # No temporary files; the lock file stays (deleting one races with the next locker).
    assert sorted(p.name for p in run.iterdir()) == [".dymu.lock", "config.yaml", "env.json"]


def test_unwritable_run_dir_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot create directory"):
        start_run(load_config(None, ["run.device=cpu"]), blocker / "run")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_request_without_cuda_fails_clearly():
    with pytest.raises(UserError, match="no CUDA device"):
        resolve_device("cuda:0")
    assert resolve_device("auto").type == "cpu"


def test_atomic_files_get_the_usual_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        path = write_json(tmp_path / "a.json", {})
        assert path.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(mask)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert json.loads(target.read_text()) == {"a": 1}  # old content intact
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
