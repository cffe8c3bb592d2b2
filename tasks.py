"""bakehouse tasks (`invoke --list`): each is one function of ops.cli, whose keyword parameters are its flags."""

from __future__ import annotations

from invoke import Collection, task

from ops import cli


def _task(command, table=cli.HELP):  # noqa: ANN001, ANN202 (Invoke's own types)
    body = cli.as_task(command, table)
    return task(body, help=body.task_help)


ns = Collection(
    _task(cli.lock_models),
    _task(cli.fetch_models),
    _task(cli.verify_models),
    _task(cli.build, cli.BUILD_HELP),
    _task(cli.push, cli.OTHER_HELP["push"]),
    _task(cli.deploy, cli.DEPLOY_HELP),
    _task(cli.rollback, cli.DEPLOY_HELP),
    _task(cli.serve, cli.OTHER_HELP["serve"]),
    _task(cli.demo),
    _task(cli.test, cli.OTHER_HELP["test"]),
)
