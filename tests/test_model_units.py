"""Pure functions with plain data: manifest and lock parsing, path safety, diffs, argv builders."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from ops.errors import LockError, ManifestError, StaleLockError, UnsafePathError, redact
from ops.models.lock import Lock, LockedFile, LockedModel, dump_lock, parse_lock, safe_relpath
from ops.models.manifest import parse_manifest, spec_fingerprint
from ops.models.sources.git import cat_file_argv, fetch_argv, lfs_fetch_argv, parse_cat_file_batch, parse_ls_tree, select
from ops.models.verify import LfsPointer, Observed, diff, parse_lfs_pointer
from ops.units import format_bytes

M = Path("models.toml")
POINTER = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"a" * 64 + b"\nsize 58000000\n"


def model(*files: tuple[str, int, str]) -> LockedModel:
    return LockedModel(name="m", source="hf://o/r", revision="main", commit="c" * 40, spec="0" * 16, files=tuple(LockedFile(*f) for f in files))


def test_manifest_parses_every_source_kind() -> None:
    data = tomllib.loads(Path(__file__).parent.parent.joinpath("models.toml").read_text())
    manifest = parse_manifest(data, M)
    assert manifest.default == ("demo",)
    assert {m.scheme for m in manifest.models.values()} == {"hf://", "git+https://"}
    assert manifest.models["neuroq"].allow_pickle


@pytest.mark.parametrize(
    ("table", "needle"),
    [
        ({"models": {"a": {"source": "ftp://x", "revision": "main"}}}, "models.a.source"),
        ({"models": {"a": {"source": "hf://o/r", "revison": "main"}}}, "models.a.revison: unknown key"),
        ({"models": {"a": {"revision": "main"}}}, "missing required key 'source'"),
        ({"models": {"a": {"source": "hf://o/r"}}}, "models.a.revision: required"),
        ({"models": {"a": {"source": "https://x/f.bin"}}}, "models.a.sha256"),
        ({"models": {"a": {"source": "hf://o/r", "revision": "main", "include": "*.json"}}}, "models.a.include"),
        ({"models": {"a": {"source": "hf://o/r", "revision": "main", "bake": "yes"}}}, "models.a.bake: expected a bool"),
        ({"models": {"a": {"source": "hf://o", "revision": "main"}}}, "hf://ORG/REPO"),
        ({"default": ["b"], "models": {"a": {"source": "hf://o/r", "revision": "main"}}}, "'default' names 'b'"),
        ({}, "no [models.NAME] table"),
    ],
)
def test_bad_manifest_names_the_key(table: dict, needle: str) -> None:
    with pytest.raises(ManifestError, match=None) as err:
        parse_manifest(table, M)
    assert needle in str(err.value)


def test_spec_fingerprint_changes_with_include() -> None:
    a = parse_manifest({"models": {"a": {"source": "hf://o/r", "revision": "main"}}}, M).models["a"]
    b = parse_manifest({"models": {"a": {"source": "hf://o/r", "revision": "main", "include": ["*.json"]}}}, M).models["a"]
    assert spec_fingerprint(a) != spec_fingerprint(b)


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../b", "a//b", "", "a\\b", "./a", ".verified", "sub/.verified"])
def test_unsafe_paths_are_refused(bad: str) -> None:
    with pytest.raises(UnsafePathError):
        safe_relpath(bad)


def test_safe_paths_pass() -> None:
    assert safe_relpath("sub/dir/model.safetensors") == "sub/dir/model.safetensors"


def test_lock_round_trips_and_sorts() -> None:
    m = model(("b.json", 2, "b" * 64), ("a.safetensors", 1, "a" * 64))
    text = dump_lock(Lock(path=Path("x"), models={"m": m}, default=("m",)))
    back = parse_lock(tomllib.loads(text), Path("x"))
    assert [f.path for f in back.models["m"].files] == ["a.safetensors", "b.json"]
    assert back.models["m"].digest() == m.digest()
    assert text.startswith("# models.lock")


def test_lock_with_escaping_path_is_refused() -> None:
    data = {"version": 1, "models": {"m": {"source": "hf://o/r", "commit": "c" * 40, "spec": "0" * 16, "files": [{"path": "../../etc/cron.d/x", "size": 1, "sha256": "a" * 64}]}}}
    with pytest.raises(UnsafePathError, match=r"etc/cron\.d"):
        parse_lock(data, Path("models.lock"))


def test_lock_with_bad_hash_is_refused() -> None:
    data = {"version": 1, "models": {"m": {"source": "hf://o/r", "commit": "c" * 40, "spec": "0" * 16, "files": [{"path": "a", "size": 1, "sha256": "nothex"}]}}}
    with pytest.raises(LockError, match="lock-models"):
        parse_lock(data, Path("models.lock"))


def test_lock_select_reports_stale_entry() -> None:
    manifest = parse_manifest({"models": {"m": {"source": "hf://o/r", "revision": "v2"}}}, M)
    lock = Lock(path=Path("models.lock"), models={"m": model(("a", 1, "a" * 64))})
    with pytest.raises(StaleLockError, match="lock-models --models m"):
        lock.select(["m"], manifest)


def test_lock_select_unknown_model() -> None:
    with pytest.raises(LockError, match="no entry for 'zzz'"):
        Lock(path=Path("models.lock")).select(["zzz"])


def test_parse_lfs_pointer() -> None:
    assert parse_lfs_pointer(POINTER) == LfsPointer(oid="a" * 64, size=58000000)
    assert parse_lfs_pointer(b"{}") is None


def test_diff_reports_each_problem_kind() -> None:
    m = model(("ok", 1, "1" * 64), ("gone", 1, "1" * 64), ("short", 5, "1" * 64), ("flip", 1, "1" * 64), ("ptr", 58000000, "a" * 64), ("link", 1, "1" * 64))
    observed = {
        "ok": Observed("file", 1, "1" * 64),
        "short": Observed("file", 3, None),
        "flip": Observed("file", 1, "2" * 64),
        "ptr": Observed("file", len(POINTER), None, parse_lfs_pointer(POINTER)),
        "link": Observed("symlink"),
    }
    problems = {p.path: p for p in diff(m, observed)}
    assert set(problems) == {"gone", "short", "flip", "ptr", "link"}
    assert problems["gone"].kind == "missing"
    assert problems["short"].kind == "size" and "size 3 bytes, expected 5" in problems["short"].message
    assert problems["flip"].kind == "sha256" and "2" * 64 in problems["flip"].message and "1" * 64 in problems["flip"].message
    assert problems["ptr"].kind == "lfs-pointer" and "Git LFS pointer" in problems["ptr"].message and "git lfs pull" in problems["ptr"].message
    assert problems["link"].kind == "symlink"


def test_git_argv_builders() -> None:
    repo = Path("/s/m.partial")
    assert fetch_argv(repo, "file:///r", "main") == ["git", "-C", "/s/m.partial", "fetch", "--quiet", "--depth", "1", "--no-tags", "--end-of-options", "file:///r", "main"]
    assert lfs_fetch_argv(repo, "abc", ["a.pt", "b.pt"]) == ["git", "-C", "/s/m.partial", "lfs", "fetch", "--include=a.pt,b.pt", "--", "origin", "abc"]
    assert cat_file_argv(repo)[-2:] == ["cat-file", "--batch"]


def test_git_output_parsers() -> None:
    tree = b"100644 blob aaa     132\tw.pt\x00120000 blob bbb      4\tlink\x00160000 commit ccc       -\tsub\x00"
    entries = parse_ls_tree(tree)
    assert [(e.path, e.size, e.kind) for e in entries] == [("w.pt", 132, "blob"), ("link", 4, "blob"), ("sub", 0, "commit")]
    assert [e.path for e in select(entries[:1] + entries[2:], ["*.pt"], [])] == ["w.pt"]
    with pytest.raises(UnsafePathError, match="symlink"):
        select(entries, [], [])
    batch = b"aaa blob 3\nabc\nbbb blob 0\n\n"
    assert parse_cat_file_batch(batch, 2) == [b"abc", b""]


def test_format_bytes_and_redact() -> None:
    assert format_bytes(999) == "999 B"
    assert format_bytes(1500) == "1.5 KB"
    assert format_bytes(58_000_000) == "58.0 MB"
    assert "secret" not in redact("https://user:secret@host/repo.git failed")
    assert "hf_abcdefghijk" not in redact("token hf_abcdefghijk leaked")


def test_log_records_are_redacted_for_handlers_added_later_and_keep_their_arguments_otherwise() -> None:
    """A library's handler added after configure_logging (the hub client is imported late) prints redacted text, tracebacks
    included; a record with nothing to redact keeps its arguments, which uvicorn's access formatter unpacks itself."""
    import io
    import logging

    from uvicorn.logging import AccessFormatter

    from ops.settings import configure_logging

    before = logging.getLogRecordFactory()
    configure_logging()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access = logging.StreamHandler(stream)
    access.setFormatter(AccessFormatter('%(client_addr)s "%(request_line)s" %(status_code)s', use_colors=False))
    late, access_log = logging.getLogger("late.library"), logging.getLogger("late.access")
    late.addHandler(handler)
    access_log.addHandler(access)
    access_log.setLevel(logging.INFO)
    try:
        late.warning("downloading from %s", "http://deployer:s3cretPw@hub.example/x")
        try:
            raise OSError("http://deployer:s3cretPw@hub.example/y refused")
        except OSError:
            late.exception("failed")
        access_log.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", "/health", "1.1", 200)
    finally:
        late.removeHandler(handler)
        access_log.removeHandler(access)
        access_log.setLevel(logging.NOTSET)
        logging.setLogRecordFactory(before)
    out = stream.getvalue()
    assert "s3cretPw" not in out and "deployer" not in out, out
    assert "downloading from http://***@hub.example/x" in out and "OSError: http://***@hub.example/y refused" in out, out  # traceback included
    assert '127.0.0.1:5000 "GET /health HTTP/1.1" 200' in out, out


