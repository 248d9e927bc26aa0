"""Batched ray casting of primitive scenes: the geometry behind ``synthscenes``.

Everything happens in camera coordinates (x right, y up, z forward) with one ray per
pixel, ``D = (u, v, 1)``: because ``D.z = 1`` the ray parameter ``t`` *is* the z-depth.
Objects are unit primitives in a local frame; a per-object 3x3 matrix ``M`` maps camera
directions into that (scaled, rotated) frame, so every object of a batch is intersected
with one GEMM and a few elementwise numpy ops, and normals come back as ``M^T grad``.
Depth, normals, segmentation and edges are thus all read off the same geometry.

Pass 1 keeps a z-buffer of the nearest hit per pixel; pass 2 computes normals only for
the pixels each object won. There is no Python loop over pixels or images, only over
(shape, rank-within-image) groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPHERE, BOX, CYLINDER, CONE = 0, 1, 2, 3
SHAPES = ("sphere", "box", "cylinder", "cone")
FLOOR, WALL = 0, 1
"""Instance/class ids of the room; object slot k gets instance id ``2 + k``."""


@dataclass
class SceneBatch:
    """Geometry of B scenes with up to K objects each (float32 arrays, camera frame).

    Attributes:
        floor_n, wall_n: [B, 3] unit plane normals in the camera frame (facing the camera).
        floor_k, wall_k: [B] plane offsets: points p on the plane satisfy ``n . p = k``.
        obj_shape: [B, K] shape id, -1 for an empty slot.
        obj_origin: [B, K, 3] camera origin in each object's scaled local frame.
        obj_matrix: [B, K, 3, 3] maps camera directions to the local frame.
    """

    floor_n: np.ndarray
    floor_k: np.ndarray
    wall_n: np.ndarray
    wall_k: np.ndarray
    obj_shape: np.ndarray
    obj_origin: np.ndarray
    obj_matrix: np.ndarray


def pixel_rays(height: int, width: int, hfov_deg: float) -> np.ndarray:
    """Ray directions [3, H*W] (row-major pixels) with z = 1, for a pinhole camera."""
    f = (width / 2.0) / np.tan(np.radians(hfov_deg) / 2.0)
    jj, ii = np.meshgrid(np.arange(width), np.arange(height))
    u = (jj + 0.5 - width / 2.0) / f
    v = -(ii + 0.5 - height / 2.0) / f  # image rows grow downwards, camera y upwards
    d = np.stack([u, v, np.ones_like(u)]).reshape(3, -1)  # [3, H, W] -> [3, P]
    return d.astype(np.float32)


def _plane_t(n: np.ndarray, k: np.ndarray, rays: np.ndarray) -> np.ndarray:
    """Ray parameter of plane hits [B, P]; inf where the ray runs away from the plane."""
    denom = n @ rays  # [B, 3] @ [3, P] -> [B, P]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = k[:, None] / denom
    return np.where(t > 0, t, np.float32(np.inf)).astype(np.float32)


def _local_dirs(matrix: np.ndarray, rays: np.ndarray) -> np.ndarray:
    """Directions in local frames: [n, 3, 3] x [3, P] -> [n, 3, P] as one GEMM."""
    n = matrix.shape[0]
    return (matrix.reshape(n * 3, 3) @ rays).reshape(n, 3, -1)


def _nearest(t1: np.ndarray, ok1: np.ndarray, t2: np.ndarray, ok2: np.ndarray) -> np.ndarray:
    inf = np.float32(np.inf)
    return np.minimum(np.where(ok1, t1, inf), np.where(ok2, t2, inf))


def _hit_sphere(o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Unit sphere: |o + t d|^2 = 1, nearest root."""
    dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
    ox, oy, oz = (o[:, i, None] for i in range(3))
    a = dx * dx + dy * dy + dz * dz
    b = ox * dx + oy * dy + oz * dz
    c = (o * o).sum(1)[:, None] - 1.0
    disc = b * b - a * c
    with np.errstate(invalid="ignore"):
        t = (-b - np.sqrt(disc)) / a
    return np.where((disc >= 0) & (t > 0), t, np.float32(np.inf))


