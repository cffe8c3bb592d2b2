"""Hostile and careless input: models.toml, models.lock, the store, the environment and flags, tried as an attacker would.

Every case runs the real commands against the local hub and git-lfs, next to a
canary tree outside the store that must be byte-identical afterwards; no
command may print a traceback, and each exits with its documented code.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import tomli_w

from testbed.helpers import HF_DEMO, ROOT, Hub, Project, manifest

INVOKE = [sys.executable, "-m", "invoke", "--search-root", str(ROOT)]
MODEL = "demo"


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under `root`: kind, bytes or link target, mode, mtime."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            if path.is_symlink():
                out[str(path)] = ("link", os.readlink(path))
            elif path.is_dir():
                out[str(path)] = ("dir", st.st_mode, st.st_mtime_ns)
            else:
                out[str(path)] = ("file", path.read_bytes(), st.st_mode, st.st_mtime_ns)
    return out


@pytest.fixture
def canary(tmp_path: Path) -> Iterator[Path]:
    """Files, a directory and link targets outside the store; the test fails if anything there changes."""
    root = tmp_path / "canary"
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "victim.txt").write_text("do not touch\n")
    (root / "dir" / "inner.bin").write_bytes(os.urandom(4096))
    (root / "dir" / "sub" / "model.safetensors").write_bytes(b"not yours")
    (root / "dir" / "config.json").write_text("{}")
    before = snapshot(root)
    yield root
    assert snapshot(root) == before, "something outside the store changed"


@pytest.fixture
def fetched(project: Project) -> Project:
    project.write_manifest('default = ["demo"]\n\n' + manifest(demo=HF_DEMO))
    assert project.run("lock").returncode == 0
    assert project.run("fetch").returncode == 0
    return project


def commit_of(project: Project) -> str:
    return tomllib.loads((project.dir / "models.lock").read_text())["models"][MODEL]["commit"]


def no_traceback(r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    return r


def run(project: Project, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return no_traceback(project.run(*args, env=project.env(**env)))


def edit_lock(project: Project, change: Callable[[dict], None]) -> None:
    data = tomllib.loads((project.dir / "models.lock").read_text())
    change(data)
    (project.dir / "models.lock").write_text(tomli_w.dumps(data))


# --- the lock's commit and revisions are never paths or options ------------------

@pytest.mark.parametrize("commit", ["/CANARY/dir", "../../../CANARY/dir", "--upload-pack=touch PWNED;git-upload-pack", "main", "a" * 40 + "/..", ""])
def test_a_hostile_commit_in_the_lock_is_refused_before_any_path_or_command(fetched: Project, canary: Path, commit: str) -> None:
    commit = commit.replace("CANARY", str(canary).lstrip("/"))
    edit_lock(fetched, lambda d: d["models"][MODEL].__setitem__("commit", commit))
    for command in ("fetch", "verify"):
        r = run(fetched, command)
        assert r.returncode == 2, r.stdout + r.stderr
        assert "models.demo.commit" in r.stderr and "40 lowercase hex digits" in r.stderr
    assert not (fetched.dir / "PWNED").exists()


def test_the_entrypoint_refuses_a_hostile_commit_offline(fetched: Project, canary: Path) -> None:
    edit_lock(fetched, lambda d: d["models"][MODEL].__setitem__("commit", f"../../../{canary}/dir"))
    r = no_traceback(subprocess.run([sys.executable, "-m", "app.entrypoint"], cwd=fetched.dir, capture_output=True, text=True, timeout=120,
                                    env=fetched.env(HF_HUB_OFFLINE="1")))
    assert r.returncode == 2 and "models.demo.commit" in r.stderr


def test_a_git_revision_that_reads_as_an_option_never_runs(hub: Hub, project: Project, tmp_path: Path) -> None:
    pwned = tmp_path / "PWNED"
    project.write_manifest(manifest(m=f'source = "{hub.git_url("bakehouse/demo-tiny")}"\nrevision = "--upload-pack=touch {pwned};git-upload-pack"'))
    r = run(project, "lock", "--models", "m")
    assert r.returncode == 2 and "models.m.revision" in r.stderr and "no leading '-'" in r.stderr
    assert not pwned.exists()


def test_a_git_commit_in_the_lock_that_reads_as_an_option_never_runs(hub: Hub, project: Project, tmp_path: Path) -> None:
    project.write_manifest(manifest(m=f'source = "{hub.git_url("bakehouse/demo-tiny")}"\nrevision = "main"'))
    assert run(project, "lock", "--models", "m").returncode == 0
    pwned = tmp_path / "PWNED"
    edit_lock(project, lambda d: d["models"]["m"].__setitem__("commit", f"--upload-pack=touch {pwned};git-upload-pack"))
    r = run(project, "fetch", "--models", "m")
    assert r.returncode == 2 and not pwned.exists()


@pytest.mark.parametrize(("source", "needle"), [("hf://../..", "hf://ORG/REPO"), ("hf://org/../x", "hf://ORG/REPO"), ("hf://-org/repo", "hf://ORG/REPO"),
                                                 ("git+https://host/repo.git\n--x", "spaces or control"), ("git+file://relative/path", "absolute path"),
                                                 ("ftp://x/y", "unsupported scheme"),
                                                 ("git+https://user:s3cret@host/repo.git", "must not carry credentials")])
def test_hostile_sources_are_refused_by_name(project: Project, source: str, needle: str) -> None:
    project.write_manifest(manifest(m=f"source = {tomli_w.dumps({'s': source}).split('=', 1)[1].strip()}\nrevision = \"main\""))
    r = run(project, "lock", "--models", "m")
    assert r.returncode == 2 and "models.m.source" in r.stderr and needle in r.stderr, r.stderr
    assert "s3cret" not in r.stdout + r.stderr


# --- drift between models.toml, models.lock and the source ----------------------

def test_an_include_glob_that_matches_nothing_is_refused_at_lock_time(project: Project) -> None:
    project.write_manifest(manifest(m='source = "hf://bakehouse/demo-tiny"\nrevision = "main"\ninclude = ["*.safetensors", "*.gguf"]'))
    r = run(project, "lock", "--models", "m")
    assert r.returncode == 2 and "models.m.include: '*.gguf' matches no file" in r.stdout
    assert "m" not in tomllib.loads((project.dir / "models.lock").read_text())["models"]


def test_a_lock_whose_source_was_edited_is_stale(fetched: Project) -> None:
    edit_lock(fetched, lambda d: d["models"][MODEL].__setitem__("source", "hf://attacker/weights"))
    r = run(fetched, "fetch")
    assert r.returncode == 2 and "does not match its models.toml entry" in r.stderr and "lock-models" in r.stderr


# --- expected failures: exit 2 naming what is wrong, never a traceback ----------

@pytest.mark.parametrize(("change", "needle"), [
    (lambda d: d.__setitem__("models", 5), "'models' must be a table"),
    (lambda d: d["models"][MODEL].__setitem__("files", "x"), "models.demo.files: expected list"),
    (lambda d: d["models"][MODEL]["files"][0].__setitem__("size", True), "size: expected int"),
    (lambda d: d["models"][MODEL]["files"][0].__setitem__("size", -1), "is negative"),
    (lambda d: d["models"][MODEL]["files"][0].__setitem__("path", "../../etc/passwd"), "refusing file path"),
    (lambda d: d["models"][MODEL].__setitem__("files", []), "lists no file"),
    (lambda d: d.__setitem__("default", ["nope"]), "'default' must list"),
    (lambda d: d["models"].__setitem__("-x", d["models"][MODEL]), "model name"),
])
def test_a_malformed_lock_is_exit_2_naming_the_key(fetched: Project, change: Callable[[dict], None], needle: str) -> None:
    edit_lock(fetched, change)
    r = run(fetched, "verify", "--models", "all")
    assert r.returncode == 2 and needle in r.stderr, r.stderr


@pytest.mark.parametrize("flags", [["--lock", "DIR"], ["--manifest", "DIR"], ["--workers", "-1"], ["--workers", "abc"], ["--workers", "1e9"],
                                   ["--lock", "BINARY"], ["--manifest", "BINARY"]])
def test_bad_flags_and_unreadable_files_are_exit_2(fetched: Project, tmp_path: Path, flags: list[str]) -> None:
    (tmp_path / "binary").write_bytes(b"\xff\xfe[models]\x00\x81")
    flags = [{"DIR": str(tmp_path), "BINARY": str(tmp_path / "binary")}.get(f, f) for f in flags]
    r = run(fetched, "fetch", *flags)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "error:" in r.stderr and (flags[1] in r.stderr or flags[0] in r.stderr)


def test_bad_settings_in_the_environment_are_exit_2(fetched: Project, tmp_path: Path) -> None:
    (fetched.store / MODEL).rename(tmp_path / "moved")  # a download is needed: progress reporting starts
    r = run(fetched, "fetch", BAKEHOUSE_PROGRESS_SECONDS="abc")
    assert r.returncode == 2 and "BAKEHOUSE_PROGRESS_SECONDS='abc' is not a number" in r.stdout + r.stderr
    for env in ({"PORT": "99999"}, {"PORT": "abc"}, {"BAKEHOUSE_MAX_BATCH": "-3"}):
        app = no_traceback(subprocess.run([sys.executable, "-m", "app.entrypoint"], cwd=fetched.dir, capture_output=True, text=True, timeout=60,
                                          env=fetched.env(HF_HUB_OFFLINE="1", **env)))
        assert app.returncode == 2 and next(iter(env)) in app.stderr, app.stderr
    serve = no_traceback(subprocess.run([*INVOKE, "serve", "--port", "abc"], cwd=fetched.dir, capture_output=True, text=True, timeout=60, env=fetched.env()))
    assert serve.returncode == 2 and "--port='abc' is not a whole number" in serve.stderr


def test_a_directory_where_a_model_file_belongs_is_repaired(fetched: Project, canary: Path) -> None:
    path = fetched.store / MODEL / "current" / "config.json"
    path.unlink()
    (path / "nested").mkdir(parents=True)
    (path / "nested" / "x").write_text("planted")
    for _ in range(2):  # and again: a re-run must not get worse
        r = run(fetched, "fetch")
        assert r.returncode == 0, r.stdout + r.stderr
    assert run(fetched, "verify", "--full").returncode == 0
    assert path.is_file() and (fetched.store / MODEL / "current").resolve().name == commit_of(fetched)


def test_a_read_only_store_that_verifies_is_up_to_date(fetched: Project, read_only: Callable[[Path], Path]) -> None:
    ro = read_only(fetched.store)
    r = run(fetched, "fetch", "--dest", str(ro))
    assert r.returncode == 0 and "up-to-date" in r.stdout, r.stdout + r.stderr
    (fetched.store / MODEL / "current" / "config.json").write_text("{}")
    again = run(fetched, "fetch", "--dest", str(ro))
    assert again.returncode == 2 and "read-only" in again.stdout and "config.json" in again.stdout


# --- the store never follows a link it did not make -----------------------------

LINK_SITES = {
    ".staging": lambda p, c: p.store / ".staging",
    "lock file": lambda p, c: p.store / ".staging" / f"{MODEL}.lock",
    "model staging": lambda p, c: p.store / ".staging" / MODEL,
    "model dir": lambda p, c: p.store / MODEL,
    "commit dir": lambda p, c: p.store / MODEL / c,
    "a file": lambda p, c: p.store / MODEL / c / "config.json",
    "the stamp": lambda p, c: p.store / MODEL / c / ".verified",
    "a subdirectory": lambda p, c: p.store / MODEL / c / "sub",
}


@pytest.mark.parametrize("site", LINK_SITES)
def test_a_link_planted_in_the_store_is_reported_never_followed(fetched: Project, canary: Path, site: str) -> None:
    commit = commit_of(fetched)
    (fetched.store / ".staging" / f"{MODEL}.lock").touch()
    at = LINK_SITES[site](fetched, commit)
    target = canary / ("victim.txt" if site in ("lock file", "a file", "the stamp") else "dir")
    if at.is_dir() and not at.is_symlink():
        os.rename(at, at.with_name(at.name + ".moved"))
    else:
        at.unlink(missing_ok=True)
    at.symlink_to(target)
    for command in ("fetch", "verify", "fetch"):  # a re-run does not get worse
        r = run(fetched, command, "--full") if command == "verify" else run(fetched, command)
        assert r.returncode == 1, f"{command}: {r.stdout}{r.stderr}"
        assert str(at) in r.stdout + r.stderr and "symlink" in r.stdout + r.stderr
    assert at.is_symlink() and os.readlink(at) == str(target)


def test_a_link_planted_at_a_partial_download_is_reported(fetched: Project, canary: Path) -> None:
    commit = commit_of(fetched)
    (fetched.store / MODEL).rename(fetched.dir / "moved")
    partial = fetched.store / ".staging" / MODEL / f"{commit}.partial" / "model.safetensors"
    partial.parent.mkdir(parents=True)
    partial.symlink_to(canary / "victim.txt")
    r = run(fetched, "fetch")
    assert r.returncode == 1 and str(partial) in r.stdout + r.stderr


def test_a_foreign_current_is_repointed_inside_the_store(fetched: Project, canary: Path) -> None:
    link = fetched.store / MODEL / "current"
    link.unlink()
    link.symlink_to(canary / "dir")
    assert run(fetched, "verify").returncode == 1
    r = run(fetched, "fetch")
    assert r.returncode == 0 and "activated" in r.stdout, r.stdout + r.stderr
    assert os.readlink(link) == commit_of(fetched)


def test_a_half_moved_commit_is_finished_on_the_next_fetch(fetched: Project) -> None:
    commit = commit_of(fetched)
    staging = fetched.store / ".staging" / MODEL / commit
    staging.parent.mkdir(parents=True, exist_ok=True)
    os.rename(fetched.store / MODEL / commit, staging)  # crashed between the move to staging and the promotion
    assert run(fetched, "verify").returncode == 1
    r = run(fetched, "fetch", HF_ENDPOINT="http://127.0.0.1:9")  # no network needed: the files are all in staging
    assert r.returncode == 0, r.stdout + r.stderr
    assert run(fetched, "verify", "--full").returncode == 0


# --- secrets in URLs, and messages ---------------------------------------------

def test_credentials_in_the_endpoint_are_never_printed(fetched: Project, tmp_path: Path) -> None:
    (fetched.store / MODEL).rename(tmp_path / "moved")
    r = run(fetched, "fetch", HF_ENDPOINT="http://deployer:s3cretPw@127.0.0.1:9")
    assert r.returncode == 3
    assert "s3cretPw" not in r.stdout + r.stderr and "deployer" not in r.stdout + r.stderr and "***@127.0.0.1:9" in r.stdout + r.stderr


def test_a_fetch_waiting_for_another_says_whose_lock_and_since_when(fetched: Project, tmp_path: Path) -> None:
    (fetched.store / MODEL).rename(tmp_path / "moved")
    lock = fetched.store / ".staging" / f"{MODEL}.lock"
    with open(lock, "r+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("ci@runner-7 pid 4242 since 2026-11-22T10:00:00+00:00 (fetch)\n")
        held.flush()
        proc = subprocess.Popen([sys.executable, "-m", "ops.models", "fetch"], cwd=fetched.dir, env=fetched.env(BAKEHOUSE_PROGRESS_SECONDS="0.2"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(2)
        assert proc.poll() is None, proc.communicate()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    assert err.count("demo: waiting for ci@runner-7 pid 4242 since 2026-11-22T10:00:00+00:00 (fetch), which holds") >= 3, err


class Refusing(BaseHTTPRequestHandler):
    """A git or file server that answers every request with the status in the path's first segment (and notes the credentials it got)."""

    authorizations: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        Refusing.authorizations.append(self.headers.get("authorization", ""))
        status = int(self.path.split("/")[1])
        self.send_response(status)
        if status == 401:
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
        self.send_header("Content-Length", "7")
        self.end_headers()
        self.wfile.write(b"refused")

    do_HEAD = do_GET  # noqa: N815  # http.server's name for the handler

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def refusing() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_git_authentication_and_http_refusals_say_what_they_are(project: Project, refusing: str) -> None:
    project.write_manifest(manifest(
        private=f'source = "git+{refusing}/401/repo.git"\nrevision = "main"',
        bad=f'source = "{refusing}/400/model.safetensors"\nsha256 = "{"a" * 64}"',
        limited=f'source = "{refusing}/429/model.safetensors"\nsha256 = "{"a" * 64}"',
    ))
    private = run(project, "lock", "--models", "private")
    assert private.returncode == 3 and "authentication refused" in private.stdout and "git-lfs" not in private.stdout, private.stdout
    bad = run(project, "lock", "--models", "bad")
    assert bad.returncode == 3 and "refused the request (HTTP 400" in bad.stdout and "Retry later" not in bad.stdout, bad.stdout
    limited = run(project, "lock", "--models", "limited")
    assert limited.returncode == 3 and "rate limited (HTTP 429)" in limited.stdout, limited.stdout


