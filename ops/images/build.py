"""The build command as data: `BuildSpec` in, argv out. Nothing here runs anything."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ops.errors import ConfigError

ContainerEngine = Literal["docker", "podman"]
ENGINES: tuple[ContainerEngine, ...] = ("docker", "podman")

CPU_BASE = "python:3.11-slim"
GPU_BASE = "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime"
TORCH_CPU = "torch==2.13.0"
FETCH_STEP = "bakehouse-fetch-models"


@dataclass(frozen=True)
class BuildSpec:
    engine: ContainerEngine
    tags: tuple[str, ...]
    context: Path
    models: tuple[str, ...] = ()
    base_image: str = CPU_BASE
    torch_spec: str = TORCH_CPU  # "" when the base image brings torch (GPU bases)
    torch_index_url: str = ""
    app_engine: str = "transformers"  # GPU images: vllm
    endpoint_file: Path | None = None  # HF_ENDPOINT, as a build secret
    token_file: Path | None = None
    ca_bundle: Path | None = None
    proxies: dict[str, str] = field(default_factory=dict)
    network: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    no_cache: bool = False


def build_argv(spec: BuildSpec) -> list[str]:
    """Every value glued to its option (`--tag=T`), so none can be read as an option of its own."""
    argv = [spec.engine, "build", f"--file={spec.context / 'Dockerfile'}", "--target=runtime"]
    argv.append("--format=docker" if spec.engine == "podman" else "--progress=plain")  # podman: OCI images drop HEALTHCHECK
    argv += [f"--tag={tag}" for tag in spec.tags]
    args = {
        "BASE_IMAGE": spec.base_image,
        "MODELS": ",".join(spec.models),
        "TORCH_SPEC": spec.torch_spec,
        "TORCH_INDEX_URL": spec.torch_index_url,
        "APP_ENGINE": spec.app_engine,
        "HF_HUB_DISABLE_XET": "1" if spec.endpoint_file else "",
        **spec.labels,
        **spec.proxies,
    }
    argv += [f"--build-arg={key}={value}" for key, value in args.items()]
    # Build secrets: in no layer, no history, no cache key (the endpoint may carry credentials, and a new one must not rebake).
    for name, path in (("hf_token", spec.token_file), ("hub_endpoint", spec.endpoint_file), ("ca_bundle", spec.ca_bundle)):
        if path:
            argv.append(f"--secret=id={name},src={path}")
    if spec.network:
        argv.append(f"--network={spec.network}")
    if spec.no_cache:
        argv.append("--no-cache")
    return [*argv, str(spec.context)]


_REFERENCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}\Z")


def check_reference(flag: str, value: str) -> str:
    """An image name or tag as a flag or setting gives it: never empty, never option-like, no spaces."""
    if not _REFERENCE.match(value):
        raise ConfigError(f"{flag} {value!r} is not an image reference (letters, digits and ._/:@-, starting with a letter or digit).")
    return value


def build_env(engine: ContainerEngine) -> dict[str, str]:
    return {"DOCKER_BUILDKIT": "1"} if engine == "docker" else {}


def inspect_size_argv(engine: str, image: str) -> list[str]:
    return [engine, "image", "inspect", "--format", "{{.Size}}", image]


def image_tag(name: str, revision: str, models: tuple[str, ...]) -> str:
    """`bakehouse:<git revision>-<baked models>`; `unbaked` when none."""
    suffix = "-".join(models) if models else "unbaked"
    return f"{name}:{revision}-{re.sub(r'[^A-Za-z0-9_.-]', '_', suffix)}"[:200]


def model_stage_cached(output: str) -> bool | None:
    """Whether the build reused the model layer: podman prints `Using cache`, BuildKit `CACHED`.

    None when the output shows no fetch step at all.
    """
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if FETCH_STEP in line and "RUN" in line and "COPY" not in line:
            following = " ".join(lines[i + 1 : i + 3])
            return "Using cache" in following or "CACHED" in following
    return None
