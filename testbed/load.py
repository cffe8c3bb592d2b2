"""Constant load on an app host's public port while something happens to it (a deploy, a rollback): what every client saw.

Each client thread sends completions back to back, alternating streamed and
whole ones, greedy with `ignore_eos`, so every answer's text is known in
advance: a request that fails, a stream cut before [DONE], or text lost in
a switch shows up as a bad answer.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal, TypeVar

import httpx

Kind = Literal["stream", "whole"]
T = TypeVar("T")


@dataclass(frozen=True)
class Answer:
    kind: Kind
    started: float  # monotonic
    seconds: float
    status: int  # 0: no HTTP answer at all
    text: str
    done: bool  # a stream ended with [DONE]; a whole answer had its choices
    error: str = ""
    client: int = -1  # which client thread sent it; -1: the request that learned the expected text


@dataclass
class LoadReport:
    sent: int
    answers: list[Answer]
    expected: str

    def bad(self) -> list[Answer]:
        return [a for a in self.answers if a.status != 200 or not a.done or a.text != self.expected]

    def problems(self) -> list[str]:
        """What went wrong for the clients: failed answers, requests never answered, a kind of request never sent."""
        bad = self.bad()
        found = [f"{len(bad)} of {len(self.answers)} requests failed, e.g. {bad[:3]}"] if bad else []
        if self.sent != len(self.answers):
            found.append(f"{self.sent} requests sent, {len(self.answers)} answered")
        if {a.kind for a in self.answers} != {"stream", "whole"}:
            found.append(f"not both kinds of request were sent: {sorted({a.kind for a in self.answers})}")
        return found

    def latencies(self, start: float = 0.0, end: float = float("inf")) -> list[float]:
        return [a.seconds for a in self.answers if start <= a.started <= end]

    def summary(self) -> dict[str, float]:
        lat = sorted(a.seconds for a in self.answers) or [0.0]
        return {"sent": self.sent, "answered": len(self.answers), "failed": len(self.bad()), "p50_s": statistics.median(lat),
                "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))], "max_s": lat[-1]}


@dataclass
class Load:
    url: str  # the host's public base URL
    model: str = "demo"
    clients: int = 4
    prompt: str = "The weights are"
    max_tokens: int = 12
    expected: str = ""
    _sent: int = 0
    _answers: list[Answer] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Load:
        """Learn the expected text with one request, then start the clients."""
        with httpx.Client(timeout=120) as c:
            self.expected = self._whole(c, time.monotonic()).text
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.clients)]
        for t in self._threads:
            t.start()
        return self

    def during(self, action: Callable[[], T], timeout: float = 300) -> tuple[T, LoadReport]:
        """Run `action` with every client busy from before it starts to after it ends.

        Each client has had an answer before `action` starts and sends a request
        after it ends: the whole of the action ran under load, however slow this
        machine is today (a fixed sleep or count cannot promise that).
        """
        self.start()
        self._wait(lambda a: True, timeout)
        try:
            result = action()
        finally:
            ended = time.monotonic()
            self._wait(lambda a: a.started >= ended, timeout)
        return result, self.stop()

    def _wait(self, counts: Callable[[Answer], bool], timeout: float) -> None:
        """Until every client has an answer that `counts`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if {a.client for a in self._answers if counts(a)} >= set(range(self.clients)):
                    return
            time.sleep(0.05)
        raise TimeoutError(f"the {self.clients} load clients did not all get an answer within {timeout:.0f}s")

    def stop(self) -> LoadReport:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=300)
        return LoadReport(self._sent, list(self._answers), self.expected)

    def _body(self, stream: bool) -> dict[str, object]:
        return {"model": self.model, "prompt": self.prompt, "max_tokens": self.max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream}

    def _client(self, index: int) -> None:
        with httpx.Client(timeout=httpx.Timeout(300, connect=30)) as c:
            n = index
            while not self._stop.is_set():
                started = time.monotonic()
                with self._lock:
                    self._sent += 1
                answer = self._stream(c, started) if n % 2 else self._whole(c, started)
                with self._lock:
                    self._answers.append(replace(answer, client=index))
                n += 1

    def _whole(self, c: httpx.Client, started: float) -> Answer:
        try:
            r = c.post(f"{self.url}/v1/completions", json=self._body(False))
            choices = r.json().get("choices") if r.headers.get("content-type", "").startswith("application/json") else None
            text = choices[0]["text"] if choices else ""
            return Answer("whole", started, time.monotonic() - started, r.status_code, text, bool(choices), "" if r.status_code == 200 else r.text[:300])
        except httpx.HTTPError as exc:
            return Answer("whole", started, time.monotonic() - started, 0, "", False, f"{type(exc).__name__}: {exc}")

    def _stream(self, c: httpx.Client, started: float) -> Answer:
        text, done, status, error = "", False, 0, ""
        try:
            with c.stream("POST", f"{self.url}/v1/completions", json=self._body(True)) as r:
                status = r.status_code
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        text += "".join(ch["text"] for ch in json.loads(line[6:])["choices"])
                    elif status != 200 and line:
                        error += line[:300]
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        return Answer("stream", started, time.monotonic() - started, status, text, done, error)
