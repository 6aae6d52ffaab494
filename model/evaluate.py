"""Evaluate a weights directory on any labelled audio folder.

    python -m model.evaluate WEIGHTS_DIR DATA_DIR [--split test|val|train|all] [--json]
        [--backend torch|openvino|auto] [--precision auto|fp32|bf16] [--channels-last] [--parity]

Prints accuracy, per-class accuracy, same/different-voice EER and the confusion matrix.
``--parity`` also runs the plain fp32 model and reports how often the chosen execution's top-1
agrees with it and the cosine between their embeddings.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from model.data import load_waves, scan
from model.metrics import summarise
from model.weights import BACKENDS, PRECISIONS, EmbeddingModel, WeightsError, load

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
def parity(model: EmbeddingModel, reference: EmbeddingModel, waves: list[torch.Tensor]) -> dict[str, Any]:
    """How closely ``model`` (e.g. bf16, channels-last) follows ``reference`` (fp32) on ``waves``."""
    fast = [model.infer(w) for w in waves]
    ref = [reference.infer(w) for w in waves]
    agree = [int(f.logits.argmax()) == int(r.logits.argmax()) for f, r in zip(fast, ref, strict=True)]
    cos = [float(F.cosine_similarity(f.embedding, r.embedding, dim=0)) for f, r in zip(fast, ref, strict=True)]
    return {
        "execution": {"backend": model.backend, "precision": model.precision, "channels_last": model.channels_last},
        "clips": len(waves),
        "top1_agreement": sum(agree) / len(agree),
        "min_cosine": min(cos),
        "mean_cosine": sum(cos) / len(cos),
    }


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
    parser = argparse.ArgumentParser(prog="python -m model.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("weights_dir", type=Path)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--backend", default="torch", choices=list(BACKENDS))
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--parity", action="store_true", help="compare with the plain fp32 model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        model = load(args.weights_dir).configure(args.precision, args.channels_last, args.backend)
        if args.parity:
            waves, _ = load_split(model, args.data_dir, args.split)
            summary = parity(model, load(args.weights_dir), waves)
        else:
            summary = evaluate(model, args.data_dir, args.split)
    except (WeightsError, ValueError) as exc:
        log.error("error: %s", exc)
        return 2
    text = json.dumps(summary, indent=2) if args.json or args.parity else format_report(summary, model.labels)
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
