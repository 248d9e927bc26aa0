"""The stage specs (dymu.train.spec): each stage's hash changes with every input it uses
and with nothing else; records carry the spec; runs of another dymu are refused."""

from __future__ import annotations

import copy
import json

import pytest
from tiny import TINY

from dymu.cli.main import main
from dymu.config import Config, dotted_keys, load_config, to_dict
from dymu.train.spec import resolve_specs

NOT_INPUTS = {"run.device", "run.checkpoint_every", "run.channels_last", "data.cache_dir"}
"""Settings no stage's artifact depends on (where things run and are cached)."""


def _changed(value):
    """Another value of the same kind (validity is not checked: only the hash is)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 1.5 + 0.1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return [*value, value[-1]] if value else [1]
    return "something" if value is None else None


def _with(cfg: Config, dotted: str) -> Config:
    out = copy.deepcopy(cfg)
    *path, key = dotted.split(".")
    node = out
    for part in path:
        node = getattr(node, part)
    setattr(node, key, _changed(getattr(node, key)))
    return out


def _inputs(stage: str) -> set[str]:
    """The config keys ``stage`` consumes under the default config (joint stage on, towers
    off), directly or through the artifacts it builds on."""
    keys = dotted_keys(to_dict(Config()))
    section = {k: k.split(".")[0] for k in keys}
    s0 = {k for k in keys if section[k] in ("data", "model", "stage0")} - NOT_INPUTS
    s0 = {k for k in s0 if not k.startswith("stage0.towers.")} | {"stage0.towers.gamma"}
    s0 = (s0 - {"model.widths"}) | {"run.seed", "run.precision"}  # stage 0: full widths
    affinity = s0 | {k for k in keys if section[k] == "affinity"}
    joint = s0 | {k for k in keys if section[k] == "joint"}  # full widths, as stage 0
    # Stages 1 and 2 train full-width trees: the widths are not theirs either.
    stage1 = joint | affinity | {k for k in keys if section[k] == "stage1"}
    stage2 = stage1 | {k for k in keys if section[k] == "stage2"}
    return {"stage0": s0, "affinity": affinity, "joint": joint, "stage1": stage1,
            "stage2": stage2}[stage]  # fmt: skip


@pytest.mark.parametrize("stage", ["stage0", "affinity", "joint", "stage1", "stage2"])
def test_a_stage_hash_changes_with_every_input_and_nothing_else(stage):
    base = Config()
    h = resolve_specs(base)[stage].hash
    used = _inputs(stage)
    for key in dotted_keys(to_dict(base)):
        changed = resolve_specs(_with(base, key))[stage].hash != h
        assert changed == (key in used), (stage, key, "is an input" if key in used else "is not")


def test_the_width_stage_runs_with_widths_alone_and_later_stages_do_not_depend_on_it():
    """Full widths: no width stage, its settings are no input. With widths: the joint
    stage is what it was, the width stage consumes its own settings, the joint stage's and
    the widths; stages 1 and 2 train full-width trees, so neither depends on any of it (a
    run that gains widths keeps its hypernetworks), and the rule that sets widths after
    training (``slim.strength``) is no stage's input."""
    plain = Config()
    assert "slim" not in resolve_specs(plain)
    cfg = load_config(None, ["model.widths=[0.5,1.0]"])
    specs = resolve_specs(cfg)
    for stage in ("joint", "stage1", "stage2"):
        assert specs[stage].hash == resolve_specs(plain)[stage].hash, stage
    h = specs["slim"].hash
    for key in ("slim.steps", "slim.features", "joint.lr", "joint.trunk", "run.seed"):
        assert resolve_specs(_with(cfg, key))["slim"].hash != h, key
    assert resolve_specs(load_config(None, ["model.widths=[0.25,1.0]"]))["slim"].hash != h
    for key in ("slim.steps", "slim.strength"):
        assert resolve_specs(_with(cfg, key))["stage2"].hash == specs["stage2"].hash, key
    for key in ("stage1.steps", "slim.strength"):
        assert resolve_specs(_with(cfg, key))["slim"].hash == h, key


