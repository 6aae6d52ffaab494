"""Enrolled speakers: /speakers (enrol, add clips, list, read, rename, delete, verify) and /identify."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
import unicodedata
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import APIRouter, Body, Depends, Path, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from app.config import Settings
from app.deps import ServiceDep, SettingsDep
from app.errors import ApiError
from app.routes.inference import BINARY, ERRORS, content_length, require_multipart, single
from app.schemas import ErrorResponse, IdentifyResponse, SpeakerList, SpeakerOut, SpeakerPatch, SpeakerVerifyResponse
from app.service import ClipResult, InferenceService
from app.speakers import Index, Model, Profile, SpeakerStore, migrate, open_database
from app.uploads import Intake, Upload, media_type, read_form

log = logging.getLogger(__name__)
router = APIRouter(tags=["speakers"])
T = TypeVar("T")

SPEAKER_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    404: {"model": ErrorResponse, "description": "no such speaker in this namespace"},
    409: {"model": ErrorResponse, "description": "the profile was made with other weights"},
    503: {"model": ErrorResponse, "description": "not ready, or the speaker store is unavailable"},
}
IncludeEmbedding = Annotated[bool, Query(description="add the profile's voiceprint (normalised) to the answer")]
SpeakerId = Annotated[str, Path(min_length=1, max_length=64, description="the id /speakers returned")]


class SpeakerService:
    """Opens the store on first use (and again after a failure), so the inference endpoints work
    while the database is down and the speaker endpoints recover when it is back."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._store: SpeakerStore | None = None
        self._lock = threading.Lock()
        self._failed_at = -float("inf")

    RETRY_S = 5.0  # after a failed open, answer 503 at once for this long instead of waiting again

    def store(self) -> SpeakerStore:
        with self._lock:
            if self._store is None:
                if time.monotonic() - self._failed_at < self.RETRY_S:
                    raise unavailable()
                try:
                    s = self.settings
                    db = open_database(s.database_url or None, s.data_dir, s.database_connect_timeout_s)
                    migrate(db)
                except Exception as exc:  # StoreUnavailableError, OSError, the driver's own errors
                    self._failed_at = time.monotonic()
                    log.error("speaker store unavailable: %s", exc)
                    raise unavailable() from None
                self._store = SpeakerStore(db)
            return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


def unavailable() -> ApiError:
    return ApiError(503, "store_unavailable", "the speaker store is unavailable; retry", {"Retry-After": "1"})


async def get_speakers(request: Request) -> SpeakerService:  # async: no thread hand-off (app.deps)
    speakers: SpeakerService = request.app.state.speakers
    return speakers


SpeakersDep = Annotated[SpeakerService, Depends(get_speakers)]


def namespace_of(request: Request, settings: Settings) -> str:
    """Each API key has its own speakers (the key itself is never stored, only a hash of it)."""
    if not settings.api_key_list:
        return "default"
    token = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    return "key-" + hashlib.sha256(token.encode()).hexdigest()[:32]


async def in_store(speakers: SpeakerService, call: Callable[[SpeakerStore], T]) -> T:
    """Run a blocking store call on a worker thread; a database failure is a 503, not a 500."""

    def run() -> T:
        store = speakers.store()
        try:
            return call(store)
        except (KeyError, ValueError, ApiError):
            raise
        except Exception as exc:  # the database's own errors (connection lost, disk full, ...)
            log.error("speaker store error: %s", exc)
            raise unavailable() from None

    return await run_in_threadpool(run)


def current_model(service: InferenceService) -> Model:
    ref = service.model_ref()
    return Model(ref["name"], ref["version"], ref["sha256"])


def speaker_out(profile: Profile, service: InferenceService, include_embedding: bool) -> dict[str, Any]:
    return {
        "id": profile.id,
        "name": profile.name,
        "metadata": profile.metadata,
        "clips": profile.clips,
        "seconds": round(profile.seconds, 4),
        "speech_seconds": None if profile.speech_seconds is None else round(profile.speech_seconds, 3),
        "enough_speech": (
            None if profile.speech_seconds is None else profile.speech_seconds >= service.settings.min_enrol_speech_s
        ),
        "created_at": profile.created_at,
        "updated_at": profile.updated_at,
        "model": {"name": profile.model_name, "version": profile.model_version, "sha256": profile.model_sha256},
        "stale": profile.model_sha256 != service.model_ref()["sha256"],
        "embedding": profile.voiceprint.tolist() if include_embedding else None,
    }


