"""Labelled audio folders for training and evaluation.

Two layouts are read: a ``manifest.jsonl`` (``path``, ``label``, ``split`` per line, and
optionally ``voice`` and ``conditions``, as ``model.training.corpus`` writes; a ``null`` label is a
voice outside the classes, used for the embedding only), or one sub-folder per class
(``DIR/<class>/*.wav``, optionally under ``DIR/train``, ``DIR/val``, ``DIR/test``), split 80/10/10
by a hash of the file name otherwise.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from model.audio import load, resample

AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".webm"}
SPLITS = ("train", "val", "test")


UNLABELLED = -1  # an item whose voice is none of the classes


@dataclass
class Item:
    path: Path
    label: int  # index into the labels, or UNLABELLED
    split: str  # train | val | test | open-val | open-test
    voice: str = ""  # the speaker; the class name where the layout has no voices
    conditions: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # a real recording's source; "" for synthesised speech (model.training.corpus)
    segment: str = ""  # clips of the same speech under other conditions share it (held-out real speakers)

    @property
    def real(self) -> bool:
        return bool(self.source)


@dataclass
class Dataset:
    root: Path
    labels: list[str]
    items: list[Item]

    def split(self, name: str) -> list[Item]:
        return [it for it in self.items if it.split == name]

    def voices(self, split: str) -> list[str]:
        """The speakers of a split, in a stable order: the classes first, then the rest sorted."""
        present = {it.voice for it in self.split(split)}
        return [v for v in self.labels if v in present] + sorted(present - set(self.labels))


def _hash_split(name: str) -> str:
    bucket = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10
    return "train" if bucket < 8 else ("val" if bucket == 8 else "test")


def scan(root: str | Path, labels: list[str] | None = None) -> Dataset:
    root = Path(root)
    manifest = root / "manifest.jsonl"
    if manifest.is_file():
        rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
        if labels is None:
            names = root / "labels.json"
            labels = json.loads(names.read_text()) if names.is_file() else sorted({str(r["label"]) for r in rows})
        assert labels is not None
        items = []
        for r in rows:
            if r["label"] is None:
                label = UNLABELLED
            else:
                label = r["label"] if isinstance(r["label"], int) else labels.index(str(r["label"]))
            voice = str(r.get("voice") or labels[label])
            split = r.get("split") or _hash_split(r["path"])
            items.append(
                Item(
                    root / r["path"], label, split, voice, dict(r.get("conditions") or {}),
                    str(r.get("source") or ""), str(r.get("segment") or ""),
                )
            )  # fmt: skip
        return Dataset(root, labels, items)
    has_splits = all((root / s).is_dir() for s in ("train", "val"))
    bases = [(root / s, s) for s in SPLITS if (root / s).is_dir()] if has_splits else [(root, None)]
    found: list[tuple[Path, str, str | None]] = []
    for base, split in bases:
        for class_dir in sorted(p for p in base.iterdir() if p.is_dir()):
            for f in sorted(class_dir.rglob("*")):
                if f.suffix.lower() in AUDIO_SUFFIXES:
                    found.append((f, class_dir.name, split))
    if not found:
        raise ValueError(f"{root}: no manifest.jsonl and no class folders with audio files")
    if labels is None:
        labels = sorted({name for _, name, _ in found})
    items = [
        Item(f, labels.index(name), split or _hash_split(str(f.relative_to(root))), name) for f, name, split in found
    ]
    return Dataset(root, labels, items)


def load_waves(items: list[Item], sample_rate: int, desc: str) -> list[Tensor]:
    """Decode every clip to mono float32 at ``sample_rate`` (kept in memory: corpora are small)."""
    return [load(it.path, sample_rate) for it in tqdm(items, desc=desc, unit="clip", leave=False)]


def random_crop(wave: Tensor, length: int, gen: torch.Generator) -> Tensor:
    """A random ``length``-sample window; shorter clips are repeated to fill it."""
    if wave.numel() < length:
        wave = wave.repeat(length // max(1, wave.numel()) + 1)
    start = int(torch.randint(0, wave.numel() - length + 1, (1,), generator=gen))
    return wave[start : start + length]


def speed_up(wave: Tensor, speed: float, sample_rate: int) -> Tensor:
    """``wave`` played ``speed`` times faster: read as if sampled at ``speed`` x the rate, so pitch,
    formants and tempo move together (the corpus's warped pseudo-speakers, and training's
    speed-perturbed ones)."""
    return wave if speed == 1.0 else resample(wave, round(sample_rate * speed), sample_rate)


def speed_crop(wave: Tensor, length: int, speed: float, sample_rate: int, gen: torch.Generator) -> Tensor:
    """A random ``length``-sample window of ``wave`` played ``speed`` times faster (a window of
    ``length * speed`` samples through :func:`speed_up`)."""
    out = speed_up(random_crop(wave, round(length * speed), gen), speed, sample_rate)
    return out[:length] if out.numel() >= length else F.pad(out, (0, length - out.numel()))
