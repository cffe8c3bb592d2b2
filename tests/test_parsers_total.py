"""The parsers are total, and no configuration value ever lands in option position of an argv.

models.toml, models.lock and the inventory are input from pull requests: any
bytes in gives a valid object or a ConfigError (exit 2) out, never another
exception. Every argv builder is fed hostile values; each either refuses them
where they are parsed, or keeps them out of option position.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ops.deploy import bare, common, docker
from ops.deploy.target import target
from ops.errors import ConfigError
from ops.images.build import BuildSpec, build_argv, check_reference
from ops.images.registry import Registry, login_argv, push_argv
from ops.models.lock import load_lock, parse_lock
from ops.models.manifest import load_manifest, parse_manifest
from ops.models.sources.git import fetch_argv, lfs_fetch_argv, ls_tree_argv
from ops.remote import commands as rc
from ops.remote.inventory import load_inventory, parse_inventory

HOSTILE = ["-oProxyCommand=touch /tmp/pwned", "--upload-pack=touch pwned", "../../etc", "/etc/passwd", "a b", "$(touch pwned)", "`id`", "x;rm -rf /",
           "x\nINJECTED=1", "-", "--", "", "\x00", "☃", "a" * 5000]
text = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=40))
scalar = st.one_of(text, st.integers(), st.booleans(), st.none(), st.floats(allow_nan=True))
value = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(text, inner, max_size=4)), max_leaves=12)
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def total(parse: Any, *args: Any) -> Any:
    """A valid object, or a ConfigError: nothing else may come out."""
    try:
        return parse(*args)
    except ConfigError:
        return None


# --- any bytes in: a valid object or a ConfigError out ----------------------------

@FAST
@given(st.binary(max_size=400))
def test_any_bytes_as_a_manifest_lock_or_inventory(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("bytes") / "f"
    path.write_bytes(data)
    for load in (load_manifest, load_lock, load_inventory):
        total(load, path)


MANIFEST_KEYS = st.sampled_from(["source", "revision", "include", "exclude", "bake", "sha256", "allow_pickle"])
SOURCES = st.one_of(st.sampled_from(["hf://o/r", "git+file:///r", "https://h/f.bin", "hf://../..", "git+https://h/r.git", "http://h/"]), text)


@FAST
@given(st.dictionaries(text, st.dictionaries(MANIFEST_KEYS, st.one_of(SOURCES, value), max_size=7), max_size=3), st.one_of(st.none(), value))
def test_any_manifest_structure(models: dict, default: Any) -> None:
    data: dict[str, Any] = {"models": models} if default is None else {"models": models, "default": default}
    manifest = total(parse_manifest, data, Path("models.toml"))
    if manifest is not None:
        for spec in manifest.models.values():
            assert spec.source.startswith(("hf://", "git+", "http")) and not (spec.revision or "x").startswith("-")


FILE = st.fixed_dictionaries({"path": st.one_of(text, st.just("model.safetensors")), "size": st.one_of(st.integers(-5, 10**12), value),
                              "sha256": st.one_of(st.just("a" * 64), text)})
LOCKED = st.fixed_dictionaries({"source": SOURCES, "commit": st.one_of(st.just("c" * 40), st.just("a" * 64), text), "spec": st.one_of(st.just("0" * 16), text),
                                "files": st.one_of(st.lists(FILE, max_size=3), value)}, optional={"revision": text, "allow_pickle": value})


@FAST
@given(st.one_of(st.dictionaries(text, LOCKED, max_size=3), value), st.one_of(st.just(1), value))
def test_any_lock_structure(models: Any, version: Any) -> None:
    lock = total(parse_lock, {"version": version, "models": models}, Path("models.lock"))
    if lock is not None:
        for m in lock.models.values():
            assert re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", m.commit)
            assert all(not f.path.startswith(("/", "-")) and ".." not in f.path.split("/") for f in m.files)


HOST_KEYS = st.sampled_from(["ansible_host", "ansible_port", "ansible_user", "ansible_ssh_private_key_file", "runtime", "models_dir", "python", "prefix"])


@FAST
@given(st.dictionaries(text, st.one_of(st.none(), st.dictionaries(HOST_KEYS, value, max_size=8)), max_size=3), st.dictionaries(HOST_KEYS, value, max_size=3))
def test_any_inventory_structure(hosts: dict, group_vars: dict) -> None:
    inventory = total(parse_inventory, {"all": {"vars": group_vars, "children": {"gpu": {"hosts": hosts}}}}, Path("hosts.yml"))
    if inventory is not None:
        for h in inventory.hosts.values():
            assert not h.address.startswith("-") and not h.user.startswith("-")
            assert h.prefix.startswith("/") and h.models_dir.startswith("/") and ".." not in h.prefix and ".." not in h.models_dir


def test_an_alias_bomb_inventory_is_refused(tmp_path: Path) -> None:
    lines = ["a: &a {hosts: {h: null}}"] + [f"{c}: &{c} {{children: {{x1: *{p}, x2: *{p}, x3: *{p}, x4: *{p}}}}}" for p, c in zip("abcdefghij", "bcdefghijk", strict=True)]
    path = tmp_path / "hosts.yml"
    path.write_text("all:\n  children:\n" + "".join(f"    {line}\n" for line in lines))
    with pytest.raises(ConfigError, match="aliases are expanded"):
        load_inventory(path)


def test_the_shipped_files_parse() -> None:
    root = Path(__file__).resolve().parent.parent
    assert load_manifest(root / "models.toml").models and load_lock(root / "models.lock").models
    assert load_inventory(root / "inventory" / "hosts.yml").hosts


# --- no configuration value in option position ----------------------------------

def in_option_position(argv: list[str], hostile: str) -> list[str]:
    """argv elements carrying `hostile` that a program could read as an option: they start with '-' and no `--` came before."""
    found = []
    for i, arg in enumerate(argv):
        ended = any(a in ("--", "--end-of-options") for a in argv[:i])
        glued = re.match(r"^--[a-z-]+=", arg) is not None
        carries = arg == hostile if len(hostile) < 3 else hostile in arg  # "-" and "--" are in every flag; they count only alone
        separator = arg in ("--", "--end-of-options")
        if carries and arg.startswith("-") and not ended and not glued and not separator:
            found.append(arg)
    return found


HOST_VARS = ["ansible_host", "ansible_user", "models_dir", "prefix", "python", "model", "service", "container", "image", "gpus", "engine", "process_manager"]


@pytest.mark.parametrize("key", HOST_VARS)
@pytest.mark.parametrize("hostile", [h for h in HOSTILE if h])
def test_hostile_host_variables_are_refused_or_kept_out_of_option_position(key: str, hostile: str) -> None:
    data = {"all": {"hosts": {"gpu-1": {"ansible_host": "10.0.0.1", key: hostile}}}}
    try:
        host = parse_inventory(data, Path("hosts.yml")).hosts["gpu-1"]
        t = target(host, "demo")
    except ConfigError:
        return
    registry = Registry("reg.example:5000", "ci", "pw")
    port = t.instance_ports[0]
    argvs = [rc.model_argv(host, "fetch", models=["demo"]), *vars(rc.bootstrap(host, ["w.whl"], "d")).values(),
             bare.fetch_argv(t, "v1"), bare.switch_argv(t, "v1"), bare.prune_argv(t, ["v1"]), *bare.start_argvs(t, port), bare.stop_argv(t, port),
             bare.alive_argv(t, port), bare.logs_argv(t, port), bare.point_instance_argv(t, port, "v1"), bare.instance_version_argv(t, port),
             bare.install_proxy_argv(t, "d"), *bare.proxy_start_argvs(t, "python3"), bare.proxy_alive_argv(t, "python3"), *bare.retire_legacy_argvs(t),
             docker.run_argv(t, "reg/bakehouse:v1", port), docker.mkdir_argv(t), docker.stop_argv(t, port), docker.proxy_run_argv(t, "reg/bakehouse:v1"),
             *docker.retire_legacy_argvs(t), docker.login_argv(t, registry), docker.pull_argv(t, registry, "reg/b:v1"), common.lock_argv(t.prefix, "me"),
             rc.write_file_argv(bare.env_path(t, "v1")), rc.write_value_argv(bare.active_path(t), str(port)), common.gate_argv(t.host.python, port, bare.alive_argv(t, port))]
    for argv in argvs:
        if isinstance(argv, list):
            assert not in_option_position(argv, hostile), argv


@pytest.mark.parametrize("hostile", [h for h in HOSTILE if h])
def test_hostile_image_registry_and_git_values_are_refused_or_kept_out_of_option_position(hostile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for flag in ("--tag", "--base-image", "BAKEHOUSE_IMAGE"):
        with pytest.raises(ConfigError, match=flag):
            check_reference(flag, hostile)
    spec = BuildSpec(engine="docker", tags=(hostile,), context=Path("/src"), base_image=hostile, torch_index_url=hostile, proxies={"https_proxy": hostile},
                     labels={"GIT_SOURCE": hostile})
    assert not in_option_position(build_argv(spec), hostile)
    for key in ("BAKEHOUSE_REGISTRY", "BAKEHOUSE_REGISTRY_USER") if "\x00" not in hostile else ():  # no environment holds a NUL
        monkeypatch.setenv("BAKEHOUSE_REGISTRY", "reg.example:5000")
        monkeypatch.setenv("BAKEHOUSE_REGISTRY_USER", "ci")
        monkeypatch.setenv(key, hostile)
        try:
            registry = Registry.from_env()
        except ConfigError:
            continue
        for argv in (login_argv("podman", registry), push_argv("docker", registry, f"{registry.host}/bakehouse:v1")):
            assert not in_option_position(argv, hostile), argv
    repo = Path("/s/m.partial")
    for argv in (fetch_argv(repo, hostile, hostile), ls_tree_argv(repo, hostile), lfs_fetch_argv(repo, hostile, [hostile])):
        assert not in_option_position(argv, hostile), argv


def test_registry_settings_from_the_environment_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BAKEHOUSE_REGISTRY", "https://user:pw@reg.example")
    with pytest.raises(ConfigError, match="without scheme or credentials") as caught:
        Registry.from_env()
    assert "pw@" not in str(caught.value)
    monkeypatch.setenv("BAKEHOUSE_REGISTRY", "reg.example:5000")
    monkeypatch.setenv("BAKEHOUSE_REGISTRY_USER", "--password=x")
    with pytest.raises(ConfigError, match="BAKEHOUSE_REGISTRY_USER"):
        Registry.from_env()

