"""Bytes or a file -> waveform: decoding with PyAV (which bundles FFmpeg's codecs), downmixing
and resampling. Kept apart from featurising, as SpeechBrain does."""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import av
import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
import torchaudio.functional as AF
from torch import Tensor

log = logging.getLogger(__name__)
T = TypeVar("T")


class AudioError(ValueError):
    """The input is not audio we can decode."""


class AudioTooLongError(AudioError):
    """The audio is longer than the caller allows."""


@dataclass(frozen=True)
class Audio:
    samples: np.ndarray  # (channels, samples) float32 in [-1, 1]; one row when downmixed
    sample_rate: int
    source_channels: int = 0  # channels in the input, before any downmix

    @property
    def duration_s(self) -> float:
        return self.samples.shape[1] / self.sample_rate

    @property
    def num_channels(self) -> int:
        return self.source_channels or int(self.samples.shape[0])


MAX_CHANNELS = 32
MAX_SAMPLE_RATE = 384_000
# How much FFmpeg reads to detect the format and stream parameters. Its default (5 MB) makes it
# read a whole WAV upload through Python's file callbacks before decoding it again (5 ms for 3 s,
# more for longer clips); every format we accept is detected from its first kilobytes, and the
# sample rate and channels are taken from the decoded frames anyway. The WAV demuxer's packets
# are 4 KiB by default, and each costs a frame's Python round trip: 64 KiB ones cut that 16-fold.
DEMUX_OPTIONS = {"probesize": "4096", "max_size": "65536"}


def decode(source: bytes | str | Path | BinaryIO, max_seconds: float | None = None, downmix: bool = False) -> Audio:
    """Decode the first audio stream of any container/codec FFmpeg knows.

    ``max_seconds`` stops decoding as soon as the audio is longer than that, and ``downmix``
    averages the channels frame by frame, so an oversized or many-channel upload costs no more
    than that much work and memory.
    """
    return _with_container(source, lambda container: _decode_container(container, max_seconds, downmix))


def _with_container(source: bytes | str | Path | BinaryIO, run: Callable[[av.container.InputContainer], T]) -> T:
    """Open ``source`` with FFmpeg and ``run`` on it; any decoding failure is an AudioError."""
    if isinstance(source, bytes):
        if not source:
            raise AudioError("empty input")
        source = io.BytesIO(source)
    try:
        src = source if not isinstance(source, Path) else str(source)
        with av.open(src, mode="r", options=DEMUX_OPTIONS) as container:
            return run(container)
    except AudioError:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError, EOFError, UnicodeDecodeError) as exc:
        raise AudioError(f"cannot decode audio: {_short(exc)}") from None


def _short(exc: BaseException) -> str:
    text = (getattr(exc, "strerror", None) or str(exc)).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def _audio_stream(container: av.container.InputContainer) -> tuple[av.audio.stream.AudioStream, int]:
    """The first audio stream and its channel count, within the limits we accept."""
    if not container.streams.audio:
        raise AudioError("no audio stream in input")
    stream = container.streams.audio[0]
    context = stream.codec_context
    if context is None:
        raise AudioError("audio stream has no decoder parameters")
    channels, rate = context.channels or 0, context.sample_rate or 0
    if channels > MAX_CHANNELS:
        raise AudioError(f"{channels} channels; at most {MAX_CHANNELS} are accepted")
    if rate > MAX_SAMPLE_RATE:
        raise AudioError(f"sample rate {rate} Hz; at most {MAX_SAMPLE_RATE} is accepted")
    return stream, channels


def _decode_container(container: av.container.InputContainer, max_seconds: float | None, downmix: bool) -> Audio:
    stream, channels = _audio_stream(container)
    # Planar float32 at the stream's own rate and layout: (channels, n) per frame.
    resampler = av.AudioResampler(format="fltp")
    chunks: list[np.ndarray] = []
    total = 0
    sample_rate = 0
    limit: int | None = None
    for frame in container.decode(stream):
        for out in resampler.resample(frame):
            if not sample_rate:
                sample_rate = out.sample_rate
                if max_seconds is not None:
                    limit = int(max_seconds * sample_rate)
            arr = out.to_ndarray()
            if downmix and arr.shape[0] > 1:
                arr = arr.mean(axis=0, keepdims=True)
            if chunks and arr.shape[0] != chunks[0].shape[0]:
                raise AudioError("channel count changes mid-stream")
            chunks.append(arr)
            total += arr.shape[1]
            if limit is not None and total > limit:
                raise AudioTooLongError(f"audio longer than the limit of {max_seconds:g} s")
    for out in resampler.resample(None):
        arr = out.to_ndarray()
        chunks.append(arr.mean(axis=0, keepdims=True) if downmix and arr.shape[0] > 1 else arr)
    if not chunks or sample_rate <= 0:
        raise AudioError("no audio samples decoded")
    samples = np.concatenate(chunks, axis=1).astype(np.float32, copy=False)
    if not np.isfinite(samples).all():
        raise AudioError("audio contains NaN or infinite samples")
    return Audio(samples=samples, sample_rate=sample_rate, source_channels=channels)


