"""Classification and verification metrics shared by training and evaluation."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def equal_error_rate(embeddings: Tensor, labels: Tensor) -> tuple[float, float]:
    """Same/different-voice EER over all pairs, and the cosine threshold at which it occurs."""
    emb = F.normalize(embeddings.float(), dim=-1)  # (N, E)
    scores = emb @ emb.T  # (N, N)
    i, j = torch.triu_indices(len(labels), len(labels), offset=1)
    pair_scores = scores[i, j]
    same = labels[i] == labels[j]
    if same.all() or (~same).all():
        raise ValueError("EER needs both same-voice and different-voice pairs")
    order = torch.argsort(pair_scores, descending=True)
    s, is_same = pair_scores[order], same[order].float()
    # accepting everything scoring >= s[k]: false accepts among different pairs, false rejects among same
    far = torch.cumsum(1 - is_same, 0) / (1 - is_same).sum()
    frr = 1 - torch.cumsum(is_same, 0) / is_same.sum()
    k = int(torch.argmin((far - frr).abs()))
    return float((far[k] + frr[k]) / 2), float(s[k])


def confusion_matrix(predicted: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """``[true, predicted]`` counts."""
    index = target.long() * num_classes + predicted.long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def summarise(logits: Tensor, embeddings: Tensor, labels: Tensor, class_names: list[str]) -> dict[str, Any]:
    """Accuracy, per-class accuracy, EER and threshold, confusion matrix."""
    predicted = logits.argmax(-1)
    cm = confusion_matrix(predicted, labels, len(class_names))
    per_class = {name: float(cm[k, k] / cm[k].sum()) if cm[k].sum() else None for k, name in enumerate(class_names)}
    counts = torch.bincount(labels)
    if (counts >= 2).any() and (counts > 0).sum() >= 2:
        eer, threshold = equal_error_rate(embeddings, labels)
    else:  # too few clips for same- and different-voice pairs
        eer, threshold = None, None
    return {
        "clips": len(labels),
        "accuracy": float((predicted == labels).float().mean()),
        "per_class_accuracy": per_class,
        "eer": eer,
        "eer_threshold": threshold,
        "confusion_matrix": cm.tolist(),
    }
