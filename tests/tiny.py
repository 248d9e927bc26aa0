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
    "stage1.steps=6",
    "stage1.batch_size=4",
    "stage2.steps=4",
    "stage2.batch_size=4",
    "evaluate.preferences=3",
    "evaluate.flops_samples=5",
    "evaluate.batch_size=8",
]
