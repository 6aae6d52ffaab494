"""Evaluate a weights directory on any labelled audio folder.

    python -m model.training.evaluate WEIGHTS_DIR DATA_DIR [--split test|val|train|all] [--json]
        [--backend torch|openvino|auto] [--precision auto|fp32|bf16|int8] [--channels-last] [--parity]
    python -m model.training.evaluate WEIGHTS_DIR DATA_DIR --open-set [--split open-test|open-val]

Prints accuracy, per-class accuracy, same/different-voice EER and the confusion matrix.
``--open-set`` evaluates the embedding on voices held out of training (default: the open-set test
voices): EER over all pairs, minDCF, leave-one-out nearest-centroid accuracy, the same per
recording condition, and, for weights with class centroids, the share of those clips flagged as
none of the classes next to the share of the classes' own test clips flagged.
``--parity`` also runs the plain fp32 model on the split (with ``--open-set``, the open-set voices)
and reports how often the chosen execution's top-1 agrees with it, the cosine between their
embeddings and the EER with each (e.g. ``--precision int8 --parity``).
``--record KEY`` also writes the result into WEIGHTS_DIR's manifest under ``metrics.KEY`` (dots
nest: ``unseen_conditions.noise_hum``), with the command that measured it, through
``model.weights.write_manifest``, so that the manifest's figures are measured, never typed in.
The tensors, and so the weights' sha256, do not change.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from model.runtime import BACKENDS, PRECISIONS, EmbeddingModel, load
from model.training.data import Dataset, Item, load_waves, scan
from model.training.metrics import equal_error_rate, open_set_report, summarise
from model.training.provenance import command_line
from model.weights import WeightsError, read, write_manifest

log = logging.getLogger(__name__)


def load_split(model: EmbeddingModel, data_dir: Path, split: str) -> tuple[list[torch.Tensor], list[int]]:
    dataset = scan(data_dir, labels=None)
    unknown = sorted(set(dataset.labels) - set(model.labels))
    if unknown:
        raise ValueError(f"{data_dir}: classes the model does not know: {', '.join(unknown)}")
    items = dataset.items if split == "all" else dataset.split(split)
    if not items:
        raise ValueError(f"{data_dir}: no clips in split {split!r}")
    waves = load_waves(items, model.sample_rate, f"loading {split}")
    return waves, [model.labels.index(dataset.labels[it.label]) for it in items]


@torch.inference_mode()
def evaluate(model: EmbeddingModel, data_dir: Path, split: str = "test") -> dict[str, Any]:
    waves, labels = load_split(model, data_dir, split)
    results = [model.infer(w) for w in waves]
    return summarise(
        torch.stack([r.logits for r in results]),
        torch.stack([r.embedding for r in results]),
        torch.tensor(labels),
        model.labels,
    )


@torch.inference_mode()
def parity(
    model: EmbeddingModel, reference: EmbeddingModel, waves: list[torch.Tensor], voices: list[str] | None = None
) -> dict[str, Any]:
    """How closely ``model`` (int8, bf16, channels-last, ...) follows ``reference`` (fp32) on
    ``waves``: top-1 agreement, agreement of /classify's ``known`` flag, the cosine between their
    embeddings (minimum, 1st percentile, share at or above 0.995 and 0.99) and the
    same/different-voice EER over all pairs of the clips (``voices`` says whose each clip is)
    with each, and its change in points."""
    fast = [model.infer(w) for w in waves]
    ref = [reference.infer(w) for w in waves]
    agree = [int(f.logits.argmax()) == int(r.logits.argmax()) for f, r in zip(fast, ref, strict=True)]
    known = [
        (model.nearest_class(f.embedding), reference.nearest_class(r.embedding)) for f, r in zip(fast, ref, strict=True)
    ]
    cos = torch.tensor(
        [float(F.cosine_similarity(f.embedding, r.embedding, dim=0)) for f, r in zip(fast, ref, strict=True)]
    )
    report: dict[str, Any] = {
        "execution": {"backend": model.backend, "precision": model.precision, "channels_last": model.channels_last},
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "clips": len(waves),
        "top1_agreement": sum(agree) / len(agree),
        "min_cosine": float(cos.min()),
        "p1_cosine": float(torch.quantile(cos, 0.01)),
        "mean_cosine": float(cos.mean()),
        "share_cosine_at_least_0995": float((cos >= 0.995).float().mean()),
        "share_cosine_at_least_099": float((cos >= 0.99).float().mean()),
    }
    if all(a is not None and b is not None for a, b in known):  # weights with class centroids
        report["known_agreement"] = sum(a[2] == b[2] for a, b in known if a and b) / len(known)
    names = sorted(set(voices or []))
    if voices and len(names) < len(voices):  # some voice has two clips: there are same-voice pairs
        labels = torch.tensor([names.index(v) for v in voices])
        eer_model = equal_error_rate(torch.stack([f.embedding for f in fast]), labels)[0]
        eer_ref = equal_error_rate(torch.stack([r.embedding for r in ref]), labels)[0]
        report |= {
            "voices": len(names),
            "eer": eer_model,
            "eer_fp32": eer_ref,
            "eer_change_points": 100 * (eer_model - eer_ref),
        }
    return report


def parity_items(data_dir: Path, split: str) -> list[Item]:
    items = scan(data_dir).split(split)
    if not items:
        raise ValueError(f"{data_dir}: no clips in split {split!r}")
    return items


@torch.inference_mode()
def embed_split(
    model: EmbeddingModel, data_dir: Path, split: str, dataset: Dataset | None = None
) -> tuple[list[Item], torch.Tensor]:
    """A split's clips and their embeddings, as /embed computes them; ValueError for an empty split.
    ``dataset``: ``scan(data_dir)``, when already made."""
    items = (dataset or scan(data_dir)).split(split)
    if not items:
        raise ValueError(f"{data_dir}: no clips in split {split!r} (make the corpus with --open-per-voice)")
    waves = load_waves(items, model.sample_rate, f"loading {split}")
    return items, torch.stack([model.infer(w).embedding for w in waves])


@torch.inference_mode()
def evaluate_open_set(
    model: EmbeddingModel,
    data_dir: Path,
    split: str = "open-test",
    embedded: tuple[list[Item], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The open-set report of a split (``embedded``: its :func:`embed_split`, when already made)."""
    dataset = scan(data_dir)  # once, for the split and the known classes' clips
    items, emb = embedded or embed_split(model, data_dir, split, dataset)
    report = open_set_report(
        emb, [it.voice for it in items], [it.conditions for it in items], statistics=model.norm_statistics(emb)
    )
    report["split"] = split
    if model.nearest_class(emb[0]) is not None:
        report["flagged_unknown"] = sum(not _known(model, e) for e in emb) / len(emb)
        known_split = {"open-test": "test", "open-val": "val"}[split]
        known_items = dataset.split(known_split)
        if known_items:
            known_waves = load_waves(known_items, model.sample_rate, f"loading {known_split}")
            flagged = [not _known(model, model.infer(w).embedding) for w in known_waves]
            report["classes_flagged_unknown"] = {
                "split": known_split,
                "clips": len(flagged),
                "share": sum(flagged) / len(flagged),
            }
    return report


