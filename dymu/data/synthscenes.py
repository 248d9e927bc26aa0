"""``synthscenes``: the embedded multi-task dataset, procedurally generated and cached.

Each scene is a room (a floor and a back wall) seen from a pitched camera, with 2-4
primitives (sphere, box, cylinder, cone) standing on the floor, lit by one directional
light. All targets come from one ray cast (:mod:`dymu.data.render`), so they are
physically consistent:

- ``semseg`` (6 classes): floor, wall, sphere, box, cylinder, cone;
- ``material`` (5 classes): room, red, green, blue, yellow; an object takes its shape's
  own colour with probability ``data.synth.color_shape_corr`` and a uniformly random
  colour otherwise, which sets how related the two label sets are;
- ``depth``: z-depth of the same hit points; ``normals``: camera-frame unit normals of the
  same surfaces (curved: sphere, cylinder, cone; tilted: box faces, yawed wall);
- ``edges``: instance boundaries and depth discontinuities.

The image shades each surface's albedo with its normal (Lambert), so RGB carries the
geometry, plus a floor checker texture and pixel noise that are not part of any target.
Generation is vectorised over images (thousands per second at 64x64 on one core) and
deterministic from ``data.seed``; the result is cached under ``cache_root`` in a
directory named by a hash of everything that shapes it, written atomically.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dymu.config import DataConfig, SynthConfig
from dymu.data import render
from dymu.data.base import (
    DATASETS,
    SPLITS,
    ArrayDataset,
    DatasetBuilder,
    DatasetInfo,
    cache_root,
)
from dymu.errors import UserError
from dymu.io import atomic_dir
from dymu.tasks.base import TaskSpec

GENERATOR_VERSION = 1
"""Bump when the generated pixels change, so stale caches are not reused."""

HFOV_DEG = 50.0
CHUNK = 128
"""Images rendered per vectorised call; part of the noise seeding, so fixed."""

SEMSEG_CLASSES = ("floor", "wall", "sphere", "box", "cylinder", "cone")
MATERIAL_CLASSES = ("room", "red", "green", "blue", "yellow")
PALETTE = np.array(
    [[0.85, 0.20, 0.20], [0.20, 0.75, 0.30], [0.20, 0.35, 0.90], [0.90, 0.80, 0.20]],
    dtype=np.float32,
)
"""Albedo of each material colour; colour i is the own colour of shape i."""

# Placement cells on the floor: (band depth in metres, lateral position as a fraction of
# the visible half-width). Objects in different cells cannot intersect (see _sample).
_BANDS = ((3.0, (-0.5, 0.5)), (4.8, (-0.66, 0.0, 0.66)), (6.6, (-0.75, -0.25, 0.25, 0.75)))
_CELLS = np.array([(z, u) for z, us in _BANDS for u in us], dtype=np.float64)  # [C, 2]
_BAND_GAP = 1.8
MAX_OBJECTS = len(_CELLS)

TASKS = (
    TaskSpec("semseg", "semseg", len(SEMSEG_CLASSES), SEMSEG_CLASSES),
    TaskSpec("material", "semseg", len(MATERIAL_CLASSES), MATERIAL_CLASSES),
    TaskSpec("depth", "depth"),
    TaskSpec("normals", "normals"),
    TaskSpec("edges", "edges"),
)


def _rot_x(angle: np.ndarray) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    o, z = np.ones_like(c), np.zeros_like(c)
    return np.stack([o, z, z, z, c, -s, z, s, c], -1).reshape(*angle.shape, 3, 3)


def _rot_y(angle: np.ndarray) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    o, z = np.ones_like(c), np.zeros_like(c)
    return np.stack([c, z, s, z, o, z, -s, z, c], -1).reshape(*angle.shape, 3, 3)


def _sample(n: int, synth: SynthConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Draw the parameters of ``n`` scenes (all arrays drawn whole, so order is fixed)."""
    k_max = synth.max_objects
    p: dict[str, np.ndarray] = {
        "cam_h": rng.uniform(1.7, 2.3, n),
        "pitch": np.radians(rng.uniform(16.0, 26.0, n)),
        "wall_yaw": np.radians(rng.uniform(-25.0, 25.0, n)),
        "wall_dist": rng.uniform(9.0, 12.0, n),
        "light_az": np.radians(rng.uniform(-60.0, 60.0, n)),
        "light_el": np.radians(rng.uniform(35.0, 70.0, n)),
        "floor_rgb": rng.uniform(0.35, 0.65, (n, 1))
        * rng.uniform([1, 0.8, 0.6], [1, 1, 0.9], (n, 3)),
        "floor_dark": rng.uniform(0.6, 0.8, n),
        "checker": rng.uniform(0.6, 1.4, n),
        "wall_rgb": rng.uniform(0.5, 0.8, (n, 1)) + rng.uniform(-0.05, 0.05, (n, 3)),
        "count": rng.integers(synth.min_objects, synth.max_objects + 1, n),
        "cell": rng.random((n, len(_CELLS))).argsort(1)[:, :k_max],
        "shape": rng.integers(0, len(render.SHAPES), (n, k_max)),
        "own_colour": rng.random((n, k_max)) < synth.color_shape_corr,
        "any_colour": rng.integers(0, len(PALETTE), (n, k_max)),
        "tint": rng.uniform(-0.07, 0.07, (n, k_max, 3)),
        "jitter": rng.uniform(-0.15, 0.15, (n, k_max, 2)),
        "scale": rng.uniform(0.75, 1.0, (n, k_max)),
        "aspect": rng.uniform(0.0, 1.0, (n, k_max, 2)),
        "yaw": rng.uniform(0.0, 2 * np.pi, (n, k_max)),
    }
    p["shape"] = np.where(np.arange(k_max) < p["count"][:, None], p["shape"], -1)
    p["colour"] = np.where(p["own_colour"], p["shape"], p["any_colour"])
    return p


