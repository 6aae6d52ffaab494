"""Turn a seed-style PyTorch checkpoint (``.pt``) into a weights directory.

    python -m model.convert CHECKPOINT OUT_DIR --arch resnet18 [--labels a,b,...] [feature options]

The checkpoint is read with ``torch.load(weights_only=True)``: tensors and plain containers only,
never arbitrary pickled objects.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import pickle
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.features import FeatureConfig
from model.resnet import ARCHITECTURES, build
from model.weights import Manifest, WeightsError, load_state_dict_into, save

log = logging.getLogger(__name__)

EXPORT_HINT = "save only the weights instead: torch.save(model.state_dict(), 'model.pt') in the code that trained it"


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """A state_dict, or a dict holding one under ``state_dict`` or ``model``, read safely."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if "Unsupported global" in str(exc) or "weights_only" in str(exc):
            raise WeightsError(
                f"{path}: holds pickled Python objects (such as a whole model), which are never "
                f"unpickled here; {EXPORT_HINT}"
            ) from None
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({first})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({first})") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(
            f"{path}: expected a state_dict (names -> tensors), or a dict holding one under "
            f"'state_dict' or 'model'; {EXPORT_HINT}"
        )
    return obj


def convert(
    checkpoint: str | Path,
    out_dir: str | Path,
    arch: str,
    labels: list[str] | None = None,
    features: FeatureConfig | None = None,
    embedding_size: int | None = None,
    verification_threshold: float | None = None,
) -> Manifest:
    state = read_checkpoint(checkpoint)
    stripped = {k.removeprefix("module."): v for k, v in state.items()}
    num_classes = stripped["linear.weight"].shape[0] if "linear.weight" in stripped else 9
    emb = embedding_size or (stripped["fc.weight"].shape[0] if "fc.weight" in stripped else 256)
    if labels is None:
        labels = [f"class_{i}" for i in range(num_classes)]
    if len(labels) != num_classes:
        raise WeightsError(f"{checkpoint}: {len(labels)} labels given for a {num_classes}-class classifier")
    network = build(arch, num_classes=num_classes, embedding_size=emb)
    load_state_dict_into(network, state, f"{checkpoint} (architecture {arch!r})")
    return save(
        network,
        out_dir,
        architecture=arch,
        labels=labels,
        features=features or FeatureConfig(),
        verification_threshold=verification_threshold,
        provenance={"converted_from": Path(checkpoint).name},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--arch", required=True, choices=sorted(ARCHITECTURES))
    parser.add_argument("--labels", help="comma-separated class labels in index order")
    parser.add_argument("--threshold", type=float, help="calibrated verification cosine threshold")
    defaults = FeatureConfig()
    for f in dataclasses.fields(FeatureConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(
                flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=getattr(defaults, f.name)
            )
        else:
            kind = int if isinstance(getattr(defaults, f.name), int) else float
            parser.add_argument(
                flag, type=kind, default=getattr(defaults, f.name), help=f"default {getattr(defaults, f.name)}"
            )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        features = FeatureConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FeatureConfig)})
        labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
        manifest = convert(args.checkpoint, args.out_dir, args.arch, labels, features, None, args.threshold)
    except (WeightsError, ValueError) as exc:
        log.error("error: %s", exc)
        return 2
    log.info("wrote %s (%s, sha256 %s)", args.out_dir, manifest.architecture, manifest.sha256)
    return 0


if __name__ == "__main__":
    sys.exit(main())
