"""lm-evaluation-harness, the ecosystem's own client, against the app: a loglikelihood task and a generate task.

lm-eval's `local-completions` sends token ids (its default) with echo and
logprobs for loglikelihood, and stop strings for generation; its
`local-chat-completions` drives the chat endpoint. The tasks are built here,
from local files, so nothing is downloaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.appserver import AppServer, start_app
from testbed.helpers import DEMO, HF_DEMO, Hub, Project, manifest

pytestmark = pytest.mark.slow

QUESTIONS = [{"question": "The weights are", "choices": [" locked", " banana", " purple"], "answer": 0}] * 2
PROMPTS = [{"prompt": "The weights are", "target": " locked"}, {"prompt": "Quick verify", "target": ""}]


@pytest.fixture(scope="module")
def server(hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    p = Project(tmp_path_factory.mktemp("lmeval") / "project", hub.endpoint)
    p.dir.mkdir()
    p.write_manifest(manifest(demo=HF_DEMO))
    assert p.run("lock", "--models", "demo").returncode == 0 and p.run("fetch", "--models", "demo").returncode == 0
    s = start_app(p.env(BAKEHOUSE_LOCK=str(p.dir / "models.lock"), HF_HUB_OFFLINE="1", MODEL="demo"), p.dir / "app.log")
    s.wait()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tasks")
    (d / "mc.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (d / "gen.jsonl").write_text("".join(json.dumps(q) + "\n" for q in PROMPTS))
    common = "dataset_path: json\ntest_split: test\n"
    (d / "mc.yaml").write_text(f"task: bakehouse_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {d / 'mc.jsonl'}\noutput_type: multiple_choice\n"
                               "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    (d / "gen.yaml").write_text(f"task: bakehouse_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {d / 'gen.jsonl'}\noutput_type: generate_until\n"
                                "doc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
                                "generation_kwargs:\n  until: [',']\n  max_gen_toks: 8\n  do_sample: false\n  temperature: 0\n"
                                "metric_list:\n  - metric: exact_match\n")
    return d


def lm_eval(server: AppServer, tasks: Path, out: Path, model: str, endpoint: str, names: str, *extra: str) -> dict:
    args = f"model=demo,base_url={server.url}{endpoint},tokenizer={DEMO},num_concurrent=2,max_retries=1"
    argv = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", args, "--tasks", names, "--include_path", str(tasks),
            "--output_path", str(out), "--log_samples", *extra]
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin"}
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    [results] = list(out.rglob("results_*.json"))
    return json.loads(results.read_text())["results"]


def test_lm_eval_local_completions_runs_a_loglikelihood_and_a_generate_task(server: AppServer, tasks: Path, tmp_path: Path) -> None:
    results = lm_eval(server, tasks, tmp_path / "out", "local-completions", "/v1/completions", "bakehouse_mc,bakehouse_gen")
    assert results["bakehouse_mc"]["acc,none"] == 1.0  # the demo model's own continuation is by far the likeliest
    assert results["bakehouse_gen"]["exact_match,none"] == 0.5  # " locked" is right; the second target is empty


def test_lm_eval_local_chat_completions_runs_a_generate_task(server: AppServer, tasks: Path, tmp_path: Path) -> None:
    results = lm_eval(server, tasks, tmp_path / "out", "local-chat-completions", "/v1/chat/completions", "bakehouse_gen", "--apply_chat_template")
    assert "exact_match,none" in results["bakehouse_gen"]
