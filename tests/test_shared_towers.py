"""The shared-backbone model and the small self-auxiliary towers (METHOD.md 4)."""

from __future__ import annotations

import pytest
import torch
from tiny import TINY

import dymu.train.stage0 as stage0
from dymu.compile.materialize import materialize
from dymu.config import load_config
from dymu.data import get_builder
from dymu.errors import UserError
from dymu.models.anchor import build_anchor
from dymu.models.flops import count_flops, count_params
from dymu.models.shared import build_shared_net
from dymu.models.towers import AuxTowers, SmallTower, tower_hidden
from dymu.space.tree import TreeSpec
from dymu.tasks import build_task


def _specs(cfg):
    return get_builder("synthscenes").info.select(cfg.data.tasks)


def test_shared_net_is_one_anchor_stream_with_every_head():
    cfg = load_config(None, TINY)
    specs = _specs(cfg)
    anchor = build_anchor(cfg.model, specs, seed=3)
    net = build_shared_net(cfg.model, specs, seed=3).eval()
    x = torch.rand(2, 3, 32, 32)
    out = net(x)
    assert list(out) == ["semseg", "depth", "normals"]
    assert out["semseg"].shape == (2, 6, 32, 32) and out["normals"].shape == (2, 3, 32, 32)
    # Same initial weights as the anchor's first stream and its heads.
    for k, v in anchor.streams[0].state_dict().items():
        assert torch.equal(v, net.backbone.state_dict()[k])
    # FLOPs: the anchor minus the streams it no longer runs.
    one = torch.zeros(1, 3, 32, 32)
    stream = count_flops(anchor.streams[0], one)
    assert count_flops(net, one) == count_flops(anchor, one) - (len(specs) - 1) * stream


def test_tower_width_follows_the_size_ratio():
    # hidden tower: C*h + 2h + h*o + o parameters; C=32, o=6: 40 per hidden channel + 6.
    assert tower_hidden(32, 6, 6 + 40 * 5) == 5
    assert tower_hidden(32, 6, 6 + 40 * 5 - 1) == 4
    assert tower_hidden(32, 6, 30) == 0  # too small for one hidden channel: linear
    hidden = SmallTower(in_channels=32, out_channels=6, hidden=5, dense=True)
    assert count_params(hidden) == 6 + 40 * 5
    linear = SmallTower(in_channels=32, out_channels=6, hidden=0, dense=True)
    assert count_params(linear) == 32 * 6 + 6
    per_image = SmallTower(in_channels=32, out_channels=10, hidden=0, dense=False)
    assert per_image(torch.rand(3, 32, 4, 4), (32, 32)).shape == (3, 10)


def test_aux_towers_stay_within_size_and_weight_their_loss_by_gamma():
    cfg = load_config(None, TINY)
    specs = _specs(cfg)
    net = build_shared_net(cfg.model, specs)
    channels = net.backbone.out_channels[-1]
    towers = AuxTowers(net.tasks, in_channels=channels, heads=net.heads, gamma=0.5, size=0.2)
    for name, ratio in towers.ratios.items():
        assert ratio <= 0.2 or isinstance(towers.towers[name].body, torch.nn.Conv2d)
    feats = torch.rand(2, channels, 4, 4)
    batch = {
        "semseg": torch.randint(0, 6, (2, 32, 32)),
        "depth": torch.rand(2, 1, 32, 32) + 0.5,
        "normals": torch.nn.functional.normalize(torch.randn(2, 3, 32, 32), dim=1),
    }
    losses = towers.losses({t: feats for t in towers.towers}, (32, 32), batch)
    out = towers({t: feats for t in towers.towers}, (32, 32))
    for t in net.tasks:
        assert torch.allclose(losses[t.name], 0.5 * t.loss(out[t.name], batch[t.name]))
    with pytest.raises(UserError, match="gamma"):
        AuxTowers(net.tasks, in_channels=channels, heads=net.heads, gamma=0.0, size=0.2)


def test_stage0_towers_train_the_streams_but_never_reach_the_anchor(tmp_path):
    base = [*TINY, f"data.cache_dir={tmp_path / 'cache'}"]
    plain = load_config(None, base)
    with_towers = load_config(None, [*base, "stage0.towers.gamma=1.0", "stage0.towers.size=0.2"])
    # Towers off are no input of stage 0: their size then changes nothing.
    resized = load_config(None, [*base, "stage0.towers.size=0.3"])
    assert stage0.stage0_hash(plain) == stage0.stage0_hash(resized)
    assert stage0.stage0_hash(plain) != stage0.stage0_hash(with_towers)
    a, _ = stage0.train_stage0(plain, tmp_path / "plain")
    b, _ = stage0.train_stage0(with_towers, tmp_path / "towers")
    assert a.state_dict().keys() == b.state_dict().keys()
    assert not any("tower" in k for k in b.state_dict())
    # The auxiliary loss changed the streams' training...
    assert not torch.equal(a.streams[0].layers[0][0].weight, b.streams[0].layers[0][0].weight)
    # ...and a materialized tree of either anchor has the same parameters and FLOPs.
    tree = TreeSpec.no_sharing(3, a.num_layers)
    ma, mb = materialize(a.eval(), tree), materialize(b.eval(), tree)
    assert count_params(ma) == count_params(mb)
    one = torch.zeros(1, 3, 32, 32)
    assert count_flops(ma, one) == count_flops(mb, one)


def test_tower_config_is_checked():
    with pytest.raises(UserError, match=r"stage0\.towers\.size"):
        load_config(None, ["stage0.towers.size=1.5"])
    with pytest.raises(UserError, match=r"baselines\.methods"):
        load_config(None, ["baselines.methods=[static,nope]"])
    # A list override given as YAML is read as a list, not kept as text.
    cfg = load_config(None, ["baselines.methods=[static,phn_bn]"])
    assert cfg.baselines.methods == ["static", "phn_bn"]


def test_shared_net_heads_read_the_shared_features():
    cfg = load_config(None, TINY)
    specs = _specs(cfg)
    net = build_shared_net(cfg.model, specs).eval()
    x = torch.rand(1, 3, 32, 32)
    feats = net.features(x)
    assert len(feats) == net.backbone.num_layers
    direct = net(x)
    via = net.heads_on(feats, (32, 32))
    for t in [build_task(s) for s in specs]:
        assert torch.equal(direct[t.name], via[t.name])
