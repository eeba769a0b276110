"""Policy specifications for evaluation commands: `NAME[:SINKS+WINDOW][,key=value...]`.

Examples: `sink` (uses --n-sink/--window), `sink:4+252`, `window` (no sinks, same total cache), `recompute`,
`h2o:4+252,h2o_recent=64`, `tova:4+252`, `namm:4+1020,namm_path=namm.gguf,namm_mode=budget`. Every `key=value` is passed to
the engine as is (numbers and booleans parsed), so new policies need no change here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import InvalidArgumentError

SINKLESS = ("window", "recompute", "none")  # the cache is all window: same total size as the sink configuration
ENGINE_OPTIONS = {"evict_chunk", "reindex", "h2o_recent", "namm_path", "namm_mode", "quorum", "max_cells",
                  "namm_delay", "namm_layers", "namm_defer_evictions", "namm_neighbours", "namm_key_weight",
                  "prefill_chunk", "type_k",
                  "type_v",
                  "flash_attention"}
EVAL_OPTIONS = {"chunk"}  # read by the evaluation itself (tokens scored per decode), not passed to the engine


@dataclass(frozen=True)
class PolicySpec:
    name: str
    n_sink: int
    window: int
    options: dict = field(default_factory=dict)

    @property
    def capacity(self) -> int:
        return self.n_sink + self.window

    @property
    def label(self) -> str:
        extra = "".join(f",{k}={v}" for k, v in sorted(self.options.items()) if k != "namm_path")
        return f"{self.name} {self.n_sink}+{self.window}{extra}"

    def engine_kwargs(self) -> dict:
        engine_options = {k: v for k, v in self.options.items() if k in ENGINE_OPTIONS}
        if "namm_path" in engine_options:  # a file or the name of a shipped NAMM
            from ..namm.packaged import resolve_namm

            engine_options["namm_path"] = resolve_namm(engine_options["namm_path"])
        return {"policy": self.name, "n_sink": self.n_sink, "window": self.window, **engine_options}


def _value(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_policy(spec: str, n_sink: int, window: int) -> PolicySpec:
    head, *pairs = spec.split(",")
    m = re.fullmatch(r"([a-z_0-9]+)(?::(\d+)\+(\d+))?", head.strip())
    if not m:
        raise InvalidArgumentError(f"cannot read policy {spec!r}; write NAME[:SINKS+WINDOW][,key=value...], "
                                   "e.g. sink:4+252 or h2o:4+252,h2o_recent=64")
    name = m.group(1)
    if m.group(2) is not None:
        sinks, win = int(m.group(2)), int(m.group(3))
    elif name in SINKLESS:
        sinks, win = 0, n_sink + window
    else:
        sinks, win = n_sink, window
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key.strip() not in ENGINE_OPTIONS | EVAL_OPTIONS:
            raise InvalidArgumentError(f"policy option {pair!r} is not key=value with a key among "
                                       f"{sorted(ENGINE_OPTIONS | EVAL_OPTIONS)}")
        options[key.strip()] = _value(value.strip())
    return PolicySpec(name, sinks, win, options)
