"""docs/training.md's "Train on your own speakers", followed as written on a folder of speakers made
here: its commands are read from the guide and run in order on a folder laid out as the guide shows
(conftest's ``guide_corpus`` ran the first, `make corpus`), with the Makefile's own knobs
shrinking the run to a few clips and steps, and the guide's optional teacher distilled."""

from __future__ import annotations

import json

import pytest
import safetensors
import safetensors.torch
import torch

import model
from tests.conftest import guide_commands, run_guide_command

# a run of 2 steps; the recipe's front end (the shipped weights' own) and the guide's TEACHER
TINY_RECIPE = (
    "REAL_RECIPE='--epochs 1 --steps-per-epoch 2 --batch-size 12 --crop-s 0.5 --centroid-clips 3 --eval-max-s 2.0 "
    "--n-mels 64 --hop-ms 20 --real-share 0.3 --label-share 0.25 --teacher campplus --distil-weight 1.0 "
    "--teacher-clips 1'"
)


@pytest.mark.timeout(900)
def test_the_training_guide_trains_on_a_folder_of_your_own_speakers(guide_corpus, speakers_folder):
    data, run = guide_corpus, guide_corpus.parent / "run"
    outputs = []
    for command in guide_commands()[1:]:
        if command.startswith("make reproduce"):
            continue  # the from-nothing alternative to the step before it: hours
        outputs.append(run_guide_command(command, speakers_folder, data, run, TINY_RECIPE))
    assert len(outputs) >= 4

    # the corpus holds your speakers with their licences, some held out to choose and to test on
    voices = {v["voice"]: v for v in json.loads((data / "voices.json").read_text()) if v["engine"] == "real"}
    mine = {f"meetings/{s}" for s in ("alice", "bob", "dave", "frank")} | {f"calls/{s}" for s in ("carol", "erin")}
    assert mine <= set(voices) and voices["calls/carol"]["license"] == "CC-BY-4.0"
    roles = [v["role"] for v in voices.values()]
    assert roles.count("open-val") == 2 and roles.count("open-test") == 2
    # the trained weights load, hold only the network (no margin head, no teacher map), were chosen
    # and calibrated on validation voices of both kinds, and never measured on the test voices
    weights = model.load(run / "weights")
    tensors = safetensors.torch.load_file(str(run / "weights" / "model.safetensors"))
    assert set(tensors) == set(model.ResNet18().state_dict())
    metrics = weights.manifest.metrics
    assert weights.manifest.provenance["init"] and "real" in metrics["open_set_val"]
    assert "open_set_test" not in metrics
    calibration = metrics["calibration"]
    verification = calibration["verification"]
    assert set(verification["groups"]) == {"synthetic", "real"}
    # /verify's adaptive s-norm over the training voices outside the 9 classes, real and synthetic
    background = sum(v["role"] == "train" for v in json.loads((data / "voices.json").read_text()))
    assert weights.manifest.verification_norm == {"method": "as-norm", "top": background}
    assert "adaptive s-norm" in verification["source"] and 0 <= verification["eer_cosine"] <= 1
    assert all(g["far"] <= 0.01 for g in verification["groups"].values())
    strictest = max(g["far_threshold"] for g in calibration["known"]["groups"].values())
    assert weights.manifest.known_threshold == pytest.approx(strictest, abs=1e-4)
    assert weights.manifest.identify_threshold >= weights.manifest.verification_threshold
    # the real speakers were margin-head voices beside the synthetic ones, the teacher distilled
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    assert checkpoint["distil"]["map.weight"].shape == (192, 256)
    assert "meetings/alice" in checkpoint["voices"] and "flite-awb" in checkpoint["voices"]
    assert {"open_val_eer_synthetic", "open_val_eer_real"} <= set(checkpoint["history"][0])
    with safetensors.safe_open(str(data / "teacher-campplus.safetensors"), "pt") as f:
        assert len(json.loads(f.metadata()["paths"])) == f.get_tensor("embeddings").shape[0] > 0
    # the evaluations printed the real speakers' figures, beside the teachers', and identification
    text = "\n".join(outputs)
    assert "real" in text and "EER" in text and "campplus" in text.lower()
    assert '"never_enrolled_answered_none"' in text
