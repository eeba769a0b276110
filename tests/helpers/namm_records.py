"""Reading a NAMM engine's invocation records."""
from __future__ import annotations


def still_deferred(stats: dict, invocations: list[dict]) -> int:
    """Tokens the last invocation gave up that are still cached: a budget mode evicts them only as new tokens need
    the room, so after the last invocation (cells_before -> cells_after decided) and the tokens seen since, the
    cache holds that many more than cells_after + those tokens."""
    last = invocations[-1]
    pending = stats["cells_used"] - last["cells_after"] - (stats["tokens_seen"] - last["tokens_seen"])
    assert 0 <= pending <= last["cells_before"] - last["cells_after"]
    return pending