# --- the inventory as untrusted input -------------------------------------------------

def test_the_ansible_engine_refuses_connection_commands_from_the_inventory(fetched: Project, tmp_path: Path) -> None:
    """A ProxyCommand in ansible_ssh_common_args would run on this machine: refused (exit 2, host and variable named) before ansible-playbook runs."""
    pwned = tmp_path / "pwned"
    evil = tmp_path / "evil.yml"
    evil.write_text("all:\n  hosts:\n    web1:\n      ansible_host: 127.0.0.1\n"
                    f"      ansible_ssh_common_args: -o ProxyCommand=\"sh -c 'id > {pwned}'\"\n")
    base = [*INVOKE, "fetch-models", "--inventory", str(evil), "--hosts", "web1", "--engine", "ansible", "--lock", str(fetched.dir / "models.lock")]
    r = no_traceback(subprocess.run(base, cwd=fetched.dir, env=fetched.env(), capture_output=True, text=True, timeout=300))
    assert r.returncode == 2 and "web1: ansible_ssh_common_args" in r.stderr and "BAKEHOUSE_TRUST_INVENTORY" in r.stderr, r.stdout + r.stderr
    assert not pwned.exists()
    evil.write_text("all:\n  hosts:\n    web1:\n      ansible_host: 127.0.0.1\n      ansible_connection: local\n")
    r = no_traceback(subprocess.run(base, cwd=fetched.dir, env=fetched.env(), capture_output=True, text=True, timeout=300))
    assert r.returncode == 2 and "web1: ansible_connection" in r.stderr
    evil.write_text("all:\n  hosts:\n    web1:\n      ansible_host: 127.0.0.1\n      ansible_python_interpreter: /usr/bin/python3 -c 'import os'\n")
    r = no_traceback(subprocess.run(base, cwd=fetched.dir, env=fetched.env(), capture_output=True, text=True, timeout=300))
    assert r.returncode == 2 and "web1: ansible_python_interpreter" in r.stderr


