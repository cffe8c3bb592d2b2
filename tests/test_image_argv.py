"""Build and push commands as data, for both engines: no engine runs here."""

from __future__ import annotations

from pathlib import Path

import pytest

from ops.images.build import BuildSpec, build_argv, image_tag, model_stage_cached
from ops.images.registry import Registry, compare_layers, login_argv, push_argv, remote_ref, split_ref

SPEC = BuildSpec(engine="podman", tags=("bakehouse:abc-demo",), context=Path("/src"), models=("demo",), base_image="base:1",
                 endpoint_file=Path("/tmp/ep"), token_file=Path("/tmp/tok"), ca_bundle=Path("/etc/ca.crt"),
                 proxies={"https_proxy": "http://proxy:3128"}, network="host", labels={"GIT_REVISION": "abc"})


def test_podman_build_argv() -> None:
    assert build_argv(SPEC) == [
        "podman", "build", "--file=/src/Dockerfile", "--target=runtime", "--format=docker", "--tag=bakehouse:abc-demo",
        "--build-arg=BASE_IMAGE=base:1", "--build-arg=MODELS=demo", "--build-arg=TORCH_SPEC=torch==2.13.0", "--build-arg=TORCH_INDEX_URL=",
        "--build-arg=APP_ENGINE=transformers", "--build-arg=HF_HUB_DISABLE_XET=1", "--build-arg=GIT_REVISION=abc", "--build-arg=https_proxy=http://proxy:3128",
        "--secret=id=hf_token,src=/tmp/tok", "--secret=id=hub_endpoint,src=/tmp/ep", "--secret=id=ca_bundle,src=/etc/ca.crt", "--network=host", "/src",
    ]


def test_docker_build_argv_uses_buildkit_plain_progress() -> None:
    argv = build_argv(BuildSpec(engine="docker", tags=("t",), context=Path("/src")))
    assert argv == ["docker", "build", "--file=/src/Dockerfile", "--target=runtime", "--progress=plain", "--tag=t", "--build-arg=BASE_IMAGE=python:3.11-slim",
                    "--build-arg=MODELS=", "--build-arg=TORCH_SPEC=torch==2.13.0", "--build-arg=TORCH_INDEX_URL=", "--build-arg=APP_ENGINE=transformers",
                    "--build-arg=HF_HUB_DISABLE_XET=", "/src"]


def test_the_token_and_endpoint_are_build_secrets_never_arguments(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """From the environment to the build command, as `invoke build --dry-run` makes it: the values go into 0600 files passed as secrets."""
    from ops.images.actions import BuildRequest, build
    from testbed.helpers import ROOT

    token, endpoint = "hf_BuildSecret0123456789abcdef", "http://user:pw@hub.internal:8090"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    for name in ("models.toml", "models.lock", "Dockerfile"):
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    argv = build(BuildRequest(context=tmp_path, bake=True, engine="podman"), dry_run=True).argv
    text = " ".join(argv)
    assert token not in text and endpoint not in text and "hub.internal" not in text
    assert any(a.startswith("--secret=id=hf_token,src=") for a in argv) and any(a.startswith("--secret=id=hub_endpoint,src=") for a in argv)


def test_image_tag() -> None:
    assert image_tag("bakehouse", "abc123", ("demo", "phi-2")) == "bakehouse:abc123-demo-phi-2"
    assert image_tag("bakehouse", "abc123-dirty", ()) == "bakehouse:abc123-dirty-unbaked"


def test_model_stage_cache_detection() -> None:
    copy_step = "[2/3] STEP 5/9: COPY docker/fetch-models.sh /usr/local/bin/bakehouse-fetch-models\n--> Using cache 99\n"
    assert model_stage_cached(copy_step + "[2/3] STEP 9/9: RUN bakehouse-fetch-models\ndemo: fetching\n") is False
    podman_hit = "[2/3] STEP 9/9: RUN --mount=type=secret,id=hf_token bakehouse-fetch-models\n--> Using cache 1234\n"
    podman_miss = "[2/3] STEP 9/9: RUN --mount=type=secret,id=hf_token bakehouse-fetch-models\ndemo: fetching 6 of 6 files\n"
    docker_hit = "#12 [models 9/9] RUN --mount=type=secret,id=hf_token bakehouse-fetch-models\n#12 CACHED\n"
    assert model_stage_cached(podman_hit) is True
    assert model_stage_cached(podman_miss) is False
    assert model_stage_cached(docker_hit) is True
    assert model_stage_cached("no such step") is None


REG = Registry(host="127.0.0.1:5000", user="ci", password="s3cret-pw", insecure=True)


def test_login_takes_the_password_on_stdin() -> None:
    for engine in ("podman", "docker"):
        argv = login_argv(engine, REG)
        assert "--password-stdin" in argv and "s3cret-pw" not in " ".join(argv)
    assert "--tls-verify=false" in login_argv("podman", REG)
    assert "s3cret-pw" not in repr(REG)


def test_push_argv_and_remote_ref() -> None:
    assert remote_ref(REG, "localhost/bakehouse:abc-demo") == "127.0.0.1:5000/bakehouse:abc-demo"
    assert remote_ref(REG, "bakehouse:abc-demo") == "127.0.0.1:5000/bakehouse:abc-demo"
    assert remote_ref(REG, "127.0.0.1:5000/bakehouse:v1") == "127.0.0.1:5000/bakehouse:v1"
    assert remote_ref(REG, "registry.example.com/team/bakehouse:v1") == "127.0.0.1:5000/team/bakehouse:v1"
    assert remote_ref(REG, "team/bakehouse:v1") == "127.0.0.1:5000/team/bakehouse:v1"
    assert push_argv("podman", REG, "127.0.0.1:5000/bakehouse:x") == ["podman", "push", "--tls-verify=false", "127.0.0.1:5000/bakehouse:x"]
    assert push_argv("docker", REG, "r/b:x") == ["docker", "push", "r/b:x"]


def test_push_result_counts_only_layers_new_to_the_registry() -> None:
    result = compare_layers({"sha256:a": 100, "sha256:b": 5, "sha256:c": 7}, before={"sha256:a", "sha256:z"})
    assert (result.uploaded, result.uploaded_bytes, result.existing) == (2, 12, 1)
    assert split_ref("127.0.0.1:5000/team/bakehouse:abc-demo") == ("team/bakehouse", "abc-demo")


def test_gpu_images_bring_their_own_torch_and_serve_with_vllm() -> None:
    from ops.images.actions import BuildRequest, plan_build

    root = Path(__file__).resolve().parent.parent
    gpu = plan_build(BuildRequest(context=root, gpu=True, engine="podman"))
    cpu = plan_build(BuildRequest(context=root, engine="podman"))
    assert (gpu.app_engine, gpu.torch_spec, gpu.base_image.startswith("pytorch/pytorch:")) == ("vllm", "", True)
    assert (cpu.app_engine, cpu.torch_spec) == ("transformers", "torch==2.13.0")
    assert "--build-arg=APP_ENGINE=vllm" in build_argv(gpu)
