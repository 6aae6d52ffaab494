"""The one object that owns the model: preprocess (decode, checks), inference, postprocess.

CPU-bound work runs on worker threads, never on the event loop: decoding on a small pool, so bad
input is rejected without waiting behind inference, and inference on a single thread that owns
all torch intra-op threads, so results never depend on what else is in flight.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

import model
from app import memory
from app.budget import MIB, REQUEST_OVERHEAD, MemoryBudget, OverBudgetError, default_budget_mb, peak_rss_bytes
from app.config import Settings
from app.errors import ApiError
from app.metrics import Metrics
from app.uploads import Intake, Upload
from app.worker import BatchingWorker
from model.audio import AudioError, AudioTooLongError, decode_mono
from model.diarize import MAX_SPEAKERS, Diarization, DiarizeConfig, diarize, windows
from model.speech import SpeechDetector

log = logging.getLogger(__name__)


@dataclass
class ClipResult:
    embedding: np.ndarray  # (E,)
    probabilities: np.ndarray  # (C,)
    duration_s: float
    windows: int
    sample_rate: int
    channels: int
    # open-set check (None for weights without class centroids): cosine to the nearest class
    # centroid and whether it reaches the calibrated known-voice threshold
    known_score: float | None = None
    known: bool | None = None
    speech_s: float = 0.0  # seconds of speech the VAD found


@dataclass
class Spectrogram:
    values: np.ndarray  # (n_mels, frames) uint8, low mel bands first; 0..255 spans low..high
    low: float  # log-mel value of 0
    high: float  # log-mel value of 255
    hop_s: float
    duration_s: float  # of the whole clip (the values cover its first window)


class InferenceService:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.model: model.EmbeddingModel | None = None
        self.ready = False
        self.draining = False
        self.pending = 0
        self._decode_pool = ThreadPoolExecutor(2, thread_name_prefix="decode")
        self.budget = MemoryBudget((settings.memory_budget_mb or default_budget_mb()) * MIB)
        metrics.memory_budget.labels(part="budget").set(self.budget.limit)
        self._worker: BatchingWorker[torch.Tensor, model.Inference] | None = None
        self._speech: SpeechDetector | None = None

    # lifecycle ---------------------------------------------------------------------------

    def load(self, weights_dir: Path) -> None:
        """Load, check, configure and warm the model; raises model.WeightsError on bad weights."""
        started = time.perf_counter()
        s = self.settings
        loaded = model.load(weights_dir).configure(s.precision, s.channels_last, s.backend, s.openvino_cache_dir)
        self._warm_up(loaded)
        self._speech = SpeechDetector(instances=2)  # one per decode thread
        self.model = loaded
        trim = memory.trimmer() if s.trim_memory else None
        if trim is not None:
            trim()  # warm-up's garbage: RSS from here on is the serving footprint
        # The peak so far holds the largest forward pass the worker makes (warm-up made one):
        # what requests may hold is the budget less that.
        self.budget.set_baseline(peak_rss_bytes() or 0)
        self.metrics.memory_budget.labels(part="baseline").set(self.budget.baseline)
        # trims on the worker's idle schedule (its defaults; bench.soak measures what that bounds)
        self._worker = BatchingWorker(
            self._infer_batch, s.batch_clips, self._on_batch, on_idle=trim, max_background=s.diarize_chunk_windows
        )
        m = loaded.manifest
        info = {"name": m.name, "version": m.version, "sha256": m.sha256, "arch": m.architecture}
        self.metrics.model.info({**info, "backend": loaded.backend, "precision": loaded.precision})
        self.ready = True
        log.info(
            "model ready in %.2f s (%s on %s, %s, channels_last=%s); memory budget %d MB, %d MB of it for requests",
            time.perf_counter() - started,
            m.architecture,
            loaded.backend,
            loaded.precision,
            loaded.channels_last,
            self.budget.limit // MIB,
            self.budget.capacity // MIB,
        )

    def _warm_up(self, loaded: model.EmbeddingModel) -> None:
        """First calls pay for allocation and oneDNN kernel selection: make them before traffic,
        for a short clip at every batch size the worker can form and for one full window."""
        rng = np.random.default_rng(0)
        short = torch.from_numpy(rng.normal(0, 0.1, loaded.sample_rate * 3).astype(np.float32))
        for n in range(1, self.settings.batch_windows + 1):
            loaded.infer_many([short] * n, self.settings.window_s, self.settings.batch_windows)
        # a clip of batch_windows full windows: the largest forward pass there is (its memory peak
        # is part of the budget's baseline)
        full = int(loaded.sample_rate * self.settings.window_s) * self.settings.batch_windows
        loaded.infer(torch.from_numpy(rng.normal(0, 0.1, full).astype(np.float32)), self.settings.window_s,
                     self.settings.batch_windows)  # fmt: skip

    def close(self) -> None:
        self.ready = False
        self._decode_pool.shutdown(wait=True, cancel_futures=True)
        if self._worker is not None:
            self._worker.close(timeout=self.settings.graceful_timeout_s)

    def stop_accepting(self) -> None:
        """Report not ready (load balancers stop sending) while in-flight work finishes."""
        if not self.draining:
            log.info("shutting down: not ready, finishing %d pending clips", self.pending)
        self.ready = False
        self.draining = True

    # backpressure ------------------------------------------------------------------------

    def check_capacity(self) -> None:
        """Refuse new work at once, before reading the body, when shutting down or when the
        waiting work is at its bound."""
        if self.draining:
            raise ApiError(503, "shutting_down", "this replica is shutting down; retry", {"Retry-After": "1"})
        if self.pending >= self.settings.max_pending:
            self.metrics.rejected.inc()
            raise ApiError(503, "overloaded", "the server is at capacity; retry shortly", {"Retry-After": "1"})

    def estimate(self, content_length: int | None, clips: int, max_seconds: float | None = None) -> int:
        """Bytes a request may hold, from its body size: the fixed overhead plus, twice, the 16 kHz
        mono float32 waveform(s) it can decode to. A body byte is taken to become at most two bytes
        of waveform (16-bit PCM at the model's rate; every other uncompressed form becomes less);
        compressed bodies that decode to more grow their reservation as they decode. Each clip is
        at most MAX_DURATION_S long."""
        s = self.settings
        rate = self.model.sample_rate if self.model is not None else 16000
        cap = int((max_seconds or s.max_duration_s) * rate) * 4 * clips
        body = s.max_body_bytes if content_length is None else min(content_length, s.max_body_bytes)
        return REQUEST_OVERHEAD + 2 * min(2 * body, cap)

    def over_budget(self, exc: OverBudgetError) -> ApiError:
        self.metrics.memory_rejected.inc()
        if exc.ever:
            return ApiError(
                413,
                "too_large_for_memory",
                f"this request needs about {exc.wanted // MIB + 1} MB of memory; the memory budget "
                f"(MEMORY_BUDGET_MB={self.budget.limit // MIB}) leaves {self.budget.capacity // MIB} MB for requests",
            )
        return ApiError(
            503,
            "over_memory_budget",
            "the uploads in flight hold this server's memory budget; retry shortly",
            {"Retry-After": "1"},
        )

    @asynccontextmanager
    async def intake(
        self, content_length: str | None, clips: int, max_seconds: float | None = None
    ) -> AsyncIterator[Intake]:
        """Admit a request before its body is read: capacity, then its memory reservation
        (estimated from Content-Length for up to ``clips`` clips). Closes what it opened."""
        self.check_capacity()
        length = int(content_length) if content_length and content_length.strip().isdigit() else None
        try:
            reservation = self.budget.reservation(self.estimate(length, clips, max_seconds))
        except OverBudgetError as exc:
            raise self.over_budget(exc) from None
        intake = Intake(reservation)
        self.metrics.memory_reserved.set(self.budget.reserved)
        try:
            yield intake
        finally:
            await intake.aclose()
            self.metrics.memory_reserved.set(self.budget.reserved)
            if self.budget.reserved == 0 and self._worker is not None:
                # the last request's memory is free now, maybe after the worker's idle trim ran
                self._worker.housekeeping_soon()

    @asynccontextmanager
    async def admitted(self, clips: int) -> AsyncIterator[None]:
        self.check_capacity()
        self.pending += clips
        self.metrics.pending.set(self.pending)
        self.metrics.batch_size.observe(clips)
        try:
            yield
        finally:
            self.pending -= clips
            self.metrics.pending.set(self.pending)

    # info --------------------------------------------------------------------------------

    def require_model(self) -> model.EmbeddingModel:
        if self.model is None:
            raise ApiError(503, "not_ready", "the model is not loaded yet", {"Retry-After": "1"})
        return self.model

    @property
    def labels(self) -> list[str]:
        return self.require_model().labels

    @property
    def threshold(self) -> float | None:
        return self.require_model().manifest.verification_threshold

    @property
    def identify_threshold(self) -> float | None:
        """/identify's: the weights' own where calibrated (higher: a clip meets every voiceprint),
        else the verification threshold."""
        m = self.require_model().manifest
        return m.identify_threshold if m.identify_threshold is not None else m.verification_threshold

    @property
    def known_threshold(self) -> float | None:
        return self.require_model().manifest.known_threshold

    @property
    def score_kind(self) -> str:
        """What verification scores are: "cosine", or "as-norm" (adaptive s-norm) when the weights say so."""
        return "as-norm" if self.require_model().norm_top else "cosine"

    def scoring_key(self) -> tuple[Any, ...]:
        """Identifies how the loaded weights score, for caching :meth:`norm_statistics`."""
        loaded = self.require_model()
        cohort = loaded.manifest.known_cohort or {}
        return (loaded.manifest.sha256, cohort.get("sha256"), loaded.norm_top)

    def norm_statistics(self, voiceprints: np.ndarray) -> np.ndarray | None:
        """What scoring needs of each row of ``voiceprints`` (N, E), reusable across queries:
        None where scores are plain cosines."""
        stats = self.require_model().norm_statistics(torch.from_numpy(np.ascontiguousarray(voiceprints)))
        return None if stats is None else stats.numpy()

    def verification_scores(
        self, query: np.ndarray, voiceprints: np.ndarray, statistics: np.ndarray | None = None, unit: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """``query`` (E,) against each row of ``voiceprints`` (M, E): the verification scores, on the
        scale of the calibrated threshold, and the cosines, both (M,). ``statistics``: from
        :meth:`norm_statistics` of the same rows; ``unit``: the rows are unit vectors already.
        The cosines are one float32 matrix product (numpy's BLAS, faster here than torch's
        matrix-vector product at 100,000 rows)."""
        q = np.asarray(query, dtype=np.float32)
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        rows = np.asarray(voiceprints, dtype=np.float32)
        if not unit:
            rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        cosines = rows @ q
        if statistics is None:
            statistics = self.norm_statistics(rows)
        scores = self.require_model().normalise_scores(
            torch.from_numpy(cosines).reshape(1, -1),
            torch.from_numpy(q).reshape(1, -1),
            None if statistics is None else torch.from_numpy(statistics),
        )
        return scores[0].numpy(), cosines

    def model_ref(self) -> dict[str, str]:
        m = self.require_model().manifest
        return {"name": m.name, "version": m.version, "sha256": m.sha256}

    def model_info(self) -> dict[str, Any]:
        loaded = self.require_model()
        m = loaded.manifest
        return {
            **self.model_ref(),
            "architecture": m.architecture,
            "num_classes": m.num_classes,
            "embedding_size": m.embedding_size,
            "labels": m.labels,
            "sample_rate": m.sample_rate,
            "features": m.features.to_dict(),
            "verification_threshold": m.verification_threshold,
            "verification_score": self.score_kind,
            "identify_threshold": self.identify_threshold,
            "known_threshold": m.known_threshold,
            "metrics": m.metrics,
            "execution": {
                "backend": loaded.backend,
                "precision": loaded.precision,
                "channels_last": loaded.channels_last,
                "torch_threads": torch.get_num_threads(),
                "batch_clips": self.settings.batch_clips,
                "batch_windows": self.settings.batch_windows,
            },
            "limits": {
                "min_duration_s": self.settings.min_duration_s,
                "max_duration_s": self.settings.max_duration_s,
                "max_body_bytes": self.settings.max_body_bytes,
                "window_s": self.settings.window_s,
                "min_enrol_speech_s": self.settings.min_enrol_speech_s,
            },
        }

    # the three stages --------------------------------------------------------------------

    def preprocess(
        self, upload: Upload, intake: Intake, max_seconds: float | None = None, allow_silence: bool = False
    ) -> tuple[torch.Tensor, int, int]:
        """A spooled body part -> mono waveform at the model's rate, with the duration and silence
        checks. Decoding streams and reserves what it keeps as it goes."""
        m = self.require_model()
        s = self.settings
        reservation = intake.reservation
        used = kept = 0

        def on_output(n: int) -> None:
            nonlocal used
            reservation.use(n)
            used += n

        try:
            upload.file.seek(0)
            limit = max_seconds or s.max_duration_s
            audio = decode_mono(upload.file, m.sample_rate, max_seconds=limit, on_output=on_output)
            kept = audio.wave.numel() * 4  # the joined copy; the pieces are gone
        except OverBudgetError as exc:
            raise self.over_budget(exc) from None
        except AudioTooLongError:
            raise ApiError(413, "audio_too_long", f"audio is longer than the limit of {limit:g} s") from None
        except AudioError as exc:
            raise ApiError(415, "undecodable_audio", str(exc)) from None
        finally:
            reservation.free(used - kept)
            intake.decoded()
        if audio.duration_s < s.min_duration_s:
            raise ApiError(
                422, "audio_too_short", f"{audio.duration_s:.3f} s of audio; at least {s.min_duration_s:g} s is needed"
            )
        if audio.peak < s.silence_peak and not allow_silence:
            raise ApiError(422, "silent_audio", "the audio is silent")
        return audio.wave, audio.source_rate, audio.source_channels

    def _on_batch(self, waits: list[float]) -> None:
        self.metrics.infer_batch.observe(len(waits))
        queue = self.metrics.stage.labels(stage="queue")
        for w in waits:
            queue.observe(w)

    def _infer_batch(self, waves: list[torch.Tensor]) -> list[model.Inference]:
        started = time.perf_counter()
        results = self.require_model().infer_many(waves, self.settings.window_s, self.settings.batch_windows)
        self.metrics.stage.labels(stage="inference").observe(time.perf_counter() - started)
        return results

    async def spectrogram(self, upload: Upload, intake: Intake) -> Spectrogram:
        """The features of a clip's first window, scaled to 0..255 for display (no network pass)."""
        loop = asyncio.get_running_loop()
        wave, _, _ = await loop.run_in_executor(self._decode_pool, self.preprocess, upload, intake)
        m = self.require_model()
        feats = (await loop.run_in_executor(self._decode_pool, m.spectrogram, wave, self.settings.window_s)).numpy()
        lo, hi = float(feats.min()), float(feats.max())
        scaled = np.round((feats - lo) / max(hi - lo, 1e-9) * 255).astype(np.uint8)
        features = m.manifest.features
        return Spectrogram(
            values=scaled,
            low=lo,
            high=hi,
            hop_s=features.hop_length / features.sample_rate,
            duration_s=wave.numel() / m.sample_rate,
        )

    async def analyse(self, upload: Upload, intake: Intake) -> ClipResult:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            wave, rate, channels = await loop.run_in_executor(self._decode_pool, self.preprocess, upload, intake)
        except ApiError as exc:
            self.metrics.clips.labels(outcome=exc.code).inc()
            raise
        self.metrics.stage.labels(stage="decode").observe(time.perf_counter() - started)
        detector = self._speech
        if self._worker is None or detector is None:
            raise ApiError(503, "not_ready", "the model is not loaded yet", {"Retry-After": "1"})
        m = self.require_model()
        # speech is measured on a decode thread while the worker embeds: the answer waits for the
        # slower of the two, not their sum
        inferred = asyncio.wrap_future(self._worker.submit(wave))
        try:
            speech_s = await loop.run_in_executor(self._decode_pool, detector.seconds, wave, m.sample_rate)
        except BaseException:
            inferred.cancel()
            raise
        result = await inferred
        if speech_s == 0 and self.settings.require_speech:
            self.metrics.clips.labels(outcome="no_speech").inc()
            raise ApiError(422, "no_speech", "no speech was found in the audio; send a recording of someone speaking")
        self.metrics.clips.labels(outcome="ok").inc()
        self.metrics.audio_seconds.inc(wave.numel() / m.sample_rate)
        nearest = m.nearest_class(result.embedding)
        return ClipResult(
            embedding=result.embedding.numpy(),
            probabilities=result.probabilities.numpy(),
            duration_s=wave.numel() / m.sample_rate,
            windows=result.windows,
            sample_rate=rate,
            channels=channels,
            known_score=None if nearest is None else nearest[1],
            known=None if nearest is None else nearest[2],
            speech_s=speech_s,
        )

    async def diarize(
        self,
        upload: Upload,
        intake: Intake,
        num_speakers: int | None = None,
        min_speakers: int = 1,
        max_speakers: int | None = None,
    ) -> Diarization:
        """Who spoke when (``model/diarize.py``): speech found with the VAD, cut into overlapping
        windows, embedded through the same worker as every clip as background jobs (a few windows
        at a time, only when no other request's clip waits), then clustered. A recording with no speech has
        no turns."""
        loop = asyncio.get_running_loop()
        limit = self.settings.diarize_max_duration_s
        wave, _, _ = await loop.run_in_executor(self._decode_pool, self.preprocess, upload, intake, limit, True)
        m = self.require_model()
        rate = m.sample_rate
        duration = wave.numel() / rate
        detector = self._speech
        if detector is None or self._worker is None:
            raise ApiError(503, "not_ready", "the model is not loaded yet", {"Retry-After": "1"})
        found = await loop.run_in_executor(self._decode_pool, partial(detector.regions, wave, rate, whole=True))
        regions = [(a / rate, b / rate) for a, b in found]
        config = DiarizeConfig()
        spans = windows(regions, config)
        # behind every other request: the worker takes a few windows at a time when nothing else waits
        futures = [
            asyncio.wrap_future(self._worker.submit_background(wave[int(a * rate) : int(b * rate)])) for a, b in spans
        ]
        embeddings = [r.embedding.numpy() for r in await asyncio.gather(*futures)]
        self.metrics.audio_seconds.inc(duration)
        x = np.stack(embeddings) if embeddings else np.zeros((0, m.manifest.embedding_size), np.float32)
        hi = max_speakers if max_speakers is not None else MAX_SPEAKERS
        return await loop.run_in_executor(
            self._decode_pool, diarize, duration, regions, spans, x, num_speakers, min_speakers, hi, config
        )
