"""`python -m app.entrypoint`: make sure the weights are there and verified, then serve.

1. The first seed's interface: GIT_REPO_URL (+ GIT_BRANCH, MODEL_FILE) defines an
   ad-hoc git-lfs model, pinned by the sha256 and size in its LFS pointer.
2. Quick-verify MODEL in MODELS_DIR against the lock.
3. Missing or damaged: fetch it (download, full verify, activate) when
   BAKEHOUSE_AUTO_FETCH is on (default, unless the store is read-only);
   a read-only store is verified only, and a failure stops the start.
4. Read the weights into the page cache in the background (app.readahead)
   while the server's imports run, and serve with uvicorn.
Every step is logged with its time.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, TypeVar

import uvicorn

from app.auth import ApiKeys
from app.config import Settings
from app.readahead import start_readahead
from ops.errors import BakehouseError, ConfigError, SourceError
from ops.models.fetch import fetch_locked
from ops.models.lock import Lock, LockedModel, load_lock, write_lock
from ops.models.manifest import ModelSpec, spec_fingerprint
from ops.models.sources.git import GitSource, without_credentials
from ops.models.store import Store
from ops.models.verify import PICKLE_SUFFIXES, verify_one
from ops.settings import check_endpoint, check_store_dir, configure_logging, env_flag

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("bakehouse.entrypoint")
T = TypeVar("T")
SMALL_FILES = ("*.json", "*.txt", "*.model", "*.jinja")


def seed_model(name: str) -> ModelSpec | None:
    """GIT_REPO_URL / GIT_BRANCH / MODEL_FILE, as the first seed's entrypoint.sh took them."""
    url = os.environ.get("GIT_REPO_URL")
    if not url:
        return None
    model_file = os.environ.get("MODEL_FILE") or "neuroq_pretrained.pt"
    return ModelSpec(
        name=name,
        source=f"git+{without_credentials(url)}",  # credentials reach git as a header from GIT_REPO_URL itself (ops.models.sources.git.auth_env)
        revision=os.environ.get("GIT_BRANCH") or "main",
        include=(model_file, *SMALL_FILES),
        allow_pickle=model_file.endswith(PICKLE_SUFFIXES),
        strict_include=False,
    )


def ensure_model(settings: Settings) -> Settings:
    """Return settings whose lock holds a verified, current copy of settings.model; raise if impossible."""
    check_endpoint()
    check_store_dir(settings.models_dir, "MODELS_DIR")
    store = Store(settings.models_dir)
    spec = seed_model(settings.model)
    if spec is not None:
        settings = _lock_seed_model(settings, spec)
    model = _step("read lock", lambda: _locked(settings))
    outcome = _step("quick verify", lambda: verify_one(store, model, full=False))
    if outcome.ok:
        start_readahead(store.current_link(model.name), [(f.path, f.size) for f in model.files])
        return settings
    problems = "; ".join(outcome.problems) or outcome.error or "not verified"
    read_only = not store.writable()
    if read_only or not env_flag("BAKEHOUSE_AUTO_FETCH", not read_only):
        why = f"the store at {settings.models_dir} is read-only" if read_only else "BAKEHOUSE_AUTO_FETCH is off"
        raise BakehouseError(f"{settings.model} does not verify and {why}: {problems}. Fix the store (invoke fetch-models) or enable auto-fetch.")
    log.info("%s: %s; fetching", settings.model, problems)
    [fetched] = _step("fetch", lambda: fetch_locked([model], store))
    if fetched.error is not None:
        raise fetched.error
    start_readahead(store.current_link(model.name), [(f.path, f.size) for f in model.files])  # a ranged fetch wrote past the page cache
    return settings


def _locked(settings: Settings) -> LockedModel:
    lock = load_lock(settings.lock)
    if settings.model not in lock.models:
        raise ConfigError(f"MODEL={settings.model!r} is not in {settings.lock}. Set MODEL to one of: {', '.join(lock.models) or 'none'}, or lock it first.")
    return lock.models[settings.model]


def _lock_seed_model(settings: Settings, spec: ModelSpec) -> Settings:
    """Resolve the seed's branch at every start (it may have moved); with the remote down, serve the copy resolved last time."""
    saved = _seed_lock_path(settings.models_dir, spec)
    try:
        locked = _step(f"resolve {spec.source}@{spec.revision}", lambda: GitSource(spec.source.removeprefix("git+")).resolve(spec))
    except SourceError as exc:
        if not saved.exists():
            raise
        log.warning("%s; serving %s as resolved at the last start (%s)", exc, spec.name, saved)
    else:
        saved.parent.mkdir(parents=True, exist_ok=True)
        write_lock(Lock(path=saved, models={spec.name: locked}, default=(spec.name,)))
    return replace(settings, lock=saved, allow_pickle=settings.allow_pickle or spec.allow_pickle)


def _seed_lock_path(models_dir: Path, spec: ModelSpec) -> Path:
    """Kept in the store (`.seed/`) when it is writable, so a restart without the remote still knows the commit; else in the temp dir."""
    name = f"{spec.name}-{spec_fingerprint(spec)[:12]}.lock"
    if Store(models_dir).writable():
        return models_dir / ".seed" / name
    return Path(tempfile.gettempdir()) / "bakehouse-seed" / name


def _step(title: str, fn: Callable[[], T]) -> T:
    start = time.monotonic()
    result = fn()
    log.info("entrypoint: %s: %.0f ms", title, (time.monotonic() - start) * 1000)
    return result


def main(**overrides: object) -> int:
    """Run the entrypoint; `overrides` (model, port, …) win over the environment."""
    configure_logging()
    try:
        keys = ApiKeys.from_env()
        settings = ensure_model(Settings.from_env(**overrides))
    except BakehouseError as exc:
        log.error("error: %s", exc)
        return exc.exit_code
    # oneDNN keeps a primitive per shape it met; the steps' shapes vary, so its default cache (1024) grows the RSS by ~0.8 GB over
    # a few thousand requests. 8 kept it at ~0.55 GB. Set before torch is imported; an operator's own value wins.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8")
    from app.server import create_app  # imports torch: after the cheap checks, so failures are fast

    log.info("entrypoint: serving %s on %s:%d", settings.model, settings.host, settings.port)
    if not keys.required and settings.host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("no API key (BAKEHOUSE_API_KEY or BAKEHOUSE_API_KEY_FILE): anyone who reaches %s:%d can use the API", settings.host, settings.port)
    app = create_app(settings, keys)
    DrainingServer(app, uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info", timeout_graceful_shutdown=5)).run()
    return 0


class DrainingServer(uvicorn.Server):
    """uvicorn, but SIGTERM drains (app.drain) before the server stops, and the process then exits 0; SIGINT stops at once."""

    def __init__(self, app: FastAPI, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.app, self._draining = app, False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self.should_exit:
            super().handle_exit(sig, frame)
            return
        from app.server import begin_drain

        if not self._draining:
            self._draining = True
            begin_drain(self.app, lambda: setattr(self, "should_exit", True))


if __name__ == "__main__":
    sys.exit(main())
