"""Check that the README's demo tables are exactly the ones `./run demo` printed (CI runs this; .ci/run).

    python tools/check_readme_table.py runs/demo/report.md [README.md]

The demo writes every table it prints into ``report.md`` as markdown. The README quotes them between
``<!-- demo tables: begin -->`` and ``<!-- demo tables: end -->``. Every table (a block of lines
starting with ``|``) of the one must equal the other's, in order, cell for cell; the prose around
them is free. Exits 1 with a unified diff when they differ.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

BEGIN, END = "<!-- demo tables: begin", "<!-- demo tables: end"
README = Path(__file__).resolve().parents[1] / "README.md"


def tables(text: str) -> list[str]:
    """The markdown tables of ``text``, each as its lines joined by newlines (trailing spaces dropped)."""
    found, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line.rstrip())
        elif current:
            found.append("\n".join(current))
            current = []
    return found


def readme_section(readme: Path) -> str:
    """The README's text between the demo-table markers; exits 1 naming the file when they are missing."""
    lines = readme.read_text().splitlines()
    begins = [i for i, line in enumerate(lines) if line.startswith(BEGIN)]
    ends = [i for i, line in enumerate(lines) if line.startswith(END)]
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        sys.exit(f"{readme}: needs exactly one '{BEGIN} ... -->' line followed by one '{END} -->' line "
                 f"(found {len(begins)} and {len(ends)})")
    return "\n".join(lines[begins[0] + 1 : ends[0]])


def compare(report: Path, readme: Path) -> list[str]:
    """Unified-diff lines between the report's tables and the README's (empty when equal)."""
    printed = tables(report.read_text())
    if not printed:
        sys.exit(f"{report}: no table in it (did the demo finish? it writes report.md at the end)")
    quoted = tables(readme_section(readme))
    return list(difflib.unified_diff("\n\n".join(quoted).splitlines(), "\n\n".join(printed).splitlines(),
                                     f"{readme} (demo tables)", f"{report} (as printed)", lineterm=""))


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(__doc__, file=sys.stderr)
        return 2
    report, readme = Path(argv[0]), Path(argv[1]) if len(argv) == 2 else README
    diff = compare(report, readme)
    if diff:
        print(f"README's demo tables differ from what the demo printed ({report}):", file=sys.stderr)
        print("\n".join(diff), file=sys.stderr)
        print(f"Paste the tables of {report} between the markers in {readme}.", file=sys.stderr)
        return 1
    print(f"{readme}: the demo tables equal {report}'s ({len(tables(report.read_text()))} tables)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
