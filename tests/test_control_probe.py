"""benchmarks/control_probe.py: the tree that lets one task leave the shared trunk earlier."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import load_script

from dymu.space.tree import TreeSpec

PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "control_probe.py"


@pytest.fixture(scope="module")
def probe():
    """The benchmark script as a module (benchmarks/ is not a package)."""
    return load_script(PATH, "control_probe_under_test")


def test_split_moves_one_task_off_the_trunk_one_layer_earlier(probe):
    shared = TreeSpec.branching(3, 4, 0, [3, 3, 3])  # every task on stream 0 up to layer 2
    assert [shared.path(j) for j in range(3)] == [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2]]
    split = probe.split_earlier(shared, 1)
    assert [split.path(j) for j in range(3)] == [[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 2]]
    assert split == TreeSpec.branching(3, 4, 0, [3, 2, 3])
    # Splitting again moves task 1 one layer further down.
    assert probe.split_earlier(split, 1).path(1) == [0, 1, 1, 1]


def test_no_split_for_the_trunks_own_task_or_a_task_that_shares_nothing(probe):
    shared = TreeSpec.branching(3, 4, 0, [3, 3, 3])
    assert probe.split_earlier(shared, 0) is None  # its stream carries the trunk
    assert probe.split_earlier(TreeSpec.no_sharing(3, 4), 2) is None


def test_corners_put_the_weight_on_one_task(probe):
    assert probe.corner(4, None).tolist() == [0.25] * 4
    r = probe.corner(4, 2)
    assert r[2] == pytest.approx(0.95) and r.sum() == pytest.approx(1.0)


def test_a_folder_that_is_not_a_finished_run_is_one_line_and_status_2(probe, tmp_path, capsys):
    assert probe.main(["--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"control_probe: {tmp_path} is not a finished search run: config.yaml is missing"
    ]
