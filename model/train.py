"""Train the seed's ResNet on any folder of labelled audio and write a weights directory.

    python -m model.train --data DIR --arch resnet18 --out DIR [--epochs N] [--resume]

Random crops, features from the same front end the service uses, lossy-codec and SpecAugment
augmentation, a one-cycle learning-rate schedule, a checkpoint every epoch (``--resume`` continues from it),
validation accuracy and same/different-voice EER every epoch, early stopping, bf16 autocast
where the CPU supports it. Writes ``OUT/weights/`` (metrics and the calibrated verification
threshold in the manifest) and a report: ``OUT/report/{curves,confusion}.png`` and
``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import random
import shlex
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
from model.data import Dataset, load_waves, random_crop, scan
from model.features import FeatureConfig, LogMelSpectrogram
from model.metrics import summarise
from model.resnet import ARCHITECTURES, ResNet, build
from model.weights import EmbeddingModel, Manifest, save

log = logging.getLogger(__name__)


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


def bf16_supported() -> bool:
    """True where oneDNN has native bf16 kernels (AVX512-BF16 / AMX); elsewhere bf16 is slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def use_bf16(choice: str) -> bool:
    return choice == "on" or (choice == "auto" and bf16_supported())


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


def train_step(
    network: ResNet,
    features: LogMelSpectrogram,
    augment: nn.Module,
    optimizer: torch.optim.Optimizer,
    waves: Tensor,
    targets: Tensor,
    label_smoothing: float,
    bf16: bool,
) -> float:
    """One optimisation step on a batch of equal-length waveforms; returns the loss."""
    network.train()
    feats = augment(features(waves))  # (B, 1, n_mels, T)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits, _ = network(feats)
    loss = F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


@torch.inference_mode()
def run_eval(model: EmbeddingModel, waves: list[Tensor], labels: list[int], max_s: float) -> dict[str, Any]:
    """Whole-clip logits and embeddings (up to ``max_s`` each) -> summary metrics."""
    max_len = int(max_s * model.sample_rate)
    results = [model.infer(w[:max_len]) for w in waves]
    logits = torch.stack([r.logits for r in results])
    emb = torch.stack([r.embedding for r in results])
    return summarise(logits, emb, torch.tensor(labels), model.labels)


