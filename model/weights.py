"""The weights format: a directory with ``model.safetensors`` and ``manifest.json``.

The manifest carries everything needed to rebuild the network and its front end (architecture,
sizes, labels, feature config), the tensor file's sha256, and provenance and metrics when
known. :func:`load` checks all of it and refuses anything wrong with a one-line error that names
the file and the problem.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from model.audio import Audio, to_mono
from model.features import FeatureConfig, LogMelSpectrogram
from model.resnet import ARCHITECTURES, BasicBlock, ResNet, build

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TENSORS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"


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
            "provenance": self.provenance,
            "metrics": self.metrics,
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
        threshold = _cosine_or_none(data, "verification_threshold")
        known_threshold = _cosine_or_none(data, "known_threshold")
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
        )


def _cosine_or_none(data: dict[str, Any], key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not -1 <= value <= 1:
        raise ValueError(f"{key} must be a cosine in [-1, 1], got {value!r}")
    return float(value)


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
) -> Manifest:
    """Write ``network`` as a weights directory; returns the manifest written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    tensors = out / TENSORS_FILE
    safetensors.torch.save_file(state, str(tensors), metadata={"format": "pt"})
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
    )
    write_manifest(out, manifest)
    return manifest


def write_manifest(out_dir: str | Path, manifest: Manifest) -> None:
    """Write ``manifest.json``, refusing what :func:`load` would refuse."""
    Manifest.from_dict(manifest.to_dict())
    path = Path(out_dir) / MANIFEST_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    tmp.replace(path)


@dataclass
class Inference:
    logits: Tensor  # (num_classes,)
    embedding: Tensor  # (embedding_size,)
    windows: int  # how many windows were averaged

    @property
    def probabilities(self) -> Tensor:
        return F.softmax(self.logits, dim=-1)


PRECISIONS = ("auto", "fp32", "bf16")


