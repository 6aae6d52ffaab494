"""Corpus generator, training pipeline and the shipped weights (issue 3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import model
from model.training import corpus
from model.audio import load as load_audio
from model.training.data import random_crop, scan
from model.training.evaluate import evaluate
from model.features import FeatureConfig, LogMelSpectrogram
from model.training.train import CODEC_SETTINGS, CodecAugment, SpecAugment, TrainConfig, train, train_step
from tests.conftest import SHIPPED_WEIGHTS, speech


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    corpus.generate(out, per_voice=20, seed=3)
    return out


def test_generator_writes_every_voice_with_disjoint_sentence_splits(tiny_corpus):
    rows = [json.loads(line) for line in (tiny_corpus / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 180
    assert json.loads((tiny_corpus / "labels.json").read_text()) == corpus.LABELS
    assert {r["label"] for r in rows} == set(range(9))
    by_split: dict[str, set[int]] = {}
    for r in rows:
        by_split.setdefault(r["split"], set()).add(r["sentence_id"])
        wave = load_audio(tiny_corpus / r["path"], 16000)
        assert 0.5 < wave.numel() / 16000 <= corpus.MAX_SECONDS + 0.1
        assert wave.abs().max() > 0.01
    assert set(by_split) == {"train", "val", "test"}
    assert not (by_split["train"] & (by_split["val"] | by_split["test"]))


def test_generation_is_reproducible_and_resumable(tiny_corpus, tmp_path):
    clips = corpus.plan(20, seed=3)
    assert clips == corpus.plan(20, seed=3)
    wav = next(c for c in clips if c.path.endswith(".wav"))
    corpus.make_clip(wav, tmp_path, seed=3)
    assert (tmp_path / wav.path).read_bytes() == (tiny_corpus / wav.path).read_bytes()
    before = (tmp_path / wav.path).stat().st_mtime_ns
    corpus.make_clip(wav, tmp_path, seed=3)  # already there: kept, not redone
    assert (tmp_path / wav.path).stat().st_mtime_ns == before


@pytest.mark.parametrize("unseen", ["noise", "codec", "rate", "all"])
def test_unseen_conditions_differ_from_the_standard_set(unseen):
    standard = corpus.plan(40, seed=0)
    clips = corpus.plan(5, seed=0, unseen=unseen)
    rates = [c.conditions["rate"] for c in clips]
    if unseen in ("rate", "all"):
        assert all(not 0.8 <= r <= 1.25 for r in rates)
        assert all(0.8 <= c.conditions["rate"] <= 1.25 for c in standard)
    if unseen in ("noise", "all"):
        assert {c.conditions.get("noise") for c in clips} == {"hum"}
        assert "hum" not in {c.conditions.get("noise") for c in standard}
    if unseen in ("codec", "all"):
        assert {c.conditions["codec"] for c in clips} <= set(corpus.UNSEEN_CODECS)
        assert not set(corpus.UNSEEN_CODECS) & {c.conditions.get("codec") for c in standard}
        unseen_kbps = dict(codec.split(":") for codec in corpus.UNSEEN_CODECS)
        for c in standard:
            if "codec" in c.conditions:  # every standard bitrate lies above the unseen one
                kind, kbps = c.conditions["codec"].split(":")
                assert int(kbps.rstrip("k")) > int(unseen_kbps[kind].rstrip("k"))
    assert not {c.text for c in clips} & {c.text for c in standard}
    assert {c.split for c in clips} == {"test"}


def test_one_training_step_lowers_the_loss(tiny_corpus):
    torch.manual_seed(0)
    data = scan(tiny_corpus)
    items = data.split("train")[:16]
    gen = torch.Generator().manual_seed(0)
    waves = torch.stack([random_crop(load_audio(it.path, 16000), 8000, gen) for it in items])
    targets = torch.tensor([it.label for it in items])
    net = model.ResNet18()
    features = LogMelSpectrogram()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)

    def loss_now() -> float:
        net.train()
        with torch.no_grad():
            logits, _ = net(features(waves))
        return float(torch.nn.functional.cross_entropy(logits, targets))

    before = loss_now()
    train_step(net, features, torch.nn.Identity(), opt, waves, targets, 0.0, bf16=False)
    assert loss_now() < before


def test_spec_augment_masks_each_item_differently():
    feats = torch.ones(4, 1, 80, 100)
    masked = SpecAugment(20, 30)(feats)
    assert (masked == 0).any()
    assert not all(torch.equal(masked[0], masked[i]) for i in range(1, 4))


def _share_above(wave: torch.Tensor, hz: float) -> float:
    power = torch.stft(wave, 512, 160, window=torch.hann_window(512), return_complex=True).abs() ** 2
    return float(power[torch.fft.rfftfreq(512, 1 / 16000) > hz].sum() / power.sum())


def test_codec_augment_codes_crops_like_low_bitrate_voip():
    t = torch.arange(16000) / 16000
    crop = speech(5)[:16000] + 0.05 * torch.sin(2 * torch.pi * 6000 * t)  # speech plus a 6 kHz tone
    assert _share_above(crop, 4500) > 0.01
    augment = CodecAugment(1.0, 16000)
    for setting in CODEC_SETTINGS:
        out = augment.one(crop, setting)
        assert out.shape == crop.shape and torch.isfinite(out).all()
        assert 0.5 < float(out.norm() / crop.norm()) < 1.5, setting  # the signal, not silence
        if setting[2] == 4000:  # narrowband Opus: nothing left above 4 kHz
            assert _share_above(out, 4500) < 1e-3, setting
    batch = torch.stack([crop] * 4)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(CodecAugment(0.0, 16000)(batch, gen), batch)
    coded = augment(batch, gen)
    assert all(not torch.equal(row, crop) for row in coded)


def test_training_features_equal_serving_features(tiny_corpus):
    """Golden test: the training pipeline and the service featurise a clip identically."""
    item = scan(tiny_corpus).split("train")[0]
    wave = load_audio(item.path, 16000)  # training's loader
    served = model.EmbeddingModel(model.ResNet18(), model.Manifest("resnet18", 9, 256, corpus.LABELS, FeatureConfig()))
    from model.audio import decode

    serving_wave = served.prepare(decode(item.path.read_bytes(), downmix=True))  # the service's path
    assert torch.equal(wave, serving_wave)
    assert torch.equal(LogMelSpectrogram()(wave), served.features(serving_wave))


def test_train_cli_writes_loadable_weights_report_and_resumes(tiny_corpus, tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=12, crop_s=0.5, patience=5)
    train(tiny_corpus, tmp_path, cfg, FeatureConfig(), resume=False, stop_after=1)  # an interrupted run
    first = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert [h["epoch"] for h in first["history"]] == [1]
    manifest = train(tiny_corpus, tmp_path, cfg, FeatureConfig(), resume=True)
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    assert (tmp_path / "report" / "curves.png").stat().st_size > 1000
    assert (tmp_path / "report" / "confusion.png").stat().st_size > 1000
    loaded = model.load(tmp_path / "weights")
    assert loaded.manifest.sha256 == manifest.sha256
    assert loaded.labels == corpus.LABELS
    assert loaded.manifest.verification_threshold is not None
    assert {"val_accuracy", "val_eer", "test_accuracy", "test_eer"} <= set(loaded.manifest.metrics)
    # save -> reload gives identical outputs
    x = torch.randn(2, 1, 80, 120)
    again = model.load(tmp_path / "weights")
    with torch.inference_mode():
        assert torch.equal(loaded.network(x)[1], again.network(x)[1])
    summary = evaluate(loaded, tiny_corpus, "test")
    assert summary["clips"] == 18 and len(summary["confusion_matrix"]) == 9


@pytest.fixture(scope="module")
def shipped() -> model.EmbeddingModel:
    return model.load(SHIPPED_WEIGHTS)


def test_shipped_weights_load_and_pass_every_check(shipped):
    assert shipped.manifest.architecture == "resnet18"
    assert shipped.labels == corpus.LABELS
    assert shipped.manifest.embedding_size == 256 and shipped.sample_rate == 16000
    assert shipped.manifest.features.n_mels == 80
    m = shipped.manifest.metrics
    assert m["test_accuracy"] >= 0.98 and m["test_eer"] <= 0.02


@pytest.mark.parametrize("label", range(9))
def test_shipped_weights_classify_fresh_sentences_of_each_voice(shipped, label):
    for index in range(2):
        result = shipped.infer(speech(label, index))
        assert corpus.LABELS[int(result.logits.argmax())] == corpus.LABELS[label]
