"""Peer fan-out (`--fan-out peers`): the origin serves each file once; hosts copy verified files from each other.

Every host starts `python -m ops.models peer-serve` bound to its inventory
address, with this run's secret (a 0600 file the server reads and removes),
then fetches with `--share`: each file is offered to its peers as soon as its
bytes matched the lock, not when the whole model is, so the copies down the
chain overlap with the origin download instead of following it. The first
host (in the inventory's order) fetches from the origin (hub, git, https), a
file at a time; every other host takes each file from the earliest
host before it that serves fewer than `FANOUT` peers (then the other hosts
before it), waiting while that host is still fetching the file, and goes to
the origin only for files no peer could give. Every file is hashed as it
arrives and must match the lock before it is offered onward or activated: a
peer that dies or serves other bytes is dropped, the file is taken elsewhere,
and the host's row says which peer. A host whose fetch fails has its server
stopped at once, so the hosts behind it go elsewhere. Hosts marked
`peers: false` in the inventory (they cannot reach the others) get the
verified files through this machine instead (SFTP, as --from-host). The
control machine carries commands and results, not weights; every peer server
is stopped when the command ends.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from ops.errors import BakehouseError, RemoteError, StepFailedError
from ops.models.lock import LockedModel
from ops.models.peer_server import PEER_TOKEN
from ops.models.report import Report
from ops.remote import commands as rc
from ops.remote.executor import HostResults, run_each
from ops.remote.hostmodels import HostModels, ModelsView, parse_report
from ops.remote.inventory import Host
from ops.remote.job import FleetJob
from ops.remote.shell import Shell, shell_factory
from ops.remote.ssh_engine import bootstrap, copy_through_controller, run_with_ssh, upload_lock
from ops.remote.wheelhouse import Wheelhouse, build_wheelhouse
from ops.settings import env_lines

FANOUT = 2  # hosts one host serves at once when files pass on whole (store-and-forward)
MAX_DEGREE = 8
# Files the origin's host takes at once: the origin's bandwidth is shared by the files in flight, so with one in flight
# each is verified, and passed down the chain, as soon as it can be, and the last (the smallest: largest first) is quick
# to pass on. 8 hosts, 947 MB in 4 files, origin at 50 MB/s: 56.5 s with one, 61.8 s with two (AMD EPYC, 2 cores).
ROOT_WORKERS = 1
_START = ('umask 077; nohup "$1" -m ops.models peer-serve --dest "$2" --bind "$3" --token-file "$4" --port-file "$5" --seconds "$6" --max-rate "$7" '
          '--lock "${10}" >"$8" 2>&1 </dev/null & echo $! >"$9"')


def peer_dir(host: Host) -> str:
    return f"{host.prefix}/peer"


def start_argv(host: Host, seconds: int) -> list[str]:
    d = peer_dir(host)
    return ["sh", "-c", _START, "sh", rc.venv_python(rc.fleet_venv(host)), host.models_dir, host.address, f"{d}/token", f"{d}/port", str(seconds),
            str(host.peer_max_rate), f"{d}/serve.log", f"{d}/pid", rc.lock_path(host)]


def port_argv(host: Host) -> list[str]:
    """The peer server's port, once it has written it (waited for on the host: one exchange, up to 10 s)."""
    return ["sh", "-c", 'for i in $(seq 100); do [ -s "$1" ] && exec cat "$1"; sleep 0.1; done; exit 1', "sh", f"{peer_dir(host)}/port"]


def stop_argv(host: Host) -> list[str]:
    return ["sh", "-c", 'pid=$(cat "$1/pid" 2>/dev/null) && kill "$pid" 2>/dev/null; rm -f "$1/pid" "$1/port" "$1/token"; true', "sh", peer_dir(host)]


def levels(hosts: int, degree: int) -> int:
    """Depth of the tree below the root when each host feeds `degree` others (a chain for 1)."""
    if degree == 1:
        return max(0, hosts - 1)
    depth, reached, width = 0, 0, 1
    while reached < hosts - 1:
        width *= degree
        reached += width
        depth += 1
    return depth


def fanout_degree(hosts: int, models: Sequence[LockedModel]) -> int:
    """How many peers one host feeds at once, for this fleet and these files.

    Store-and-forward (files without pieces): FANOUT. Cut-through (every file has pieces): a host feeding d peers sends each
    at 1/d of its link, and each level of the tree adds one piece's time, so the last host has everything after about
    d x (size + piece x levels(N, d)) / link; the d that minimises it: a chain while the model is large against its pieces
    times the hosts (3 GB in 64 MiB pieces: up to 55 hosts), then 2.
    """
    files = [f for m in models for f in m.files if f.size]
    if not files or not all(f.pieces for f in files):
        return FANOUT
    size, piece = sum(f.size for f in files), max(f.piece_size for f in files)
    return min(range(1, MAX_DEGREE + 1), key=lambda d: d * (size + piece * levels(hosts, d)))


