"""The FastAPI application: routes, authentication, and the hand-off between the event loop and the workers.

Data flow of a completion request: parse and validate the JSON (schema.py) → render the conversation with the
model's chat template → ask the SlotManager for a slot (slots.py; queued, or refused with 429/503) → run the turn
in a worker thread (generation.py), which streams text pieces back through an asyncio queue → answer as one JSON
object or as server-sent events. The event loop never runs model code. A client that disconnects sets the
turn's cancel flag; the worker stops within one step and frees the slot.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .._loader import _core
from ..errors import CacheFullError, InvalidArgumentError, PymemoryError
from .errors import APIError, bad_request, not_found, server_error, unauthorized
from .generation import Turn, TurnResult, run_turn
from .memory_view import memory_view
from .schema import (TurnRequest, chunk_object, completion_object, memory_field, new_id, now, parse_json,
                     parse_turn, usage, usage_chunk)
from .sessions import SessionStore
from .slots import Assignment, RouteKey, Slot, SlotManager

log = logging.getLogger("pymemory.server")
STATIC = Path(__file__).parent / "static"


@dataclass
class ServerConfig:
    model: str | None = None          # GGUF path or asset name (None: the default model)
    model_alias: str | None = None    # the id clients use (default: the GGUF file's stem)
    policy: str = "sink"
    n_sink: int = 4
    window: int = 1020
    evict_chunk: int | None = None
    reindex: bool | None = None
    h2o_recent: int | None = None
    namm_path: str | None = None
    namm_mode: str | None = None
    quorum: float | None = None
    max_cells: int | None = None
    namm_delay: int | None = None
    namm_layers: int | None = None
    namm_defer_evictions: bool = True
    namm_neighbours: int | None = None
    namm_key_weight: float | None = None
    namm_merge_threshold: float | None = None
    parallel: int = 1
    max_queue: int = 16
    queue_timeout: float = 60.0
    api_key: str | None = None
    sessions_dir: str | None = None
    save_every_turn: bool = False     # with sessions_dir: also write each live conversation after every turn
    default_max_tokens: int = 1024
    pin_system_prompt: bool = True
    chat_template: str | None = None
    n_threads: int | None = None
    n_gpu_layers: int = 0
    verbose: bool = False


class ServerState:
    """The loaded model, the slots and their manager, the session store and the worker threads."""

    def __init__(self, config: ServerConfig):
        from ..assets import resolve_model
        from ..streaming import POLICIES

        if config.policy not in POLICIES:
            raise InvalidArgumentError(f"unknown policy {config.policy!r}; choose one of {', '.join(POLICIES)}")
        if config.save_every_turn and not config.sessions_dir:
            raise InvalidArgumentError("--save-every-turn needs --sessions-dir (where the sessions are written)")
        if config.parallel < 1 or config.max_queue < 0:
            raise InvalidArgumentError("--parallel must be >= 1 and --max-queue >= 0")
        self.config = config
        _core.set_log_verbosity(2 if config.verbose else 0)
        self.model_path = os.fspath(resolve_model(config.model))
        self.model = _core.Model.load(self.model_path, n_gpu_layers=config.n_gpu_layers)
        self.model_id = config.model_alias or Path(self.model_path).stem
        self.model_names = {self.model_id, Path(self.model_path).name}
        if config.model:
            self.model_names.add(config.model)
        engine_args = dict(policy=config.policy, n_sink=config.n_sink, window=config.window,
                           evict_chunk=config.evict_chunk, reindex=config.reindex, n_threads=config.n_threads or 0)
        if config.h2o_recent is not None:
            engine_args["h2o_recent"] = config.h2o_recent
        engine_args["namm_defer_evictions"] = config.namm_defer_evictions
        for name in ("namm_path", "namm_mode", "quorum", "max_cells", "namm_delay", "namm_layers", "namm_neighbours",
                     "namm_key_weight", "namm_merge_threshold"):
            if getattr(config, name) is not None:
                engine_args[name] = getattr(config, name)
        if config.namm_path is not None:  # a shipped NAMM's name (--namm-path smollm2) or a GGUF path
            from ..namm.packaged import resolve_namm

            engine_args["namm_path"] = resolve_namm(config.namm_path)
        slots = [Slot(i, _core.Engine(self.model, **engine_args)) for i in range(config.parallel)]
        self.capacity = slots[0].engine.capacity
        self.store = None
        if config.sessions_dir:
            settings = {"model": self.model.info["description"], "policy": config.policy, "n_sink": config.n_sink,
                        "window": config.window, "chat_template": config.chat_template or ""}
            self.store = SessionStore(config.sessions_dir, settings)
            n = self.store.scan()
            log.info("sessions: %d resumable in %s", n, config.sessions_dir)
        self.manager = SlotManager(slots, self.store, config.max_queue, config.queue_timeout)
        self.executor = ThreadPoolExecutor(max_workers=config.parallel + 1, thread_name_prefix="pymemory-slot")
        self.started = time.time()

    def render_chat(self, messages: list[dict[str, str]]) -> tuple[str, str | None]:
        template = self.config.chat_template or ""
        pairs = [(m["role"], m["content"]) for m in messages]
        try:
            rendered = self.model.apply_chat_template(pairs, True, template).decode("utf-8", errors="replace")
            system = None
            if messages[0]["role"] == "system":
                system = self.model.apply_chat_template(pairs[:1], False, template).decode("utf-8", "replace")
        except (ValueError, RuntimeError) as exc:
            raise bad_request(f"the model's chat template cannot render these messages: {exc}", "messages")
        return rendered, system

    def shutdown(self) -> None:
        """Saves every slot's conversation (so a restarted server resumes them), then stops the workers."""
        if self.store is not None:
            for slot in self.manager.slots:
                if slot.session_id and slot.fed_text and not slot.busy:
                    stored = self.store.stage(slot.session_id, slot.explicit, slot.kind, slot.fed_text,
                                              slot.messages)
                    self.store.save(stored, slot.engine)
        self.executor.shutdown(wait=True, cancel_futures=True)


