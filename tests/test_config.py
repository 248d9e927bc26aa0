"""Typed config: defaults, YAML and key=value precedence, strict one-line errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from dymu.config import Config, from_dict, load_config, parse_override, to_dict, to_yaml
from dymu.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_the_dataclasses():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.data.name == "synthscenes" and cfg.data.size is None and cfg.run.device == "auto"


def test_yaml_then_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  seed: 3\n  size: [48, 40]\n  synth:\n    num_train: 10\n")
    cfg = load_config(path, ["data.seed=5", "data.synth.noise=0.1"])
    assert cfg.data.seed == 5  # override beats the file
    assert cfg.data.size == [48, 40]  # file beats the default
    assert cfg.data.synth.num_train == 10 and cfg.data.synth.noise == pytest.approx(0.1)
    assert cfg.data.synth.num_val == 500  # untouched default


def test_override_values_are_yaml_but_strings_stay_raw():
    assert parse_override("data.size=[32, 32]") == ("data.size", [32, 32])
    assert parse_override("data.root=null") == ("data.root", None)
    assert parse_override("data.root=2024") == ("data.root", "2024")
    assert parse_override("data.tasks=[semseg,depth]") == ("data.tasks", ["semseg", "depth"])
    assert parse_override("data.synth.noise=1e-3") == ("data.synth.noise", 1e-3)


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config(None, ["data.synth.noise=0"]).data.synth.noise == 0.0
    with pytest.raises(UserError, match=r"data\.seed must be int, got 0\.5"):
        load_config(None, ["data.seed=0.5"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.nme=3", "unknown key 'data.nme'; valid keys in data: name, root, cache_dir"),
        ("dta.name=x", "unknown key 'dta'; valid keys at the top level: run, data"),
        ("data.synth.bogus=1", "valid keys in data.synth: num_train, num_val"),
        ("data.seed=abc", "data.seed must be int, got 'abc'"),
        ("data.size=[1, 2, 3]", "data.size must be [H, W]"),
        ("data.synth=3", "data.synth must be a mapping"),
        ("run.device=gpu", "run.device must be auto, cpu, cuda or cuda:N"),
        ("data.tasks=semseg", "data.tasks must be list[str] | null"),
        ("data.synth.min_objects=6", "min_objects <= data.synth.max_objects"),
        ("data.seed=-1", "data.seed must be >= 0"),
        ("novalue", "is not of the form section.key=value"),
    ],
)
def test_bad_keys_and_types_fail_with_one_line(override, message):
    with pytest.raises(UserError) as info:
        load_config(None, [override])
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_yaml_file_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(UserError, match=r"bad\.yaml.*line"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        load_config(scalar)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("data:\n  colour: red\n")
    with pytest.raises(UserError, match=r"unknown key 'data\.colour'"):
        load_config(unknown)


def test_resolved_yaml_round_trips():
    cfg = load_config(None, ["data.size=[32, 48]", "data.tasks=[depth]", "run.seed=7"])
    again = from_dict(yaml.safe_load(to_yaml(cfg)))
    assert again == cfg
    assert to_dict(again)["data"]["synth"]["num_train"] == 4000


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.data.name


def _dataclass_keys(obj, prefix: str = "") -> set[str]:
    """The dotted keys of a config dataclass's fields, recursively (nested sections)."""
    keys = set()
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        keys |= _dataclass_keys(value, f"{key}.") if dataclasses.is_dataclass(value) else {key}
    return keys


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    """A nested mapping as ``{dotted key: value}``, recursively (lists are values)."""
    out = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        out |= _flat(value, f"{key}.") if isinstance(value, dict) else {key: value}
    return out


def test_the_default_config_file_is_the_built_in_default():
    """configs/default.yaml says it spells out the defaults: every key of ``Config()``, each
    with its default value, so that a run with it has the same config, and so the same
    stage hashes, as one without it."""
    from dymu.config import section_hash

    path = CONFIGS / "default.yaml"
    written = _flat(yaml.safe_load(path.read_text()) or {})  # an empty file: no keys
    default = _flat(to_dict(Config()))
    expected = _dataclass_keys(Config())
    assert expected == set(default)  # the dataclass fields, walked two ways
    missing, unknown = sorted(expected - set(written)), sorted(set(written) - expected)
    assert not missing, f"default.yaml leaves out {missing}"
    assert not unknown, f"default.yaml has unknown keys {unknown}"
    off = {k: (written[k], default[k]) for k in expected if written[k] != default[k]}
    assert not off, f"default.yaml's values (as YAML reads them) differ from the defaults: {off}"
    shipped = load_config(path)
    assert shipped == Config()
    for section in (f.name for f in dataclasses.fields(Config)):
        assert section_hash(shipped, section) == section_hash(Config(), section), section


def test_stage1_batch_must_split_into_its_draws():
    assert load_config(None, ["stage1.batch_size=12", "stage1.draws=3"]).stage1.draws == 3
    with pytest.raises(UserError, match=r"multiple of stage1\.draws"):
        load_config(None, ["stage1.batch_size=10", "stage1.draws=4"])
    with pytest.raises(UserError, match=r"stage1\.regularise"):
        load_config(None, ["stage1.regularise=both"])
