"""Service settings, read from environment variables (docs/api.md has the table)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ROOT = Path(__file__).resolve().parents[1]
# Seconds of speech an enrolment needs before its voiceprint names 4 s probes as often as one of
# 24 s does, within 1 point: `python -m model.training.enrolment weights data/corpus` on the
# validation voices of the shipped weights (docs/api.md, "How much speech an enrolment needs").
MIN_ENROL_SPEECH_S = 12.0


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    host: str = "0.0.0.0"
    port: int = 8000
    weights_dir: Path = ROOT / "weights"
    torch_threads: int | None = Field(default=None, ge=1, description="intra-op threads; default: all CPUs")
    min_duration_s: float = Field(default=0.5, gt=0)
    max_duration_s: float = Field(default=600.0, gt=0)
    max_body_bytes: int = Field(default=100 * 1024 * 1024, ge=1024)
    max_files: int = Field(default=16, ge=1, description="files per batch request")
    precision: Literal["auto", "fp32", "bf16", "int8"] = Field(
        default="auto",
        description="auto: bf16 where the CPU has native bf16 (AVX512-BF16/AMX), else fp32; int8 (opt-in): the "
        "weights' int8 model on OpenVINO (python -m model.training.quantize makes it)",
    )
    backend: Literal["auto", "torch", "openvino"] = Field(
        default="auto", description="auto: the network compiled by OpenVINO where it is installed, else PyTorch"
    )
    channels_last: bool = Field(default=True, description="channels-last memory layout for the network")
    openvino_cache_dir: Path | None = Field(
        default=Path.home() / ".cache" / "voice-embed" / "openvino",
        description="where the network converted for OpenVINO is kept between starts (saves about 5 s a start); "
        "empty: convert at every start",
    )
    batch_clips: int = Field(default=8, ge=1, description="queued clips the inference worker takes at once")
    batch_windows: int = Field(default=4, ge=1, description="equal-length windows per forward pass")
    trim_memory: bool = Field(
        default=True, description="hand free heap pages back to the OS whenever the inference worker runs out of work"
    )
    bound_memory: bool = Field(
        default=False,
        description="small oneDNN primitive cache, fixed glibc mmap threshold: flat RSS under varied lengths, slower",
    )
    window_s: float = Field(default=20.0, gt=1.0, description="long clips are averaged over windows this long")
    diarize_max_duration_s: float = Field(default=3600.0, gt=0, description="longest recording /diarize takes")
    diarize_chunk_windows: int = Field(
        default=1, ge=1, description="windows of a diarization the worker takes at once, when no other clip waits"
    )
    silence_peak: float = Field(default=1e-4, ge=0, description="clips whose peak is below this are silent")
    min_enrol_speech_s: float = Field(
        default=MIN_ENROL_SPEECH_S,
        ge=0,
        description="speech a speaker profile needs for a reliable voiceprint (measured: docs/api.md)",
    )
    require_speech: bool = Field(
        default=True,
        description="a clip in which voice activity detection finds no speech gets 422 no_speech where an embedding "
        "is asked; false embeds any sound",
    )
    max_pending: int = Field(default=32, ge=1, description="clips admitted at once; beyond it: 503 + Retry-After")
    memory_budget_mb: int | None = Field(
        default=None,
        ge=64,
        description="RSS the process may reach; uploads that do not fit beside those in flight get 503 + Retry-After "
        "before their body is read. Default: 85 % of the container's memory limit, else 4096 MB (at most 85 % of RAM)",
    )
    api_keys: str = Field(default="", description="comma-separated bearer keys; empty: no authentication")
    graceful_timeout_s: int = Field(default=30, ge=0, description="how long SIGTERM waits for in-flight work")
    log_level: str = "INFO"
    data_dir: Path = Field(default=ROOT / "var", description="where the default SQLite speaker store lives")
    database_url: str = Field(default="", description="postgresql://... to share speakers between replicas")
    database_connect_timeout_s: float = Field(
        default=5.0, gt=0, le=120, description="how long opening the PostgreSQL pool waits for the server"
    )

    @property
    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

    @field_validator("openvino_cache_dir", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value


@lru_cache
def get_settings() -> Settings:
    return Settings()
