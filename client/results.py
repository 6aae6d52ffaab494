"""Typed answers of the service, built from its JSON (the shapes /openapi.json publishes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class ServiceError(Exception):
    """An error answer of the service (``{"error": {"code", "message"}}``) or a transport failure.

    ``status`` is the HTTP status (0 for a connection that failed, and for one file's error inside
    a batch answer), ``code`` the service's error
    code, ``retry_after`` the seconds the service asked to wait (503 under load), if any."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}" if status else f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str
    sha256: str

    @classmethod
    def of(cls, d: dict[str, Any]) -> ModelRef:
        return cls(d["name"], d["version"], d["sha256"])


@dataclass(frozen=True)
class Embedding:
    vector: list[float]
    dim: int
    normalized: bool
    duration_s: float
    model: ModelRef
    speech_seconds: float | None = None  # seconds of speech in the clip (servers before it: absent)

    @classmethod
    def of(cls, d: dict[str, Any]) -> Embedding:
        return cls(
            d["embedding"], d["dim"], d["normalized"], d["duration_s"], ModelRef.of(d["model"]), d.get("speech_seconds")
        )


@dataclass(frozen=True)
class LabelScore:
    label: str
    index: int
    score: float


@dataclass(frozen=True)
class Classification:
    label: str
    index: int
    score: float
    probabilities: dict[str, float]
    top_k: list[LabelScore]
    known: bool | None
    known_score: float | None
    known_threshold: float | None
    duration_s: float
    embedding: list[float] | None
    model: ModelRef
    speech_seconds: float | None = None  # seconds of speech in the clip (servers before it: absent)

    @classmethod
    def of(cls, d: dict[str, Any]) -> Classification:
        return cls(
            d["label"],
            d["index"],
            d["score"],
            d["probabilities"],
            [LabelScore(t["label"], t["index"], t["score"]) for t in d["top_k"]],
            d.get("known"),
            d.get("known_score"),
            d.get("known_threshold"),
            d["duration_s"],
            d.get("embedding"),
            ModelRef.of(d["model"]),
            d.get("speech_seconds"),
        )


@dataclass(frozen=True)
class Verification:
    score: float
    same_speaker: bool
    threshold: float
    duration_s: dict[str, float]
    model: ModelRef
    cosine: float | None = None  # the plain cosine (servers before adaptive s-norm: absent)
    score_kind: str = "cosine"  # what score and threshold are: "cosine" or "as-norm"

    @classmethod
    def of(cls, d: dict[str, Any]) -> Verification:
        return cls(
            d["score"],
            d["same_speaker"],
            d["threshold"],
            d["duration_s"],
            ModelRef.of(d["model"]),
            d.get("cosine", d["score"] if d.get("score_kind", "cosine") == "cosine" else None),
            d.get("score_kind", "cosine"),
        )


@dataclass(frozen=True)
class BatchItem:
    """One file of a batch: its ``result`` or its ``error`` (the others in the batch are unaffected)."""

    index: int
    filename: str | None
    result: Embedding | Classification | None
    error: ServiceError | None


@dataclass(frozen=True)
class Speaker:
    id: str
    name: str
    metadata: dict[str, Any]
    clips: int
    seconds: float
    created_at: str
    updated_at: str
    stale: bool
    model: ModelRef
    embedding: list[float] | None
    speech_seconds: float | None = None  # None: not measured (older profiles and servers)
    enough_speech: bool | None = None  # whether speech_seconds reaches the server's MIN_ENROL_SPEECH_S

    @classmethod
    def of(cls, d: dict[str, Any]) -> Speaker:
        return cls(
            d["id"],
            d["name"],
            d["metadata"],
            d["clips"],
            d["seconds"],
            d["created_at"],
            d["updated_at"],
            d["stale"],
            ModelRef.of(d["model"]),
            d.get("embedding"),
            d.get("speech_seconds"),
            d.get("enough_speech"),
        )


@dataclass(frozen=True)
class Match:
    id: str
    name: str
    score: float


@dataclass(frozen=True)
class SpeakerVerification:
    speaker: Match
    same_speaker: bool
    threshold: float

    @classmethod
    def of(cls, d: dict[str, Any]) -> SpeakerVerification:
        return cls(Match(d["speaker"]["id"], d["speaker"]["name"], d["score"]), d["same_speaker"], d["threshold"])


@dataclass(frozen=True)
class Identification:
    matches: list[Match]
    speaker: Match | None  # the best match at or above the threshold, else None
    threshold: float
    searched: int
    skipped_stale: int

    @classmethod
    def of(cls, d: dict[str, Any]) -> Identification:
        best = d.get("speaker")
        return cls(
            [Match(m["id"], m["name"], m["score"]) for m in d["matches"]],
            None if best is None else Match(best["id"], best["name"], best["score"]),
            d["threshold"],
            d["searched"],
            d["skipped_stale"],
        )


@dataclass(frozen=True)
class DiarizedSpeaker:
    label: str
    speech_seconds: float
    match: Match | None  # with identify=True, the enrolled profile this voice is


@dataclass(frozen=True)
class Turn:
    start: float
    end: float
    speaker: str


@dataclass(frozen=True)
class Diarization:
    duration: float
    speakers: list[DiarizedSpeaker]
    segments: list[Turn]  # sorted by start
    model: ModelRef

    @classmethod
    def of(cls, d: dict[str, Any]) -> Diarization:
        speakers = [
            DiarizedSpeaker(s["label"], s["speech_seconds"], None if s["match"] is None else Match(**s["match"]))
            for s in d["speakers"]
        ]
        turns = [Turn(t["start"], t["end"], t["speaker"]) for t in d["segments"]]
        return cls(d["duration"], speakers, turns, ModelRef.of(d["model"]))

    def name_of(self, label: str) -> str:
        """The enrolled name a label carries, else the label."""
        for s in self.speakers:
            if s.label == label:
                return s.match.name if s.match is not None else label
        return label

    def rttm(self, file_id: str = "audio") -> str:
        """The turns as NIST RTTM lines, speakers by enrolled name where named."""
        return rttm_lines(file_id, [(t.start, t.end, self.name_of(t.speaker)) for t in self.segments])


def rttm_lines(file_id: str, turns: list[tuple[float, float, str]]) -> str:
    """NIST RTTM: one ``SPEAKER`` line per ``(start, end, name)`` turn of the file ``file_id``. RTTM's
    fields are separated by spaces, so a space in a name (an enrolled name) becomes ``_``."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in file_id) or "audio"
    return "".join(
        f"SPEAKER {safe} 1 {a:.3f} {b - a:.3f} <NA> <NA> {'_'.join(name.split()) or '_'} <NA> <NA>\n"
        for a, b, name in turns
    )
