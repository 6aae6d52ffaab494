"""POST /embed, /classify, /verify and their batch forms."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import APIRouter, Query, Request

from app.deps import ServiceDep, SettingsDep
from app.errors import ApiError, bad_request
from app.schemas import (
    BatchResponse,
    ClassifyResponse,
    EmbedResponse,
    ErrorResponse,
    SpectrogramResponse,
    VerifyResponse,
)
from app.service import ClipResult, InferenceService
from app.uploads import Intake, Upload, media_type, read_audio, read_form_files
from model.weights import AS_NORM_BOUND

log = logging.getLogger(__name__)
T = TypeVar("T")
router = APIRouter(tags=["inference"])

BINARY = {"type": "string", "format": "binary"}
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "malformed request",
        413: "body or audio duration too large",
        415: "unsupported or undecodable media",
        422: "invalid parameters, or too-short or silent audio, or audio with no speech",
        503: "not ready",
    }.items()
}


def audio_body(fields: list[str], many: bool = False) -> dict[str, Any]:
    """OpenAPI for bodies read by hand: multipart file parts, or the raw audio bytes."""
    part = {"type": "array", "items": BINARY} if many else BINARY
    content: dict[str, Any] = {
        "multipart/form-data": {
            "schema": {"type": "object", "properties": dict.fromkeys(fields, part), "required": fields}
        }
    }
    if fields == ["file"]:
        content["audio/*"] = {"schema": BINARY}
        content["application/octet-stream"] = {"schema": BINARY}
    return {"requestBody": {"required": True, "content": content}}


Normalize = Annotated[bool, Query(description="return the L2-normalised embedding")]
TopK = Annotated[int, Query(ge=1, le=1000, description="how many best classes to list")]
IncludeEmbedding = Annotated[bool, Query(description="add the embedding to the answer")]


def l2_normalize(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def processing(service: InferenceService, clip: ClipResult) -> dict[str, Any]:
    return {
        "windows": clip.windows,
        "window_s": service.settings.window_s,
        "input_sample_rate": clip.sample_rate,
        "input_channels": clip.channels,
    }


def embed_result(service: InferenceService, clip: ClipResult, normalize: bool) -> dict[str, Any]:
    vector = l2_normalize(clip.embedding) if normalize else clip.embedding
    return {
        "embedding": vector.tolist(),
        "dim": int(vector.shape[0]),
        "normalized": normalize,
        "duration_s": round(clip.duration_s, 4),
        "speech_seconds": round(clip.speech_s, 3),
        "processing": processing(service, clip),
        "model": service.model_ref(),
    }


def classify_result(service: InferenceService, clip: ClipResult, top_k: int, include_embedding: bool) -> dict[str, Any]:
    labels = service.labels
    probs = clip.probabilities
    order = np.argsort(-probs, kind="stable")[: min(top_k, len(labels))]
    best = int(order[0])
    return {
        "label": labels[best],
        "index": best,
        "score": float(probs[best]),
        "probabilities": {label: float(p) for label, p in zip(labels, probs, strict=True)},
        "top_k": [{"label": labels[i], "index": int(i), "score": float(probs[i])} for i in order],
        "duration_s": round(clip.duration_s, 4),
        "speech_seconds": round(clip.speech_s, 3),
        "processing": processing(service, clip),
        "known": clip.known,
        "known_score": clip.known_score,
        "known_threshold": None if clip.known is None else service.known_threshold,
        "embedding": clip.embedding.tolist() if include_embedding else None,
        "model": service.model_ref(),
    }


def content_length(request: Request) -> str | None:
    return request.headers.get("content-length")


async def single(
    request: Request, service: InferenceService, max_files: int, multipart_only: bool = False
) -> ClipResult:
    """One clip: a 'file' part or (unless ``multipart_only``) the raw body, admitted, decoded, inferred."""
    return await one_clip(request, service, max_files, service.analyse, multipart_only, has_batch=True)


async def one_clip(
    request: Request,
    service: InferenceService,
    max_files: int,
    work: Callable[[Upload, Intake], Awaitable[T]],
    multipart_only: bool = False,
    max_seconds: float | None = None,
    has_batch: bool = False,
) -> T:
    """One clip (of at most ``max_seconds``, default MAX_DURATION_S), admitted and handed to
    ``work`` (decode and infer, decode and draw, or diarize). More than one file is a 400 that
    points to the endpoint's ``/batch`` twin where it ``has_batch``."""
    service.require_model()
    async with service.intake(content_length(request), 1, max_seconds) as intake:
        if multipart_only:
            require_multipart(request, "a 'file' part")
            uploads = (await read_form_files(request, intake, ["file"], max_files))["file"]
            if len(uploads) != 1:
                raise ApiError(422, "invalid_parameters", f"send exactly one 'file' part (got {len(uploads)})")
        else:
            uploads = await read_audio(request, intake, max_files)
            if len(uploads) > 1:
                hint = f"use {request.url.path}/batch" if has_batch else "send one file a request"
                raise bad_request(f"{len(uploads)} files sent to a single-clip endpoint; {hint}")
        intake.expect(1)
        async with service.admitted(1):
            return await work(uploads[0], intake)


