"""Corpus generator, voice catalogue, training pipeline, open-set metrics and the shipped weights."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import safetensors.torch
import torch

import model
from model.audio import load as load_audio
from model.features import FeatureConfig, LogMelSpectrogram
from model.resnet import build
from model.training import corpus, enrolment, provenance, voices
from model.training.calibrate import NORM_MIN_VOICES, Embedder, embed_all
from model.training.calibrate import main as calibrate_main
from model.training.centre import fold_affine, spread_statistics, voice_weighting, whitening
from model.training.centre import main as centre_main
from model.training.data import UNLABELLED, load_waves, scan, speed_crop
from model.training.evaluate import embed_split, evaluate, evaluate_open_set
from model.training.evaluate import main as evaluate_main
from model.training.metrics import equal_error_rate, leave_one_out_centroid, min_dcf, open_set_report, threshold_at_far
from model.training.train import (
    CODEC_SETTINGS,
    AdditiveAngularMargin,
    CodecAugment,
    SpecAugment,
    TrainConfig,
    pseudo_speakers,
    train,
    warm_start,
)
from tests.conftest import SHIPPED_WEIGHTS, speech

# The 9 labelled voices x 10 clips (8 to train on, 1 to validate, 1 to test), plus 2 catalogue
# training voices x 3 clips and 2 open-set validation and 2 open-set test voices x 8 clips each.
TINY = {"per_voice": 10, "seed": 3, "extra_per_voice": 3, "open_per_voice": 8, "voice_limit": 2}
TINY_COMMAND = "python -m model.training.corpus tiny --per-voice 10 --seed 3"  # what corpus.json records


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    corpus.generate(out, **TINY, command=TINY_COMMAND)
    return out


def test_generator_writes_every_voice_with_disjoint_sentence_splits(tiny_corpus):
    rows = [json.loads(line) for line in (tiny_corpus / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 90 + 2 * 3 + 4 * 8
    assert json.loads((tiny_corpus / "labels.json").read_text()) == corpus.LABELS
    assert {r["label"] for r in rows} == {*range(9), None}
    by_split: dict[str, set[int]] = {}
    for r in rows:
        by_split.setdefault(r["split"], set()).add(r["sentence_id"])
        wave = load_audio(tiny_corpus / r["path"], 16000)
        assert 0.5 < wave.numel() / 16000 <= corpus.MAX_SECONDS + 0.1
        assert wave.abs().max() > 0.01
    assert set(by_split) == {"train", "val", "test", "open-val", "open-test"}
    assert not (by_split["train"] & (by_split["val"] | by_split["test"]))
    assert by_split["open-test"] <= {sid for sid in range(corpus.SENTENCE_POOL) if corpus.split_of(sid) == "test"}
    roles = {v["voice"]: v["role"] for v in json.loads((tiny_corpus / "voices.json").read_text())}
    for r in rows:  # unlabelled rows are exactly the catalogue's other voices, in their role's split
        assert (r["label"] is None) == (roles[r["voice"]] != "label")
        assert r["label"] is None or corpus.LABELS[r["label"]] == r["voice"]
        if r["label"] is None:
            assert r["split"] == roles[r["voice"]]


def test_labelled_voices_and_their_clips_do_not_depend_on_the_catalogue():
    assert [(v.label, v.engine, v.name, v.warp) for v in corpus.VOICES] == [
        ("flite-awb", "flite", "awb", 1.0),
        ("flite-rms", "flite", "rms", 1.0),
        ("flite-slt", "flite", "slt", 1.0),
        ("flite-kal16", "flite", "kal16", 1.0),
        ("festival-ked", "festival", "voice_ked_diphone", 1.0),
        ("espeak-en-us-m3", "espeak", "en-us+m3", 1.0),
        ("espeak-en-us-f2", "espeak", "en-us+f2", 1.0),
        ("espeak-en-gb-m7", "espeak", "en-gb+m7", 1.0),
        ("espeak-en-gb-scotland-f4", "espeak", "en-gb-scotland+f4", 1.0),
    ]
    assert corpus.plan(200, 0, extra_per_voice=12, open_per_voice=12)[:1800] == corpus.plan(200, 0)


@pytest.mark.parametrize(
    ("engine", "name"),
    [
        ("espeak", "en-us+m1"),
        ("espeak", "en-gb-scotland+f5"),
        ("espeak", "en-029+David"),  # any case: espeak-ng would silently fall back, we refuse
        ("espeak", "en-gb-x-rp+ANNIE"),
        ("espeak", "en-us+klatt2"),
        ("espeak", "en-us+AnxiousAndy"),  # a near copy of the reserved Andy
        ("festival", "voice_lp_diphone"),
        ("festival", "voice_pc_diphone"),
    ],
)
def test_catalogue_refuses_reserved_voices(engine, name):
    with pytest.raises(voices.ReservedVoiceError):
        voices.Voice("anything", engine, name, 1.0, "train")


def test_catalogue_has_hundreds_of_voices_and_a_held_out_open_set():
    cat = voices.catalogue()
    reserved = voices.RESERVED_ESPEAK_VARIANTS | voices.NEAR_RESERVED_ESPEAK_VARIANTS
    variants = {v.variant for v in cat if v.engine == "espeak"}
    assert not {x.lower() for x in variants} & reserved
    assert not {v.name.removeprefix("voice_") for v in cat if v.engine == "festival"} & {"lp_diphone", "pc_diphone"}
    by_role: dict[str, list[voices.Voice]] = {}
    for v in cat:
        by_role.setdefault(v.role, []).append(v)
    assert [v.label for v in by_role["label"]] == corpus.LABELS
    assert len(by_role["train"]) + len(by_role["label"]) >= 300
    assert len(by_role["open-val"]) >= 10 and len(by_role["open-test"]) >= 12
    usable = voices.usable_variants()
    family = lambda v: voices.family(v.variant, usable)  # noqa: E731
    trained = {family(v) for v in by_role["train"] + by_role["label"] if v.engine == "espeak"}
    held = [family(v) for v in by_role["open-val"] + by_role["open-test"]]
    assert len(set(held)) == len(held) and not set(held) & trained  # whole variant families held out
    assert all(v.warp == 1.0 for v in by_role["open-val"] + by_role["open-test"])
    assert voices.catalogue() == cat  # a fixed draw


def test_every_catalogue_espeak_voice_sounds_different():
    """Two labels for one voice teach the embedding that one voice is two (and a held-out voice
    that is a training voice under another name is no held-out voice). espeak-ng silently ignores
    some variants: this hears each voice of the catalogue say the same sentence."""

    def say(v: voices.Voice) -> subprocess.CompletedProcess[bytes]:
        cmd = [*corpus.espeak_command(v), "--stdout", "Seven bright voices read the quiet letter aloud."]
        return subprocess.run(cmd, check=True, capture_output=True, timeout=60)

    heard = [v for v in voices.catalogue() if v.engine == "espeak" and v.warp == 1.0]
    seen: dict[str, str] = {}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # one espeak-ng process per voice, 4 at a time
        said = list(pool.map(say, heard))
    for v, done in zip(heard, said, strict=True):
        assert not done.stderr, f"{v.label}: {done.stderr.decode()}"  # e.g. espeak-ng's voice list is full
        digest = hashlib.sha256(done.stdout[44:]).hexdigest()  # past the header
        assert digest not in seen, f"{v.label} sounds exactly like {seen[digest]}"
        seen[digest] = v.label
    synthetic = [label for label in seen.values() if voices.SYNTHETIC_PREFIX in label]
    assert len(synthetic) == voices.SYNTHETIC_VARIANTS  # our own variant files are heard, each a voice
    assert len(seen) > 550  # every espeak voice of the catalogue was heard


def _pitch_and_formants(text: str) -> list[float]:
    """A variant file's base pitch and formant 0-5 frequencies (%), espeak-ng's defaults where unset."""
    values = [82.0] + [100.0] * 6
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["pitch"]:
            values[0] = float(words[1])
        elif words[:1] == ["formant"] and int(words[1]) <= 5:
            values[1 + int(words[1])] = float(words[2])
    return values


# What a variant file sets besides the voice itself: its name and language, the pitch, an
# equaliser (tone), a room (echo) and the prosody
NOT_THE_VOICE = {
    "name", "language", "gender", "pitch", "tone", "echo", "intonation", "stressadd", "stressamp", "stresslength",
}  # fmt: skip


def _voice_settings(text: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """A variant file's settings other than ``NOT_THE_VOICE``: the formants, voicing, breath, ..."""
    settings: dict[str, tuple[str, ...]] = {}
    for line in text.splitlines():
        words = line.split("//")[0].split()
        if not words or words[0].startswith("#") or words[0].lower() in NOT_THE_VOICE:
            continue
        key = 2 if words[0] == "formant" else 1
        settings[" ".join(words[:key])] = tuple(words[key:])
    return tuple(sorted(settings.items()))


