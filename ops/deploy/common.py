"""What every deploy runs on a host, whatever the runtime: the deploy lock, the env file, the /ready probe, the history.

Pure functions returning argv lists; nothing here connects anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping

from ops.deploy.target import Target
from ops.errors import ConfigError

LOCKED = 75  # exit status of lock_argv when another deploy holds the lock (EX_TEMPFAIL)

_LOCK = (
    'mkdir -p "$1" || exit 1; '
    'if mkdir "$1/deploy.lock" 2>/dev/null; then printf "%s\\n" "$2" > "$1/deploy.lock/owner"; '
    'else cat "$1/deploy.lock/owner" 2>/dev/null || echo "unknown (no owner file)"; exit 75; fi'
)
_UNLOCK = '[ "$(cat "$1/deploy.lock/owner" 2>/dev/null)" = "$2" ] && rm -rf "$1/deploy.lock"'
_BREAK = 'cat "$1/deploy.lock/owner" 2>/dev/null; rm -rf "$1/deploy.lock"'
_PROBE = """
import sys, urllib.error, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=3).status)
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode(errors="replace")[:300])
except Exception as e:
    print(0, e)
"""


def lock_argv(prefix: str, owner: str) -> list[str]:
    """Take the host's deploy lock (an atomic mkdir) or print who holds it and exit LOCKED."""
    return ["sh", "-c", _LOCK, "sh", prefix, owner]


def unlock_argv(prefix: str, owner: str) -> list[str]:
    """Release the lock only if it is still ours."""
    return ["sh", "-c", _UNLOCK, "sh", prefix, owner]


def break_lock_argv(prefix: str) -> list[str]:
    return ["sh", "-c", _BREAK, "sh", prefix]


def probe_argv(python: str, port: int) -> list[str]:
    """One GET of /ready on the host itself; prints the status (0 when nothing answers)."""
    return [python, "-c", _PROBE, f"http://127.0.0.1:{port}/ready"]


def gate_argv(python: str, port: int, alive: list[str]) -> list[str]:
    """The probe and the liveness check in one SSH round trip: prints the /ready answer, then `alive` or `dead`."""
    return ["sh", "-c", '"$1" "$2" "$3" "$4"; shift 4; if "$@" >/dev/null 2>&1; then echo alive; else echo dead; fi', "sh", *probe_argv(python, port), *alive]


def history_argv(prefix: str) -> list[str]:
    return ["sh", "-c", 'cat "$1/history" 2>/dev/null || true', "sh", prefix]


def record_argv(prefix: str, version: str, config_mark: str = "") -> list[str]:
    """Append a version that became ready, with the digest of the configuration it ran with (from `config_mark`): the history rollback reads."""
    return ["sh", "-c", 'c=$(cat "$3" 2>/dev/null); printf "%s%s\\n" "$2" "${c:+ config=$c}" >> "$1/history"', "sh", prefix, version, config_mark]


def history_versions(history: str) -> list[str]:
    """The versions in a history file, oldest first (each line: VERSION [config=DIGEST])."""
    return [line.split()[0] for line in history.splitlines() if line.strip()]


def previous_version(history: str, current: str | None) -> str | None:
    """The last deployed version before the current one, from the history file's lines."""
    versions = history_versions(history)
    for version in reversed(versions):
        if version != current:
            return version
    return None


def instance_env(t: Target, port: int) -> dict[str, str]:
    """What makes an app instance itself, on any runtime: its loopback port behind the front proxy, and how long it may drain."""
    return {"HOST": "127.0.0.1", "PORT": str(port), "BAKEHOUSE_DRAIN_SECONDS": f"{t.drain_seconds:g}"}


def env_file(entries: Mapping[str, str]) -> str:
    """KEY=VALUE lines, the format docker --env-file, systemd EnvironmentFile and the supervisor all read."""
    for key, value in entries.items():
        if value.splitlines() not in ([], [value]) or "\0" in value:
            raise ConfigError(f"the value of {key} holds a line break (or a line or paragraph separator) or a NUL; an env file cannot carry it.")
    return "".join(f"{k}={v}\n" for k, v in entries.items())