async def batch(service: InferenceService, intake: Intake, uploads: list[Upload]) -> list[ClipResult | ApiError]:
    intake.expect(len(uploads))

    async def one(upload: Upload) -> ClipResult | ApiError:
        try:
            return await service.analyse(upload, intake)
        except ApiError as exc:
            return exc

    async with service.admitted(len(uploads)):
        return list(await asyncio.gather(*(one(u) for u in uploads)))


def batch_response(
    service: InferenceService,
    uploads: list[Upload],
    results: list[ClipResult | ApiError],
    format_one: Callable[[ClipResult], dict[str, Any]],
) -> dict[str, Any]:
    items = []
    for i, (upload, res) in enumerate(zip(uploads, results, strict=True)):
        item: dict[str, Any] = {"index": i, "filename": upload.filename}
        if isinstance(res, ApiError):
            item["error"] = {"code": res.code, "message": res.message}
        else:
            item["result"] = format_one(res)
        items.append(item)
    return {"results": items, "model": service.model_ref()}


@router.post(
    "/embed",
    response_model=EmbedResponse,
    summary="the 256-d voice embedding of one clip",
    openapi_extra=audio_body(["file"]),
    responses=ERRORS,
)
async def embed(request: Request, service: ServiceDep, settings: SettingsDep, normalize: Normalize = False) -> Any:
    clip = await single(request, service, settings.max_files)
    return embed_result(service, clip, normalize)


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    response_model_exclude_none=True,
    summary="the class probabilities of one clip (and optionally its embedding, from the same pass)",
    openapi_extra=audio_body(["file"]),
    responses=ERRORS,
)
async def classify(
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    top_k: TopK = 3,
    include_embedding: IncludeEmbedding = False,
) -> Any:
    clip = await single(request, service, settings.max_files)
    return classify_result(service, clip, top_k, include_embedding)


@router.post(
    "/embed/batch",
    response_model=BatchResponse,
    summary="embeddings of several clips (repeated 'file' parts); a bad file gets its own error entry",
    openapi_extra=audio_body(["file"], many=True),
    responses=ERRORS,
)
async def embed_batch(
    request: Request, service: ServiceDep, settings: SettingsDep, normalize: Normalize = False
) -> Any:
    return await run_batch(request, service, settings.max_files, lambda c: embed_result(service, c, normalize))


@router.post(
    "/classify/batch",
    response_model=BatchResponse,
    summary="classes of several clips (repeated 'file' parts); a bad file gets its own error entry",
    openapi_extra=audio_body(["file"], many=True),
    responses=ERRORS,
)
async def classify_batch(
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    top_k: TopK = 3,
    include_embedding: IncludeEmbedding = False,
) -> Any:
    def format_one(clip: ClipResult) -> dict[str, Any]:
        result = classify_result(service, clip, top_k, include_embedding)
        return {k: v for k, v in result.items() if v is not None}

    return await run_batch(request, service, settings.max_files, format_one)