def test_no_held_out_voice_is_a_voice_of_another_family():
    """espeak-ng ships variant files of different names that are one voice ("Henrique" is "Hugo"
    with another equaliser; "RicishayMax" is "max" with an echo). Each such group that spans
    families is listed in SAME_VOICE_ESPEAK_VARIANTS, and no family with a member in one is held
    out: a held-out voice would otherwise be trained on, or held out twice."""
    variant_dir = corpus.espeak_system_data() / "voices" / "!v"
    usable = voices.usable_variants()
    by_settings: dict[tuple[tuple[str, tuple[str, ...]], ...], set[str]] = {}
    for v in usable:
        by_settings.setdefault(_voice_settings((variant_dir / v).read_text(errors="replace")), set()).add(v)
    spanning = {frozenset(g) for g in by_settings.values() if len({voices.family(v, usable) for v in g}) > 1}
    assert spanning == set(voices.SAME_VOICE_ESPEAK_VARIANTS)
    cat = voices.catalogue()
    held = {voices.family(v.variant, usable) for v in cat if v.role in ("open-val", "open-test")}
    trained = {v.variant for v in cat if v.role in ("train", "label") and v.engine == "espeak"}
    for group in spanning:
        assert not {voices.family(v, usable) for v in group} & held, sorted(group)
    assert {"Diogo", "michel", "max", "m8"} <= trained  # the training voices stay as they were