def _score(record: dict[str, Any]) -> tuple[float, float]:
    """Higher is better: validation accuracy, then lower EER."""
    eer = record["val_eer"]
    return record["val_accuracy"], -(eer if eer is not None else 1.0)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


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
    axes[2].plot(epochs, [100 * (h["val_eer"] or 0) for h in history], marker="o")
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
    labels = dataset.labels
    train_items, val_items = dataset.split("train"), dataset.split("val")
    if not train_items or not val_items:
        raise SystemExit(f"{data_dir}: need both train and val clips (found {len(train_items)}, {len(val_items)})")
    sr = feature_cfg.sample_rate
    train_waves = load_waves(train_items, sr, "loading train")
    val_waves = load_waves(val_items, sr, "loading val")
    train_targets = torch.tensor([it.label for it in train_items])
    val_labels = [it.label for it in val_items]

    network = build(cfg.arch, num_classes=len(labels), embedding_size=cfg.embedding_size)
    features = LogMelSpectrogram(feature_cfg)
    augment = SpecAugment(cfg.freq_mask, cfg.time_mask)
    codec_augment = CodecAugment(cfg.codec_share, feature_cfg.sample_rate)
    bf16 = use_bf16(cfg.bf16)
    steps_per_epoch = math.ceil(len(train_items) / cfg.batch_size)
    optimizer = torch.optim.AdamW(network.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15
    )
    manifest = Manifest(cfg.arch, len(labels), cfg.embedding_size, labels, feature_cfg)
    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    start_epoch = 0
    ckpt_path = out_dir / "checkpoint.pt"
    if resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if state["scheduler"]["total_steps"] != cfg.epochs * steps_per_epoch:
            raise SystemExit(f"{ckpt_path}: resume with the checkpoint's --epochs and --batch-size")
        network.load_state_dict(state["network"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        history, best, start_epoch = state["history"], state["best"], state["epoch"]
        started -= state["elapsed_s"]
        log.info("resumed from %s at epoch %d", ckpt_path, start_epoch)
    crop = int(cfg.crop_s * sr)
    log.info(
        "%d train / %d val clips, %d classes, %s, bf16=%s, %d threads",
        len(train_items), len(val_items), len(labels), cfg.arch, bf16, torch.get_num_threads(),
    )  # fmt: skip

    for epoch in range(start_epoch, cfg.epochs):
        order = torch.randperm(len(train_items), generator=gen)
        losses, correct = [], 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step")
        for step in bar:
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            waves = torch.stack([random_crop(train_waves[i], crop, gen) for i in idx.tolist()])
            waves = codec_augment(waves, gen)
            gains = 10 ** (torch.empty(len(idx), 1).uniform_(-0.5, 0.3, generator=gen))  # +-dB, beyond the corpus
            loss = train_step(
                network, features, augment, optimizer, waves * gains, train_targets[idx], cfg.label_smoothing, bf16
            )
            scheduler.step()
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        with torch.inference_mode():
            network.eval()
            # accuracy on a fresh set of training crops, without augmentation
            sample = order[: min(len(order), 256)]
            crops = torch.stack([random_crop(train_waves[i], crop, gen) for i in sample.tolist()])
            logits, _ = network(features(crops))
            correct = int((logits.argmax(-1) == train_targets[sample]).sum())
        val = run_eval(EmbeddingModel(network, manifest), val_waves, val_labels, cfg.eval_max_s)
        record = {
            "epoch": epoch + 1,
            "train_loss": sum(losses) / len(losses),
            "train_accuracy": correct / len(sample),
            "val_accuracy": val["accuracy"],
            "val_eer": val["eer"],
            "val_eer_threshold": val["eer_threshold"],
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
    test_items = dataset.split("test")
    if test_items:
        test_waves = load_waves(test_items, sr, "loading test")
        test = run_eval(final, test_waves, [it.label for it in test_items], cfg.eval_max_s)
    else:
        test = run_eval(final, val_waves, val_labels, cfg.eval_max_s)
    wall = time.time() - started
    metrics = {
        "best_epoch": best["epoch"],
        "val_accuracy": best["val_accuracy"],
        "val_eer": best["val_eer"],
        "test_split": "test" if test_items else "val",
        "test_accuracy": test["accuracy"],
        "test_eer": test["eer"],
        "test_per_class_accuracy": test["per_class_accuracy"],
    }
    provenance = {
        "name": f"voice-embed-{cfg.arch}",
        "trained_on": str(data_dir),
        "train_command": shlex.join(["python", "-m", "model.train", *sys.argv[1:]]),
        "train_config": asdict(cfg),
        "train_clips": len(train_items),
        "train_wall_s": round(wall, 1),
        "host": {
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    weights = save(
        network,
        out_dir / "weights",
        architecture=cfg.arch,
        labels=labels,
        features=feature_cfg,
        verification_threshold=None if best["val_eer_threshold"] is None else round(best["val_eer_threshold"], 4),
        provenance=provenance,
        metrics=metrics,
    )
    summary = {"metrics": metrics, "history": history, "test": test, "provenance": provenance}
    report = out_dir / "report"
    report.mkdir(parents=True, exist_ok=True)
    (report / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_report(report, history, test, labels)
    log.info("wrote %s/weights; test accuracy %.4f, EER %s; %.0f s", out_dir, test["accuracy"], test["eer"], wall)
    return weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="manifest.jsonl folder or class sub-folders")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--stop-after", type=int, help="end this run after N epochs (resume later)")
    defaults = TrainConfig()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if name == "arch":
            parser.add_argument(flag, default=value, choices=sorted(ARCHITECTURES))
        elif name == "bf16":
            parser.add_argument(flag, default=value, choices=["auto", "on", "off"])
        else:
            parser.add_argument(flag, type=type(value), default=value, help=f"default {value}")
    parser.add_argument("--n-mels", type=int, default=FeatureConfig.n_mels)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = TrainConfig(**{name: getattr(args, name) for name in asdict(defaults)})
    train(args.data, args.out, cfg, FeatureConfig(n_mels=args.n_mels), args.resume, args.stop_after)
    return 0


if __name__ == "__main__":
    sys.exit(main())
