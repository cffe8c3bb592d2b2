"""`invoke build` and `invoke push`: plan the argv lists, run them in one place, report."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ops.errors import CommandError, ConfigError, ImageError, redact
from ops.images.build import (
    CPU_BASE,
    ENGINES,
    GPU_BASE,
    TORCH_CPU,
    BuildSpec,
    ContainerEngine,
    build_argv,
    build_env,
    check_reference,
    image_tag,
    inspect_size_argv,
    model_stage_cached,
)
from ops.images.registry import Registry, RegistryApi, compare_layers, login_argv, push_argv, remote_ref, split_ref, tag_argv
from ops.models.lock import Lock, load_lock
from ops.models.manifest import load_manifest
from ops.runner import run, run_streaming
from ops.units import format_bytes

LAST_IMAGE = Path("build") / "last-image"
WHEELS = Path("build") / "wheels"


def detect_engine(preferred: str | None = None) -> ContainerEngine:
    """Docker (BuildKit) when a Docker engine answers, else podman; `preferred` wins."""
    if preferred:
        if preferred not in ENGINES:
            raise ConfigError(f"--engine {preferred!r}: use docker or podman.")
        return "docker" if preferred == "docker" else "podman"
    if shutil.which("docker"):
        try:
            run(["docker", "info", "--format", "{{.ServerVersion}}"])
            return "docker"
        except CommandError:
            pass
    if shutil.which("podman"):
        return "podman"
    raise ConfigError("neither a Docker engine nor podman is available. Install one, or pass --engine.")


@dataclass
class BuildReport:
    image: str
    tags: list[str]
    engine: ContainerEngine
    seconds: float
    size: int
    models: dict[str, int] = field(default_factory=dict)
    model_stage_cached: bool | None = None
    argv: list[str] = field(default_factory=list)

    def render(self) -> str:
        lines = [f"image: {self.image}  ({format_bytes(self.size)}, built in {self.seconds:.1f}s with {self.engine})"]
        lines += [f"tag:   {t}" for t in self.tags[1:]]
        if self.models:
            lines += [f"baked: {name} ({format_bytes(size)})" for name, size in self.models.items()]
            cached = {True: "reused from cache", False: "rebuilt", None: "unknown"}[self.model_stage_cached]
            lines.append(f"model layer: {cached}")
        else:
            lines.append("baked: none (the image fetches models at start, or serves a mounted store)")
        return "\n".join(lines)


@dataclass(frozen=True)
class BuildRequest:
    context: Path
    bake: bool = False
    models: tuple[str, ...] = ()
    gpu: bool = False
    engine: str | None = None
    tag: str | None = None
    base_image: str | None = None
    torch_wheels: Path | None = None
    torch_index_url: str = ""
    ca_bundle: Path | None = None
    proxies: dict[str, str] = field(default_factory=dict)
    image_name: str = "bakehouse"
    no_cache: bool = False


def plan_build(req: BuildRequest, *, token_file: Path | None = None, endpoint_file: Path | None = None) -> BuildSpec:
    """Everything `build_argv` needs, from flags, models.toml/models.lock and the environment."""
    manifest = load_manifest(req.context / "models.toml")
    lock = load_lock(req.context / "models.lock")
    models: tuple[str, ...] = ()
    if req.bake:
        names = list(req.models) or [m.name for m in manifest.models.values() if m.bake]
        models = tuple(m.name for m in lock.select(names, manifest))
    revision = git_revision(req.context)
    tags = [check_reference("--tag", req.tag)] if req.tag else []
    tags.append(image_tag(check_reference("BAKEHOUSE_IMAGE", req.image_name), revision, models))
    loopback = urlsplit(os.environ.get("HF_ENDPOINT", "")).hostname in ("127.0.0.1", "localhost", "::1")
    base = req.base_image or (GPU_BASE if req.gpu else os.environ.get("BAKEHOUSE_BASE_IMAGE", CPU_BASE))
    return BuildSpec(
        engine=detect_engine(req.engine),
        tags=tuple(tags),
        context=req.context,
        models=models,
        base_image=check_reference("--base-image", base),
        torch_spec="" if req.gpu else TORCH_CPU,
        app_engine="vllm" if req.gpu else "transformers",
        torch_index_url=req.torch_index_url,
        endpoint_file=endpoint_file,
        token_file=token_file,
        ca_bundle=req.ca_bundle,
        proxies=req.proxies,
        network="host" if loopback else "",
        labels={"GIT_REVISION": revision, "GIT_SOURCE": git_source(req.context), "LOCK_DIGEST": lock_digest(lock, models)},
        no_cache=req.no_cache,
    )


def lock_digest(lock: Lock, models: tuple[str, ...]) -> str:
    """A short identity of the baked models' lock entries, for the image label."""
    if not models:
        return ""
    return hashlib.sha256("".join(lock.models[m].digest() for m in sorted(models)).encode()).hexdigest()[:16]


def git_revision(context: Path) -> str:
    try:
        rev = run(["git", "-C", str(context), "rev-parse", "--short=12", "HEAD"]).decode().strip()
        dirty = run(["git", "-C", str(context), "status", "--porcelain", "--untracked-files=no"]).strip()
    except CommandError:
        return "nogit"
    return f"{rev}-dirty" if dirty else rev


def git_source(context: Path) -> str:
    """The checkout's origin URL for the source label, without any credentials in it."""
    try:
        return redact(run(["git", "-C", str(context), "remote", "get-url", "origin"]).decode().strip()).replace("***@", "")
    except CommandError:
        return ""


