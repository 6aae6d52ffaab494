"""The FastAPI application: ``uvicorn app.main:app`` (or ``python -m app``)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from app import errors, memory
from app.config import Settings, get_settings
from app.metrics import Metrics
from app.middleware import ApiKeyAuth, RequestContext, request_id_var
from app.routes import diarize, health, inference, speakers
from app.service import InferenceService

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"


class JsonFormatter(logging.Formatter):
    """One JSON object per line, carrying the request id."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "request_id": request_id_var.get(),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    for name in ("", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler] if name == "" else []
        logger.propagate = name != ""
    logging.getLogger("uvicorn.access").disabled = True  # RequestContext logs each request once
    logging.getLogger().setLevel(level.upper())


def torch_threads_from_cgroup() -> int | None:
    """The container's CPU quota (cgroup v2 ``cpu.max``), rounded up, if one is set."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, -(-int(quota) // int(period)))


def configure_torch(threads: int | None, bound_memory: bool = False) -> int:
    if bound_memory:
        memory.bound_growth()
    memory.default_primitive_cache()
    n = threads or torch_threads_from_cgroup() or os.cpu_count() or 1
    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # already set in this process
        torch.set_num_interop_threads(1)
    return n


def on_sigterm_report_not_ready(service: InferenceService) -> None:
    """Chain onto the server's SIGTERM handler: readiness goes to 503 first, then the server
    stops accepting connections and waits for in-flight requests."""
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        return

    def handler(sig: int, frame: FrameType | None) -> None:
        service.stop_accepting()
        previous(sig, frame)

    with contextlib.suppress(ValueError):  # not the main thread (e.g. in-process test servers)
        signal.signal(signal.SIGTERM, handler)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = Metrics()
    service = InferenceService(settings, metrics)
    speaker_service = speakers.SpeakerService(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_level)
        threads = configure_torch(settings.torch_threads, settings.bound_memory)
        log.info("loading %s with %d torch threads", settings.weights_dir, threads)
        await run_in_threadpool(service.load, settings.weights_dir)
        with contextlib.suppress(errors.ApiError):  # logged; the speaker endpoints retry on use
            await run_in_threadpool(speaker_service.store)  # open and migrate before traffic
        on_sigterm_report_not_ready(service)
        try:
            yield
        finally:
            service.stop_accepting()
            service.close()
            speaker_service.close()
            log.info("stopped")

    app = FastAPI(
        title="voice-embed",
        version="0.1.0",
        summary="Speaker embeddings (256-d) and 9-class voice classification from uploaded audio",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.service = service
    app.state.speakers = speaker_service
    errors.install(app)
    app.include_router(health.router)
    app.include_router(inference.router)
    app.include_router(speakers.router)
    app.include_router(diarize.router)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        """The try-it page: record or choose a clip, classify, compare, enrol, identify."""
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(ApiKeyAuth, keys=settings.api_key_list)
    app.add_middleware(RequestContext, max_body_bytes=settings.max_body_bytes, metrics=metrics)
    return app


app = create_app()
