"""`pymemory serve` through the official `openai` client, on SmolLM2 and a small cache: the endpoints, streaming,
sessions that prefill only new tokens, a conversation much longer than the cache, and every bad input."""
from __future__ import annotations

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from helpers.live_server import running_server  # noqa: E402

pytestmark = pytest.mark.model

KEY = "test-key"
MODEL = "smollm2-135m-instruct"
SYSTEM = "You are a helpful assistant. The secret password is 'tulip'. If the user asks for the password, say it."


@pytest.fixture(scope="module")
def server(smollm2_path):
    with running_server(model=smollm2_path, model_alias=MODEL, n_sink=4, window=252, parallel=1, n_threads=1,
                        api_key=KEY, default_max_tokens=32) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def chat(client, messages, **kw):
    kw.setdefault("max_tokens", 16)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=messages, **kw)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    card = client.models.retrieve(MODEL)
    assert card.model_extra["pymemory"]["capacity"] == 256
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok" and health["slots"] == 1


def test_chat_non_streaming_reports_memory(client):
    r = chat(client, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello!"}])
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 16 and r.usage.prompt_tokens > 20
    mem = r.model_extra["pymemory"]
    assert mem["capacity"] == 256 and 0 < mem["cells_used"] <= 256
    assert mem["n_pinned"] >= 20  # BOS + the rendered system message, pinned
    assert {"tokens_evicted", "evictions", "session_id", "slot"} <= set(mem)


def test_chat_streaming_matches_non_streaming(client):
    messages = [{"role": "user", "content": "Name three fruits."}]
    whole = chat(client, messages, seed=7).choices[0].message.content
    chunks = list(chat(client, messages, seed=7, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].model_extra["pymemory"]["cells_used"] > 0
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens > 0
    assert usage.usage.total_tokens == usage.usage.prompt_tokens + usage.usage.completion_tokens


def test_completions_and_stop(client):
    r = client.completions.create(model=MODEL, prompt="One, two, three,", max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text
    s = client.completions.create(model=MODEL, prompt="One, two, three,", max_tokens=12, temperature=0,
                                  stop=[","])
    assert "," not in s.choices[0].text and s.choices[0].finish_reason == "stop"
    assert r.choices[0].text.startswith(s.choices[0].text)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="One, two, three,", max_tokens=12, temperature=0, stream=True))
    assert streamed == r.choices[0].text


def test_continuing_conversation_prefills_only_new_tokens(client):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Tell me about the sea."}]
    first = chat(client, messages)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And the sky?"}]
    second = chat(client, messages)
    mem = second.model_extra["pymemory"]
    assert mem["reused_cache"] and mem["session_id"] == first.model_extra["pymemory"]["session_id"]
    assert mem["prefilled_tokens"] < 20 < second.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens - mem["prefilled_tokens"]
    # An edited history is not a continuation: the slot starts afresh and reads it all.
    messages[1]["content"] = "Tell me about mountains."
    third = chat(client, messages)
    assert not third.model_extra["pymemory"]["reused_cache"]
    assert third.model_extra["pymemory"]["prefilled_tokens"] == third.usage.prompt_tokens


def test_explicit_session_id_header(client):
    extra = {"X-Session-Id": "conversation-42"}
    r = chat(client, [{"role": "user", "content": "Hi"}], extra_headers=extra)
    assert r.model_extra["pymemory"]["session_id"] == "conversation-42"
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": r.choices[0].message.content},
                               {"role": "user", "content": "Bye"}], max_tokens=4, extra_headers=extra)
    assert raw.headers["x-session-id"] == "conversation-42"
    assert raw.parse().model_extra["pymemory"]["reused_cache"]


def test_long_conversation_through_small_cache_keeps_system_prompt(client):
    """30 turns through a 256-cell cache (about 4x its size): no error, memory flat, the pinned system prompt
    still answers at the end. (tools/serve_long_chat.py runs the 300-turn, 512-cell version.)"""
    questions = ["Tell me about the moon.", "How do I boil an egg?", "Name a color.", "What is 2+2?",
                 "Describe a cat."]
    messages = [{"role": "system", "content": SYSTEM}]
    cells, pinned = [], set()
    for turn in range(30):
        messages.append({"role": "user", "content": questions[turn % len(questions)]})
        r = chat(client, messages, max_tokens=24, extra_headers={"X-Session-Id": "long-chat"})
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
        mem = r.model_extra["pymemory"]
        assert mem["reused_cache"] or turn == 0, f"turn {turn} re-read the conversation"
        cells.append(mem["cells_used"])
        pinned.add(mem["n_pinned"])
    assert max(cells) <= 256 and mem["peak_cells"] <= 256
    assert mem["tokens_evicted"] > 500, "the conversation must be several times larger than the cache"
    assert len(pinned) == 1 and pinned.pop() > 20  # the same system prompt stays pinned throughout
    messages.append({"role": "user", "content": "What is the secret password?"})
    answer = chat(client, messages, max_tokens=24, extra_headers={"X-Session-Id": "long-chat"})
    assert "tulip" in answer.choices[0].message.content.lower()


