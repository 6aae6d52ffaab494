"""Where there is speech in a recording: Silero VAD (the ``silero-vad`` wheel, MIT, which carries its
model; nothing is downloaded), with the hysteresis, minimum lengths and padding of its own
``get_speech_timestamps``.

Used to trim silence from real recordings before they are cut into clips (word corpora are half
silence, and a crop of silence teaches a speaker embedding nothing). Audio in, sample ranges out:
no web code.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

SAMPLE_RATE = 16000  # Silero VAD's rate here (it also takes 8 kHz; callers resample to 16 kHz)


@dataclass(frozen=True)
class VadConfig:
    threshold: float = 0.5  # speech probability that starts speech (Silero's default)
    min_speech_ms: int = 250  # shorter bursts are dropped
    min_silence_ms: int = 100  # a pause at least this long ends a region
    pad_ms: int = 30  # kept each side of a region


class _OpenVinoSilero:
    """Silero VAD's OpenVINO graph (``silero_vad_openvino_16k.onnx`` in the wheel) on one CPU
    thread, callable as ``get_speech_timestamps`` calls its model: a 512-sample chunk in, the
    speech probability out, the recurrent state and 64 samples of context kept between calls.
    One thread, so that finding speech beside the service's inference takes one core, not all."""

    CONTEXT = 64

    def __init__(self, compiled: Any) -> None:
        self._request = compiled.create_infer_request()
        self.reset_states()

    @staticmethod
    def compile() -> Any | None:
        """The compiled graph, or None where OpenVINO or the graph is missing."""
        try:
            import openvino as ov
            import silero_vad
        except ImportError:
            return None
        path = Path(silero_vad.__file__).parent / "data" / "silero_vad_openvino_16k.onnx"
        if not path.is_file():
            return None
        options = {"INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY"}
        return ov.Core().compile_model(str(path), "CPU", options)

    def reset_states(self, batch_size: int = 1) -> None:
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros((1, self.CONTEXT), dtype=np.float32)

    def __call__(self, chunk: Tensor, sample_rate: int) -> Tensor:
        if sample_rate != SAMPLE_RATE:
            raise ValueError(f"this graph runs at {SAMPLE_RATE} Hz")
        x = np.concatenate([self._context, chunk.reshape(1, -1).numpy().astype(np.float32)], axis=1)
        out = self._request.infer({"input": x, "state": self._state})
        self._state = np.array(out["stateN"], dtype=np.float32)
        self._context = x[:, -self.CONTEXT :]
        return torch.from_numpy(np.array(out["output"], dtype=np.float32))


class SpeechDetector:
    """Silero VAD's model, loaded once: its OpenVINO graph on one thread where OpenVINO is
    installed (``backend="auto"``), else (or with ``backend="torch"``) its TorchScript model. The
    model keeps state between 32 ms chunks, so each call takes one of ``instances`` copies (for
    OpenVINO, inference requests of one compiled graph) and up to that many calls run at once;
    make one detector per process."""

    def __init__(self, config: VadConfig | None = None, backend: str = "auto", instances: int = 1) -> None:
        self.config = config or VadConfig()
        # silero_vad sets torch's thread count to 1 when imported: keep the caller's
        threads = torch.get_num_threads()
        try:
            from silero_vad import get_speech_timestamps, load_silero_vad
        finally:
            torch.set_num_threads(threads)
        self._timestamps = get_speech_timestamps
        compiled = _OpenVinoSilero.compile() if backend != "torch" else None
        self.backend = "torch" if compiled is None else "openvino"
        self._models: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(max(1, instances)):
            self._models.put(load_silero_vad() if compiled is None else _OpenVinoSilero(compiled))

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
        model = self._models.get()
        try:
            found = self._timestamps(
                wave.float().contiguous(),
                model,
                threshold=c.threshold,
                sampling_rate=SAMPLE_RATE,
                min_speech_duration_ms=c.min_speech_ms,
                min_silence_duration_ms=c.min_silence_ms,
                speech_pad_ms=c.pad_ms,
            )
        finally:
            self._models.put(model)
        return [(int(r["start"]), int(r["end"])) for r in found]

    def seconds(self, wave: Tensor, sample_rate: int = SAMPLE_RATE) -> float:
        """Seconds of speech in ``wave``: the length of its regions together."""
        return sum(b - a for a, b in self.regions(wave, sample_rate)) / sample_rate

    def trim(self, wave: Tensor, sample_rate: int = SAMPLE_RATE) -> Tensor:
        """The speech of ``wave`` with the silence between its regions cut out (empty if none)."""
        spans = self.regions(wave, sample_rate)
        return torch.cat([wave[a:b] for a, b in spans]) if spans else wave[:0]
