"""Model commands across hosts: bootstrap, upload the lock, fetch or verify, a row per host.

Each host runs the same `python -m ops.models` as everywhere else, in a private
venv installed offline from wheels built here. Hosts run in parallel (bounded);
a failure on one host is that host's row, never the others' problem.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from fabric import Connection

from ops.errors import EXIT_SOURCE, BakehouseError, ConfigError, error_for_exit, redact
from ops.models.fetch import fetch_models
from ops.models.lock import LockedModel, load_lock
from ops.models.report import Outcome
from ops.models.store import Store
from ops.remote import commands as rc
from ops.remote.inventory import Host, load_inventory
from ops.remote.ssh import RemoteResult, SshOptions, connect, put_file, run_remote
from ops.runner import run
from ops.units import format_bytes, format_rate

log = logging.getLogger("bakehouse.fleet")
ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass
class HostResult:
    host: str
    ok: bool
    exit_code: int
    bootstrap: str = ""
    outcomes: list[Outcome] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class Wheelhouse:
    directory: Path
    wheels: tuple[str, ...]
    digest: str


def build_wheelhouse(project: Path = ROOT, dest: Path | None = None) -> Wheelhouse:
    """This project's wheel and its light dependencies (no torch): what a host needs to fetch."""
    dest = dest or project / "build" / "wheelhouse"
    dest.mkdir(parents=True, exist_ok=True)
    stamp, sources = dest / ".sources", source_digest(project)
    if not (stamp.exists() and stamp.read_text() == sources):
        for old in dest.glob("bakehouse-*.whl"):
            old.unlink()
        run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(dest), str(project)])
        stamp.write_text(sources)
    return wheelhouse_of(dest)


def wheelhouse_of(directory: Path) -> Wheelhouse:
    """The wheels in a directory and a digest of their contents: equal digests, nothing to reinstall."""
    wheels = tuple(sorted(p.name for p in directory.glob("*.whl")))
    digest = hashlib.sha256()
    for name in wheels:
        digest.update(name.encode() + wheel_identity(directory / name))
    return Wheelhouse(directory, wheels, digest.hexdigest()[:16])


def source_digest(project: Path) -> str:
    """What the project wheel is built from; the wheelhouse is rebuilt only when it changes."""
    digest = hashlib.sha256()
    for path in sorted([project / "pyproject.toml", project / "README.md", *project.glob("ops/**/*.py"), *project.glob("app/**/*.py")]):
        digest.update(str(path.relative_to(project)).encode() + path.read_bytes())
    return digest.hexdigest()


def wheel_identity(path: Path) -> bytes:
    """The wheel's RECORD (a hash of every file in it): equal for equal contents, unlike the zip's own bytes."""
    with zipfile.ZipFile(path) as z:
        record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
        return hashlib.sha256(z.read(record)).digest()


def bootstrap(conn: Connection, host: Host, wh: Wheelhouse) -> str:
    """Make sure the host's venv holds exactly this wheelhouse; a second run changes nothing."""
    if run_remote(conn, rc.check_marker_argv(host, wh.digest)).exit_code == 0:
        return "unchanged"
    _check(run_remote(conn, rc.mkdir_argv(rc.wheelhouse(host), host.models_dir)), host, "create directories")
    for name in wh.wheels:
        put_file(conn, wh.directory / name, f"{rc.wheelhouse(host)}/{name}")
    _check(run_remote(conn, rc.venv_argv(host)), host, f"create a venv with {host.python} (is python3-venv installed?)")
    _check(run_remote(conn, rc.install_argv(host, wh.wheels)), host, "install the wheels")
    _check(run_remote(conn, rc.touch_marker_argv(host, wh.digest)), host, "record the installed version")
    return "installed"


def _check(result: RemoteResult, host: Host, what: str) -> None:
    if result.exit_code != 0:
        raise BakehouseError(f"{host.name}: could not {what}: {result.stderr.strip()[-500:] or f'exit {result.exit_code}'}")


@dataclass(frozen=True)
class FleetJob:
    command: str  # "fetch" | "verify"
    lock: Path
    models: tuple[str, ...] = ()
    full: bool = False
    parallel: int = 8
    ssh: SshOptions = field(default_factory=SshOptions)
    env: dict[str, str] = field(default_factory=dict)
    seed: Path | None = None  # fan-out: a local store holding the verified models, copied to each host
    from_host: str | None = None  # fan-out from this host's verified copy instead of from this machine


