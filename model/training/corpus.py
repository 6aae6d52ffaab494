"""Synthesise the speech corpus with Debian's speech synthesisers.

    python -m model.training.corpus OUT_DIR [--per-voice N] [--extra-per-voice N] [--open-per-voice N]
        [--seed S] [--conditions standard|unseen-noise|...]

The 9 labelled voices get ``--per-voice`` clips each, split train/val/test by sentence id. The
rest of the voice catalogue (``model/training/voices.py``: hundreds of espeak-ng, festival, flite
and pseudo-speaker voices) adds ``--extra-per-voice`` training clips per training voice and
``--open-per-voice`` clips per held-out open-set voice (splits ``open-val`` and ``open-test``, on
validation and test sentences). Each clip is a pure function of ``(seed, voice, index)``, so a run
is reproducible and resumable: clips already on disk are kept, and the labelled voices' clips are
the same whatever the catalogue holds. ``--conditions unseen-noise|unseen-codec|unseen-rate|unseen-all``
makes an evaluation set of the 9 labelled voices saying fresh sentences in a recording condition the
standard corpus never uses (mains hum noise, codec bitrates below the corpus's lowest, speaking
rates outside 0.8x..1.25x, or all at once).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchaudio.functional as AF
from tqdm import tqdm

from model.audio import decode, resample
from model.training.data import speed_up
from model.training.provenance import command_line, record_corpus_run
from model.training.sentences import sentences
from model.training.voices import ESPEAK_VARIANT_FILES, LABEL_VOICES, Voice, catalogue, synthetic_variants

log = logging.getLogger(__name__)


VOICES = LABEL_VOICES  # the 9 labels: names, order, engines and settings as they always were
LABELS = [v.label for v in VOICES]
SAMPLE_RATE = 16000
MAX_SECONDS = 8.0
SENTENCE_POOL = 800
TOOLS = {"flite": "flite", "festival": "text2wave", "espeak": "espeak-ng", "ffmpeg": "ffmpeg"}

SPLIT_OF_SLOT = ["train"] * 8 + ["val", "test"]  # clip index % 10 and sentence id % 10 -> split


@dataclass
class Clip:
    """Everything that decides one clip; the manifest is a list of these."""

    path: str
    label: int | None  # index into LABELS; None for a voice that is not one of the 9 classes
    voice: str
    split: str
    sentence_id: int
    text: str
    conditions: dict[str, Any] = field(default_factory=dict)


def split_of(index: int) -> str:
    return SPLIT_OF_SLOT[index % 10]


UNSEEN = ("noise", "codec", "rate", "all")
# Lossy codecs in the standard set go down to low-bitrate VoIP and streaming settings; the unseen
# set uses only bitrates below each codec's lowest standard one.
CODEC_KBPS = {"mp3": [24, 32, 48, 64, 96, 128], "opus": [12, 16, 24, 32, 48], "aac": [32, 48, 64, 96, 128]}
# A quarter of the standard set's coded clips use each codec's lowest setting, the one real VoIP
# apps fall back to. Drawn last, so every other condition, and every unseen set, is the same as
# before this setting was added. (libopus still codes 10 kb/s as wideband; it switches to
# narrowband SILK only below about 9 kb/s. Training adds that mode on the fly: model/training/train.py.)
LOW_KBPS = {"mp3": 20, "opus": 10, "aac": 28}
LOW_SHARE = 0.25
UNSEEN_CODECS = ["mp3:16k", "opus:8k", "aac:24k"]


def draw_conditions(rng: random.Random, unseen: str = "") -> dict[str, Any]:
    """Recording conditions. The standard set spans what real uploads vary in. An ``unseen`` set
    then replaces one factor with values the standard set never uses: ``noise`` (mains hum),
    ``codec`` (bitrates below each codec's lowest standard one), ``rate`` (0.62x-0.72x or
    1.35x-1.5x), or ``all`` of them at once, with reverberation on every clip."""
    c: dict[str, Any] = {}
    c["rate"] = rng.uniform(0.8, 1.25)
    c["pitch"] = rng.randint(-12, 12)  # espeak pitch offset around its default of 50
    c["gain_db"] = rng.uniform(-24.0, -1.0)
    if rng.random() < 0.3:
        c["reverb_rt60"] = rng.uniform(0.15, 0.7)
    if rng.random() < 0.65:
        c["noise"] = rng.choice(["white", "pink", "brown"])
        c["snr_db"] = rng.uniform(5.0, 30.0)
    band = rng.random()
    if band < 0.15:
        c["band"] = "telephone"
    elif band < 0.3:
        c["band"] = f"lowpass:{rng.randint(2800, 5500)}"
    elif band < 0.38:
        c["band"] = f"highpass:{rng.randint(150, 400)}"
    if rng.random() < 0.45:
        kind = rng.choice(["mp3", "opus", "aac"])
        c["codec"] = f"{kind}:{rng.choice(CODEC_KBPS[kind])}k"
    if unseen in ("rate", "all"):
        c["rate"] = rng.choice([rng.uniform(0.62, 0.72), rng.uniform(1.35, 1.5)])
    if unseen in ("noise", "all"):
        c["noise"] = "hum"
        c["snr_db"] = rng.uniform(8.0, 25.0)
    if unseen in ("codec", "all"):
        c["codec"] = rng.choice(UNSEEN_CODECS)
    if unseen == "all":
        c["reverb_rt60"] = rng.uniform(0.15, 0.7)
    if not unseen and "codec" in c and rng.random() < LOW_SHARE:
        kind = str(c["codec"]).split(":")[0]
        c["codec"] = f"{kind}:{LOW_KBPS[kind]}k"
    return c


def _clip(voice: Voice, label: int | None, i: int, split: str, seed: int, salt: str, pool: list[str],
          sids: list[int], unseen: str) -> Clip:  # fmt: skip
    rng = random.Random(f"{seed}:{salt}:{voice.label}:{i}")
    sid = rng.choice(sids)
    conditions = draw_conditions(rng, unseen)
    codec = str(conditions.get("codec", "wav:0")).split(":")[0]
    ext = {"wav": "wav", "mp3": "mp3", "opus": "opus", "aac": "m4a"}[codec]
    return Clip(
        path=f"{voice.label}/{split}-{i:05d}.{ext}",
        label=label,
        voice=voice.label,
        split=split,
        sentence_id=sid,
        text=pool[sid],
        conditions=conditions,
    )


def plan(
    per_voice: int,
    seed: int,
    unseen: str = "",
    extra_per_voice: int = 0,
    open_per_voice: int = 0,
    voice_limit: int | None = None,
) -> list[Clip]:
    """The whole corpus as data: which voice says which sentence under which conditions.

    The 9 labelled voices first (their clips do not depend on the other arguments), then
    ``extra_per_voice`` training clips of every catalogue training voice and ``open_per_voice``
    clips of every open-set voice (standard conditions only); ``voice_limit`` keeps only the first
    that many voices of each of those roles (for quick trials and tests)."""
    if unseen and unseen not in UNSEEN:
        raise ValueError(f"unseen must be one of {', '.join(UNSEEN)}")
    salt = f"unseen-{unseen}" if unseen else "corpus"
    corpus_pool = sentences(SENTENCE_POOL, "corpus")
    pool = sentences(max(per_voice * 2, 50), salt, exclude=corpus_pool) if unseen else corpus_pool
    by_split: dict[str, list[int]] = {}
    for sid in range(len(pool)):
        by_split.setdefault("test" if unseen else split_of(sid), []).append(sid)
    clips = []
    for label, voice in enumerate(VOICES):
        for i in range(per_voice):
            split = "test" if unseen else split_of(i)
            clips.append(_clip(voice, label, i, split, seed, salt, pool, by_split[split], unseen))
    if unseen:
        return clips
    sentence_split = {"train": "train", "open-val": "val", "open-test": "test"}
    taken: dict[str, int] = {}
    for voice in catalogue():
        taken[voice.role] = taken.get(voice.role, 0) + 1
        if voice_limit is not None and taken[voice.role] > voice_limit:
            continue
        count = {"train": extra_per_voice, "open-val": open_per_voice, "open-test": open_per_voice}.get(voice.role, 0)
        for i in range(count):
            sids = by_split[sentence_split[voice.role]]
            clips.append(_clip(voice, None, i, voice.role, seed, salt, pool, sids, unseen))
    return clips


def synthesise(voice: Voice, text: str, rate: float, pitch: int, workdir: Path) -> tuple[np.ndarray, int]:
    """Speak ``text`` with ``voice``; returns mono float32 and its sample rate."""
    wav = workdir / "tts.wav"
    if voice.engine == "flite":
        cmd = ["flite", "-voice", voice.name, "--setf", f"duration_stretch={1 / rate:.3f}", "-t", text, "-o", str(wav)]
    elif voice.engine == "festival":
        (workdir / "tts.txt").write_text(text + "\n")
        cmd = [
            "text2wave", "-eval", f"({voice.name})", "-eval", f"(Parameter.set 'Duration_Stretch {1 / rate:.3f})",
            str(workdir / "tts.txt"), "-o", str(wav),
        ]  # fmt: skip
    else:
        cmd = [*espeak_command(voice), "-s", str(round(175 * rate)), "-p", str(50 + pitch), "-w", str(wav), text]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    audio = decode(wav)
    return audio.samples.mean(axis=0), audio.sample_rate


def espeak_command(voice: Voice) -> list[str]:
    """``espeak-ng -v NAME``, reading this project's synthetic variant files for a voice that
    speaks one (``--path`` to a data folder that also has them); other voices as they always were."""
    if voice.variant in synthetic_variants():
        return ["espeak-ng", "--path", str(espeak_data_path()), "-v", voice.name]
    return ["espeak-ng", "-v", voice.name]


def espeak_system_data() -> Path:
    """The system's ``espeak-ng-data`` folder, as ``espeak-ng --version`` names it."""
    version = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout
    return Path(version.partition("Data at:")[2].strip())


