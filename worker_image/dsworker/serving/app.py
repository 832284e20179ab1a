"""Rank 0's OpenAI-compatible HTTP API (FastAPI), a thin shell over the engine loop.

Handlers only validate, tokenize, submit and stream; all scheduling is in the engine thread.
Every client mistake is answered as OpenAI's error JSON (4xx), never as a FastAPI default shape.
"""

from __future__ import annotations

from fastapi import Depends, FastAPI

from dsworker.serving.auth import require_api_key
from dsworker.serving.errors import install_error_handlers
from dsworker.serving.routers import chat, completions, health, models
from dsworker.serving.state import ServerState


def create_app(state: ServerState) -> FastAPI:
    """The ASGI app; tests drive it with a fake engine, `dsworker serve` with the real one."""
    app = FastAPI(title="dsworker", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    install_error_handlers(app, state.metrics)
    app.include_router(health.router)  # open: probes and scrapers have no key
    for family in (models, completions, chat):
        app.include_router(family.router, dependencies=[Depends(require_api_key)])
    return app
