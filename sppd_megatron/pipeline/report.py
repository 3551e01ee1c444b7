"""The run's final report: the paper-shaped table (rows = models, columns = benchmark x mode).

``report.json`` keeps everything (per iteration: eval summaries with confidence intervals, last
training metrics of each stage, stage seconds); ``report.md`` and the printed table show the
accuracies. Rows follow the paper's Table: Base, +SFT-PRM, +SFT-PRM & DPO-PRM, +SPPD, then the
margin ablation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ROW_LABELS = {
    "base": "Base",
    "sft_prm": "+SFT-PRM",
    "dpo_prm": "+SFT-PRM & DPO-PRM",
    "step_dpo": "+SPPD (step-DPO, dynamic margin)",
    "step_dpo_dynamic": "step-DPO, dynamic margin",
    "step_dpo_fixed": "step-DPO, fixed margin",
    "step_dpo_none": "step-DPO, no margin",
    "step_dpo_prm": "+SPPD, learned PRM (dynamic margin)",
    "step_dpo_prm_dynamic": "step-DPO, learned PRM, dynamic margin",
    "step_dpo_prm_fixed": "step-DPO, learned PRM, fixed margin",
    "step_dpo_prm_none": "step-DPO, learned PRM, no margin",
    "prm": "learned PRM (value head)",
    "svpo": "+SVPO",
}


PAIRS_REPORTED = {"pairs": "Pairs", "prm_pairs": "Pairs from the learned PRM's values",
                  "mcts_pairs": "Pairs of the MCTS trees (Q values)"}
"""Report keys of pairs counts and how report.md introduces them."""


def row_label(model: str) -> str:
    return ROW_LABELS.get(model, model)


def results(summary: dict) -> dict:
    """``{benchmark: {mode: stats}}`` of an evaluation summary (issue 6's ``summary.json``)."""
    return summary.get("results", {})


def columns(evals: dict[str, dict]) -> list[tuple[str, str]]:
    """(benchmark, mode) pairs in first-seen order over all models."""
    out: list[tuple[str, str]] = []
    for summary in evals.values():
        for bench, modes in results(summary).items():
            for mode in modes:
                if (bench, mode) not in out:
                    out.append((bench, mode))
    return out


def _cell(summary: dict, bench: str, mode: str) -> str:
    r = results(summary).get(bench, {}).get(mode)
    if r is None:
        return "-"
    return f"{100 * r['accuracy']:.1f} ({r['correct']}/{r['n']})"


def table_rows(evals: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    cols = columns(evals)
    header = ["model"] + [f"{bench} {mode}" for bench, mode in cols]
    rows = [[row_label(m)] + [_cell(s, b, mode) for b, mode in cols] for m, s in evals.items()]
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table (what report.md holds and the README quotes)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def markdown_table(evals: dict[str, dict]) -> str:
    return markdown(*table_rows(evals))


def print_rows(header: list[str], rows: list[list[str]], title: str) -> None:
    """The same table on the terminal (first column left-aligned, the others right)."""
    import sys

    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def print_table(evals: dict[str, dict], title: str) -> None:
    print_rows(*table_rows(evals), title)


def pairs_counts(stats: dict) -> dict:
    """What the pairs stage built and what it refused on training's behalf (from ``pairs_stats.json``)."""
    counts = {"trees_used": stats["trees_used"], "sft": stats["sft"]["examples"], "dpo": stats["dpo"]["pairs"],
              "step": stats["step"]["pairs"], "untrainable": stats.get("untrainable", {})}
    if "svpo" in stats:  # written only when pairs.svpo.enabled
        counts["svpo"] = stats["svpo"]["pairs"]
    return counts


def pairs_line(counts: dict) -> str:
    """``SFT-PRM 312, DPO-PRM 198, step pairs 480 from 1024 trees; refused by training ...: DPO-PRM 2, ...``."""
    from sppd_megatron.pairs.cli import untrainable_summary

    svpo = f", SVPO pairs {counts['svpo']}" if "svpo" in counts else ""
    line = (f"SFT-PRM {counts['sft']}, DPO-PRM {counts['dpo']}, step pairs {counts['step']}{svpo} "
            f"from {counts['trees_used']} trees")
    if counts["untrainable"]:
        line += f"; refused by training (in pairs/rejects.jsonl): {untrainable_summary(counts['untrainable'])}"
    return line


def write_report(run_dir: str | Path, report: dict, title: str, notes: list[str] | None = None) -> tuple[Path, Path]:
    """``report.json`` (all of ``report``) and ``report.md`` (a table per iteration); atomic writes."""
    run_dir = Path(run_dir)
    json_path, md_path = run_dir / "report.json", run_dir / "report.md"
    md = [f"# {title}", ""]
    for it, body in report.get("iterations", {}).items():
        if body.get("eval"):
            md += [f"## Iteration {it}: accuracy % (correct/n)", "", markdown_table(body["eval"]), ""]
        for key, what in PAIRS_REPORTED.items():
            if body.get(key):
                md += [f"{what} (iteration {it}): {pairs_line(body[key])}.", ""]
        if body.get("train"):
            md += [f"Training (iteration {it}): " + "; ".join(
                f"{row_label(k)}: " + (f"{v['step']} steps, final loss {v['loss']:.4f}" if v else "no records, not trained")
                for k, v in body["train"].items()) + ".", ""]
    md += notes or []
    for path, text in ((json_path, json.dumps(report, indent=2, sort_keys=True) + "\n"), (md_path, "\n".join(md) + "\n")):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return json_path, md_path
