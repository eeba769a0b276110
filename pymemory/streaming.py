"""The friendly API: :class:`StreamingLLM` streams text at bounded memory.

Layers (each usable on its own):

* ``pymemory._core`` — raw bindings: ``Model``, ``Engine`` (one token stream through a bounded cache),
  ``Sampler``. Each call is one GIL-free C++ step.
* :class:`StreamingLLM` — owns a model and an engine, turns token bytes into text, runs chat turns.

Python drives the generation loop, so closing a generator (or Ctrl-C) stops the work between two tokens.

Threads: one StreamingLLM is one stream. Every step runs under the object's lock, so several threads may call it
without crashing, but a new generate()/chat()/reset()/close() supersedes the generators started before it (their
next step raises SupersededError) instead of mixing two streams in one cache. For concurrent streams, give each
thread its own StreamingLLM, or, to load the weights once, one ``_core.Engine`` per thread on one shared
``_core.Model`` (README, "Threads").
"""
from __future__ import annotations

import numbers
import os
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Callable, Iterator, Mapping, Sequence, Union

from ._loader import _core
from .errors import ClosedError, InvalidArgumentError, SupersededError
from .namm.gguf_format import DEPLOY_MODES
from .text import TextAssembler, common_prefix_length

POLICIES = ("sink", "context_shift", "window", "recompute", "none", "h2o", "tova", "namm")

# Sampling defaults of chat() and `pymemory chat`, on top of generate()'s (which stay raw: no penalties). Chosen by
# measurement: scripted chats through a small cache with an interrupted reply, counting replies that degenerate
# into loops (tools/chat_defaults.py, docs/results.md "Chat sampler defaults"). A keyword given to chat() wins.
CHAT_SAMPLING: dict[str, float] = {"repeat_penalty": 1.1, "repeat_last_n": 64}
NAMM_MODES = DEPLOY_MODES

Message = Mapping[str, str]
Prompt = Union[str, Sequence[int]]


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of the KV cache and the stream (see ``StreamingLLM.stats``)."""

    cells_used: int  # tokens in the KV cache now
    capacity: int  # n_sink + window: the most cells the policy ever lets the cache hold
    n_ctx_physical: int  # cells llama.cpp allocated (capacity rounded up to a multiple of 256)
    n_pinned: int  # leading tokens never evicted (sinks, pinned system prompt)
    peak_cells: int  # largest cells_used since the last reset
    tokens_seen: int  # tokens that went through the model (prompt + generated)
    evictions: int  # eviction events
    tokens_evicted: int
    tokens_recomputed: int  # re-decoded by the "recompute" policy
    values_offered: int  # namm_merge_threshold: (token, layer, KV head) values given up ...
    values_merged: int  # ... and merged into a kept token's
    max_pos: int  # largest position in the cache (-1 when empty)
    next_pos: int  # position the next token gets

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SamplingOptions:
    """Sampling settings of one generate()/chat() call. ``temperature <= 0`` means greedy."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int = 0
    dry_multiplier: float = 0.0  # DRY: penalise extending a repeat of earlier text (0 = off)
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = -1  # -1 = the whole context

    def to_core(self) -> "_core.SamplingParams":
        for f in fields(self):
            value = getattr(self, f.name)
            wanted = numbers.Integral if f.type == "int" else numbers.Real
            if isinstance(value, bool) or not isinstance(value, wanted):
                kind = "an integer" if f.type == "int" else "a number"
                raise InvalidArgumentError(f"{f.name} must be {kind} (got {value!r})")
        if self.top_k < 0:
            raise InvalidArgumentError(f"top_k must be >= 0 (got {self.top_k}); use 0 to disable it")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidArgumentError(f"top_p must be in (0, 1] (got {self.top_p}); use 1 to disable it")
        if self.seed < 0 or self.seed > 0xFFFFFFFF:
            raise InvalidArgumentError(f"seed must be in [0, 2**32) (got {self.seed})")
        return _core.SamplingParams(**asdict(self))


