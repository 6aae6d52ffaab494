"""Shared fixtures: speech made by the project's own synthesiser, encoders, and a real server."""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from model.audio import resample, wav_pcm16
from model.training.corpus import SENTENCE_POOL, VOICES, ffmpeg_write, speak, synthesise, voice_named
from model.training.sentences import sentences

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_WEIGHTS = ROOT / "weights"
FRESH = sentences(40, salt="tests", exclude=sentences(SENTENCE_POOL))  # never in the corpus

# name -> (ffmpeg codec args, container suffix)
FORMATS: dict[str, tuple[list[str], str]] = {
    "wav-u8": (["-c:a", "pcm_u8"], "wav"),
    "wav-s16": (["-c:a", "pcm_s16le"], "wav"),
    "wav-s24": (["-c:a", "pcm_s24le"], "wav"),
    "wav-s32": (["-c:a", "pcm_s32le"], "wav"),
    "wav-f32": (["-c:a", "pcm_f32le"], "wav"),
    "wav-mulaw": (["-c:a", "pcm_mulaw"], "wav"),
    "wav-alaw": (["-c:a", "pcm_alaw"], "wav"),
    "flac": (["-c:a", "flac"], "flac"),
    "mp3": (["-c:a", "libmp3lame", "-b:a", "96k"], "mp3"),
    "ogg-vorbis": (["-c:a", "libvorbis", "-q:a", "4"], "ogg"),
    "ogg-opus": (["-c:a", "libopus", "-b:a", "32k"], "ogg"),
    "webm-opus": (["-c:a", "libopus", "-b:a", "32k"], "webm"),
    "m4a-aac": (["-c:a", "aac", "-b:a", "96k"], "m4a"),
}


@cache
def speech(label: int, index: int = 0, rate: float = 1.0) -> torch.Tensor:
    """Voice ``label`` saying a fresh test sentence: mono float32 at 16 kHz, peak 0.5."""
    with tempfile.TemporaryDirectory() as tmp:
        samples, sr = synthesise(VOICES[label], FRESH[(label * 7 + index) % len(FRESH)], rate, 0, Path(tmp))
    wave = resample(torch.from_numpy(np.ascontiguousarray(samples)), sr, 16000)
    return wave / wave.abs().max() * 0.5


@cache
def voice_speech(label: str, index: int = 0) -> torch.Tensor:
    """A catalogue voice (by its corpus label) saying a fresh test sentence, like ``speech``."""
    with tempfile.TemporaryDirectory() as tmp:
        wave = speak(voice_named(label), FRESH[(index * 11 + 3) % len(FRESH)], 1.0, 0, Path(tmp))
    return wave / wave.abs().max() * 0.5


def conversation(
    parts: list[tuple[Any, int | torch.Tensor]], pause_s: float = 0.5
) -> tuple[torch.Tensor, list[tuple[float, float, Any]]]:
    """``(voice, sentence)`` turns one after another with a pause between (or ``(name, wave)``,
    16 kHz speech made elsewhere): the waveform and the reference turns ``(start, end, voice)``
    (each turn from its first to its last audible sample)."""
    pieces, reference, t = [], [], 0.0
    gap = torch.zeros(int(pause_s * 16000))
    for voice, sentence in parts:
        wave = sentence if isinstance(sentence, torch.Tensor) else speech(voice, sentence)
        loud = torch.nonzero(wave.abs() > 0.01).flatten()
        wave = wave[int(loud[0]) : int(loud[-1]) + 1]
        reference.append((t, t + wave.numel() / 16000, voice))
        pieces += [wave, gap]
        t += (wave.numel() + gap.numel()) / 16000
    return torch.cat(pieces), reference


def encode(wave: torch.Tensor, fmt: str, rate: int = 16000, channels: int = 1, src_rate: int = 16000) -> bytes:
    """Encode a mono waveform with ffmpeg into ``fmt`` at ``rate`` Hz with ``channels`` channels."""
    args, suffix = FORMATS[fmt]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"clip.{suffix}"
        ffmpeg_write(wave, src_rate, out, ["-ar", str(rate), "-ac", str(channels), *args])
        return out.read_bytes()


def wav_bytes(wave: torch.Tensor, rate: int = 16000) -> bytes:
    """16-bit WAV of ``wave`` at its own ``rate``: FFmpeg's samples (``wav-s16``), made in-process."""
    return wav_pcm16(wave, rate)


