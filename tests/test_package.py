"""Packaging promises: light imports, the two folder-packages, the console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import dymu

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("onnxruntime", "tensorrt", "matplotlib")


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_import_dymu_stays_light():
    loaded = _modules_after("import dymu")
    assert not [m for m in loaded if m.split(".")[0] in HEAVY]


def test_library_and_cli_modules_stay_light():
    loaded = _modules_after(
        "import dymu.cli.main, dymu.data, dymu.tasks, dymu.config, dymu.run, "
        "dymu.affinity, dymu.compile"
    )
    assert not [m for m in loaded if m.split(".")[0] in HEAVY]


def test_affinity_and_compile_install_as_subpackages():
    import dymu.affinity
    import dymu.compile

    assert Path(dymu.affinity.__file__).resolve().parent == ROOT / "affinity"
    assert Path(dymu.compile.__file__).resolve().parent == ROOT / "compile"


def test_console_script_reports_version():
    out = subprocess.run(
        [sys.executable, "-m", "dymu", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"dymu {dymu.__version__}"


def test_every_package_folder_is_declared_for_installation():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    declared = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {"dymu.affinity", "dymu.compile"}
    for init in (ROOT / "dymu").rglob("__init__.py"):
        found.add(".".join(init.parent.relative_to(ROOT).parts))
    for folder in ("affinity", "compile"):
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join(("dymu", folder, *rel)))
    assert found == declared
