"""Config overrides for a tiny run (seconds on one CPU thread), shared by end-to-end tests.

Later overrides win, so a test extends the list: ``[*TINY, "stage1.steps=40"]``.
"""

TINY = [
    "run.device=cpu",
    "data.size=[32,32]",
    "data.tasks=[semseg,depth,normals]",
    "data.synth.num_train=24",
    "data.synth.num_val=8",
    "data.synth.num_test=8",
    "model.width=4",
    "stage0.epochs=1",
    "stage0.batch_size=8",
    "affinity.images=8",
    "affinity.batches=2",
    "affinity.batch_size=4",
    "joint.steps=4",
    "joint.batch_size=4",
    "stage1.steps=6",
    "stage1.batch_size=4",
    "stage2.steps=4",
    "stage2.batch_size=4",
    "evaluate.preferences=3",
    "evaluate.flops_samples=5",
    "evaluate.batch_size=8",
]


def stop_after_first_checkpoint(monkeypatch, module, call, stage: str | None = None) -> None:
    """Run ``call()`` until ``module.save_checkpoint`` has written once (a checkpoint of
    ``stage``, e.g. ``"stage1"``, when given), then stop it as a Ctrl-C would;
    ``module.save_checkpoint`` is the real one again afterwards. The step-based stages save
    through :mod:`dymu.train.engine`, stage 0 through :mod:`dymu.train.stage0`."""
    import pytest

    real_save = module.save_checkpoint

    def save_then_die(path, *args, **kwargs):
        real_save(path, *args, **kwargs)
        if stage is None or path.parent.name == stage:
            raise KeyboardInterrupt

    monkeypatch.setattr(module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        call()
    monkeypatch.setattr(module, "save_checkpoint", real_save)


def randomise_batchnorms(model, seed: int) -> None:
    """Non-trivial BN affine parameters and running statistics, so that folding them into
    convolutions is really tested."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(0.2 * torch.randn(c, generator=gen))
                m.running_mean.copy_(0.5 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=gen))


def mobilenet_anchor(specs):
    """An anchor of MobileNetV2 streams at width 0.25 with light DeepLabv3+ heads (the model
    config has no width multiplier, so it is assembled by hand), BNs randomised, eval mode."""
    import torch

    from dymu.models.anchor import Anchor
    from dymu.models.backbones import build_backbone
    from dymu.models.heads import build_head
    from dymu.tasks import build_task

    tasks = [build_task(s) for s in specs]
    streams, heads = [], {}
    for task in tasks:
        torch.manual_seed(0)
        backbone = build_backbone("mobilenetv2", width_mult=0.25)
        low = backbone.low_level_layer
        heads[task.name] = build_head(
            "deeplabv3plus_light",
            in_channels=backbone.out_channels[-1],
            low_channels=backbone.out_channels[low],
            low_layer=low,
            out_channels=task.out_channels,
        )
        streams.append(backbone)
    anchor = Anchor(tasks, streams, heads)
    randomise_batchnorms(anchor, seed=1)
    return anchor.eval()


def load_script(path, name: str):
    """A script that is not part of a package (a benchmark, the bundle's runtime) imported
    by path as module ``name``; registered in ``sys.modules``, which dataclasses and typing
    lookups inside it need."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
