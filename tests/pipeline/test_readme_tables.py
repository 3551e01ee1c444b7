"""tools/check_readme_table.py: the README's demo tables against what the demo wrote (CI's last step)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from sppd_megatron.pipeline.demo import SPLIT_HEADER
from sppd_megatron.pipeline.report import markdown, table_rows, write_report

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "check_readme_table.py"


def _check(report: Path, readme: Path = ROOT / "README.md") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), str(report), str(readme)], capture_output=True, text=True,
                          timeout=60)


def _readme_tables() -> list[str]:
    spec = importlib.util.spec_from_file_location("check_readme_table", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool.tables(tool.readme_section(ROOT / "README.md"))


def test_readme_quotes_the_demo_tables_in_the_format_the_demo_writes():
    accuracy, split = _readme_tables()
    evals = {m: {"results": {b: {mode: {"accuracy": 0.5, "correct": 1, "n": 2} for mode in ("greedy", "maj@5")}
                             for b in ("heldout", "ood")}} for m in ("base", "sft_prm")}
    assert accuracy.splitlines()[:2] == markdown(*table_rows(evals)).splitlines()[:2]
    assert split.splitlines()[:2] == markdown(SPLIT_HEADER, []).splitlines()[:2]
    assert len(accuracy.splitlines()) == 2 + 6 and len(split.splitlines()) == 2 + 6  # six models each


def test_equal_tables_pass_and_a_changed_cell_fails_with_a_diff(tmp_path):
    accuracy, split = _readme_tables()
    report = tmp_path / "report.md"
    report.write_text(f"# sppd-megatron demo\n\n## Iteration 1\n\n{accuracy}\n\nPairs: ...\n\n## split\n\n{split}\n")
    proc = _check(report)
    assert proc.returncode == 0, proc.stderr
    assert "the demo tables equal" in proc.stdout
    changed = accuracy.splitlines()
    changed[2] = changed[2].replace(" | ", " | 99.9 (1/1) | ", 1)
    report.write_text("\n".join(changed) + f"\n\n{split}\n")
    proc = _check(report)
    assert proc.returncode == 1
    assert f"+{changed[2]}" in proc.stderr and f"-{accuracy.splitlines()[2]}" in proc.stderr
    report.write_text(f"{accuracy}\n")  # a table missing
    assert _check(report).returncode == 1


def test_a_report_written_by_the_pipeline_is_read_table_by_table(tmp_path):
    evals = {"base": {"results": {"heldout": {"greedy": {"accuracy": 0.25, "correct": 1, "n": 4}}}}}
    write_report(tmp_path, {"iterations": {"1": {"eval": evals, "pairs": None, "train": {"sft_prm": None}}}}, "t",
                 ["## split", "", markdown(SPLIT_HEADER, [["Base", "1/2", "0/2"]]), ""])
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- demo tables: begin -->\n| model | heldout greedy |\n|---|---|\n"
                      "| Base | 25.0 (1/4) |\n\nprose between\n\n| model | problems with a \"triples\" step | "
                      "the other problems |\n|---|---|---|\n| Base | 1/2 | 0/2 |\n<!-- demo tables: end -->\n")
    proc = _check(tmp_path / "report.md", readme)
    assert proc.returncode == 0, proc.stderr
    assert "no records, not trained" in (tmp_path / "report.md").read_text()
    readme.write_text(readme.read_text().replace("<!-- demo tables: end -->\n", ""))
    proc = _check(tmp_path / "report.md", readme)
    assert proc.returncode == 1 and "needs exactly one" in proc.stderr