def test_synthetic_variants_are_no_copy_of_a_reserved_voice():
    """The synthetic variants are drawn without looking at the reserved voices; this checks the draw
    copies none of them: each differs from every reserved variant file (and AnxiousAndy) by at least
    3 % in base pitch or in one of formants 0-5, and none uses klatt2's synthesiser (``klatt 2``)."""
    variant_dir = corpus.espeak_system_data() / "voices" / "!v"
    keep_out = voices.RESERVED_ESPEAK_VARIANTS | voices.NEAR_RESERVED_ESPEAK_VARIANTS
    reserved = {f.name: _pitch_and_formants(f.read_text()) for f in variant_dir.iterdir() if f.name.lower() in keep_out}
    assert len(reserved) == len(keep_out)
    for name, text in voices.synthetic_variants().items():
        assert "klatt 2" not in text
        ours = _pitch_and_formants(text)
        for other, theirs in reserved.items():
            gap = max(
                abs(ours[0] - theirs[0]) / theirs[0],
                *(abs(a - b) / 100 for a, b in zip(ours[1:], theirs[1:], strict=True)),
            )
            assert gap >= 0.03, f"{name} is within {gap:.0%} of reserved {other}"


def test_generation_is_reproducible_and_resumable(tiny_corpus, tmp_path):
    clips = corpus.plan(10, seed=3)
    assert clips == corpus.plan(10, seed=3)
    wav = next(c for c in clips if c.path.endswith(".wav"))
    corpus.make_clip(wav, tmp_path, seed=3)
    assert (tmp_path / wav.path).read_bytes() == (tiny_corpus / wav.path).read_bytes()
    before = (tmp_path / wav.path).stat().st_mtime_ns
    corpus.make_clip(wav, tmp_path, seed=3)  # already there: kept, not redone
    assert (tmp_path / wav.path).stat().st_mtime_ns == before


def test_corpus_record_counts_the_time_of_every_invocation_that_made_clips(tiny_corpus, tmp_path):
    record = provenance.read_corpus_record(tiny_corpus)
    assert record is not None and record["command"] == TINY_COMMAND and record["clips"] == 9 * 10 + 2 * 3 + 4 * 8
    (run,) = record["runs"]
    assert run["made"] == record["clips"] and record["wall_s"] == run["wall_s"] > 0
    assert run["machine"]["cpu_capability"] in {"AVX2", "AVX512", "DEFAULT"} and run["machine"]["cores"] >= 1
    assert {"cpu", "cpu_family", "cpu_model", "bf16_native", "torch"} <= set(run["machine"])
    # a corpus made in two goes counts both; a go that finds every clip on disk counts nothing
    provenance.record_corpus_run(tmp_path, "make corpus", 10, 2, 4, 30.0)
    provenance.record_corpus_run(tmp_path, "make corpus", 10, 2, 6, 50.0)
    again = provenance.record_corpus_run(tmp_path, "make corpus", 10, 2, 0, 5.0)
    assert again["wall_s"] == 80.0 and [r["made"] for r in again["runs"]] == [4, 6]
    assert provenance.read_corpus_record(tmp_path) == again
    other = provenance.record_corpus_run(tmp_path, "make corpus --seed 1", 10, 2, 10, 20.0)
    assert other["wall_s"] == 20.0 and len(other["runs"]) == 1  # another corpus: its own time only
    # corpus + training, and + the --init run's training where it was trained from scratch on it
    assert provenance.pipeline_wall_s(again, 100.0, None) == {"corpus": 80.0, "train": 100.0, "total": 180.0}
    first = {"provenance": {"corpus": again, "train_wall_s": 60.0}}
    assert provenance.pipeline_wall_s(again, 100.0, first)["total"] == 240.0
    assert provenance.pipeline_wall_s(other, 100.0, first) is None  # the first run had another corpus
    assert provenance.pipeline_wall_s(None, 100.0, None) is None


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


def test_angular_margin_lowers_only_the_target_logit():
    head = AdditiveAngularMargin(8, 5, scale=10.0, margin=0.0)
    emb, target = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    plain = head(emb, target)
    head.margin = 0.3
    margined = head(emb, target)
    onehot = torch.nn.functional.one_hot(target, 5).bool()
    assert torch.allclose(plain[~onehot], margined[~onehot])
    assert (margined[onehot] < plain[onehot]).all()


