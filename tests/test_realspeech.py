"""Real speech in the corpus: the reader of a folder of speakers, silence trimming, the held-out
split and its probe conditions, reserved speakers refused, and training beside a teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

import model
from model.audio import decode
from model.audio import load as load_audio
from model.features import FeatureConfig
from model.speech import SpeechDetector
from model.training import corpus
from model.training.data import scan
from model.training.evaluate import evaluate_identification, evaluate_open_set
from model.training.realspeech import HELD_OUT_MIN_CLIPS, ReservedSpeakerError, read_speakers
from model.training.train import TrainConfig, train
from tests.conftest import SHIPPED_WEIGHTS, encode, speech

SR = 16000


def _write(path: Path, wave: torch.Tensor, fmt: str = "flac") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(wave, fmt))
    return path


def _silence(seconds: float) -> torch.Tensor:
    return 1e-4 * torch.randn(int(seconds * SR), generator=torch.Generator().manual_seed(int(seconds * 10)))


MOSTLY_SILENT = "deadbeef"  # a speaker whose one file is a short sentence in 8 s of silence


@pytest.fixture(scope="module")
def real_root(tmp_path_factory) -> Path:
    """Three sources laid out as LibriSpeech, Speech Commands and Common Voice ship them, each
    speaker one of the project's own voices: a folder per reader (chapters below it), files named
    by their speaker's prefix, and a Common Voice export with its table."""
    root = tmp_path_factory.mktemp("real")
    books = root / "librispeech-train-clean-100"
    for reader, label in (("19", 0), ("26", 1), ("27", 2), ("32", 3), ("40", 8)):  # 4 files each: enough to hold out
        for k in range(4):
            _write(books / reader / "198" / f"{reader}-198-{k:04d}.flac", speech(label, k))
    (root / "SPEAKERS.TXT").write_text(
        ";ID  |SEX| SUBSET           |MINUTES| NAME\n"
        "19   | F | train-clean-100  | 25.19 | A\n26   | M | train-clean-100  | 25.08 | B\n"
    )
    words = root / "speech-commands"
    for k in range(2):
        _write(words / f"a1b2c3d4_nohash_{k}.wav", speech(4, k), "wav-s16")
    _write(words / "ffee0011.opus", speech(5, 0), "ogg-opus")
    quiet = torch.cat([_silence(3.0), speech(6, 0), _silence(5.0)])
    _write(words / f"{MOSTLY_SILENT}_nohash_0.wav", quiet, "wav-s16")
    (root / "speakers.tsv").write_text(
        "speaker\tsource\tlicense\tfiles\tseconds\n"
        "a1b2c3d4\tspeech-commands\tCC BY 4.0\t2\t3\nffee0011\tspeech-commands\tCC BY 4.0\t1\t2\n"
        f"{MOSTLY_SILENT}\tspeech-commands\tCC BY 4.0\t1\t10\n"
    )
    cv = root / "common-voice-en"
    rows = ["client_id\tpath\tsentence\tgender"]
    for k in range(4):
        _write(cv / "clips" / f"common_voice_en_{k}.mp3", speech(7, k), "mp3")
        rows.append(f"c0ffee{'' if k < 2 else '2'}\tcommon_voice_en_{k}.mp3\tsomething\t{'female_feminine'}")
    (cv / "validated.tsv").write_text("\n".join(rows) + "\n")
    (cv / "LICENSE").write_text("CC0-1.0\n")
    return root


def test_reader_takes_folders_prefixes_and_common_voice_with_licences_and_sexes(real_root):
    found = {s.name: s for s in read_speakers(real_root)}
    readers = {f"librispeech-train-clean-100/{r}" for r in ("19", "26", "27", "32", "40")}
    assert set(found) == readers | {
        "speech-commands/a1b2c3d4", "speech-commands/ffee0011", f"speech-commands/{MOSTLY_SILENT}",
        "common-voice-en/c0ffee", "common-voice-en/c0ffee2",
    }  # fmt: skip
    reader = found["librispeech-train-clean-100/19"]
    assert len(reader.files) == 4 and all(f.suffix == ".flac" and f.parent.name == "198" for f in reader.files)
    assert reader.sex == "F" and found["librispeech-train-clean-100/26"].sex == "M"  # LibriSpeech's SPEAKERS.TXT
    assert found["librispeech-train-clean-100/27"].sex is None and reader.licence == "unknown"
    assert [f.name for f in found["speech-commands/a1b2c3d4"].files] == [
        "a1b2c3d4_nohash_0.wav",
        "a1b2c3d4_nohash_1.wav",
    ]
    assert found["speech-commands/ffee0011"].licence == "CC BY 4.0"  # speakers.tsv
    cv = found["common-voice-en/c0ffee"]
    assert len(cv.files) == 2 and cv.licence == "CC0-1.0" and cv.sex == "F"  # the table, its LICENSE file