def to_mono(audio: Audio, sample_rate: int) -> Tensor:
    """Average the channels and resample (windowed-sinc, anti-aliased) to ``sample_rate``."""
    wave = torch.from_numpy(np.ascontiguousarray(audio.samples)).mean(dim=0)  # (S,)
    return resample(wave, audio.sample_rate, sample_rate)


def resample(wave: Tensor, orig_rate: int, new_rate: int) -> Tensor:
    if orig_rate == new_rate:
        return wave
    return AF.resample(wave, orig_rate, new_rate)


RESAMPLE_BLOCK_S = 1.0  # input gathered before each resampling step


class StreamingResampler:
    """torchaudio's windowed-sinc resampler (``torchaudio.functional.resample`` with its defaults)
    applied piece by piece: feeding a waveform in any pieces gives the samples of resampling it
    whole (to float rounding), while holding only a kernel's width of input between pieces."""

    def __init__(self, orig_rate: int, new_rate: int) -> None:
        self.identity = orig_rate == new_rate
        gcd = math.gcd(orig_rate, new_rate)
        self.orig, self.new = orig_rate // gcd, new_rate // gcd
        if not self.identity:
            # the kernel and width of torchaudio's public transform (its defaults are
            # torchaudio.functional.resample's), applied here piece by piece
            whole = torchaudio.transforms.Resample(orig_rate, new_rate, dtype=torch.float32)
            self.kernel, self.width = whole.kernel, int(whole.width)
            self._pending = torch.zeros(self.width)  # the left padding torchaudio adds
        self.block_steps = max(1, math.ceil(orig_rate * RESAMPLE_BLOCK_S / self.orig))  # about a second of input
        self.consumed = 0  # input samples fed
        self.produced = 0  # output samples returned

    def _run(self, padded: Tensor, steps: int) -> Tensor:
        """The outputs of ``steps`` kernel positions over the start of ``padded``."""
        used = padded[: (steps - 1) * self.orig + self.kernel.shape[-1]]
        out = F.conv1d(used[None, None], self.kernel, stride=self.orig)  # (1, new, steps)
        return out[0].transpose(0, 1).reshape(-1)

    def _steps(self, n: int) -> int:
        """How many kernel positions ``n`` padded input samples fully cover."""
        size = self.kernel.shape[-1]
        return (n - size) // self.orig + 1 if n >= size else 0

    def push(self, wave: Tensor) -> Tensor:
        """Resample what ``wave`` completes. Runs in blocks of a fixed ``block_steps`` positions, so
        oneDNN compiles one convolution per rate, not one per piece size (its cache is shared with
        the network)."""
        self.consumed += wave.numel()
        if self.identity:
            self.produced += wave.numel()
            return wave
        pending = torch.cat([self._pending, wave])
        outs, start = [], 0
        while self._steps(pending.numel() - start) >= self.block_steps:
            outs.append(self._run(pending[start:], self.block_steps))
            start += self.block_steps * self.orig
        self._pending = pending[start:]  # a view: holds at most one block of input
        out = torch.cat(outs) if outs else torch.empty(0)
        self.produced += out.numel()
        return out

    def finish(self) -> Tensor:
        """The last samples (torchaudio's right padding), trimmed to torchaudio's output length."""
        if self.identity:
            return torch.empty(0)
        padded = torch.cat([self._pending, torch.zeros(self.width + self.orig)])
        steps = self._steps(padded.numel())
        out = self._run(padded, steps) if steps > 0 else torch.empty(0)
        target = math.ceil(self.new * self.consumed / self.orig)
        out = out[: max(0, target - self.produced)]
        self.produced += out.numel()
        return out


@dataclass(frozen=True)
class MonoAudio:
    """A decoded clip, already mono at the rate asked for, with what was learnt on the way."""

    wave: Tensor  # (samples,) float32 at ``sample_rate``
    sample_rate: int
    source_rate: int
    source_channels: int
    duration_s: float  # of the source, at its own rate
    peak: float  # largest absolute sample of the downmixed source


def decode_mono(
    source: bytes | str | Path | BinaryIO,
    sample_rate: int,
    max_seconds: float | None = None,
    on_output: Callable[[int], None] | None = None,
) -> MonoAudio:
    """Decode, downmix and resample as the packets come: the same samples as
    ``to_mono(decode(source, downmix=True), sample_rate)`` (to float rounding), but the source's
    own rate and channels are never held whole: at most about a second of them, plus the output.

    ``on_output(n)`` is called with the bytes of output about to be kept, before keeping them (and
    once more for the copy that joins the pieces at the end); it may raise to stop decoding, which
    is how a caller bounds the memory one clip may take."""
    report = on_output or (lambda n: None)
    return _with_container(source, lambda container: _decode_mono(container, sample_rate, max_seconds, report))


# PCM sample formats converted to float32 in numpy, exactly as FFmpeg's swresample converts them
# (a power-of-two scale): a 16 kHz WAV then needs no resampler at all (the FFmpeg converter took
# about a millisecond per upload, most of it setting itself up). Others go through FFmpeg.
_PCM_SCALE = {"s16": 2.0**-15, "s32": 2.0**-31, "flt": 1.0, "dbl": 1.0}


