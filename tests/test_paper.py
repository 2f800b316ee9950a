"""The report is generated from committed results: a fresh clone's ``lowbit paper`` reproduces
``paper/report.md`` byte for byte (and never wipes it)."""

from __future__ import annotations

import os
import shutil

import pytest

from lowbit.runner import paper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT = os.path.join(ROOT, "paper", "report.md")
RESULTS = os.path.join(ROOT, "paper", "results")


def test_committed_results_regenerate_the_report_byte_for_byte(tmp_path):
    assert os.path.isdir(RESULTS), "paper/results/ (the committed results behind the report) is missing"
    report = tmp_path / "paper" / "report.md"
    report.parent.mkdir()
    shutil.copyfile(REPORT, report)
    blocks = paper.render(str(report), results=RESULTS, figures=str(tmp_path / "paper" / "figures"))
    kept = [b for b, k in blocks.items() if k.endswith("(kept)")]
    assert not kept, f"blocks without committed results: {kept}"
    assert report.read_text() == open(REPORT).read()
    for name in os.listdir(tmp_path / "paper" / "figures"):
        with open(tmp_path / "paper" / "figures" / name, "rb") as a, \
                open(os.path.join(ROOT, "paper", "figures", name), "rb") as b:
            assert a.read() == b.read(), name


def test_missing_results_never_wipe_the_report(tmp_path, capsys):
    report = tmp_path / "report.md"
    report.write_text("# r\n<!-- lowbit:table demo -->\n| old | table |\n<!-- /lowbit -->\n"
                      "<!-- lowbit:rows never_run -->\n<!-- /lowbit -->\n")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        paper.render(str(report), results=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    blocks = paper.render(str(report), results=str(tmp_path / "empty"))
    text = report.read_text()
    assert "| old | table |" in text and blocks["table:demo"] == "table (kept)"
    assert "No results for `never_run` yet" in text
    assert "kept the block as it was" in capsys.readouterr().err