def parse_name(value: str | None) -> str:
    name = (value or "").strip()
    if not 1 <= len(name) <= 200:
        raise ApiError(422, "invalid_parameters", "name must be 1 to 200 characters")
    # control characters (NUL, line breaks) and lone surrogates: PostgreSQL keeps no NUL in text,
    # neither database can encode a lone surrogate, and a line break would split an RTTM line
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in name):
        raise ApiError(422, "invalid_parameters", "name must not contain control characters")
    return name


MAX_METADATA_DEPTH = 32  # objects and arrays inside each other; deeper metadata could be stored but not answered
# a profile's metadata as JSON text: a page of GET /speakers (up to 1000 profiles) stays within 16 MB
MAX_METADATA_BYTES = 16 * 1024


def _storable(value: Any, depth: int = 0) -> bool:
    """Whether every string of a JSON value (keys too) can be kept: no NUL character (PostgreSQL's
    jsonb has none) and no lone surrogate (no UTF-8 encodes one); and whether it nests at most
    ``MAX_METADATA_DEPTH`` deep (the JSON encoder of the answers stops far short of Python's parser)."""
    if isinstance(value, str):
        return "\x00" not in value and not any(unicodedata.category(ch) == "Cs" for ch in value)
    if isinstance(value, dict | list) and depth >= MAX_METADATA_DEPTH:
        return False
    if isinstance(value, dict):
        return all(_storable(k) and _storable(v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return all(_storable(v, depth + 1) for v in value)
    return True


def check_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    if not _storable(metadata):
        raise ApiError(
            422,
            "invalid_parameters",
            f"metadata must nest at most {MAX_METADATA_DEPTH} deep and hold no NUL character or lone surrogate",
        )
    if len(json.dumps(metadata, ensure_ascii=False).encode()) > MAX_METADATA_BYTES:
        raise ApiError(422, "invalid_parameters", f"metadata must be at most {MAX_METADATA_BYTES} bytes as JSON")
    return metadata


def parse_metadata(value: str | None) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ApiError(422, "invalid_parameters", f"metadata is not valid JSON ({exc.msg})") from None
    except RecursionError:  # nested deeper than Python's parser goes
        raise ApiError(422, "invalid_parameters", f"metadata must nest at most {MAX_METADATA_DEPTH} deep") from None
    if not isinstance(parsed, dict):
        raise ApiError(422, "invalid_parameters", "metadata must be a JSON object")
    return check_metadata(parsed)


async def embed_clips(
    service: InferenceService, intake: Intake, uploads: list[Upload]
) -> tuple[list[np.ndarray], float, float]:
    """Every clip's embedding, the clips' seconds and their seconds of speech, or the first
    failing clip's error with its index; all or nothing."""
    if not uploads:
        raise ApiError(422, "invalid_parameters", "send one or more 'file' parts (the enrolment clips)")
    intake.expect(len(uploads))
    async with service.admitted(len(uploads)):
        results = await asyncio.gather(*(service.analyse(u, intake) for u in uploads), return_exceptions=True)
    for i, res in enumerate(results):
        if isinstance(res, ApiError):
            raise ApiError(res.status, res.code, f"file {i}: {res.message}", res.headers)
        if isinstance(res, BaseException):
            raise res
    clips = [r for r in results if isinstance(r, ClipResult)]
    return [c.embedding for c in clips], sum(c.duration_s for c in clips), sum(c.speech_s for c in clips)


def audio_form(*fields: tuple[str, dict[str, Any]], required: list[str]) -> dict[str, Any]:
    schema = {"type": "object", "properties": dict(fields), "required": required}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


FILES = {"type": "array", "items": BINARY, "description": "enrolment clips"}


@router.post(
    "/speakers",
    status_code=201,
    response_model=SpeakerOut,
    response_model_exclude_none=True,
    summary="enrol a speaker from one or more clips (only their embeddings are kept)",
    openapi_extra=audio_form(
        ("name", {"type": "string", "minLength": 1, "maxLength": 200}),
        ("metadata", {"type": "string", "description": "a JSON object, as text"}),
        ("file", FILES),
        required=["name", "file"],
    ),
    responses=SPEAKER_ERRORS,
)
async def enrol(
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    speakers: SpeakersDep,
    include_embedding: IncludeEmbedding = False,
) -> Any:
    service.require_model()
    async with service.intake(content_length(request), settings.max_files) as intake:
        if media_type(request) != "application/x-www-form-urlencoded":  # a form without files: 422 below
            require_multipart(request, "'name', optional 'metadata' and 'file' parts")
        files, texts = await read_form(request, intake, ["file"], ["name", "metadata"], settings.max_files)
        name, metadata = parse_name(texts.get("name")), parse_metadata(texts.get("metadata"))
        vectors, seconds, speech = await embed_clips(service, intake, files["file"])
    namespace, model = namespace_of(request, settings), current_model(service)
    profile = await in_store(speakers, lambda s: s.create(namespace, name, metadata, vectors, seconds, model, speech))
    log.info("enrolled speaker %s from %d clips", profile.id, profile.clips)
    return speaker_out(profile, service, include_embedding)


@router.post(
    "/speakers/{speaker_id}/clips",
    response_model=SpeakerOut,
    response_model_exclude_none=True,
    summary="add clips to a speaker's profile",
    openapi_extra=audio_form(("file", FILES), required=["file"]),
    responses=SPEAKER_ERRORS,
)
async def add_clips(
    request: Request,
    speaker_id: SpeakerId,
    service: ServiceDep,
    settings: SettingsDep,
    speakers: SpeakersDep,
    include_embedding: IncludeEmbedding = False,
) -> Any:
    service.require_model()
    namespace, model = namespace_of(request, settings), current_model(service)
    await profile_or_404(speakers, namespace, speaker_id)
    async with service.intake(content_length(request), settings.max_files) as intake:
        require_multipart(request, "'file' parts")
        files, _ = await read_form(request, intake, ["file"], [], settings.max_files)
        vectors, seconds, speech = await embed_clips(service, intake, files["file"])
    try:
        profile = await in_store(
            speakers, lambda s: s.add_clips(namespace, speaker_id, vectors, seconds, model, speech)
        )
    except KeyError:
        raise not_found(speaker_id) from None
    except ValueError:
        raise stale(speaker_id) from None
    return speaker_out(profile, service, include_embedding)


async def profile_or_404(speakers: SpeakerService, namespace: str, speaker_id: str) -> Profile:
    profile = await in_store(speakers, lambda s: s.get(namespace, speaker_id))
    if profile is None:
        raise not_found(speaker_id)
    return profile


def not_found(speaker_id: str) -> ApiError:
    return ApiError(404, "not_found", f"no speaker {speaker_id!r} here")


def stale(speaker_id: str) -> ApiError:
    return ApiError(
        409, "stale_profile", f"speaker {speaker_id!r} was enrolled with other weights; enrol the voice again"
    )


@router.get("/speakers", response_model=SpeakerList, response_model_exclude_none=True, summary="list speakers")
async def list_speakers(
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    speakers: SpeakersDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=512, description="next_cursor of the previous page")] = None,
    include_embedding: IncludeEmbedding = False,
) -> Any:
    service.require_model()
    namespace = namespace_of(request, settings)
    try:
        profiles, next_cursor = await in_store(speakers, lambda s: s.page(namespace, limit, cursor))
    except ValueError as exc:
        raise ApiError(422, "invalid_parameters", str(exc)) from None
    return {"speakers": [speaker_out(p, service, include_embedding) for p in profiles], "next_cursor": next_cursor}