def seed_locally(job: FleetJob, store: Path) -> FleetJob:
    """Fan-out: fetch once here (the hub serves each file once), then every host copies from this store."""
    models = load_lock(job.lock).select(list(job.models) or None)
    failed = [o for o in fetch_models(models, Store(store)) if not o.ok]
    if failed:
        raise error_for_exit(failed[0].exit_code, f"fetching on this machine for fan-out failed: {failed[0].error}")
    return replace(job, seed=store)


def download_model(conn: Connection, host: Host, model: LockedModel, store: Path) -> None:
    """Copy a host's verified commit directory into a local store, for fan-out from that host."""
    local = Store(store).commit_dir(model.name, model.commit)
    sftp = conn.sftp()
    for f in model.files:
        (local / f.path).parent.mkdir(parents=True, exist_ok=True)
        sftp.get(f"{host.models_dir}/{model.name}/{model.commit}/{f.path}", str(local / f.path))


def seed_from_host(hosts: Sequence[Host], job: FleetJob, store: Path) -> tuple[list[HostResult], FleetJob]:
    """Fetch on the seed host first; on success the others are seeded from its verified files."""
    seed = next((h for h in hosts if h.name == job.from_host), None)
    if seed is None:
        raise ConfigError(f"--from-host {job.from_host}: not among the selected hosts ({', '.join(h.name for h in hosts)}).")
    [first] = run_on_hosts([seed], replace(job, from_host=None))
    if not first.ok:
        return [first], job
    conn = connect(seed, job.ssh)
    try:
        for model in load_lock(job.lock).select(list(job.models) or None):
            download_model(conn, seed, model, store)
    finally:
        conn.close()
    return [first], replace(job, seed=store, from_host=None)


def upload_staged(conn: Connection, host: Host, model: LockedModel, store: Path, say: Callable[[str], None]) -> int:
    """Copy a verified model into the host's staging area; files already there at full size are skipped."""
    staging = f"{host.models_dir}/.staging/{model.name}/{model.commit}"
    local = Store(store).commit_dir(model.name, model.commit)
    sftp = conn.sftp()
    dirs = sorted({posixpath.dirname(f"{staging}/{f.path}") for f in model.files})
    _check(run_remote(conn, rc.mkdir_argv(*dirs)), host, "create the staging directory")
    sent = 0
    for f in model.files:
        target = f"{staging}/{f.path}"
        try:
            if sftp.stat(target).st_size == f.size:
                continue
        except OSError:
            pass
        sftp.put(str(local / f.path), f"{target}.part")
        sftp.posix_rename(f"{target}.part", target)
        sent += f.size
    say(f"copied {format_bytes(sent)} of {model.name} into staging")
    return sent


def run_on_hosts(hosts: Sequence[Host], job: FleetJob, *, wheelhouse: Wheelhouse | None = None, on_line: Callable[[str, str], None] | None = None) -> list[HostResult]:
    """Run a model command on every host, `job.parallel` at a time; one result per host, in order."""
    wh = wheelhouse or build_wheelhouse()
    env = {**{k: v for k, v in os.environ.items() if k in rc.FORWARDED_ENV}, **job.env}
    token = os.environ.get("HF_TOKEN", "")
    say = on_line or (lambda host, line: log.info("[%s] %s", host, line))

    def one(host: Host) -> HostResult:
        start = time.monotonic()
        try:
            result = _on_host(host, job, wh, env, token, lambda line: say(host.name, line))
        except BakehouseError as exc:
            result = HostResult(host=host.name, ok=False, exit_code=exc.exit_code, error=redact(str(exc)))
        except Exception as exc:  # a host's surprise (SSH dropped mid-command, …) is its own row, not everyone's crash
            result = HostResult(host=host.name, ok=False, exit_code=EXIT_SOURCE, error=redact(f"{type(exc).__name__}: {exc}"))
        result.seconds = time.monotonic() - start
        say(host.name, "ok" if result.ok else f"FAILED: {failure_reason(result)}")
        return result

    with ThreadPoolExecutor(max_workers=max(1, job.parallel), thread_name_prefix="host") as pool:
        return list(pool.map(one, hosts))


