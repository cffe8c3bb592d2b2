"""The build command as data: `BuildSpec` in, argv out. Nothing here runs anything."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

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
    hf_endpoint: str = ""
    token_file: Path | None = None
    ca_bundle: Path | None = None
    proxies: dict[str, str] = field(default_factory=dict)
    network: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    no_cache: bool = False


def build_argv(spec: BuildSpec) -> list[str]:
    argv = [spec.engine, "build", "--file", str(spec.context / "Dockerfile"), "--target", "runtime"]
    if spec.engine == "podman":
        argv += ["--format", "docker"]  # OCI images drop HEALTHCHECK
    else:
        argv += ["--progress", "plain"]
    for tag in spec.tags:
        argv += ["--tag", tag]
    args = {
        "BASE_IMAGE": spec.base_image,
        "MODELS": ",".join(spec.models),
        "TORCH_SPEC": spec.torch_spec,
        "TORCH_INDEX_URL": spec.torch_index_url,
        "HF_ENDPOINT": spec.hf_endpoint,
        "HF_HUB_DISABLE_XET": "1" if spec.hf_endpoint else "",
        **spec.labels,
        **spec.proxies,
    }
    for key, value in args.items():
        argv += ["--build-arg", f"{key}={value}"]
    if spec.token_file:
        argv += ["--secret", f"id=hf_token,src={spec.token_file}"]
    if spec.ca_bundle:
        argv += ["--secret", f"id=ca_bundle,src={spec.ca_bundle}"]
    if spec.network:
        argv += ["--network", spec.network]
    if spec.no_cache:
        argv.append("--no-cache")
    return [*argv, str(spec.context)]


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
