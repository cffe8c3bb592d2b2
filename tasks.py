"""bakehouse tasks (`invoke --list`): each is one function of ops.cli, whose keyword parameters are its flags (ops.cli.as_task)."""

from __future__ import annotations

from invoke import Collection

from ops import cli

ns = Collection(
    cli.as_task(cli.lock_models),
    cli.as_task(cli.fetch_models),
    cli.as_task(cli.verify_models),
    cli.as_task(cli.build, cli.BUILD_HELP),
    cli.as_task(cli.push, cli.OTHER_HELP["push"]),
    cli.as_task(cli.deploy, cli.DEPLOY_HELP),
    cli.as_task(cli.rollback, cli.DEPLOY_HELP),
    cli.as_task(cli.serve, cli.OTHER_HELP["serve"]),
    cli.as_task(cli.demo),
    cli.as_task(cli.test, cli.OTHER_HELP["test"]),
)
