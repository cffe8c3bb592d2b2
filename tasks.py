"""bakehouse tasks (`invoke --list`). Each declares its flags and hands them to one function in ops.cli.

Value flags default to None here: their defaults live in ops (and show in the help from there).
"""

from __future__ import annotations

import sys

from invoke import Exit, task

from ops import cli

MODEL = ("models", "manifest", "lock", "json")
STORE = ("dest", "workers")
REMOTE = cli.REMOTE_FLAGS


def _exit(code: int) -> None:
    if code:
        raise Exit(code=code)


@task(help=cli.help_for(*MODEL))
def lock_models(c, models=None, manifest=None, lock=None, json=False):
    """Resolve revisions and write models.lock (commit + every file's size and sha256)."""
    _exit(cli.model_command("lock", models=models, manifest=manifest, lock=lock, json=json))


@task(help=cli.help_for(*MODEL, *STORE, "fan_out", "from_local", "from_host", *REMOTE))
def fetch_models(c, models=None, manifest=None, lock=None, json=False, dest=None, workers=None, fan_out=None, from_local=False, from_host=None, hosts=None,
                 group=None, inventory=None, parallel=None, host_keys=None, connect_timeout=None, command_timeout=None, known_hosts=None, engine=None,
                 serial=None, max_fail_percentage=None, dry_run=False):
    """Download, fully verify and activate models: into the local store, or on many hosts over SSH."""
    _exit(cli.fetch_models(**{k: v for k, v in locals().items() if k != "c"}))


@task(help=cli.help_for(*MODEL, *STORE, "full", *REMOTE))
def verify_models(c, models=None, manifest=None, lock=None, json=False, dest=None, workers=None, full=False, hosts=None, group=None, inventory=None,
                  parallel=None, host_keys=None, connect_timeout=None, command_timeout=None, known_hosts=None, engine=None, serial=None,
                  max_fail_percentage=None, dry_run=False):
    """Verify the store against models.lock (quick by default, --full re-hashes), locally or on hosts."""
    _exit(cli.verify_models(**{k: v for k, v in locals().items() if k != "c"}))


@task(
    help={
        "bake": "bake models into the image (default: the models with bake = true)",
        "models": "comma-separated models to bake (implies --bake)",
        "gpu": "CUDA/PyTorch base image instead of the slim CPU one",
        "engine": "docker or podman (default: docker when its engine answers, else podman)",
        "tag": "extra tag, e.g. registry.example.com/bakehouse:1.2",
        "base_image": "base image (default: $BAKEHOUSE_BASE_IMAGE, else python:3.11-slim; --gpu: a PyTorch CUDA image)",
        "torch_wheels": "folder of local wheels for torch (default: $PIP_FIND_LINKS when it is a folder)",
        "torch_index_url": "pip index for torch, e.g. https://download.pytorch.org/whl/cpu",
        "ca_bundle": "extra CA bundle for pip and the hub inside the build (corporate proxies)",
        "no_cache": "rebuild every layer (a clean build)",
        "dry_run": "print the build command instead of running it",
    }
)
def build(c, bake=False, models=None, gpu=False, engine=None, tag=None, base_image=None, torch_wheels=None, torch_index_url=None, ca_bundle=None, no_cache=False,
          dry_run=False):
    """Build the image (multi-stage; --bake puts verified weights in their own cached layer)."""
    _exit(cli.build(**{k: v for k, v in locals().items() if k != "c"}))


@task(help={"tag": "local image to push (default: the last one built)", "engine": "docker or podman", "dry_run": "print the commands instead of running them"})
def push(c, tag=None, engine=None, dry_run=False):
    """Push the image to $BAKEHOUSE_REGISTRY (password on stdin, never in argv)."""
    _exit(cli.push(tag=tag, engine=engine, dry_run=dry_run))


@task(help=cli.DEPLOY_HELP)
def deploy(c, hosts=None, group=None, inventory=None, tag=None, serial=None, dry_run=False, break_lock=False, json=False, host_keys=None,
           connect_timeout=None, command_timeout=None, known_hosts=None, lock=None, manifest=None, fan_out=None):
    """Put a release on Docker, bare and webhook hosts, gated on /ready, rolled back when it fails."""
    _exit(cli.deploy("deploy", **{k: v for k, v in locals().items() if k != "c"}))


@task(help={k: v for k, v in cli.DEPLOY_HELP.items() if k not in ("tag", "lock", "manifest", "fan_out")})
def rollback(c, hosts=None, group=None, inventory=None, serial=None, dry_run=False, break_lock=False, json=False, host_keys=None, connect_timeout=None,
             command_timeout=None, known_hosts=None):
    """Back to the previous release (bare) or image (Docker) on each host, gated on /ready."""
    _exit(cli.deploy("rollback", **{k: v for k, v in locals().items() if k != "c"}))


@task(help={"model": "model to serve (default: $MODEL, else demo)", "port": "port to listen on (default: $PORT, else 8000)"})
def serve(c, model=None, port=None):
    """Run the app locally: quick verify (fetch if missing), then serve the OpenAI-compatible API."""
    _exit(cli.serve(model=model, port=port))


@task
def demo(c):
    """The whole path offline on the bundled demo model: local hub, lock, fetch, verify, serve, one completion."""
    _exit(cli.demo())


@task(help={"args": "extra pytest arguments, e.g. \"-k fetch -x\""})
def test(c, args=""):
    """Run the test suite (real servers on loopback)."""
    # Two workers, a test file to each: waits on hosts, containers and servers overlap (module fixtures stay per file).
    c.run(f"{sys.executable} -m pytest -n 2 --dist loadfile {args}", pty=False)