def test_folding_mean_and_whitening_transforms_the_embedding_and_keeps_the_logits():
    torch.manual_seed(0)
    x, mean = torch.randn(2, 1, 80, 60), torch.randn(256)
    transform = torch.eye(256) + 0.1 * torch.randn(256, 256)
    for a in (None, transform):
        network = model.ResNet18().eval()
        with torch.inference_mode():
            logits, emb = network(x)
        fold_affine(network, mean, a)
        with torch.inference_mode():
            folded_logits, folded = network(x)
        expected = emb - mean if a is None else (emb - mean) @ a.T
        assert torch.allclose(folded, expected, atol=1e-4)
        assert torch.allclose(folded_logits, logits, atol=1e-3)
        assert set(network.state_dict()) == set(model.ResNet18().state_dict())  # the seed's network still


def test_embedder_embeds_each_clip_once_and_follows_a_fold():
    """What centring embedded at the end of training is reused by calibration after the fold: each
    clip goes through the network's trunk once, and what it gives after the fold is bit for bit
    what the folded network gives (the shipped tensors must not change with it)."""
    loaded = model.load(SHIPPED_WEIGHTS)  # its own copy: the fold changes its network
    waves = [speech(label, 0) for label in range(3)]
    calls = []
    infer = loaded.infer
    loaded.infer = lambda wave, *args, **kw: (calls.append(wave), infer(wave, *args, **kw))[1]
    embed = Embedder(loaded, 8.0)
    first_logits, first = embed(waves[:2])
    assert len(calls) == 2
    plain_logits, plain = embed_all(loaded, waves[:2], 8.0)
    assert torch.equal(first, plain) and torch.equal(first_logits, plain_logits)
    calls.clear()
    _, again = embed([waves[1], *waves])
    assert len(calls) == 1 and torch.equal(again[0], first[1]) and torch.equal(again[1:3], first)
    torch.manual_seed(0)
    mean, transform = 0.1 * torch.randn(256), torch.eye(256) + 0.05 * torch.randn(256, 256)
    fold_affine(loaded.network, mean, transform)
    calls.clear()
    logits, moved = embed(waves)
    assert not calls  # nothing through the trunk again
    fresh_logits, fresh = embed_all(loaded, waves, 8.0)
    assert torch.equal(moved, fresh) and torch.equal(logits, fresh_logits)
    assert not torch.allclose(moved[:2], first, atol=1e-2)  # the fold did move them
    with pytest.raises(ValueError, match="fp32 PyTorch"):
        Embedder(model.load(SHIPPED_WEIGHTS).configure("bf16"), 8.0)


def test_whitening_makes_the_within_voice_spread_even():
    # clips of a voice vary 10x more along the first axis than along the others: after whitening
    # every direction spreads alike (as much as the average one did), so that axis no longer
    # dominates cosines
    torch.manual_seed(0)
    scale = torch.ones(16)
    scale[0] = 10.0
    residuals = torch.randn(4000, 16) * scale
    scatter = residuals.T @ residuals / len(residuals)
    a = whitening(scatter, ridge=0.0).float()
    after = residuals @ a.T
    covariance = after.T @ after / len(after)
    assert torch.allclose(covariance / scatter.trace() * 16, torch.eye(16), atol=0.01)
    assert torch.allclose(a, a.T, atol=1e-6)


def test_voice_weighting_keeps_the_axes_voices_differ_on_and_shrinks_the_others():
    # 200 voices differ along the first 4 of 16 axes; within a voice the clips spread alike along
    # all 16. Whitening alone leaves the 12 nuisance axes as long as the 4 that tell voices apart;
    # the weighting shrinks them, and more voices are told apart by cosine
    torch.manual_seed(0)
    voices, clips, dims = 200, 6, 16
    centres = torch.zeros(voices, dims)
    centres[:, :4] = 3 * torch.randn(voices, 4)
    emb = centres.repeat_interleave(clips, 0) + torch.randn(voices * clips, dims)
    _, scatter, _, between = spread_statistics(list(emb.double().split(clips)))
    weighting = voice_weighting(scatter, between).float()
    lengths = weighting.T.norm(dim=1)  # how long each original axis comes out
    assert lengths[:4].min() > 0.9 * lengths[:4].max() and lengths[4:].max() < 0.3 * lengths[:4].min()
    assert torch.linalg.matrix_rank(weighting) == dims  # invertible: it can be folded in
    torch.manual_seed(1)
    fresh = torch.zeros(40, dims)
    fresh[:, :4] = 3 * torch.randn(40, 4)
    test = fresh.repeat_interleave(clips, 0) + torch.randn(40 * clips, dims)
    test_labels = torch.arange(40).repeat_interleave(clips)
    whitened = test @ whitening(scatter).float().T
    weighted = test @ weighting.T
    assert equal_error_rate(weighted, test_labels)[0] < 0.8 * equal_error_rate(whitened, test_labels)[0]


