"""`python -m ops.models lock|fetch|verify`: the model commands where Invoke is not installed."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ops.errors import EXIT_USAGE, BakehouseError
from ops.models import commands
from ops.models.store import default_models_dir

EXIT_INTERRUPTED = 130


def default_manifest() -> Path:
    return Path(os.environ.get("BAKEHOUSE_MANIFEST") or "models.toml")


def default_lock() -> Path:
    return Path(os.environ.get("BAKEHOUSE_LOCK") or "models.lock")


def parse_models(value: str | None) -> list[str] | None:
    names = [n.strip() for n in (value or "").split(",") if n.strip()]
    return names or None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # usage errors exit 2, as documented
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"error: {message}. See `python -m ops.models {self.prog.split()[-1]} --help`.\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m ops.models", description="Lock, fetch and verify model weights.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    helps = {
        "lock": "resolve revisions and write models.lock",
        "fetch": "download, fully verify and activate models",
        "verify": "verify what is in the store (quick by default)",
    }
    for name, help_text in helps.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--models", help="comma-separated model names; 'all' for every model (default: models.toml's `default`)")
        p.add_argument("--manifest", type=Path, help="models.toml path (default: $BAKEHOUSE_MANIFEST or ./models.toml)")
        p.add_argument("--lock", type=Path, help="models.lock path (default: $BAKEHOUSE_LOCK or ./models.lock)")
        p.add_argument("--dest", type=Path, help="store directory (default: $MODELS_DIR or ./models)")
        p.add_argument("--json", action="store_true", help="print one JSON document with per-model results")
        p.add_argument("--workers", type=int, default=8, help="parallel downloads / hashes (default 8)")
        p.add_argument("--token-stdin", action="store_true", help="read HF_TOKEN from the first line of stdin (keeps it out of argv and the environment of the caller)")
        if name == "verify":
            p.add_argument("--full", action="store_true", help="re-hash every file instead of trusting the stamp")
    return parser


def run_command(command: str, *, models: str | None = None, manifest: Path | None = None, lock: Path | None = None, dest: Path | None = None, full: bool = False, workers: int = 8) -> commands.Report:
    """Dispatch one model command; shared by this CLI and tasks.py."""
    common = {"manifest_path": manifest or default_manifest(), "lock_path": lock or default_lock(), "names": parse_models(models)}
    if command == "lock":
        return commands.lock_models(**common)
    where = {"dest": dest or default_models_dir(), "manifest_explicit": manifest is not None or "BAKEHOUSE_MANIFEST" in os.environ, "workers": workers}
    if command == "fetch":
        return commands.fetch(**common, **where)
    return commands.verify_models(**common, **where, full=full)


def configure_logging() -> None:
    """Progress and step lines on stderr; reports on stdout. The HTTP clients' per-request lines are noise here."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("httpx", "httpx2", "huggingface_hub", "paramiko"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    if args.token_stdin:
        token = sys.stdin.readline().strip()
        if token:
            os.environ["HF_TOKEN"] = token
    try:
        report = run_command(args.command, models=args.models, manifest=args.manifest, lock=args.lock, dest=args.dest, full=getattr(args, "full", False), workers=args.workers)
    except BakehouseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if args.json:
            print(json.dumps({"command": args.command, "ok": False, "exit_code": exc.exit_code, "error": str(exc), "models": []}))
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: nothing half-done was activated; re-run the same command to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(report.to_json() if args.json else report.render())
    return report.exit_code
