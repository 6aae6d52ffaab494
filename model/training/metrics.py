"""Classification and verification metrics shared by training and evaluation."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from model.runtime import as_norm


def all_pairs(
    embeddings: Tensor,
    labels: Tensor,
    mask: Tensor | None = None,
    statistics: Tensor | None = None,
    segments: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Cosine scores of every pair of clips and whether the pair is one voice. With ``mask`` (a
    bool per clip), only the pairs with at least one clip in the mask. With ``statistics`` (each
    clip's ``model.runtime.cohort_statistics``), adaptive s-norm scores instead of cosines. With
    ``segments`` (an id per clip, -1 for none), no pair of two clips of the same speech (one
    recording under two conditions is not a trial)."""
    emb = F.normalize(embeddings.float(), dim=-1)  # (N, E)
    i, j = torch.triu_indices(len(labels), len(labels), offset=1)
    if mask is not None:
        keep = mask[i] | mask[j]
        i, j = i[keep], j[keep]
    if segments is not None:
        keep = (segments[i] != segments[j]) | (segments[i] < 0)
        i, j = i[keep], j[keep]
    scores = (emb[i] * emb[j]).sum(-1)
    if statistics is not None:
        scores = as_norm(scores, statistics[i], statistics[j])
    return scores, labels[i] == labels[j]