@router.get(
    "/speakers/{speaker_id}", response_model=SpeakerOut, response_model_exclude_none=True, responses=SPEAKER_ERRORS
)
async def get_speaker(
    request: Request,
    speaker_id: SpeakerId,
    service: ServiceDep,
    settings: SettingsDep,
    speakers: SpeakersDep,
    include_embedding: IncludeEmbedding = False,
) -> Any:
    service.require_model()
    namespace = namespace_of(request, settings)
    profile = await profile_or_404(speakers, namespace, speaker_id)
    return speaker_out(profile, service, include_embedding)


@router.patch(
    "/speakers/{speaker_id}",
    response_model=SpeakerOut,
    response_model_exclude_none=True,
    summary="rename a speaker or replace its metadata",
    responses=SPEAKER_ERRORS,
)
async def patch_speaker(
    request: Request,
    speaker_id: SpeakerId,
    patch: Annotated[SpeakerPatch, Body()],
    service: ServiceDep,
    settings: SettingsDep,
    speakers: SpeakersDep,
) -> Any:
    service.require_model()
    namespace = namespace_of(request, settings)
    name = None if patch.name is None else parse_name(patch.name)
    metadata = None if patch.metadata is None else check_metadata(patch.metadata)
    profile = await in_store(speakers, lambda s: s.update(namespace, speaker_id, name, metadata))
    if profile is None:
        raise not_found(speaker_id)
    return speaker_out(profile, service, False)