# ---- bad input ------------------------------------------------------------------------------------------------

def post(server, path, body=None, key=KEY, content=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server[0] + path, json=body, content=content, headers=headers, timeout=60)


@pytest.mark.parametrize("body, status, code, words", [
    (None, 400, "invalid_json", "not valid JSON"),
    ({"model": MODEL}, 400, "invalid_value", "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_value", "role"),
    ({"model": MODEL, "messages": [{"role": "user"}]}, 400, "invalid_value", "content"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}]},
     400, "invalid_value", "system message"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, 400, "invalid_value",
     "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 1000}, 400, "invalid_value", "'n'"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 9}, 400, "invalid_value",
     "temperature"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400,
     "unsupported_parameter", "tools"),
    ({"model": "gpt-17", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found", "gpt-17"),
])
def test_bad_chat_requests(server, body, status, code, words):
    r = post(server, "/v1/chat/completions", body, content=b"{not json" if body is None else None)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and words in err["message"]
    assert post(server, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "ok"}],
                                                  "max_tokens": 2}).status_code == 200  # still serving


def test_bad_requests_through_openai_client(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=-1)
    with pytest.raises(openai.BadRequestError, match="one choice"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=3)
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.completions.create(model=MODEL, prompt="")


def test_api_key(server):
    for key, words in ((None, "missing API key"), ("wrong", "incorrect API key")):
        r = post(server, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
                 key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert words in r.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server[0] + "/health").status_code == 200  # health needs no key


def test_unknown_route_is_openai_error(server):
    r = httpx.get(server[0] + "/v1/nothing-here", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and "no route" in r.json()["error"]["message"]


def test_reply_cut_by_stop_or_regenerated_is_not_reread(client):
    """A stop string leaves its tokens in the cache and a regenerate request drops the reply: the slot takes those
    tokens back (Engine.rewind) instead of re-reading the conversation."""
    extra = {"X-Session-Id": "rewind"}
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "List three fruits, one per line."}]
    first = chat(client, messages, max_tokens=32, stop=["\n"], extra_headers=extra)
    assert first.choices[0].finish_reason == "stop"
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "Thanks!"}]
    second = chat(client, messages, extra_headers=extra)
    mem = second.model_extra["pymemory"]
    assert mem["reused_cache"] and mem["rewound_tokens"] >= 1 and mem["prefilled_tokens"] < 20
    again = chat(client, messages, extra_headers=extra)  # the same request again: regenerate the last reply
    mem = again.model_extra["pymemory"]
    assert mem["reused_cache"] and mem["rewound_tokens"] >= again.usage.completion_tokens
    assert mem["prefilled_tokens"] <= 2
    assert again.choices[0].message.content == second.choices[0].message.content  # greedy: the same reply


def test_without_pinning_the_system_prompt_is_lost(smollm2_path):
    """The control of the long-conversation test: the same check fails once the system prompt may stream out."""
    with running_server(model=smollm2_path, model_alias=MODEL, n_sink=4, window=124, n_threads=1,
                        pin_system_prompt=False) as (url, app):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        messages = [{"role": "system", "content": SYSTEM}]
        for question in ["Tell me about the moon.", "How do I boil an egg?", "Name a color.", "What is 2+2?",
                         "Describe a cat.", "Tell me about the moon."]:
            messages.append({"role": "user", "content": question})
            r = chat(client, messages, max_tokens=16)
            messages.append({"role": "assistant", "content": r.choices[0].message.content})
        assert r.model_extra["pymemory"]["n_pinned"] == 4  # only the attention sinks
        messages.append({"role": "user", "content": "What is the secret password?"})
        assert "tulip" not in chat(client, messages, max_tokens=24).choices[0].message.content.lower()


def test_request_longer_than_the_cache_streams_through(client):
    """One request of ~3x the cache: never refused or cut, the cache stays bounded, the reply comes."""
    article = " ".join(f"Line {i}: the tide rose and fell against the old harbour wall." for i in range(60))
    r = chat(client, [{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": article + "\nWhat is the secret password?"}], max_tokens=24)
    mem = r.model_extra["pymemory"]
    assert r.usage.prompt_tokens > 3 * 256 and mem["prefilled_tokens"] == r.usage.prompt_tokens
    assert mem["peak_cells"] <= 256 and mem["tokens_evicted"] > 2 * 256
    assert r.choices[0].message.content
    assert "tulip" in r.choices[0].message.content.lower()  # the pinned system prompt survived the long read
