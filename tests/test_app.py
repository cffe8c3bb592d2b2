"""The inference app over real HTTP: the official openai client, bad input, batching, metrics."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import AsyncOpenAI, BadRequestError, NotFoundError, OpenAI

from testbed.appserver import AppServer, start_app
from testbed.helpers import DEMO, HF_DEMO, HF_RANDOM_LM, Hub, Project, manifest


@pytest.fixture(scope="session")
def served_store(hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> Project:
    p = Project(tmp_path_factory.mktemp("served") / "project", hub.endpoint)
    p.dir.mkdir()
    p.write_manifest(manifest(demo=HF_DEMO, random=HF_RANDOM_LM))
    assert p.run("lock", "--models", "demo,random").returncode == 0
    assert p.run("fetch", "--models", "demo,random").returncode == 0
    return p


def app_env(project: Project, **extra: str) -> dict[str, str]:
    return project.env(BAKEHOUSE_LOCK=str(project.dir / "models.lock"), HF_HUB_OFFLINE="1", **extra)


@pytest.fixture(scope="session")
def server(served_store: Project, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    s = start_app(app_env(served_store, MODEL="demo", BAKEHOUSE_MAX_TOKENS="100"), tmp_path_factory.mktemp("logs") / "demo.log")
    s.wait()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def client(server: AppServer) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def metric(server: AppServer, name: str) -> float:
    text = server.get("/metrics").text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_completion_with_the_openai_client(client: OpenAI) -> None:
    r = client.completions.create(model="demo", prompt="The weights are", max_tokens=12, temperature=0)
    assert r.choices[0].text.startswith(" locked, fetched, verified")
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0


def test_chat_uses_the_chat_template(client: OpenAI) -> None:
    r = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hello!"}], max_tokens=20, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    # The demo template renders "<|user|>Hello!\n<|assistant|>": the same prompt sent raw must see the same tokens and answer.
    rendered = (DEMO / "chat_template.jinja").read_text().replace("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}", "<|user|>Hello!\n")
    rendered = rendered.replace("{% if add_generation_prompt %}<|assistant|>{% endif %}", "<|assistant|>")
    assert rendered == "<|user|>Hello!\n<|assistant|>"
    raw = client.completions.create(model="demo", prompt=rendered, max_tokens=20, temperature=0)
    assert r.usage.prompt_tokens == raw.usage.prompt_tokens
    assert r.choices[0].message.content == raw.choices[0].text


def test_streaming_matches_the_whole_answer(client: OpenAI) -> None:
    whole = client.completions.create(model="demo", prompt="Quick verify", max_tokens=15, temperature=0).choices[0].text
    chunks = list(client.completions.create(model="demo", prompt="Quick verify", max_tokens=15, temperature=0, stream=True))
    assert len(chunks) > 2
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    chat = list(client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=10, temperature=0, stream=True))
    assert chat[0].choices[0].delta.role == "assistant"
    assert chat[-1].choices[0].finish_reason in ("stop", "length")


def test_models_lists_the_served_model(client: OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["demo"]


def test_stop_sequence(client: OpenAI) -> None:
    r = client.completions.create(model="demo", prompt="The weights are", max_tokens=30, temperature=0, stop=[","])
    assert r.choices[0].text == " locked" and r.choices[0].finish_reason == "stop"


def test_sixteen_concurrent_requests_share_batches(server: AppServer) -> None:
    before = metric(server, "bakehouse_batch_size_count"), metric(server, "bakehouse_batch_size_sum")

    async def burst() -> list:
        aclient = AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        calls = [aclient.completions.create(model="demo", prompt=f"The baker {i}", max_tokens=16, temperature=0.8) for i in range(16)]
        return list(await asyncio.gather(*calls))

    replies = asyncio.run(burst())
    assert len(replies) == 16 and all(isinstance(r.choices[0].text, str) for r in replies)
    steps = metric(server, "bakehouse_batch_size_count") - before[0]
    rows = metric(server, "bakehouse_batch_size_sum") - before[1]
    # Each request's first token comes from its prompt's pass; every later one from a decode step it shares.
    assert rows == sum(r.usage.completion_tokens for r in replies) - 16
    assert steps < rows / 2, f"{steps} decode steps for {rows} rows: no batching"


BAD = [
    (b"{not json", 400, "not valid JSON"),
    (json.dumps({"model": "demo"}).encode(), 400, "prompt"),
    (json.dumps({"model": "demo", "prompt": "x", "max_tokens": "5"}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "demo", "prompt": "x", "max_tokens": 0}).encode(), 400, "max_tokens must be between 1 and 100"),
    (json.dumps({"model": "demo", "prompt": "x", "max_tokens": 101}).encode(), 400, "max_tokens must be between 1 and 100"),
    (json.dumps({"model": "demo", "prompt": "x", "temperature": -0.5}).encode(), 400, "temperature"),
    (json.dumps({"model": "demo", "prompt": "weights " * 300}).encode(), 400, "context"),
    (json.dumps({"model": "gpt-4", "prompt": "x"}).encode(), 404, "not served here"),
    (json.dumps({"model": "demo", "prompt": "x", "n": 0}).encode(), 400, "n must be at least 1"),
    (json.dumps({"model": "demo", "prompt": "x", "n": 1000}).encode(), 400, "at most 64 per request"),
    (json.dumps({"model": "demo", "prompt": []}).encode(), 400, "prompt"),
    (json.dumps({"model": "demo", "prompt": [[1, 2], []]}).encode(), 400, "must not be empty"),
    (json.dumps({"model": "demo", "prompt": [1, 999999]}).encode(), 400, "not in this model's vocabulary"),
    (json.dumps({"model": "demo", "prompt": "\ud800 lone surrogate"}).encode(), 400, "not valid Unicode"),
    (b'{"model": "demo", "prompt": "\xff\xfe invalid utf-8"}', 400, "not valid JSON"),
    (json.dumps({"model": "demo", "prompt": "x", "top_k": -5}).encode(), 400, "top_k"),
    (json.dumps({"model": "demo", "prompt": "x", "logprobs": 50}).encode(), 400, "logprobs must be between 0 and 20"),
]


@pytest.mark.parametrize(("body", "status", "needle"), BAD)
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server: AppServer, body: bytes, status: int, needle: str) -> None:
    r = httpx.post(f"{server.url}/v1/completions", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["type"]
    assert server.get("/health").status_code == 200


def test_bad_chat_input(client: OpenAI) -> None:
    with pytest.raises(BadRequestError, match="messages"):
        client.chat.completions.create(model="demo", messages=[])
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])


def test_metrics_cover_the_service(server: AppServer) -> None:
    for i in range(3):
        assert server.get(f"/no/such/path/{i}").status_code == 404
    text = server.get("/metrics").text
    assert 'endpoint="unmatched",status="404"' in text and "/no/such/path" not in text
    for name in ("bakehouse_requests_total", "bakehouse_errors_total", "bakehouse_generated_tokens_total", "bakehouse_queue_depth",
                 "bakehouse_batch_size_bucket", "bakehouse_time_to_first_token_seconds_bucket", "bakehouse_model_load_seconds"):
        assert name in text, name
    assert metric(server, "bakehouse_model_load_seconds") > 0


@pytest.fixture
def random_server(served_store: Project, tmp_path: Path) -> Iterator[AppServer]:
    s = start_app(app_env(served_store, MODEL="random", BAKEHOUSE_MAX_TOKENS="4000"), tmp_path / "random.log")
    s.wait()
    yield s
    s.stop()


def test_client_disconnect_stops_its_generation(random_server: AppServer) -> None:
    body = {"model": "random", "prompt": "The", "max_tokens": 4000, "temperature": 1.0, "stream": True}
    with httpx.stream("POST", f"{random_server.url}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    deadline = time.monotonic() + 5
    while metric(random_server, "bakehouse_generations_cancelled_total") < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(random_server, "bakehouse_generations_cancelled_total") == 1
    generated = metric(random_server, "bakehouse_generated_tokens_total")
    assert generated < 3000, f"{generated} tokens generated after the client left"
    assert random_server.get("/health").status_code == 200


def tuning_ended(s: AppServer, timeout: float = 300) -> dict:
    """/ready once the background kernel tuning (app.tuning) is no longer compiling."""
    deadline = time.monotonic() + timeout
    while (ready := s.get("/ready").json())["decode_attention_tuning"].startswith("compiling"):
        assert time.monotonic() < deadline, s.output()
        time.sleep(0.2)
    return ready


@pytest.mark.parametrize("compiler", ["g++", "missing"])
def test_the_decode_kernel_compiled_after_ready_serves_the_same_text(served_store: Project, tmp_path: Path, compiler: str) -> None:
    """Ready before any compile; requests answered while it compiles and after the verdict, with the same text. Without a C++ compiler
    (and an empty inductor cache, so nothing compiled earlier is found) the kernel chosen at load stays and /ready says why."""
    env = app_env(served_store, MODEL="demo", BAKEHOUSE_DTYPE="bfloat16", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),
                  **({"CXX": str(tmp_path / "no-such-c++")} if compiler == "missing" else {}))
    s = start_app(env, tmp_path / "app.log", compile_kernels=True)
    try:
        ready = s.wait().json()
        assert ready["decode_attention_tuning"].split(":")[0] in ("compiling", "adopted", "kept", "failed"), ready
        body = {"model": "demo", "prompt": "The weights are", "max_tokens": 12, "temperature": 0}
        meanwhile = httpx.post(f"{s.url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        ready = tuning_ended(s)
        after = httpx.post(f"{s.url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        assert meanwhile == after and after.startswith(" locked, fetched, verified"), (meanwhile, after)
        state = ready["decode_attention_tuning"]
        if compiler == "missing":
            assert state.startswith("failed: torch.compile failed") and "kept" in state, state
            assert ready["decode_attention"] != "compiled"
        else:
            assert state.startswith(("adopted: compiled kernel", "kept: ")), state
            assert (ready["decode_attention"] == "compiled") == state.startswith("adopted"), ready
        assert f"decode kernel tuning: {state}" in s.output() and "Traceback" not in s.output()
    finally:
        s.stop()