def _check_text(name: str, value: object) -> str:
    """A str that can go to the C++ core (valid UTF-8: no lone surrogates)."""
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{name} must be a str (got {type(value).__name__})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgumentError(
            f"{name} contains a character that is not valid Unicode text (a lone surrogate {value[exc.start]!r} "
            f"at index {exc.start}); clean it first, e.g. text.encode('utf-8', 'replace').decode('utf-8')"
        ) from None
    return value


def _check_stop(stop: object) -> list[str] | None:
    """Stop strings: None, one str, or a list of non-empty strs."""
    if stop is None:
        return None
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise InvalidArgumentError(f"stop must be a string or a list of non-empty strings (got {stop!r})")
    return list(stop)


def _history_length(options: "_core.SamplingParams") -> int:
    """Tokens of history the sampler chain needs: -1 = all, 0 = none."""
    needs = [options.repeat_last_n]
    if options.dry_multiplier > 0:
        needs.append(options.dry_penalty_last_n)
    return -1 if -1 in needs else max(needs)


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"{name} must be an integer (got {value!r})")
    if value < minimum:
        raise InvalidArgumentError(f"{name} must be >= {minimum} (got {value})")
    if value > 2**31 - 1:
        raise InvalidArgumentError(f"{name} is too large (got {value}; at most 2**31 - 1)")
    return value