ESPEAK_VOICE_LIMIT = 349  # espeak-ng 1.51 lists at most N_VOICES_LIST - 1 voice files; past it, variants go unheard


@cache
def espeak_data_path() -> Path:
    """A folder for ``espeak-ng --path`` whose ``espeak-ng-data`` is the system's (linked, not copied)
    with English (``lang/gmw``) as its only language family and the synthetic variants as its only
    variants: espeak-ng reads variants from its data folder only, the system's is not ours to write,
    and espeak-ng lists at most 349 voice files, silently speaking the base voice for a variant past
    that (the system's 131 languages, 101 variants and 90 MBROLA voices already fill it). Named by a
    digest of the variants, made once (atomically, so parallel corpus workers agree) in the
    temporary folder."""
    system = espeak_system_data()
    if not (system / "lang" / "gmw").is_dir():
        raise SystemExit(f"espeak-ng's data folder {system} has no lang/gmw (English)")
    variants = synthetic_variants()
    listed = len(variants) + sum(1 for _ in (system / "lang" / "gmw").iterdir())
    if listed > ESPEAK_VOICE_LIMIT:
        raise SystemExit(f"{listed} voice files: espeak-ng would not hear those past {ESPEAK_VOICE_LIMIT}")
    digest = hashlib.sha256(json.dumps([str(system), variants], sort_keys=True).encode()).hexdigest()[:16]
    final = Path(tempfile.gettempdir()) / f"ve-espeak-{digest}"
    if final.is_dir():
        return final
    work = Path(tempfile.mkdtemp(prefix="ve-espeak-", dir=final.parent))
    data = work / "espeak-ng-data"
    (data / "lang").mkdir(parents=True)
    (data / "voices" / "!v").mkdir(parents=True)
    for entry in system.iterdir():
        if entry.name not in ("voices", "lang"):
            (data / entry.name).symlink_to(entry)
    (data / "lang" / "gmw").symlink_to(system / "lang" / "gmw")
    for name, text in variants.items():
        (data / "voices" / "!v" / name).write_text(text)
    try:
        os.rename(work, final)
    except OSError:  # another process made it first: theirs is the same
        shutil.rmtree(work)
    return final