@pytest.mark.parametrize(("hostvars", "needle"), [
    ("app_env: {PYTHONWARNINGS: 'all:0:antigravity.x:0:0', BROWSER: \"/bin/sh -c 'id > /tmp/x' #%s\"}", "app_env PYTHONWARNINGS is not an app setting"),
    ("app_env: {LD_PRELOAD: /tmp/evil.so}", "app_env LD_PRELOAD is not an app setting"),
    ("app_env: {PYTHONPATH: /tmp/evil}", "app_env PYTHONPATH is not an app setting"),
    ('app_env: {BAKEHOUSE_MAX_BATCH: "4\\u2028HF_ENDPOINT=http://evil"}', "line or paragraph separator"),
    ('service: "bakehouse\\n"', "service"),
    ('ansible_host: "10.0.0.1\\n"', "ansible_host"),
    ("secrets: [AWS_SECRET_ACCESS_KEY_NOT_SET_HERE]", "AWS_SECRET_ACCESS_KEY_NOT_SET_HERE not set in this environment"),
])
def test_deploy_refuses_hostile_host_variables_before_touching_a_host(fetched: Project, tmp_path: Path, hostvars: str, needle: str) -> None:
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(f"all:\n  hosts:\n    web1:\n      ansible_host: 192.0.2.1\n      runtime: bare\n      {hostvars}\n")
    r = no_traceback(subprocess.run([*INVOKE, "deploy", "--inventory", str(inventory), "--hosts", "web1", "--tag", "v1", "--dry-run"], cwd=fetched.dir,
                                    env=fetched.env(), capture_output=True, text=True, timeout=300))
    assert r.returncode == 2 and needle in r.stderr, r.stdout + r.stderr


