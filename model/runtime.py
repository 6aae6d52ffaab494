"""The runtime: a loaded network run on clips (backends, precision, windowing and batching).

:class:`EmbeddingModel` holds the network, its front end and its manifest; :meth:`~EmbeddingModel.configure`
picks PyTorch eager or OpenVINO, fp32 or bf16, and channels-last; :meth:`~EmbeddingModel.infer_many`
cuts clips into equal windows, batches windows of equal length and averages each clip's results.
:func:`load` reads a weights directory (``model.weights``) into one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
import platform
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from model.audio import Audio, to_mono
from model.features import LogMelSpectrogram
from model.resnet import ResNet
from model.weights import Manifest, int8_model_path, read

log = logging.getLogger(__name__)


@dataclass
class Inference:
    logits: Tensor  # (num_classes,)
    embedding: Tensor  # (embedding_size,)
    windows: int  # how many windows were averaged

    @property
    def probabilities(self) -> Tensor:
        return F.softmax(self.logits, dim=-1)


PRECISIONS = ("auto", "fp32", "bf16", "int8")  # auto never picks int8: it is opt-in


def bf16_native() -> bool:
    """True where oneDNN runs bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated
    and several times slower than fp32."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def machine() -> dict[str, Any]:
    """The machine a figure was measured on: CPU model, with its family and model numbers (2-core
    machines that all call themselves "AMD EPYC" train at speeds more than 2x apart, docs/training.md),
    cores, the instruction set PyTorch uses (``AVX2`` or ``AVX512``), whether bf16 runs in
    hardware, and the software versions."""
    first: dict[str, str] = {}  # the first processor's block of /proc/cpuinfo
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            first[key.strip()] = value.strip()
    except OSError:
        pass
    return {
        "cpu": first.get("model name", platform.processor() or platform.machine()),
        "cpu_family": first.get("cpu family"),
        "cpu_model": first.get("model"),
        "cores": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_native": bf16_native(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


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


def to_openvino(network: ResNet, n_mels: int) -> Any:
    """The network as an OpenVINO model (``openvino.Model``), converted in memory from the loaded
    PyTorch module (no file is written or read), with dynamic batch and time."""
    import openvino as ov

    batch, frames = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("frames", min=16, max=10**6)
    exported = torch.export.export(network, (torch.zeros(2, 1, n_mels, 200),), dynamic_shapes=({0: batch, 3: frames},))
    return ov.convert_model(exported)


def cached_openvino(network: ResNet, manifest: Manifest, cache_dir: Path | None) -> Any:
    """:func:`to_openvino`, kept in ``cache_dir`` as OpenVINO IR (XML and raw tensors, nothing
    pickled) under a key of everything the conversion depends on: the weights' sha256, the
    network's source, the front end's bands, and the torch and OpenVINO versions. Converting
    takes about 5 s, reading the IR back a few milliseconds. Without ``cache_dir``, or where it
    cannot be written, the network is converted every time."""
    if cache_dir is None:
        return to_openvino(network, manifest.features.n_mels)
    import openvino as ov

    source = Path(__file__).with_name("resnet.py").read_bytes()
    parts = [manifest.sha256, hashlib.sha256(source).hexdigest(), str(manifest.features.n_mels), torch.__version__,
             ov.__version__]  # fmt: skip
    key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]
    xml = cache_dir / key / "network.xml"
    if xml.is_file():
        try:
            return ov.Core().read_model(str(xml))
        except RuntimeError as exc:  # a damaged cache entry: convert again and replace it
            log.warning("OpenVINO cache entry %s unreadable (%s); converting again", xml.parent, exc)
    ov_model = to_openvino(network, manifest.features.n_mels)
    tmp: str | None = None
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache_dir, prefix=".converting-")
        ov.save_model(ov_model, str(Path(tmp) / "network.xml"), compress_to_fp16=False)
        shutil.rmtree(xml.parent, ignore_errors=True)
        os.replace(tmp, xml.parent)  # a whole entry appears at once (replicas may start together)
        tmp = None
    except OSError as exc:
        log.warning("cannot keep the converted network in %s (%s); it is converted at every start", cache_dir, exc)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return ov_model


def compile_openvino(ov_model: Any, precision: str, threads: int) -> Any:
    """An OpenVINO model compiled for the CPU: ``precision`` is the inference precision hint of
    the layers that are not quantised (fp32 keeps them fp32; an int8 model's quantised layers run
    in int8 whatever the hint)."""
    import openvino as ov

    config = {
        "CPU_RUNTIME_CACHE_CAPACITY": OPENVINO_SHAPE_CACHE,
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
    }
    return ov.Core().compile_model(ov_model, "CPU", config)


