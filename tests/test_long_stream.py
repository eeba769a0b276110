"""Long streams at bounded memory on the three real models (SmolLM2, Gemma-3 with its sliding-window cache,
Qwen2.5). CI runs PYMEMORY_STREAM_TOKENS tokens per model (default 2000: ~8 full turnovers of the cache);
the acceptance run is PYMEMORY_STREAM_TOKENS=50000 (see docs/results.md for its numbers)."""
from __future__ import annotations

import os

import pytest

from conftest import STREAM_TOKENS
from pymemory._loader import _core

pytestmark = pytest.mark.model


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("model_fixture", ["smollm2_path", "gemma_path", "qwen_path"])
def test_long_generation_never_exceeds_the_cache(request, model_fixture):
    path = request.getfixturevalue(model_fixture)
    model = _core.Model.load(path)
    engine = _core.Engine(model, policy="sink", n_sink=4, window=252)
    sampler = _core.Sampler(model, _core.SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=1))
    prompt = model.tokenize("Chapter 1.\n\nIt was a cold morning when", True, False)
    engine.feed(prompt)
    warm_at = max(STREAM_TOKENS // 10, 500)
    rss_warm = None
    peak_cells = peak_pos = 0
    for i in range(STREAM_TOKENS):
        token = engine.sample(sampler)
        engine.feed([token])  # end-of-generation tokens are fed too: the stream never stops
        if i % 64 == 0 or i == STREAM_TOKENS - 1:
            s = engine.stats()
            peak_cells = max(peak_cells, s["peak_cells"])
            peak_pos = max(peak_pos, s["max_pos"])
            assert s["cells_used"] <= 256 and s["max_pos"] < 256, s
        if i == warm_at:
            rss_warm = rss_bytes()
    s = engine.stats()
    growth = rss_bytes() - rss_warm
    print(f"{model.info['architecture']}: {STREAM_TOKENS} tokens, peak cells {s['peak_cells']}, max pos "
          f"{peak_pos}, evictions {s['evictions']}, RSS growth after warm-up {growth / 2**20:.2f} MiB")
    assert s["tokens_seen"] == len(prompt) + STREAM_TOKENS
    assert s["peak_cells"] <= 256 and s["n_ctx_physical"] == 256
    assert s["evictions"] >= (STREAM_TOKENS - 256) // 16
    assert growth < 8 * 2**20  # flat: nothing grows with the stream
