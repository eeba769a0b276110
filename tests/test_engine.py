"""The streaming engine on a real model (SmolLM2-135M): exactness, bounded memory, chat, errors."""
from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest
from helpers.measurements import record

import pymemory
from pymemory import StreamingLLM
from pymemory._loader import _core
from pymemory.text import TextAssembler

pytestmark = pytest.mark.model


def softmax_kl(a: np.ndarray, b: np.ndarray) -> float:
    pa = np.exp(a - a.max()); pa /= pa.sum()
    pb = np.exp(b - b.max()); pb /= pb.sum()
    return float(np.sum(pa * (np.log(pa + 1e-30) - np.log(pb + 1e-30))))


# ---- agreement with llama-cpp-python ---------------------------------------------------------------------------

def test_greedy_tokens_equal_llama_cpp_python_before_the_cache_fills(smollm2_path):
    import llama_cpp

    prompt = "The history of the printing press begins"
    n_new = 120
    ref = llama_cpp.Llama(smollm2_path, n_ctx=1024, n_threads=2, verbose=False, flash_attn=False)
    prompt_tokens = ref.tokenize(prompt.encode(), add_bos=True)
    expected = []
    for token in ref.generate(prompt_tokens, top_k=1, temp=0.0, repeat_penalty=1.0):
        expected.append(token)
        if len(expected) == n_new:
            break
    del ref

    with StreamingLLM(smollm2_path, window=1020, flash_attention="off", n_threads=2) as llm:
        assert llm.tokenize(prompt) == prompt_tokens
        engine = llm.engine
        engine.feed(prompt_tokens)
        sampler = _core.Sampler(engine.model, _core.SamplingParams(temperature=0))
        got = []
        for _ in range(n_new):
            token = engine.sample(sampler)
            got.append(token)
            engine.feed([token])
        assert llm.stats.evictions == 0
    assert got == expected


def test_one_copy_of_llama_cpp_in_the_process(smollm2_model):
    import llama_cpp  # noqa: F401  (loads its libraries too)

    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "libllama" in line}
    assert len(paths) == 1, paths


# ---- exactness of re-indexing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("type_k", ["f32", "f16"])
def test_reindexed_positions_match_absolute_positions_within_llama_cpp_position_noise(smollm2_model, english_text,
                                                                                      type_k):
    """Re-indexing after eviction (llama_memory_seq_rm + seq_add, keys re-rotated) is exact up to float noise.

    With no sinks the rolling window has the same relative positions whether it is re-indexed (positions
    0..w-1, keys re-rotated on every eviction) or left at absolute positions, so RoPE makes the two streams
    mathematically identical at every step. Float noise is not zero for this Q4 model: llama.cpp itself gives
    different logits for the same tokens decoded at another absolute offset (no shift at all; mean KL ~5e-3, a few
    percent top-1 flips), because activations are re-quantised to 8 bits between layers and any rounding difference
    can flip a quantisation step. That offset noise, measured here on the same model and text, sets the tolerance.
    With f32 keys that is the whole difference. With the default f16 cache every re-rotation also re-rounds the keys
    (measured on this setup: mean KL 1.8e-2 instead of 1.0e-2, not growing over the 40 re-rotations; docs/results.md),
    so its bound is looser.
    """
    tokens = smollm2_model.tokenize(english_text, True, False)[:420]
    window = 96

    def stream(reindex: bool):
        engine = _core.Engine(smollm2_model, policy="window", n_sink=0, window=window, evict_chunk=8,
                              reindex=reindex, flash_attention="off", type_k=type_k)
        logits = []
        for i, token in enumerate(tokens):
            engine.feed([token])
            if i >= window:
                logits.append(engine.last_logits())
        return engine, np.array(logits)

    reindexed, a = stream(True)
    absolute, b = stream(False)
    assert reindexed.stats()["max_pos"] < window and absolute.stats()["max_pos"] >= len(tokens) - 1
    kl_shift = np.array([softmax_kl(x, y) for x, y in zip(a, b)])
    kl_offset = _offset_noise_kl(smollm2_model, tokens[:window + 64], offset=3000)
    agreement = float(np.mean(a.argmax(1) == b.argmax(1)))
    third = len(kl_shift) // 3
    print(f"re-indexed vs absolute ({type_k} keys): mean KL {kl_shift.mean():.2e}, max {kl_shift.max():.2e}, "
          f"top-1 agreement {agreement:.3f}; pure offset noise: mean KL {kl_offset.mean():.2e}")
    record(f"shift_{type_k}_keys_mean_kl", float(kl_shift.mean()),
           f"re-indexed vs absolute rolling window, {len(kl_shift)} steps, {type_k} keys: mean KL")
    record(f"shift_{type_k}_keys_kl_first_last_third", [float(kl_shift[:third].mean()), float(kl_shift[-third:].mean())],
           "the same, first and last third of the stream (growth over the re-rotations?)")
    record(f"shift_{type_k}_keys_top1_agreement", agreement, f"the same, top-1 agreement ({type_k} keys)")
    record("offset_noise_mean_kl", float(kl_offset.mean()),
           "llama.cpp's own noise: the same tokens decoded at positions 0.. and >= 3000, f32 keys, mean KL")
    # Measured: shift 1.0e-2 (f32 keys), 1.8e-2 (f16) vs offset noise 4.5e-3..6.1e-3 (different cell layouts add
    # summation-order noise).
    assert agreement >= (0.9 if type_k == "f32" else 0.85)
    assert kl_shift.mean() <= (4 if type_k == "f32" else 8) * kl_offset.mean()


