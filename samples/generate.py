"""Make the sample clips in this folder with the project's own synthesiser (sentences not in the corpus).

.venv/bin/python samples/generate.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from model.audio import resample
from model.training.corpus import LABELS, SENTENCE_POOL, VOICES, ffmpeg_write, synthesise
from model.training.sentences import sentences

HERE = Path(__file__).resolve().parent
TEXT = sentences(8, salt="samples", exclude=sentences(SENTENCE_POOL))
# file name, voice label, sentence, ffmpeg output options
SAMPLES = [
    ("flite-slt.wav", "flite-slt", 0, ["-ar", "16000", "-ac", "1", "-c:a", "pcm_s16le"]),
    ("flite-slt-2.flac", "flite-slt", 1, ["-ar", "44100", "-ac", "2", "-c:a", "flac"]),
    ("festival-ked.m4a", "festival-ked", 2, ["-ar", "44100", "-ac", "2", "-c:a", "aac", "-b:a", "96k"]),
    ("espeak-en-us-f2.mp3", "espeak-en-us-f2", 3, ["-ar", "22050", "-ac", "1", "-c:a", "libmp3lame", "-b:a", "64k"]),
    ("espeak-en-gb-m7.ogg", "espeak-en-gb-m7", 4, ["-ar", "48000", "-ac", "1", "-c:a", "libopus", "-b:a", "32k"]),
    ("flite-awb-8k-mulaw.wav", "flite-awb", 5, ["-ar", "8000", "-ac", "1", "-c:a", "pcm_mulaw"]),
]


# who spoke when (README's /diarize example): three voices taking turns, twice round, 0.4 s apart
CONVERSATION = ("conversation.mp3", ["flite-awb", "flite-slt", "festival-ked"] * 2,
                ["-ar", "16000", "-ac", "1", "-c:a", "libmp3lame", "-b:a", "32k"])  # fmt: skip
CONVERSATION_TEXT = sentences(6, salt="samples-conversation", exclude=sentences(SENTENCE_POOL))


def spoken(label: str, text: str) -> torch.Tensor:
    """Labelled voice ``label`` saying ``text``: mono at 16 kHz, peak 0.5."""
    with tempfile.TemporaryDirectory() as tmp:
        samples, sr = synthesise(VOICES[LABELS.index(label)], text, 1.0, 0, Path(tmp))
    wave = resample(torch.from_numpy(np.ascontiguousarray(samples)), sr, 16000)
    return wave / wave.abs().max() * 0.5


def conversation() -> None:
    name, labels, options = CONVERSATION
    pause = torch.zeros(int(0.4 * 16000))
    turns = [
        part for label, text in zip(labels, CONVERSATION_TEXT, strict=True) for part in (spoken(label, text), pause)
    ]
    ffmpeg_write(torch.cat(turns), 16000, HERE / name, options)
    print(f"{name}: {', '.join(labels)} taking turns")


def main() -> None:
    conversation()
    for name, label, sentence, options in SAMPLES:
        ffmpeg_write(spoken(label, TEXT[sentence]), 16000, HERE / name, options)
        print(f"{name}: {label}: {TEXT[sentence]}")


if __name__ == "__main__":
    main()
