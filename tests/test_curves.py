"""Training logs: a resumed stage keeps the steps its checkpoint covers, once each."""

from __future__ import annotations

import json

from dymu.train.curves import StageLog, curves_png, read_log


def test_a_resumed_log_keeps_earlier_steps_and_drops_later_ones(tmp_path):
    log = StageLog(tmp_path, "stage1")
    for step in (0, 10, 20, 30):
        log.log(step, loss=1.0 / (step + 1), lr=1e-3)
    log.close()
    with (tmp_path / "logs" / "stage1.jsonl").open("a") as f:
        f.write('{"step": 40, "loss": 0.0')  # a line cut short by a kill
    assert [r["step"] for r in read_log(tmp_path / "logs" / "stage1.jsonl")] == [0, 10, 20, 30]
    resumed = StageLog(tmp_path, "stage1", first=20)  # the checkpoint covers steps 0..19
    resumed.log(20, loss=0.5, lr=1e-3)
    resumed.close()
    rows = read_log(tmp_path / "logs" / "stage1.jsonl")
    assert [r["step"] for r in rows] == [0, 10, 20]
    assert rows[2] == {"step": 20, "loss": 0.5, "lr": 1e-3}
    fresh = StageLog(tmp_path, "stage1")  # a new run of the stage starts a new log
    fresh.close()
    assert read_log(tmp_path / "logs" / "stage1.jsonl") == []


def test_other_ranks_write_nothing(tmp_path):
    log = StageLog(tmp_path, "joint", enabled=False)
    log.log(0, loss=1.0)
    log.close()
    assert not (tmp_path / "logs").exists()


def test_curves_png_has_a_panel_per_logged_stage(tmp_path):
    assert curves_png(tmp_path, tmp_path / "curves.png") is None  # nothing logged
    folder = tmp_path / "logs"
    folder.mkdir()
    for stage in ("stage0", "stage1"):
        rows = [{"step": s, "loss": 2.0 - s / 10, "lr": 0.001} for s in range(0, 10, 2)]
        (folder / f"{stage}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = curves_png(tmp_path, tmp_path / "curves.png")
    assert out == tmp_path / "curves.png" and out.stat().st_size > 10_000
