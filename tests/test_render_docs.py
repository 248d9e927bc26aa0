"""benchmarks/render_docs.py: the results tables of the docs are rendered from the JSON.

The committed README.md and docs/*.md must be exactly what the script renders from
benchmarks/results/*.json; the marker handling turns bad input into one line and exit 2.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tiny import load_script

ROOT = Path(__file__).resolve().parent.parent
PATH = ROOT / "benchmarks" / "render_docs.py"


@pytest.fixture(scope="module")
def rd():
    """The script as a module (benchmarks/ is not a package)."""
    return load_script(PATH, "render_docs_under_test")


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def test_committed_docs_match_what_the_results_render(rd, capsys):
    status = rd.main(["--check"])
    out = capsys.readouterr().out
    assert status == 0, (
        "README.md or docs/*.md differ from benchmarks/results/*.json; run "
        "python benchmarks/render_docs.py and commit the result:\n" + out
    )


def test_every_renderer_has_a_block_and_names_json_that_exists(rd):
    used = set()
    for page in rd.default_pages():
        lines = page.read_text(encoding="utf-8").splitlines(keepends=True)
        used |= {b.name for b in rd.find_blocks(lines, page.name)}
    assert used == set(rd.RENDERERS)
    for name, r in rd.RENDERERS.items():
        for source in r.sources:
            assert (rd.RESULTS / source).is_file(), f"{name}: {source}"


def _page_with(tmp_path: Path, name: str, body: str = "") -> Path:
    page = tmp_path / "page.md"
    page.write_text(
        f"# Title\n\nBefore.\n\n<!-- results:{name} -->\n{body}<!-- /results:{name} -->\n\nAfter.\n"
    )
    return page


def test_a_tampered_table_is_detected_then_rerendered(rd, tmp_path, capsys):
    rendered = "\n".join(rd.render("transfer_pareto")) + "\n"
    tampered = rendered.replace("| 3 | 2.8882 |", "| 3 | 2.9999 |")
    assert tampered != rendered
    page = _page_with(tmp_path, "transfer_pareto", tampered)

    assert rd.main(["--check", str(page)]) == 1
    out = capsys.readouterr().out
    assert "[transfer_pareto] (committed)" in out
    assert "-| 3 | 2.9999 |" in out and "+| 3 | 2.8882 |" in out
    assert page.read_text().count("2.9999") == 1  # --check writes nothing

    assert rd.main([str(page)]) == 0
    assert page.read_text() == _page_with(tmp_path, "transfer_pareto", rendered).read_text()
    capsys.readouterr()
    assert rd.main(["--check", str(page)]) == 0


def test_text_outside_the_markers_is_left_alone(rd, tmp_path):
    page = _page_with(tmp_path, "paper_scale", "stale\n")
    rd.main([str(page)])
    text = page.read_text()
    assert text.startswith("# Title\n\nBefore.\n\n<!-- results:paper_scale -->\n| stage |")
    assert text.endswith("`benchmarks/render_docs.py`.\n<!-- /results:paper_scale -->\n\nAfter.\n")


def test_an_unknown_block_name_is_one_line_listing_the_known_ones(rd, tmp_path, capsys):
    page = _page_with(tmp_path, "no_such_table", "| a |\n")
    assert rd.main(["--check", str(page)]) == 2
    err = _one_line_error(capsys)
    assert "page.md:5: unknown block 'no_such_table'" in err and "transfer_pareto" in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "<!-- results:paper_scale -->\n| a |\n",
            "page.md:1: <!-- results:paper_scale --> has no end marker",
        ),
        (
            "| a |\n<!-- /results:paper_scale -->\n",
            "page.md:2: <!-- /results:paper_scale --> has no start marker",
        ),
        (
            "<!-- results:paper_scale -->\n<!-- results:bench_default -->\n",
            "page.md:2: block 'bench_default' starts inside block 'paper_scale'",
        ),
        (
            "<!-- results:paper_scale -->\n<!-- /results:bench_default -->\n",
            "page.md:2: <!-- /results:bench_default --> has no start",
        ),
    ],
    ids=["unterminated", "end-without-start", "nested", "mismatched-end"],
)
def test_bad_markers_are_one_line_and_exit_2(rd, tmp_path, capsys, text, message):
    page = tmp_path / "page.md"
    page.write_text(text)
    assert rd.main(["--check", str(page)]) == 2
    assert message in _one_line_error(capsys)
    assert rd.main([str(page)]) == 2  # and nothing is written
    assert page.read_text() == text


def test_markers_inside_fenced_code_are_text(rd, tmp_path, capsys):
    page = tmp_path / "page.md"
    page.write_text("```\n<!-- results:NAME -->\n```\n")
    assert rd.main(["--check", str(page)]) == 0


def test_a_missing_or_damaged_json_is_one_line_and_exit_2(rd, tmp_path, capsys, monkeypatch):
    page = _page_with(tmp_path, "transfer_pareto")
    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setattr(rd, "RESULTS", results)
    assert rd.main(["--check", str(page)]) == 2
    assert "block transfer_pareto: missing results file" in _one_line_error(capsys)

    (results / "transfer_pareto.json").write_text('{"runs": ')
    assert rd.main(["--check", str(page)]) == 2
    assert "is not valid JSON" in _one_line_error(capsys)

    (results / "transfer_pareto.json").write_text(json.dumps({"runs": {}}))
    assert rd.main(["--check", str(page)]) == 2
    assert "block transfer_pareto: cannot render from transfer_pareto.json" in _one_line_error(
        capsys
    )


def test_a_missing_page_is_one_line_and_exit_2(rd, tmp_path, capsys):
    assert rd.main(["--check", str(tmp_path / "nothing.md")]) == 2
    assert "cannot read" in _one_line_error(capsys)


def test_a_new_renderer_only_needs_registering(rd, tmp_path, capsys, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(rd.RESULTS / "stacked_anchor.json", results)
    monkeypatch.setattr(rd, "RESULTS", results)
    monkeypatch.setattr(rd, "RENDERERS", {})

    @rd.renderer("stacked", "stacked_anchor.json")
    def stacked(result):
        return rd.table(["speed-up"], [[rd.num(result["speedup_full"], 2)]])

    page = _page_with(tmp_path, "stacked")
    assert rd.main([str(page)]) == 0
    assert "| speed-up |\n| --- |\n| 0.91 |\n\nRendered from" in page.read_text()


def test_formatting_keeps_the_docs_rounding(rd):
    assert rd.delta(-2.7982) == "-2.80" and rd.delta(-21.07) == "-21.1"
    assert rd.delta(0.1575) == "+0.16"
    assert rd.two_digits(-2.798) == "-2.8" and rd.two_digits(0.1575) == "+0.16"
    assert rd.pct(0.0129) == "1.3%" and rd.pct(0.4929) == "49%"
    assert rd.rate(3674.3) == "3,674" and rd.rate(50.4) == "50.4" and rd.rate(0.66) == "0.66"
    # A range of hundredths gets a third decimal, so its two ends differ.
    assert rd.value_range(97.836479, 97.849048, 2) == "97.836-97.849"
    assert rd.value_range(98.15995, 98.49717, 2) == "98.16-98.50"
    assert rd.table(["a", ""], [["1", ""]]) == ["| a | |", "| --- | --- |", "| 1 | |"]
