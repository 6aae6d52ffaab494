"""Liveness, readiness and model description."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.deps import ServiceDep
from app.errors import error_body
from app.schemas import ErrorResponse, Health, ModelInfo

router = APIRouter(tags=["health"])


# GET or HEAD: some load balancers' health checks send HEAD
@router.api_route("/healthz", methods=["GET", "HEAD"], response_model=Health, summary="the process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.api_route(
    "/readyz",
    methods=["GET", "HEAD"],
    response_model=Health,
    summary="the model is loaded and warmed",
    responses={503: {"model": ErrorResponse}},
)
async def readyz(service: ServiceDep) -> Any:
    if not service.ready:
        return JSONResponse(error_body("not_ready", "not ready"), status_code=503, headers={"Retry-After": "1"})
    return {"status": "ready"}


@router.get("/v1/model", response_model=ModelInfo, summary="architecture, labels, features, hash, threshold")
async def model_info(service: ServiceDep) -> dict[str, Any]:
    return service.model_info()
