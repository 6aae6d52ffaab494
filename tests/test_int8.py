"""PRECISION=int8: the shipped int8 model follows fp32 closely enough that scores stay put, and a
service asked for int8 on weights without an int8 model refuses to start, saying how to make one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch

import model
from model.training.evaluate import parity
from model.training.quantize import main as quantize_main
from model.training.voices import catalogue
from model.weights import WeightsError, file_sha256
from tests.conftest import SHIPPED_WEIGHTS, Server, speech, voice_speech

OPEN_TEST_VOICES = [v.label for v in catalogue() if v.role == "open-test"]


def weights_without_int8(dest: Path) -> Path:
    """A copy of the shipped weights whose manifest names no int8 model (and without its files)."""
    shutil.copytree(SHIPPED_WEIGHTS, dest, ignore=shutil.ignore_patterns("int8.*"))
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest.pop("int8", None)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


@pytest.fixture(scope="module")
def clips() -> tuple[list[torch.Tensor], list[str]]:
    """Two fresh sentences of each of the 9 voices and of 6 open-set test voices (never trained on)."""
    waves, voices = [], []
    for label in range(9):
        for i in range(2):
            waves.append(speech(label, i))
            voices.append(f"class-{label}")
    for name in OPEN_TEST_VOICES[:6]:
        for i in range(2):
            waves.append(voice_speech(name, i))
            voices.append(name)
    return waves, voices


def test_int8_follows_fp32_on_the_nine_voices_and_on_voices_never_heard(clips) -> None:
    waves, voices = clips
    int8 = model.load(SHIPPED_WEIGHTS).configure("int8", backend="auto")
    assert int8.backend == "openvino" and int8.precision == "int8"
    reference = model.load(SHIPPED_WEIGHTS)
    # the class of a clip of one of the 9 voices (for a voice that is none of them the label is a
    # near tie between arbitrary classes: there 'known' is the answer that matters)
    assert parity(int8, reference, waves[:18])["top1_agreement"] >= 0.995
    result = parity(int8, reference, waves, voices)
    assert result["known_agreement"] >= 0.995, result
    assert result["min_cosine"] >= 0.99, result
    assert result["p1_cosine"] >= 0.995 or result["share_cosine_at_least_0995"] >= 0.99, result


def test_int8_needs_the_manifests_int8_model_and_checks_it(tmp_path) -> None:
    bare = weights_without_int8(tmp_path / "bare")
    with pytest.raises(WeightsError, match=r"no int8 model .*python -m model\.training\.quantize"):
        model.load(bare).configure("int8", backend="auto")
    with pytest.raises(ValueError, match="int8 runs on the OpenVINO backend"):
        model.load(SHIPPED_WEIGHTS).configure("int8", backend="torch")

    tampered = tmp_path / "tampered"
    shutil.copytree(SHIPPED_WEIGHTS, tampered)
    with (tampered / "int8.bin").open("r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(WeightsError, match=r"int8\.bin: sha256 does not match"):
        model.load(tampered).configure("int8", backend="auto")


def test_a_server_asked_for_int8_without_an_int8_model_exits_with_the_reason(tmp_path) -> None:
    srv = Server(env={"PRECISION": "int8"}, weights=weights_without_int8(tmp_path / "w"))
    try:
        srv.proc.wait(timeout=120)
        assert srv.proc.returncode != 0
        assert "no int8 model" in srv.logs() and "model.training.quantize" in srv.logs()
    finally:
        srv.stop()


def test_a_server_with_precision_int8_serves_int8(tmp_path) -> None:
    srv = Server(env={"PRECISION": "int8"})
    try:
        srv.wait_ready(timeout=180)
        info = httpx.get(srv.url + "/v1/model", timeout=30).json()
        assert info["execution"]["precision"] == "int8" and info["execution"]["backend"] == "openvino"
    finally:
        srv.stop()


def test_quantize_makes_an_int8_model_that_the_runtime_checks_and_runs(tmp_path, guide_corpus) -> None:
    """``python -m model.training.quantize`` on a small generated corpus (the one the training
    guide's test makes, synthetic and real clips): the IR lands beside the weights, the manifest
    names it with its sha256s, and int8 follows fp32 on clips it never saw."""
    data = guide_corpus
    weights = weights_without_int8(tmp_path / "weights")
    manifest = json.loads((weights / "manifest.json").read_text())
    argv = [
        str(weights),
        str(data),
        "--calibration-clips",
        "8",
        "--validation-clips",
        "8",
        # a looser bar than make quantize's 0.9995, still above where the int8 model starts on these
        # clips (0.9968), so the accuracy control ranks layers and puts one back: the same code in
        # 23 s instead of 38 (each layer put back is another validation pass over the clips)
        "--min-share-cosine",
        "0.998",
    ]
    assert quantize_main(argv) == 0
    entry = json.loads((weights / "manifest.json").read_text())["int8"]
    assert entry["source_sha256"] == manifest["sha256"]
    assert entry["model_sha256"] == file_sha256(weights / "int8.xml")
    assert entry["weights_sha256"] == file_sha256(weights / "int8.bin")
    assert entry["calibration"]["calibration_clips"] == 8 and entry["validation"]["cpu_capability"]
    assert entry["calibration"]["min_share_cosine"] == 0.998
    int8 = model.load(weights).configure("int8", backend="auto")
    result = parity(int8, model.load(weights), [speech(label, 5) for label in range(9)])
    assert result["top1_agreement"] >= 0.995 and result["min_cosine"] >= 0.99, result