def test_the_private_node_rule_is_an_input_of_both_hypernetwork_stages():
    """The hole of the hand-kept chain: stage 1 runs trees under the rule too."""
    on = Config()
    off = load_config(None, ["joint.private_nodes=false"])
    for stage in ("joint", "stage1", "stage2"):
        assert resolve_specs(on)[stage].hash != resolve_specs(off)[stage].hash, stage
    assert resolve_specs(off)["stage1"].inputs["streams"]["private"] is None


def test_without_a_joint_stage_its_settings_are_no_input():
    """With joint.steps=0 trees run stage 0's streams alone: the joint settings, the
    private-node rule among them, change no hash."""
    base = load_config(None, ["joint.steps=0"])
    specs = resolve_specs(base)
    assert "joint" not in specs
    assert specs["stage1"].inputs["streams"] == {
        "tuned": f"stage0 {specs['stage0'].hash}",
        "private": None,
    }
    for key in ("joint.private_nodes", "joint.lr", "joint.trunk"):
        other = resolve_specs(_with(base, key))
        assert other["stage1"].hash == specs["stage1"].hash, key
        assert other["stage2"].hash == specs["stage2"].hash, key


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spec")
    assert main(["search", "--run", str(tmp / "run"), *TINY, f"data.cache_dir={tmp}"]) == 0
    return tmp / "run"


def test_every_record_holds_its_spec_and_its_hash(run):
    from dymu.run import read_run_config

    specs = resolve_specs(read_run_config(run))
    for stage, name in [("stage0", "anchor"), ("joint", "joint"), ("stage1", "edge_hnet"),
                        ("stage2", "weight_hnet")]:  # fmt: skip
        record = json.loads((run / f"{name}.json").read_text())
        assert record["spec"] == specs[stage].to_json(), stage
        assert record["config_hash"] == specs[stage].hash, stage


def _sample(run, capsys) -> tuple[int, str]:
    code = main(["sample", "--run", str(run), "--preference", "0.5,0.3,0.2", "--budget", "1"])
    return code, capsys.readouterr().err


def test_a_run_of_another_dymu_is_refused_with_what_to_rerun(run, tmp_path, capsys):
    import shutil

    import yaml

    old = tmp_path / "old"
    shutil.copytree(run, old)
    # A record from before stage specs existed.
    record = json.loads((old / "edge_hnet.json").read_text())
    del record["spec"]
    (old / "edge_hnet.json").write_text(json.dumps(record))
    code, err = _sample(old, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "earlier dymu" in err and f"rerun dymu search --run {old}" in err

    # A config written before the joint stage existed: refused, not filled with defaults
    # (which would look for a joint.safetensors the run never had).
    shutil.rmtree(old)
    shutil.copytree(run, old)
    cfg = yaml.safe_load((old / "config.yaml").read_text())
    del cfg["joint"]
    cfg["stage1"]["private"] = True  # a key dymu no longer has
    (old / "config.yaml").write_text(yaml.safe_dump(cfg))
    code, err = _sample(old, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "another version of dymu" in err and "lacks joint." in err
    assert f"rerun dymu search --run {old}" in err


def test_the_baselines_depend_on_the_anchor_and_the_sweep_not_on_the_hypernetworks():
    """The loss scales every baseline uses come from the stage-0 anchor alone, so a change
    of the joint stage or of stages 1-2 leaves the (hours of) baselines valid."""
    from dymu.baselines.run import method_hash

    base = Config()
    for key, used in [("joint.lr", False), ("affinity.images", False), ("stage1.lr", False),
                      ("stage2.lr", False), ("stage0.lr", True), ("evaluate.preferences", True),
                      ("baselines.epochs", True)]:  # fmt: skip
        changed = method_hash(_with(base, key), "static") != method_hash(base, "static")
        assert changed == used, key
