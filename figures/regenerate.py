"""Regenerate the README's figures from a sweep run folder.

    .venv/bin/python figures/regenerate.py runs/demo      # after `make demo`

Writes PNG and SVG of every run figure into this folder (figures/), where the README links them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from analysis.report import figures


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    run = Path(argv[0])
    if not (run / "results.jsonl").is_file():
        print(f"error: {run} is not a sweep run folder (no results.jsonl) — run `make demo` first", file=sys.stderr)
        return 2
    made = figures.make_all(run, Path(__file__).parent)
    print("\n".join(str(p) for p in made))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