def create_app(config: ServerConfig, state: ServerState | None = None):
    state = state or ServerState(config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.get_running_loop().run_in_executor(None, state.shutdown)

    app = FastAPI(title="pymemory", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pymemory = state

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        log.info("%s %s %d | %s", request.method, request.url.path, exc.status, exc.message)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else None
        message = (f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405)
                   else str(exc.detail))
        return JSONResponse(APIError(exc.status_code, message, code=code).body(), status_code=exc.status_code)

    def check_key(request: Request) -> None:
        """--api-key: every /v1 and /pymemory route wants 'Authorization: Bearer <key>' (/health and / do not)."""
        if not config.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise unauthorized("missing API key: send 'Authorization: Bearer <key>' (the server was started with "
                               "--api-key)")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise unauthorized("incorrect API key provided")

    # ---- info routes -----------------------------------------------------------------------------------------

    def model_card() -> dict:
        info = state.model.info
        return {"id": state.model_id, "object": "model", "created": int(state.started), "owned_by": "pymemory",
                "pymemory": {"description": info["description"], "policy": config.policy,
                             "capacity": state.capacity, "n_sink": config.n_sink, "window": config.window,
                             "parallel": config.parallel, "pin_system_prompt": config.pin_system_prompt,
                             "sessions_dir": config.sessions_dir, "save_every_turn": config.save_every_turn}}

    @app.get("/health")
    async def health():
        m = state.manager
        return {"status": "ok", "model": state.model_id, "slots": len(m.slots), "slots_busy": m.busy_slots,
                "queued": m.queued}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        check_key(request)
        if model_id not in state.model_names:
            raise not_found(f"the model {model_id!r} does not exist; this server serves {state.model_id!r}", "model")
        return model_card()

    @app.get("/pymemory/slots")
    async def slots(request: Request):
        check_key(request)
        out = []
        for slot in state.manager.slots:
            stats = slot.engine.stats() if not slot.busy else None
            out.append({"slot": slot.index, "busy": slot.busy, "session_id": slot.session_id, "turns": slot.turns,
                        "stats": stats})
        return {"slots": out, "queued": state.manager.queued,
                "sessions_on_disk": len(state.store.index) if state.store else 0}

    @app.get("/pymemory/sessions/{session_id}/memory")
    async def session_memory(session_id: str, request: Request):
        """Per message of a live chat session: how much of it is still in the cache (the chat page's view)."""
        check_key(request)
        slot = next((s for s in state.manager.slots if s.session_id == session_id), None)
        if slot is None:
            raise not_found(f"session {session_id!r} is not in a slot (it may be on disk or unknown)", "session_id",
                            code="session_not_found")
        if slot.busy:
            raise APIError(409, f"session {session_id!r} is generating; ask again when it is done",
                           code="session_busy")
        if slot.kind != "chat":
            raise bad_request(f"session {session_id!r} is not a chat", "session_id")
        view = memory_view(state.model, slot.engine, slot.fed_text, slot.messages, config.chat_template or "")
        return {"session_id": session_id, "slot": slot.index, **view}

    @app.get("/")
    async def index():
        page = STATIC / "index.html"
        if not page.is_file():
            raise APIError(404, "the chat page is not installed", code="not_found")
        return FileResponse(page, media_type="text/html")

    # ---- completions -----------------------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        req = parse_turn(parse_json(await request.body()), "chat", request.headers.get("x-session-id"))
        return await serve(request, req)

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_key(request)
        req = parse_turn(parse_json(await request.body()), "completion", request.headers.get("x-session-id"))
        return await serve(request, req)

    async def serve(request: Request, req: TurnRequest):
        t_start = time.perf_counter()
        if req.model not in state.model_names:
            raise not_found(f"the model {req.model!r} does not exist; this server serves {state.model_id!r}",
                            "model")
        if req.kind == "chat":
            rendered, system = state.render_chat(req.messages)
        else:
            rendered, system = req.prompt, None
        max_tokens = config.default_max_tokens if req.max_tokens is None else req.max_tokens
        if max_tokens < 1:
            raise bad_request(f"'max_tokens' must be at least 1 (got {max_tokens})", "max_tokens")
        seed = secrets.randbits(32) if req.seed is None else req.seed % 2**32
        try:
            sampling = _core.SamplingParams(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                                            min_p=req.min_p, repeat_penalty=req.repeat_penalty, seed=seed)
        except ValueError as exc:
            raise bad_request(f"invalid sampling settings: {exc}")
        turn = Turn(req.kind, rendered, system, req.messages, max_tokens, sampling, req.stop, req.ignore_eos)
        assignment = await state.manager.acquire(RouteKey(req.kind, rendered, req.session_id))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        def work() -> TurnResult:
            try:
                return run_turn(state.model, state.store, assignment, turn,
                                lambda piece: loop.call_soon_threadsafe(queue.put_nowait, piece),
                                config.pin_system_prompt)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, done)
                if config.save_every_turn:
                    # After the reply has gone out, still holding the slot: a crash loses at most the turn in flight.
                    state.executor.submit(persist_then_release, assignment.slot)
                else:
                    loop.call_soon_threadsafe(state.manager.release, assignment.slot)

        def persist_then_release(slot) -> None:
            try:
                if slot.session_id and slot.fed_text:
                    state.store.write_live(slot.session_id, slot.explicit, slot.kind, slot.fed_text, slot.messages,
                                           slot.engine)
            finally:
                loop.call_soon_threadsafe(state.manager.release, slot)

        future = loop.run_in_executor(state.executor, work)
        rid, created = new_id(req.kind), now()
        headers = {"X-Session-Id": assignment.session_id}

        def finish(result: TurnResult, status: int) -> dict:
            memory = memory_field(result.stats, {
                "slot": assignment.slot.index, "session_id": assignment.session_id, "policy": config.policy,
                "prefilled_tokens": result.prefilled, "reused_cache": result.reused,
                "rewound_tokens": result.rewound,
                "restored_from_disk": result.restored, "queue_seconds": round(assignment.waited, 3),
                "prefill_seconds": round(result.prefill_seconds, 3),
                "generate_seconds": round(result.generate_seconds, 3), "warning": result.warning})
            log_status(request, status, assignment, result, time.perf_counter() - t_start)
            return memory

        if not req.stream:
            result = await wait_watching(request, future, turn)
            if result is None:  # the client went away
                log.info("%s %s 499 | slot %d session %s: client disconnected, generation stopped", request.method,
                         request.url.path, assignment.slot.index, assignment.session_id)
                return Response(status_code=499)
            memory = finish(result, 200)
            body = completion_object(req, rid, created, result.text, result.finish_reason,
                                     usage(result.prompt_tokens, result.completion_tokens,
                                           result.prompt_tokens - result.prefilled), memory)
            return JSONResponse(body, headers=headers)

        # Streaming: wait for the first piece (or the end) so that errors of the prefill keep their status.
        first = await wait_watching(request, loop.create_task(queue.get()), turn)
        if first is None:
            log.info("%s %s 499 | slot %d session %s: client disconnected during the prefill", request.method,
                     request.url.path, assignment.slot.index, assignment.session_id)
            return Response(status_code=499)
        if first is done:
            await result_of(future)  # raises the worker's error, if any

        async def events():
            try:
                yield sse(chunk_object(req, rid, created, None, None, first=True))
                item = first
                while item is not done:
                    yield sse(chunk_object(req, rid, created, item, None))
                    item = await queue.get()
                result = await result_of(future)
                memory = finish(result, 200)
                yield sse(chunk_object(req, rid, created, None if req.kind == "chat" else "", result.finish_reason,
                                       memory=memory))
                if req.include_usage:
                    yield sse(usage_chunk(req, rid, created, usage(result.prompt_tokens, result.completion_tokens,
                                                                   result.prompt_tokens - result.prefilled), memory))
            except APIError as exc:
                yield sse(exc.body())
            finally:
                if not future.done():
                    log.info("%s %s 499 | slot %d session %s: client disconnected mid-stream, generation stopped",
                             request.method, request.url.path, assignment.slot.index, assignment.session_id)
                turn.cancel.set()  # no-op after a normal end; stops the worker if the client went away
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def sse(obj: dict) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