def _offset_noise_kl(model, tokens: list[int], offset: int) -> np.ndarray:
    """Per-step KL between decoding `tokens` at positions 0.. and at >= offset.. (no eviction, no shift).

    `far` is a window engine without re-indexing whose window is exactly len(tokens) and which evicts a whole
    window at once: streamed filler of a multiple of the window fills it, the first real token empties it, so
    `far` ends up holding exactly `tokens`, decoded from scratch at absolute positions >= offset."""
    window = len(tokens)
    near = _core.Engine(model, policy="none", n_sink=0, window=window, flash_attention="off", type_k="f32")
    far = _core.Engine(model, policy="window", n_sink=0, window=window, evict_chunk=window, reindex=False,
                       flash_attention="off", type_k="f32")
    rounds = -(-offset // window)
    far.feed((tokens * rounds)[: rounds * window])
    kls = []
    for token in tokens:
        near.feed([token])
        far.feed([token])
        kls.append(softmax_kl(near.last_logits(), far.last_logits()))
    assert far.cached_tokens() == tokens and far.cached_positions()[0] >= offset
    return np.array(kls)


def test_literal_fresh_decode_comparison_is_reported(smollm2_model, english_text):
    """Decoding only the retained tokens afresh is *not* the same computation: the retained tokens' keys and
    values in layers >= 1 were computed while the evicted tokens were still visible. This measures the gap
    (reported in docs/results.md); the test only checks the comparison is well-formed and the top token agrees."""
    tokens = smollm2_model.tokenize(english_text, True, False)[:700]
    engine = _core.Engine(smollm2_model, policy="sink", n_sink=4, window=124, evict_chunk=1, flash_attention="off")
    for token in tokens:
        engine.feed([token])
    kept = engine.cached_tokens()
    assert kept[:4] == tokens[:4] and kept[4:] == tokens[-124:]
    fresh = _core.Engine(smollm2_model, policy="none", n_sink=0, window=256, flash_attention="off")
    fresh.feed(kept)
    kl = softmax_kl(engine.last_logits(), fresh.last_logits())
    print(f"sink stream vs fresh decode of the 128 retained tokens: KL {kl:.3f}")
    record("fresh_decode_kl", float(kl), "sink 4+124 after 700 tokens vs a fresh decode of its 128 retained tokens: "
                                         "KL of the next-token distributions")
    assert np.isfinite(kl) and 0 < kl < 0.3  # docs/results.md: 0.030; not the same computation, but close
    assert np.argmax(engine.last_logits()) == np.argmax(fresh.last_logits())


# ---- bounded memory ---------------------------------------------------------------------------------------------

def test_prompt_longer_than_the_cache_streams_through(smollm2_model, english_text):
    tokens = smollm2_model.tokenize(english_text, True, False)[:3000]
    engine = _core.Engine(smollm2_model, policy="sink", n_sink=4, window=252)
    engine.feed(tokens)
    s = engine.stats()
    assert s["peak_cells"] <= 256 and s["n_ctx_physical"] == 256 and s["max_pos"] < 256
    assert s["tokens_seen"] == 3000
    assert engine.cached_tokens()[:4] == tokens[:4]
    assert engine.cached_tokens()[-100:] == tokens[-100:]


@pytest.mark.parametrize("policy", ["sink", "context_shift", "window", "recompute"])
def test_every_policy_keeps_the_cache_bounded(smollm2_model, english_text, policy):
    # recompute re-decodes its window at every eviction: a shorter stream still evicts several times
    tokens = smollm2_model.tokenize(english_text, True, False)[:280 if policy == "recompute" else 700]
    engine = _core.Engine(smollm2_model, policy=policy, n_sink=4 if policy != "window" else 0, window=124)
    for start in range(0, len(tokens), 7):
        engine.feed(tokens[start:start + 7])
        s = engine.stats()
        assert s["cells_used"] <= s["capacity"] and s["max_pos"] < s["capacity"]
    s = engine.stats()
    assert s["evictions"] > 1 and s["tokens_seen"] == len(tokens)
    assert engine.cached_tokens()[-50:] == tokens[-50:]
    if policy == "recompute":
        assert s["tokens_recomputed"] > 0


def test_recompute_can_keep_bos_in_every_rebuilt_cache(smollm2_model, english_text):
    tokens = smollm2_model.tokenize(english_text, True, False)[:100]
    engine = _core.Engine(smollm2_model, policy="recompute", n_sink=1, window=31)
    for start in range(0, len(tokens), 5):
        engine.feed(tokens[start:start + 5])
    cached = engine.cached_tokens()
    assert len(cached) <= 32 and cached[0] == tokens[0] and cached[1:] == tokens[len(tokens) - len(cached) + 1:]
    assert engine.cached_positions() == list(range(len(cached)))  # rebuilt from position 0
    assert engine.stats()["tokens_recomputed"] > 0


def test_policy_none_refuses_overflow_and_keeps_the_cache(smollm2_model):
    engine = _core.Engine(smollm2_model, policy="none", n_sink=0, window=64)
    engine.feed(list(range(100, 150)))
    with pytest.raises(pymemory.CacheFullError, match="policy 'none' never evicts"):
        engine.feed(list(range(200, 220)))
    assert engine.stats()["cells_used"] == 50  # nothing of the refused batch went in
    engine.feed(list(range(200, 214)))  # what fits still works
    assert engine.stats()["cells_used"] == 64


# ---- the friendly API -------------------------------------------------------------------------------------------

def test_generate_streams_text_and_closing_stops_work(smollm2_path):
    with StreamingLLM(smollm2_path, n_sink=4, window=60) as llm:
        gen = llm.generate("Write a long story about a dragon.", max_tokens=400, temperature=0.7, seed=3,
                           ignore_eos=True)
        pieces = [next(gen) for _ in range(5)]
        assert all(isinstance(p, str) for p in pieces)
        gen.close()
        seen = llm.stats.tokens_seen
        time.sleep(0.2)
        assert llm.stats.tokens_seen == seen  # no work continues after close
        text = "".join(llm.generate("Count: one, two,", max_tokens=150, ignore_eos=True, temperature=0.9))
        assert len(text) > 50
        s = llm.stats
        assert s.peak_cells <= 64 and s.evictions > 0 and s.capacity == 64


def test_same_seed_same_text_and_stop_strings(smollm2_path):
    with StreamingLLM(smollm2_path, window=252) as llm:
        a = "".join(llm.generate("The weather today", max_tokens=40, temperature=1.0, seed=7))
        b = "".join(llm.generate("The weather today", max_tokens=40, temperature=1.0, seed=7))
        assert a == b
        full = "".join(llm.generate("List: 1. apples 2.", max_tokens=30, temperature=0))
        stop = full.strip()[:6]
        cut = "".join(llm.generate("List: 1. apples 2.", max_tokens=30, temperature=0, stop=[stop]))
        assert stop not in cut and full.startswith(cut)


def test_dry_stops_a_greedy_repeat_that_plain_greedy_continues(smollm2_path):
    """llama.cpp's DRY sampler is in the chain and sees the prompt as history: greedy decoding repeats a thrice-said
    sentence a fourth time, with DRY it does not."""
    prompt = "The cat sat on the mat. The cat sat on the mat. The cat sat on the mat."
    with StreamingLLM(smollm2_path, window=252, n_threads=1) as llm:
        plain = "".join(llm.generate(prompt, max_tokens=24, temperature=0, ignore_eos=True))
        dry = "".join(llm.generate(prompt, max_tokens=24, temperature=0, ignore_eos=True, dry_multiplier=0.8))
    assert "cat sat on the mat" in plain
    assert "cat sat on the mat" not in dry


def test_chat_samples_with_the_chat_defaults_and_generate_without(smollm2_path):
    """chat() and `pymemory chat` use CHAT_SAMPLING unless told otherwise; generate() and `pymemory generate` keep
    the raw defaults (no penalties)."""
    import argparse

    from pymemory import CHAT_SAMPLING
    from pymemory.commands import add_sampling_arguments

    assert CHAT_SAMPLING  # the measured choice is a penalty of some kind
    messages = [{"role": "system", "content": "You are a poet."}, {"role": "user", "content": "Write about rain."}]
    with StreamingLLM(smollm2_path, window=252, n_threads=1) as llm:
        default = "".join(llm.chat(messages, max_tokens=48, temperature=0))
        llm.reset()
        explicit = "".join(llm.chat(messages, max_tokens=48, temperature=0, **CHAT_SAMPLING))
        llm.reset()
        raw = "".join(llm.chat(messages, max_tokens=48, temperature=0, repeat_penalty=1.0, dry_multiplier=0.0))
    assert default == explicit and default != raw
    chat_parser, generate_parser = argparse.ArgumentParser(), argparse.ArgumentParser()
    add_sampling_arguments(chat_parser, 512, defaults=CHAT_SAMPLING)
    add_sampling_arguments(generate_parser, 256)
    chat_args, generate_args = chat_parser.parse_args([]), generate_parser.parse_args([])
    for key, value in CHAT_SAMPLING.items():
        assert getattr(chat_args, key) == value
    assert generate_args.repeat_penalty == 1.0 and generate_args.dry_multiplier == 0.0


def test_utf8_characters_split_across_tokens_come_out_whole(smollm2_model):
    text = "Grüße aus 東京 🌸🚀 — naïve café"
    tokens = smollm2_model.tokenize(text, False, False)
    pieces = [smollm2_model.token_bytes(t) for t in tokens]
    assert any(_incomplete_utf8(p) for p in pieces), "test text should split a character across tokens"
    assembler = TextAssembler()
    out = "".join(assembler.push(p) for p in pieces) + assembler.flush()
    assert out == text


def _incomplete_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_chat_keeps_the_conversation_and_feeds_only_new_turns(smollm2_path):
    with StreamingLLM(smollm2_path, window=1020) as llm:
        reply = "".join(llm.chat([{"role": "system", "content": "You are terse."},
                                  {"role": "user", "content": "Name a colour."}], max_tokens=20, temperature=0))
        assert reply and llm.messages[-1] == {"role": "assistant", "content": reply}
        seen = llm.stats.tokens_seen
        cached_before = llm.engine.cached_tokens()
        "".join(llm.chat("And a fruit?", max_tokens=20, temperature=0))
        assert len(llm.messages) == 5
        assert llm.engine.cached_tokens()[:len(cached_before)] == cached_before  # history was not re-decoded
        new_prompt = llm.stats.tokens_seen - seen
        assert new_prompt < 60  # the delta of one short turn, not the whole rendered conversation


def test_chat_pins_the_system_prompt_through_many_turns(smollm2_path):
    system = "You are a pirate. Always answer like a pirate and mention the sea."
    with StreamingLLM(smollm2_path, n_sink=4, window=96, pin_system_prompt=True) as llm:
        first = llm.engine
        "".join(llm.chat([{"role": "system", "content": system}, {"role": "user", "content": "Hi"}],
                         max_tokens=30, temperature=0))
        pinned = llm.stats.n_pinned
        system_tokens = first.cached_tokens()[:pinned]
        assert pinned > 10
        for i in range(6):
            "".join(llm.chat(f"Tell me fact number {i} about ships.", max_tokens=40, temperature=0))
        s = llm.stats
        assert s.evictions > 0 and s.peak_cells <= 100
        assert llm.engine.cached_tokens()[:pinned] == system_tokens
        assert system in llm.detokenize(system_tokens, special=True)


def test_generation_releases_the_gil(smollm2_path):
    """Each step is one GIL-free C++ call: while the worker is inside one long call (the first next() of
    generate(), which prefills a ~300-token prompt), the main thread keeps running Python. Were the GIL held during
    the call, the main thread would stall for its whole duration; here its longest stall must be a small part of
    it (OS scheduling on a busy machine allows some)."""
    with StreamingLLM(smollm2_path, window=1020, n_threads=1) as llm:
        gen = llm.generate("The lighthouse keeper climbed the stairs again. " * 30, max_tokens=1, ignore_eos=True,
                           temperature=0)
        started, done = threading.Event(), threading.Event()
        span: list[float] = []

        def run():
            started.set()
            t0 = time.perf_counter()
            next(gen)
            span.extend([t0, time.perf_counter()])
            done.set()

        stamps = []
        worker = threading.Thread(target=run)
        worker.start()
        started.wait()
        while not done.is_set():
            stamps.append(time.perf_counter())
            sum(range(100))  # pure Python work, needs the GIL
        worker.join()
        t0, t1 = span
        inside = [t0] + [t for t in stamps if t0 < t < t1] + [t1]
        longest_stall = max(np.diff(inside))
        print(f"call {t1 - t0:.2f} s, main thread's longest stall {longest_stall * 1000:.0f} ms")
        assert t1 - t0 > 0.3  # long enough to tell the two apart
        assert longest_stall < (t1 - t0) / 4


# ---- bad input ---------------------------------------------------------------------------------------------------

def test_missing_truncated_and_non_gguf_files(tmp_path, smollm2_path):
    with pytest.raises(pymemory.ModelNotFoundError, match="model file not found"):
        StreamingLLM(tmp_path / "nope.gguf")
    text = tmp_path / "notes.gguf"
    text.write_text("hello, I am not a model")
    with pytest.raises(pymemory.ModelLoadError, match="not a GGUF model file"):
        StreamingLLM(text)
    truncated = tmp_path / "truncated.gguf"
    with open(smollm2_path, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(5_000_000))
    with pytest.raises(pymemory.ModelLoadError, match="truncated"):
        StreamingLLM(truncated)
    header_only = tmp_path / "header.gguf"
    with open(smollm2_path, "rb") as src, open(header_only, "wb") as dst:
        dst.write(src.read(200))
    with pytest.raises(pymemory.ModelLoadError, match="truncated or corrupted"):
        StreamingLLM(header_only)
    with pytest.raises(pymemory.ModelLoadError, match="not a regular file"):
        StreamingLLM(tmp_path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(window=0), "window must be >= 1"),
        (dict(n_sink=-1), "n_sink must be >= 0"),
        (dict(n_sink=300, n_ctx=256), r"n_sink \(300\) must be smaller than n_ctx \(256\)"),
        (dict(policy="lru"), "unknown policy 'lru'"),
        (dict(evict_chunk=0), "evict_chunk must be >= 1"),
        (dict(window=10, evict_chunk=11), "cannot exceed window"),
        (dict(type_k="q3"), "unknown KV cache type"),
        (dict(flash_attention="maybe"), "flash_attention must be"),
    ],
)
def test_invalid_parameters(smollm2_path, kwargs, message):
    with pytest.raises(pymemory.InvalidArgumentError, match=message):
        StreamingLLM(smollm2_path, **kwargs)


