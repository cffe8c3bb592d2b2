"""The fallback process manager for bare hosts without systemd (`process_manager: supervise`).

    python -m ops.deploy.supervise start|restart --run-dir D --env-file F [--env-file F2] [--stop-timeout S] -- ARGV…
    python -m ops.deploy.supervise stop|status --run-dir D [--stop-timeout S]

`start` detaches a small supervisor (its own session, so it outlives the SSH
connection) that runs ARGV with the env files' variables (a later file wins),
logs to D/app.log, and restarts it when it exits, at most 3 times a minute (as
systemd's StartLimitBurst). `stop` sends SIGTERM and waits up to the stop
timeout (the app drains meanwhile), then kills. `status` exits 0 only while
the supervisor runs and the app has not exited since it was started: the
deploy's health gate fails fast on a release that crashes at start instead of
waiting out its timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BURST, WINDOW_S, STOP_TIMEOUT_S = 3, 60.0, 30.0


def read_env_files(paths: list[Path]) -> dict[str, str]:
    env: dict[str, str] = {}
    for path in paths:
        env |= read_env_file(path)
    return env


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().split("\n"):  # only newlines end a line, as systemd and docker read env files (not U+2028 and the like)
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            env[key.strip()] = value
    return env


def _pid(run_dir: Path) -> int | None:
    try:
        pid = int((run_dir / "supervise.pid").read_text())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None


def _state(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "state.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _write_state(run_dir: Path, **state: object) -> None:
    tmp = run_dir / "state.json.tmp"
    tmp.write_text(json.dumps(state))
    tmp.replace(run_dir / "state.json")


def start(run_dir: Path, env_files: list[Path], argv: list[str], stop_timeout: float) -> int:
    if _pid(run_dir):
        print(f"already running (pid {_pid(run_dir)}); use restart", file=sys.stderr)
        return 1
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_state(run_dir, starts=0, exits=0)
    log = (run_dir / "app.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops.deploy.supervise", "_loop", "--run-dir", str(run_dir), *(f"--env-file={f}" for f in env_files),
         f"--stop-timeout={stop_timeout:g}", "--", *argv],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
    )
    (run_dir / "supervise.pid").write_text(str(proc.pid))
    return 0


def stop(run_dir: Path, stop_timeout: float) -> int:
    pid = _pid(run_dir)
    if pid is None:
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + stop_timeout + 5
    while _pid(run_dir) == pid and time.monotonic() < deadline:
        time.sleep(0.1)
    if _pid(run_dir) == pid:  # it ignored SIGTERM: take the whole session down
        os.killpg(pid, signal.SIGKILL)
    (run_dir / "supervise.pid").unlink(missing_ok=True)
    return 0


def status(run_dir: Path) -> int:
    state = _state(run_dir)
    up = _pid(run_dir) is not None and state.get("exits", 0) == 0
    print(json.dumps({"running": up, **state}))
    return 0 if up else 1


def loop(run_dir: Path, env_files: list[Path], argv: list[str], stop_timeout: float) -> int:
    """Run the app, restart it when it exits, give up after BURST exits within WINDOW_S."""
    child: subprocess.Popen | None = None
    stopping = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child and child.poll() is None:
            os.killpg(child.pid, signal.SIGTERM)  # the app's whole process group: no orphan keeps the port or the GPU

    signal.signal(signal.SIGTERM, on_term)
    exits: list[float] = []
    starts = 0
    while not stopping:
        env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ} | read_env_files(env_files)
        child = subprocess.Popen(argv, env=env, process_group=0)
        starts += 1
        _write_state(run_dir, starts=starts, exits=len(exits), child=child.pid)
        while True:
            try:
                code = child.wait(timeout=stop_timeout if stopping else None)
                break
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
        if stopping:
            break
        now = time.monotonic()
        exits = [t for t in exits if now - t < WINDOW_S] + [now]
        _write_state(run_dir, starts=starts, exits=len(exits), last_exit=code)
        print(f"supervise: the app exited with {code} ({len(exits)} in {WINDOW_S:.0f}s)", flush=True)
        if len(exits) >= BURST:
            print("supervise: giving up; fix the release and deploy again", flush=True)
            return 1
        time.sleep(2)
    (run_dir / "supervise.pid").unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Everything after "--" is the app's command line, never parsed as ours.
    ours, command = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(prog="python -m ops.deploy.supervise")
    ap.add_argument("action", choices=["start", "stop", "restart", "status", "_loop"])
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--env-file", type=Path, action="append", default=[])
    ap.add_argument("--stop-timeout", type=float, default=STOP_TIMEOUT_S)
    args = ap.parse_args(ours)
    if args.action in ("start", "restart", "_loop") and (not command or not args.env_file):
        ap.error(f"{args.action} needs --env-file and the command after --")
    if args.action == "_loop":
        return loop(args.run_dir, args.env_file, command, args.stop_timeout)
    if args.action in ("stop", "restart"):
        stop(args.run_dir, args.stop_timeout)
    if args.action in ("start", "restart"):
        return start(args.run_dir, args.env_file, command, args.stop_timeout)
    return status(args.run_dir) if args.action == "status" else 0


if __name__ == "__main__":
    sys.exit(main())