async def result_of(future) -> TurnResult:
    """The worker's result, with its exceptions mapped to OpenAI errors."""
    try:
        return await future
    except APIError:
        raise
    except CacheFullError as exc:
        raise bad_request(str(exc), code="context_length_exceeded") from None
    except InvalidArgumentError as exc:
        raise bad_request(str(exc)) from None
    except PymemoryError as exc:
        log.exception("generation failed")
        raise server_error(f"generation failed: {exc}") from None


async def wait_watching(request, awaitable, turn: Turn, poll: float = 0.25):
    """Awaits a worker future (or a queue read) while watching for the client to disconnect; on disconnect,
    cancels the turn (the worker stops within one step) and returns None."""
    task = asyncio.ensure_future(awaitable)
    while True:
        done, _ = await asyncio.wait({task}, timeout=poll)
        if done:
            return await result_of(task)
        if await request.is_disconnected():
            turn.cancel.set()
            return None


def log_status(request, status: int, a: Assignment, r: TurnResult, seconds: float) -> None:
    s = r.stats
    rate = r.completion_tokens / r.generate_seconds if r.generate_seconds > 0 else 0.0
    how = "restored" if r.restored else "continued" if r.reused else "fresh"
    log.info("%s %s %d | slot %d session %s (%s) | prompt %d tok, prefilled %d | reply %d tok %.1f tok/s %s | "
             "cache %d/%d cells (peak %d), pinned %d, evicted %d in %d steps | queue %.2f s total %.2f s",
             request.method, request.url.path, status, a.slot.index, a.session_id, how, r.prompt_tokens,
             r.prefilled, r.completion_tokens, rate, r.finish_reason, s.get("cells_used", 0),
             s.get("capacity", 0), s.get("peak_cells", 0), s.get("n_pinned", 0), s.get("tokens_evicted", 0),
             s.get("evictions", 0), a.waited, seconds)
