"""The FastAPI application: ``uvicorn app.main:app``."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from app import errors
from app.config import Settings, get_settings
from app.middleware import RequestContext, request_id_var
from app.routes import health, inference
from app.service import InferenceService

log = logging.getLogger(__name__)


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def configure_torch(threads: int | None) -> int:
    n = threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # already set in this process
        torch.set_num_interop_threads(1)
    return n


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    service = InferenceService(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_level)
        threads = configure_torch(settings.torch_threads)
        log.info("loading %s with %d torch threads", settings.weights_dir, threads)
        await run_in_threadpool(service.load, settings.weights_dir)
        try:
            yield
        finally:
            service.close()

    app = FastAPI(
        title="voice-embed",
        version="0.1.0",
        summary="Speaker embeddings (256-d) and 9-class voice classification from uploaded audio",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.service = service
    errors.install(app)
    app.include_router(health.router)
    app.include_router(inference.router)
    app.add_middleware(RequestContext, max_body_bytes=settings.max_body_bytes)
    return app


app = create_app()
