"""`python -m ops.models lock|fetch|verify`: the model commands where Invoke is not installed."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from ops.errors import EXIT_INTERRUPTED, EXIT_USAGE, BakehouseError
from ops.models.actions import MODEL_COMMANDS, ModelRequest, run
from ops.models.report import Report
from ops.settings import configure_logging, read_env_lines

HELP = {
    "lock": "resolve revisions and write models.lock",
    "fetch": "download, fully verify and activate models",
    "verify": "verify what is in the store (quick by default)",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # usage errors exit 2, as documented
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"error: {message}. See `python -m ops.models {self.prog.split()[-1]} --help`.\n")


def _within(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number in [low, high], or a usage error naming the range."""
    def parse(text: str) -> int:
        if not text.isdigit() or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from {low} to {high}")
        return int(text)
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m ops.models", description="Lock, fetch and verify model weights.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in MODEL_COMMANDS:
        p = sub.add_parser(name, help=HELP[name], description=HELP[name])
        p.add_argument("--models", help="comma-separated model names; 'all' for every model (default: models.toml's `default`)")
        p.add_argument("--manifest", help="models.toml path (default: $BAKEHOUSE_MANIFEST or ./models.toml)")
        p.add_argument("--lock", help="models.lock path (default: $BAKEHOUSE_LOCK or ./models.lock)")
        p.add_argument("--dest", help="store directory (default: $MODELS_DIR or ./models)")
        p.add_argument("--json", action="store_true", help="print one JSON document with per-model results")
        p.add_argument("--workers", help=f"parallel downloads / hashes (default {ModelRequest.workers})")
        p.add_argument("--env-stdin", action="store_true",
                       help="read KEY=VALUE lines (HF_TOKEN, HF_ENDPOINT, …) from stdin up to a blank line: secrets stay out of argv and the caller's environment")
        if name == "lock":
            p.add_argument("--pieces", nargs="?", const="64MiB", metavar="SIZE",
                           help="also record each file's piece hashes, pieces of SIZE (default 64MiB): the model is fetched into --dest once for that; "
                                "peers then pass on each verified piece before the whole file is there")
        if name == "verify":
            p.add_argument("--full", action="store_true", help="re-hash every file instead of trusting the stamp")
        if name == "fetch":
            p.add_argument("--peers", help="comma-separated http://HOST:PORT of hosts serving verified files (peer-serve): tried before the source; "
                                           "their secret comes as BAKEHOUSE_PEER_TOKEN with --env-stdin")
            p.add_argument("--stripes", help="files with pieces: piece k is asked first of the (k mod N)-th of --peers (default 1)")
            p.add_argument("--share", action="store_true", help="offer each file to this host's peer server as soon as its bytes match the lock "
                                                               "(before the model is activated), so peers fetching from this host need not wait for the whole model")
    serve = sub.add_parser("peer-serve", help="serve this store's verified files to peers", description="serve this store's verified files to peers")
    serve.add_argument("--dest", required=True, help="the store")
    serve.add_argument("--bind", required=True, help="the address to listen on (the host's inventory address)")
    serve.add_argument("--port", type=_within(0, 65535), default=0, help="port (default: any free one, written to --port-file)")
    serve.add_argument("--token-file", required=True, help="a file holding this run's secret; read and removed at start")
    serve.add_argument("--port-file", required=True, help="where the bound port is written")
    serve.add_argument("--lock", help="the lock this host's fetch follows: a file of one of its commits not here yet is answered 425 (ask again), "
                                      "anything else missing 404")
    serve.add_argument("--max-rate", type=_within(0, 10**12), default=0, help="bytes a second each response may send (default: no limit)")
    serve.add_argument("--seconds", type=_within(1, 7 * 86400), default=3600, help="stop serving after this many seconds")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    if args.command == "peer-serve":
        from ops.models.peer_server import serve

        try:
            return serve(Path(args.dest), args.bind, args.port, Path(args.token_file), Path(args.port_file), lock=Path(args.lock) if args.lock else None,
                         max_rate=args.max_rate, seconds=args.seconds)
        except BakehouseError as exc:
            print(f"error: peer-serve: {exc}", file=sys.stderr)
            return exc.exit_code
    try:
        if args.env_stdin:
            os.environ.update(read_env_lines(sys.stdin))
        report = run(ModelRequest.parse(args.command, models=args.models, manifest=args.manifest, lock=args.lock, dest=args.dest,
                                        full=getattr(args, "full", False), workers=args.workers, peers=getattr(args, "peers", None),
                                        share=getattr(args, "share", False), pieces=getattr(args, "pieces", None),
                                        stripes=getattr(args, "stripes", None)))
    except BakehouseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if args.json:
            print(Report(args.command, error=exc).to_json())
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: nothing half-done was activated; re-run the same command to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(report.to_json() if args.json else report.render())
    return report.exit_code
