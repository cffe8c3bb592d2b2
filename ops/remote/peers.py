"""Peer fan-out (`--fan-out peers`): the origin serves each file once; hosts copy verified files from each other.

The first host (in the inventory's order) fetches from the origin (hub, git,
https); every finished host becomes a source at once, serving at most
`FANOUT` peers at a time; every other host waits for a source with a free
slot and fetches with `--peers` (that source first, then other finished
hosts), falling back to the origin only for files no peer could give. A host
that finished starts
`python -m ops.models peer-serve` bound to its inventory address, with this
run's secret (a 0600 file the server reads and removes), until the run ends.
Every file is hashed as it arrives and must match the lock before it is
activated or served onward: a peer that dies or serves other bytes is dropped,
the file is taken elsewhere, and the host's row says which peer. Hosts marked
`peers: false` in the inventory (they cannot reach the others) get the
verified files through this machine instead (SFTP, as --from-host). The
control machine carries commands and results, not weights.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from ops.errors import RemoteError
from ops.models.peer import PEER_TOKEN
from ops.models.report import Report
from ops.remote import commands as rc
from ops.remote.executor import HostResults, run_each
from ops.remote.hostmodels import HostModels, ModelsView, parse_report
from ops.remote.inventory import Host
from ops.remote.job import FleetJob
from ops.remote.shell import Shell, shell_factory
from ops.remote.ssh_engine import bootstrap, copy_through_controller, run_with_ssh
from ops.remote.wheelhouse import Wheelhouse, build_wheelhouse
from ops.settings import env_lines

FANOUT = 2  # hosts one host serves at once
_START = ('umask 077; nohup "$1" -m ops.models peer-serve --dest "$2" --bind "$3" --token-file "$4" --port-file "$5" --seconds "$6" --max-rate "$7" '
          '>"$8" 2>&1 </dev/null & echo $! >"$9"')


def peer_dir(host: Host) -> str:
    return f"{host.prefix}/peer"


def start_argv(host: Host, seconds: int) -> list[str]:
    d = peer_dir(host)
    return ["sh", "-c", _START, "sh", rc.venv_python(rc.fleet_venv(host)), host.models_dir, host.address, f"{d}/token", f"{d}/port", str(seconds),
            str(host.peer_max_rate), f"{d}/serve.log", f"{d}/pid"]


def port_argv(host: Host) -> list[str]:
    return ["sh", "-c", 'cat "$1" 2>/dev/null', "sh", f"{peer_dir(host)}/port"]


def stop_argv(host: Host) -> list[str]:
    return ["sh", "-c", 'pid=$(cat "$1/pid" 2>/dev/null) && kill "$pid" 2>/dev/null; rm -f "$1/pid" "$1/port" "$1/token"; true', "sh", peer_dir(host)]


@dataclass
class Run:
    """What the hosts of one run tell each other: which hosts finished, where they serve, and how many peers each serves now.

    The first host fetches from the origin; every other host waits for a finished host with a free slot
    (fewer than FANOUT peers in flight), so each finished host becomes a source at once. A host finding
    no source and nothing still fetching (every host before it failed) goes to the origin itself.
    """

    root: str
    token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    urls: dict[str, str] = field(default_factory=dict)  # finished hosts' peer servers
    serving: Counter[str] = field(default_factory=Counter)
    active: int = 1  # hosts fetching now: the root from the start
    cond: threading.Condition = field(default_factory=threading.Condition)

    def acquire(self) -> tuple[str | None, list[str]]:
        """Wait for a source: (its name, its URL then other finished hosts' as fallbacks), or (None, []) for the origin."""
        with self.cond:
            while True:
                free = [h for h in self.urls if self.serving[h] < FANOUT]
                if free or self.active == 0:
                    self.active += 1
                    if not free:
                        return None, []
                    source = min(free, key=lambda h: self.serving[h])
                    self.serving[source] += 1
                    return source, [self.urls[source], *[u for h, u in self.urls.items() if h != source][: 2 * FANOUT]]
                self.cond.wait()

    def release(self, name: str, source: str | None, url: str | None) -> None:
        """`name` is done fetching (from `source`); with a URL it serves from now on."""
        with self.cond:
            if source is not None:
                self.serving[source] -= 1
            self.active -= 1
            if url is not None:
                self.urls[name] = url
            self.cond.notify_all()

    def named(self, text: str) -> str:
        """A host's warning with its peers' addresses replaced by their inventory names."""
        with self.cond:
            for host, url in self.urls.items():
                text = text.replace(f"peer {url}", f"peer {host} ({url})")
        return text


def peer_step(sh: Shell, job: FleetJob, wh: Wheelhouse, run: Run, token: str, *, seconds: int) -> HostModels:
    host = sh.host
    holds = host.name == run.root  # the root counts as fetching from the start
    source: str | None = None
    url: str | None = None
    try:
        state = bootstrap(sh, wh)
        sh.run(rc.mkdir_argv(peer_dir(host)), what="create the peer directory")
        sh.put(job.lock, rc.lock_path(host))
        peers: list[str] = []
        if not holds:
            if sh.dry_run:
                sh.note(f"waits for a finished host serving fewer than {FANOUT} peers, takes files from it (then other finished hosts, "
                        "then the origin for what none of them has)")
            else:
                source, peers = run.acquire()
                holds = True
                sh.say(f"takes files from {source}" if source else "no peer finished: fetches from the origin")
        argv = rc.model_argv(host, "fetch", models=job.models) + (["--peers", ",".join(peers)] if peers else [])
        env = rc.model_env("fetch", token) | ({PEER_TOKEN: run.token} if peers else {})
        result = sh.run(argv, stdin=env_lines(env), kind="query", on_stderr_line=sh.say)
        report = Report("fetch") if sh.dry_run else parse_report(host.name, result.stdout, result.stderr)
        for outcome in report.outcomes:
            outcome.warnings = [run.named(w) for w in outcome.warnings]
        if report.ok:
            url = _serve(sh, run, seconds=seconds)
        return HostModels(state, report)
    finally:
        if holds:
            run.release(host.name, source, url)


def _serve(sh: Shell, run: Run, *, seconds: int) -> str | None:
    """Start this host's peer server with the run's secret; where it listens."""
    host = sh.host
    sh.run(rc.write_file_argv(f"{peer_dir(host)}/token"), stdin=run.token, what="hand the peer server its secret")
    sh.run(start_argv(host, seconds), what="start the peer server")
    if sh.dry_run:
        return None
    for _ in range(100):
        port = sh.run(port_argv(host), kind="query").stdout.strip()
        if port.isdigit():
            return f"http://{host.address}:{port}"
        time.sleep(0.1)
    raise RemoteError(f"{host.name}: the peer server did not start; see {peer_dir(host)}/serve.log there.", host=host.name, step="peer-serve")


def run_with_peers(hosts: Sequence[Host], job: FleetJob) -> HostResults[HostModels]:
    """The peer path over the hosts that can reach each other, then the controller path for the others; every peer server stopped at the end."""
    reachable = [h for h in hosts if h.peers]
    isolated = [h for h in hosts if h not in reachable]
    run = Run(reachable[0].name if reachable else "")
    wh, token = build_wheelhouse(), os.environ.get("HF_TOKEN", "")
    seconds = int(job.ssh.command_timeout or 3600) + 60
    # Workers take hosts in order, so the first host (the one everyone waits for) always starts: any --parallel works.
    rollout = job.rollout
    try:
        results = run_each("fetch", reachable, lambda sh: peer_step(sh, job, wh, run, token, seconds=seconds),
                           shells=shell_factory(job.ssh, dry_run=job.dry_run), view=ModelsView(), rollout=rollout)
    finally:
        if not job.dry_run:
            run_each("stop peers", reachable, _stop, shells=shell_factory(job.ssh), view=ModelsView(), rollout=rollout, say=lambda h, line: None)
    rows = list(results)
    if isolated:
        # Hosts that cannot reach their peers: a finished host's verified files through this machine (or the origin when none finished).
        finished = [r.host for r in results if r.ok]
        rows += copy_through_controller(finished[0], isolated, job) if finished else run_with_ssh(isolated, job)
    return HostResults("fetch", rows, ModelsView())


def _stop(sh: Shell) -> HostModels:
    sh.run(stop_argv(sh.host), kind="query")
    return HostModels("", Report("stop"))
