"""Writers of tiny copies of real datasets, in exactly their on-disk formats.

Each writer fills a folder (a pytest ``tmp_path``) with a few samples laid out, named and
encoded as the real release is, and returns the arrays it wrote so tests can check that
values survive loading. Sizes are tiny so the loaders' tests run in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def _unit_normals(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """float32 [h, w, 3] unit vectors with an invalid (all-zero) top-left 2x2 block."""
    n = rng.normal(size=(h, w, 3)).astype(np.float32)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    n[:2, :2] = 0.0
    return n


# --------------------------------------------------------------------------- NYU-v2


def write_nyuv2_npy(
    root: Path, n_train: int = 3, n_val: int = 2, h: int = 16, w: int = 24, seed: int = 0
) -> dict[str, dict[int, dict[str, np.ndarray]]]:
    """The MTAN/LibMTL preprocessed layout: ``root/{train,val}/{image,label,depth,normal}``.

    Image float32 [h, w, 3] in [0, 1]; label float32 [h, w] with classes 0..12 and -1;
    depth float32 [h, w, 1] with zeros; normal float32 [h, w, 3] unit, zeros invalid.
    Returns ``{source: {index: {"image"|"label"|"depth"|"normal": array}}}``.
    """
    rng = np.random.default_rng(seed)
    written: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for source, n in (("train", n_train), ("val", n_val)):
        written[source] = {}
        for sub in ("image", "label", "depth", "normal"):
            (root / source / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            label = rng.integers(0, 13, size=(h, w)).astype(np.float32)
            label[0, :] = -1.0
            depth = rng.uniform(0.5, 10.0, size=(h, w, 1)).astype(np.float32)
            depth[-1, :] = 0.0
            arrays = {
                "image": rng.uniform(0.0, 1.0, size=(h, w, 3)).astype(np.float32),
                "label": label,
                "depth": depth,
                "normal": _unit_normals(rng, h, w),
            }
            for sub, array in arrays.items():
                np.save(root / source / sub / f"{i}.npy", array)
            written[source][i] = arrays
    return written


def write_nyud_mt(
    root: Path,
    train_ids: tuple[str, ...] = ("0001", "0002", "0003"),
    val_ids: tuple[str, ...] = ("0004", "0005"),
    h: int = 12,
    w: int = 16,
    seed: int = 0,
) -> dict[str, dict[str, np.ndarray]]:
    """The NYUD_MT layout: images/, segmentation/, depth/, normals/, edge/, gt_sets/.

    Segmentation png (grey) holds 0 = void and 1..40; one pixel holds 255. Returns
    ``{id: {"image"|"segmentation"|"depth"|"normals"|"edge": array}}``.
    """
    rng = np.random.default_rng(seed)
    for sub in ("images", "segmentation", "depth", "normals", "edge", "gt_sets"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    written = {}
    for sid in (*train_ids, *val_ids):
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        seg = rng.integers(1, 41, size=(h, w)).astype(np.uint8)
        seg[0, :] = 0
        seg[1, 0] = 255
        depth = rng.uniform(0.5, 10.0, size=(h, w)).astype(np.float32)
        depth[-1, :] = 0.0
        edge = (rng.uniform(size=(h, w)) > 0.8).astype(np.float32)
        normals = _unit_normals(rng, h, w)
        Image.fromarray(image).save(root / "images" / f"{sid}.jpg", quality=95)
        Image.fromarray(seg).save(root / "segmentation" / f"{sid}.png")
        np.save(root / "depth" / f"{sid}.npy", depth)
        np.save(root / "normals" / f"{sid}.npy", normals)
        np.save(root / "edge" / f"{sid}.npy", edge)
        written[sid] = {
            "image": image,
            "segmentation": seg,
            "depth": depth,
            "normals": normals,
            "edge": edge,
        }
    (root / "gt_sets" / "train.txt").write_text("".join(f"{s}\n" for s in train_ids))
    (root / "gt_sets" / "val.txt").write_text("".join(f"{s}\n" for s in val_ids))
    return written


# --------------------------------------------------------------------------- PASCAL


def part_anno(imname: str, objects: list[tuple[str, int, np.ndarray, list]]) -> np.ndarray:
    """A PASCAL-Part ``anno`` struct as scipy writes MATLAB structs.

    ``objects`` holds ``(class, class_ind, mask, [(part_name, mask), ...])``; loadmat
    gives back ``anno[0, 0]["objects"][0, i]["parts"][0, j]["part_name"]`` etc., the
    layout of the real ``human_parts/<id>.mat`` files (fields imname, objects; class,
    class_ind, mask, parts; part_name, mask).
    """
    part_dt = [("part_name", "O"), ("mask", "O")]
    obj_dt = [("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")]
    objs = np.zeros((1, len(objects)), dtype=obj_dt)
    for i, (cls, ind, mask, parts) in enumerate(objects):
        if parts:
            arr = np.zeros((1, len(parts)), dtype=part_dt)
            for j, (name, pmask) in enumerate(parts):
                arr[0, j] = (name, pmask.astype(np.uint8))
        else:
            arr = np.zeros((0, 0))
        objs[0, i] = (cls, np.array([[float(ind)]]), mask.astype(np.uint8), arr)
    anno = np.zeros((1, 1), dtype=[("imname", "O"), ("objects", "O")])
    anno[0, 0] = (imname, objs)
    return anno


def write_pascal_context(
    root: Path,
    train_ids: tuple[str, ...] = ("2008_000002", "2008_000003", "2008_000007"),
    val_ids: tuple[str, ...] = ("2008_000009", "2008_000010"),
    h: int = 10,
    w: int = 14,
    seed: int = 0,
) -> dict[str, dict[str, np.ndarray]]:
    """The PASCAL_MT layout of ASTMT / Multi-Task-Learning-PyTorch.

    The first id's semseg png is in ``semseg/VOC12`` (a palette png, like VOC), the rest
    in ``semseg/pascal-context``. The first id has a person with head/torso/arm parts
    plus a person without parts and a dog; the others have no person. LabelMap holds a
    left half of class 440 (wall, valid for normals) and a right half of class 360 (sky,
    not valid). Returns ``{id: {"image"|"semseg"|"parts"|"sal"|"normals"|"labels": ...}}``.
    """
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    for sub in (
        "JPEGImages",
        "ImageSets/Context",
        "semseg/VOC12",
        "semseg/pascal-context",
        "human_parts",
        "sal_distill",
        "normals_distill",
        "pascal-context/trainval",
    ):
        (root / sub).mkdir(parents=True, exist_ok=True)
    written = {}
    for k, sid in enumerate((*train_ids, *val_ids)):
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "JPEGImages" / f"{sid}.jpg", quality=95)

        semseg = rng.integers(0, 21, size=(h, w)).astype(np.uint8)
        semseg[0, :] = 255
        if k == 0:
            png = Image.new("P", (w, h))
            png.putdata(semseg.ravel().tolist())  # palette indices = class ids, as in VOC
            png.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
            png.save(root / "semseg" / "VOC12" / f"{sid}.png")
        else:
            Image.fromarray(semseg).save(root / "semseg" / "pascal-context" / f"{sid}.png")

        objects = [("dog", 12, np.zeros((h, w)), [])]
        if k == 0:
            head = np.zeros((h, w), bool)
            head[1:3, 1:3] = True
            torso = np.zeros((h, w), bool)
            torso[3:6, 1:3] = True
            arm = np.zeros((h, w), bool)
            arm[3:5, 3] = True
            person = head | torso | arm
            objects = [
                ("person", 15, person, [("hair", head), ("torso", torso), ("luarm", arm)]),
                ("person", 15, np.ones((h, w)), []),
                ("dog", 12, np.zeros((h, w)), []),
            ]
            parts = np.zeros((h, w), np.int64)
            parts[head] = 1
            parts[torso] = 2
            parts[arm] = 3
        else:
            parts = np.full((h, w), -1, np.int64)
        savemat(root / "human_parts" / f"{sid}.mat", {"anno": part_anno(sid, objects)})

        sal = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
        Image.fromarray(sal).save(root / "sal_distill" / f"{sid}.png")

        normals = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(normals).save(root / "normals_distill" / f"{sid}.png")

        labels = np.full((h, w), 440, dtype=np.uint16)
        labels[:, w // 2 :] = 360
        savemat(root / "pascal-context" / "trainval" / f"{sid}.mat", {"LabelMap": labels})

        written[sid] = {
            "image": image,
            "semseg": semseg,
            "parts": parts,
            "sal": sal,
            "normals": normals,
            "labels": labels,
        }
    (root / "ImageSets" / "Context" / "train.txt").write_text("".join(f"{s}\n" for s in train_ids))
    (root / "ImageSets" / "Context" / "val.txt").write_text("".join(f"{s}\n" for s in val_ids))
    return written