@pytest.mark.parametrize(
    "layout",
    [
        "librispeech-train-clean-100/ls-1089/a.flac",  # a test-clean reader
        "LibriSpeech/dev-clean/1272/128104/1272-128104-0000.flac",  # a reserved subset, read from above it
        "train-other-500/8842/1/8842-1-0000.flac",  # a dev-clean reader in a subset named as LibriSpeech names it
        "free-spoken-digit-dataset/0_jackson_0.wav",
    ],
)
def test_reserved_speakers_are_refused(tmp_path, layout):
    root = tmp_path / "real"
    _write(root / layout, speech(0, 0), "flac" if layout.endswith(".flac") else "wav-s16")
    if layout.startswith("LibriSpeech/"):
        root = root / "LibriSpeech"  # LibriSpeech's own folder: its subsets are the sources
    with pytest.raises(ReservedSpeakerError, match="reserved for independent evaluation"):
        read_speakers(root)
    with pytest.raises(SystemExit, match="reserved for independent evaluation"):
        corpus.main([str(tmp_path / "corpus"), "--per-voice", "10", "--real", str(root)])


def test_an_unreserved_reader_id_is_taken(tmp_path):
    _write(tmp_path / "librispeech-train-clean-100" / "ls-103" / "a.flac", speech(0, 0))
    assert [s.name for s in read_speakers(tmp_path)] == ["librispeech-train-clean-100/ls-103"]


@pytest.mark.parametrize("backend", ["torch", "openvino"])
def test_speech_detector_finds_the_sentence_in_the_silence(backend):
    """Both of Silero's models: the TorchScript one the corpus uses, the OpenVINO one the service
    uses (one thread); they find the same speech to within one 32 ms chunk."""
    sentence = speech(6, 0)
    wave = torch.cat([_silence(3.0), sentence, _silence(5.0)])
    detector = SpeechDetector(backend=backend)
    assert detector.backend == backend
    regions = detector.regions(wave)
    other = SpeechDetector(backend="torch").regions(wave)
    assert len(regions) == len(other)
    assert all(abs(a - c) <= 512 and abs(b - d) <= 512 for (a, b), (c, d) in zip(regions, other, strict=True))
    assert regions, "no speech found"
    start, end = regions[0][0], regions[-1][1]
    assert start >= 3.0 * SR - 0.2 * SR and end <= (3.0 * SR + sentence.numel()) + 0.2 * SR
    speech_s = sum(b - a for a, b in regions) / SR
    assert 0.5 * sentence.numel() / SR <= speech_s <= sentence.numel() / SR + 0.2
    assert detector.regions(_silence(4.0)) == []


REAL = {"val": 2, "test": 2, "train_clips": 4, "trial_clips": 4}