@torch.inference_mode()
def evaluate_identification(
    model: EmbeddingModel,
    data_dir: Path,
    split: str = "open-test",
    enrol_clips: int = 3,
    embedded: tuple[list[Item], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Open-set identification as the service's /identify does it: every other voice of the split
    (sorted by name) is enrolled from its first ``enrol_clips`` clips (voiceprint: the normalised
    sum of the clips' normalised embeddings); every remaining clip is identified against all
    voiceprints with the weights' verification threshold. Reports top-1 accuracy on the enrolled
    voices' other clips and the share of the never-enrolled voices' clips answered with no speaker.
    ``embedded``: the split's :func:`embed_split`, when already made."""
    if model.manifest.verification_threshold is None:
        raise ValueError("these weights have no verification threshold")
    items, emb = embedded or embed_split(model, data_dir, split)
    emb = F.normalize(emb, dim=-1)
    names = sorted({it.voice for it in items})
    enrolled = names[::2]
    prints, probes = [], []
    for v in enrolled:
        mine = [k for k, it in enumerate(items) if it.voice == v]
        prints.append(F.normalize(emb[mine[:enrol_clips]].sum(0), dim=0))
        probes += [(k, enrolled.index(v)) for k in mine[enrol_clips:]]
    matrix, threshold = torch.stack(prints), model.manifest.verification_threshold
    scores = model.verification_scores(emb, matrix)[0]  # (clips, voiceprints), on the threshold's scale
    hits = [int(scores[k].argmax()) == want for k, want in probes]
    accepted = [bool(scores[k].max() >= threshold) for k, want in probes]
    strangers = [k for k, it in enumerate(items) if it.voice not in enrolled]
    rejected = [bool(scores[k].max() < threshold) for k in strangers]
    return {
        "split": split,
        "enrolled_voices": len(enrolled),
        "enrol_clips": enrol_clips,
        "probe_clips": len(probes),
        "top1_accuracy": sum(hits) / len(hits),
        "identified": sum(h and a for h, a in zip(hits, accepted, strict=True)) / len(hits),
        "never_enrolled_voices": len(names) - len(enrolled),
        "never_enrolled_clips": len(strangers),
        "never_enrolled_answered_none": sum(rejected) / len(rejected),
        "threshold": threshold,
    }


def _known(model: EmbeddingModel, embedding: torch.Tensor) -> bool:
    found = model.nearest_class(embedding)
    return found is not None and found[2]


RECORD_KEY = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*")


def check_record_key(key: str) -> None:
    if not RECORD_KEY.fullmatch(key):
        raise ValueError(f"--record {key!r}: want lower-case names joined by dots (unseen_conditions.noise_hum)")


def record(weights_dir: Path, key: str, summary: dict[str, Any], command: str) -> None:
    """Write ``summary`` (and ``command``) into the manifest of ``weights_dir`` at ``metrics.KEY``
    (dotted: nested), replacing what was there. ValueError for a malformed key, or one whose
    path runs through a figure that is not a table (``test_eer.x``)."""
    check_record_key(key)
    _, manifest = read(weights_dir)
    *parents, last = key.split(".")
    table = manifest.metrics
    for depth, name in enumerate(parents):
        table = table.setdefault(name, {})
        if not isinstance(table, dict):
            raise ValueError(f"--record {key!r}: metrics.{'.'.join(parents[: depth + 1])} is a figure, not a table")
    table[last] = {**summary, "command": command}
    write_manifest(weights_dir, manifest)
    log.info("recorded in %s: metrics.%s", weights_dir, key)


def _scale(r: dict[str, Any]) -> str:
    return "adaptive s-norm" if r.get("score") == "as-norm" else "cosine"


def format_open_set(r: dict[str, Any]) -> str:
    lines = [
        f"open-set split   {r['split']}: {r['clips']} clips of {r['voices']} voices never trained on "
        f"(at least {r['min_clips_per_voice']} per voice)",
        f"EER              {r['eer']:.4f} ({_scale(r)} threshold {r['eer_threshold']:.4f}), all pairs"
        + (f"; by the plain cosine {r['eer_cosine']:.4f}" if "eer_cosine" in r else ""),
        f"minDCF           {r['min_dcf']:.4f} (p_target {r['p_target']})",
        f"centroid acc.    {r['centroid_accuracy']:.4f} (leave-one-out nearest voice centroid)",
    ]
    if "flagged_unknown" in r:
        lines.append(f"flagged unknown  {r['flagged_unknown']:.4f} of these clips (none of the classes)")
    if "classes_flagged_unknown" in r:
        k = r["classes_flagged_unknown"]
        lines.append(f"                 {k['share']:.4f} of the classes' own {k['split']} clips ({k['clips']})")
    lines += ["", "per recording condition (EER: pairs with a clip in it; accuracy: its clips)"]
    for tag, row in r["per_condition"].items():
        eer = "n/a" if row["eer"] is None else f"{row['eer']:.4f}"
        lines.append(f"  {tag:<16} clips {row['clips']:>4}  EER {eer:>6}  centroid acc. {row['centroid_accuracy']:.4f}")
    return "\n".join(lines)


def format_report(summary: dict[str, Any], labels: list[str]) -> str:
    eer, threshold = summary["eer"], summary["eer_threshold"]
    eer_text = "n/a" if eer is None else f"{eer:.4f} (cosine threshold {threshold:.4f})"
    lines = [
        f"clips     {summary['clips']}",
        f"accuracy  {summary['accuracy']:.4f}",
        f"EER       {eer_text}",
        "",
        "per-class accuracy",
    ]
    for name, acc in summary["per_class_accuracy"].items():
        lines.append(f"  {name:<28} {'n/a' if acc is None else f'{acc:.4f}'}")
    width = max(4, *(len(str(v)) for row in summary["confusion_matrix"] for v in row))
    lines += ["", "confusion matrix (rows: true, columns: predicted, in label order)"]
    for name, row in zip(labels, summary["confusion_matrix"], strict=True):
        lines.append(f"  {name:<28} " + " ".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.training.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("weights_dir", type=Path)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument(
        "--split", help="test (default), val, train, all; with --open-set: open-test (default), open-val"
    )
    parser.add_argument("--open-set", action="store_true", help="the embedding on voices never trained on")
    parser.add_argument(
        "--identify", action="store_true", help="with --open-set: enrol 3 clips of every other voice, identify the rest"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--backend", default="torch", choices=list(BACKENDS))
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--parity", action="store_true", help="compare with the plain fp32 model")
    parser.add_argument(
        "--record", metavar="KEY", help="also write the result into WEIGHTS_DIR's manifest at metrics.KEY (dots nest)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    split = args.split or ("open-test" if args.open_set else "test")
    allowed = ["open-test", "open-val"] if args.open_set else ["train", "val", "test", "all"]
    if split not in allowed:
        parser.error(f"--split must be one of {', '.join(allowed)}")
    args.split = split
    try:
        check_record_key(args.record or "ok")  # before the evaluation, not after it
    except ValueError as exc:
        parser.error(str(exc))
    try:
        model = load(args.weights_dir).configure(args.precision, args.channels_last, args.backend)
        if args.parity:
            items = parity_items(args.data_dir, split)
            waves = load_waves(items, model.sample_rate, f"loading {split}")
            summary = parity(model, load(args.weights_dir), waves, [it.voice for it in items])
            summary["split"] = split
        elif args.open_set and args.identify:
            summary = evaluate_identification(model, args.data_dir, split)
        elif args.open_set:
            summary = evaluate_open_set(model, args.data_dir, split)
        else:
            summary = evaluate(model, args.data_dir, args.split)
        if args.record:
            record(args.weights_dir, args.record, summary, command_line("model.training.evaluate", argv))
    except (WeightsError, ValueError) as exc:
        log.error("error: %s", exc)
        return 2
    if args.json or args.parity or args.identify:
        text = json.dumps(summary, indent=2)
    else:
        text = format_open_set(summary) if args.open_set else format_report(summary, model.labels)
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
