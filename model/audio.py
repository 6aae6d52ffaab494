"""Bytes or a file -> waveform: decoding with PyAV (which bundles FFmpeg's codecs), downmixing
and resampling. Kept apart from featurising, as SpeechBrain does."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np
import torch
import torchaudio.functional as AF
from torch import Tensor

log = logging.getLogger(__name__)


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
    if isinstance(source, bytes):
        if not source:
            raise AudioError("empty input")
        source = io.BytesIO(source)
    try:
        src = source if not isinstance(source, Path) else str(source)
        with av.open(src, mode="r", options=DEMUX_OPTIONS) as container:
            return _decode_container(container, max_seconds, downmix)
    except AudioError:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError, EOFError, UnicodeDecodeError) as exc:
        raise AudioError(f"cannot decode audio: {_short(exc)}") from None


def _short(exc: BaseException) -> str:
    text = (getattr(exc, "strerror", None) or str(exc)).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def _decode_container(container: av.container.InputContainer, max_seconds: float | None, downmix: bool) -> Audio:
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


# FFmpeg encoder -> the container it usually travels in.
CONTAINERS = {"libopus": "ogg", "libmp3lame": "mp3", "aac": "adts"}


def encode(wave: Tensor, sample_rate: int, codec: str, bitrate: int, options: dict[str, str] | None = None) -> bytes:
    """A mono float waveform -> a lossy file's bytes: ``codec`` (an FFmpeg encoder in
    ``CONTAINERS``) at ``bitrate`` b/s, with encoder ``options`` (e.g. libopus ``cutoff``)."""
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


def load(path: str | Path, sample_rate: int, max_seconds: float | None = None) -> Tensor:
    """A file on disk -> mono float32 waveform at ``sample_rate``."""
    return to_mono(decode(Path(path), max_seconds=max_seconds), sample_rate)
