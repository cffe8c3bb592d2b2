"""Fill the benchmark tables into the README and docs/ from bench/results, so no figure a user reads is typed by hand.

    python -m bench.report            rewrite every <!-- bench:NAME --> ... <!-- /bench --> block
    python -m bench.report --check    exit 1 when a block differs from its results file (the test suite runs this)

bench/results/summary.{md,json} (the README's performance table) are made here too, from the results files they quote.

Each results/NAME.md is written by its benchmark from results/NAME.json in the same run; a block holds that file
without its title line, so the machine, the date and the commit come with the numbers.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from bench.common import markdown_table

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


def _ratio_cells(data: dict, dtype: str) -> tuple[float, float, int, int] | None:
    """bakehouse's tokens/s over bare vLLM's in each cell of one dtype: lowest, highest, cells at 1.0x or more, cells."""
    ours, bare = data["results"].get(f"transformers/{dtype}"), data["results"].get(f"bare-vllm/{dtype}")
    if not ours or not bare:
        return None
    ratios = [ours["runs"][cell]["tokens_per_s"] / bare["runs"][cell]["tokens_per_s"] for cell in ours["runs"] if cell in bare["runs"]]
    return min(ratios), max(ratios), sum(r >= 1.0 for r in ratios), len(ratios)


def _cpu(data: dict) -> str:
    from bench.common import cpu_line

    m = data.get("machine")
    return cpu_line(m) if m else f"{data.get('device', 'unknown').removeprefix('CPU: ')} (flags not recorded)"


def summary() -> tuple[list[str], dict]:
    """The README's performance table: the headline figures, read from the results files they come from."""
    rows, data = [], {}
    fetch = json.loads((RESULTS / "fetch-nginx.json").read_text())
    for r in fetch["results"]:
        t = r["tools"]
        ours = t["bakehouse fetch (download + full verify + fsync + activate)"]["seconds"]
        ceiling = t.get("origin ceiling: curl --parallel to /dev/null", {}).get("seconds")
        rows.append([f"fetch {r['layout']} from nginx on loopback (download, verify, fsync, activate)", f"{ours:.2f} s",
                     f"curl --parallel {t['curl --parallel (download only)']['seconds']:.2f} s, hf download {t['hf download --local-dir (no verify)']['seconds']:.2f} s"
                     + (f"; the origin's ceiling {ceiling:.2f} s" if ceiling else ""), f"{r['vs_curl']:.2f}x curl, {r['vs_hf']:.2f}x hf download",
                     _cpu(fetch), "fetch-nginx.json"])
        rows.append([f"kill -9 at 50 % of {r['layout']}, then fetch again", f"{r['crash']['ratio']:.3f}x the model from the origin", "", "",
                     _cpu(fetch), "fetch-nginx.json"])
    load = json.loads((RESULTS / "load.json").read_text())
    for label in ("warm", "cold"):
        x = load["results"].get(label)
        if x and "read_s" in x:
            rows.append([f"load {load['results']['bytes'] / 1e9:.1f} GB bf16, {label} cache: verified to /ready", f"{x['verify_to_ready_s']:.2f} s",
                         f"read of the files into memory {x['read_s']:.2f} s, cat {x['cat_s']:.2f} s", f"{x['ratio']:.2f}x the read, {x['ratio_cat']:.2f}x cat",
                         _cpu(load), "load.json"])
    for name in ("serve-vs-vllm-130m-cpu-amd", "serve-vs-vllm-130m-cpu-intel"):
        serve = json.loads((RESULTS / f"{name}.json").read_text())
        for dtype in ("bfloat16", "float32"):
            cells = _ratio_cells(serve, dtype)
            if cells:
                low, high, ahead, n = cells
                ready = serve["results"][f"transformers/{dtype}"]["ready_s"], serve["results"][f"bare-vllm/{dtype}"]["ready_s"]
                rows.append([f"serve 130m {dtype} (fixed and mixed loads, concurrency 1/8/32): tokens/s", f"{low:.2f}-{high:.2f}x bare vLLM",
                             f"ahead in {ahead} of {n} cells; start to ready {ready[0]:.1f} s vs {ready[1]:.1f} s", "", _cpu(serve), f"{name}.json"])
    data["rows"] = rows
    md = ["# Performance: the headline figures", "",
          "Each row read from the results file named (bench/results), where the full tables, the machine and the commit are. Generated by bench/report.py.",
          "", *markdown_table(["what", "bakehouse", "reference, same run", "ratio", "measured on", "from"], rows)]
    return md, data


def write_summary(check: bool) -> bool:
    """bench/results/summary.{md,json} from the results they quote; True when they were out of date."""
    md, data = summary()
    text, numbers = "\n".join(md) + "\n", json.dumps(data, indent=2)
    stale = (RESULTS / "summary.md").read_text() != text if (RESULTS / "summary.md").exists() else True
    if stale and not check:
        (RESULTS / "summary.md").write_text(text)
        (RESULTS / "summary.json").write_text(numbers)
    return stale


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    stale = ["bench/results/summary.md"] if write_summary(args.check) else []
    for doc in documents():
        text = doc.read_text()
        new = filled(text)
        if new != text:
            stale.append(str(doc.relative_to(ROOT)))
            if not args.check:
                doc.write_text(new)
    if args.check and stale:
        print(f"tables differ from bench/results in: {', '.join(map(str, stale))}; run python -m bench.report", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