@router.delete(
    "/speakers/{speaker_id}",
    status_code=204,
    summary="delete a speaker (removed from the store, not hidden)",
    responses=SPEAKER_ERRORS,
)
async def delete_speaker(
    request: Request, speaker_id: SpeakerId, settings: SettingsDep, speakers: SpeakersDep
) -> Response:
    namespace = namespace_of(request, settings)
    if not await in_store(speakers, lambda s: s.delete(namespace, speaker_id)):
        raise not_found(speaker_id)
    return Response(status_code=204)


@router.post(
    "/speakers/{speaker_id}/verify",
    response_model=SpeakerVerifyResponse,
    summary="is this clip the enrolled speaker? its verification score against the calibrated threshold",
    openapi_extra=audio_form(("file", BINARY), required=["file"]),
    responses=SPEAKER_ERRORS,
)
async def verify_speaker(
    request: Request, speaker_id: SpeakerId, service: ServiceDep, settings: SettingsDep, speakers: SpeakersDep
) -> Any:
    service.require_model()
    namespace = namespace_of(request, settings)
    profile = await profile_or_404(speakers, namespace, speaker_id)
    if profile.model_sha256 != service.model_ref()["sha256"]:
        raise stale(speaker_id)
    threshold = require_threshold(service)
    clip = await single(request, service, settings.max_files, multipart_only=True)
    scores, cosines = service.verification_scores(clip.embedding, profile.voiceprint.reshape(1, -1))
    score = float(scores[0])
    return {
        "speaker": {"id": profile.id, "name": profile.name},
        "score": score,
        "cosine": float(cosines[0]),
        "score_kind": service.score_kind,
        "same_speaker": score >= threshold,
        "threshold": threshold,
        "model": service.model_ref(),
    }


def require_threshold(service: InferenceService) -> float:
    if service.threshold is None:
        raise ApiError(422, "invalid_parameters", "these weights have no calibrated verification threshold")
    return service.threshold


async def search(
    request: Request,
    service: InferenceService,
    settings: Settings,
    speakers: SpeakerService,
    queries: list[np.ndarray],
    top_k: int,
) -> tuple[list[list[dict[str, Any]]], Index]:
    """The ``top_k`` best enrolled profiles of this namespace for each query embedding, best first,
    by verification score (exact search), and the index searched."""
    namespace, sha = namespace_of(request, settings), service.model_ref()["sha256"]
    started = time.perf_counter()
    key = service.scoring_key()

    def load(store: SpeakerStore) -> tuple[Index, np.ndarray | None]:
        index = store.index(namespace, sha)
        return index, index.statistics_for(key, service.norm_statistics)  # made once, in the worker thread

    index, statistics = await in_store(speakers, load)
    found: list[list[dict[str, Any]]] = []
    for query in queries:
        matches: list[dict[str, Any]] = []
        if index.ids:
            scores, cosines = service.verification_scores(query, index.matrix, statistics, unit=True)
            k = min(top_k, len(scores))
            best = np.argpartition(-scores, k - 1)[:k]
            best = best[np.argsort(-scores[best], kind="stable")]
            matches = [
                {"id": index.ids[i], "name": index.names[i], "score": float(scores[i]), "cosine": float(cosines[i])}
                for i in best
            ]
        found.append(matches)
    service.metrics.stage.labels(stage="search").observe(time.perf_counter() - started)
    return found, index


@router.post(
    "/identify",
    response_model=IdentifyResponse,
    summary="which enrolled speaker is this, if any? exact search over this namespace's profiles by verification score",
    openapi_extra=audio_form(("file", BINARY), required=["file"]),
    responses=SPEAKER_ERRORS,
)
async def identify(
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    speakers: SpeakersDep,
    top_k: Annotated[int, Query(ge=1, le=100, description="how many best matches to list")] = 5,
) -> Any:
    service.require_model()
    require_threshold(service)
    threshold = service.identify_threshold
    assert threshold is not None  # at least the verification threshold, which require_threshold checked
    clip = await single(request, service, settings.max_files, multipart_only=True)
    (matches,), index = await search(request, service, settings, speakers, [clip.embedding], top_k)
    found = matches[0] if matches and matches[0]["score"] >= threshold else None
    return {
        "matches": matches,
        "speaker": found,
        "threshold": threshold,
        "score_kind": service.score_kind,
        "searched": len(index.ids),
        "skipped_stale": index.stale,
        "model": service.model_ref(),
    }
