"""Where there is speech in a recording: Silero VAD (the ``silero-vad`` wheel, MIT, which carries its
model; nothing is downloaded), with the hysteresis, minimum lengths and padding of its own
``get_speech_timestamps``.

Used to trim silence from real recordings before they are cut into clips (word corpora are half
silence, and a crop of silence teaches a speaker embedding nothing). Audio in, sample ranges out:
no web code.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

SAMPLE_RATE = 16000  # Silero VAD's rate here (it also takes 8 kHz; callers resample to 16 kHz)


@dataclass(frozen=True)
class VadConfig:
    threshold: float = 0.5  # speech probability that starts speech (Silero's default)
    min_speech_ms: int = 250  # shorter bursts are dropped
    min_silence_ms: int = 100  # a pause at least this long ends a region
    pad_ms: int = 30  # kept each side of a region


class SpeechDetector:
    """Silero VAD's model, loaded once. Its model keeps state between 32 ms chunks, so calls are
    serialised with a lock; make one detector per process."""

    def __init__(self, config: VadConfig | None = None) -> None:
        self.config = config or VadConfig()
        # silero_vad sets torch's thread count to 1 when imported: keep the caller's
        threads = torch.get_num_threads()
        try:
            from silero_vad import get_speech_timestamps, load_silero_vad
        finally:
            torch.set_num_threads(threads)
        self._timestamps = get_speech_timestamps
        self._model: Any = load_silero_vad()
        self._lock = threading.Lock()

    @torch.inference_mode()
    def regions(self, wave: Tensor, sample_rate: int = SAMPLE_RATE) -> list[tuple[int, int]]:
        """Speech regions of a mono 16 kHz ``(N,)`` waveform as ``(start, end)`` sample indices,
        in order and not overlapping."""
        if sample_rate != SAMPLE_RATE:
            raise ValueError(f"speech detection runs at {SAMPLE_RATE} Hz, not {sample_rate}")
        if wave.dim() != 1:
            raise ValueError(f"want a mono (N,) waveform, not {tuple(wave.shape)}")
        if wave.numel() < SAMPLE_RATE // 10:
            return []
        c = self.config
        with self._lock:
            found = self._timestamps(
                wave.float().contiguous(),
                self._model,
                threshold=c.threshold,
                sampling_rate=SAMPLE_RATE,
                min_speech_duration_ms=c.min_speech_ms,
                min_silence_duration_ms=c.min_silence_ms,
                speech_pad_ms=c.pad_ms,
            )
        return [(int(r["start"]), int(r["end"])) for r in found]

    def trim(self, wave: Tensor, sample_rate: int = SAMPLE_RATE) -> Tensor:
        """The speech of ``wave`` with the silence between its regions cut out (empty if none)."""
        spans = self.regions(wave, sample_rate)
        return torch.cat([wave[a:b] for a, b in spans]) if spans else wave[:0]
