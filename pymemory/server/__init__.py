"""`pymemory serve`: an OpenAI-compatible HTTP server whose conversations never overflow.

How a request flows (one module per step):

* ``schema``     — validates the OpenAI request JSON, builds the response and stream-chunk objects;
* ``app``        — FastAPI routes and API-key check; renders the chat, asks for a slot, runs the turn in a
  worker thread and streams its pieces back (server-sent events), watching for client disconnects;
* ``slots``      — N engines on one loaded model, one request per slot; routes a conversation back to the slot
  that holds it; bounded queue (429/503 with Retry-After);
* ``generation`` — in the worker: restore/save sessions, prefill only what the cache does not hold yet (the
  system prompt pinned on a fresh slot), generate with cancellation between tokens;
* ``sessions``   — idle conversations on disk (``--sessions-dir``), resumed after a restart;
* ``errors``     — OpenAI-format errors.

FastAPI and uvicorn are an optional extra: ``pip install "pymemory[server]"``.
"""
from __future__ import annotations

__all__ = ["ServerConfig", "create_app"]


def __getattr__(name: str):
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