def poll(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Wait until ``condition()`` holds, failing after ``timeout`` s (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def stays(condition: Callable[[], bool], seconds: float) -> None:
    """``condition()`` holds throughout ``seconds``: for something that must not happen. (A slow
    machine can only make this pass wrongly, never fail wrongly.)"""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert condition(), "condition stopped holding"
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# For extra servers whose test is about the service around the network (keys, limits, overload,
# the balancer): PyTorch eager needs no conversion (ready in 3.1 s on the 2-core AVX-512 EPYC;
# OpenVINO 3.5 s with its converted network cached, about 5 s more where a machine has none
# cached yet). The session's `server` keeps the default backend.
EAGER = {"BACKEND": "torch"}


class Server:
    """A real uvicorn process on loopback."""

    def __init__(
        self, env: dict[str, str] | None = None, weights: Path = SHIPPED_WEIGHTS, port: int | None = None
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {
            **os.environ,
            "WEIGHTS_DIR": str(weights),
            "TORCH_THREADS": "2",
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            **(env or {}),
        }
        cmd = [sys.executable, "-m", "app"]
        self.log = tempfile.NamedTemporaryFile(prefix="server-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=1.0) as probe:  # one client: making one costs 22 ms of CPU
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
                try:
                    if probe.get(self.url + "/readyz").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"server not ready in {timeout} s:\n{self.logs()}")

    def logs(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        Path(self.log.name).unlink(missing_ok=True)


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    srv = Server()
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def openvino_cache(tmp_path_factory) -> Path:
    """One OpenVINO cache for the in-process models of the suite, as a server keeps one: the
    shipped network is converted once (about 3 s), then read back."""
    return tmp_path_factory.mktemp("openvino-cache")


@pytest.fixture(scope="session")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120.0) as c:
        yield c


def pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed (make test installs Debian's postgresql)")
    return Path(found[-1]).parent


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A real PostgreSQL server in a temporary directory on a free loopback port, run as the
    unprivileged 'postgres' user when the tests run as root (PostgreSQL refuses to run as root)."""
    bindir, port = pg_bin(), free_port()
    root = Path(tempfile.mkdtemp(prefix="pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        uid = pwd.getpwnam("postgres").pw_uid
        os.chown(root, uid, -1)
    data = root / "data"
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"],
                   check=True, capture_output=True)  # fmt: skip
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w",
                    "start"], check=True, capture_output=True)  # fmt: skip
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


# --- a folder of "real" speakers and the corpus the training guide makes of it -------------------

SR = 16000
MOSTLY_SILENT = "deadbeef"  # a speaker whose one file is a short sentence in 8 s of silence
# The guide's corpus (docs/training.md, "Train on your own speakers"), sized by the Makefile's own
# knobs: the 9 labelled voices x 10 clips, 2 training and 2 + 2 open-set catalogue voices, and of
# the real speakers 2 held out for validation and 2 for test.
GUIDE_SIZE = {"per_voice": 10, "seed": 5, "extra_per_voice": 2, "open_per_voice": 4, "voice_limit": 2}
GUIDE_REAL = {"val": 2, "test": 2, "train_clips": 4, "trial_clips": 4}
GUIDE_MAKE_VARS = (
    f"PER_VOICE={GUIDE_SIZE['per_voice']} EXTRA_PER_VOICE={GUIDE_SIZE['extra_per_voice']} "
    f"OPEN_PER_VOICE={GUIDE_SIZE['open_per_voice']} SEED={GUIDE_SIZE['seed']} "
    f"CORPUS_ARGS='--voice-limit {GUIDE_SIZE['voice_limit']} --real-val {GUIDE_REAL['val']} "
    f"--real-test {GUIDE_REAL['test']} --real-train-clips {GUIDE_REAL['train_clips']} "
    f"--real-trial-clips {GUIDE_REAL['trial_clips']}'"
)


def write_audio(path: Path, wave: torch.Tensor, fmt: str = "flac") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(wave, fmt))
    return path


def quiet(seconds: float) -> torch.Tensor:
    return 1e-4 * torch.randn(int(seconds * SR), generator=torch.Generator().manual_seed(int(seconds * 10)))


def lay_out_speakers(root: Path) -> None:
    """Sources laid out as the training guide shows a user's own recordings (a folder per speaker,
    files anywhere below it; files named by a speaker prefix, with a LICENSE) and as LibriSpeech,
    Speech Commands and Common Voice ship them; every speaker one of the project's own voices."""
    for speaker, voice in (("alice", 0), ("bob", 3), ("dave", 5), ("frank", 1)):
        for k in range(4):
            write_audio(root / "meetings" / speaker / f"2024-0{k + 1}" / f"part-{k}.flac", speech(voice, k))
    for speaker, voice in (("carol", 6), ("erin", 8), ("gina", 7)):
        for k in range(4):
            write_audio(root / "calls" / f"{speaker}_{k:03d}.wav", speech(voice, k), "wav-s16")
    (root / "calls" / "LICENSE").write_text("CC-BY-4.0\n")
    books = root / "librispeech-train-clean-100"
    for reader, label in (("19", 0), ("26", 1), ("27", 2), ("32", 3), ("40", 8)):  # 4 files each: enough to hold out
        for k in range(4):
            write_audio(books / reader / "198" / f"{reader}-198-{k:04d}.flac", speech(label, k))
    (root / "SPEAKERS.TXT").write_text(
        ";ID  |SEX| SUBSET           |MINUTES| NAME\n"
        "19   | F | train-clean-100  | 25.19 | A\n26   | M | train-clean-100  | 25.08 | B\n"
    )
    words = root / "speech-commands"
    for k in range(2):
        write_audio(words / f"a1b2c3d4_nohash_{k}.wav", speech(4, k), "wav-s16")
    write_audio(words / "ffee0011.opus", speech(5, 0), "ogg-opus")
    write_audio(words / f"{MOSTLY_SILENT}_nohash_0.wav", torch.cat([quiet(3.0), speech(6, 0), quiet(5.0)]), "wav-s16")
    (root / "speakers.tsv").write_text(
        "speaker\tsource\tlicense\tfiles\tseconds\n"
        "a1b2c3d4\tspeech-commands\tCC BY 4.0\t2\t3\nffee0011\tspeech-commands\tCC BY 4.0\t1\t2\n"
        f"{MOSTLY_SILENT}\tspeech-commands\tCC BY 4.0\t1\t10\n"
    )
    cv = root / "common-voice-en"
    rows = ["client_id\tpath\tsentence\tgender"]
    for k in range(4):
        write_audio(cv / "clips" / f"common_voice_en_{k}.mp3", speech(7, k), "mp3")
        rows.append(f"c0ffee{'' if k < 2 else '2'}\tcommon_voice_en_{k}.mp3\tsomething\t{'female_feminine'}")
    (cv / "validated.tsv").write_text("\n".join(rows) + "\n")
    (cv / "LICENSE").write_text("CC0-1.0\n")


def guide_section() -> str:
    text = (ROOT / "docs" / "training.md").read_text()
    return text.split("## Train on your own speakers", 1)[1].split("\n## ", 1)[0]


def guide_commands() -> list[str]:
    """Every command of the guide section's ``sh`` blocks, comments dropped, in order."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", guide_section(), flags=re.S):
        for line in block.splitlines():
            command = line.split("  #", 1)[0].split(" # ", 1)[0].strip()
            if command:
                commands.append(command)
    return commands


def run_guide_command(command: str, speakers: Path, data: Path, run: Path, make_vars: str = "") -> str:
    """One of the guide's commands as written, on ``speakers`` into ``data`` and ``run``, sized by
    the Makefile's knobs; its output. (corpus-deps only adds festival's other-language voices, which
    a corpus of 2 catalogue voices per role does not use.)"""
    line = command.replace("my-speech", str(speakers)).replace("runs/real-ft", str(run))
    line = line.replace("data/corpus", str(data))
    if line.startswith("make "):
        line = f"make -o corpus-deps {line[5:]} DATA={data} REAL_RUN={run} {GUIDE_MAKE_VARS} {make_vars}"
    proc = subprocess.run(line, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (command, proc.stdout[-3000:], proc.stderr[-3000:])
    return proc.stdout


@pytest.fixture(scope="session")
def speakers_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("my-speech")
    lay_out_speakers(root)
    return root


@pytest.fixture(scope="session")
def guide_corpus(speakers_folder, tmp_path_factory) -> Path:
    """The corpus the guide's first command makes of ``speakers_folder``."""
    first = guide_commands()[0]
    assert first == "make corpus REAL_SPEECH=my-speech", first
    data = tmp_path_factory.mktemp("guide") / "data"
    run_guide_command(first, speakers_folder, data, data.parent / "run")
    return data