def _geometry(p: dict[str, np.ndarray]) -> render.SceneBatch:
    """Turn sampled parameters into camera-frame planes and object frames."""
    n = len(p["shape"])
    cam_rot = _rot_x(p["pitch"])  # camera -> world, [n, 3, 3]
    cam_pos = np.stack([np.zeros(n), p["cam_h"], np.zeros(n)], 1)  # [n, 3]
    to_cam = cam_rot.transpose(0, 2, 1)  # world -> camera directions

    floor_n = np.einsum("nij,j->ni", to_cam, np.array([0.0, 1.0, 0.0]))
    wall_w = np.stack([np.sin(p["wall_yaw"]), np.zeros(n), np.cos(p["wall_yaw"])], 1)
    wall_n = -np.einsum("nij,nj->ni", to_cam, wall_w)  # facing the camera

    # Placement: cell centre + jitter, lateral positions scaled to the visible width.
    z_band, u = _CELLS[p["cell"], 0], _CELLS[p["cell"], 1]  # [n, K] each
    half_w = np.tan(np.radians(HFOV_DEG) / 2) * (
        z_band * np.cos(p["pitch"])[:, None] + (p["cam_h"] * np.sin(p["pitch"]))[:, None]
    )
    spacing = np.where(z_band < 4.0, 1.0, np.where(z_band < 6.0, 0.66, 0.5)) * half_w * 0.9
    radius = np.minimum(0.5 * spacing, 0.45 * _BAND_GAP)  # cells never intersect
    x = u * half_w * 0.9 + p["jitter"][..., 0] * radius
    z = z_band + p["jitter"][..., 1] * radius
    r = p["scale"] * radius
    a0, a1 = p["aspect"][..., 0], p["aspect"][..., 1]
    shape = p["shape"]
    # Half-extents (sx, sy, sz) per shape; boxes keep their corners inside `radius`.
    sx = np.select([shape == render.BOX], [0.7 * r], r)
    sz = np.select([shape == render.BOX], [0.7 * radius * (0.6 + 0.4 * a0)], r)
    sy = np.select(
        [shape == render.BOX, shape == render.CYLINDER, shape == render.CONE],
        [radius * (0.5 + 0.6 * a1), radius * (0.6 + 0.7 * a1), radius * (0.8 + 0.7 * a1)],
        r,
    )
    scales = np.stack([sx, sy, sz], -1)  # [n, K, 3]
    centre = np.stack([x, sy, z], -1)  # objects stand on the floor

    obj_rot = _rot_y(p["yaw"])  # local -> world, [n, K, 3, 3]
    # M = S^-1 Ry^T R: camera direction -> scaled local direction.
    m = np.einsum("nkji,njl->nkil", obj_rot, cam_rot) / scales[..., None]
    origin = np.einsum("nkji,nkj->nki", obj_rot, cam_pos[:, None, :] - centre) / scales
    return render.SceneBatch(
        floor_n=floor_n.astype(np.float32),
        floor_k=(-p["cam_h"]).astype(np.float32),
        wall_n=wall_n.astype(np.float32),
        wall_k=(-p["wall_dist"]).astype(np.float32),
        obj_shape=shape,
        obj_origin=origin.astype(np.float32),
        obj_matrix=m.astype(np.float32),
    )