def require_multipart(request: Request, what: str) -> None:
    if media_type(request) != "multipart/form-data":
        raise ApiError(415, "unsupported_media", f"this endpoint takes multipart/form-data with {what}")


async def run_batch(
    request: Request, service: InferenceService, max_files: int, format_one: Callable[[ClipResult], dict[str, Any]]
) -> dict[str, Any]:
    """Read repeated 'file' parts, analyse them together, answer in upload order."""
    service.require_model()
    async with service.intake(content_length(request), max_files) as intake:
        require_multipart(request, "repeated 'file' parts")
        uploads = (await read_form_files(request, intake, ["file"], max_files))["file"]
        if not uploads:
            raise bad_request("multipart body has no 'file' parts")
        return batch_response(service, uploads, await batch(service, intake, uploads), format_one)


async def analyse_named(service: InferenceService, intake: Intake, name: str, upload: Upload) -> ClipResult:
    try:
        return await service.analyse(upload, intake)
    except ApiError as exc:
        raise ApiError(exc.status, exc.code, f"{name}: {exc.message}", exc.headers) from None


@router.post(
    "/verify",
    response_model=VerifyResponse,
    summary="are clips 'a' and 'b' the same voice? their verification score against a threshold",
    openapi_extra=audio_body(["a", "b"]),
    responses=ERRORS,
)
async def verify(
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    threshold: Annotated[
        float | None,
        Query(
            ge=-AS_NORM_BOUND,
            le=AS_NORM_BOUND,
            description="threshold on the scale of 'score' (GET /v1/model's verification_score: a cosine, or an "
            "adaptive s-norm score); default: the calibrated one",
        ),
    ] = None,
) -> Any:
    service.require_model()
    async with service.intake(content_length(request), 2) as intake:
        require_multipart(request, "file parts 'a' and 'b'")
        found = await read_form_files(request, intake, ["a", "b"], 2)
        for name in ("a", "b"):
            if len(found[name]) != 1:
                raise bad_request(f"send exactly one file part named {name!r} (got {len(found[name])})")
        chosen = threshold if threshold is not None else service.threshold
        if chosen is None:
            raise ApiError(422, "invalid_parameters", "these weights have no calibrated threshold; pass ?threshold=")
        if service.score_kind == "cosine" and not -1.0 <= chosen <= 1.0:
            raise ApiError(
                422, "invalid_parameters", f"threshold {chosen} is not a cosine, and these weights score by cosine"
            )
        intake.expect(2)
        async with service.admitted(2):
            a, b = await asyncio.gather(*(analyse_named(service, intake, n, found[n][0]) for n in ("a", "b")))
    scores, cosines = service.verification_scores(a.embedding, b.embedding.reshape(1, -1))
    score = float(scores[0])
    return {
        "score": score,
        "cosine": float(cosines[0]),
        "score_kind": service.score_kind,
        "same_speaker": score >= chosen,
        "threshold": chosen,
        "duration_s": {"a": round(a.duration_s, 4), "b": round(b.duration_s, 4)},
        "speech_seconds": {"a": round(a.speech_s, 3), "b": round(b.speech_s, 3)},
        "model": service.model_ref(),
    }


@router.post(
    "/spectrogram",
    response_model=SpectrogramResponse,
    summary="the log-mel spectrogram the network sees (the clip's first window), for display",
    openapi_extra=audio_body(["file"]),
    responses=ERRORS,
)
async def spectrogram(request: Request, service: ServiceDep, settings: SettingsDep) -> Any:
    spec = await one_clip(request, service, settings.max_files, service.spectrogram)
    n_mels, frames = spec.values.shape
    return {
        "n_mels": n_mels,
        "frames": frames,
        "hop_s": spec.hop_s,
        "seconds": round(frames * spec.hop_s, 4),
        "duration_s": round(spec.duration_s, 4),
        "low": spec.low,
        "high": spec.high,
        "values": base64.b64encode(spec.values.tobytes()).decode(),
    }