class StreamingLLM:
    """A GGUF model that streams text for as long as you want, with a KV cache of bounded size.

    The default memory policy keeps the first ``n_sink`` tokens (attention sinks) and the most recent
    ``window`` tokens, evicting the oldest others and re-indexing positions inside the cache (StreamingLLM,
    Xiao et al. 2024), so memory stays at ``n_sink + window`` cells however long the stream gets.

    Args:
        model_path: a GGUF file, an asset name (see ``pymemory fetch --list``), or None for the default model
            (SmolLM2-135M-Instruct, fetched and verified into the cache on first use).
        n_sink: tokens kept forever at the start of the stream (default 4, as in the paper).
        window: most recent tokens kept. The cache holds at most ``n_sink + window`` tokens.
        n_ctx: alternatively, the cache size in cells (then ``window = n_ctx - n_sink``), as in llama.cpp.
        policy: "sink" (default), "context_shift" (llama.cpp's: keep n_sink, drop half when full),
            "window" (no sinks: the paper's negative control), "recompute" (rebuild the cache from the first
            ``n_sink`` and the last ``window`` tokens for every token: exact but slow; the paper's baseline has
            ``n_sink=0``), "none" (never evict; error when full),
            "h2o" (heavy hitters by accumulated attention + ``h2o_recent`` recent tokens, at the same budget),
            "tova" (TOVA: when full, evict the tokens the newest token attends to least, at the same budget),
            "namm" (Sakana AI's learned memory: a NAMM GGUF scores every cached token every 512 tokens).
            The attention-scored ones (h2o, tova, namm) turn flash attention off to read attention probabilities.
        evict_chunk: tokens evicted at once when the cache is full (1 = every token, as in the paper; default
            window/16, at least 16: each eviction re-rotates every cached key, see docs/results.md).
        n_threads: CPU threads (default: all cores).
        n_gpu_layers: layers offloaded to the GPU backend llama-cpp-python was built with (-1 = all).
        seed: default sampling seed.
        prefill_chunk: tokens decoded per step while streaming a prompt (None = auto: window/4, 16..256).
        pin_system_prompt: in chat(), keep BOS and the whole system prompt as sinks.
        chat_template: override the GGUF's chat template (a built-in name such as "chatml", or template text).
        flash_attention: "auto", "on" or "off".
        type_k, type_v: KV cache element types ("f16", "f32", "q8_0", ...).
        use_extra_bufts: weight repacking; set False to work around ggml's AMX crash (llama.cpp #20824).
        reindex: compact positions after evictions (default: True for sink-style policies, as in the paper).
            h2o, tova and namm keep absolute positions like their originals by default, and close the cache's gaps
            once the next position would pass the model's training context (past it the model's output
            collapses: docs/results.md §4); True compacts after every eviction, False keeps absolute positions
            forever (an ablation).
        h2o_recent: h2o's and tova's always-kept recent tokens (default window // 2 for h2o, 0 for tova).
        namm_path: the NAMM GGUF for policy "namm" (``pymemory convert-namm`` or ``pymemory train-namm``), or
            the name of a NAMM shipped with pymemory ("smollm2", "smollm2-rate", "smollm2-keys", "smollm2-evolved",
            "qwen2.5", "qwen2.5-rate", "qwen2.5-keys", "qwen2.5-per-head"; the "-keys" ones, the "-rate" ones with a
            key weight, keep retrieval answers best, two to three times as many as the "-rate" ones at the same text;
            see ``pymemory.namm.packaged``).
        namm_mode: "quorum" (evict a token when at least ``quorum`` of the (layer, head) pairs drop it; 1.0 =
            all of them, so nothing any head keeps is removed), "budget" (hold the cache at ``max_cells`` by keep
            votes, then mean score), "budget_max" (hold it there by each token's highest score over the pairs),
            "budget_zmax" (by its highest score standardised within each pair: relative to that pair's mean and
            spread over the cached tokens) or "budget_mix" (as budget, after keeping the max_cells / 8 tokens with
            the highest standardised score).
            Default: the mode the NAMM file was trained with (a trained NAMM says), else quorum 1.0.
        quorum, max_cells, namm_delay: see namm_mode; namm_delay overrides the invocation period (the file's).
        namm_layers: how many attention layers NAMM scores, spread evenly over the depth (default: all). Each
            scored layer costs tap and scorer time; docs/namm.md has the measured trade-off.
        namm_defer_evictions: in the budget modes, evict the tokens an invocation gives up only as new tokens need
            their cells, so the cache stays at its peak between invocations (default True); False evicts them at
            the invocation, as the original NAMM does (the cache then falls to max_cells).
        namm_neighbours: in the budget modes, rank each token by the highest score among itself and this many
            nearest cached tokens on each side, so a token the NAMM singles out keeps the words around it
            (default: the NAMM file's setting, else 0; docs/namm.md, "Neighbours").
        namm_key_weight: in the budget modes, add this many standard deviations of each token's key
            distinctiveness (KeyDiff on the keys before RoPE: a token unlike the others is kept) to the score it
            ranks by (default: the NAMM file's setting, else 0; docs/namm.md, "Keys").
        namm_merge_threshold: merge the values of each token the NAMM gives up into the kept token whose key is
            most like its own (centred cosine at least this, between -1 and 1), per layer and KV head, so part of
            what is evicted stays (default: off; docs/namm.md, "Merged values"). f16/f32 KV caches; not on
            models with sliding-window layers.
        verbose: show llama.cpp's informational log.
    """

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        *,
        n_sink: int = 4,
        window: int = 1020,
        n_ctx: int | None = None,
        policy: str = "sink",
        evict_chunk: int | None = None,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        seed: int = 0,
        prefill_chunk: int | None = None,
        pin_system_prompt: bool = False,
        chat_template: str | None = None,
        flash_attention: str = "auto",
        type_k: str = "f16",
        type_v: str = "f16",
        use_extra_bufts: bool = True,
        reindex: bool | None = None,
        h2o_recent: int | None = None,
        namm_path: str | os.PathLike | None = None,
        namm_mode: str | None = None,
        quorum: float | None = None,
        max_cells: int | None = None,
        namm_delay: int | None = None,
        namm_layers: int | None = None,
        namm_defer_evictions: bool = True,
        namm_neighbours: int | None = None,
        namm_key_weight: float | None = None,
        namm_merge_threshold: float | None = None,
        verbose: bool = False,
    ) -> None:
        self._engine = None  # set last: close() and __del__ must work if __init__ fails half-way
        self._lock = threading.RLock()  # held by every step that touches the engine (see the module docstring)
        self._turn = 0  # id of the newest generate()/chat(); older generators raise SupersededError
        self._commit_partial: Callable[[], None] | None = None  # records an unfinished chat reply if superseded
        for name, value, kinds in (("flash_attention", flash_attention, str), ("type_k", type_k, str),
                                   ("type_v", type_v, str), ("chat_template", chat_template, (str, type(None))),
                                   ("reindex", reindex, (bool, type(None))), ("use_extra_bufts", use_extra_bufts, bool),
                                   ("policy", policy, str), ("namm_path", namm_path, (str, os.PathLike, type(None))),
                                   ("namm_defer_evictions", namm_defer_evictions, bool),
                                   ("model_path", model_path, (str, os.PathLike, type(None)))):
            if not isinstance(value, kinds):
                raise InvalidArgumentError(f"{name} has the wrong type ({type(value).__name__}); see help(StreamingLLM)")
        if quorum is not None and (isinstance(quorum, bool) or not isinstance(quorum, numbers.Real)):
            raise InvalidArgumentError(f"quorum must be a number in (0, 1] (got {quorum!r})")
        if chat_template:
            _check_text("chat_template", chat_template)
        if policy not in POLICIES:
            raise InvalidArgumentError(f"unknown policy {policy!r}; choose one of: {', '.join(POLICIES)}")
        _check_int("n_sink", n_sink, 0)
        if n_ctx is not None:
            _check_int("n_ctx", n_ctx, 1)
            if n_sink >= n_ctx:
                raise InvalidArgumentError(
                    f"n_sink ({n_sink}) must be smaller than n_ctx ({n_ctx}): the cache needs room for recent tokens"
                )
            window = n_ctx - n_sink
        _check_int("window", window, 1)
        if evict_chunk is None:
            evict_chunk = _core.default_evict_chunk(window)
        _check_int("evict_chunk", evict_chunk, 1)
        _check_int("n_gpu_layers", n_gpu_layers, -1)
        if n_threads is not None:
            _check_int("n_threads", n_threads, 1)
        if prefill_chunk is not None:
            _check_int("prefill_chunk", prefill_chunk, 1)
        if namm_mode is not None and namm_mode not in NAMM_MODES:
            raise InvalidArgumentError(f"namm_mode must be one of {NAMM_MODES} (got {namm_mode!r})")
        if namm_key_weight is not None and (isinstance(namm_key_weight, bool)
                                            or not isinstance(namm_key_weight, numbers.Real)
                                            or not 0.0 <= namm_key_weight <= 100.0):
            raise InvalidArgumentError(f"namm_key_weight must be a number between 0 and 100 (got {namm_key_weight!r})")
        if namm_merge_threshold is not None and (isinstance(namm_merge_threshold, bool)
                                                 or not isinstance(namm_merge_threshold, numbers.Real)
                                                 or not -1.0 <= namm_merge_threshold <= 1.0):
            raise InvalidArgumentError("namm_merge_threshold must be a cosine between -1 and 1 "
                                       f"(got {namm_merge_threshold!r})")
        if quorum is not None and not (0.0 < quorum <= 1.0):
            raise InvalidArgumentError(f"quorum must be in (0, 1] (got {quorum})")
        if policy == "namm" and namm_path is None:
            raise InvalidArgumentError(
                "policy 'namm' needs namm_path=<a NAMM GGUF>; convert a trained checkpoint with "
                "`pymemory convert-namm ckpt.pt -o namm.gguf --trust-pickle`"
            )
        if namm_path is not None:
            from .namm.packaged import resolve_namm

            namm_path = resolve_namm(namm_path)

        from .assets import resolve_model  # local import: assets pulls in nothing heavy, but keep startup lean

        path = os.fspath(resolve_model(model_path))
        _core.set_log_verbosity(2 if verbose else 0)
        self.model_path = path
        self.policy = policy
        self.n_sink = n_sink
        self.window = window
        self.evict_chunk = evict_chunk
        self.seed = seed
        self.pin_system_prompt = pin_system_prompt
        self.chat_template = chat_template or ""
        self._model = _core.Model.load(path, n_gpu_layers=n_gpu_layers, use_extra_bufts=use_extra_bufts)
        self._engine = _core.Engine(
            self._model,
            policy=policy,
            n_sink=n_sink,
            window=window,
            evict_chunk=evict_chunk,
            n_threads=n_threads or 0,
            prefill_chunk=prefill_chunk or 0,
            flash_attention=flash_attention,
            type_k=type_k,
            type_v=type_v,
            reindex=reindex,
            h2o_recent=-1 if h2o_recent is None else _check_int("h2o_recent", h2o_recent, 0),
            namm_path=os.fspath(namm_path) if namm_path is not None else "",
            namm_mode=namm_mode or "",
            quorum=quorum or 0.0,
            max_cells=0 if max_cells is None else _check_int("max_cells", max_cells, 1),
            namm_delay=0 if namm_delay is None else _check_int("namm_delay", namm_delay, 16),
            namm_layers=0 if namm_layers is None else _check_int("namm_layers", namm_layers, 1),
            namm_defer_evictions=namm_defer_evictions,
            namm_neighbours=-1 if namm_neighbours is None else _check_int("namm_neighbours", namm_neighbours, 0),
            namm_key_weight=-1.0 if namm_key_weight is None else float(namm_key_weight),
            namm_merge_threshold=None if namm_merge_threshold is None else float(namm_merge_threshold),
        )
        self.messages: list[dict[str, str]] = []  # the running conversation of chat()
        self._chat_fed_text = ""  # rendered conversation text that has gone into the cache
        self._stream_started = False

    # ---- lifecycle -------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Frees the model and the cache. Further use raises ClosedError. Safe to call twice."""
        with self._lock:  # waits for a step in progress in another thread
            self._commit_partial = None
            self._turn += 1
            self._engine = None
            self._model = None

    def __enter__(self) -> "StreamingLLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._engine is None

    def _live_engine(self) -> "_core.Engine":
        if self._engine is None:
            raise ClosedError("this StreamingLLM was closed; create a new one to keep generating")
        return self._engine

    def reset(self) -> None:
        """Empties the cache and forgets the conversation (the model stays loaded). Running generators of this
        object are superseded."""
        with self._lock:
            engine = self._live_engine()
            self._commit_partial = None
            self._turn += 1
            engine.reset()
            self.messages = []
            self._chat_fed_text = ""
            self._stream_started = False

    def _new_turn(self) -> int:
        """Starts a generate()/chat() (the caller holds the lock): supersedes the older generators, first recording
        the part of a chat reply that is already in the cache, as closing that generator would have."""
        commit, self._commit_partial = self._commit_partial, None
        if commit is not None:
            commit()
        self._turn += 1
        return self._turn

    @contextmanager
    def _step(self, turn: int) -> Iterator["_core.Engine"]:
        """One step of the generator started as `turn`: under the lock, and only while it is the newest."""
        with self._lock:
            engine = self._live_engine()
            if turn != self._turn:
                raise SupersededError(
                    "this generator was superseded by a newer generate(), chat() or reset() on the same StreamingLLM "
                    "(in this thread or another), so it stopped instead of mixing two streams; finish or close() "
                    "one generator before starting the next, or give each thread its own StreamingLLM"
                )
            yield engine

    # ---- introspection ---------------------------------------------------------------------------------------

    @property
    def stats(self) -> CacheStats:
        """Cache occupancy and stream counters right now."""
        with self._lock:
            return CacheStats(**self._live_engine().stats())

    @property
    def model_info(self) -> dict:
        """Architecture, layer/head counts, vocabulary size, chat template of the loaded model."""
        with self._lock:
            self._live_engine()
            return dict(self._model.info)

    @property
    def policy_stats(self) -> dict:
        """Attention-scored policies (h2o, namm): per-invocation cache sizes per layer and overall, like the
        original NAMM's mem_stats, plus forced evictions. Empty for the other policies."""
        with self._lock:
            stats = self._live_engine().policy_stats()
        records = stats["invocations"]
        if records:
            # Budget-mode invocations that could not evict skip the scorer and have no per-layer counts.
            scored = [r for r in records if r["layer_kept"]]
            n_layers = len(scored[0]["layer_kept"]) if scored else 0
            # layer_kept follows scored_layers: every layer, or a sliding-window model's global layers only
            layer_ids = stats.get("scored_layers") or list(range(n_layers))
            stats["mem_stats"] = {
                "overall/mean_cells_after": sum(r["cells_after"] for r in records) / len(records),
                **{
                    f"layer_id_{layer_ids[i]}/mean_kept": sum(r["layer_kept"][i] for r in scored) / len(scored)
                    for i in range(n_layers)
                },
            }
        return stats

    @property
    def capacity(self) -> int:
        with self._lock:
            return self._live_engine().capacity

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        _check_text("text", text)
        with self._lock:
            self._live_engine()
            return self._model.tokenize(text, add_bos, special)

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        tokens = self._check_tokens(tokens)
        with self._lock:
            self._live_engine()
            return self._model.detokenize(tokens, special).decode("utf-8", errors="replace")

    @staticmethod
    def _check_tokens(tokens: object) -> list[int]:
        if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
            raise InvalidArgumentError(f"expected a list of token ids (got {type(tokens).__name__})")
        for t in tokens:
            if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                raise InvalidArgumentError(f"token ids must be integers (got {t!r})")
            if not (-(2**31) <= t < 2**31):
                raise InvalidArgumentError(f"token id {t} is outside the vocabulary")
        return [int(t) for t in tokens]

    @property
    def engine(self) -> "_core.Engine":
        """The raw engine (feed/score/sample), for evaluation tools."""
        return self._live_engine()

    # ---- generation ------------------------------------------------------------------------------------------

    def generate(
        self,
        prompt: Prompt,
        max_tokens: int | None = 256,
        *,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        ignore_eos: bool = False,
        continue_stream: bool = False,
        dry_multiplier: float = 0.0,
        dry_base: float = 1.75,
        dry_allowed_length: int = 2,
        dry_penalty_last_n: int = -1,
    ) -> Iterator[str]:
        """Streams the continuation of ``prompt`` as text pieces, as they are produced.

        ``prompt`` is text (BOS added if the model wants one) or a list of token ids. ``max_tokens=None``
        generates until an end-of-generation token or a stop string; with ``ignore_eos`` it never stops on its
        own, and the cache stays bounded however long it runs. By default the stream starts afresh; with
        ``continue_stream=True`` the prompt continues the current stream. Close the generator to stop early.
        Starting a generation supersedes this object's older generators (their next step raises
        SupersededError).
        """
        self._live_engine()
        options = SamplingOptions(
            temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, frequency_penalty,
            presence_penalty, self.seed if seed is None else seed, dry_multiplier, dry_base, dry_allowed_length,
            dry_penalty_last_n,
        ).to_core()  # validates now, not at the first next()
        if max_tokens is not None:
            _check_int("max_tokens", max_tokens, 0)
        stop = _check_stop(stop)
        if not isinstance(prompt, str):
            prompt = self._check_tokens(prompt)
        with self._lock:
            engine = self._live_engine()
            if isinstance(prompt, str):
                _check_text("prompt", prompt)
                tokens = self._model.tokenize(prompt, not (continue_stream and self._stream_started), False)
            else:
                tokens = prompt
            turn = self._new_turn()
            if not continue_stream:
                engine.reset()
                self.messages, self._chat_fed_text = [], ""
                self._stream_started = False
            if not tokens and not self._stream_started:
                raise InvalidArgumentError("the prompt is empty; give some text or token ids to start from")
        return self._generate_tokens(turn, tokens, options, max_tokens, stop, ignore_eos)

    def _generate_tokens(
        self,
        turn: int,
        prompt_tokens: list[int],
        options: "_core.SamplingParams",
        max_tokens: int | None,
        stop: Sequence[str] | None,
        ignore_eos: bool,
        on_text: list[str] | None = None,
    ) -> Iterator[str]:
        # Every engine call runs inside a step (under the lock, only while this is the newest generator); the lock
        # is never held across a yield.
        with self._step(turn) as engine:
            sampler = _core.Sampler(self._model, options)
            # Repetition penalties and DRY look back over the stream, prompt included (as llama.cpp's samplers do).
            look_back = _history_length(options)
            if look_back != 0:
                context = engine.cached_tokens() + list(prompt_tokens)
                for token in context if look_back < 0 else context[-look_back:]:
                    sampler.accept(token)
            if prompt_tokens:
                engine.feed(prompt_tokens)
            self._stream_started = True
        assembler = TextAssembler(stop)
        produced = 0
        while max_tokens is None or produced < max_tokens:
            with self._step(turn) as engine:
                token = engine.sample(sampler)
                produced += 1
                if self._model.is_end_of_generation(token) and not ignore_eos:
                    break
                engine.feed([token])
                data = self._model.token_bytes(token)
            piece = assembler.push(data)
            if piece:
                if on_text is not None:
                    on_text.append(piece)
                yield piece
            if assembler.stopped:
                break
        tail = assembler.flush()
        if tail:
            if on_text is not None:
                on_text.append(tail)
            yield tail

    # ---- chat ------------------------------------------------------------------------------------------------

    def chat(
        self,
        messages: str | Message | Sequence[Message],
        max_tokens: int | None = 512,
        **sampling: object,
    ) -> Iterator[str]:
        """Streams the assistant's reply to new message(s), continuing the conversation kept in the cache.

        ``messages`` is the user's text, one ``{"role", "content"}`` dict, or several (a system message may
        open the conversation). The reply is appended to ``self.messages`` when the generator finishes or is
        closed. The conversation is rendered with the model's chat template; only the new part is decoded,
        and the cache streams (old turns are evicted under the policy, the system prompt stays with
        ``pin_system_prompt=True``). Sampling keywords are those of :meth:`generate`. Starting a turn supersedes
        this object's older generators; an unfinished reply of the previous turn is kept as far as it got.
        Unless given, the sampling settings of ``CHAT_SAMPLING`` apply (a repetition penalty chosen by measurement;
        generate() has none).
        """
        self._live_engine()
        new_messages = self._normalise_messages(messages)
        if max_tokens is not None:
            _check_int("max_tokens", max_tokens, 0)
        options, stop, ignore_eos = self._sampling_from_kwargs({**CHAT_SAMPLING, **sampling})
        with self._lock:
            self._live_engine()
            turn = self._new_turn()  # may record the previous turn's partial reply: read the conversation after
            conversation = self.messages + new_messages
            rendered = self._render(conversation, add_assistant=True)
        return self._chat_turn(turn, conversation, rendered, options, max_tokens, stop, ignore_eos)

    def _chat_turn(
        self,
        turn: int,
        conversation: list[dict[str, str]],
        rendered: str,
        options: "_core.SamplingParams",
        max_tokens: int | None,
        stop: Sequence[str] | None,
        ignore_eos: bool,
    ) -> Iterator[str]:
        with self._step(turn) as engine:
            first_turn = not self._chat_fed_text
            if first_turn:
                engine.reset()
            # Only the part of the rendering that is not in the cache yet is decoded.
            start = common_prefix_length(self._chat_fed_text, rendered)
            add_bos = first_turn and bool(self._model.info["add_bos"])
            delta_tokens = self._model.tokenize(rendered[start:], add_bos, True)

            if first_turn and self.pin_system_prompt and conversation[0]["role"] == "system":
                system_text = self._render(conversation[:1], add_assistant=False)
                system_tokens = self._model.tokenize(system_text, add_bos, True)
                n_pin = common_prefix_length(system_tokens, delta_tokens)
                if n_pin >= engine.capacity:
                    raise InvalidArgumentError(
                        f"the system prompt is {n_pin} tokens but the cache holds {engine.capacity}; raise window "
                        "or shorten the system prompt, or set pin_system_prompt=False"
                    )
                engine.feed(delta_tokens[:n_pin])
                engine.pin_prefix(n_pin)
                delta_tokens = delta_tokens[n_pin:]
                self._stream_started = True

            reply: list[str] = []
            seen_before = engine.stats()["tokens_seen"]

            def commit() -> None:
                # The partial reply is what the cache holds. If nothing reached the cache (e.g. CacheFullError), the
                # conversation is unchanged and the same message can be sent again after reset().
                if self._engine is engine and engine.stats()["tokens_seen"] > seen_before:
                    text = "".join(reply)
                    self.messages = conversation + [{"role": "assistant", "content": text}]
                    self._chat_fed_text = rendered + text

            self._commit_partial = commit
        try:
            yield from self._generate_tokens(turn, delta_tokens, options, max_tokens, stop, ignore_eos, reply)
        finally:
            # Also runs when the caller closes the generator early (or presses Ctrl-C). A newer turn that superseded
            # this one has already recorded it (or reset()/close() dropped it).
            with self._lock:
                if self._commit_partial is commit:
                    self._commit_partial = None
                    commit()

    def _render(self, conversation: Sequence[Message], add_assistant: bool) -> str:
        pairs = [(m["role"], m["content"]) for m in conversation]
        data = self._model.apply_chat_template(pairs, add_assistant, self.chat_template)
        return data.decode("utf-8", errors="replace")

    @staticmethod
    def _normalise_messages(messages: str | Message | Sequence[Message]) -> list[dict[str, str]]:
        if isinstance(messages, str):
            return [{"role": "user", "content": _check_text("message", messages)}]
        if isinstance(messages, Mapping):
            messages = [messages]
        if not isinstance(messages, (list, tuple)):
            raise InvalidArgumentError(
                "messages must be the user's text, a {'role': ..., 'content': ...} dict or a list of them "
                f"(got {type(messages).__name__})"
            )
        out = []
        for m in messages:
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidArgumentError(
                    f"each message must be a dict with string 'role' and 'content' (got {m!r})"
                )
            out.append({"role": _check_text("message role", m["role"]),
                        "content": _check_text("message content", m["content"])})
        if not out:
            raise InvalidArgumentError("no messages given")
        return out

    def _sampling_from_kwargs(self, kwargs: dict) -> tuple["_core.SamplingParams", Sequence[str] | None, bool]:
        stop = _check_stop(kwargs.pop("stop", None))
        ignore_eos = bool(kwargs.pop("ignore_eos", False))
        if kwargs.get("seed") is None:
            kwargs["seed"] = self.seed
        known = set(SamplingOptions.__dataclass_fields__)
        unknown = set(kwargs) - known
        if unknown:
            raise InvalidArgumentError(
                f"unknown sampling option(s) {sorted(unknown)}; valid: {sorted(known | {'stop', 'ignore_eos'})}"
            )
        return SamplingOptions(**kwargs).to_core(), stop, ignore_eos

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.stats.cells_used}/{self.capacity} cells"
        return (
            f"StreamingLLM({os.path.basename(self.model_path)!r}, policy={self.policy!r}, "
            f"n_sink={self.n_sink}, window={self.window}, {state})"
        )