@dataclass
class Run:
    """What the hosts of one run tell each other: who serves (in the order they joined), who failed, how many peers each serves now.

    Every host starts its peer server before it fetches, then joins; the first host (the root) joins first and
    fetches from the origin. Every other host takes each file from the earliest host that joined before it and
    serves fewer than FANOUT peers, as soon as that host has verified the file, with the other hosts before it
    as fallbacks. Files flow one way down the join order, so no two hosts ever wait on each other. A host with
    no live host before it (every one before it failed) fetches from the origin itself.
    """

    root: str
    degree: int = FANOUT
    token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    order: list[str] = field(default_factory=list)  # hosts serving, in the order they joined
    urls: dict[str, str] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)
    serving: Counter[str] = field(default_factory=Counter)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def join(self, name: str, url: str) -> None:
        """`name` serves at `url` from now on; any host but the root joins after the root (or after the root failed)."""
        with self.cond:
            while name != self.root and self.root not in self.order and self.root not in self.failed:
                self.cond.wait()
            self.order.append(name)
            self.urls[name] = url
            self.cond.notify_all()

    def acquire(self, name: str) -> tuple[str | None, list[str]]:
        """Wait for a source: (its name, its URL then the other live hosts' before it as fallbacks), or (None, []) for the origin."""
        with self.cond:
            while True:
                before = [h for h in self.order[: self.order.index(name)] if h not in self.failed]
                if not before:
                    return None, []
                free = [h for h in before if self.serving[h] < self.degree]
                if free:
                    source = free[0]  # the earliest: the tree stays shallow
                    self.serving[source] += 1
                    return source, [self.urls[source], *[self.urls[h] for h in before if h != source][: 2 * max(self.degree, FANOUT)]]
                self.cond.wait()

    def release(self, name: str, source: str | None, *, ok: bool) -> None:
        """`name` is done fetching (from `source`); a host that failed serves no one (its server is stopped)."""
        with self.cond:
            if source is not None:
                self.serving[source] -= 1
            if not ok:
                self.failed.add(name)
            self.cond.notify_all()

    def named(self, text: str) -> str:
        """A host's warning with its peers' addresses replaced by their inventory names."""
        with self.cond:
            for host, url in self.urls.items():
                text = text.replace(f"peer {url}", f"peer {host} ({url})")
        return text


def peer_step(sh: Shell, job: FleetJob, wh: Wheelhouse, run: Run, token: str, *, seconds: int) -> HostModels:
    host = sh.host
    source: str | None = None
    url: str | None = None
    ok = False
    try:
        state = bootstrap(sh, wh)
        sh.run(rc.mkdir_argv(peer_dir(host)), what="create the peer directory")
        upload_lock(sh, job.lock_text)
        url = _serve(sh, run, seconds=seconds)  # before the fetch: each file is offered to this host's peers once verified
        run.join(host.name, url)
        source, peers = run.acquire(host.name)
        sh.note(f"takes each file from {source} as soon as it has verified it, then from the other hosts before it, then the origin"
                if source else "fetches from the origin")
        argv = rc.model_argv(host, "fetch", models=job.models) + ["--share"] + (["--peers", ",".join(peers)] if peers else ["--workers", str(ROOT_WORKERS)])
        env = rc.model_env("fetch", token) | ({PEER_TOKEN: run.token} if peers else {})
        result = sh.run(argv, stdin=env_lines(env), kind="report", on_stderr_line=sh.say)
        report = parse_report(host.name, result.stdout, result.stderr)
        for outcome in report.outcomes:
            outcome.warnings = [run.named(w) for w in outcome.warnings]
        ok = report.ok
        return HostModels(state, report)
    finally:
        run.release(host.name, source, ok=ok)
        if url is not None and not ok:
            # However it failed (a failed model, no report, a timeout): the hosts still asking this one go elsewhere at once.
            with contextlib.suppress(BakehouseError):
                sh.run(stop_argv(host), kind="query")


def _serve(sh: Shell, run: Run, *, seconds: int) -> str:
    """Start this host's peer server with the run's secret; where it listens."""
    host = sh.host
    sh.run(rc.write_file_argv(f"{peer_dir(host)}/token"), stdin=run.token, what="hand the peer server its secret")
    sh.run(start_argv(host, seconds), what="start the peer server")
    try:
        port = sh.run(port_argv(host), kind="value", what="port").stdout.strip()
    except StepFailedError as exc:
        raise RemoteError(f"the peer server did not start; see {peer_dir(host)}/serve.log there.", host=host.name, step="peer-serve") from exc
    return f"http://{host.address}:{port}"


def run_with_peers(hosts: Sequence[Host], job: FleetJob) -> HostResults[HostModels]:
    """The peer path over the hosts that can reach each other, then the controller path for the others; every peer server stopped at the end."""
    reachable = [h for h in hosts if h.peers]
    isolated = [h for h in hosts if h not in reachable]
    run = Run(reachable[0].name if reachable else "", degree=fanout_degree(len(reachable), job.selected))
    wh, token = build_wheelhouse(), os.environ.get("HF_TOKEN", "")
    # Servers start before the fetches and are stopped when the command ends; the deadline only bounds a server orphaned
    # by a lost controller, so it outlives any fetch of this run: every host's fetch starts about when the servers do.
    seconds = 2 * int(job.ssh.command_timeout) + 300 if job.ssh.command_timeout else 86400
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