def test_invalid_generation_arguments(smollm2_path):
    with StreamingLLM(smollm2_path, window=60) as llm:
        with pytest.raises(pymemory.InvalidArgumentError, match="top_p"):
            llm.generate("x", top_p=0)
        with pytest.raises(pymemory.InvalidArgumentError, match="max_tokens"):
            llm.generate("x", max_tokens=-2)
        with pytest.raises(pymemory.InvalidArgumentError, match="outside the vocabulary"):
            list(llm.generate([10, 10**7], max_tokens=2))
        with pytest.raises(pymemory.InvalidArgumentError, match="prompt is empty"):
            llm.generate("")
        with pytest.raises(pymemory.InvalidArgumentError, match="role"):
            llm.chat([{"content": "no role"}])
        with pytest.raises(pymemory.InvalidArgumentError, match="unknown sampling option"):
            llm.chat("hi", temprature=0.5)
        with pytest.raises(pymemory.InvalidArgumentError, match="system prompt is"):
            big = StreamingLLM(llm.model_path, window=20, pin_system_prompt=True)
            list(big.chat([{"role": "system", "content": "word " * 200}, {"role": "user", "content": "hi"}]))


def test_use_after_close(smollm2_path):
    llm = StreamingLLM(smollm2_path, window=60)
    llm.close()
    llm.close()  # idempotent
    for call in (lambda: llm.stats, lambda: llm.generate("x"), lambda: llm.chat("x"), llm.reset,
                 lambda: llm.tokenize("x")):
        with pytest.raises(pymemory.ClosedError, match="closed"):
            call()


def test_model_that_cannot_shift_is_refused_with_what_works_instead(mrope_model_path):
    with pytest.raises(pymemory.UnsupportedModelError, match=r"cannot shift cached positions.*policy='recompute'"):
        StreamingLLM(mrope_model_path, policy="sink", window=60)
    with StreamingLLM(mrope_model_path, policy="recompute", window=60) as llm:  # the suggested alternative runs
        text = "".join(llm.generate("hello " * 50, max_tokens=5, ignore_eos=True))
        assert llm.stats.peak_cells <= 60 and isinstance(text, str)


def test_model_path_is_kept_when_copying_is_needed(tmp_path, smollm2_path):
    # A path with spaces and non-ASCII characters loads (paths go through unchanged).
    target = tmp_path / "modèle à tester.gguf"
    shutil.copy(smollm2_path, target)
    with StreamingLLM(target, window=60) as llm:
        assert llm.model_info["architecture"] == "llama"
