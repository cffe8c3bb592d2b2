"""The serving surface as a hostile client tries it: one bad request never hurts the others, every request is bounded before it costs,
and only holders of an API key get in. All against the real app process on loopback."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from openai import AuthenticationError, OpenAI

from testbed.appserver import AppServer, serve_store, start_app
from testbed.helpers import Project

KEY = "bh-test-key-4f9a8b7c6d5e4f3a"


@pytest.fixture(scope="module")
def server(models_store: Project, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    s = serve_store(models_store, tmp_path_factory.mktemp("logs") / "random.log", MODEL="random", BAKEHOUSE_MAX_TOKENS="400", BAKEHOUSE_DTYPE="float32")
    yield s
    s.stop()


def post(server: AppServer, body: bytes | dict, path: str = "/v1/completions", **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json", **headers}, timeout=120)


HOSTILE = [
    (b'{"model": "random", "prompt": "x", "max_tokens": 5, "temperature": NaN}', 400, "temperature"),
    (b'{"model": "random", "prompt": "x", "max_tokens": 5, "temperature": Infinity}', 400, "temperature"),
    (b'{"model": "random", "prompt": "x", "max_tokens": 5, "repetition_penalty": 5e-324}', 400, "repetition_penalty"),
    (b'{"model": "random", "prompt": "x", "max_tokens": 5, "top_p": NaN}', 400, "top_p"),
    (b'{"model": "random", "prompt": "x", "max_tokens": 5, "seed": 18446744073709551616}', 400, "seed"),
    (b'{"model": "random", "prompt": "x", "max_tokens": 5, "presence_penalty": -Infinity}', 400, "presence_penalty"),
]


@pytest.mark.parametrize(("body", "status", "param"), HOSTILE)
def test_non_finite_and_out_of_range_settings_are_400_naming_the_setting(server: AppServer, body: bytes, status: int, param: str) -> None:
    r = post(server, body)
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text


def test_a_temperature_too_small_to_divide_by_is_greedy() -> None:
    from app.params import SamplingParams

    assert SamplingParams(max_tokens=1, temperature=1e-40).greedy and not SamplingParams(max_tokens=1, temperature=0.5).greedy


def test_eight_victims_finish_normally_beside_hostile_requests(server: AppServer) -> None:
    """8 long generations run while hostile requests arrive every 20 ms: every victim ends with all its tokens, every attack is refused."""
    victims: list[dict] = []
    stop = threading.Event()
    attacks: list[int] = []

    def victim(i: int) -> None:
        r = post(server, {"model": "random", "prompt": f"victim {i}", "max_tokens": 300, "ignore_eos": True, "temperature": 0.8, "seed": i})
        victims.append(r.json())

    def attacker() -> None:
        while not stop.is_set():
            for body, _, _ in HOSTILE:
                attacks.append(post(server, body).status_code)
            tiny = post(server, {"model": "random", "prompt": "x", "max_tokens": 5, "temperature": 1e-40, "ignore_eos": True})
            attacks.append(tiny.status_code)
            time.sleep(0.02)

    threads = [threading.Thread(target=victim, args=(i,)) for i in range(8)]
    hostile = threading.Thread(target=attacker)
    hostile.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    stop.set()
    hostile.join(timeout=60)
    assert len(victims) == 8
    for v in victims:
        assert v["choices"][0]["finish_reason"] == "length" and v["usage"]["completion_tokens"] == 300, v
        assert "generation failed" not in v["choices"][0]["text"]
    assert set(attacks) == {400, 200} and attacks.count(200) == len(attacks) // (len(HOSTILE) + 1)
    metrics = server.get("/metrics").text
    assert 'bakehouse_requests_total{endpoint="/v1/completions",status="400"}' in metrics


def test_a_huge_prompt_list_with_n_0_is_refused_before_tokenizing_and_health_keeps_answering(server: AppServer) -> None:
    """The big bodies are refused (400/413) while /health, probed all along with a 2 s timeout, keeps answering: nothing blocks the
    event loop (a parse or a tokenization of 150,000 prompts in it would leave the probes unanswered for many seconds)."""
    body = json.dumps({"model": "random", "prompt": [[1, 2, 3, 4]] * 150_000, "n": 0, "max_tokens": 2}).encode()
    probes: list[int | str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                probes.append(httpx.get(server.url + "/health", timeout=2.0).status_code)
            except httpx.TimeoutException:
                probes.append("timed out")
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for payload in (body, json.dumps({"model": "random", "prompt": ["a"] * 100_000, "max_tokens": 2}).encode(),
                        json.dumps({"model": "random", "prompt": "x", "max_tokens": 2, "stop_token_ids": [1] * 200_000}).encode()):
            r = post(server, payload)
            assert r.status_code in (400, 413), r.text[:300]
        r = post(server, {"model": "random", "messages": [{"role": "user", "content": "hi"}] * 20_000}, "/tokenize")
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    finally:
        stop.set()
        watcher.join()
    assert probes and set(probes) == {200}, probes


# --- API keys ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keyed(models_store: Project, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AppServer, Path]]:
    d = tmp_path_factory.mktemp("keys")
    keyfile = d / "keys"
    keyfile.write_text(f"# rotated by hand\n{KEY}-file-one\n")
    keyfile.chmod(0o600)
    s = serve_store(models_store, d / "keyed.log", MODEL="demo", BAKEHOUSE_API_KEY=KEY, BAKEHOUSE_API_KEY_FILE=str(keyfile))
    yield s, keyfile
    s.stop()


def test_the_openai_client_with_the_key_gets_in_and_without_it_gets_401(keyed: tuple[AppServer, Path]) -> None:
    server, _ = keyed
    ok = OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0).completions.create(model="demo", prompt="The weights are", max_tokens=4)
    assert ok.choices[0].text
    with pytest.raises(AuthenticationError) as caught:
        OpenAI(base_url=f"{server.url}/v1", api_key="wrong-key-0123456789abcdef", max_retries=0).completions.create(model="demo", prompt="x", max_tokens=2)
    assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
    for headers in ({}, {"authorization": KEY}, {"authorization": f"Basic {KEY}"}, {"authorization": "Bearer"}):
        r = httpx.post(f"{server.url}/v1/completions", json={"model": "demo", "prompt": "x", "max_tokens": 2}, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    assert httpx.get(f"{server.url}/metrics", headers={"authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200 and httpx.get(f"{server.url}/ready").status_code == 200
    assert KEY not in server.output()


def test_a_key_file_rotates_without_a_restart(keyed: tuple[AppServer, Path]) -> None:
    server, keyfile = keyed
    body = {"model": "demo", "prompt": "x", "max_tokens": 2}
    assert httpx.post(f"{server.url}/v1/completions", json=body, headers={"authorization": f"Bearer {KEY}-file-one"}).status_code == 200
    keyfile.write_text(f"{KEY}-file-two\n")
    assert httpx.post(f"{server.url}/v1/completions", json=body, headers={"authorization": f"Bearer {KEY}-file-one"}).status_code == 401
    assert httpx.post(f"{server.url}/v1/completions", json=body, headers={"authorization": f"Bearer {KEY}-file-two"}).status_code == 200


def test_a_short_key_stops_the_start_with_exit_2(models_store: Project, tmp_path: Path) -> None:
    s = start_app(models_store.env(BAKEHOUSE_LOCK=str(models_store.dir / "models.lock"), HF_HUB_OFFLINE="1", MODEL="demo", BAKEHOUSE_API_KEY="short"), tmp_path / "l")
    try:
        assert s.process.wait(timeout=60) == 2
    finally:
        s.stop()
    assert "at least 16 printable characters" in s.output() and "Traceback" not in s.output()


@pytest.mark.slow
def test_a_request_larger_than_the_kv_budget_is_refused_before_it_runs(models_store: Project, tmp_path: Path) -> None:
    """Alone too big: 400 naming the setting. Each fits but not all at once: they wait for each other, every one answered."""
    s = serve_store(models_store, tmp_path / "budget.log", MODEL="random", BAKEHOUSE_KV_CACHE_GB="0.01", BAKEHOUSE_MAX_TOKENS="4000", BAKEHOUSE_DTYPE="float32")
    try:
        per_sequence = s.get("/ready").json()["kv_cache_tokens_per_sequence"]
        assert 512 < per_sequence < 4000
        r = post(s, {"model": "random", "prompt": "x", "max_tokens": per_sequence + 10})
        assert r.status_code == 400 and "BAKEHOUSE_KV_CACHE_GB" in r.json()["error"]["message"]
        body = {"model": "random", "prompt": "x", "max_tokens": 300, "ignore_eos": True}  # a 512-column row each: not all 8 at once
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: post(s, body), range(8)))
        assert [a.status_code for a in answers] == [200] * 8 and {a.json()["usage"]["completion_tokens"] for a in answers} == {300}
    finally:
        s.stop()
