"""Shared fixtures: speech made by the project's own synthesiser, encoders, and a real server."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from model.audio import resample
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
    parts: list[tuple[int, int]], pause_s: float = 0.5
) -> tuple[torch.Tensor, list[tuple[float, float, int]]]:
    """``(voice, sentence)`` turns one after another with a pause between: the waveform and the
    reference turns ``(start, end, voice)`` (each turn from its first to its last audible sample)."""
    pieces, reference, t = [], [], 0.0
    gap = torch.zeros(int(pause_s * 16000))
    for voice, sentence in parts:
        wave = speech(voice, sentence)
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
    return encode(wave, "wav-s16", rate=rate, src_rate=rate)


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
# the balancer): PyTorch eager is ready in well under half the time of OpenVINO's compile (measured
# 10 s against 25 s on the 2-core AVX-512 EPYC). The session's `server` keeps the default backend.
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
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1.0).status_code == 200:
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