def speak(voice: Voice, text: str, rate: float, pitch: int, workdir: Path) -> torch.Tensor:
    """``synthesise``, at ``SAMPLE_RATE``, with the voice's pseudo-speaker warp applied: the audio
    read as if sampled at ``warp`` x the rate (pitch, formants and tempo move together)."""
    samples, sr = synthesise(voice, text, rate, pitch, workdir)
    wave = resample(torch.from_numpy(np.ascontiguousarray(samples)), sr, SAMPLE_RATE)
    return speed_up(wave, voice.warp, SAMPLE_RATE)


def colored_noise(kind: str, n: int, sr: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "hum":
        t = torch.arange(n) / sr
        base = 50.0 if torch.rand(1, generator=gen).item() < 0.5 else 60.0
        hum = sum(torch.sin(2 * math.pi * base * k * t + 6.28 * torch.rand(1, generator=gen)) / k for k in range(1, 16))
        return torch.as_tensor(hum) + 0.05 * torch.randn(n, generator=gen)
    white = torch.randn(n, generator=gen)
    if kind == "white":
        return white
    spectrum = torch.fft.rfft(white)
    freqs = torch.fft.rfftfreq(n, 1 / sr).clamp_min(20.0)
    exponent = 0.5 if kind == "pink" else 1.0  # amplitude ~ f^-1/2 (pink), f^-1 (brown)
    return torch.fft.irfft(spectrum / freqs**exponent, n=n)


def degrade(wave: torch.Tensor, sr: int, c: dict[str, Any], gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """Reverb, noise at an SNR, band limits, telephone rate and gain, in that order."""
    if "reverb_rt60" in c:
        rt60 = float(c["reverb_rt60"])
        n = int(rt60 * sr)
        t = torch.arange(n) / sr
        rir = torch.randn(n, generator=gen) * torch.exp(-6.9 * t / rt60)
        rir[0] = 1.0
        wave = AF.fftconvolve(wave, rir / rir.norm())[: wave.numel()]
    if "noise" in c:
        noise = colored_noise(str(c["noise"]), wave.numel(), sr, gen)
        snr = float(c["snr_db"])
        scale = wave.norm() / (noise.norm() * 10 ** (snr / 20) + 1e-9)
        wave = wave + scale * noise
    band = str(c.get("band", ""))
    if band == "telephone":
        wave = AF.highpass_biquad(AF.lowpass_biquad(wave, sr, 3400.0), sr, 300.0)
        wave, sr = resample(wave, sr, 8000), 8000
    elif band.startswith("lowpass:"):
        wave = AF.lowpass_biquad(wave, sr, float(band.split(":")[1]))
    elif band.startswith("highpass:"):
        wave = AF.highpass_biquad(wave, sr, float(band.split(":")[1]))
    peak = wave.abs().max().clamp_min(1e-6)
    wave = wave / peak * 10 ** (float(c.get("gain_db", -3.0)) / 20)
    return wave.clamp(-1.0, 1.0), sr


CODEC_OPTIONS = {
    "wav": ["-c:a", "pcm_s16le"],
    "mp3": ["-c:a", "libmp3lame"],
    "opus": ["-c:a", "libopus"],
    "aac": ["-c:a", "aac"],
}


def ffmpeg_write(wave: torch.Tensor, sr: int, out: Path, options: list[str]) -> None:
    """Pipe a mono float32 waveform through ffmpeg into ``out`` with output ``options``."""
    cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "f32le", "-ar", str(sr), "-ac", "1", "-i", "-"]
    subprocess.run([*cmd, *options, str(out)], input=wave.numpy().astype("<f4").tobytes(), check=True, timeout=120)


def encode(wave: torch.Tensor, sr: int, codec: str, out: Path) -> None:
    """Write 16-bit WAV, or a lossy codec at a bitrate (``mp3:64k``)."""
    kind, _, rate = codec.partition(":")
    ffmpeg_write(wave, sr, out, CODEC_OPTIONS[kind] + (["-b:a", rate] if rate else []))


@cache
def _by_label() -> dict[str, Voice]:
    return {v.label: v for v in catalogue()}


def voice_named(label: str) -> Voice:
    return _by_label()[label]


def make_clip(clip: Clip, out_dir: Path, seed: int) -> None:
    target = out_dir / clip.path
    if target.exists():
        return
    voice = voice_named(clip.voice)
    c = clip.conditions
    gen = torch.Generator().manual_seed(random.Random(f"{seed}:{clip.path}").getrandbits(63))
    with tempfile.TemporaryDirectory() as tmp:
        wave = speak(voice, clip.text, float(c["rate"]), int(c["pitch"]), Path(tmp))
        wave = wave[: int(MAX_SECONDS * SAMPLE_RATE)]
        wave, sr = degrade(wave, SAMPLE_RATE, c, gen)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tmp) / ("partial" + target.suffix)
        encode(wave, sr, str(c.get("codec", "wav")), partial)
        shutil.move(partial, target)  # atomic enough: a resumed run never sees half a clip