def test_open_set_metrics_on_known_scores():
    # three voices, well apart, 8 clips each: perfect; then one clip moved onto another voice
    torch.manual_seed(0)
    centres = torch.eye(3, 16) * 5
    labels = [str(k) for k in range(3) for _ in range(8)]
    emb = centres.repeat_interleave(8, 0) + 0.1 * torch.randn(24, 16)
    report = open_set_report(emb, labels, [{"noise": "white"} if i % 2 else {} for i in range(24)])
    assert report["eer"] == 0.0 and report["centroid_accuracy"] == 1.0 and report["min_dcf"] == 0.0
    assert set(report["per_condition"]) == {"clean", "noise:white"}
    assert report["per_condition"]["clean"]["clips"] == 12
    emb[0] = centres[1]
    hits = leave_one_out_centroid(emb, torch.tensor([int(x) for x in labels]))
    assert not hits[0] and hits[1:].all()
    # minDCF: one target trial scored below one non-target trial
    scores, target = torch.tensor([0.9, 0.5, 0.6, 0.1]), torch.tensor([True, True, False, False])
    assert min_dcf(scores, target, p_target=0.5) == pytest.approx(0.5)  # best: miss 1 of 2 targets, no false accept
    # the verification threshold: the lowest score that accepts at most that share of different voices
    scores = torch.tensor([0.9, 0.8, 0.7, 0.4, 0.3, 0.2, 0.1])
    target = torch.tensor([True, True, False, False, True, False, False])
    assert threshold_at_far(scores, target, 0.0) == pytest.approx((0.8, 0.0, 1 / 3))
    assert threshold_at_far(scores, target, 0.25) == pytest.approx((0.7, 0.25, 1 / 3))
    assert threshold_at_far(scores, target, 0.5) == pytest.approx((0.3, 0.5, 0.0))
    top, far, frr = threshold_at_far(torch.tensor([0.6, 0.5]), torch.tensor([False, True]), 0.01)
    assert top > 0.6 and (far, frr) == (0.0, 1.0)
    report = open_set_report(emb, labels, target_far=0.01)
    assert report["far"] <= 0.01 and report["far_threshold"] >= report["eer_threshold"]


def test_spec_augment_masks_each_item_differently():
    feats = torch.ones(4, 1, 80, 100)
    masked = SpecAugment(20, 30)(feats)
    assert (masked == 0).any()
    assert not all(torch.equal(masked[0], masked[i]) for i in range(1, 4))


def _share_above(wave: torch.Tensor, hz: float) -> float:
    power = torch.stft(wave, 512, 160, window=torch.hann_window(512), return_complex=True).abs() ** 2
    return float(power[torch.fft.rfftfreq(512, 1 / 16000) > hz].sum() / power.sum())