class OpenVINONetwork:
    """A network compiled by OpenVINO's CPU plugin, called like ``ResNet``: log-mel features
    ``(B, 1, n_mels, T)`` -> ``(logits, embedding)``. Batch and time are dynamic. ``ov_model`` is
    the network converted in memory (:func:`to_openvino`), so it computes exactly what the weights
    define, or the int8 model that ``python -m model.training.quantize`` made from them."""

    def __init__(self, ov_model: Any, precision: str, threads: int) -> None:
        self._request = compile_openvino(ov_model, precision, threads).create_infer_request()
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

    def __init__(self, network: ResNet, manifest: Manifest, root: Path | None = None) -> None:
        self.network = network.eval()
        self.manifest = manifest
        self.root = root  # the weights directory, where an int8 model lives
        self.features = LogMelSpectrogram(manifest.features).eval()
        self.precision = "fp32"
        self.channels_last = False
        self.backend = "torch"
        self._compiled: OpenVINONetwork | None = None
        self._unit: dict[str, tuple[Any, Tensor]] = {}  # manifest rows -> (those rows, as unit rows)

    def configure(
        self,
        precision: str = "fp32",
        channels_last: bool = False,
        backend: str = "torch",
        cache_dir: Path | None = None,
    ) -> EmbeddingModel:
        """Choose the execution. ``int8`` runs the weights' int8 model on OpenVINO (``auto`` picks
        OpenVINO for it); weights without one are refused with a ``WeightsError`` saying how to make it.
        ``cache_dir``: where the network converted for OpenVINO is kept between starts."""
        self.precision = resolve_precision(precision)
        if self.precision == "int8":
            if backend == "torch":
                raise ValueError("int8 runs on the OpenVINO backend: BACKEND=openvino or auto, not torch")
            if not openvino_available():
                raise ValueError("int8 runs on the OpenVINO backend, and openvino is not installed")
            backend = "openvino"
        self.backend = resolve_backend(backend)
        self.channels_last = channels_last and self.backend == "torch"
        self.network.to(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        self._compiled = None
        if self.backend == "openvino":
            started = time.perf_counter()
            if self.precision == "int8":
                import openvino as ov

                xml = int8_model_path(self.root, self.manifest)
                ov_model = ov.Core().read_model(str(xml))
            else:
                ov_model = cached_openvino(self.network, self.manifest, cache_dir)
            self._compiled = OpenVINONetwork(ov_model, self.precision, torch.get_num_threads())
            log.info("compiled for OpenVINO (%s) in %.1f s", self.precision, time.perf_counter() - started)
        return self

    @property
    def sample_rate(self) -> int:
        return self.manifest.sample_rate

    @property
    def labels(self) -> list[str]:
        return self.manifest.labels

    def nearest_class(self, embedding: Tensor) -> tuple[int, float, bool] | None:
        """Open-set check: the class whose centroid is nearest by cosine, the known-voice score
        (:func:`open_set_scores`) and whether it reaches the calibrated ``known_threshold``
        (False: the voice is none of the classes). None for weights without centroids."""
        m = self.manifest
        if m.class_centroids is None or m.known_threshold is None:
            return None
        cohort, top = None, 0
        if m.cohort is not None and m.known_cohort is not None:
            cohort, top = self._unit_rows("cohort", m.cohort), int(m.known_cohort["top"])
        centroids = self._unit_rows("centroids", m.class_centroids)
        index, score = open_set_scores(embedding.reshape(1, -1), centroids, cohort, top)
        return int(index[0]), float(score[0]), float(score[0]) >= m.known_threshold

    @property
    def norm_top(self) -> int:
        """Background voices per side in the verification score (adaptive s-norm); 0: plain cosine."""
        m = self.manifest
        if m.verification_norm is None or m.cohort is None:
            return 0
        return int(m.verification_norm["top"])

    def norm_statistics(self, embeddings: Tensor) -> Tensor | None:
        """For each embedding (rows), what :func:`as_norm` needs of it: ``(N, 2)``, the mean and
        standard deviation of its cosines to its nearest background voices. None without
        ``verification_norm``. Compute it once per enrolled voiceprint and reuse it."""
        top = self.norm_top
        if top == 0:
            return None
        return cohort_statistics(embeddings, self._unit_rows("cohort", self.manifest.cohort), top)

    def verification_scores(self, a: Tensor, b: Tensor, b_statistics: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The verification score of every pair of rows of ``a`` (N, E) and ``b`` (M, E), the
        scale ``verification_threshold`` is on, and their cosines: ``(scores, cosines)``, (N, M).
        The score is the cosine, or with ``verification_norm`` its adaptive s-norm (:func:`as_norm`).
        ``b_statistics``: :meth:`norm_statistics` of ``b`` when already known."""
        ua, ub = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
        cosines = ua @ ub.T
        if b_statistics is None:
            b_statistics = self.norm_statistics(ub)
        return self.normalise_scores(cosines, ua, b_statistics), cosines

    def normalise_scores(self, cosines: Tensor, a: Tensor, b_statistics: Tensor | None) -> Tensor:
        """Cosines (N, M) of the rows of ``a`` (N, E) to M voiceprints -> verification scores:
        themselves, or with ``verification_norm`` their adaptive s-norm, given the voiceprints'
        :meth:`norm_statistics` (``b_statistics``, (M, 2)). For callers that compute the cosines
        themselves (an /identify index's matrix product)."""
        stats_a = self.norm_statistics(a)
        if stats_a is None:
            return cosines
        if b_statistics is None:
            raise ValueError("adaptive s-norm needs the voiceprints' norm_statistics")
        return as_norm(cosines, stats_a[:, None], b_statistics[None, :])

    def _unit_rows(self, name: str, rows: Any) -> Tensor:
        """The manifest's ``rows`` (centroids or background voices) as float32 unit rows, made once
        for each object the manifest holds (recalibration replaces them)."""
        cached = self._unit.get(name)
        if cached is None or cached[0] is not rows:
            cached = self._unit[name] = (rows, F.normalize(torch.as_tensor(rows, dtype=torch.float32), dim=-1))
        return cached[1]

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


def open_set_scores(
    embeddings: Tensor, centroids: Tensor, cohort: Tensor | None = None, top: int = 0
) -> tuple[Tensor, Tensor]:
    """For each embedding (rows): the nearest class centroid and the known-voice score, its
    cosine to that centroid, less, given a cohort, the mean cosine of its ``top`` nearest cohort
    voices (test-side cohort normalisation, as in adaptive s-norm: clips in noise or through a
    codec score lower against every voice, and an unknown voice is usually nearer some training
    voice than any class). ``centroids`` and ``cohort`` have unit rows."""
    e = F.normalize(embeddings.float(), dim=-1)
    score, index = (e @ centroids.T).max(-1)
    if cohort is not None:
        score = score - (e @ cohort.T).topk(top, dim=-1).values.mean(-1)
    return index, score


def cohort_statistics(embeddings: Tensor, cohort: Tensor, top: int) -> Tensor:
    """``(N, 2)``: the mean and standard deviation of each embedding's ``top`` highest cosines to
    the cohort (unit rows). In blocks of rows, so that many voiceprints (an /identify index of
    100,000) never make one (N, cohort) matrix at once."""
    unit = F.normalize(embeddings.float(), dim=-1)
    out = torch.empty(len(unit), 2)
    for start in range(0, len(unit), STATISTICS_BLOCK):
        nearest = (unit[start : start + STATISTICS_BLOCK] @ cohort.T).topk(top, dim=-1).values
        out[start : start + len(nearest), 0] = nearest.mean(-1)
        out[start : start + len(nearest), 1] = nearest.std(-1).clamp_min(1e-4)
    return out


STATISTICS_BLOCK = 4096  # rows per block in cohort_statistics: 4096 x 652 float32 is 10 MiB


def as_norm(cosines: Tensor, stats_a: Tensor, stats_b: Tensor) -> Tensor:
    """Adaptive s-norm (Matejka et al., 2017; the score normalisation of WeSpeaker and 3D-Speaker),
    elementwise: ``cosines`` (any shape), each side's :func:`cohort_statistics` (that shape and 2,
    or broadcastable to it). Each cosine as standard deviations above what each side scores against its own
    nearest background voices, averaged over the two sides. A clip in noise or through a codec
    scores lower against every voice, its own included; measured against its own cohort it stops
    being penalised, and a voice near many others stops being favoured."""
    za = (cosines - stats_a[..., 0]) / stats_a[..., 1]
    zb = (cosines - stats_b[..., 0]) / stats_b[..., 1]
    return 0.5 * (za + zb)


def load(path: str | Path) -> EmbeddingModel:
    """Load and check a weights directory. Raises ``WeightsError`` naming the file and the problem."""
    network, manifest = read(path)
    return EmbeddingModel(network, manifest, Path(path))