def _make(args: tuple[Clip, Path, int]) -> str:
    make_clip(*args)
    return args[0].path


def check_tools(engines: Iterable[str]) -> None:
    missing = [TOOLS[e] for e in engines if shutil.which(TOOLS[e]) is None]
    if missing:
        raise SystemExit(f"missing programs: {', '.join(missing)} (make system-deps installs them)")


def check_espeak_variants(voices: Iterable[Voice]) -> None:
    """espeak-ng falls back to its base voice, silently, on an unknown variant: refuse instead."""
    wanted = {v.variant for v in voices if v.engine == "espeak"}
    listing = subprocess.run(["espeak-ng", "--voices=variant"], capture_output=True, text=True, check=True).stdout
    have = {line.split()[4].removeprefix("!v/") for line in listing.splitlines()[1:] if len(line.split()) > 4}
    missing = sorted(wanted - have - synthetic_variants().keys())
    if missing:
        raise SystemExit(f"espeak-ng has no variant files {', '.join(missing)} (expected: {len(ESPEAK_VARIANT_FILES)})")


def generate(
    out_dir: Path,
    per_voice: int,
    seed: int,
    unseen: str = "",
    workers: int = 2,
    extra_per_voice: int = 0,
    open_per_voice: int = 0,
    voice_limit: int | None = None,
    command: str = "",
) -> list[Clip]:
    """Make the clips not on disk yet and write the manifest, labels, voices and, with ``command``
    (how it was invoked), ``corpus.json``: this invocation's wall time and machine
    (``model.training.provenance``)."""
    started = time.monotonic()
    clips = plan(per_voice, seed, unseen, extra_per_voice, open_per_voice, voice_limit)
    voices = [voice_named(name) for name in dict.fromkeys(c.voice for c in clips)]
    check_tools({v.engine for v in voices} | {"ffmpeg"})
    check_espeak_variants(voices)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [(clip, out_dir, seed) for clip in clips if not (out_dir / clip.path).exists()]
    if todo:
        with get_context("spawn").Pool(workers) as pool:  # no fork: torch threads may be running
            for _ in tqdm(pool.imap_unordered(_make, todo), total=len(todo), desc="synthesising", unit="clip"):
                pass
    with (out_dir / "manifest.jsonl").open("w") as f:
        for clip in clips:
            f.write(json.dumps(asdict(clip)) + "\n")
    (out_dir / "labels.json").write_text(json.dumps(LABELS) + "\n")
    roles = [{"voice": v.label, "engine": v.engine, "name": v.name, "warp": v.warp, "role": v.role} for v in voices]
    (out_dir / "voices.json").write_text(json.dumps(roles, indent=1) + "\n")
    if command:
        record_corpus_run(out_dir, command, len(clips), len(voices), len(todo), time.monotonic() - started)
    log.info("%d clips of %d voices in %s (%d made now)", len(clips), len(voices), out_dir, len(todo))
    return clips


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.training.corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--per-voice", type=int, default=200, help="clips per labelled voice")
    parser.add_argument("--extra-per-voice", type=int, default=0, help="training clips per catalogue training voice")
    parser.add_argument("--open-per-voice", type=int, default=0, help="clips per open-set (held-out) voice")
    parser.add_argument("--voice-limit", type=int, help="at most N training and N open-set voices of each split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--conditions", choices=["standard", *(f"unseen-{u}" for u in UNSEEN)], default="standard")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    unseen = args.conditions.removeprefix("unseen-") if args.conditions != "standard" else ""
    if unseen and (args.extra_per_voice or args.open_per_voice):
        parser.error("unseen condition sets hold the 9 labelled voices only")
    generate(
        args.out_dir,
        args.per_voice,
        args.seed,
        unseen,
        args.workers,
        args.extra_per_voice,
        args.open_per_voice,
        args.voice_limit,
        command_line("model.training.corpus", argv),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