def test_corpus_wav_clips_hold_the_samples_ffmpeg_writes(tmp_path):
    """The corpus writes its 16-bit WAV clips itself, not through FFmpeg: same samples, bit for bit
    (ties to even, full scale clipped), at both of the corpus's rates, readable by the service."""
    wave = (torch.rand(24000, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 0.9
    wave[:6] = torch.tensor([0.5, 1.5, -0.5, 2.5, -40000.0, 40000.0]) / 32768
    for rate in (16000, 8000):
        ours, theirs = tmp_path / f"ours-{rate}.wav", tmp_path / f"ffmpeg-{rate}.wav"
        corpus.encode(wave, rate, "wav", ours)
        corpus.ffmpeg_write(wave, rate, theirs, corpus.CODEC_OPTIONS["wav"])
        a, b = load_audio(ours, rate), load_audio(theirs, rate)
        assert a.shape == b.shape == wave.shape and torch.equal(a, b)
        assert (a[:6] * 32768).round().tolist() == [0, 2, 0, 2, -32768, 32767]


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


def test_train_cli_writes_loadable_weights_report_and_resumes(tiny_corpus, tmp_path, capsys):
    max_s = 2.0  # of each clip in evaluation and calibration (8 by default): whole-clip embedding is most of the time
    cfg = TrainConfig(
        epochs=2, batch_size=12, crop_s=0.5, patience=5, steps_per_epoch=3, centroid_clips=3, eval_max_s=max_s,
        speed_perturb=(0.9, 1.1),
    )  # fmt: skip
    # a coarse front end (0.16 of the default's pixels, so a sixth of the work): what is under test
    # is the pipeline, and that the run's front end reaches the weights and survives a resume
    features = FeatureConfig(n_mels=32, hop_ms=25)
    train(tiny_corpus, tmp_path, cfg, features, resume=False, stop_after=1)  # an interrupted run
    first = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert [h["epoch"] for h in first["history"]] == [1]
    manifest = train(tiny_corpus, tmp_path, cfg, features, resume=True)
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    assert (tmp_path / "report" / "curves.png").stat().st_size > 1000
    assert (tmp_path / "report" / "confusion.png").stat().st_size > 1000
    loaded = model.load(tmp_path / "weights")
    assert loaded.manifest.sha256 == manifest.sha256
    assert loaded.labels == corpus.LABELS and loaded.manifest.features == features
    assert loaded.manifest.verification_threshold is not None
    # the corpus's record and the run's own time and machine, added up
    made = loaded.manifest.provenance
    assert made["corpus"] == provenance.read_corpus_record(tiny_corpus) and made["host"]["cpu_capability"]
    pipeline = made["pipeline_wall_s"]
    assert pipeline["corpus"] == made["corpus"]["wall_s"] and pipeline["train"] == made["train_wall_s"]
    assert pipeline["total"] == pytest.approx(pipeline["corpus"] + pipeline["train"], abs=0.11)
    provenance.main([str(tmp_path / "weights")])  # what `make reproduce` prints at the end
    printed = capsys.readouterr().out
    assert f"({pipeline['total']:.0f} s)" in printed and made["host"]["cpu_capability"] in printed
    assert {"val_accuracy", "val_eer", "open_val_eer", "test_accuracy", "test_eer", "open_set_val"} <= set(
        loaded.manifest.metrics
    )
    # candidates are chosen on the validation voices: a run never measures the open-set test voices
    assert "open_set_test" not in loaded.manifest.metrics and loaded.manifest.metrics["open_set_val"]["voices"] == 2
    verification = loaded.manifest.metrics["calibration"]["verification"]
    assert "open-set validation voices" in verification["source"] and verification["target_far"] == 0.01
    assert verification["far"] <= 0.01 and 0 <= verification["frr"] <= 1 and 0 <= verification["eer"] <= 1
    # the training voices' mean is folded in only where it lowered the open-set validation EER
    centring = loaded.manifest.metrics["centring"]
    assert centring["applied"] == (centring["open_val_eer_after"] < centring["open_val_eer_before"])
    assert not centring["whitened"]
    # the margin head is training state: in the checkpoint, never in the weights
    tensors = safetensors.torch.load_file(str(tmp_path / "weights" / "model.safetensors"))
    assert set(tensors) == set(model.ResNet18().state_dict())
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    # one margin-head row per training voice, and one per speed for each unlabelled, unwarped one
    background = {it.voice for it in scan(tiny_corpus).split("train") if it.label == UNLABELLED}
    unwarped = {v for v in background if not voices.WARPED.search(v)}
    assert checkpoint["head"]["weight"].shape[0] == len(checkpoint["voices"]) + 2 * len(unwarped) > 9 + len(background)
    # class centroids and the known-voice threshold, for /classify's 'known'
    assert len(loaded.manifest.class_centroids) == 9 and loaded.manifest.known_threshold is not None
    found = loaded.nearest_class(torch.tensor(loaded.manifest.class_centroids[4]))
    assert found is not None and found[0] == 4
    # ... and the background voices of the known-voice score: the training voices outside the
    # classes, beside the weights (not in the network's tensors), at most 3 of them averaged
    cohort = loaded.manifest.known_cohort
    assert cohort is not None and cohort["voices"] == len(background) == len(loaded.manifest.cohort)
    assert cohort["top"] == min(3, len(background)) and (tmp_path / "weights" / "cohort.safetensors").is_file()
    known = loaded.manifest.metrics["calibration"]["known"]
    assert "training voices outside the classes" in known["source"]
    assert all(0 <= eer <= 1 for eer in known["eer_without_cohort"].values())
    # its threshold takes at most 5 % of the open-set validation voices' clips for one of the classes
    _, open_val_emb = embed_split(loaded, tiny_corpus, "open-val")
    taken = [found[2] for found in map(loaded.nearest_class, open_val_emb) if found is not None]
    assert known["target_far"] == 0.05 and sum(taken) / len(open_val_emb) <= 0.05
    # /verify's scores: 2 background voices are too few for adaptive s-norm (each side's spread
    # over 2 cosines is no estimate), so plain cosines and a cosine threshold, saying why
    # (the guide's test, with 15 of them, has adaptive s-norm)
    assert len(background) < NORM_MIN_VOICES and loaded.manifest.verification_norm is None
    assert "too few for adaptive s-norm" in verification["source"]
    assert -1 <= loaded.manifest.verification_threshold <= 1
    # /identify's threshold: /identify's protocol on the validation voices, never below /verify's
    identify = loaded.manifest.metrics["calibration"]["identify"]
    assert loaded.manifest.identify_threshold is not None and identify["target_far"] == 0.05
    assert loaded.manifest.identify_threshold >= loaded.manifest.verification_threshold
    (group,) = identify["groups"].values()
    assert group["enrolled_voices"] == 1 and group["never_enrolled_voices"] == 1
    answered = group["never_enrolled_answered_none"]
    assert answered >= 0.95 or loaded.manifest.identify_threshold == loaded.manifest.verification_threshold
    # save -> reload gives identical outputs
    x = torch.randn(2, 1, features.n_mels, 120)
    again = model.load(tmp_path / "weights")
    with torch.inference_mode():
        assert torch.equal(loaded.network(x)[1], again.network(x)[1])
    summary = evaluate(loaded, tiny_corpus, "test")
    assert summary["clips"] == 9 and len(summary["confusion_matrix"]) == 9
    open_set = evaluate_open_set(loaded, tiny_corpus, "open-test")
    assert open_set["voices"] == 2 and open_set["clips"] == 16 and open_set["min_clips_per_voice"] == 8
    assert 0 <= open_set["eer"] <= 1 and 0 <= open_set["centroid_accuracy"] <= 1 and open_set["per_condition"]
    assert 0 <= open_set["flagged_unknown"] <= 1 and open_set["classes_flagged_unknown"]["clips"] == 9
    assert "score" not in open_set and "eer_cosine" not in open_set  # cosines: nothing to set beside them
    # recalibrating on the training corpus reproduces what training calibrated
    again_dir = tmp_path / "recalibrated"
    shutil.copytree(tmp_path / "weights", again_dir)
    assert calibrate_main([str(again_dir), str(tiny_corpus), "--centroid-clips", "3", "--max-s", str(max_s)]) == 0
    recalibrated = model.load(again_dir).manifest
    assert recalibrated.verification_threshold == loaded.manifest.verification_threshold
    assert recalibrated.known_threshold == loaded.manifest.known_threshold
    assert recalibrated.class_centroids == loaded.manifest.class_centroids
    assert recalibrated.known_cohort is not None and recalibrated.known_cohort["top"] == cohort["top"]
    assert recalibrated.verification_norm == loaded.manifest.verification_norm
    assert recalibrated.identify_threshold == loaded.manifest.identify_threshold
    assert recalibrated.cohort is not None and loaded.manifest.cohort is not None
    assert torch.allclose(recalibrated.cohort.float(), loaded.manifest.cohort.float(), atol=2e-3)
    # allowed to take half of the other voices' clips for a class, the threshold comes down
    assert (
        calibrate_main(
            [str(again_dir), str(tiny_corpus), "--centroid-clips", "3", "--max-s", str(max_s), "--known-far", "0.5"]
        )
        == 0
    )
    lenient = model.load(again_dir).manifest
    assert lenient.known_threshold is not None and loaded.manifest.known_threshold is not None
    assert lenient.known_threshold < loaded.manifest.known_threshold
    assert lenient.metrics["calibration"]["known"]["target_far"] == 0.5
    # centring existing weights: written only where it lowers the open-set validation EER, and then
    # the embedding moves by one constant vector while the logits stay; asked to whiten with too
    # few clips to estimate it (3 here for 256 dimensions), it only centres
    out = tmp_path / "centred"
    args = [str(tmp_path / "weights"), str(tiny_corpus), "--out", str(out), "--clips-per-voice", "1", "--whiten"]
    if centre_main([*args, "--centroid-clips", "3", "--max-s", str(max_s)]) == 0:
        centred = model.load(out)
        info = centred.manifest.metrics["centring"]
        assert info["applied"] and info["open_val_eer_after"] < info["open_val_eer_before"] and not info["whitened"]
        assert centred.manifest.sha256 != loaded.manifest.sha256
        with torch.inference_mode():
            (logits, emb), (new_logits, new_emb) = loaded.network(x), centred.network(x)
        assert torch.allclose(new_logits, logits, atol=1e-4)
        shift = emb - new_emb
        assert torch.allclose(shift[0], shift[1], atol=1e-4) and shift[0].norm() > 0
    else:
        assert not out.exists()


@pytest.fixture(scope="module")
def shipped() -> model.EmbeddingModel:
    return model.load(SHIPPED_WEIGHTS)


def test_shipped_weights_load_and_pass_every_check(shipped):
    assert shipped.manifest.architecture == "resnet18"
    assert shipped.labels == corpus.LABELS
    assert shipped.manifest.embedding_size == 256 and shipped.sample_rate == 16000
    assert (shipped.manifest.features.n_mels, shipped.manifest.features.hop_ms) == (64, 20.0)  # make train's recipe
    m = shipped.manifest.metrics
    assert m["test_accuracy"] >= 0.98 and m["test_eer"] <= 0.02


def test_evaluate_records_what_it_measured_in_the_manifest(tiny_corpus, tmp_path, capsys):
    """--record KEY writes the figures it printed into metrics.KEY (dots nest) with the command
    that measured them; the tensors and the rest of the manifest stay; a bad key changes nothing."""
    weights = tmp_path / "weights"
    shutil.copytree(SHIPPED_WEIGHTS, weights)
    assert evaluate_main([str(weights), str(tiny_corpus), "--json", "--record", "unseen_conditions.first"]) == 0
    capsys.readouterr()
    before = model.load(weights).manifest
    assert evaluate_main([str(weights), str(tiny_corpus), "--json", "--record", "unseen_conditions.tiny"]) == 0
    printed = json.loads(capsys.readouterr().out)
    after = model.load(weights).manifest
    entry = after.metrics["unseen_conditions"]["tiny"]
    assert entry["clips"] == printed["clips"] == 9 and entry["accuracy"] == printed["accuracy"]
    assert entry["command"].startswith("python -m model.training.evaluate ") and "--record" in entry["command"]
    # what was there before is kept beside it, and the weights are the same weights
    assert after.metrics["unseen_conditions"]["first"] == before.metrics["unseen_conditions"]["first"]
    assert after.metrics["open_set_test"] == before.metrics["open_set_test"]
    assert after.metrics["test_eer"] == before.metrics["test_eer"] and after.sha256 == before.sha256
    assert after.known_threshold == before.known_threshold and after.known_cohort == before.known_cohort
    text = (weights / "manifest.json").read_text()
    with pytest.raises(SystemExit):  # malformed: refused before anything is evaluated
        evaluate_main([str(weights), str(tiny_corpus), "--record", "Bad Key"])
    assert evaluate_main([str(weights), str(tiny_corpus), "--record", "test_eer.x"]) == 2  # a figure, not a table
    assert (weights / "manifest.json").read_text() == text


@pytest.mark.parametrize("label", range(9))
def test_shipped_weights_classify_fresh_sentences_of_each_voice(shipped, label):
    for index in range(2):
        result = shipped.infer(speech(label, index))
        assert corpus.LABELS[int(result.logits.argmax())] == corpus.LABELS[label]


def test_warm_start_begins_at_the_given_weights_with_each_voice_at_its_clips(tiny_corpus):
    """--init: fine-tuning starts from existing weights (read, never unpickled), and the margin
    head's row for each training voice starts at that voice's mean embedding under them."""
    dataset = scan(tiny_corpus)
    items = dataset.split("train")
    waves = load_waves(items, 16000, "train")
    voices = dataset.voices("train")
    train_voices = torch.tensor([voices.index(it.voice) for it in items])
    network, head = build("resnet18", num_classes=9, embedding_size=256), AdditiveAngularMargin(256, len(voices))
    cfg = TrainConfig(init=str(SHIPPED_WEIGHTS))
    shipped = model.load(SHIPPED_WEIGHTS)
    front_end = shipped.manifest.features
    none = pseudo_speakers(voices, set(), ())
    warm_start(network, head, cfg, corpus.LABELS, front_end, shipped.features, waves, train_voices, none)
    assert all(torch.equal(network.state_dict()[k], v) for k, v in shipped.network.state_dict().items())
    assert network.training  # handed back ready to train
    # a voice's clip is nearer its own row than any other voice's
    with torch.inference_mode():
        network.eval()
        first = [train_voices.tolist().index(v) for v in range(len(voices))]
        emb = torch.stack([network(shipped.features(waves[i][:48000].unsqueeze(0)))[1][0] for i in first])
    unit = torch.nn.functional.normalize
    nearest = (unit(emb, dim=-1) @ unit(head.weight, dim=-1).T).argmax(-1)
    assert nearest.tolist() == list(range(len(voices)))
    with pytest.raises(SystemExit, match="differ from this run"):
        warm_start(
            network, head, cfg, list(reversed(corpus.LABELS)), front_end, shipped.features, waves, train_voices, none
        )


def test_speed_perturbed_pseudo_speakers_skip_labels_and_voices_the_corpus_already_warps():
    voices = ["flite-awb", "flite-awb-w088", "espeak-en-us-rob", "espeak-en-us-rob-w112", "espeak-en-zac", "vesyn"]
    rows = pseudo_speakers(voices, labelled={0}, speeds=(0.9, 1.1))
    # only the two voices with no warps of their own get rows, after the 6 voices', speed by speed
    assert rows.tolist() == [[-1, -1], [-1, -1], [-1, -1], [-1, -1], [6, 8], [7, 9]]
    assert pseudo_speakers(voices, set(), ()).shape == (6, 0)
    for bad in ((1.0,), (0.9, 0.9), (-1.1,)):  # 1.0 would be each voice's twin
        with pytest.raises(ValueError, match="distinct"):
            pseudo_speakers(voices, set(), bad)


def test_speed_crop_raises_pitch_by_the_factor_and_keeps_the_length():
    sr, gen = 16000, torch.Generator().manual_seed(0)
    tone = torch.sin(2 * torch.pi * 200 * torch.arange(3 * sr) / sr)
    for speed in (0.9, 1.1):
        out = speed_crop(tone, sr, speed, sr, gen)
        assert out.shape == (sr,)
        peak_hz = float(torch.fft.rfft(out).abs().argmax())  # a 1 s window: 1 Hz bins
        assert abs(peak_hz - 200 * speed) <= 2


def test_enrolment_measurement_identifies_probes_against_profiles_of_each_length(shipped):
    streams = {f"voice-{label}": torch.cat([speech(label, k) for k in range(6)]) for label in (0, 3, 6)}
    report = enrolment.measure(shipped, streams, probes=1, lengths=(2, 4, 8))
    assert report["voices"] == 3 and report["threshold"] == shipped.manifest.identify_threshold
    rows = report["rows"]
    assert [r["enrolled_s"] for r in rows] == [2, 4, 8]
    assert all(0 <= r["named_right"] <= r["top1"] <= 1 for r in rows)
    assert rows[-1]["top1"] == 1.0  # 8 s of each of three distinct voices: every probe finds its own
    # the shortest enrolment that names as many probes as the longest, within the tolerance
    made = [{"enrolled_s": s, "named_right": v} for s, v in ((2, 0.5), (4, 0.8), (8, 0.9), (16, 0.905))]
    assert enrolment.shortest_enough(made, 0.01) == 8 and enrolment.shortest_enough(made, 0.2) == 4
    assert enrolment.shortest_enough([], 0.01) is None
