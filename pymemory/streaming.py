"""The friendly API: :class:`StreamingLLM` streams text at bounded memory.

Layers (each usable on its own):

* ``pymemory._core`` — raw bindings: ``Model``, ``Engine`` (one token stream through a bounded cache),
  ``Sampler``. Each call is one GIL-free C++ step.
* :class:`StreamingLLM` — owns a model and an engine, turns token bytes into text, runs chat turns.

Python drives the generation loop, so closing a generator (or Ctrl-C) stops the work between two tokens.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Iterator, Mapping, Sequence, Union

from ._loader import _core
from .errors import ClosedError, InvalidArgumentError
from .text import TextAssembler, common_prefix_length

POLICIES = ("sink", "context_shift", "window", "recompute", "none", "h2o", "namm")
NAMM_MODES = ("quorum", "budget")

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

    def to_core(self) -> "_core.SamplingParams":
        if self.seed < 0 or self.seed > 0xFFFFFFFF:
            raise InvalidArgumentError(f"seed must be in [0, 2**32) (got {self.seed})")
        return _core.SamplingParams(**asdict(self))


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"{name} must be an integer (got {value!r})")
    if value < minimum:
        raise InvalidArgumentError(f"{name} must be >= {minimum} (got {value})")
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
            "namm" (Sakana AI's learned memory: a NAMM GGUF scores every cached token every 512 tokens).
            The attention-scored ones (h2o, namm) turn flash attention off to read attention probabilities.
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
        reindex: compact positions after evictions (default: True for sink-style policies, as in the paper;
            False for h2o and namm, which keep absolute positions like their originals — set True to stream
            forever with them).
        h2o_recent: h2o's always-kept recent tokens (default window // 2).
        namm_path: the NAMM GGUF for policy "namm" (``pymemory convert-namm``).
        namm_mode: "quorum" (evict a token when at least ``quorum`` of the (layer, head) pairs drop it; 1.0 =
            all of them, so nothing any head keeps is removed) or "budget" (hold the cache at ``max_cells``).
        quorum, max_cells, namm_delay: see namm_mode; namm_delay overrides the invocation period (512).
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
        namm_mode: str = "quorum",
        quorum: float = 1.0,
        max_cells: int | None = None,
        namm_delay: int | None = None,
        verbose: bool = False,
    ) -> None:
        self._engine = None  # set last: close() and __del__ must work if __init__ fails half-way
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
        if namm_mode not in NAMM_MODES:
            raise InvalidArgumentError(f"namm_mode must be one of {NAMM_MODES} (got {namm_mode!r})")
        if not (0.0 < quorum <= 1.0):
            raise InvalidArgumentError(f"quorum must be in (0, 1] (got {quorum})")
        if policy == "namm" and namm_path is None:
            raise InvalidArgumentError(
                "policy 'namm' needs namm_path=<a NAMM GGUF>; convert a trained checkpoint with "
                "`pymemory convert-namm ckpt.pt -o namm.gguf --trust-pickle`"
            )
        if namm_path is not None and not os.path.isfile(namm_path):
            from .errors import ModelNotFoundError

            raise ModelNotFoundError(f"NAMM file not found: {os.fspath(namm_path)!r}")

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
            namm_mode=namm_mode,
            quorum=quorum,
            max_cells=0 if max_cells is None else _check_int("max_cells", max_cells, 1),
            namm_delay=0 if namm_delay is None else _check_int("namm_delay", namm_delay, 16),
        )
        self.messages: list[dict[str, str]] = []  # the running conversation of chat()
        self._chat_fed_text = ""  # rendered conversation text that has gone into the cache
        self._stream_started = False

    # ---- lifecycle -------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Frees the model and the cache. Further use raises ClosedError. Safe to call twice."""
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
        """Empties the cache and forgets the conversation (the model stays loaded)."""
        self._live_engine().reset()
        self.messages = []
        self._chat_fed_text = ""
        self._stream_started = False

    # ---- introspection ---------------------------------------------------------------------------------------

    @property
    def stats(self) -> CacheStats:
        """Cache occupancy and stream counters right now."""
        return CacheStats(**self._live_engine().stats())

    @property
    def model_info(self) -> dict:
        """Architecture, layer/head counts, vocabulary size, chat template of the loaded model."""
        self._live_engine()
        return dict(self._model.info)

    @property
    def policy_stats(self) -> dict:
        """Attention-scored policies (h2o, namm): per-invocation cache sizes per layer and overall, like the
        original NAMM's mem_stats, plus forced evictions. Empty for the other policies."""
        stats = self._live_engine().policy_stats()
        records = stats["invocations"]
        if records:
            n_layers = len(records[0]["layer_kept"])
            stats["mem_stats"] = {
                "overall/mean_cells_after": sum(r["cells_after"] for r in records) / len(records),
                **{
                    f"layer_id_{layer}/mean_kept": sum(r["layer_kept"][layer] for r in records) / len(records)
                    for layer in range(n_layers)
                },
            }
        return stats

    @property
    def capacity(self) -> int:
        return self._live_engine().capacity

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        self._live_engine()
        if not isinstance(text, str):
            raise InvalidArgumentError(f"text must be a str (got {type(text).__name__})")
        return self._model.tokenize(text, add_bos, special)

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        self._live_engine()
        return self._model.detokenize(list(tokens), special).decode("utf-8", errors="replace")

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
    ) -> Iterator[str]:
        """Streams the continuation of ``prompt`` as text pieces, as they are produced.

        ``prompt`` is text (BOS added if the model wants one) or a list of token ids. ``max_tokens=None``
        generates until an end-of-generation token or a stop string; with ``ignore_eos`` it never stops on its
        own, and the cache stays bounded however long it runs. By default the stream starts afresh; with
        ``continue_stream=True`` the prompt continues the current stream. Close the generator to stop early.
        """
        engine = self._live_engine()
        options = SamplingOptions(
            temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, frequency_penalty,
            presence_penalty, self.seed if seed is None else seed,
        ).to_core()  # validates now, not at the first next()
        if max_tokens is not None:
            _check_int("max_tokens", max_tokens, 0)
        if isinstance(prompt, str):
            tokens = self._model.tokenize(prompt, not (continue_stream and self._stream_started), False)
        else:
            tokens = [int(t) for t in prompt]
        if not continue_stream:
            engine.reset()
            self.messages, self._chat_fed_text = [], ""
        if not tokens and not self._stream_started:
            raise InvalidArgumentError("the prompt is empty; give some text or token ids to start from")
        return self._generate_tokens(engine, tokens, options, max_tokens, stop, ignore_eos)

    def _generate_tokens(
        self,
        engine: "_core.Engine",
        prompt_tokens: list[int],
        options: "_core.SamplingParams",
        max_tokens: int | None,
        stop: Sequence[str] | None,
        ignore_eos: bool,
        on_text: list[str] | None = None,
    ) -> Iterator[str]:
        sampler = _core.Sampler(self._model, options)
        # The repetition penalty looks back over the stream, prompt included (as llama.cpp's samplers do).
        if options.repeat_last_n != 0:
            context = engine.cached_tokens() + list(prompt_tokens)
            for token in context if options.repeat_last_n < 0 else context[-options.repeat_last_n:]:
                sampler.accept(token)
        assembler = TextAssembler(stop)
        if prompt_tokens:
            engine.feed(prompt_tokens)
        self._stream_started = True
        produced = 0
        while max_tokens is None or produced < max_tokens:
            token = engine.sample(sampler)
            produced += 1
            if self._model.is_end_of_generation(token) and not ignore_eos:
                break
            engine.feed([token])
            piece = assembler.push(self._model.token_bytes(token))
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
        ``pin_system_prompt=True``). Sampling keywords are those of :meth:`generate`.
        """
        engine = self._live_engine()
        new_messages = self._normalise_messages(messages)
        if max_tokens is not None:
            _check_int("max_tokens", max_tokens, 0)
        options, stop, ignore_eos = self._sampling_from_kwargs(dict(sampling))
        conversation = self.messages + new_messages
        rendered = self._render(conversation, add_assistant=True)
        return self._chat_turn(engine, conversation, rendered, options, max_tokens, stop, ignore_eos)

    def _chat_turn(
        self,
        engine: "_core.Engine",
        conversation: list[dict[str, str]],
        rendered: str,
        options: "_core.SamplingParams",
        max_tokens: int | None,
        stop: Sequence[str] | None,
        ignore_eos: bool,
    ) -> Iterator[str]:
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
            if n_pin >= self.capacity:
                raise InvalidArgumentError(
                    f"the system prompt is {n_pin} tokens but the cache holds {self.capacity}; raise window "
                    "or shorten the system prompt, or set pin_system_prompt=False"
                )
            engine.feed(delta_tokens[:n_pin])
            engine.pin_prefix(n_pin)
            delta_tokens = delta_tokens[n_pin:]
            self._stream_started = True

        reply: list[str] = []
        seen_before = engine.stats()["tokens_seen"]
        try:
            yield from self._generate_tokens(engine, delta_tokens, options, max_tokens, stop, ignore_eos, reply)
        finally:
            # Also runs when the caller closes the generator early (or presses Ctrl-C): the partial reply is what
            # the cache holds. If nothing reached the cache (e.g. CacheFullError), the conversation is unchanged
            # and the same message can be sent again after reset().
            if self._engine is not None and engine.stats()["tokens_seen"] > seen_before:
                text = "".join(reply)
                self.messages = conversation + [{"role": "assistant", "content": text}]
                self._chat_fed_text = rendered + text

    def _render(self, conversation: Sequence[Message], add_assistant: bool) -> str:
        pairs = [(m["role"], m["content"]) for m in conversation]
        data = self._model.apply_chat_template(pairs, add_assistant, self.chat_template)
        return data.decode("utf-8", errors="replace")

    @staticmethod
    def _normalise_messages(messages: str | Message | Sequence[Message]) -> list[dict[str, str]]:
        if isinstance(messages, str):
            return [{"role": "user", "content": messages}]
        if isinstance(messages, Mapping):
            messages = [messages]
        out = []
        for m in messages:
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidArgumentError(
                    f"each message must be a dict with string 'role' and 'content' (got {m!r})"
                )
            out.append({"role": m["role"], "content": m["content"]})
        if not out:
            raise InvalidArgumentError("no messages given")
        return out

    def _sampling_from_kwargs(self, kwargs: dict) -> tuple["_core.SamplingParams", Sequence[str] | None, bool]:
        stop = kwargs.pop("stop", None)
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
