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
import time
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
from ops.settings import env_lines, env_number

FANOUT = 2  # hosts one host serves at once when files pass on whole (store-and-forward)
MAX_STRIPES = 4
JOIN_SECONDS = 30.0  # how long a host waits for a stripe source to join before it takes that stripe from the source's own source
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


def stripe_plan(hosts: int, stripes: int) -> list[list[int]]:
    """Each host's source in each stripe, hosts numbered in the inventory's order (-1: the origin, for host 0 only).

    Piece k of a file belongs to stripe k mod `stripes`. In stripe s, the hosts i >= 1 with (i - 1) mod stripes == s are its
    inner hosts: the first takes the stripe from host 0, and every inner host feeds `stripes` others (first the other inner
    hosts, breadth first, then every remaining host once). So each host but host 0 feeds others in one stripe only: it sends
    about as much as it receives, at its link's full rate, and each stripe is a tree about log(hosts) deep. One stripe: a chain.
    """
    plan = [[-1] * stripes] + [[0] * stripes for _ in range(hosts - 1)]
    for s in range(stripes):
        order = [i for i in range(1, hosts) if (i - 1) % stripes == s] + [i for i in range(1, hosts) if (i - 1) % stripes != s]
        inner = max(1, len(range(s + 1, hosts, stripes)))  # fewer hosts than stripes: the first one feeds this stripe to the rest
        for j, host in enumerate(order):
            # the few hosts past what the inner hosts' `stripes` places each hold go to the first inner hosts (the shallowest)
            plan[host][s] = 0 if j == 0 else order[((j - 1) // stripes) % inner]
    return plan


def depth(plan: list[list[int]]) -> int:
    """The most hops from the origin to any host in any stripe (host 0 is one hop)."""
    deepest = 0
    for s in range(len(plan[0]) if plan else 0):
        children: dict[int, list[int]] = {}
        for host in range(1, len(plan)):
            children.setdefault(plan[host][s], []).append(host)
        hops, queue = {0: 1}, [0]
        for host in queue:
            for child in children.get(host, []):
                hops[child] = hops[host] + 1
                queue.append(child)
        deepest = max(deepest, *hops.values())
    return deepest


def fanout_stripes(hosts: int, models: Sequence[LockedModel]) -> int:
    """Stripes for cut-through (every file has pieces), 0 for store-and-forward.

    With `d` stripes a host receives each stripe at 1/d of its link and sends one stripe to d hosts, so a piece takes
    d x piece / link a hop and the last host has everything after about (size + d x piece x depth) / link: the d that
    minimises d x depth (a chain for a couple of hosts, then 2 to 3 stripes; 2,600 or 10,000 hosts: 3).
    """
    files = [f for m in models for f in m.files if f.size]
    if not files or not all(f.pieces for f in files):
        return 0
    return min(range(1, MAX_STRIPES + 1), key=lambda d: (d * depth(stripe_plan(hosts, d)), d))


@dataclass
class Run:
    """What the hosts of one run tell each other: who serves (in the order they joined), who failed, how many peers each serves now.

    Every host starts its peer server before it fetches, then joins; the first host (the root) joins first and
    fetches from the origin. Store-and-forward (files without pieces): every other host takes each file from the
    earliest host that joined before it and serves fewer than FANOUT peers, as soon as that host has verified the
    file, with the other hosts before it as fallbacks; files flow one way down the join order, so no two hosts ever
    wait on each other. Cut-through (`stripes`, every file has pieces): each host takes stripe s from its source in
    `stripe_plan` (hosts in the inventory's order, every host running at once), waiting up to JOIN_SECONDS for that
    source to join, and from the source's own source when it failed or did not join. A host with no live host to
    take from (every one before it failed, or the root did) fetches from the origin itself.
    """

    root: str
    hosts: Sequence[str] = ()  # the inventory's order: positions in the stripe plan
    stripes: int = 0  # 0: store-and-forward
    token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    order: list[str] = field(default_factory=list)  # hosts serving, in the order they joined
    urls: dict[str, str] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)
    serving: Counter[str] = field(default_factory=Counter)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        self.plan = stripe_plan(len(self.hosts), self.stripes) if self.stripes else []
        self.position = {name: i for i, name in enumerate(self.hosts)}  # a list's index() per host would be quadratic at 10,000 hosts

    def join(self, name: str, url: str) -> None:
        """`name` serves at `url` from now on; any host but the root joins after the root (or after the root failed)."""
        with self.cond:
            while name != self.root and self.root not in self.order and self.root not in self.failed:
                self.cond.wait()
            self.order.append(name)
            self.urls[name] = url
            self.cond.notify_all()

    def acquire(self, name: str) -> tuple[str | None, list[str]]:
        """Wait for a source: (its name, its URLs then the fallbacks), or (None, []) for the origin. Striped: one URL a stripe first."""
        if self.stripes:
            return self._acquire_stripes(name)
        with self.cond:
            while True:
                before = [h for h in self.order[: self.order.index(name)] if h not in self.failed]
                if not before:
                    return None, []
                free = [h for h in before if self.serving[h] < FANOUT]
                if free:
                    source = free[0]  # the earliest: the tree stays shallow
                    self.serving[source] += 1
                    return source, [self.urls[source], *[self.urls[h] for h in before if h != source][: 2 * FANOUT]]
                self.cond.wait()

    def _acquire_stripes(self, name: str) -> tuple[str | None, list[str]]:
        me = self.position[name]
        sources = []
        with self.cond:
            for s in range(self.stripes):
                source = self.plan[me][s]
                while source >= 0:
                    host = self.hosts[source]
                    deadline = time.monotonic() + JOIN_SECONDS
                    while host not in self.urls and host not in self.failed and time.monotonic() < deadline:
                        self.cond.wait(max(0.0, deadline - time.monotonic()))
                    if host in self.urls and host not in self.failed:
                        break
                    source = self.plan[source][s]  # failed, or never joined: its own source in this stripe
                if source < 0:
                    return None, []
                sources.append(self.hosts[source])
            # fallbacks: each stripe source's own sources, the nearest first
            fallbacks = [self.hosts[up] for src in sources for up in self.plan[self.position[src]] if up >= 0]
            live = [h for h in dict.fromkeys([*fallbacks, self.root]) if h in self.urls and h not in self.failed and h not in sources]
        return ",".join(dict.fromkeys(sources)), [self.urls[h] for h in sources] + [self.urls[h] for h in live[: 2 * self.stripes]]

    def release(self, name: str, source: str | None, *, ok: bool) -> None:
        """`name` is done fetching (from `source`); a host that failed serves no one (its server is stopped)."""
        with self.cond:
            if source is not None and not self.stripes:
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
        if run.stripes and source:
            sh.note(f"takes each piece as soon as it is verified, stripe by stripe from {source}, then from the hosts above them, then the origin")
        else:
            sh.note(f"takes each file from {source} as soon as it has verified it, then from the other hosts before it, then the origin"
                    if source else "fetches from the origin")
        stripes = ["--stripes", str(run.stripes)] if run.stripes and peers else []
        argv = rc.model_argv(host, "fetch", models=job.models) + ["--share"] + (["--peers", ",".join(peers), *stripes] if peers else ["--workers", str(ROOT_WORKERS)])
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
    # Stripes need every host running at once (a host may take a stripe from one after it in the inventory); with fewer at a time, or
    # without pieces, files pass down the join order. BAKEHOUSE_FANOUT_STRIPES overrides the choice (hosts whose links are not alike).
    stripes = fanout_stripes(len(reachable), job.selected) if job.rollout.parallel >= len(reachable) else 0
    if stripes:
        stripes = int(env_number("BAKEHOUSE_FANOUT_STRIPES", stripes, minimum=1, maximum=MAX_STRIPES))
    run = Run(reachable[0].name if reachable else "", hosts=[h.name for h in reachable], stripes=stripes)
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
