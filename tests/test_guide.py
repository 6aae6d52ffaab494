"""docs/training.md's "Train on your own speakers", followed as written on a tiny folder of speakers
made here: its commands are read from the guide, the folder laid out as the guide shows, and the
make variables that size a run (the Makefile's own knobs) shrink it to a few clips and steps."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

import model
from tests.conftest import ROOT, encode, speech

# make variables that shrink each step to seconds; the commands themselves are the guide's
TINY_CORPUS = (
    "PER_VOICE=10 EXTRA_PER_VOICE=2 OPEN_PER_VOICE=4 "
    "CORPUS_ARGS='--voice-limit 2 --real-val 2 --real-test 2 --real-train-clips 4 --real-trial-clips 4'"
)
TINY_RECIPE = (
    "REAL_RECIPE='--epochs 1 --steps-per-epoch 2 --batch-size 12 --crop-s 0.5 --centroid-clips 3 --eval-max-s 2.0 "
    "--n-mels 64 --hop-ms 20 --real-share 0.4 --label-share 0.25'"
)


def guide_section() -> str:
    text = (ROOT / "docs" / "training.md").read_text()
    return text.split("## Train on your own speakers", 1)[1].split("\n## ", 1)[0]


def guide_commands() -> list[str]:
    """Every command of the section's ``sh`` blocks, comments dropped, in order."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", guide_section(), flags=re.S):
        for line in block.splitlines():
            command = line.split("  #", 1)[0].split(" # ", 1)[0].strip()
            if command:
                commands.append(command)
    return commands


def lay_out(root: Path) -> None:
    """Recordings as the guide's layout shows: a source of speaker folders (files anywhere below
    them) and a source of files named by speaker prefix, with its LICENSE."""
    meetings, calls = root / "meetings", root / "calls"
    for speaker, voice in (("alice", 0), ("bob", 3), ("dave", 5), ("frank", 1)):
        for k in range(4):
            path = meetings / speaker / f"2024-0{k + 1}" / f"part-{k}.flac"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode(speech(voice, k), "flac"))
    calls.mkdir(parents=True)
    for speaker, voice in (("carol", 6), ("erin", 8), ("gina", 7)):
        for k in range(4):
            (calls / f"{speaker}_{k:03d}.wav").write_bytes(encode(speech(voice, k), "wav-s16"))
    (calls / "LICENSE").write_text("CC-BY-4.0\n")


@pytest.mark.timeout(900)
def test_the_training_guide_trains_on_a_folder_of_your_own_speakers(tmp_path):
    commands = guide_commands()
    assert commands[0] == "make corpus REAL_SPEECH=my-speech", commands
    lay_out(tmp_path / "my-speech")
    data, run = tmp_path / "data", tmp_path / "run"
    ran = []
    for command in commands:
        if command.startswith("make reproduce"):
            continue  # the from-nothing alternative to the step before it: hours
        line = (
            command.replace("my-speech", str(tmp_path / "my-speech"))
            .replace("runs/real-ft", str(run))
            .replace("data/corpus", str(data))
        )
        if line.startswith("make "):
            # corpus-deps only adds festival's other-language voices, which a tiny corpus does not use
            line = f"make -o corpus-deps {line[5:]} DATA={data} REAL_RUN={run} {TINY_CORPUS} {TINY_RECIPE}"
        proc = subprocess.run(line, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (command, proc.stdout[-3000:], proc.stderr[-3000:])
        ran.append((command, proc.stdout))
    assert len(ran) >= 4

    # the corpus holds your speakers with their licences, some held out to choose and to test on
    voices = {v["voice"]: v for v in json.loads((data / "voices.json").read_text()) if v["engine"] == "real"}
    assert set(voices) == {f"meetings/{s}" for s in ("alice", "bob", "dave", "frank")} | {
        f"calls/{s}" for s in ("carol", "erin", "gina")
    }
    assert voices["calls/carol"]["license"] == "CC-BY-4.0"
    assert sorted(v["role"] for v in voices.values()) == ["open-test"] * 2 + ["open-val"] * 2 + ["train"] * 3
    # the trained weights load, were chosen and calibrated on validation voices, and hold only the network
    weights = model.load(run / "weights")
    assert weights.manifest.provenance["init"] and "real" in weights.manifest.metrics["open_set_val"]
    assert weights.manifest.verification_threshold is not None and weights.manifest.identify_threshold is not None
    # the evaluations printed the real speakers' figures
    outputs = "\n".join(out for _, out in ran)
    assert "real" in outputs and "EER" in outputs