@contextmanager
def secret_file(value: str | None) -> Iterator[Path | None]:
    """A 0600 file holding a secret for `--secret src=…`, removed afterwards."""
    if not value:
        yield None
        return
    fd, name = tempfile.mkstemp(prefix="bakehouse-secret-")
    try:
        os.write(fd, value.encode())
        os.close(fd)
        yield Path(name)
    finally:
        os.unlink(name)


def stage_wheels(context: Path, source: Path | None) -> None:
    """Hard-link local wheels (the CPU torch wheel) into build/wheels, the context folder the build mounts."""
    target = context / WHEELS
    target.mkdir(parents=True, exist_ok=True)
    for wheel in sorted(source.glob("*.whl")) if source else []:
        dest = target / wheel.name
        if not dest.exists():
            try:
                os.link(wheel, dest)
            except OSError:
                shutil.copy2(wheel, dest)


def build(req: BuildRequest, *, dry_run: bool = False, echo: bool = True) -> BuildReport:
    stage_wheels(req.context, req.torch_wheels)
    with secret_file(os.environ.get("HF_TOKEN")) as token_file, secret_file(os.environ.get("HF_ENDPOINT")) as endpoint_file:
        spec = plan_build(req, token_file=token_file, endpoint_file=endpoint_file)
        argv = build_argv(spec)
        if dry_run:
            return BuildReport(image=spec.tags[0], tags=list(spec.tags), engine=spec.engine, seconds=0, size=0, argv=argv)
        start = time.monotonic()
        try:
            output = run_streaming(argv, cwd=req.context, env=build_env(spec.engine)) if echo else run(argv, cwd=req.context, env=build_env(spec.engine)).decode()
        except CommandError as exc:
            raise ImageError(build_failure(exc), argv=argv, returncode=exc.returncode) from exc
        seconds = time.monotonic() - start
    image = spec.tags[0]
    size = int(run(inspect_size_argv(spec.engine, image)).decode().strip() or 0)
    lock = load_lock(req.context / "models.lock")
    (req.context / LAST_IMAGE).write_text(image)
    return BuildReport(
        image=spec.tags[0],
        tags=list(spec.tags),
        engine=spec.engine,
        seconds=seconds,
        size=size,
        models={m: lock.models[m].total_size for m in spec.models},
        model_stage_cached=model_stage_cached(output) if spec.models else None,
        argv=argv,
    )


def build_failure(exc: CommandError) -> str:
    """What a failed build most likely needs, from what the engine printed."""
    output = exc.stderr
    if "buildx component is missing" in output or "buildx: not found" in output:
        return ("this docker CLI has BuildKit on but no buildx plugin, which bakehouse's build secrets need. Install the buildx plugin "
                "(docker-buildx-plugin), put a docker CLI that builds with BuildKit first on PATH (Debian's docker.io: /usr/bin/docker), or pass --engine podman.")
    if "failed to resolve source metadata" in output or "pull access denied" in output or "manifest unknown" in output:
        return (f"the image build failed (exit {exc.returncode}): the engine could not find the base image. Pull or load it first "
                "(scripts/make-base-image.sh makes a local one), or pass --base-image.")
    return (f"the image build failed (exit {exc.returncode}); the engine's output is above. Common causes: the hub is unreachable from the build "
            "(set HF_ENDPOINT, proxies), a missing CA bundle behind a proxy (--ca-bundle).")


@dataclass
class PushReport:
    remote: str
    uploaded: int
    uploaded_bytes: int
    existing: int
    seconds: float
    argv: list[list[str]] = field(default_factory=list)

    def render(self) -> str:
        return (f"pushed {self.remote}: {self.uploaded} layer(s) uploaded ({format_bytes(self.uploaded_bytes)}), "
                f"{self.existing} already in the registry ({self.seconds:.1f}s)")


def push(context: Path, *, tag: str | None = None, engine: str | None = None, dry_run: bool = False) -> PushReport:
    registry = Registry.from_env()
    eng = detect_engine(engine)
    local = tag or last_image(context)
    remote = remote_ref(registry, local)
    steps = [login_argv(eng, registry), tag_argv(eng, local, remote), push_argv(eng, registry, remote)]
    if dry_run:
        return PushReport(remote=remote, uploaded=0, uploaded_bytes=0, existing=0, seconds=0, argv=steps)
    start = time.monotonic()
    api, (repo, remote_tag) = RegistryApi(registry), split_ref(remote)
    try:
        run(steps[0], stdin=registry.password.encode())
        before = api.known_layers(repo)
        run(steps[1])
        run_streaming(steps[2])
    except CommandError as exc:
        raise ImageError(f"push to {registry.host} failed: {exc}. Check BAKEHOUSE_REGISTRY, the credentials, and BAKEHOUSE_REGISTRY_INSECURE for a plain-HTTP registry.",
                         argv=exc.argv, returncode=exc.returncode) from exc
    result = compare_layers(api.layers(repo, remote_tag), before)
    return PushReport(remote=remote, uploaded=result.uploaded, uploaded_bytes=result.uploaded_bytes, existing=result.existing, seconds=time.monotonic() - start, argv=steps)


def last_image(context: Path) -> str:
    """The image the last `invoke build` in this checkout made: what push and deploy use without --tag."""
    try:
        return (context / LAST_IMAGE).read_text().strip()
    except FileNotFoundError as exc:
        raise ConfigError("no image: pass --tag, or run `invoke build` (then `invoke push`) first.") from exc
