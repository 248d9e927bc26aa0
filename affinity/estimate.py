"""Run a trained anchor and measure task affinity with the configured estimator.

- ``rsa`` (METHOD.md 1.3): the features of K training images at every layer of every
  stream, compared by representation similarity analysis.
- ``grad_cosine``: the anchor's streams share no parameters, so the gradients are taken on
  a shared trunk: the all-sharing tree whose layers 0..L-2 are stream ``s``'s, feeding every
  task's last layer and head. Cosine similarity of the tasks' gradients per trunk layer,
  averaged over batches and over every choice of trunk ``s`` (so no stream is favoured).
- ``lookahead`` (TAG, Fifty et al. 2021): on the same shared trunks, a virtual SGD step
  with task i's gradient and the relative change of task j's loss.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from dymu.affinity.gradients import (
    RunningMean,
    gradient_cosine,
    lookahead_affinity,
    virtual_step_losses,
)
from dymu.affinity.result import AffinityResult
from dymu.affinity.rsa import rsa
from dymu.config import AffinityConfig
from dymu.data.base import MultiTaskDataset
from dymu.data.batches import iterate, to_device
from dymu.models.anchor import Anchor
from dymu.space.tree import TreeSpec
from dymu.space.treenet import TreeNet


def _subset(ds: MultiTaskDataset, k: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(len(ds), min(k, len(ds)), replace=False))


@torch.no_grad()
def rsa_affinity(
    anchor: Anchor, ds: MultiTaskDataset, cfg: AffinityConfig, device: torch.device, seed: int = 0
) -> AffinityResult:
    """RSA on the features of ``cfg.images`` training images (all layers, all streams)."""
    anchor.eval()
    rows = _subset(ds, cfg.images, seed)
    feats: list[list[list[Tensor]]] = [
        [[] for _ in anchor.streams] for _ in range(anchor.num_layers)
    ]
    for start in range(0, len(rows), cfg.batch_size):
        image = torch.stack([ds[i]["image"] for i in rows[start : start + cfg.batch_size]])
        image = image.to(device)
        for j, stream in enumerate(anchor.streams):
            for layer, f in enumerate(stream(image)):
                feats[layer][j].append(f.flatten(1).float().cpu())  # [b, C*H*W]
    features = [[torch.cat(parts) for parts in layer] for layer in feats]  # [L][N] of [K, D]
    per_layer, mean = rsa(features)
    return AffinityResult(
        tasks=anchor.task_names,
        method="rsa",
        mean=mean.tolist(),
        per_layer=per_layer.tolist(),
        meta={"images": len(rows), "layers": anchor.num_layers},
    )


def _trunk_params(anchor: Anchor, trunk: int) -> list[list[torch.nn.Parameter]]:
    """Parameters of the trunk stream's layers 0..L-2 (the layers all tasks share)."""
    layers = anchor.streams[trunk].layers
    return [list(layers[i].parameters()) for i in range(len(layers) - 1)]


def _task_losses(net: TreeNet, anchor: Anchor, batch: dict[str, Tensor]) -> list[Tensor]:
    out = net(batch["image"])
    return [t.loss(out[t.name], batch[t.name]) for t in anchor.tasks]


@torch.no_grad()
def _losses_with(
    net: TreeNet,
    anchor: Anchor,
    params: Sequence[torch.nn.Parameter],
    batch: dict[str, Tensor],
    values: Sequence[Tensor],
) -> Tensor:
    """Every task's loss [N] with ``params`` temporarily set to ``values`` (then restored)."""
    saved = [p.detach().clone() for p in params]
    for p, v in zip(params, values, strict=True):
        p.copy_(v)
    out = torch.stack(_task_losses(net, anchor, batch))
    for p, v in zip(params, saved, strict=True):
        p.copy_(v)
    return out


def gradient_affinity(
    anchor: Anchor,
    ds: MultiTaskDataset,
    cfg: AffinityConfig,
    device: torch.device,
    method: str,
    seed: int = 0,
) -> AffinityResult:
    """``grad_cosine`` (per trunk layer) or ``lookahead`` on all-sharing trunks."""
    anchor.eval()  # running statistics stay as trained
    n, num_layers = len(anchor.tasks), anchor.num_layers
    average = RunningMean()
    total = n * cfg.batches
    bar = tqdm(total=total, desc=f"affinity ({method})", unit="batch", leave=False)
    for trunk in range(n):
        net = TreeNet(anchor, TreeSpec.all_sharing(n, num_layers, trunk=trunk))
        groups = _trunk_params(anchor, trunk)
        flat: Sequence[torch.nn.Parameter] = [p for g in groups for p in g]
        batches = iterate(ds, cfg.batch_size, shuffle=True, seed=seed + trunk, drop_last=True)
        for _, batch in zip(range(cfg.batches), batches, strict=False):
            batch = to_device(batch, device)
            losses = _task_losses(net, anchor, batch)
            grads = [torch.autograd.grad(loss, flat, retain_graph=True) for loss in losses]
            if method == "grad_cosine":
                per_layer, offset = [], 0
                for g in groups:
                    k = len(g)
                    stacked = torch.stack(
                        [torch.cat([x.flatten() for x in gr[offset : offset + k]]) for gr in grads]
                    )  # [N, P_l]
                    per_layer.append(gradient_cosine(stacked))
                    offset += k
                average.update(torch.stack(per_layer))  # [L-1, N, N]
            else:
                before = torch.stack([loss.detach() for loss in losses])  # [N]

                loss_fn = functools.partial(_losses_with, net, anchor, flat, batch)
                after = virtual_step_losses(
                    [p.detach() for p in flat], [list(g) for g in grads], loss_fn, cfg.lookahead_lr
                )
                average.update(lookahead_affinity(before, after, cfg.lookahead_lr)[None])  # [1,N,N]
            bar.update(1)
    bar.close()
    per_layer = average.value()  # [L-1, N, N] per trunk layer, or [1, N, N] for lookahead
    meta = {"batches": cfg.batches, "batch_size": cfg.batch_size, "trunks": n}
    if method == "lookahead":  # TAG gives one matrix for the whole trunk, not one per layer
        meta["lookahead_lr"] = cfg.lookahead_lr
        return AffinityResult(anchor.task_names, method, per_layer[0].tolist(), [], meta)
    return AffinityResult(
        tasks=anchor.task_names,
        method=method,
        mean=per_layer.mean(0).tolist(),
        per_layer=per_layer.tolist(),
        meta=meta,
    )


def estimate_affinity(
    anchor: Anchor, ds: MultiTaskDataset, cfg: AffinityConfig, device: torch.device, seed: int = 0
) -> AffinityResult:
    """The affinity of ``anchor``'s tasks by ``cfg.method``."""
    if cfg.method == "rsa":
        return rsa_affinity(anchor, ds, cfg, device, seed)
    return gradient_affinity(anchor, ds, cfg, device, cfg.method, seed)
