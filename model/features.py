"""Waveform -> log-mel spectrogram: the one front end used by training, evaluation and the service.

Its parameters are one dataclass, stored in every weights manifest, so that whoever loads a
checkpoint computes exactly the features the network was trained on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torchaudio
from torch import Tensor, nn


@dataclass(frozen=True)
class FeatureConfig:
    sample_rate: int = 16000
    n_mels: int = 80
    win_ms: float = 25.0
    hop_ms: float = 10.0
    n_fft: int = 512
    f_min: float = 20.0
    f_max: float = 7600.0
    log_floor: float = 1e-6
    mean_norm: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.sample_rate < 4000:
            problems.append(f"sample_rate {self.sample_rate} < 4000")
        if self.n_mels < 8:
            problems.append(f"n_mels {self.n_mels} < 8")
        if not 0 < self.hop_ms <= self.win_ms:
            problems.append(f"hop_ms {self.hop_ms} must be in (0, win_ms]")
        if self.win_length > self.n_fft:
            problems.append(f"window of {self.win_length} samples exceeds n_fft {self.n_fft}")
        if not 0 <= self.f_min < self.f_max <= self.sample_rate / 2:
            problems.append(f"need 0 <= f_min < f_max <= {self.sample_rate / 2}")
        if self.log_floor <= 0:
            problems.append("log_floor must be > 0")
        if problems:
            raise ValueError("invalid feature config: " + "; ".join(problems))

    @property
    def win_length(self) -> int:
        return round(self.sample_rate * self.win_ms / 1000)

    @property
    def hop_length(self) -> int:
        return round(self.sample_rate * self.hop_ms / 1000)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureConfig:
        """Build from a manifest's dict, refusing keys this version does not know."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown feature config keys: {', '.join(unknown)}")
        return cls(**data)


class LogMelSpectrogram(nn.Module):
    """``(B, samples)`` or ``(samples,)`` float32 at ``config.sample_rate`` -> ``(B, 1, n_mels, frames)``.

    Deterministic (no dither) and computed per item, so a batch of equal-length clips gives the
    same features as one clip at a time.
    """

    def __init__(self, config: FeatureConfig | None = None) -> None:
        super().__init__()
        self.config = config or FeatureConfig()
        c = self.config
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=c.sample_rate,
            n_fft=c.n_fft,
            win_length=c.win_length,
            hop_length=c.hop_length,
            f_min=c.f_min,
            f_max=c.f_max,
            n_mels=c.n_mels,
            window_fn=torch.hamming_window,
            power=2.0,
            center=True,
            pad_mode="reflect",
            norm="slaney",
            mel_scale="slaney",
        )

    def num_frames(self, num_samples: int) -> int:
        return num_samples // self.config.hop_length + 1

    @torch.no_grad()
    def forward(self, waveform: Tensor) -> Tensor:
        if waveform.dim() == 1:
            waveform = waveform.unsqueeze(0)  # (1, S)
        with torch.autocast(waveform.device.type, enabled=False):
            spec = self.mel(waveform.float())  # (B, n_mels, T)
            spec = torch.log(spec.clamp_min(self.config.log_floor))
            if self.config.mean_norm:
                spec = spec - spec.mean(dim=-1, keepdim=True)
        return spec.unsqueeze(1)  # (B, 1, n_mels, T)
