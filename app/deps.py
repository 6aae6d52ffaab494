"""Typed dependencies injected into the routes.

They are ``async def`` because they only look something up: FastAPI runs a plain ``def``
dependency on its thread pool, a thread hand-off per dependency per request (py-spy on a
saturated /embed with inference stubbed out: 9 % of the samples holding the GIL were those
hand-offs)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.config import Settings
from app.service import InferenceService


async def get_service(request: Request) -> InferenceService:
    service: InferenceService = request.app.state.service
    return service


async def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


ServiceDep = Annotated[InferenceService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
