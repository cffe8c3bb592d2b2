"""The one way any engine gets a model: from a verified path, with /ready saying each step.

The model is loaded only from `$MODELS_DIR/<name>/<commit>` after a quick
verify against models.lock, with the store held for reading (a fetch in
progress finishes first, and none starts while the engine loads). The engine
never talks to a hub. Both engines (transformers in this process, vLLM as a
child) start through `load`, so a failure is reported the same way:
`/ready` answers 503 with the reason, `/health` stays up.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from app.config import Settings
from app.metrics import Metrics
from ops.errors import ConfigError, NotServableError
from ops.models.lock import LockedModel, load_lock
from ops.models.store import Store
from ops.models.verify import PICKLE_SUFFIXES, verify_one

log = logging.getLogger("bakehouse.loader")

Status = Literal["starting", "waiting", "verifying", "loading", "warming", "ready", "failed", "draining"]


@dataclass
class LoadState:
    """What /ready reports: where the app is between start and serving, and why."""

    status: Status = "starting"
    reason: str = "starting up"
    stopping: bool = False  # the app is shutting down: a load still under way gives up

    def set(self, status: Status, reason: str) -> None:
        self.status, self.reason = status, reason

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    @property
    def serving(self) -> bool:
        """Loaded: ready, or draining (still answering what app.drain lets through)."""
        return self.status in ("ready", "draining")


def check_weights_format(model: LockedModel, allow_pickle: bool) -> bool:
    """True when the model must be loaded from safetensors; refuse pickle-only weights unless allowed."""
    names = [f.path for f in model.files]
    if any(n.endswith(".safetensors") for n in names):
        return True
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles and not (allow_pickle or model.allow_pickle):
        raise NotServableError(
            f"{model.name}: only pickle weights ({', '.join(pickles)}), which can run code when loaded. "
            "Convert them to safetensors, or set allow_pickle = true in models.toml (or BAKEHOUSE_ALLOW_PICKLE=1) if you trust them."
        )
    return False


def verified_path(store: Store, lock_path: Path, name: str) -> tuple[LockedModel, Path]:
    """Quick-verify the locked commit; return the directory to load (never `current` itself, which may flip)."""
    try:
        model = load_lock(lock_path).select([name])[0]
    except ConfigError as exc:
        raise NotServableError(str(exc)) from exc
    outcome = verify_one(store, model, full=False)
    if not outcome.ok:
        reasons = "; ".join(outcome.problems) or str(outcome.error or "verification failed")
        raise NotServableError(f"refusing to load {name}: {reasons}")
    return model, store.commit_dir(name, model.commit)


@dataclass(frozen=True)
class Verified:
    model: LockedModel
    directory: Path
    safetensors_only: bool
    verify_seconds: float


@contextlib.contextmanager
def verified(settings: Settings, on_state: Callable[[Status, str], None]) -> Iterator[Verified]:
    """Wait for a fetch in progress, quick verify, check the format; the store stays as verified inside."""
    store = Store(settings.models_dir)
    on_state("waiting", f"waiting for a fetch of {settings.model} in progress")
    with store.reading(settings.model):
        on_state("verifying", f"verifying {settings.model}")
        t0 = time.monotonic()
        model, directory = verified_path(store, settings.lock, settings.model)
        verify_seconds = time.monotonic() - t0
        yield Verified(model, directory, check_weights_format(model, settings.allow_pickle), verify_seconds)


def load(settings: Settings, state: LoadState, metrics: Metrics, start: Callable[[Verified], None], *, engine: str) -> None:
    """Verify, then `start` the engine on the verified directory (inside the read hold); `state` says how it went."""
    try:
        with verified(settings, state.set) as v:
            metrics.verify_seconds.set(v.verify_seconds)
            state.set("loading", f"loading {settings.model} from {v.directory}")
            t0 = time.monotonic()
            start(v)
            metrics.start_seconds.set(time.monotonic() - t0)
        state.set("ready", "ready")
        metrics.ready.set(1)
        log.info("ready: %s serves %s", engine, settings.model)
    except NotServableError as exc:
        state.set("failed", str(exc))
        log.error("not serving: %s", exc)
    except Exception as exc:  # corrupt weights, out of memory, vLLM crashed at start: reported through /ready, /health stays up
        state.set("failed", f"starting {engine} for {settings.model} failed: {type(exc).__name__}: {exc}")
        log.error("not serving: %s", state.reason)
        log.debug("the load failed", exc_info=True)