def planar_float(frame: av.AudioFrame, converter: av.AudioResampler) -> list[tuple[int, np.ndarray]]:
    """A decoded frame as ``(rate, float32 (channels, n))``: in numpy for PCM formats, else
    through ``converter`` (FFmpeg, to planar float)."""
    name = frame.format.name.rstrip("p")
    scale = _PCM_SCALE.get(name)
    if scale is None:
        return [(f.sample_rate, f.to_ndarray()) for f in converter.resample(frame)]
    arr = frame.to_ndarray()
    if not frame.format.is_planar:  # packed: (1, n * channels), interleaved
        arr = arr.reshape(-1, len(frame.layout.channels)).T
    out = arr.astype(np.float32)
    if scale != 1.0:
        out *= np.float32(scale)
    return [(frame.sample_rate, out)]


def _decode_mono(
    container: av.container.InputContainer,
    sample_rate: int,
    max_seconds: float | None,
    on_output: Callable[[int], None],
) -> MonoAudio:
    stream, channels = _audio_stream(container)
    converter = av.AudioResampler(format="fltp")  # planar float32, the stream's own rate and layout
    resampler: StreamingResampler | None = None
    source_rate = 0
    limit: int | None = None
    block: list[np.ndarray] = []
    block_samples = total = 0
    width = 0
    peak = 0.0
    pieces: list[Tensor] = []

    def keep(out: Tensor) -> None:
        if out.numel():
            on_output(out.numel() * 4)
            pieces.append(out)

    def flush() -> None:
        nonlocal block_samples, peak
        if not block:
            return
        mono = np.concatenate(block)
        block.clear()
        block_samples = 0
        if not np.isfinite(mono).all():
            raise AudioError("audio contains NaN or infinite samples")
        peak = max(peak, float(np.abs(mono).max()))
        assert resampler is not None
        keep(resampler.push(torch.from_numpy(mono)))

    def take(frames: list[tuple[int, np.ndarray]]) -> None:
        nonlocal source_rate, limit, resampler, total, block_samples, width
        for rate, arr in frames:
            if not source_rate:
                source_rate = rate
                resampler = StreamingResampler(source_rate, sample_rate)
                if max_seconds is not None:
                    limit = int(max_seconds * source_rate)
            if width and arr.shape[0] != width:
                raise AudioError("channel count changes mid-stream")
            width = arr.shape[0]
            mono = arr.mean(axis=0) if arr.shape[0] > 1 else arr[0]
            block.append(np.ascontiguousarray(mono, dtype=np.float32))
            block_samples += mono.shape[0]
            total += mono.shape[0]
            if limit is not None and total > limit:
                raise AudioTooLongError(f"audio longer than the limit of {max_seconds:g} s")
            if block_samples >= RESAMPLE_BLOCK_S * source_rate:
                flush()

    for frame in container.decode(stream):
        take(planar_float(frame, converter))
    take([(f.sample_rate, f.to_ndarray()) for f in converter.resample(None)])
    if not total or resampler is None:
        raise AudioError("no audio samples decoded")
    flush()
    keep(resampler.finish())
    on_output(resampler.produced * 4)  # joining the pieces copies them once
    wave = torch.cat(pieces) if len(pieces) != 1 else pieces[0]
    pieces.clear()
    return MonoAudio(wave, sample_rate, source_rate, channels, total / source_rate, peak)


# FFmpeg encoder -> the container it usually travels in.
CONTAINERS = {"libopus": "ogg", "libmp3lame": "mp3", "aac": "adts", "pcm_s16le": "wav"}


def encode(wave: Tensor, sample_rate: int, codec: str, bitrate: int, options: dict[str, str] | None = None) -> bytes:
    """A mono float waveform -> a file's bytes: ``codec`` (an FFmpeg encoder in ``CONTAINERS``) at
    ``bitrate`` b/s (unused by PCM), with encoder ``options`` (e.g. libopus ``cutoff``)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=CONTAINERS[codec]) as container:
        stream = container.add_stream(codec, rate=sample_rate, layout="mono")
        assert isinstance(stream, av.audio.stream.AudioStream)
        stream.bit_rate = bitrate
        if options:
            stream.options = dict(options)
        frame = av.AudioFrame.from_ndarray(wave.numpy().astype(np.float32)[None], format="flt", layout="mono")
        frame.sample_rate = sample_rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return buf.getvalue()


def wav_pcm16(wave: Tensor | np.ndarray, sample_rate: int) -> bytes:
    """A mono float waveform -> a 16-bit WAV file's bytes, by FFmpeg's own ``pcm_s16le`` encoder
    in-process (starting FFmpeg costs about 85 ms a clip)."""
    return encode(torch.as_tensor(wave, dtype=torch.float32), sample_rate, "pcm_s16le", 0)


def load(path: str | Path, sample_rate: int, max_seconds: float | None = None) -> Tensor:
    """A file on disk -> mono float32 waveform at ``sample_rate``."""
    return to_mono(decode(Path(path), max_seconds=max_seconds), sample_rate)