def _on_host(host: Host, job: FleetJob, wh: Wheelhouse, env: dict[str, str], token: str, say: Callable[[str], None]) -> HostResult:
    conn = connect(host, job.ssh)
    try:
        state = bootstrap(conn, host, wh)
        say(f"bootstrap: {state}")
        put_file(conn, job.lock, f"{host.prefix}/models.lock")
        if job.seed is not None and job.command == "fetch":
            for model in load_lock(job.lock).select(list(job.models) or None):
                if run_remote(conn, rc.model_argv(host, "verify", models=[model.name], env=env)).exit_code != 0:
                    upload_staged(conn, host, model, job.seed, say)
        send_token = bool(token) and job.command == "fetch"
        argv = rc.model_argv(host, job.command, models=job.models, env=env, full=job.full, token_stdin=send_token)
        result = run_remote(conn, argv, stdin=f"{token}\n" if send_token else None, timeout=job.ssh.command_timeout, on_stderr_line=say)
    finally:
        conn.close()
    return parse_host_report(host.name, result.stdout, result.stderr, bootstrap=state)


def failure_reason(result: HostResult) -> str:
    failed = [o for o in result.outcomes if not o.ok]
    return result.error or (failed[0].error or "; ".join(failed[0].problems) if failed else f"exit {result.exit_code}")


def parse_host_report(host: str, stdout: str, stderr: str, *, bootstrap: str = "") -> HostResult:
    """A host's row from the JSON report its model command printed (both engines)."""
    try:
        report = json.loads(stdout)
    except ValueError:
        tail = stderr.strip().splitlines()[-1:] or ["the model command printed no report"]
        return HostResult(host=host, ok=False, exit_code=1, bootstrap=bootstrap, error=tail[0])
    code = int(report.get("exit_code", 1))
    outcomes = [Outcome(**{k: v for k, v in m.items() if k != "ok"}) for m in report.get("models", [])]
    return HostResult(host=host, ok=code == 0, exit_code=code, bootstrap=bootstrap, outcomes=outcomes, error=report.get("error"))


def run_fleet(job: FleetJob, inventory: Path, *, hosts: list[str] | None, group: str | None, engine: str = "ssh", serial: str = "100%", max_fail_percentage: int = 100) -> list[HostResult]:
    """Select hosts from the inventory, seed locally for fan-out when asked, run the job on every host."""
    selected = load_inventory(inventory).select(hosts, group)
    done: list[HostResult] = []
    if job.from_host and job.command == "fetch":
        with tempfile.TemporaryDirectory(prefix="bakehouse-seed-") as tmp:
            done, job = seed_from_host(selected, job, Path(tmp))
            others = [h for h in selected if h.name not in {r.host for r in done}]
            if not done[0].ok:
                return done + [HostResult(host=h.name, ok=False, exit_code=done[0].exit_code, error=f"not attempted: the seed host {done[0].host} failed") for h in others]
            return done + run_on_hosts(others, job)
    if job.seed is not None and job.command == "fetch":
        job = seed_locally(job, job.seed)
    if engine == "ansible":
        if job.seed is not None:
            raise ConfigError("--from-local runs with the ssh engine; drop --engine ansible for fan-out.")
        from ops.remote.ansible import run_with_ansible

        return run_with_ansible(selected, job, inventory, serial=serial, max_fail_percentage=max_fail_percentage)
    if engine != "ssh":
        raise ConfigError(f"--engine {engine!r}: use ssh (default) or ansible.")
    return run_on_hosts(selected, job)


def render(command: str, results: Sequence[HostResult], *, as_json: bool) -> str:
    if as_json:
        return json.dumps({"command": command, "exit_code": exit_code(results), "hosts": [asdict(r) for r in results]}, indent=2)
    return table(results)


def exit_code(results: Sequence[HostResult]) -> int:
    return max((r.exit_code for r in results), default=0)


def table(results: Sequence[HostResult]) -> str:
    """host | model | result | bytes | time | rate, one row per host and model; why each failure, below."""
    rows = [("host", "model", "result", "bytes", "time", "rate")]
    reasons = []
    for r in results:
        if not r.outcomes:
            rows.append((r.host, "-", "FAILED", "-", f"{r.seconds:.1f}s", "-"))
            reasons.append(f"{r.host}: {(r.error or '').removeprefix(f'{r.host}: ')}")
        for o in r.outcomes:
            rows.append((r.host, o.model, o.status if o.ok else "FAILED", format_bytes(o.bytes), f"{o.seconds:.1f}s", format_rate(o.bytes, o.seconds) if o.bytes else "-"))
            if not o.ok:
                reasons.append(f"{r.host} {o.model}: {o.error or '; '.join(o.problems)}")
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    failed = sum(not r.ok for r in results)
    lines.append(f"{len(results)} host(s), {failed} failed" + (f" (exit {exit_code(results)})" if failed else ""))
    return "\n".join(lines + reasons)
