"""`pymemory serve --parallel 2` under load: 8 clients at once are all answered or told to retry (never a hang or
a mixed stream), and a client that disconnects frees its slot at once."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from helpers.live_server import running_server  # noqa: E402

pytestmark = pytest.mark.model

MODEL = "smollm2-135m-instruct"
PROMPTS = [f"Story number {i}: once upon a time, a {animal}" for i, animal in
           enumerate(["cat", "dog", "fox", "owl", "bee", "elk", "yak", "emu"])]


@pytest.fixture(scope="module")
def server(smollm2_path):
    with running_server(model=smollm2_path, model_alias=MODEL, n_sink=4, window=124, parallel=2, n_threads=1,
                        max_queue=3, queue_timeout=60) as (url, app):
        yield url, app


def busy_slots(url: str) -> int:
    return httpx.get(url + "/health").json()["slots_busy"]


def test_eight_clients_two_slots(server):
    url = server[0]
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    results: dict[int, object] = {}

    def run(i: int) -> None:
        try:
            stream = client.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=24, temperature=0,
                                               stream=True)
            results[i] = ("ok", "".join(c.choices[0].text for c in stream))
        except openai.RateLimitError as exc:
            results[i] = ("429", exc.response.headers.get("retry-after"))
        except openai.InternalServerError as exc:
            results[i] = (str(exc.status_code), exc.response.headers.get("retry-after"))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert len(results) == 8
    answered = {i: text for i, (kind, text) in results.items() if kind == "ok"}
    refused = {i: r for i, r in results.items() if r[0] != "ok"}
    assert len(answered) >= 5  # 2 slots + 3 queued at least
    assert refused, "8 clients on 2 slots with a queue of 3 must see some 429s"
    for kind, retry_after in refused.values():
        assert kind in ("429", "503") and int(retry_after) >= 1
    # No mixed streams: each streamed reply is exactly what the same request gets when served alone.
    for i, text in answered.items():
        alone = client.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=24, temperature=0)
        assert text == alone.choices[0].text, f"client {i} got another stream's text"
    assert busy_slots(url) == 0


def test_disconnect_mid_stream_frees_the_slot(server):
    url = server[0]
    body = {"model": MODEL, "prompt": "Write a very long story about the sea.", "max_tokens": 4000,
            "temperature": 0.8, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            pieces = 0
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    pieces += 1
                    if pieces == 3:
                        break  # leave mid-stream: closing the response drops the connection
    deadline = time.monotonic() + 5
    while busy_slots(url) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert busy_slots(url) == 0, "the slot is still generating for a client that left"
    slots = httpx.get(url + "/pymemory/slots").json()["slots"]
    assert all(s["stats"]["tokens_seen"] < 2000 for s in slots)  # stopped long before max_tokens


def test_disconnect_while_waiting_for_a_non_streamed_reply(server):
    url = server[0]
    body = {"model": MODEL, "prompt": "Another long story.", "max_tokens": 4000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=body, timeout=1.5)
    deadline = time.monotonic() + 5
    while busy_slots(url) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert busy_slots(url) == 0


def test_queue_is_bounded_with_openai_error_body(server):
    """Fill both slots and the queue with long streams, then one more request: 429 at once, OpenAI error."""
    url = server[0]
    body = {"model": MODEL, "prompt": "Count slowly:", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    stop = threading.Event()

    def hold() -> None:
        with httpx.Client(timeout=60) as http, http.stream("POST", url + "/v1/completions", json=body) as r:
            for _ in r.iter_lines():
                if stop.is_set():
                    break

    holders = [threading.Thread(target=hold) for _ in range(5)]
    for t in holders:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health").json()["queued"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        t0 = time.monotonic()
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=30)
        assert time.monotonic() - t0 < 2, "an over-full queue must answer at once"
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        err = json.loads(r.text)["error"]
        assert err["code"] == "rate_limit_exceeded" and "busy" in err["message"]
    finally:
        stop.set()
        for t in holders:
            t.join(timeout=60)
    deadline = time.monotonic() + 10
    while busy_slots(url) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert busy_slots(url) == 0
