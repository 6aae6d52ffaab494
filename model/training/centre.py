"""Centre the embedding on the training voices, inside the network.

Cosine scores between voices the network never heard improve when the training voices' mean
embedding is subtracted first: the embeddings of all voices share a common component that
says "a voice like the training ones", and it inflates every cosine (WeSpeaker's scoring subtracts
the training mean before cosine scoring for this reason). Measured on this project's open-set
validation voices with the 2026.11.29.2 weights (144 clips of 12 voices, all pairs): EER 7.58 %
raw, 4.53 % after subtracting the mean of one training clip of each of the 361 training voices.

Rather than a scoring step that every user of ``/embed`` would have to know about, the mean is
folded into the network: the fc layer's bias loses it, so the embedding the network outputs is
centred, and the 9-class head's bias gains its image, so the logits do not change
(``logits = linear(embedding)``, nothing between them). The network, its names and outputs stay
the seed's; two bias vectors differ. Training applies it only where it lowers the open-set
validation EER (validation voices, never test or reserved ones).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from model.resnet import ResNet
from model.runtime import EmbeddingModel
from model.training.calibrate import embed_all
from model.training.metrics import open_set_report

log = logging.getLogger(__name__)


@torch.no_grad()
def fold_mean(network: ResNet, mean: Tensor) -> None:
    """Make the network output ``embedding - mean`` with unchanged logits."""
    network.linear.bias.add_(network.linear.weight @ mean)
    network.fc.bias.sub_(mean)


def voice_mean(model: EmbeddingModel, waves: list[Tensor], voices: list[str], per_voice: int, max_s: float) -> Tensor:
    """The mean embedding over voices: each voice's first ``per_voice`` clips averaged, then the
    voices averaged (so the labelled voices, with many more clips, weigh as one voice each)."""
    chosen: dict[str, list[Tensor]] = {}
    for wave, voice in zip(waves, voices, strict=True):
        mine = chosen.setdefault(voice, [])
        if len(mine) < per_voice:
            mine.append(wave)
    rows = [embed_all(model, mine, max_s)[1].mean(0) for mine in chosen.values()]
    return torch.stack(rows).mean(0)


def centre(
    model: EmbeddingModel,
    train_waves: list[Tensor],
    train_voices: list[str],
    open_val_waves: list[Tensor],
    open_val_voices: list[str],
    per_voice: int,
    max_s: float,
) -> dict[str, Any] | None:
    """Fold the training voices' mean embedding into ``model``'s network where that lowers the
    open-set validation EER; what was measured and done, or None where there is nothing to
    decide on (no open-set validation voices, or ``per_voice`` 0)."""
    if per_voice <= 0 or len(set(open_val_voices)) < 2:
        return None
    mean = voice_mean(model, train_waves, train_voices, per_voice, max_s)
    before = open_set_report(embed_all(model, open_val_waves, max_s)[1], open_val_voices)
    fold_mean(model.network, mean)
    after = open_set_report(embed_all(model, open_val_waves, max_s)[1], open_val_voices)
    applied = after["eer"] < before["eer"]
    if not applied:
        fold_mean(model.network, -mean)
    info = {
        "source": f"mean embedding of the training voices ({per_voice} clips each, {len(set(train_voices))} voices), "
        "folded into the fc bias (the classifier's bias compensates: logits unchanged)",
        "applied": applied,
        "mean_norm": float(mean.norm()),
        "open_val_eer_before": before["eer"],
        "open_val_eer_after": after["eer"],
    }
    log.info(
        "centring on the training voices' mean: open-set validation EER %.2f %% -> %.2f %%, %s",
        100 * before["eer"],
        100 * after["eer"],
        "applied" if applied else "not applied",
    )
    return info
