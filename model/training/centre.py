"""Centre and whiten the embedding on the training voices, inside the network.

Cosine scores between voices the network never heard improve when the training voices' mean
embedding is subtracted first: the embeddings of all voices share a common component that
says "a voice like the training ones", and it inflates every cosine (WeSpeaker's scoring subtracts
the training mean before cosine scoring for this reason). Measured on this project's open-set
validation voices with the 2026.11.29.2 weights (144 clips of 12 voices, all pairs): EER 7.58 %
raw, 4.53 % after subtracting the mean of one training clip of each of the 361 training voices.

They improve again when the directions in which one voice's clips vary (its words, the recording
conditions) are scaled down against those in which voices differ: within-class covariance
normalisation (WCCN, Hatch et al. 2006), the classic step before cosine scoring of i-vectors and
x-vectors. The within-voice covariance ``S`` of the training clips (a few of each voice, each
less its voice's mean) gives the transform ``A = (S / mean eigenvalue + ridge)^(-1/2)``, and the
embedding becomes ``A (e - mean)``. Measured with the 2026.11.29.3 weights (already centred; ``S``
from 3 clips of each of their 361 training voices): on 300 voices they never heard (this
project's synthetic espeak-ng variants, 4 clips each) EER 9.00 % -> 7.89 % and leave-one-out
centroid accuracy 0.543 -> 0.739.

What it costs: the directions whitening lengthens are those in which the network's output varies
least, and the small errors of int8 inference there grow with them. With the same weights, the
int8 model NNCF makes keeps its first-percentile cosine to fp32 only with both linear layers,
three convolutions and two residual adds back in fp32 (``--min-share-cosine 0.995``; 1.47x faster than fp32
OpenVINO on a 3 s clip, against 2.04x before whitening). bf16 keeps a cosine of at least 0.999 when the whitened
weights are folded in (the rounding is applied to the whitened output, not amplified by it); an
earlier measurement that whitened bf16 *outputs* afterwards found 0.984, an artefact of rounding
before the transform. Cutting the least-varying directions instead of lengthening them gives up
most of the gain. The shipped weights are whitened (since 2026.11.29.4); training whitens only
when asked (``--whiten``, which ``make train`` passes), centring is always on where it helps.

Whitening alone also lengthens directions in which voices hardly differ (the network's output
varies little there at all). ``--voice-weighting`` follows it with a soft LDA: in whitened units,
each axis of the covariance between the training voices' means (less what their clips' spread
adds to a mean of a few clips) is scaled by ``sqrt(b / (b + 1))``, its ratio ``b`` of between- to
within-voice spread, the weighting a two-covariance (PLDA-like) model gives it; applied only where
it lowers the open-set validation EER below centring alone. On the shipped weights (2026.12.01.1)
it lowered that EER from 2.90 % to 2.54 % and the open-set test voices' only from 4.36 % to 4.34 %
(``docs/training.md``), so it is off by default.

Rather than a scoring step that every user of ``/embed`` would have to know about, both are
folded into the network: the fc layer's weight and bias become ``A W`` and ``A (b - mean)``, so
the embedding the network outputs is centred (and whitened), and the 9-class head becomes
``L A^-1`` with bias ``c + L mean``, so the logits do not change (``logits = linear(embedding)``,
nothing between them). The network, its names and outputs stay the seed's. Training centres
only where that lowers the open-set validation EER (validation voices, never test or reserved
ones); asked to whiten, it always does: the 12 open-set validation voices are too few to decide
it (with the weights above their EER went 3.66 % -> 4.06 %, a few of 792 same-voice trials,
while the 300 unheard voices and the test voices gained clearly). For weights trained without it:

    python -m model.training.centre WEIGHTS_DIR DATA_DIR --out OUT_DIR [--whiten | --voice-weighting]

folds the mean (where it helps) and the whitening in, recalibrates (``model.training.calibrate``),
measures the test figures again and writes new weights (new sha256; an int8 model must be made
again).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.resnet import ResNet
from model.runtime import EmbeddingModel, load
from model.training.calibrate import Embedder, apply_calibration, calibrate_on_corpus, matching_corpus
from model.training.data import Item, load_waves
from model.training.evaluate import evaluate, evaluate_open_set
from model.training.metrics import open_set_report
from model.training.provenance import command_line
from model.weights import WeightsError, save

log = logging.getLogger(__name__)


WHITEN_RIDGE = 1e-4  # added to the within-voice covariance's eigenvalues, in units of their mean


@torch.no_grad()
def fold_affine(network: ResNet, mean: Tensor, transform: Tensor | None = None) -> None:
    """Make the network output ``transform @ (embedding - mean)`` (``transform`` None: the
    identity) with unchanged logits; ``transform`` must be invertible."""
    fc, head = network.fc, network.linear
    dtype = fc.weight.dtype
    a = torch.eye(len(mean), dtype=torch.float64) if transform is None else transform.double()
    mean = mean.double()
    head_weight = head.weight.double()
    head.bias.add_((head_weight @ mean).to(dtype))
    head.weight.copy_(torch.linalg.solve(a.T, head_weight.T).T.to(dtype))  # L A^-1
    fc.bias.copy_((a @ (fc.bias.double() - mean)).to(dtype))
    fc.weight.copy_((a @ fc.weight.double()).to(dtype))


def voice_statistics(
    embed: Embedder, waves: list[Tensor], voices: list[str], per_voice: int
) -> tuple[Tensor, Tensor, int, Tensor]:
    """The mean embedding over voices (each voice's first ``per_voice`` clips averaged, then the
    voices averaged, so the labelled voices, with many more clips, weigh as one voice each), the
    within-voice covariance of those clips, its degrees of freedom (clips less voices), and the
    covariance between voices (of their means, less what the clips' spread adds to a mean of few)."""
    chosen: dict[str, list[Tensor]] = {}
    for wave, voice in zip(waves, voices, strict=True):
        mine = chosen.setdefault(voice, [])
        if len(mine) < per_voice:
            mine.append(wave)
    return spread_statistics([embed(mine)[1].double() for mine in chosen.values()])


def spread_statistics(per_voice_emb: list[Tensor]) -> tuple[Tensor, Tensor, int, Tensor]:
    """:func:`voice_statistics` of embeddings already made, one ``(clips, E)`` tensor a voice."""
    means = torch.stack([e.mean(0) for e in per_voice_emb])
    residuals = torch.cat([e - m for e, m in zip(per_voice_emb, means, strict=True)])
    dof = len(residuals) - len(means)
    scatter = residuals.T @ residuals / max(dof, 1)
    spread = means - means.mean(0)
    # a mean of n clips keeps 1/n of their spread: take it out of the spread of the means
    share = torch.tensor([1.0 / len(e) for e in per_voice_emb], dtype=torch.float64).mean()
    between = spread.T @ spread / max(len(means) - 1, 1) - share * scatter
    return means.mean(0), scatter, dof, between


def whitening(scatter: Tensor, ridge: float = WHITEN_RIDGE) -> Tensor:
    """``(S / mean eigenvalue + ridge)^(-1/2)``: the within-voice covariance ``S`` becomes about
    the identity, and a direction of average within-voice spread keeps its length."""
    values, vectors = torch.linalg.eigh(scatter.double())
    values = values.clamp(min=0) / values.mean() + ridge
    return vectors @ torch.diag(values.rsqrt()) @ vectors.T


def voice_weighting(scatter: Tensor, between: Tensor, ridge: float = WHITEN_RIDGE, floor: float = 1e-3) -> Tensor:
    """:func:`whitening`, then each axis of the between-voice covariance (in units of the
    within-voice spread, ratio ``b``) scaled by ``sqrt(b / (b + 1))``: a soft LDA, the weighting a
    two-covariance (PLDA-like) model gives each direction. Whitening alone lengthens the directions
    in which the network's output hardly varies, voices included; this shortens again those in
    which voices do not differ (to at least ``floor``, so that it stays invertible)."""
    a = whitening(scatter, ridge)
    level = torch.linalg.eigvalsh(scatter.double()).clamp(min=0).mean()  # whitened within-voice spread
    ratios, axes = torch.linalg.eigh(a @ between.double() @ a.T / level)
    ratios = ratios.clamp(min=0)
    return torch.diag((ratios / (ratios + 1)).sqrt().clamp(min=floor)) @ axes.T @ a


def centre(
    model: EmbeddingModel,
    train_waves: list[Tensor],
    train_voices: list[str],
    open_val_waves: list[Tensor],
    open_val_voices: list[str],
    per_voice: int,
    max_s: float,
    whiten: bool = False,
    weigh: bool = False,
    embed: Embedder | None = None,
) -> dict[str, Any] | None:
    """Fold the training voices' mean embedding into ``model``'s network where that lowers the
    open-set validation EER; with ``whiten``, fold in their within-voice whitening too, always;
    with ``weigh``, their voice weighting (:func:`voice_weighting`) instead, where it gives a lower
    open-set validation EER than centring alone and than nothing. Both need clips enough to
    estimate the covariance (at least twice as many clips beyond one a voice as dimensions). What
    was measured and done, or None where there is nothing to decide on (no open-set validation
    voices, or ``per_voice`` 0). ``embed``: the :class:`Embedder` of ``model`` to embed with, so
    that what it embedded here is reused after the fold."""
    if per_voice <= 0 or len(set(open_val_voices)) < 2:
        return None
    embed = embed or Embedder(model, max_s)
    mean, scatter, dof, between = voice_statistics(embed, train_waves, train_voices, per_voice)
    enough = dof >= 2 * len(mean)
    raw = embed(open_val_waves)[1].double()

    def eer(embeddings: Tensor) -> float:
        return float(open_set_report(embeddings.float(), open_val_voices)["eer"])

    before_eer, after_eer = eer(raw), eer(raw - mean)
    transform, weighted_eer = None, None
    if weigh and enough:
        weighting = voice_weighting(scatter, between)
        weighted_eer = eer((raw - mean) @ weighting.T)
        if weighted_eer < min(before_eer, after_eer):
            transform, after_eer = weighting, weighted_eer
    elif whiten and enough:
        transform = whitening(scatter)
        after_eer = eer((raw - mean) @ transform.T)  # what the folded network outputs
    applied = transform is not None or after_eer < before_eer
    if applied:
        fold_affine(model.network, mean, transform)
    kind = "voice weighting" if weigh else "whitening"
    info: dict[str, Any] = {
        "source": f"mean embedding of the training voices ({per_voice} clips each, {len(set(train_voices))} voices)"
        + ("" if transform is None else f" and their within-voice covariance ({dof} degrees of freedom)")
        + ("" if transform is None or not weigh else " and the covariance of their means")
        + ", folded into the fc layer (the classifier compensates: logits unchanged)",
        "applied": applied,
        "whitened": transform is not None,
        "mean_norm": float(mean.norm()),
        "open_val_eer_before": before_eer,
        "open_val_eer_after": after_eer,
    }
    if weigh:
        info["voice_weighting"] = {"applied": transform is not None, "open_val_eer": weighted_eer}
    if transform is not None:
        info["whitening_ridge"] = WHITEN_RIDGE
    log.info(
        "%s: open-set validation EER %.2f %% -> %.2f %%, %s",
        f"centring and {kind}" if transform is not None else "centring",
        100 * before_eer,
        100 * after_eer,
        "applied" if applied else "not applied",
    )
    if weighted_eer is not None:
        log.info("voice weighting: open-set validation EER %.2f %%", 100 * weighted_eer)
    if (whiten or weigh) and not enough:
        log.warning("no %s: %d degrees of freedom for %d dimensions (more --clips-per-voice?)", kind, dof, len(mean))
    return info


STALE_METRICS = ("open_set_identification", "unseen_conditions")  # measured with the embedding before


def main(argv: list[str] | None = None) -> int:
    """Centre (and with --whiten, whiten) existing weights, recalibrate, re-measure the test
    figures and write a new weights directory."""
    parser = argparse.ArgumentParser(prog="python -m model.training.centre", description=__doc__.split("\n\n")[0])
    parser.add_argument("weights_dir", type=Path)
    parser.add_argument("data_dir", type=Path, help="the corpus the weights were trained on")
    parser.add_argument("--out", type=Path, required=True, help="where to write the new weights (may be WEIGHTS_DIR)")
    parser.add_argument(
        "--clips-per-voice", type=int, default=2, help="training clips per voice for the mean (3 or more to whiten)"
    )
    parser.add_argument(
        "--whiten", action="store_true", help="whiten too (WCCN; see the module's notes on bf16 and int8)"
    )
    parser.add_argument(
        "--voice-weighting",
        action="store_true",
        help="whiten, then weigh the between-voice axes (soft LDA), where it lowers the open-set validation EER",
    )
    parser.add_argument("--centroid-clips", type=int, default=40, help="training clips per class for its centroid")
    parser.add_argument("--max-s", type=float, default=8.0, help="seconds of each clip used")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        loaded = load(args.weights_dir)
        dataset = matching_corpus(loaded, args.data_dir)
        sr, per_voice = loaded.sample_rate, args.clips_per_voice
        train: list[Item] = []
        counts: Counter[str] = Counter()
        for it in dataset.split("train"):  # the first clips of each voice: all that voice_statistics uses
            if counts[it.voice] < per_voice:
                counts[it.voice] += 1
                train.append(it)
        open_val = dataset.split("open-val")
        info = centre(
            loaded,
            load_waves(train, sr, "loading train"),
            [it.voice for it in train],
            load_waves(open_val, sr, "loading open-set val"),
            [it.voice for it in open_val],
            per_voice,
            args.max_s,
            args.whiten,
            args.voice_weighting,
        )
        if info is None or not info["applied"]:
            log.info("nothing written: centring does not lower the open-set validation EER here")
            return 1
        cal = calibrate_on_corpus(loaded, dataset, args.centroid_clips, args.max_s)
    except (WeightsError, ValueError) as exc:
        log.error("error: %s", exc)
        return 2
    apply_calibration(loaded, cal, args.data_dir)
    m = loaded.manifest
    metrics = {k: v for k, v in m.metrics.items() if k not in STALE_METRICS}
    metrics["centring"] = {**info, "command": command_line("model.training.centre", argv)}
    if dataset.split("test"):  # the test figures training wrote, measured again on the centred embedding
        test = evaluate(loaded, args.data_dir, "test")
        metrics.update(
            test_accuracy=test["accuracy"], test_eer=test["eer"], test_per_class_accuracy=test["per_class_accuracy"]
        )
    if dataset.split("open-test") and cal.centroids is not None:
        report = evaluate_open_set(loaded, args.data_dir, "open-test")
        metrics["test_flagged_unknown"] = report["classes_flagged_unknown"]["share"]
        metrics["open_set_test"] = report
    saved = save(
        loaded.network,
        args.out,
        architecture=m.architecture,
        labels=m.labels,
        features=m.features,
        verification_threshold=m.verification_threshold,
        provenance=m.provenance,
        metrics=metrics,
        class_centroids=cal.centroids,
        known_threshold=m.known_threshold,
        cohort=cal.cohort,
        cohort_top=cal.cohort_top or None,
        verification_norm=cal.verification_norm,
    )
    log.info("wrote %s (sha256 %s)", args.out, saved.sha256)
    return 0


if __name__ == "__main__":
    sys.exit(main())