@pytest.fixture(scope="module")
def real_corpus(real_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus-real")
    corpus.generate(
        out, per_voice=10, seed=5, extra_per_voice=2, open_per_voice=4, voice_limit=2,
        command="python -m model.training.corpus real", real=corpus.RealSpeech(real_root, **REAL),
    )  # fmt: skip
    return out


def test_corpus_cuts_real_speech_into_clips_without_its_silence(real_corpus):
    rows = [json.loads(line) for line in (real_corpus / "manifest.jsonl").read_text().splitlines()]
    real = [r for r in rows if r.get("source")]
    assert {r["source"] for r in real} == {"librispeech-train-clean-100", "speech-commands", "common-voice-en"}
    quiet = [r for r in real if r["voice"] == f"speech-commands/{MOSTLY_SILENT}"]
    assert quiet, "the mostly silent file gave no clip"
    sentence = speech(6, 0).numel() / SR
    for r in quiet:  # 8 s of silence around a short sentence: the clip is the sentence, not the silence
        seconds = load_audio(real_corpus / r["path"], SR).numel() / SR
        assert 0.3 * sentence <= seconds <= sentence + 0.3
    # held out: 2 validation and 2 test speakers, each with 2 to 4 clips of 3-6 s of speech
    dataset = scan(real_corpus)
    held = {split: {it.voice for it in dataset.split(split) if it.real} for split in ("open-val", "open-test")}
    assert len(held["open-val"]) == 2 and len(held["open-test"]) == 2 and not held["open-val"] & held["open-test"]
    trained = {it.voice for it in dataset.split("train") if it.real}
    assert not trained & (held["open-val"] | held["open-test"]) and f"speech-commands/{MOSTLY_SILENT}" in trained
    # each held-out clip of speech under every probe condition; the telephone one is 8 kHz mu-law
    test_items = [it for it in dataset.split("open-test") if it.real]
    segments: dict[str, list] = {}
    for it in test_items:
        segments.setdefault(it.segment, []).append(it)
    assert all(len(v) == len(corpus.PROBES) for v in segments.values())
    per_speaker = [sum(seg.startswith(v + "#") for seg in segments) for v in held["open-test"]]
    assert all(HELD_OUT_MIN_CLIPS <= n <= REAL["trial_clips"] for n in per_speaker), per_speaker
    phone = next(it for it in test_items if it.conditions.get("band") == "telephone")
    audio = decode(phone.path)
    assert audio.sample_rate == 8000 and phone.path.read_bytes()[20:22] == (7).to_bytes(2, "little")  # WAVE mu-law
    # each speaker's source and licence, in voices.json and corpus.json
    voices = {v["voice"]: v for v in json.loads((real_corpus / "voices.json").read_text())}
    assert (
        voices["speech-commands/ffee0011"]["license"] == "CC BY 4.0" and voices["common-voice-en/c0ffee"]["sex"] == "F"
    )
    summary = json.loads((real_corpus / "corpus.json").read_text())["real_speech"]
    assert summary["speakers"] == 10 and summary["sources"]["common-voice-en"]["licenses"] == ["CC0-1.0"]


def test_corpus_finds_speech_once_per_file(real_corpus, real_root, monkeypatch):
    def refuse(_path):
        raise AssertionError("speech detection ran again on an unchanged file")

    monkeypatch.setattr(corpus, "_detect", refuse)
    before = (real_corpus / "manifest.jsonl").read_text()
    corpus.generate(
        real_corpus, per_voice=10, seed=5, extra_per_voice=2, open_per_voice=4, voice_limit=2, workers=1,
        real=corpus.RealSpeech(real_root, **REAL),
    )  # fmt: skip
    assert (real_corpus / "manifest.jsonl").read_text() == before


def test_shipped_weights_hold_only_the_network():
    tensors = safetensors.torch.load_file(str(SHIPPED_WEIGHTS / "model.safetensors"))
    assert set(tensors) == set(model.ResNet18().state_dict())


def test_training_with_real_speakers_and_a_teacher_keeps_both_out_of_the_weights(real_corpus, tmp_path):
    cfg = TrainConfig(
        epochs=1, batch_size=12, crop_s=0.5, steps_per_epoch=2, centroid_clips=3, eval_max_s=2.0, real_share=0.3,
        teacher="campplus", teacher_clips=1,
    )  # fmt: skip
    manifest = train(real_corpus, tmp_path, cfg, FeatureConfig(n_mels=32, hop_ms=25), resume=False)
    loaded = model.load(tmp_path / "weights")
    assert loaded.manifest.sha256 == manifest.sha256
    tensors = safetensors.torch.load_file(str(tmp_path / "weights" / "model.safetensors"))
    assert set(tensors) == set(model.ResNet18().state_dict())  # no margin head, no teacher map
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["distil"]["map.weight"].shape == (192, 256)
    # the real speakers are margin-head voices beside the synthetic ones
    assert "speech-commands/ffee0011" in checkpoint["voices"] and "flite-awb" in checkpoint["voices"]
    # chosen on validation: the real and synthetic held-out voices' EERs each epoch, and no test figure
    record = checkpoint["history"][0]
    assert {"open_val_eer_synthetic", "open_val_eer_real"} <= set(record)
    metrics = loaded.manifest.metrics
    assert "open_set_test" not in metrics and "real" in metrics["open_set_val"]
    # calibrated on validation voices of both kinds, each kind's threshold on its own, the strictest kept
    calibration = metrics["calibration"]
    verification = calibration["verification"]
    assert verification["voices"] == 2 + 2 and set(verification["groups"]) == {"synthetic", "real"}
    assert all(g["far"] <= 0.01 for g in verification["groups"].values())
    assert set(calibration["known"]["groups"]) == {"synthetic", "real"}
    strictest = max(g["far_threshold"] for g in calibration["known"]["groups"].values())
    assert loaded.manifest.known_threshold == pytest.approx(strictest, abs=1e-4)
    assert loaded.manifest.identify_threshold >= loaded.manifest.verification_threshold
    # the teacher's embeddings are kept beside the corpus, one per clip it embedded
    with safetensors.safe_open(str(real_corpus / "teacher-campplus.safetensors"), "pt") as f:
        assert len(json.loads(f.metadata()["paths"])) == f.get_tensor("embeddings").shape[0] > 0
    # the report: real speakers by source and by probe condition, beside the synthetic voices
    report = evaluate_open_set(loaded, real_corpus)
    assert set(report["real"]["probes"]) == set(corpus.PROBES) - {"clean"}
    assert 0 <= report["real"]["clean"]["eer"] <= 1 and 0 <= report["eer"] <= 1
    ident = evaluate_identification(loaded, real_corpus)
    assert ident["real"]["enrolled_voices"] == 1 and ident["real"]["never_enrolled_voices"] == 1
