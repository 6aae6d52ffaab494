"""POST /diarize: who spoke when in one recording, optionally named from the enrolled speakers."""

from __future__ import annotations

import logging
from pathlib import PurePath
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from app.deps import ServiceDep, SettingsDep
from app.errors import ApiError
from app.routes.inference import audio_body, one_clip
from app.routes.speakers import SPEAKER_ERRORS, SpeakersDep, require_threshold, search
from app.schemas import DiarizeResponse
from app.uploads import Intake, Upload
from model.diarize import MAX_SPEAKERS, Diarization, keep_names_on_matching_turns, name_speakers, rttm

log = logging.getLogger(__name__)
router = APIRouter(tags=["diarization"])

Count = Annotated[int | None, Query(ge=1, le=MAX_SPEAKERS)]


def check_hints(num: int | None, lo: int | None, hi: int | None) -> tuple[int, int | None]:
    """The bounds a diarization may use; contradictory hints are a 422."""
    low = lo if lo is not None else 1
    if hi is not None and low > hi:
        raise ApiError(422, "invalid_parameters", f"min_speakers ({low}) is more than max_speakers ({hi})")
    if num is not None and (num < low or (hi is not None and num > hi)):
        raise ApiError(422, "invalid_parameters", f"num_speakers ({num}) is outside min_speakers..max_speakers")
    return low, hi


def label(k: int) -> str:
    return f"S{k + 1}"


@router.post(
    "/diarize",
    response_model=DiarizeResponse,
    summary="who spoke when: speaker turns of one recording, optionally named from the enrolled speakers",
    openapi_extra=audio_body(["file"]),
    responses={
        **SPEAKER_ERRORS,
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "JSON, or RTTM"},
    },
)
async def diarize(
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    speakers: SpeakersDep,
    num_speakers: Count = None,
    min_speakers: Count = None,
    max_speakers: Count = None,
    identify: Annotated[
        bool,
        Query(
            description="name each speaker from the enrolled profiles; a named speaker's turns that do not "
            "match the profile themselves become a speaker of their own, unnamed (within the count hints)"
        ),
    ] = False,
    format: Annotated[Literal["json", "rttm"], Query(description="json, or NIST RTTM as text")] = "json",
) -> Any:
    low, high = check_hints(num_speakers, min_speakers, max_speakers)
    service.require_model()
    threshold = verify = None
    if identify:
        verify = require_threshold(service)
        threshold = service.identify_threshold

    async def work(upload: Upload, intake: Intake) -> tuple[str, Diarization]:
        return upload.filename or "", await service.diarize(upload, intake, num_speakers, low, high)

    max_s = settings.diarize_max_duration_s
    filename, found = await one_clip(request, service, settings.max_files, work, max_seconds=max_s)
    names = [label(k) for k in range(found.speakers)]
    matches: list[dict[str, Any] | None] = [None] * found.speakers
    if identify and found.speakers:
        assert threshold is not None and verify is not None
        best, index = await search(request, service, settings, speakers, list(found.embeddings), top_k=found.speakers)
        chosen = name_speakers([[(m["id"], m["score"]) for m in ms] for ms in best], threshold)
        row_of = {pid: index.ids.index(pid) for pid in chosen if pid is not None}  # each named profile's row

        def against(pid: str, rows: np.ndarray) -> np.ndarray:
            return service.verification_scores(index.matrix[row_of[pid]], rows)[0]

        found, chosen = await run_in_threadpool(
            keep_names_on_matching_turns, found, chosen, against, verify, num_speakers or high
        )
        names = [label(k) for k in range(found.speakers)]
        matches = [None] * found.speakers
        for k, pid in enumerate(chosen):
            if pid is not None:  # this speaker's score against that profile, on the turns that keep its name
                row = row_of[pid]
                score = float(service.verification_scores(index.matrix[row], found.embeddings[k : k + 1])[0][0])
                matches[k] = {"id": pid, "name": index.names[row], "score": score}
    if format == "rttm":  # a named speaker's turns under its enrolled name, as the client writes them
        file_id = request.headers.get("x-filename") or PurePath(filename).stem or "audio"
        shown = [m["name"] if m is not None else names[k] for k, m in enumerate(matches)]
        return PlainTextResponse(rttm(found.turns, shown, file_id), media_type="text/plain; charset=utf-8")
    return {
        "duration": round(found.duration_s, 3),
        "speakers": [
            {"label": names[k], "speech_seconds": round(found.speech_s[k], 3), "match": matches[k]}
            for k in range(found.speakers)
        ],
        "segments": [
            {"start": round(t.start, 3), "end": round(t.end, 3), "speaker": names[t.speaker]} for t in found.turns
        ],
        "identify_threshold": threshold,
        "model": service.model_ref(),
    }
