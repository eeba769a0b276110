"""Which parts of a conversation are still in a slot's cache: the chat page's live memory view.

The cache holds the pinned prefix (BOS + system prompt, or the attention sinks) and, for the sink-style
policies, a contiguous tail of the stream. Both are turned back into text (the cached tokens, detokenized with
their special tokens) and laid over the conversation's rendering, whose per-message spans come from rendering
growing prefixes of the messages with the chat template. For h2o, tova and namm, which evict tokens anywhere, the
tail is an approximation: it counts the cells, not which ones.
"""
from __future__ import annotations


def message_spans(model, messages: list[dict[str, str]], template: str, text_len: int) -> list[tuple[int, int]]:
    """[start, end) character span of each message in the rendered conversation."""
    spans, start = [], 0
    for i in range(len(messages)):
        pairs = [(m["role"], m["content"]) for m in messages[: i + 1]]
        end = len(model.apply_chat_template(pairs, False, template).decode("utf-8", errors="replace"))
        end = min(end, text_len)
        spans.append((start, max(start, end)))
        start = max(start, end)
    return spans


def memory_view(model, engine, fed_text: str, messages: list[dict[str, str]], template: str) -> dict:
    stats = engine.stats()
    cached = engine.cached_tokens()
    n_pinned = stats["n_pinned"]
    special = True
    pinned_text = model.detokenize(cached[:n_pinned], special).decode("utf-8", errors="replace")
    if model.info["add_bos"] and cached and cached[0] == model.info["bos"]:
        pinned_text = pinned_text[len(model.detokenize(cached[:1], special).decode("utf-8", errors="replace")):]
    tail_text = model.detokenize(cached[n_pinned:], special).decode("utf-8", errors="replace")
    pinned_end = min(len(pinned_text), len(fed_text))
    tail_start = max(pinned_end, len(fed_text) - len(tail_text))
    out = []
    for (start, end), m in zip(message_spans(model, messages, template, len(fed_text)), messages):
        length = max(1, end - start)
        kept = max(0, min(end, pinned_end) - start) + max(0, end - max(start, tail_start))
        out.append({"role": m["role"], "chars": end - start, "in_cache": round(min(1.0, kept / length), 3),
                    "pinned": start < pinned_end})
    return {"stats": stats, "messages": out, "approximate": engine.policy in ("h2o", "tova", "namm")}