def _shade(
    p: dict[str, np.ndarray],
    rays: np.ndarray,
    depth: np.ndarray,
    inst: np.ndarray,
    normals: np.ndarray,
) -> np.ndarray:
    """Lambert-shaded albedo, [n, P, 3] float32 in [0, 1] before noise."""
    n, k_max = p["shape"].shape
    # Per-image albedo table: 0 floor (light squares), 1 wall, 2..K+1 objects, K+2 floor
    # (dark squares); one gather then colours every pixel.
    table = np.empty((n, k_max + 3, 3), np.float32)
    table[:, 0] = p["floor_rgb"]
    table[:, 1] = p["wall_rgb"]
    table[:, 2 : k_max + 2] = PALETTE[np.maximum(p["colour"], 0)] + p["tint"]
    table[:, k_max + 2] = p["floor_rgb"] * p["floor_dark"][:, None]

    # Floor checker from the world position of the hit: x = t D.x, z = t (R D).z.
    s = np.sin(p["pitch"]).astype(np.float32)[:, None]
    c = np.cos(p["pitch"]).astype(np.float32)[:, None]
    inv_cell = (1.0 / p["checker"]).astype(np.float32)[:, None]
    xw = depth * (rays[0] * inv_cell)
    zw = depth * (s * rays[1] + c * rays[2]) * inv_cell
    odd = (np.floor(xw) + np.floor(zw)) % 2 == 1
    idx = np.where(odd & (inst == render.FLOOR), k_max + 2, inst.astype(np.int64))
    idx += (np.arange(n) * (k_max + 3))[:, None]
    albedo = table.reshape(-1, 3)[idx]  # [n * (K+3), 3][n, P] -> [n, P, 3]

    el, az = p["light_el"], p["light_az"]
    light_w = np.stack([np.sin(az) * np.cos(el), np.sin(el), -np.cos(az) * np.cos(el)], 1)
    light_c = np.einsum("nji,nj->ni", _rot_x(p["pitch"]), light_w).astype(np.float32)  # R^T L
    lambert = np.einsum("npk,nk->np", normals, light_c)
    albedo *= (0.35 + 0.65 * np.maximum(lambert, 0.0))[..., None]
    return albedo


