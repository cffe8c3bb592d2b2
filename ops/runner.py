"""The one place bakehouse runs local subprocesses. Everything else builds argv lists."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from ops.errors import CommandError, redact

log = logging.getLogger("bakehouse.runner")


def run_streaming(argv: Sequence[str], *, cwd: Path | None = None, env: Mapping[str, str] | None = None, stdin: bytes | None = None) -> str:
    """Run a long command (a build, a push): echo its output to stderr as it comes, return all of it."""
    log.info("$ %s", redact(" ".join(argv)))
    proc = subprocess.Popen(list(argv), cwd=cwd, env={**os.environ, **(env or {})}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdin is not None and proc.stdout is not None  # both are pipes
    if stdin is not None:
        proc.stdin.write(stdin)
    proc.stdin.close()
    lines = []
    for raw in proc.stdout:
        line = raw.decode("utf-8", "replace")
        lines.append(line)
        sys.stderr.write(redact(line))
    output = "".join(lines)
    if proc.wait() != 0:
        raise CommandError.of(argv, proc.returncode, output)
    return output


def run(argv: Sequence[str], *, cwd: Path | None = None, env: Mapping[str, str] | None = None, stdin: bytes | None = None) -> bytes:
    """Run argv, return stdout; raise CommandError with stderr on a non-zero exit."""
    log.debug("run: %s", redact(" ".join(argv)))
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(list(argv), cwd=cwd, env=full_env, input=stdin, capture_output=True)
    if proc.returncode != 0:
        raise CommandError.of(argv, proc.returncode, proc.stderr.decode("utf-8", "replace"))
    return proc.stdout


def stop(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """Terminate a child we started, and kill it if it does not exit in time."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
