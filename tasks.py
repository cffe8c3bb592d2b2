"""bakehouse tasks (`invoke --list`). Each parses flags, calls one `ops` function, prints its report."""

from __future__ import annotations

import sys
from pathlib import Path

from invoke import Exit, task

from ops.errors import BakehouseError
from ops.models.cli import configure_logging, run_command

MODEL_HELP = {
    "models": "comma-separated model names; 'all' for every model (default: models.toml's `default`)",
    "manifest": "models.toml path (default: $BAKEHOUSE_MANIFEST or ./models.toml)",
    "lock": "models.lock path (default: $BAKEHOUSE_LOCK or ./models.lock)",
    "dest": "store directory (default: $MODELS_DIR or ./models)",
    "json": "print one JSON document with per-model results",
    "workers": "parallel downloads / hashes (default 8)",
    "full": "re-hash every file instead of trusting the stamp",
}


def _help(*names: str) -> dict[str, str]:
    return {n: MODEL_HELP[n] for n in names}


def _model_command(command: str, *, json: bool, **kwargs: object) -> None:
    configure_logging()
    paths = {k: Path(v) if v else None for k, v in kwargs.items() if k in ("manifest", "lock", "dest")}
    rest = {k: v for k, v in kwargs.items() if k not in paths}
    try:
        report = run_command(command, **paths, **rest)
    except BakehouseError as exc:
        raise Exit(f"error: {exc}", code=exc.exit_code) from None
    print(report.to_json() if json else report.render())
    if report.exit_code:
        raise Exit(code=report.exit_code)


@task(help=_help("models", "manifest", "lock", "json"))
def lock_models(c, models=None, manifest=None, lock=None, json=False):
    """Resolve revisions and write models.lock (commit + every file's size and sha256)."""
    _model_command("lock", models=models, manifest=manifest, lock=lock, json=json)


@task(help=_help("models", "manifest", "lock", "dest", "json", "workers"))
def fetch_models(c, models=None, manifest=None, lock=None, dest=None, json=False, workers=8):
    """Download, fully verify and activate models into the store."""
    _model_command("fetch", models=models, manifest=manifest, lock=lock, dest=dest, json=json, workers=int(workers))


@task(help=_help("models", "manifest", "lock", "dest", "full", "json", "workers"))
def verify_models(c, models=None, manifest=None, lock=None, dest=None, full=False, json=False, workers=8):
    """Verify the store against models.lock (quick by default, --full re-hashes)."""
    _model_command("verify", models=models, manifest=manifest, lock=lock, dest=dest, full=full, json=json, workers=int(workers))


@task(help={"model": "model to serve (default: $MODEL, else demo)", "port": "port to listen on (default: $PORT, else 8000)"})
def serve(c, model=None, port=None):
    """Run the app locally: quick verify (fetch if missing), then serve the OpenAI-compatible API."""
    from app.entrypoint import main

    code = main(model=model, port=int(port) if port else None)
    if code:
        raise Exit(code=code)


@task
def demo(c):
    """The whole path offline on the bundled demo model: local hub, lock, fetch, verify, serve, one completion."""
    from ops.demo import ROOT, run_demo

    configure_logging()
    code = run_demo(ROOT / ".demo")
    if code:
        raise Exit(code=code)


@task(help={"args": "extra pytest arguments, e.g. \"-k fetch -x\""})
def test(c, args=""):
    """Run the test suite (real servers on loopback)."""
    c.run(f"{sys.executable} -m pytest {args}", pty=False)
