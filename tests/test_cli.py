"""The command line: exit codes, one-line errors, and the dataset commands end to end."""

from __future__ import annotations

import pytest

from dymu.cli.main import main

TINY = [
    "data.size=[32,32]",
    "data.synth.num_train=8",
    "data.synth.num_val=4",
    "data.synth.num_test=4",
]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_and_version(capsys):
    for argv in (["--help"], ["datasets", "--help"], ["datasets", "show", "--help"], ["--version"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "dymu datasets show synthscenes" in out


def test_datasets_list_names_every_dataset(capsys):
    code, out, _ = run(capsys, "datasets", "list")
    assert code == 0
    for name in (
        "synthscenes",
        "nyuv2",
        "pascal_context",
        "cifar100",
        "multimnist",
        "multifashion",
        "multifashion_mnist",
    ):
        assert name in out


def test_show_writes_a_picture(capsys, tmp_path):
    out_png = tmp_path / "grid.png"
    code, out, err = run(
        capsys,
        "datasets",
        "show",
        "synthscenes",
        "--out",
        str(out_png),
        "-n",
        "2",
        f"data.cache_dir={tmp_path / 'cache'}",
        *TINY,
    )
    assert code == 0, err
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "semseg, depth, normals, edges" in out


def test_prepare_then_config_run_dir(capsys, tmp_path):
    code, out, _ = run(
        capsys, "datasets", "prepare", "synthscenes", f"data.cache_dir={tmp_path}", *TINY
    )
    assert code == 0 and "train 8, val 4, test 4" in out
    code, out, _ = run(capsys, "config", "--run", str(tmp_path / "r"), "run.device=cpu")
    assert code == 0 and "device: cpu" in out
    assert (tmp_path / "r" / "config.yaml").is_file() and (tmp_path / "r" / "env.json").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["datasets", "show", "synthscenes", "data.nme=1"], "unknown key 'data.nme'"),
        (["datasets", "show", "nope"], "unknown dataset 'nope'; choose one of:"),
        (["datasets", "show", "nyuv2"], "set data.root=PATH"),
        (["datasets", "show", "nyuv2", "--root", "/does/not/exist"], "does not exist"),
        (["datasets", "show", "synthscenes", "--split", "dev"], "unknown split 'dev'"),
        (["datasets", "show", "synthscenes", "--out", "x.gif"], "use one of .png"),
        (["config", "-c", "/no/such.yaml"], "config file /no/such.yaml not found"),
    ],
)
def test_user_errors_are_one_line_exit_2(capsys, tmp_path, argv, message):
    code, _, err = run(capsys, *argv, f"data.cache_dir={tmp_path}", *TINY)
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_usage_errors_are_one_line_exit_2(capsys):
    for argv in (["datasets", "show"], ["nosuchcommand"], ["datasets", "list", "--bogus"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error:" in err


def test_unwritable_output_is_exit_2(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run(
        capsys,
        "datasets",
        "show",
        "synthscenes",
        "--out",
        str(blocker / "x.png"),
        f"data.cache_dir={tmp_path / 'c'}",
        *TINY,
    )
    assert code == 2 and "cannot create directory" in err


def test_debug_shows_the_traceback(capsys, tmp_path):
    code, _, err = run(capsys, "--debug", "datasets", "show", "nope")
    assert code == 2 and "Traceback" in err


def _fixture(name: str, root):
    """Write a tiny copy of dataset ``name`` in its real on-disk format under ``root``."""
    from fixtures_real import write_nyud_mt, write_nyuv2_npy, write_pascal_context
    from test_data_cifar100 import write_cifar
    from test_data_multimnist import write_source

    writers = {
        "nyuv2": lambda: write_nyuv2_npy(root),
        "nyud_mt": lambda: write_nyud_mt(root),
        "pascal_context": lambda: write_pascal_context(root),
        "cifar100": lambda: write_cifar(root),
        "multimnist": lambda: write_source(root / "mnist", "mnist"),
        "multifashion": lambda: write_source(root / "fashion-mnist", "fashion"),
        "multifashion_mnist": lambda: (
            write_source(root / "mnist", "mnist"),
            write_source(root / "fashion-mnist", "fashion"),
        ),
    }
    writers[name]()


@pytest.mark.parametrize(
    "name",
    [
        "nyuv2",
        "nyud_mt",
        "pascal_context",
        "cifar100",
        "multimnist",
        "multifashion",
        "multifashion_mnist",
    ],
)
def test_every_real_dataset_prepares_and_shows(capsys, tmp_path, name):
    from dymu.data import DATASETS

    assert name in DATASETS
    root = tmp_path / "data"
    _fixture(name, root)
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    code, out, err = run(capsys, "datasets", "prepare", name, "--root", str(root), cache)
    assert code == 0, err
    assert "train" in out and "test" in out
    png = tmp_path / f"{name}.png"
    code, out, err = run(
        capsys,
        "datasets",
        "show",
        name,
        "--root",
        str(root),
        "--out",
        str(png),
        "-n",
        "2",
        "--split",
        "test",
        cache,
    )
    assert code == 0, err
    assert png.read_bytes()[:4] == b"\x89PNG"
