"""The weights format: a directory with ``model.safetensors`` and ``manifest.json``.

The manifest carries everything needed to rebuild the network and its front end (architecture,
sizes, labels, feature config), the tensor file's sha256, and provenance and metrics when
known. :func:`read` checks all of it and refuses anything wrong with a one-line error that names
the file and the problem. How a loaded network runs (backends, precision, windows, batches) is
``model.runtime``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from model.features import FeatureConfig
from model.resnet import ARCHITECTURES, BasicBlock, ResNet, build

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TENSORS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
COHORT_FILE = "cohort.safetensors"  # the open-set check's background voices (Manifest.cohort)
COHORT_TENSOR = "embeddings"


class WeightsError(ValueError):
    """A weights directory or checkpoint that cannot be used, and why."""


@dataclass
class Manifest:
    architecture: str
    num_classes: int
    embedding_size: int
    labels: list[str]
    features: FeatureConfig
    sha256: str = ""
    verification_threshold: float | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    # Open-set: each class's mean normalised embedding (num_classes x embedding_size) and the
    # cosine to the nearest one below which a clip is none of the classes. Optional: weights
    # converted from a seed checkpoint have neither.
    class_centroids: list[list[float]] | None = None
    known_threshold: float | None = None
    # Optional, with the centroids: the mean embeddings (unit rows, voices x embedding_size) of
    # voices outside the classes that the network was trained on, in ``cohort.safetensors`` beside
    # the manifest. With them the known-voice score is the nearest centroid's cosine less the mean
    # cosine of the ``known_cohort["top"]`` nearest of these voices (``model.runtime.open_set_scores``).
    # ``known_cohort`` is the manifest's entry (file, sha256, voices, top); ``cohort`` the tensor,
    # read by :func:`read` and written by :func:`write_manifest`, never part of the JSON.
    known_cohort: dict[str, Any] | None = None
    cohort: Tensor | None = field(default=None, repr=False, compare=False)
    # Optional, with the cohort: verification scores are adaptive s-norm scores against the
    # ``verification_norm["top"]`` nearest background voices of each side (``model.runtime.as_norm``),
    # and ``verification_threshold`` is on that scale rather than a cosine.
    verification_norm: dict[str, Any] | None = None
    # Optional, on the verification score's scale: /identify answers a speaker only at or above it
    # (at least the verification threshold), set so that few clips of voices never enrolled are
    # given a name; without it /identify uses ``verification_threshold``.
    identify_threshold: float | None = None
    # Optional int8 model made from these weights by ``python -m model.training.quantize``: an
    # OpenVINO IR (``model``: .xml, ``weights``: .bin, beside the manifest) named with their
    # sha256s, the sha256 of the tensors it was made from, and what the quantisation measured.
    int8: dict[str, Any] | None = None

    @property
    def sample_rate(self) -> int:
        return self.features.sample_rate

    @property
    def name(self) -> str:
        return str(self.provenance.get("name", self.architecture))

    @property
    def version(self) -> str:
        return str(self.provenance.get("version", self.sha256[:12]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "architecture": self.architecture,
            "num_classes": self.num_classes,
            "embedding_size": self.embedding_size,
            "labels": list(self.labels),
            "sample_rate": self.sample_rate,
            "features": self.features.to_dict(),
            "sha256": self.sha256,
            "verification_threshold": self.verification_threshold,
            "known_threshold": self.known_threshold,
            "class_centroids": self.class_centroids,
            **({"known_cohort": self.known_cohort} if self.known_cohort is not None else {}),
            **({"verification_norm": self.verification_norm} if self.verification_norm is not None else {}),
            **({"identify_threshold": self.identify_threshold} if self.identify_threshold is not None else {}),
            "provenance": self.provenance,
            "metrics": self.metrics,
            **({"int8": self.int8} if self.int8 is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        """Validate a parsed manifest; raises ValueError naming the first problem."""
        if not isinstance(data, dict):
            raise ValueError("top level must be a JSON object")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"format_version {version!r} is not supported (expected {FORMAT_VERSION})")
        required = ["architecture", "num_classes", "embedding_size", "labels", "features", "sha256"]
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"missing fields: {', '.join(missing)}")
        arch = data["architecture"]
        if not isinstance(arch, str) or arch.lower() not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
        for key in ("num_classes", "embedding_size"):
            if not isinstance(data[key], int) or isinstance(data[key], bool) or data[key] < 1:
                raise ValueError(f"{key} must be a positive integer, got {data[key]!r}")
        labels = data["labels"]
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise ValueError("labels must be a list of strings")
        if len(labels) != data["num_classes"]:
            raise ValueError(f"{len(labels)} labels for num_classes={data['num_classes']}")
        if len(set(labels)) != len(labels):
            raise ValueError("labels are not unique")
        if not isinstance(data["features"], dict):
            raise ValueError("features must be an object")
        features = FeatureConfig.from_dict(data["features"])
        if "sample_rate" in data and data["sample_rate"] != features.sample_rate:
            raise ValueError(
                f"sample_rate {data['sample_rate']} disagrees with features.sample_rate {features.sample_rate}"
            )
        cohort = data.get("known_cohort")
        if cohort is not None:
            _check_cohort(cohort, data.get("class_centroids") is not None)
        norm = data.get("verification_norm")
        if norm is not None:
            _check_norm(norm, cohort)
        # a cosine, or with adaptive s-norm a normalised score (a few standard deviations)
        threshold = _cosine_or_none(data, "verification_threshold", 1 if norm is None else AS_NORM_BOUND)
        identify = _cosine_or_none(data, "identify_threshold", 1 if norm is None else AS_NORM_BOUND)
        if identify is not None and (threshold is None or identify < threshold):
            raise ValueError("identify_threshold needs a verification_threshold at or below it")
        # a cosine, or with a cohort a difference of two cosines
        known_threshold = _cosine_or_none(data, "known_threshold", 1 if cohort is None else 2)
        centroids = data.get("class_centroids")
        if centroids is not None:
            rows_ok = isinstance(centroids, list) and len(centroids) == data["num_classes"]
            if not rows_ok or not all(
                isinstance(row, list)
                and len(row) == data["embedding_size"]
                and all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in row)
                for row in centroids
            ):
                raise ValueError(
                    f"class_centroids must be {data['num_classes']} rows of {data['embedding_size']} finite numbers"
                )
        if (centroids is None) != (known_threshold is None):
            raise ValueError("class_centroids and known_threshold go together")
        int8 = data.get("int8")
        if int8 is not None:
            _check_int8(int8)
        return cls(
            architecture=arch.lower(),
            num_classes=data["num_classes"],
            embedding_size=data["embedding_size"],
            labels=labels,
            features=features,
            sha256=str(data["sha256"]),
            verification_threshold=threshold,
            provenance=dict(data.get("provenance") or {}),
            metrics=dict(data.get("metrics") or {}),
            class_centroids=None if centroids is None else [[float(x) for x in row] for row in centroids],
            known_threshold=known_threshold,
            known_cohort=None if cohort is None else dict(cohort),
            verification_norm=None if norm is None else dict(norm),
            identify_threshold=identify,
            int8=None if int8 is None else dict(int8),
        )


INT8_FILES = {"model": ".xml", "weights": ".bin"}


def _check_cohort(entry: Any, has_centroids: bool) -> None:
    if not isinstance(entry, dict):
        raise ValueError("known_cohort must be an object")
    if not has_centroids:
        raise ValueError("known_cohort needs class_centroids")
    if entry.get("file") != COHORT_FILE:
        raise ValueError(f"known_cohort.file must be {COHORT_FILE!r} (beside the manifest), got {entry.get('file')!r}")
    digest = entry.get("sha256")
    if not isinstance(digest, str) or len(digest) != 64:
        raise ValueError("known_cohort.sha256 must be a sha256 hex digest")
    voices, top = entry.get("voices"), entry.get("top")
    for key, value in (("voices", voices), ("top", top)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"known_cohort.{key} must be a positive integer, got {value!r}")
    assert isinstance(voices, int) and isinstance(top, int)
    if top > voices:
        raise ValueError(f"known_cohort.top ({top}) is more than its {voices} voices")


AS_NORM_BOUND = 1000.0  # verification scores under adaptive s-norm: finite, unlike a cosine not in [-1, 1]


def _check_norm(entry: Any, cohort: Any) -> None:
    if not isinstance(entry, dict) or entry.get("method") != "as-norm":
        raise ValueError('verification_norm must be {"method": "as-norm", "top": N}')
    if cohort is None:
        raise ValueError("verification_norm needs known_cohort (its background voices)")
    top = entry.get("top")
    if not isinstance(top, int) or isinstance(top, bool) or not 2 <= top <= cohort["voices"]:
        raise ValueError(f"verification_norm.top must be an integer from 2 to {cohort['voices']}, got {top!r}")


def read_cohort(root: Path, manifest: Manifest) -> Tensor | None:
    """The background voices the manifest names (as stored: float16), checked against its sha256 and
    shape; None for weights without them. Raises :class:`WeightsError`."""
    entry = manifest.known_cohort
    if entry is None:
        return None
    path = root / COHORT_FILE
    _check_file(path, entry["sha256"], "the manifest's known_cohort")
    cohort = _load_tensors(path).get(COHORT_TENSOR)
    shape = (entry["voices"], manifest.embedding_size)
    if cohort is None or tuple(cohort.shape) != shape or not bool(cohort.float().isfinite().all()):
        raise WeightsError(f"{path}: expected a finite {COHORT_TENSOR!r} tensor of shape {shape}")
    return cohort


def _check_int8(entry: Any) -> None:
    if not isinstance(entry, dict):
        raise ValueError("int8 must be an object")
    for key, suffix in INT8_FILES.items():
        name = entry.get(key)
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(suffix):
            raise ValueError(f"int8.{key} must be a file name ending in {suffix} (beside the manifest), got {name!r}")
        digest = entry.get(f"{key}_sha256")
        if not isinstance(digest, str) or len(digest) != 64:
            raise ValueError(f"int8.{key}_sha256 must be a sha256 hex digest")
    if not isinstance(entry.get("source_sha256"), str):
        raise ValueError("int8.source_sha256 (the tensors the int8 model was made from) is missing")


def int8_model_path(root: Path | None, manifest: Manifest) -> Path:
    """The int8 model's .xml, after checking that both its files are the ones the manifest names
    and that it was made from these weights. Raises :class:`WeightsError` saying what to do."""
    entry = manifest.int8
    where = "these weights" if root is None else str(root)
    if entry is None or root is None:
        raise WeightsError(
            f"{where}: no int8 model (PRECISION=int8 needs one): make it with "
            "`python -m model.training.quantize WEIGHTS_DIR DATA_DIR`"
        )
    if entry["source_sha256"] != manifest.sha256:
        raise WeightsError(f"{root}: the int8 model was made from other weights; quantize these again")
    for key in INT8_FILES:
        _check_file(root / entry[key], entry[f"{key}_sha256"], "the manifest's int8 model")
    return root / str(entry["model"])


def _cosine_or_none(data: dict[str, Any], key: str, bound: float = 1) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not -bound <= value <= bound:
        what = "a cosine" if bound == 1 else "a difference of cosines" if bound == 2 else "a normalised score"
        raise ValueError(f"{key} must be {what} in [-{bound:g}, {bound:g}], got {value!r}")
    return float(value)


def replace_file(path: Path, write: Callable[[Path], object]) -> None:
    """Write ``path`` whole or not at all: ``write`` fills ``path.with_suffix(".tmp")``, which then
    replaces ``path`` (one rename on the same file system); on an error the temporary file goes and
    ``path`` stays as it was. Manifests, cohorts, checkpoints and the corpus record use it, so a
    run killed midway never leaves half a file that a resume or the service would read."""
    tmp = path.with_suffix(".tmp")
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


def _save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    """``safetensors.torch.save_file``, with the permissions any other file gets: it creates
    files readable by their owner only, which a service running as another user cannot read."""
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def _check_file(path: Path, sha256: str, what: str) -> None:
    """Raise :class:`WeightsError` unless ``path`` (the manifest's ``what``) exists with ``sha256``."""
    if not path.is_file():
        raise WeightsError(f"{path}: missing ({what})")
    actual = file_sha256(path)
    if actual != sha256:
        raise WeightsError(
            f"{path}: sha256 does not match the manifest ({actual[:16]}... against {sha256[:16]}...; "
            "file corrupted or replaced)"
        )


def _load_tensors(path: Path) -> dict[str, Tensor]:
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except (safetensors.SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: unreadable safetensors file ({exc})") from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_state_dict_into(network: ResNet, state_dict: Mapping[str, Tensor], source: str) -> None:
    """Strict key and shape check, then load. Accepts ``module.`` prefixes and both BasicBlock
    projection names (``downsample`` and ``shortcut``)."""
    sd = dict(state_dict)
    consume_prefix_in_state_dict_if_present(sd, "module.")
    sd = {k.replace(".shortcut.", ".downsample.") if _is_basic(network, k) else k: v for k, v in sd.items()}
    expected = network.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [
        f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and tuple(sd[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_first(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches ({_first(wrong)})")
    if problems:
        raise WeightsError(f"{source}: does not fit the network: " + "; ".join(problems))
    network.load_state_dict(sd, strict=True)


def _is_basic(network: ResNet, key: str) -> bool:
    return ".shortcut." in key and isinstance(network.layer1[0], BasicBlock)


def _first(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def save(
    network: ResNet,
    out_dir: str | Path,
    *,
    architecture: str,
    labels: list[str],
    features: FeatureConfig,
    verification_threshold: float | None = None,
    provenance: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    class_centroids: Tensor | None = None,
    known_threshold: float | None = None,
    cohort: Tensor | None = None,
    cohort_top: int | None = None,
    verification_norm: dict[str, Any] | None = None,
    identify_threshold: float | None = None,
) -> Manifest:
    """Write ``network`` as a weights directory; returns the manifest written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    tensors = out / TENSORS_FILE
    _save_tensors(state, tensors)
    manifest = Manifest(
        architecture=architecture.lower(),
        num_classes=network.linear.out_features,
        embedding_size=network.fc.out_features,
        labels=list(labels),
        features=features,
        sha256=file_sha256(tensors),
        verification_threshold=verification_threshold,
        provenance=provenance or {},
        metrics=metrics or {},
        class_centroids=None
        if class_centroids is None
        else [[round(float(x), 6) for x in row] for row in class_centroids],
        known_threshold=known_threshold,
        known_cohort=None if cohort is None else {"top": cohort_top},
        cohort=cohort,
        verification_norm=verification_norm,
        identify_threshold=identify_threshold,
    )
    write_manifest(out, manifest)
    return manifest


def write_manifest(out_dir: str | Path, manifest: Manifest) -> None:
    """Write ``manifest.json``, refusing what :func:`load` would refuse; with ``manifest.cohort``,
    write it as ``cohort.safetensors`` (float16) first and name it in the manifest."""
    out = Path(out_dir)
    cohort_path = out / COHORT_FILE
    if manifest.cohort is not None:
        entry = dict(manifest.known_cohort or {})
        stored = manifest.cohort.detach().cpu().to(torch.float16).contiguous()

        def write_cohort(tmp: Path) -> None:
            _save_tensors({COHORT_TENSOR: stored}, tmp)
            entry.update(file=COHORT_FILE, sha256=file_sha256(tmp), voices=int(stored.shape[0]))
            Manifest.from_dict({**manifest.to_dict(), "known_cohort": entry})  # refuse before replacing anything

        replace_file(cohort_path, write_cohort)
        manifest.known_cohort, manifest.cohort = entry, stored
    elif manifest.known_cohort is not None:
        if not cohort_path.is_file() or file_sha256(cohort_path) != manifest.known_cohort.get("sha256"):
            raise ValueError(f"{cohort_path}: the manifest's known_cohort is not there (no cohort tensor to write)")
    elif cohort_path.is_file():
        cohort_path.unlink()  # recalibrated without background voices: do not leave a stale file
    Manifest.from_dict(manifest.to_dict())
    replace_file(out / MANIFEST_FILE, lambda tmp: tmp.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n"))


def read_manifest(path: str | Path) -> Manifest:
    """Read and check a weights directory's manifest alone (no tensors loaded, no cohort).
    Raises :class:`WeightsError` naming the file and the problem."""
    root = Path(path)
    if not root.is_dir():
        raise WeightsError(f"{root}: not a weights directory (expected {TENSORS_FILE} + {MANIFEST_FILE})")
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        raise WeightsError(f"{manifest_path}: missing")
    try:
        raw = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{manifest_path}: not valid JSON ({exc})") from None
    try:
        return Manifest.from_dict(raw)
    except ValueError as exc:
        raise WeightsError(f"{manifest_path}: {exc}") from None


def read(path: str | Path) -> tuple[ResNet, Manifest]:
    """Read and check a weights directory: the network with its weights loaded, and the manifest.
    Raises :class:`WeightsError` naming the file and the problem."""
    root = Path(path)
    tensors_path = root / TENSORS_FILE
    if root.is_dir() and (root / MANIFEST_FILE).is_file() and not tensors_path.is_file():
        raise WeightsError(f"{tensors_path}: missing")
    manifest = read_manifest(root)
    _check_file(tensors_path, manifest.sha256, "the manifest's tensors")
    state = _load_tensors(tensors_path)
    network = build(manifest.architecture, manifest.num_classes, manifest.embedding_size)
    load_state_dict_into(network, state, f"{tensors_path} (architecture {manifest.architecture!r})")
    manifest.cohort = read_cohort(root, manifest)
    log.info("loaded %s (%s, sha256 %s)", root, manifest.architecture, manifest.sha256[:12])
    return network, manifest
