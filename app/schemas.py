"""Response schemas: what /docs and /openapi.json publish."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


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


class EmbedResponse(BaseModel):
    embedding: list[float] = Field(description="the fc layer's output")
    dim: int
    normalized: bool
    duration_s: float
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
        "'label' says (the cosine to the nearest class centroid is below known_threshold, calibrated on voices "
        "never trained on); absent for weights without class centroids",
    )
    known_score: float | None = Field(None, description="cosine of the embedding to the nearest class centroid")
    known_threshold: float | None = Field(None, description="known_score at or above this: one of the classes")
    duration_s: float
    processing: Processing
    embedding: list[float] | None = None
    model: ModelRef


class VerifyResponse(BaseModel):
    score: float = Field(description="cosine similarity of the two embeddings")
    same_speaker: bool
    threshold: float
    duration_s: dict[str, float]
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
    known_threshold: float | None = Field(None, description="the open-set threshold of /classify's 'known'")
    metrics: dict[str, Any]
    limits: dict[str, float]
    execution: dict[str, Any] = Field(description="backend, precision, channels_last, torch threads, batching")
