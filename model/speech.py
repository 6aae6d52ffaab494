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
    thread: a recording's speech probabilities, one per 512-sample chunk, as its model gives
    them chunk after chunk (the recurrent state and 64 samples of context carried from each chunk
    to the next), computed as up to ``STREAMS`` stretches at once in one batched call per step.
    Each stretch after the first starts ``WARM_UP`` chunks early, so its state has heard the
    audio before it, and those chunks' outputs are dropped. One thread, so that finding speech
    beside the service's inference takes one core, not all."""

    CONTEXT = 64
    CHUNK = 512
    STREAMS = 16  # stretches computed together (a batch of 16 costs about 2.5 of one)
    MIN_RUN = 16  # chunks (0.5 s) each stretch covers at least
    WARM_UP = 16  # chunks (0.5 s) each later stretch starts early

    def __init__(self, compiled: Any) -> None:
        self._request = compiled.create_infer_request()

    @classmethod
    def compile(cls) -> Any | None:
        """The graph compiled once with a dynamic batch (any number of stretches), or None where
        OpenVINO or the graph is missing."""
        try:
            import openvino as ov
            import silero_vad
        except ImportError:
            return None
        path = Path(silero_vad.__file__).parent / "data" / "silero_vad_openvino_16k.onnx"
        if not path.is_file():
            return None
        core = ov.Core()
        graph = core.read_model(str(path))
        graph.reshape({"input": ov.PartialShape([-1, cls.CHUNK + cls.CONTEXT]), "state": ov.PartialShape([2, -1, 128])})
        return core.compile_model(graph, "CPU", {"INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY"})

    def probabilities(self, wave: np.ndarray, streams: int = STREAMS) -> list[float]:
        n = -(-len(wave) // self.CHUNK)
        # chunk i is padded[64 + 512 i : 64 + 512 (i + 1)], its context the 64 samples before it
        padded = np.zeros(self.CONTEXT + n * self.CHUNK, dtype=np.float32)
        padded[self.CONTEXT : self.CONTEXT + len(wave)] = wave
        streams = max(1, min(streams, n // self.MIN_RUN))
        bounds = [round(k * n / streams) for k in range(streams + 1)]
        starts = [max(0, b - (self.WARM_UP if k else 0)) for k, b in enumerate(bounds[:-1])]
        steps = max(bounds[k + 1] - starts[k] for k in range(streams))
        # every chunk with its context, as rows of a view (no copy)
        chunks = np.lib.stride_tricks.sliding_window_view(padded, self.CHUNK + self.CONTEXT)[:: self.CHUNK]
        first = np.asarray(starts)
        state = np.zeros((2, streams, 128), dtype=np.float32)
        out = np.zeros((streams, steps), dtype=np.float32)
        for t in range(steps):
            x = chunks[np.minimum(first + t, n - 1)]  # a finished stretch repeats its last chunk, unused
            result = self._request.infer({"input": x, "state": state})
            state = np.array(result["stateN"], dtype=np.float32)
            out[:, t] = np.asarray(result["output"], dtype=np.float32).reshape(streams)
        probs: list[float] = []
        for k in range(streams):
            skip = bounds[k] - starts[k]
            probs.extend(out[k, skip : skip + bounds[k + 1] - bounds[k]].tolist())
        return probs


class SpeechDetector:
    """Silero VAD's model, loaded once: its OpenVINO graph on one thread where OpenVINO is
    installed (``backend="auto"``), else (or with ``backend="torch"``) its TorchScript model. The
    model keeps state between 32 ms chunks, so each call takes one of ``instances`` copies (for
    OpenVINO, inference requests of one compiled graph) and up to that many calls run at once;
    make one detector per process."""

    def __init__(self, config: VadConfig | None = None, backend: str = "auto", instances: int = 1) -> None:
        self.config = c = config or VadConfig()
        self._options = {
            "threshold": c.threshold,
            "sampling_rate": SAMPLE_RATE,
            "min_speech_duration_ms": c.min_speech_ms,
            "min_silence_duration_ms": c.min_silence_ms,
            "speech_pad_ms": c.pad_ms,
        }
        # silero_vad sets torch's thread count to 1 when imported: keep the caller's
        threads = torch.get_num_threads()
        try:
            from silero_vad import get_speech_timestamps, load_silero_vad
            from silero_vad.utils_vad import get_speech_timestamps_from_probs
        finally:
            torch.set_num_threads(threads)
        self._timestamps = get_speech_timestamps
        self._from_probs = get_speech_timestamps_from_probs
        compiled = _OpenVinoSilero.compile() if backend != "torch" else None
        self.backend = "torch" if compiled is None else "openvino"
        copies = max(1, instances)
        self._models: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(copies):
            self._models.put(load_silero_vad() if compiled is None else _OpenVinoSilero(compiled))
        # Each copy reads a second of silence here, one after the other: OpenVINO's Python binding
        # sets up statics of its own on the first inference, and two first inferences on two
        # threads at once can deadlock on them with the GIL (one waits for the static with the
        # GIL held, the other, inside it, for the GIL): every decode thread of the service hung.
        silence = torch.zeros(SAMPLE_RATE)
        for _ in range(copies):  # the queue hands out each copy in turn
            self.regions(silence)

    @torch.inference_mode()
    def regions(self, wave: Tensor, sample_rate: int = SAMPLE_RATE, whole: bool = False) -> list[tuple[int, int]]:
        """Speech regions of a mono 16 kHz ``(N,)`` waveform as ``(start, end)`` sample indices,
        in order and not overlapping. ``whole``: chunk after chunk through the whole recording, as
        Silero's own loop, not as stretches side by side; what /diarize uses, where every second
        of speech counts (the stretches missed some at their seams: 4.64 % of the validation
        conversations' speech against 3.37 %), at about 6 times the time (0.5 s for 105 s)."""
        if sample_rate != SAMPLE_RATE:
            raise ValueError(f"speech detection runs at {SAMPLE_RATE} Hz, not {sample_rate}")
        if wave.dim() != 1:
            raise ValueError(f"want a mono (N,) waveform, not {tuple(wave.shape)}")
        if wave.numel() < SAMPLE_RATE // 10:
            return []
        model = self._models.get()
        try:
            if isinstance(model, _OpenVinoSilero):
                probs = model.probabilities(wave.float().contiguous().numpy(), 1 if whole else model.STREAMS)
                found = self._from_probs(probs, audio_length_samples=wave.numel(), **self._options)
            else:
                found = self._timestamps(wave.float().contiguous(), model, **self._options)
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