def generate(
    n: int,
    height: int,
    width: int,
    synth: SynthConfig,
    seed: int,
    stream: int = 0,
    desc: str | None = None,
) -> dict[str, np.ndarray]:
    """Render ``n`` scenes; deterministic in (n, size, synth, seed, stream).

    ``desc`` shows a progress bar with that label (on stderr); None renders silently.

    Returns arrays in the storage layout of :class:`~dymu.data.base.ArrayDataset`:
    ``image`` uint8 [n,H,W,3], ``semseg``/``material`` uint8 [n,H,W], ``depth`` float16
    [n,H,W], ``normals`` int8 [n,H,W,3] holding round(127 * n) (at most 0.45 degrees
    off; 8-bit normals are the norm in real datasets too), ``edges`` uint8 [n,H,W].
    """
    if synth.max_objects > MAX_OBJECTS:
        raise UserError(f"data.synth.max_objects must be <= {MAX_OBJECTS} (placement cells)")
    params = _sample(n, synth, np.random.default_rng([seed, stream]))
    rays = render.pixel_rays(height, width, HFOV_DEG)
    out = {
        "image": np.empty((n, height, width, 3), np.uint8),
        "semseg": np.empty((n, height, width), np.uint8),
        "material": np.empty((n, height, width), np.uint8),
        "depth": np.empty((n, height, width), np.float16),
        "normals": np.empty((n, height, width, 3), np.int8),
        "edges": np.empty((n, height, width), np.uint8),
    }
    bar = tqdm(total=n, desc=desc, unit="img", disable=True if desc is None else None, leave=False)
    for i, start in enumerate(range(0, n, CHUNK)):
        stop = min(start + CHUNK, n)
        p = {k: v[start:stop] for k, v in params.items()}
        m, k_max = stop - start, synth.max_objects
        depth, inst, normals = render.cast(_geometry(p), rays)
        rgb = _shade(p, rays, depth, inst, normals)
        noise_rng = np.random.default_rng([seed, stream, i + 1])
        # Uniform noise on [-sqrt(3) s, sqrt(3) s] has standard deviation s (and is 4x
        # cheaper to draw than Gaussian noise).
        noise = noise_rng.random(rgb.shape, dtype=np.float32) - np.float32(0.5)
        rgb += np.float32(2 * np.sqrt(3) * synth.noise) * noise
        # Labels by lookup: per image, instance id -> class (0 floor, 1 wall, 2 + slot).
        flat = inst + (np.arange(m) * (k_max + 2))[:, None]  # [m, P] into [m * (K+2)]
        room = np.broadcast_to(np.array([render.FLOOR, render.WALL]), (m, 2))
        semseg_of = np.concatenate([room, 2 + p["shape"]], 1).astype(np.uint8)
        material_of = np.concatenate([np.zeros_like(room), 1 + p["colour"]], 1).astype(np.uint8)
        hw = (m, height, width)
        out["semseg"][start:stop] = semseg_of.reshape(-1)[flat].reshape(hw)
        out["material"][start:stop] = material_of.reshape(-1)[flat].reshape(hw)
        # torch converts and clamps float32 with SIMD, numpy is several times slower here.
        pixels = torch.from_numpy(rgb).mul_(255.0).add_(0.5).clamp_(0.0, 255.0)
        torch.from_numpy(out["image"][start:stop]).copy_(pixels.reshape(*hw, 3))
        torch.from_numpy(out["depth"][start:stop]).copy_(torch.from_numpy(depth.reshape(hw)))
        normals_q = torch.from_numpy(normals.reshape(*hw, 3)).mul_(127.0).round_()
        torch.from_numpy(out["normals"][start:stop]).copy_(normals_q)
        out["edges"][start:stop] = render.edges_from(inst.reshape(hw), depth.reshape(hw))
        bar.update(m)
    bar.close()
    return out


def _split_sizes(synth: SynthConfig) -> dict[str, int]:
    return {"train": synth.num_train, "val": synth.num_val, "test": synth.num_test}


class SynthScenes(DatasetBuilder):
    """Builder of the embedded dataset (generated on first use, then read from the cache)."""

    info = DatasetInfo(
        name="synthscenes",
        description="procedural rooms with primitives: semseg, material, depth, normals, edges",
        tasks=TASKS,
        default_tasks=("semseg", "depth", "normals", "edges"),
        default_size=(64, 64),
        source="embedded",
        needs_root=False,
        hflip=True,
    )

    def size(self, cfg: DataConfig) -> tuple[int, int]:
        return tuple(cfg.size) if cfg.size is not None else self.info.default_size

    def cache_dir(self, cfg: DataConfig) -> Path:
        """The cache folder: named by a hash of everything that shapes the pixels."""
        key = {
            "version": GENERATOR_VERSION,
            "seed": cfg.seed,
            "size": list(self.size(cfg)),
            "synth": asdict(cfg.synth),
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        return cache_root(cfg) / f"synthscenes-{digest}"

    def prepare(self, cfg: DataConfig, progress: bool = False) -> dict[str, Any]:
        path = self.cache_dir(cfg)
        created = not (path / "meta.json").is_file()
        if created:
            height, width = self.size(cfg)
            sizes = _split_sizes(cfg.synth)
            with atomic_dir(path) as tmp:
                for stream, split in enumerate(SPLITS):
                    arrays = generate(
                        sizes[split],
                        height,
                        width,
                        cfg.synth,
                        cfg.seed,
                        stream,
                        desc=f"synthscenes {split}" if progress else None,
                    )
                    np.savez(tmp / f"{split}.npz", **arrays)
                meta = {"version": GENERATOR_VERSION, "size": [height, width], "splits": sizes}
                (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        return {
            "dataset": self.info.name,
            "cache": str(path),
            "created": created,
            "splits": _split_sizes(cfg.synth),
        }

    def load(self, cfg: DataConfig, split: str) -> ArrayDataset:
        tasks = self.info.select(cfg.tasks)
        self.prepare(cfg)
        with np.load(self.cache_dir(cfg) / f"{split}.npz", allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in ["image", *(t.name for t in tasks)]}
        return ArrayDataset(self.info, split, tasks, arrays)


DATASETS.register("synthscenes")(SynthScenes())
