"""The device side of a bundle: copy the standalone runtime and a filled-in README into it.

The templates live in ``dymu.compile/bundle_files`` (package data) and are read through
:mod:`importlib.resources`, so this works from a wheel as well as from a checkout. The
runtime is copied verbatim: it must run on a device without dymu, so it cannot import
anything from here.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path
from typing import Any

RUNTIME = "dymu_runtime.py"
README = "README.md"


def template(name: str) -> str:
    """The text of one packaged template (``dymu_runtime.py`` or ``README.md``)."""
    return (resources.files("dymu.compile") / "bundle_files" / name).read_text(encoding="utf-8")


def render_readme(manifest: dict[str, Any]) -> str:
    """The README template with this bundle's tasks, budget, TensorRT version and trees."""
    tasks = list(manifest["tasks"])
    shape = manifest["input"]["shape"]
    rows = [
        f"| `{t['hash']}` | {'; '.join(str(p) for p in t['preferences'])} | "
        f"{t['flops_fraction']:.3f} | {t['params']} |"
        for t in manifest["trees"]
    ]
    first = manifest["trees"][0]["preferences"][0]
    values = {
        "tasks": ", ".join(tasks),
        "budget": f"{manifest['budget']:g}",
        "num_trees": str(len(manifest["trees"])),
        "trt_version": str(manifest["trt_version"]),
        "dymu_version": str(manifest.get("dymu_version", "?")),
        "trees": "\n".join(rows),
        "example_preference": ", ".join(f"{x:g}" for x in first),
        "image_shape": ", ".join(str(d) for d in shape[1:]),
    }
    text = template(README)
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def write_bundle_files(folder: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write ``dymu_runtime.py`` and ``README.md`` into ``folder``.

    Returns:
        ``{"files": {name: sha256}}``, for the manifest's ``runtime`` key, so a device can
        check that the runtime it runs is the one exported.
    """
    folder = Path(folder)
    files = {}
    for name, text in ((RUNTIME, template(RUNTIME)), (README, render_readme(manifest))):
        data = text.encode("utf-8")
        (folder / name).write_bytes(data)
        files[name] = hashlib.sha256(data).hexdigest()
    return {"files": files}
