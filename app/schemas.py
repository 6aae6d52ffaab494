"""Response schemas: what /docs and /openapi.json publish."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ErrorDetail(BaseModel):
    code: str = Field(examples=["undecodable_audio"])
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelRef(BaseModel):
    name: str
    version: str
    sha256: str


class Processing(BaseModel):
    windows: int = Field(description="fixed windows averaged; 1 unless the clip is longer than window_s")
    window_s: float
    input_sample_rate: int
    input_channels: int


def speech_field() -> Any:
    return Field(description="seconds of speech in the clip, found by voice activity detection (Silero VAD)")


class EmbedResponse(BaseModel):
    embedding: list[float] = Field(description="the fc layer's output")
    dim: int
    normalized: bool
    duration_s: float
    speech_seconds: float = speech_field()
    processing: Processing
    model: ModelRef


class LabelScore(BaseModel):
    label: str
    index: int
    score: float


class ClassifyResponse(BaseModel):
    label: str
    index: int
    score: float
    probabilities: dict[str, float] = Field(description="every class, in class order")
    top_k: list[LabelScore]
    known: bool | None = Field(
        None,
        description="whether the voice matches one of the classes: false means it is none of them, whatever "
        "'label' says (known_score is below known_threshold, calibrated on voices never trained on); absent for "
        "weights without class centroids",
    )
    known_score: float | None = Field(
        None,
        description="cosine of the embedding to the nearest class centroid, less the mean cosine to its nearest few "
        "background voices (voices outside the classes that the network was trained on) where the weights have them",
    )
    known_threshold: float | None = Field(None, description="known_score at or above this: one of the classes")
    duration_s: float
    speech_seconds: float = speech_field()
    processing: Processing
    embedding: list[float] | None = None
    model: ModelRef


def score_field() -> Any:
    return Field(
        description="the verification score, on the scale of 'threshold': the cosine of the two embeddings or, for "
        "weights calibrated with adaptive s-norm (score_kind 'as-norm'), that cosine as standard deviations above "
        "what each side scores against its own nearest background voices, averaged over the two sides"
    )


def score_kind_field() -> Any:
    return Field(description="what 'score' and 'threshold' are: 'cosine', or 'as-norm' (adaptive s-norm)")


class VerifyResponse(BaseModel):
    score: float = score_field()
    cosine: float = Field(description="cosine similarity of the two embeddings")
    score_kind: Literal["cosine", "as-norm"] = score_kind_field()
    same_speaker: bool
    threshold: float
    duration_s: dict[str, float]
    speech_seconds: dict[str, float] = Field(description="seconds of speech in 'a' and 'b' (voice activity detection)")
    model: ModelRef


class SpectrogramResponse(BaseModel):
    n_mels: int
    frames: int
    hop_s: float = Field(description="seconds between frames")
    seconds: float = Field(description="audio the frames cover: the first window of the clip")
    duration_s: float = Field(description="the whole clip")
    low: float = Field(description="the log-mel value drawn as 0")
    high: float = Field(description="the log-mel value drawn as 255")
    values: str = Field(
        description="base64 of n_mels x frames bytes, row by row from the lowest mel band; "
        "byte v stands for low + v / 255 * (high - low)"
    )


class SpeakerOut(BaseModel):
    id: str
    name: str
    metadata: dict[str, Any]
    clips: int = Field(description="clips in the profile; each counts once in the voiceprint")
    seconds: float = Field(description="audio in those clips")
    speech_seconds: float | None = Field(
        description="speech in those clips (voice activity detection); null for a profile enrolled before it was "
        "measured"
    )
    enough_speech: bool | None = Field(
        description="whether speech_seconds reaches MIN_ENROL_SPEECH_S (GET /v1/model's limits), the speech a "
        "reliable voiceprint needs; add clips until it does"
    )
    created_at: str
    updated_at: str
    model: ModelRef = Field(description="the weights that made the profile's embeddings")
    stale: bool = Field(description="made with other weights than the ones served: never compared, enrol again")
    embedding: list[float] | None = Field(None, description="the voiceprint, with ?include_embedding=true")


class SpeakerList(BaseModel):
    speakers: list[SpeakerOut] = Field(description="oldest first")
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page; absent on the last")


class SpeakerPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1, max_length=200)
    metadata: dict[str, Any] | None = Field(None, description="replaces the metadata")


class SpeakerRef(BaseModel):
    id: str
    name: str


class SpeakerVerifyResponse(BaseModel):
    speaker: SpeakerRef
    score: float = score_field()
    cosine: float = Field(description="cosine of the clip's embedding to the profile's voiceprint")
    score_kind: Literal["cosine", "as-norm"] = score_kind_field()
    same_speaker: bool
    threshold: float
    model: ModelRef


class Match(BaseModel):
    id: str
    name: str
    score: float = score_field()
    cosine: float = Field(description="cosine of the clip's embedding to the profile's voiceprint")


class IdentifyResponse(BaseModel):
    matches: list[Match] = Field(description="the best top_k profiles, best first")
    speaker: Match | None = Field(description="the best match, or null when its score is below the threshold")
    threshold: float
    score_kind: Literal["cosine", "as-norm"] = score_kind_field()
    searched: int = Field(description="profiles compared (this namespace's, made with the served weights)")
    skipped_stale: int = Field(description="profiles made with other weights, not compared")
    model: ModelRef


class SpeakerMatch(BaseModel):
    id: str
    name: str
    score: float = score_field()


class DiarizedSpeaker(BaseModel):
    label: str = Field(description="S1, S2, ... in order of first speech")
    speech_seconds: float
    match: SpeakerMatch | None = Field(
        description="with identify=true, the enrolled profile this voice is (scored as /identify, at its "
        "threshold; each profile names one speaker at most); null otherwise"
    )


class Segment(BaseModel):
    start: float = Field(description="seconds from the start of the recording")
    end: float
    speaker: str


class DiarizeResponse(BaseModel):
    duration: float = Field(description="seconds of audio")
    speakers: list[DiarizedSpeaker]
    segments: list[Segment] = Field(description="speaker turns, sorted by start; none where there is no speech")
    identify_threshold: float | None = Field(description="the threshold the matches passed, with identify=true")
    model: ModelRef


class BatchItem(BaseModel):
    index: int
    filename: str | None
    result: dict[str, Any] | None = None
    error: ErrorDetail | None = None


class BatchResponse(BaseModel):
    results: list[BatchItem] = Field(description="one entry per file, in upload order")
    model: ModelRef


class Health(BaseModel):
    status: str


class ModelInfo(BaseModel):
    name: str
    version: str
    sha256: str
    architecture: str
    num_classes: int
    embedding_size: int
    labels: list[str]
    sample_rate: int
    features: dict[str, Any]
    verification_threshold: float | None
    verification_score: Literal["cosine", "as-norm"] = Field(description="the scale of verification_threshold")
    identify_threshold: float | None = Field(
        None, description="/identify names a speaker at or above this score (on verification_threshold's scale)"
    )
    known_threshold: float | None = Field(None, description="the open-set threshold of /classify's 'known'")
    metrics: dict[str, Any]
    limits: dict[str, float]
    execution: dict[str, Any] = Field(description="backend, precision, channels_last, torch threads, batching")
