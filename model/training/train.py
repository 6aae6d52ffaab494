"""Train the seed's ResNet on any folder of labelled audio and write a weights directory.

    python -m model.training.train --data DIR --arch resnet18 --out DIR [--epochs N] [--resume] [--stop-after N]

Two heads share the network's 256-d embedding (its fc layer). An additive angular margin softmax
over every training voice (the 9 classes and, where the corpus has them, hundreds of others)
shapes the embedding for voices never heard; it lives only here, in training, and is never part of
the weights. The seed's 9-class linear head learns with cross-entropy on the labelled voices'
crops. Random crops, features from the same front end the service uses, lossy-codec and SpecAugment
augmentation, a one-cycle learning-rate schedule, a checkpoint every epoch (``--resume`` continues
from it), validation every epoch (9-class accuracy and EER, and the EER among held-out open-set
validation voices), early stopping, bf16 autocast where the CPU supports it. At the end, the
training voices' mean embedding is folded into the network where that lowers the open-set
validation EER (``model.training.centre``). Writes ``OUT/weights/`` (metrics, the verification
threshold calibrated to accept 1 % of the open-set validation voices' different-voice pairs, the
class centroids and the known-voice threshold in the manifest) and a report:
``OUT/report/{curves,confusion}.png`` and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor, nn
from tqdm import tqdm

from model.audio import decode, encode, to_mono
from model.features import FeatureConfig, LogMelSpectrogram
from model.resnet import ARCHITECTURES, ResNet, build
from model.runtime import EmbeddingModel, bf16_native, machine
from model.training.calibrate import (
    COHORT_CLIPS,
    COHORT_TOP,
    NORM_TOP,
    Embedder,
    calibrate,
    embed_all,
    known_scores,
    pick_cohort,
)
from model.training.centre import centre
from model.training.data import UNLABELLED, Dataset, Item, load_waves, random_crop, scan, speed_crop, speed_up
from model.training.evaluate import open_set_figures
from model.training.metrics import open_set_report, summarise
from model.training.provenance import command_line, pipeline_wall_s, read_corpus_record
from model.training.teachers import clip_targets, load_teacher
from model.training.voices import WARPED
from model.weights import Manifest, read, read_manifest, replace_file, save

log = logging.getLogger(__name__)

WARM_START_CLIPS = 2  # clips a voice for its margin-head row under --init
WARM_START_CROP_S = 3.0  # seconds of each


@dataclass
class TrainConfig:
    arch: str = "resnet18"
    epochs: int = 6
    batch_size: int = 32
    crop_s: float = 1.0
    lr: float = 2e-3
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    freq_mask: int = 10
    time_mask: int = 15
    patience: int = 3
    embedding_size: int = 256
    seed: int = 0
    bf16: str = "auto"  # auto | on | off
    eval_max_s: float = 8.0
    codec_share: float = 0.3  # share of training crops passed through a lossy codec
    steps_per_epoch: int = 0  # 0: one pass over the training clips
    margin: float = 0.2  # additive angular margin (radians), reached after the ramp
    margin_scale: float = 32.0
    margin_ramp_start: float = 0.1  # the margin ramps from 0 to full between these shares of all steps
    margin_ramp_end: float = 0.4
    class_weight: float = 0.5  # weight of the 9-class cross-entropy beside the margin loss
    label_share: float = 0.35  # share of each batch drawn from the labelled voices (when there are others)
    centroid_clips: int = 40  # training clips per class for the class centroids
    cohort_top: int = COHORT_TOP  # background voices in the known-voice score (model.training.calibrate; 0: none)
    cohort_clips: int = COHORT_CLIPS  # training clips per background voice
    norm_top: int = NORM_TOP  # background voices per side in the verification score's adaptive s-norm (0: cosine)
    centre_clips: int = 2  # training clips per voice for the mean (and covariance) folded into the embedding (0: none)
    whiten: bool = False  # fold within-voice whitening in too (model.training.centre; needs about 3 clips a voice)
    voice_weighting: bool = False  # whitening and soft LDA instead, where it lowers the open-set validation EER
    init: str = ""  # weights directory to start from (fine-tuning: more steps, or more voices); "": from scratch
    # speed perturbation counted as new speakers (WeSpeaker's recipe): each unlabelled training
    # voice's crops are, with equal chances, as recorded or sped up by one of these factors, each
    # factor a pseudo-speaker of its own in the margin head; (): none
    speed_perturb: tuple[float, ...] = ()
    # real speakers (model.training.realspeech): the share of each batch drawn from their clips,
    # where the corpus has them; 0: the run leaves them out (training, selection and calibration)
    real_share: float = 0.0
    # distillation from a speaker encoder pretrained on real speakers (model.training.teachers):
    # a training-only linear map takes the embedding to the teacher's space, where its cosine to the
    # teacher's embedding of the whole clip (of the clip as recorded, for a real clip's other
    # copies) is pulled towards 1, weighted by distil_weight; "": none
    teacher: str = ""
    distil_weight: float = 1.0
    teacher_clips: int = 4  # synthetic clips per voice with a teacher target (0: all); every real clip has one
    # measure the open-set test voices at the end of the run; off: candidates are chosen on the
    # validation voices, and only the one that ships is measured on test (make evaluate-open-set)
    open_test: bool = False

    def __post_init__(self) -> None:
        self.speed_perturb = tuple(self.speed_perturb)  # the CLI gives a list
        check_speeds(self.speed_perturb)


def use_bf16(choice: str) -> bool:
    return choice == "on" or (choice == "auto" and bf16_native())


class SpecAugment(nn.Module):
    """Frequency and time masking on ``(B, 1, F, T)`` features, different per item."""

    def __init__(self, freq_mask: int, time_mask: int) -> None:
        super().__init__()
        self.freq = torchaudio.transforms.FrequencyMasking(freq_mask, iid_masks=True)
        self.time = torchaudio.transforms.TimeMasking(time_mask, iid_masks=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.time(self.freq(x))


# Lossy codecs applied to training crops on the fly: (FFmpeg encoder, b/s, libopus bandwidth
# cutoff in Hz). Below about 9 kb/s libopus switches to narrowband SILK (nothing above 4 kHz),
# a mode a wideband corpus never contains; the cutoff forces it at higher bitrates. The other
# entries cover each codec's low VoIP and streaming settings.
CODEC_SETTINGS: list[tuple[str, int, int]] = [
    ("libopus", 10_000, 4000),
    ("libopus", 12_000, 4000),
    ("libopus", 12_000, 6000),
    ("libopus", 16_000, 0),
    ("libmp3lame", 20_000, 0),
    ("libmp3lame", 32_000, 0),
    ("aac", 28_000, 0),
    ("aac", 48_000, 0),
]


class CodecAugment:
    """Encode and decode a ``share`` of the crops with a random entry of ``settings``, as
    SpeechBrain's CodecAugment does (its torchaudio ``apply_codec`` is gone from torchaudio 2.9,
    so this calls FFmpeg through PyAV). Lengths are kept: the output is cut to the crop's length,
    so AAC crops (whose raw ADTS stream does not mark the encoder's 1024 priming samples) start
    64 ms late at 16 kHz, which a random crop does not mind."""

    def __init__(self, share: float, sample_rate: int, settings: list[tuple[str, int, int]] = CODEC_SETTINGS) -> None:
        self.share, self.sample_rate, self.settings = share, sample_rate, settings

    def one(self, wave: Tensor, setting: tuple[str, int, int]) -> Tensor:
        codec, bitrate, cutoff = setting
        data = encode(wave, self.sample_rate, codec, bitrate, {"cutoff": str(cutoff)} if cutoff else None)
        out = to_mono(decode(data), self.sample_rate)[: wave.numel()]
        return F.pad(out, (0, wave.numel() - out.numel()))

    def __call__(self, waves: Tensor, gen: torch.Generator) -> Tensor:
        picks = torch.rand(len(waves), generator=gen) < self.share
        choice = torch.randint(len(self.settings), (len(waves),), generator=gen)
        rows = [self.one(w, self.settings[int(c)]) if p else w for w, p, c in zip(waves, picks, choice, strict=True)]
        return torch.stack(rows)


class AdditiveAngularMargin(nn.Module):
    """Additive angular margin softmax (ArcFace; WeSpeaker's ``arc_margin``): the target voice's
    logit is ``scale * cos(theta + margin)``, the others ``scale * cos(theta)``, with ``theta`` the
    angle between the embedding and the voice's weight vector. Training only: its weights are
    saved in training checkpoints, never in the weights directory."""

    def __init__(self, embedding_size: int, voices: int, scale: float = 32.0, margin: float = 0.2) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(voices, embedding_size))
        nn.init.xavier_uniform_(self.weight)
        self.scale = scale
        self.margin = margin

    def forward(self, embedding: Tensor, target: Tensor) -> Tensor:
        cos = F.linear(F.normalize(embedding.float()), F.normalize(self.weight)).clamp(-1 + 1e-7, 1 - 1e-7)
        m = self.margin
        sin = torch.sqrt(1.0 - cos * cos)
        phi = cos * math.cos(m) - sin * math.sin(m)  # cos(theta + m)
        # past theta = pi - m, cos(theta + m) would rise again: keep the target's logit decreasing
        phi = torch.where(cos > math.cos(math.pi - m), phi, cos - math.sin(math.pi - m) * m)
        onehot = F.one_hot(target, cos.shape[1]).bool()
        return self.scale * torch.where(onehot, phi, cos)


class Distillation(nn.Module):
    """Embedding-level distillation: a linear map from the network's embedding to a teacher's
    space, and the mean of ``1 - cosine`` to the teacher's embeddings. Training only, like the
    margin head: saved in checkpoints, never in the weights directory."""

    def __init__(self, embedding_size: int, teacher_size: int) -> None:
        super().__init__()
        self.map = nn.Linear(embedding_size, teacher_size)

    def forward(self, embedding: Tensor, target: Tensor) -> Tensor:
        return (1 - F.cosine_similarity(self.map(embedding), target, dim=-1)).mean()


def check_speeds(speeds: tuple[float, ...]) -> None:
    """Refuse speed-perturbation factors that would not make new voices: 1.0 (each voice's twin),
    repeats, and factors outside (0, 2)."""
    if any(not 0 < s < 2 or s == 1.0 for s in speeds) or len(set(speeds)) != len(speeds):
        raise ValueError(f"speed perturbation factors must be distinct, in (0, 2) and not 1.0: {speeds}")


def pseudo_speakers(voices: list[str], labelled: set[int], speeds: tuple[float, ...]) -> Tensor:
    """``(V, len(speeds))``: the margin-head row of voice ``v`` sped up by ``speeds[k]``, or -1
    where it gets none: the labelled voices (their class stays theirs alone), and voices the corpus
    already warps, and their warps (``flite-rms-w088`` sped up 1.12 times is nearly ``flite-rms``:
    two rows for one voice would push the embedding apart where it should agree). New rows follow
    the voices', speed by speed."""
    check_speeds(speeds)
    warped_bases = {WARPED.sub("", v) for v in voices if WARPED.search(v)}
    eligible = [i for i, v in enumerate(voices) if i not in labelled and not WARPED.search(v) and v not in warped_bases]
    rows = torch.full((len(voices), len(speeds)), -1, dtype=torch.long)
    for k in range(len(speeds)):
        rows[eligible, k] = len(voices) + k * len(eligible) + torch.arange(len(eligible))
    return rows


def warm_start(
    network: ResNet,
    head: AdditiveAngularMargin,
    cfg: TrainConfig,
    labels: list[str],
    feature_cfg: FeatureConfig,
    features: LogMelSpectrogram,
    train_waves: list[Tensor],
    train_voices: Tensor,
    pseudo: Tensor,
) -> None:
    """Start from the weights in ``cfg.init`` (read as safetensors, never unpickled): the network's
    tensors, and each margin-head row (``pseudo``: the speed-perturbed pseudo-speakers' rows) at
    its voice's mean embedding under them, so that the first steps refine the embedding rather than
    drag it towards random voice vectors. Weights of another architecture, other classes or another
    front end are refused."""
    source, manifest = read(cfg.init)
    theirs = (manifest.architecture, manifest.labels, manifest.embedding_size, manifest.features)
    ours = (cfg.arch, labels, cfg.embedding_size, feature_cfg)
    if theirs != ours:
        raise SystemExit(
            f"--init {cfg.init}: (arch, labels, embedding size, features) {theirs} differ from this run's {ours}"
        )
    network.load_state_dict(source.state_dict())
    window = int(WARM_START_CROP_S * feature_cfg.sample_rate)
    picked: dict[int, list[int]] = {}  # voice -> its first WARM_START_CLIPS clips
    for i, v in enumerate(train_voices.tolist()):
        if len(picked.setdefault(v, [])) < WARM_START_CLIPS:
            picked[v].append(i)
    sr = feature_cfg.sample_rate
    sums = torch.zeros_like(head.weight)
    network.eval()
    with torch.inference_mode():
        for v, clips in tqdm(picked.items(), desc="voice vectors from --init", unit="voice"):
            rows = [(v, 1.0)] + [(int(r), s) for r, s in zip(pseudo[v], cfg.speed_perturb, strict=True) if r >= 0]
            for i in clips:
                for row, speed in rows:
                    wave = speed_up(train_waves[i][: round(window * speed)], speed, sr)
                    _, emb = network(features(wave.unsqueeze(0)))
                    sums[row] += F.normalize(emb[0].float(), dim=0)
    network.train()
    with torch.no_grad():
        head.weight.copy_(F.normalize(sums, dim=-1))
    seen = len(picked)
    log.info("started from %s (%s); margin head at the mean embedding of %d voices", cfg.init, manifest.version, seen)


def margin_at(cfg: TrainConfig, step: int, total: int) -> float:
    """The margin at ``step`` of ``total``: 0, then a linear ramp, then ``cfg.margin``."""
    start, end = cfg.margin_ramp_start, cfg.margin_ramp_end
    progress = (step / max(1, total) - start) / max(1e-9, end - start)
    return cfg.margin * min(1.0, max(0.0, progress))


def train_step(
    network: ResNet,
    head: AdditiveAngularMargin,
    features: LogMelSpectrogram,
    augment: nn.Module,
    optimizer: torch.optim.Optimizer,
    waves: Tensor,
    voices: Tensor,
    classes: Tensor,
    cfg: TrainConfig,
    bf16: bool,
    distil: Distillation | None = None,
    targets: Tensor | None = None,
) -> float:
    """One optimisation step on a batch of equal-length waveforms; returns the loss. ``voices``
    indexes the margin head's voices; ``classes`` the 9 classes, or UNLABELLED; ``targets`` the
    teacher's unit embeddings (a row of NaN where a clip has none) for ``distil``."""
    network.train()
    head.train()
    feats = augment(features(waves))  # (B, 1, n_mels, T)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits, embedding = network(feats)
    loss = F.cross_entropy(head(embedding.float(), voices), voices)
    labelled = classes != UNLABELLED
    if labelled.any():
        class_loss = F.cross_entropy(logits.float()[labelled], classes[labelled], label_smoothing=cfg.label_smoothing)
        loss = loss + cfg.class_weight * class_loss
    if distil is not None and targets is not None:
        taught = ~targets.isnan().any(-1)
        if taught.any():
            loss = loss + cfg.distil_weight * distil(embedding.float()[taught], targets[taught])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def _score(record: dict[str, Any]) -> tuple[float, float]:
    """Higher is better: validation accuracy less the open-set validation EER (or, without
    open-set voices, accuracy and then the 9-class EER)."""
    eer = record["val_eer"] if record.get("open_val_eer") is None else record["open_val_eer"]
    eer = eer if eer is not None else 1.0
    if record.get("open_val_eer") is not None:
        return record["val_accuracy"] - eer, 0.0
    return record["val_accuracy"], -eer


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    replace_file(path, lambda tmp: torch.save(state, tmp))


def plot_report(report_dir: Path, history: list[dict[str, Any]], test: dict[str, Any], labels: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report_dir.mkdir(parents=True, exist_ok=True)
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(epochs, [h["train_loss"] for h in history], marker="o")
    axes[0].set(title="training loss", xlabel="epoch")
    axes[1].plot(epochs, [h["train_accuracy"] for h in history], marker="o", label="train (crops)")
    axes[1].plot(epochs, [h["val_accuracy"] for h in history], marker="o", label="validation")
    axes[1].set(title="accuracy", xlabel="epoch", ylim=(0, 1.02))
    axes[1].legend()
    axes[2].plot(epochs, [100 * (h["val_eer"] or 0) for h in history], marker="o", label="9 classes")
    if any(h.get("open_val_eer") is not None for h in history):
        axes[2].plot(epochs, [100 * (h.get("open_val_eer") or 0) for h in history], marker="o", label="open-set voices")
        axes[2].legend()
    axes[2].set(title="validation EER (%)", xlabel="epoch")
    fig.tight_layout()
    fig.savefig(report_dir / "curves.png", dpi=100)
    plt.close(fig)

    cm = torch.tensor(test["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i, row in enumerate(cm.tolist()):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=f"test split, accuracy {test['accuracy']:.3f}")
    fig.tight_layout()
    fig.savefig(report_dir / "confusion.png", dpi=100)
    plt.close(fig)


def taught(targets: Tensor, speeds: list[float]) -> Tensor:
    """The teacher's targets for a batch, less those of speed-perturbed crops: each of those is a
    pseudo-speaker of its own, not the voice the teacher heard."""
    out = targets.clone()
    out[torch.tensor(speeds) != 1.0] = float("nan")
    return out


def selection_groups(items: list[Item]) -> dict[str, list[int]]:
    """The open-set validation clips each epoch is judged on, by group: the synthetic voices'
    clips, and the real speakers' clips as recorded (their other probe conditions are for
    calibration and the report)."""
    groups = {
        "synthetic": [i for i, it in enumerate(items) if not it.real],
        "real": [i for i, it in enumerate(items) if it.real and not it.conditions],
    }
    return {k: v for k, v in groups.items() if len({items[i].voice for i in v}) >= 2}  # an EER needs two voices


def open_val_eers(
    model: EmbeddingModel, items: list[Item], waves: list[Tensor], groups: dict[str, list[int]], max_s: float
) -> dict[str, Any]:
    """``open_val_eer``, the mean of each group's EER over all pairs of its clips (None without
    open-set voices), and each group's as ``open_val_eer_<group>`` where there are two."""
    eers = {}
    for name, idx in groups.items():
        _, emb = embed_all(model, [waves[i] for i in idx], max_s)
        eers[name] = open_set_report(emb, [items[i].voice for i in idx])["eer"]
    out: dict[str, Any] = {"open_val_eer": sum(eers.values()) / len(eers) if eers else None}
    if len(eers) > 1:
        out |= {f"open_val_eer_{name}": eer for name, eer in eers.items()}
    return out


def train(
    data_dir: Path,
    out_dir: Path,
    cfg: TrainConfig,
    feature_cfg: FeatureConfig,
    resume: bool,
    stop_after: int | None = None,
) -> Manifest:
    """Train; ``stop_after`` ends this run after that many epochs of the schedule (``resume``
    continues it later), so a long run can be split."""
    started = time.time()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset: Dataset = scan(data_dir)
    if not cfg.real_share:  # real speakers join only where asked: recipes without them train as they always did
        dataset = Dataset(dataset.root, dataset.labels, [it for it in dataset.items if not it.real])
    labels = dataset.labels
    train_items, val_items = dataset.split("train"), dataset.split("val")
    open_val_items = dataset.split("open-val")
    if not train_items or not val_items:
        raise SystemExit(f"{data_dir}: need both train and val clips (found {len(train_items)}, {len(val_items)})")
    sr = feature_cfg.sample_rate
    train_waves = load_waves(train_items, sr, "loading train")
    val_waves = load_waves(val_items, sr, "loading val")
    open_val_waves = load_waves(open_val_items, sr, "loading open-set val")
    voices = dataset.voices("train")
    voice_index = {v: i for i, v in enumerate(voices)}
    train_voices = torch.tensor([voice_index[it.voice] for it in train_items])
    train_classes = torch.tensor([it.label for it in train_items])
    labelled = (train_classes != UNLABELLED).nonzero().flatten()
    is_real = torch.tensor([it.real for it in train_items], dtype=torch.bool)
    real, others = is_real.nonzero().flatten(), ((train_classes == UNLABELLED) & ~is_real).nonzero().flatten()
    if not len(labelled):
        raise SystemExit(f"{data_dir}: no training clips of the labelled classes")
    val_labels = [it.label for it in val_items]
    n_labelled = cfg.batch_size if not len(others) + len(real) else max(1, round(cfg.batch_size * cfg.label_share))
    n_real = round(cfg.batch_size * cfg.real_share) if len(real) else 0
    if n_labelled + n_real > cfg.batch_size or (len(others) and n_labelled + n_real == cfg.batch_size):
        raise SystemExit(f"--label-share {cfg.label_share} and --real-share {cfg.real_share} leave no other voices")
    selection = selection_groups(open_val_items)

    pseudo = pseudo_speakers(voices, set(train_voices[labelled].tolist()), cfg.speed_perturb)
    head_rows = len(voices) + int((pseudo >= 0).sum())
    network = build(cfg.arch, num_classes=len(labels), embedding_size=cfg.embedding_size)
    head = AdditiveAngularMargin(cfg.embedding_size, head_rows, cfg.margin_scale, 0.0)
    features = LogMelSpectrogram(feature_cfg)
    if cfg.init and not (resume and (out_dir / "checkpoint.pt").is_file()):
        warm_start(network, head, cfg, labels, feature_cfg, features, train_waves, train_voices, pseudo)
    augment = SpecAugment(cfg.freq_mask, cfg.time_mask)
    codec_augment = CodecAugment(cfg.codec_share, feature_cfg.sample_rate)
    bf16 = use_bf16(cfg.bf16)
    steps_per_epoch = cfg.steps_per_epoch or math.ceil(len(train_items) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    distil, teacher_targets = None, None
    if cfg.teacher:
        teacher = load_teacher(cfg.teacher)
        teacher_targets = clip_targets(teacher, data_dir, train_items, train_waves, cfg.teacher_clips, cfg.eval_max_s)
        distil = Distillation(cfg.embedding_size, teacher.dim)
        del teacher
    trained = [*network.parameters(), *head.parameters(), *(distil.parameters() if distil is not None else [])]
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total_steps, pct_start=0.15)
    manifest = Manifest(cfg.arch, len(labels), cfg.embedding_size, labels, feature_cfg)
    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    start_epoch = 0
    ckpt_path = out_dir / "checkpoint.pt"
    if resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if (
            state["scheduler"]["total_steps"] != total_steps
            or state.get("voices") != voices
            or state["head"]["weight"].shape[0] != head_rows
        ):
            raise SystemExit(
                f"{ckpt_path}: resume with the checkpoint's data, --epochs, --steps-per-epoch, --batch-size"
            )
        network.load_state_dict(state["network"])
        head.load_state_dict(state["head"])
        if distil is not None:
            distil.load_state_dict(state["distil"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        history, best, start_epoch = state["history"], state["best"], state["epoch"]
        started -= state["elapsed_s"]
        log.info("resumed from %s at epoch %d", ckpt_path, start_epoch)
    crop = int(cfg.crop_s * sr)
    log.info(
        "%d train clips of %d voices (%d labelled clips, %d per batch) / %d val / %d open-set val clips, "
        "%d classes, %s, %d steps per epoch, bf16=%s, %d threads, %d speed-perturbed pseudo-speakers",
        len(train_items), len(voices), len(labelled), n_labelled, len(val_items), len(open_val_items),
        len(labels), cfg.arch, steps_per_epoch, bf16, torch.get_num_threads(), head_rows - len(voices),
    )  # fmt: skip

    def draw(pool: Tensor, n: int) -> Tensor:
        return pool[torch.randint(len(pool), (n,), generator=gen)]

    for epoch in range(start_epoch, cfg.epochs):
        losses = []
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step")
        for step in bar:
            idx = draw(labelled, n_labelled)
            if n_real:
                idx = torch.cat([idx, draw(real, n_real)])
            if len(others):
                idx = torch.cat([idx, draw(others, cfg.batch_size - n_labelled - n_real)])
            head.margin = margin_at(cfg, epoch * steps_per_epoch + step, total_steps)
            targets, speeds = train_voices[idx], [1.0] * len(idx)
            if cfg.speed_perturb:  # as recorded (0) or one of the speeds (k), with equal chances
                k = torch.randint(len(cfg.speed_perturb) + 1, (len(idx),), generator=gen)
                rows = torch.where(k > 0, pseudo[targets, (k - 1).clamp_min(0)], -1)
                targets = torch.where(rows >= 0, rows, targets)
                speeds = [
                    cfg.speed_perturb[j - 1] if r >= 0 else 1.0 for j, r in zip(k.tolist(), rows.tolist(), strict=True)
                ]
            waves = torch.stack(
                [speed_crop(train_waves[i], crop, s, sr, gen) for i, s in zip(idx.tolist(), speeds, strict=True)]
            )
            waves = codec_augment(waves, gen)
            gains = 10 ** (torch.empty(len(idx), 1).uniform_(-0.5, 0.3, generator=gen))  # +-dB, beyond the corpus
            loss = train_step(
                network, head, features, augment, optimizer, waves * gains, targets, train_classes[idx],
                cfg, bf16, distil, None if teacher_targets is None else taught(teacher_targets[idx], speeds),
            )  # fmt: skip
            scheduler.step()
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", m=f"{head.margin:.2f}")
        with torch.inference_mode():
            network.eval()
            # 9-class accuracy on a fresh set of labelled training crops, without augmentation
            sample = draw(labelled, min(len(labelled), 256))
            crops = torch.stack([random_crop(train_waves[i], crop, gen) for i in sample.tolist()])
            logits, _ = network(features(crops))
            correct = int((logits.argmax(-1) == train_classes[sample]).sum())
        current = EmbeddingModel(network, manifest)
        val = summarise(*embed_all(current, val_waves, cfg.eval_max_s), torch.tensor(val_labels), labels)
        open_val = open_val_eers(current, open_val_items, open_val_waves, selection, cfg.eval_max_s)
        record = {
            "epoch": epoch + 1,
            "train_loss": sum(losses) / len(losses),
            "train_accuracy": correct / len(sample),
            "val_accuracy": val["accuracy"],
            "val_eer": val["eer"],
            "val_eer_threshold": val["eer_threshold"],
            **open_val,
            "margin": head.margin,
            "elapsed_s": round(time.time() - started, 1),
        }
        history.append(record)
        log.info("epoch %d: %s", epoch + 1, json.dumps(record))
        if best is None or _score(record) >= _score(best):
            best = {**record, "network": {k: v.clone() for k, v in network.state_dict().items()}}
        save_checkpoint(
            ckpt_path,
            {
                "network": network.state_dict(),
                "head": head.state_dict(),
                **({"distil": distil.state_dict()} if distil is not None else {}),
                "voices": voices,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "generator": gen.get_state(),
                "history": history,
                "best": best,
                "epoch": epoch + 1,
                "elapsed_s": time.time() - started,
            },
        )
        if epoch + 1 - best["epoch"] >= cfg.patience:
            log.info("early stop: no validation improvement for %d epochs", cfg.patience)
            break
        if stop_after is not None and epoch + 1 >= stop_after and epoch + 1 < cfg.epochs:
            log.info("stopping after epoch %d as asked; --resume continues", epoch + 1)
            break

    assert best is not None
    network.load_state_dict(best["network"])
    final = EmbeddingModel(network, manifest)
    return finish(final, dataset, cfg, best, history, train_waves, train_classes.tolist(), val_waves,
                  open_val_waves, data_dir, out_dir, started, bf16)  # fmt: skip


def finish(
    final: EmbeddingModel,
    dataset: Dataset,
    cfg: TrainConfig,
    best: dict[str, Any],
    history: list[dict[str, Any]],
    train_waves: list[Tensor],
    train_classes: list[int],
    val_waves: list[Tensor],
    open_val_waves: list[Tensor],
    data_dir: Path,
    out_dir: Path,
    started: float,
    bf16: bool,
) -> Manifest:
    """Calibrate on the validation voices, test, and write the weights and the report (``bf16``:
    whether the steps ran under bf16 autocast, for the provenance)."""
    labels, sr, max_s = dataset.labels, final.sample_rate, cfg.eval_max_s
    val_items = dataset.split("val")
    train_items = dataset.split("train")
    embed = Embedder(final, max_s)  # centring's clips are calibration's too: each embedded once
    centring = centre(
        final, train_waves, [it.voice for it in train_items], open_val_waves,
        [it.voice for it in dataset.split("open-val")], cfg.centre_clips, max_s, cfg.whiten, cfg.voice_weighting,
        embed,
    )  # fmt: skip
    centroid_waves = [w for w, c in zip(train_waves, train_classes, strict=True) if c != UNLABELLED]
    background = pick_cohort(train_items, cfg.cohort_clips)
    cal = calibrate(
        final, dataset, val_waves, open_val_waves, centroid_waves,
        [c for c in train_classes if c != UNLABELLED], cfg.centroid_clips, max_s,
        cohort_waves=[train_waves[i] for i in background], cohort_voices=[train_items[i].voice for i in background],
        cohort_top=cfg.cohort_top, norm_top=cfg.norm_top, embed=embed,
    )  # fmt: skip
    val_logits, val_emb = cal.val_logits, cal.val_emb
    threshold, centroids, known_threshold = cal.threshold, cal.centroids, cal.known_threshold
    cohort, cohort_top = cal.cohort, cal.cohort_top
    calibration = cal.info
    test_items = dataset.split("test")
    if test_items:
        test_waves = load_waves(test_items, sr, "loading test")
        test_logits, test_emb = embed_all(final, test_waves, max_s)
        test = summarise(test_logits, test_emb, torch.tensor([it.label for it in test_items]), labels)
    else:
        test_emb = val_emb
        test = summarise(val_logits, val_emb, torch.tensor([it.label for it in val_items]), labels)
    metrics: dict[str, Any] = {
        "best_epoch": best["epoch"],
        "val_accuracy": best["val_accuracy"],
        "val_eer": best["val_eer"],
        "open_val_eer": best.get("open_val_eer"),
        "test_split": "test" if test_items else "val",
        "test_accuracy": test["accuracy"],
        "test_eer": test["eer"],
        "test_per_class_accuracy": test["per_class_accuracy"],
        "calibration": calibration,
    }
    if centring is not None:
        metrics["centring"] = centring
    known = None
    if centroids is not None and known_threshold is not None:

        def known(emb: Tensor) -> Tensor:
            return known_scores(emb, centroids, cohort, cohort_top) >= known_threshold

        test["flagged_unknown"] = float((~known(test_emb)).float().mean())
        metrics["test_flagged_unknown"] = test["flagged_unknown"]
    open_val_items = dataset.split("open-val")
    if open_val_items:  # what candidates are chosen on: the held-out validation voices, in full
        metrics["open_set_val"] = open_set_figures(open_val_items, embed(open_val_waves)[1], cal.norm_statistics, known)
    open_test_items = dataset.split("open-test")
    if open_test_items and cfg.open_test:  # test voices measure the candidate that ships, once
        open_test_waves = load_waves(open_test_items, sr, "loading open-set test")
        _, open_test_emb = embed_all(final, open_test_waves, max_s)
        metrics["open_set_test"] = open_set_figures(open_test_items, open_test_emb, cal.norm_statistics, known)
    wall = time.time() - started
    provenance = {
        "name": f"voice-embed-{cfg.arch}",
        "trained_on": str(data_dir),
        "train_command": command_line("model.training.train"),
        "train_config": asdict(cfg),
        "train_clips": len(train_waves),
        "train_voices": len(dataset.voices("train")),
        "train_wall_s": round(wall, 1),
        "host": machine(),
        "bf16": bf16,
    }
    corpus_record = read_corpus_record(data_dir)
    if corpus_record is not None:
        provenance["corpus"] = corpus_record
    init = None
    if cfg.init:
        init = read_manifest(cfg.init).to_dict()
        theirs = init.get("provenance", {})
        provenance["init"] = {
            "weights": cfg.init,
            "sha256": init["sha256"],
            "version": theirs.get("version"),
            "train_wall_s": theirs.get("train_wall_s"),
        }
    pipeline = pipeline_wall_s(corpus_record, wall, init)
    if pipeline is not None:
        provenance["pipeline_wall_s"] = pipeline
    weights = save(
        final.network,
        out_dir / "weights",
        architecture=cfg.arch,
        labels=labels,
        features=final.manifest.features,
        verification_threshold=None if threshold is None else round(threshold, 4),
        provenance=provenance,
        metrics=metrics,
        class_centroids=centroids,
        known_threshold=None if known_threshold is None else round(known_threshold, 4),
        cohort=cohort,
        cohort_top=cohort_top or None,
        verification_norm=cal.verification_norm,
        identify_threshold=None if cal.identify_threshold is None else round(cal.identify_threshold, 4),
    )
    summary = {"metrics": metrics, "history": history, "test": test, "provenance": provenance}
    report_dir = out_dir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_report(report_dir, history, test, labels)
    log.info("wrote %s/weights; test accuracy %.4f, EER %s; %.0f s", out_dir, test["accuracy"], test["eer"], wall)
    return weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.training.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="manifest.jsonl folder or class sub-folders")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--stop-after", type=int, help="end this run after N epochs (resume later)")
    defaults = TrainConfig()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if name == "arch":
            parser.add_argument(flag, default=value, choices=sorted(ARCHITECTURES))
        elif isinstance(value, tuple):
            parser.add_argument(flag, type=float, nargs="*", default=value, help=f"default {value}")
        elif name == "bf16":
            parser.add_argument(flag, default=value, choices=["auto", "on", "off"])
        elif isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=f"default {value}")
        else:
            parser.add_argument(flag, type=type(value), default=value, help=f"default {value}")
    parser.add_argument("--n-mels", type=int, default=FeatureConfig.n_mels, help="mel bands of the front end")
    parser.add_argument("--hop-ms", type=float, default=FeatureConfig.hop_ms, help="frame hop of the front end")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        cfg = TrainConfig(**{name: getattr(args, name) for name in asdict(defaults)})
    except ValueError as e:
        parser.error(str(e))
    train(args.data, args.out, cfg, FeatureConfig(n_mels=args.n_mels, hop_ms=args.hop_ms), args.resume, args.stop_after)
    return 0


if __name__ == "__main__":
    sys.exit(main())
