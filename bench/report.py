"""Fill the benchmark tables into the README and docs/ from bench/results, so no figure a user reads is typed by hand.

    python -m bench.report            rewrite every <!-- bench:NAME --> ... <!-- /bench --> block
    python -m bench.report --check    exit 1 when a block differs from its results file (the test suite runs this)

Each results/NAME.md is written by its benchmark from results/NAME.json in the same run; a block holds that file
without its title line, so the machine, the date and the commit come with the numbers.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BLOCK = re.compile(r"(<!-- bench:(?P<name>[A-Za-z0-9_.-]+) -->\n)(?P<body>.*?)(<!-- /bench -->)", re.S)


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def table(name: str) -> str:
    results = RESULTS / f"{name}.md"
    if not (RESULTS / f"{name}.json").exists():
        raise SystemExit(f"bench/results/{name}.json is missing: a table needs the data it was made from (run python -m bench.{name.split('-')[0]}).")
    lines = results.read_text().splitlines()
    return "\n".join(lines[1:] if lines and lines[0].startswith("# ") else lines).strip() + "\n"


def filled(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + table(m.group("name")) + m.group(4), text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    stale = []
    for doc in documents():
        text = doc.read_text()
        new = filled(text)
        if new != text:
            stale.append(doc.relative_to(ROOT))
            if not args.check:
                doc.write_text(new)
    if args.check and stale:
        print(f"tables differ from bench/results in: {', '.join(map(str, stale))}; run python -m bench.report", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