def error_rates(scores: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Accepting every trial scoring >= threshold[k]: false-accept and false-reject rates, for
    each score taken as the threshold (best first)."""
    if target.all() or (~target).all():
        raise ValueError("error rates need both target and non-target trials")
    order = torch.argsort(scores, descending=True)
    s, is_target = scores[order], target[order].double()
    far = torch.cumsum(1 - is_target, 0) / (1 - is_target).sum()
    frr = 1 - torch.cumsum(is_target, 0) / is_target.sum()
    return far, frr, s


def eer_of_scores(scores: Tensor, target: Tensor) -> tuple[float, float]:
    """The equal error rate of scored trials and the threshold at which it occurs."""
    far, frr, s = error_rates(scores, target)
    k = int(torch.argmin((far - frr).abs()))
    return float((far[k] + frr[k]) / 2), float(s[k])


def threshold_at_far(scores: Tensor, target: Tensor, far: float) -> tuple[float, float, float]:
    """The lowest threshold (one of the scores) that accepts at most ``far`` of the non-target
    trials, with the false-accept and false-reject rates there: ``(threshold, far, frr)``."""
    rates, misses, s = error_rates(scores, target)
    within = (rates <= far).nonzero()
    if not len(within):  # the top score is a different-voice pair: only a threshold above it will do
        return float(torch.nextafter(s[0], torch.tensor(2.0, dtype=s.dtype))), 0.0, 1.0
    k = int(within.max())
    return float(s[k]), float(rates[k]), float(misses[k])


def verification_figures(scores: Tensor, target: Tensor, target_far: float = 0.01) -> dict[str, float]:
    """The EER and its threshold, and the threshold that accepts at most ``target_far`` of the
    non-target trials with its false-accept and false-reject rates."""
    eer, eer_threshold = eer_of_scores(scores, target)
    far_threshold, far, frr = threshold_at_far(scores, target, target_far)
    return {
        "eer": eer,
        "eer_threshold": eer_threshold,
        "far_threshold": far_threshold,
        "far": far,
        "frr_at_far_threshold": frr,
    }


def min_dcf(scores: Tensor, target: Tensor, p_target: float = 0.01, c_miss: float = 1.0, c_fa: float = 1.0) -> float:
    """Minimum normalised detection cost (NIST SRE): min over thresholds of
    ``c_miss * P_miss * p_target + c_fa * P_fa * (1 - p_target)``, over the cost of the better
    trivial system."""
    far, frr, _ = error_rates(scores, target)
    cost = c_miss * frr * p_target + c_fa * far * (1 - p_target)
    trivial = min(c_miss * p_target, c_fa * (1 - p_target))
    # also the threshold above every score: reject everything
    return float(min(float(cost.min()), c_miss * p_target) / trivial)


def equal_error_rate(embeddings: Tensor, labels: Tensor) -> tuple[float, float]:
    """Same/different-voice EER over all pairs, and the cosine threshold at which it occurs."""
    try:
        return eer_of_scores(*all_pairs(embeddings, labels))
    except ValueError:
        raise ValueError("EER needs both same-voice and different-voice pairs") from None


def segment_ids(segments: list[str] | None) -> Tensor | None:
    """An integer per clip for :func:`all_pairs`: equal for clips of one segment, -1 for none."""
    if segments is None or not any(segments):
        return None
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(s, len(index)) if s else -1 for s in segments])


def leave_one_out_centroid(embeddings: Tensor, labels: Tensor, segments: Tensor | None = None) -> Tensor:
    """For each clip, the voice whose centroid (mean normalised embedding of its other clips, less
    those of its own ``segments``, if given) is nearest by cosine; returns a bool per clip: was it
    its own voice."""
    emb = F.normalize(embeddings.float(), dim=-1)
    voices = labels.unique()
    onehot = (labels[:, None] == voices[None, :]).float()  # (N, V)
    sums, counts = onehot.T @ emb, onehot.sum(0)  # (V, E), (V,)
    own = onehot.argmax(1)
    hits = torch.zeros(len(labels), dtype=torch.bool)
    for n in range(len(labels)):
        s, c = sums.clone(), counts.clone()
        left_out = (segments == segments[n]) if segments is not None and segments[n] >= 0 else None
        if left_out is None:
            s[own[n]] -= emb[n]
            c[own[n]] -= 1
        else:
            s[own[n]] -= emb[left_out].sum(0)
            c[own[n]] -= left_out.sum()
        valid = c > 0
        centroids = F.normalize(s / c.clamp_min(1)[:, None], dim=-1)
        scores = (centroids @ emb[n]).masked_fill(~valid, -2.0)
        hits[n] = int(scores.argmax()) == int(own[n])
    return hits


def cross_condition(
    embeddings: Tensor, voices: list[str], segments: list[str], enrol: list[int], probe: list[int]
) -> dict[str, Any]:
    """Enrolment clips against probe clips (of the same voices, under another condition) by
    cosine: the EER over every enrolment-probe pair of two different segments, and how often a
    probe's nearest voice centroid (of the enrolment clips of other segments) is its own."""
    emb = F.normalize(embeddings.float(), dim=-1)
    names = sorted({voices[i] for i in enrol})
    vi = torch.tensor([names.index(voices[i]) if voices[i] in names else -1 for i in range(len(voices))])
    seg = segment_ids(segments)
    assert seg is not None
    e, p = torch.tensor(enrol), torch.tensor(probe)
    scores = emb[p] @ emb[e].T  # (P, E)
    same = vi[p][:, None] == vi[e][None, :]
    other = seg[p][:, None] != seg[e][None, :]
    eer = eer_of_scores(scores[other], same[other])[0]
    onehot = F.one_hot(vi[e], len(names)).float()  # (E, V)
    hits = []
    for k in range(len(p)):
        keep = other[k].float()[:, None] * onehot  # enrolment clips of other segments, by voice
        centroids = F.normalize(keep.T @ emb[e], dim=-1)
        hits.append(int((centroids @ emb[p[k]]).argmax()) == int(vi[p[k]]))
    return {
        "enrol_clips": len(enrol),
        "probe_clips": len(probe),
        "eer": eer,
        "centroid_accuracy": sum(hits) / len(hits),
    }


def condition_tags(conditions: dict[str, Any]) -> list[str]:
    """The recording conditions a corpus clip was made under, as report rows."""
    tags = []
    if "noise" in conditions:
        tags.append(f"noise:{conditions['noise']}")
    if "reverb_rt60" in conditions:
        tags.append("reverb")
    band = str(conditions.get("band", ""))
    if band:
        tags.append("telephone" if band == "telephone" else band.split(":")[0])
    if "codec" in conditions:
        tags.append(f"codec:{str(conditions['codec']).split(':')[0]}")
    return tags or ["clean"]


def open_set_report(
    embeddings: Tensor,
    voices: list[str],
    conditions: list[dict[str, Any]] | None = None,
    p_target: float = 0.01,
    target_far: float = 0.01,
    statistics: Tensor | None = None,
    segments: list[str] | None = None,
) -> dict[str, Any]:
    """Verification and identification among voices: EER and minDCF over all pairs, the threshold
    that accepts ``target_far`` of the different-voice pairs and the share of same-voice pairs it
    rejects, leave-one-out nearest-centroid accuracy, and the same per recording condition (pairs
    with at least one clip in that condition; accuracy of the clips in it). With ``statistics``
    (``model.runtime.cohort_statistics`` of each clip), pairs are scored by adaptive s-norm, as
    weights with ``verification_norm`` score them, and ``eer_cosine`` is the plain cosine's EER.
    ``segments``: clips that share a non-empty one are the same speech under two conditions, which
    make no trial and are left out of each other's centroid."""
    names = sorted(set(voices))
    labels = torch.tensor([names.index(v) for v in voices])
    seg = segment_ids(segments)
    scores, same = all_pairs(embeddings, labels, statistics=statistics, segments=seg)
    hits = leave_one_out_centroid(embeddings, labels, seg)
    per_voice = torch.bincount(labels)
    report: dict[str, Any] = {
        "clips": len(voices),
        "voices": len(names),
        "min_clips_per_voice": int(per_voice.min()),
        **verification_figures(scores, same, target_far),
        "min_dcf": min_dcf(scores, same, p_target),
        "p_target": p_target,
        "centroid_accuracy": float(hits.float().mean()),
        "per_condition": {},
    }
    if statistics is not None:
        report["score"] = "as-norm"
        report["eer_cosine"] = eer_of_scores(*all_pairs(embeddings, labels, segments=seg))[0]
    if conditions is not None:
        tags = [condition_tags(c) for c in conditions]
        for tag in sorted({t for ts in tags for t in ts}):
            mask = torch.tensor([tag in ts for ts in tags])
            s, t = all_pairs(embeddings, labels, mask, statistics, seg)
            row: dict[str, Any] = {"clips": int(mask.sum()), "centroid_accuracy": float(hits[mask].float().mean())}
            row["eer"] = eer_of_scores(s, t)[0] if t.any() and (~t).any() else None
            report["per_condition"][tag] = row
    return report


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