def test_a_tag_with_a_trailing_newline_is_refused(fetched: Project, tmp_path: Path) -> None:
    inventory = tmp_path / "hosts.yml"
    inventory.write_text("all:\n  hosts:\n    web1:\n      ansible_host: 192.0.2.1\n      runtime: bare\n")
    r = no_traceback(subprocess.run([*INVOKE, "deploy", "--inventory", str(inventory), "--hosts", "web1", "--tag", "v1\n", "--dry-run"], cwd=fetched.dir,
                                    env=fetched.env(), capture_output=True, text=True, timeout=300))
    assert r.returncode == 2 and "release version" in r.stderr, r.stdout + r.stderr


def test_the_supervisor_reads_env_files_by_newlines_only(tmp_path: Path) -> None:
    from ops.deploy.supervise import read_env_file

    f = tmp_path / "app.env"
    f.write_text("BAKEHOUSE_MAX_BATCH=4\u2028HF_ENDPOINT=http://evil\nMODEL=demo\n")
    assert read_env_file(f) == {"BAKEHOUSE_MAX_BATCH": "4\u2028HF_ENDPOINT=http://evil", "MODEL": "demo"}


@pytest.mark.parametrize(("args", "env", "needle"), [
    (["verify", "--dest", "/etc/hostname"], {}, "--dest /etc/hostname: is a file, not a directory"),
    (["verify"], {"MODELS_DIR": "/etc/hostname"}, "MODELS_DIR /etc/hostname: is a file, not a directory"),
    (["fetch"], {"HF_ENDPOINT": "http://[::1"}, "HF_ENDPOINT='http://[::1' is not a valid URL"),
    (["fetch"], {"HF_ENDPOINT": "http://127.0.0.1:99999/hub?token=sekrit-token-value"}, "?token=***"),
])
def test_a_store_that_is_a_file_and_a_malformed_endpoint_are_exit_2_not_tracebacks(fetched: Project, args: list[str], env: dict[str, str],
                                                                                   needle: str) -> None:
    r = no_traceback(run(fetched, *args, **env))
    assert r.returncode == 2 and needle in r.stderr and "sekrit" not in r.stdout + r.stderr, r.stderr