def bf16_native() -> bool:
    """True where oneDNN runs bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated
    and several times slower than fp32."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _resolve(what: str, value: str, choices: tuple[str, ...], auto: Callable[[], str]) -> str:
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(choices)}, not {value!r}")
    return auto() if value == "auto" else value


def resolve_precision(precision: str) -> str:
    """``auto`` -> ``bf16`` where the CPU has native bf16, else ``fp32``."""
    return _resolve("precision", precision, PRECISIONS, lambda: "bf16" if bf16_native() else "fp32")


BACKENDS = ("auto", "torch", "openvino")


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def resolve_backend(backend: str) -> str:
    """``auto`` -> ``openvino`` where it is installed, else ``torch``."""
    return _resolve("backend", backend, BACKENDS, lambda: "openvino" if openvino_available() else "torch")


# OpenVINO's CPU plugin keeps a prepared executor per input shape, 5000 by default: with every
# upload length a new shape, that grew RSS by about 1 MB per new length (300 random lengths:
# +300 MB and rising); 32 kept it flat after the first 100 and still holds every batch size
# of a few common lengths.
OPENVINO_SHAPE_CACHE = 32


class OpenVINONetwork:
    """The network compiled by OpenVINO's CPU plugin, called like ``ResNet``: log-mel features
    ``(B, 1, n_mels, T)`` -> ``(logits, embedding)``. Batch and time are dynamic. Converted from the
    loaded PyTorch module in memory (no file is written or read), so it computes exactly what the
    weights define; ``precision`` is its inference precision hint (fp32 keeps fp32 everywhere)."""

    def __init__(self, network: ResNet, n_mels: int, precision: str, threads: int) -> None:
        import openvino as ov

        batch, frames = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("frames", min=16, max=10**6)
        exported = torch.export.export(
            network, (torch.zeros(2, 1, n_mels, 200),), dynamic_shapes=({0: batch, 3: frames},)
        )
        converted = ov.convert_model(exported)
        config = {
            "CPU_RUNTIME_CACHE_CAPACITY": OPENVINO_SHAPE_CACHE,
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        }
        self._request = ov.Core().compile_model(converted, "CPU", config).create_infer_request()
        self._lock = threading.Lock()  # one infer request: one call at a time

    def __call__(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        with self._lock:
            out = self._request.infer({0: feats.contiguous().numpy()})
            # the request reuses its output buffers: copy before the next call
            return torch.tensor(out[0]), torch.tensor(out[1])


class EmbeddingModel:
    """A loaded, checked model: network in eval mode, its front end and its manifest.

    :meth:`configure` picks the execution: the backend (PyTorch eager, or the network compiled
    by OpenVINO), ``fp32`` or ``bf16`` (autocast in PyTorch; the front end always runs in fp32)
    and, for PyTorch, channels-last memory layout. Results are fp32 whatever the precision.
    """

    def __init__(self, network: ResNet, manifest: Manifest) -> None:
        self.network = network.eval()
        self.manifest = manifest
        self.features = LogMelSpectrogram(manifest.features).eval()
        self.precision = "fp32"
        self.channels_last = False
        self.backend = "torch"
        self._compiled: OpenVINONetwork | None = None
        self._centroids: Tensor | None = None

    def configure(self, precision: str = "fp32", channels_last: bool = False, backend: str = "torch") -> EmbeddingModel:
        self.precision = resolve_precision(precision)
        self.backend = resolve_backend(backend)
        self.channels_last = channels_last and self.backend == "torch"
        self.network.to(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        self._compiled = None
        if self.backend == "openvino":
            started = time.perf_counter()
            self._compiled = OpenVINONetwork(
                self.network, self.manifest.features.n_mels, self.precision, torch.get_num_threads()
            )
            log.info("compiled for OpenVINO in %.1f s", time.perf_counter() - started)
        return self

    @property
    def sample_rate(self) -> int:
        return self.manifest.sample_rate

    @property
    def labels(self) -> list[str]:
        return self.manifest.labels

    def nearest_class(self, embedding: Tensor) -> tuple[int, float, bool] | None:
        """Open-set check: the class whose centroid is nearest by cosine, that cosine, and whether
        it reaches the calibrated ``known_threshold`` (False: the voice is none of the classes).
        None for weights without centroids."""
        m = self.manifest
        if m.class_centroids is None or m.known_threshold is None:
            return None
        if self._centroids is None:
            self._centroids = F.normalize(torch.tensor(m.class_centroids, dtype=torch.float32), dim=-1)
        scores = self._centroids @ F.normalize(embedding.float().reshape(-1), dim=0)
        best = int(scores.argmax())
        return best, float(scores[best]), float(scores[best]) >= m.known_threshold

    def prepare(self, audio: Audio) -> Tensor:
        """Decoded audio (any rate, any channel count) -> mono waveform at the model's rate."""
        return to_mono(audio, self.sample_rate)

    @torch.inference_mode()
    def forward_batch(self, waves: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, samples)`` at the model's rate -> ``(logits (B, C), embedding (B, E))`` in fp32."""
        feats = self.features(waves)  # (B, 1, n_mels, T), fp32
        if self._compiled is not None:
            return self._compiled(feats)
        if self.channels_last:
            feats = feats.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            logits, emb = self.network(feats)
        return logits.float(), emb.float()

    def windows(self, wave: Tensor, window_s: float) -> Tensor:
        """Split a clip into equal windows of at most ``window_s``: ``(n, samples)``."""
        window = max(1, int(window_s * self.sample_rate))
        n = max(1, math.ceil(wave.shape[-1] / window))
        length = wave.shape[-1] // n
        return wave[: n * length].reshape(n, length)

    @torch.inference_mode()
    def spectrogram(self, wave: Tensor, window_s: float = 20.0) -> Tensor:
        """The log-mel features the network sees for a clip's first window: ``(n_mels, frames)``."""
        return self.features(self.windows(wave, window_s)[0])[0, 0]

    @torch.inference_mode()
    def infer_many(self, waves: list[Tensor], window_s: float = 20.0, batch_windows: int = 4) -> list[Inference]:
        """Clips at the model's rate -> per clip, logits and embedding averaged over its windows.

        Each clip is cut into equal windows of at most ``window_s``. Windows of the same length,
        from one clip or several, share a forward pass of at most ``batch_windows``; windows of
        different lengths never do, so no padding ever enters a result, and memory is bounded by
        ``window_s * batch_windows`` whatever the clips' lengths.
        """
        chunks = [self.windows(w, window_s) for w in waves]  # each (n_i, S_i)
        by_length: dict[int, list[tuple[int, Tensor]]] = {}
        for i, c in enumerate(chunks):
            for row in c:
                by_length.setdefault(row.shape[-1], []).append((i, row))
        logits_sum = [torch.zeros(self.manifest.num_classes) for _ in waves]
        emb_sum = [torch.zeros(self.manifest.embedding_size) for _ in waves]
        for group in by_length.values():
            for start in range(0, len(group), batch_windows):
                part = group[start : start + batch_windows]
                logits, emb = self.forward_batch(torch.stack([row for _, row in part]))  # (B, C), (B, E)
                for k, (i, _) in enumerate(part):
                    logits_sum[i] += logits[k]
                    emb_sum[i] += emb[k]
        return [
            Inference(logits=lg / c.shape[0], embedding=em / c.shape[0], windows=c.shape[0])
            for lg, em, c in zip(logits_sum, emb_sum, chunks, strict=True)
        ]

    def infer(self, wave: Tensor, window_s: float = 20.0, batch_windows: int = 4) -> Inference:
        """One clip at the model's rate -> logits and embedding averaged over its windows."""
        return self.infer_many([wave], window_s, batch_windows)[0]


def load(path: str | Path) -> EmbeddingModel:
    """Load and check a weights directory. Raises :class:`WeightsError` naming file and problem."""
    root = Path(path)
    if not root.is_dir():
        raise WeightsError(f"{root}: not a weights directory (expected {TENSORS_FILE} + {MANIFEST_FILE})")
    manifest_path, tensors_path = root / MANIFEST_FILE, root / TENSORS_FILE
    for p in (manifest_path, tensors_path):
        if not p.is_file():
            raise WeightsError(f"{p}: missing")
    try:
        raw = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{manifest_path}: not valid JSON ({exc})") from None
    try:
        manifest = Manifest.from_dict(raw)
    except ValueError as exc:
        raise WeightsError(f"{manifest_path}: {exc}") from None
    actual = file_sha256(tensors_path)
    if actual != manifest.sha256:
        raise WeightsError(
            f"{tensors_path}: sha256 {actual[:16]}... does not match the manifest's {manifest.sha256[:16]}... "
            "(file corrupted or replaced)"
        )
    try:
        state = safetensors.torch.load_file(str(tensors_path), device="cpu")
    except (safetensors.SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{tensors_path}: unreadable safetensors file ({exc})") from None
    network = build(manifest.architecture, manifest.num_classes, manifest.embedding_size)
    load_state_dict_into(network, state, f"{tensors_path} (architecture {manifest.architecture!r})")
    log.info("loaded %s (%s, sha256 %s)", root, manifest.architecture, manifest.sha256[:12])
    return EmbeddingModel(network, manifest)