def test_the_controller_verify_and_peers_start_without_the_hub_client() -> None:
    """The hub client costs ~0.6 s of a core to import; only a fetch from a hub or https source needs it (fleet start-up, every
    host's verify and peer server were paying it)."""
    import subprocess
    import sys

    code = ("import sys, tasks, ops.models.cli, ops.models.peer_client, ops.models.peer_server; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'huggingface_hub', 'httpx2'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_an_errors_data_survives_a_hosts_report() -> None:
    from ops.errors import DiskSpaceError
    from ops.models.report import Outcome, Report

    sent = Report("fetch", [Outcome.failed("demo", DiskSpaceError("need 100 B, have 5 B at /models", need=100, have=5, path="/models"))],
                  error=DiskSpaceError("whole command", need=7, have=1, path="/x"))
    back = Report.from_json(sent.to_json())
    [error] = [o.error for o in back.outcomes]
    assert isinstance(error, DiskSpaceError) and (error.need, error.have, error.path) == (100, 5, "/models") and back.exit_code == 4
    assert isinstance(back.error, DiskSpaceError) and back.error.details() == {"need": 7, "have": 1, "path": "/x"}


def test_a_store_whose_parents_do_not_exist_yet_is_writable(tmp_path: Path) -> None:
    from ops.models.store import Store

    assert Store(tmp_path / "not" / "yet" / "models").writable()