def test_git_repo_url_credentials_reach_git_as_a_header_never_its_argv_or_the_disk(fetched: Project, refusing: str, tmp_path: Path) -> None:
    """The first seed's GIT_REPO_URL=http://user:password@…: git gets the credentials as an Authorization header from its environment."""
    import base64

    url = refusing.replace("http://", "http://deployer:s3cret-git-pw@") + "/401/private.git"
    store = tmp_path / "models"
    seen: list[str] = []
    Refusing.authorizations.clear()
    proc = subprocess.Popen([sys.executable, "-m", "app.entrypoint"], cwd=fetched.dir, env=fetched.env(GIT_REPO_URL=url, MODELS_DIR=str(store), MODEL="seed"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while proc.poll() is None:
        seen.append(subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=False).stdout)
        time.sleep(0.05)
    out = proc.stdout.read() if proc.stdout else ""
    assert proc.returncode == 3 and "authentication refused" in out, out
    assert f"Basic {base64.b64encode(b'deployer:s3cret-git-pw').decode()}" in Refusing.authorizations
    assert not any("s3cret-git-pw" in s for s in seen) and "s3cret-git-pw" not in out
    on_disk = [p for p in store.rglob("*") if p.is_file() and b"s3cret-git-pw" in p.read_bytes()] if store.exists() else []
    assert not on_disk