def _hit_box(o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Cube [-1, 1]^3 by the slab method."""
    tnear = np.full(d.shape[::2], -np.inf, dtype=np.float32)
    tfar = np.full(d.shape[::2], np.inf, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        for axis in range(3):
            inv = 1.0 / d[:, axis]
            oa = o[:, axis, None]
            t1 = (-1.0 - oa) * inv
            t2 = (1.0 - oa) * inv
            tnear = np.fmax(tnear, np.fmin(t1, t2))
            tfar = np.fmin(tfar, np.fmax(t1, t2))
    return np.where((tnear <= tfar) & (tnear > 0), tnear, np.float32(np.inf))


def _hit_cylinder(o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Vertical unit cylinder x^2 + z^2 = 1, |y| <= 1, with its top cap (the bottom
    cap rests on the floor and cannot be seen)."""
    dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
    ox, oy, oz = (o[:, i, None] for i in range(3))
    a = dx * dx + dz * dz
    b = ox * dx + oz * dz
    c = ox * ox + oz * oz - 1.0
    disc = b * b - a * c
    with np.errstate(divide="ignore", invalid="ignore"):
        ts = (-b - np.sqrt(disc)) / a
        tc = (1.0 - oy) / dy
    ys = oy + ts * dy
    xc = ox + tc * dx
    zc = oz + tc * dz
    side = (disc >= 0) & (ts > 0) & (np.abs(ys) <= 1.0)
    cap = (tc > 0) & (xc * xc + zc * zc <= 1.0)
    return _nearest(ts, side, tc, cap)


def _hit_cone(o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Cone with apex (0, 1, 0) and base radius 1 at y = -1: x^2 + z^2 = ((1 - y) / 2)^2."""
    dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
    ox, oy, oz = (o[:, i, None] for i in range(3))
    w0 = 1.0 - oy  # (1 - y) along the ray is w0 - t * dy
    a = dx * dx + dz * dz - 0.25 * dy * dy
    b = ox * dx + oz * dz + 0.25 * w0 * dy
    c = ox * ox + oz * oz - 0.25 * w0 * w0
    disc = b * b - a * c
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.sqrt(disc)
        t1 = (-b - s) / a
        t2 = (-b + s) / a
    y1 = oy + t1 * dy
    y2 = oy + t2 * dy
    ok1 = (disc >= 0) & (t1 > 0) & (y1 >= -1.0) & (y1 <= 1.0)
    ok2 = (disc >= 0) & (t2 > 0) & (y2 >= -1.0) & (y2 <= 1.0)
    return _nearest(t1, ok1, t2, ok2)


_HIT = {SPHERE: _hit_sphere, BOX: _hit_box, CYLINDER: _hit_cylinder, CONE: _hit_cone}


def _local_normal(shape: int, p: np.ndarray) -> np.ndarray:
    """Gradient of the primitive's implicit function at local points p [n, 3]."""
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    if shape == SPHERE:
        return p
    if shape == BOX:  # the face is the axis where |p| is largest (= 1 on the surface)
        axis = np.abs(p).argmax(1)
        g = np.zeros_like(p)
        g[np.arange(len(p)), axis] = np.sign(p[np.arange(len(p)), axis])
        return g
    if shape == CYLINDER:  # on the cap |y| = 1 >= r; on the side r = 1 >= |y|
        r = np.sqrt(x * x + z * z)
        cap = np.abs(y) > r
        return np.stack([np.where(cap, 0, x), np.where(cap, np.sign(y), 0), np.where(cap, 0, z)], 1)
    if shape == CONE:
        return np.stack([x, 0.25 * (1.0 - y), z], 1)
    raise ValueError(f"unknown shape id {shape}")


def cast(scenes: SceneBatch, rays: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ray cast B scenes.

    Args:
        scenes: the batch geometry.
        rays: [3, P] pixel rays from :func:`pixel_rays`.

    Returns:
        depth [B, P] (z-depth), instance ids [B, P] (0 floor, 1 wall, 2 + k object slot k)
        as int16, and unit camera-frame normals [B, P, 3] facing the camera.
    """
    t_floor = _plane_t(scenes.floor_n, scenes.floor_k, rays)
    t_wall = _plane_t(scenes.wall_n, scenes.wall_k, rays)
    depth = np.minimum(t_floor, t_wall)
    inst = np.where(t_wall < t_floor, WALL, FLOOR).astype(np.int16)
    n_img, n_slots = scenes.obj_shape.shape

    # Pass 1: z-buffer. Group objects by (shape, slot): each group touches each image once.
    for slot in range(n_slots):
        for shape in _HIT:
            rows = np.nonzero(scenes.obj_shape[:, slot] == shape)[0]
            if len(rows) == 0:
                continue
            o = scenes.obj_origin[rows, slot]
            d = _local_dirs(scenes.obj_matrix[rows, slot], rays)
            t = _HIT[shape](o, d)
            cur_t, cur_i = depth[rows], inst[rows]
            closer = t < cur_t
            np.copyto(cur_t, t, where=closer)
            cur_i[closer] = 2 + slot
            depth[rows], inst[rows] = cur_t, cur_i

    # Pass 2: normals. Room planes for all pixels, then object pixels grouped by shape.
    normals = np.empty((n_img, rays.shape[1], 3), np.float32)  # [B, P, 3]
    normals[:] = scenes.floor_n[:, None, :]
    np.copyto(normals, scenes.wall_n[:, None, :], where=(inst == WALL)[..., None])
    img, pix = np.nonzero(inst >= 2)  # every object pixel, as (image, pixel) pairs
    obj = img * n_slots + (inst[img, pix] - 2)  # flat object index per pixel
    shape_of = scenes.obj_shape.reshape(-1)[obj]
    matrices = scenes.obj_matrix.reshape(-1, 9)  # [B * K, 9], row-major 3x3
    origins = scenes.obj_origin.reshape(-1, 3)
    for shape in _HIT:
        sel = np.nonzero(shape_of == shape)[0]
        if len(sel) == 0:
            continue
        k, b, q = obj[sel], img[sel], pix[sel]
        m = matrices[k].T  # [9, n]: m[3 * j + i] is row j, column i of each pixel's M
        t = depth[b, q]
        d = rays[:, q]  # [3, n]
        o = origins[k].T  # [3, n]
        p_loc = [
            o[j] + t * (m[3 * j] * d[0] + m[3 * j + 1] * d[1] + m[3 * j + 2] * d[2])
            for j in range(3)
        ]
        g = _local_normal(shape, np.stack(p_loc, 1)).T  # [3, n] gradients in local frames
        n_cam = np.stack([m[i] * g[0] + m[3 + i] * g[1] + m[6 + i] * g[2] for i in range(3)], 1)
        n_cam /= np.sqrt((n_cam * n_cam).sum(1, keepdims=True)) + 1e-12  # M^T grad, unit
        normals[b, q] = n_cam
    return depth, inst, normals


def edges_from(inst: np.ndarray, depth: np.ndarray, rel_jump: float = 0.08) -> np.ndarray:
    """Edge map [B, H, W] (uint8 0/1) from instance changes and depth discontinuities.

    A pair of 4-neighbours is an edge when their instance ids differ or their depths
    differ by more than ``rel_jump`` of the nearer one; both pixels of the pair are marked.
    """

    def pair_edges(a_i, b_i, a_d, b_d):
        jump = np.abs(a_d - b_d) > rel_jump * np.minimum(a_d, b_d)
        return (a_i != b_i) | jump

    e = np.zeros(inst.shape, dtype=bool)
    h = pair_edges(inst[:, :, 1:], inst[:, :, :-1], depth[:, :, 1:], depth[:, :, :-1])
    v = pair_edges(inst[:, 1:], inst[:, :-1], depth[:, 1:], depth[:, :-1])
    e[:, :, 1:] |= h
    e[:, :, :-1] |= h
    e[:, 1:] |= v
    e[:, :-1] |= v
    return e.astype(np.uint8)
