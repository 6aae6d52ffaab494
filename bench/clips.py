"""The benchmark's fixed clip sets, made with the project's own synthesiser.

``3s``: 18 clips of exactly 3.0 s (two per voice). ``mixed``: 18 clips of 1 to 30 s (lengths
drawn from a fixed seed). Sentences are outside the training corpus. Each set is written once
as 16-bit 16 kHz WAV under ``data/bench/<set>/`` and reused.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from model.audio import resample
from model.training.corpus import SENTENCE_POOL, VOICES, encode, synthesise
from model.training.sentences import sentences

SR = 16000
SETS = ("3s", "mixed")
PER_VOICE = 2


def lengths(name: str) -> list[float]:
    if name == "3s":
        return [3.0] * (PER_VOICE * len(VOICES))
    rng = random.Random("bench-mixed")
    return [round(rng.uniform(1.0, 30.0), 2) for _ in range(PER_VOICE * len(VOICES))]


def speech_of_length(voice_index: int, seconds: float, text: list[str], start: int) -> torch.Tensor:
    """Sentences of one voice, joined with short pauses, until ``seconds`` long, then cut."""
    voice = VOICES[voice_index]
    need, i = int(seconds * SR), start
    parts: list[torch.Tensor] = []
    with tempfile.TemporaryDirectory() as tmp:
        while sum(p.numel() for p in parts) < need:
            samples, sr = synthesise(voice, text[i % len(text)], 1.0, 0, Path(tmp))
            wave = resample(torch.from_numpy(np.ascontiguousarray(samples)), sr, SR)
            parts += [wave / wave.abs().max().clamp_min(1e-6) * 0.5, torch.zeros(SR // 5)]
            i += 1
    return torch.cat(parts)[:need]


def ensure(root: Path, name: str) -> list[Path]:
    """The set's files, synthesised on first use."""
    out = root / name
    text = sentences(60, salt="bench", exclude=sentences(SENTENCE_POOL))
    paths = []
    for k, seconds in enumerate(lengths(name)):
        voice = k % len(VOICES)
        path = out / f"{k:02d}-{VOICES[voice].label}-{seconds:g}s.wav"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            encode(speech_of_length(voice, seconds, text, start=3 * k), SR, "wav", path)
        paths.append(path)
    return paths
