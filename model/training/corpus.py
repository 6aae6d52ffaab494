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
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchaudio.functional as AF
from tqdm import tqdm

from model.audio import decode, load, resample, wav_pcm16
from model.speech import SpeechDetector
from model.training.data import speed_up
from model.training.provenance import command_line, record_corpus_run
from model.training.realspeech import (
    HELD_OUT_MIN_CLIPS,
    Piece,
    RealSplit,
    Speaker,
    joined_length,
    read_spans,
    read_speakers,
    spans_of,
    speech_regions,
    split_speakers,
    training_pieces,
    trial_pieces,
)
from model.training.sentences import sentences
from model.training.voices import ESPEAK_VARIANT_FILES, LABEL_VOICES, Voice, catalogue, synthetic_variants

log = logging.getLogger(__name__)


VOICES = LABEL_VOICES  # the 9 labels: names, order, engines and settings as they always were
LABELS = [v.label for v in VOICES]
SAMPLE_RATE = 16000
MAX_SECONDS = 8.0
SENTENCE_POOL = 800
TOOLS = {"flite": "flite", "festival": "text2wave", "espeak": "espeak-ng", "ffmpeg": "ffmpeg"}

EXTENSIONS = {"wav": "wav", "mulaw": "wav", "mp3": "mp3", "opus": "opus", "aac": "m4a"}
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
    source: str = ""  # a real recording's source (model.training.realspeech); "" for a synthesised clip
    segment: str = ""  # held-out real clips: the same speech under each probe condition shares it
    origin: dict[str, Any] = field(default_factory=dict)  # real clips: file, offset and length of the speech


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
    ext = EXTENSIONS[codec]
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
    "mulaw": ["-c:a", "pcm_mulaw"],  # G.711 in WAV: the telephone probes of held-out real speakers
    "mp3": ["-c:a", "libmp3lame"],
    "opus": ["-c:a", "libopus"],
    "aac": ["-c:a", "aac"],
}


def ffmpeg_write(wave: torch.Tensor, sr: int, out: Path, options: list[str]) -> None:
    """Pipe a mono float32 waveform through ffmpeg into ``out`` with output ``options``."""
    cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "f32le", "-ar", str(sr), "-ac", "1", "-i", "-"]
    subprocess.run([*cmd, *options, str(out)], input=wave.numpy().astype("<f4").tobytes(), check=True, timeout=120)


def write_wav(wave: torch.Tensor, sr: int, out: Path) -> None:
    """16-bit mono WAV as FFmpeg's ``pcm_s16le`` writes it, without starting FFmpeg (about 85 ms
    a clip, more than half of making a clip, for over half of a corpus's clips)."""
    out.write_bytes(wav_pcm16(wave, sr))


def encode(wave: torch.Tensor, sr: int, codec: str, out: Path) -> None:
    """Write 16-bit WAV, or a lossy codec at a bitrate (``mp3:64k``)."""
    kind, _, rate = codec.partition(":")
    if kind == "wav" and not rate:
        write_wav(wave, sr, out)
        return
    ffmpeg_write(wave, sr, out, CODEC_OPTIONS[kind] + (["-b:a", rate] if rate else []))


@cache
def _by_label() -> dict[str, Voice]:
    return {v.label: v for v in catalogue()}


def voice_named(label: str) -> Voice:
    return _by_label()[label]


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Clips are made, and speech found, on one torch thread: a clip's bytes then do not depend on
    the machine's cores, and the pool's workers never wait on each other's threads (at torch's
    default, every core in each worker, the training guide's corpus took twice as long)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@one_torch_thread()
def make_clip(clip: Clip, out_dir: Path, seed: int) -> None:
    target = out_dir / clip.path
    if target.exists():
        return
    c = clip.conditions
    gen = torch.Generator().manual_seed(random.Random(f"{seed}:{clip.path}").getrandbits(63))
    with tempfile.TemporaryDirectory() as tmp:
        if clip.origin:  # real speech: the speech of its file that the clip is cut from
            wave = read_spans(clip.origin["file"], clip.origin["spans"])
        else:
            wave = speak(voice_named(clip.voice), clip.text, float(c["rate"]), int(c["pitch"]), Path(tmp))
        wave = wave[: int(MAX_SECONDS * SAMPLE_RATE)]
        wave, sr = degrade(wave, SAMPLE_RATE, c, gen)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tmp) / ("partial" + target.suffix)
        encode(wave, sr, str(c.get("codec", "wav")), partial)
        shutil.move(partial, target)  # atomic enough: a resumed run never sees half a clip


# Held-out real speakers: each clip of speech is made once under each of these, so that trials can
# enrol on the clip as recorded and probe with the others (a telephone line: 300-3400 Hz, 8 kHz,
# G.711 mu-law; VoIP and streaming codecs at low bitrates; noise; a reverberant room).
PROBES: dict[str, dict[str, Any]] = {
    "clean": {},
    "telephone": {"band": "telephone", "codec": "mulaw"},
    "opus": {"codec": "opus:12k"},
    "mp3": {"codec": "mp3:24k"},
    "noise": {"noise": "pink", "snr_db": 10.0},
    "reverb": {"reverb_rt60": 0.5},
}
REAL_TRAIN_COPIES = 2  # each training piece as recorded, and under conditions drawn as for synthetic clips


def real_conditions(rng: random.Random, copy: int) -> dict[str, Any]:
    """A real training clip's conditions: copy 0 as recorded (a level only), the others drawn as
    the synthetic clips' are, less the speaking rate and pitch, which are the speaker's own."""
    drawn = draw_conditions(rng)
    if copy == 0:
        return {"gain_db": drawn["gain_db"]}
    return {k: v for k, v in drawn.items() if k not in ("rate", "pitch")}


def plan_real(
    speakers: list[Speaker],
    regions: dict[Path, list[tuple[int, int]]],
    split: RealSplit,
    seed: int,
    train_most: int,
    trial_most: int,
) -> list[Clip]:
    """The real speakers' clips: each training speaker's pieces (``train_most`` at most) in
    ``REAL_TRAIN_COPIES`` copies, each held-out speaker's (``trial_most`` at most) under every probe
    condition. A clip's ``origin`` says which samples of which file it is."""
    clips = []
    for speaker in speakers:
        role = split.roles[speaker.name]
        if role == "train":
            for k, piece in enumerate(training_pieces(speaker, regions, train_most)):
                for copy in range(REAL_TRAIN_COPIES):
                    conditions = real_conditions(random.Random(f"{seed}:real:{speaker.name}:{k}:{copy}"), copy)
                    clip = _real_clip(speaker, piece, regions, f"train-{k:04d}-{copy}", "train", conditions)
                    clip.segment = f"{speaker.name}#{k}"
                    clips.append(clip)
        else:
            for k, piece in enumerate(trial_pieces(speaker, regions, trial_most)):
                for probe, conditions in PROBES.items():
                    clip = _real_clip(speaker, piece, regions, f"{role}-{k:02d}-{probe}", role, dict(conditions))
                    clip.segment = f"{speaker.name}#{k}"
                    clips.append(clip)
    return clips


def _real_clip(
    speaker: Speaker, piece: Piece, regions: dict[Path, list[tuple[int, int]]], name: str, split: str,
    conditions: dict[str, Any],
) -> Clip:  # fmt: skip
    ext = EXTENSIONS[str(conditions.get("codec", "wav")).split(":")[0]]
    return Clip(
        path=f"real/{speaker.name}/{name}.{ext}",
        label=None,
        voice=speaker.name,
        split=split,
        sentence_id=-1,
        text="",
        conditions=conditions,
        source=speaker.source,
        origin={"file": str(piece.file), "spans": spans_of(piece, regions[piece.file])},
    )


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


@dataclass
class RealSpeech:
    """Real speakers for the corpus (``model.training.realspeech``): ``root`` is a folder of sources;
    ``val`` and ``test`` speakers are held out; at most ``train_clips`` pieces of each training
    speaker and ``trial_clips`` of each held-out one."""

    root: Path
    val: int = 40
    test: int = 60
    train_clips: int = 32
    trial_clips: int = 6


_detector: SpeechDetector | None = None


@one_torch_thread()
def _detect(path: Path) -> list[tuple[int, int]]:
    global _detector  # one Silero model per worker process
    _detector = _detector or SpeechDetector(backend="torch")  # the model the corpus was first made with
    return _detector.regions(load(path, SAMPLE_RATE))


def _regions_in_pool(pool: Any) -> Any:
    def detect_many(files: list[Path]) -> list[list[tuple[int, int]]]:
        return list(tqdm(pool.imap(_detect, files), total=len(files), desc="finding speech", unit="file"))

    return detect_many


def plan_real_speech(real: RealSpeech, out_dir: Path, seed: int, pool: Any) -> tuple[list[Clip], list[dict[str, Any]]]:
    """The real speakers' clips and a row per speaker (source, licence, sex, role, seconds of
    speech) for ``voices.json`` and ``corpus.json``. Speech is found once per file and cached."""
    speakers = read_speakers(real.root)
    regions = speech_regions(speakers, out_dir, _regions_in_pool(pool))
    eligible = {s.name for s in speakers if len(trial_pieces(s, regions, real.trial_clips)) >= HELD_OUT_MIN_CLIPS}
    split = split_speakers(speakers, eligible, real.val, real.test, seed)
    clips = plan_real(speakers, regions, split, seed, real.train_clips, real.trial_clips)
    rows = [
        {
            "voice": s.name, "engine": "real", "source": s.source, "license": s.licence, "sex": s.sex,
            "role": split.roles[s.name],
            "speech_s": round(sum(joined_length(regions[f]) for f in s.files) / SAMPLE_RATE, 1),
        }
        for s in speakers
    ]  # fmt: skip
    return clips, rows


def real_summary(rows: list[dict[str, Any]], root: Path) -> dict[str, Any]:
    """What ``corpus.json`` says of the real speech: where it came from, and per source its
    licences and how many speakers each role has."""
    sources: dict[str, Any] = {}
    for r in rows:
        entry = sources.setdefault(r["source"], {"licenses": [], "speakers": 0, "roles": {}})
        if r["license"] not in entry["licenses"]:
            entry["licenses"].append(r["license"])
        entry["speakers"] += 1
        entry["roles"][r["role"]] = entry["roles"].get(r["role"], 0) + 1
    return {"root": str(root), "speakers": len(rows), "sources": sources}


def _row(clip: Clip) -> dict[str, Any]:
    """A manifest line: the real-speech fields only where they are set."""
    return {k: v for k, v in asdict(clip).items() if v or k not in ("source", "segment", "origin")}


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
    real: RealSpeech | None = None,
) -> list[Clip]:
    """Make the clips not on disk yet and write the manifest, labels, voices and, with ``command``
    (how it was invoked), ``corpus.json``: this invocation's wall time and machine
    (``model.training.provenance``), and with ``real``, the real speakers' sources and licences."""
    started = time.monotonic()
    clips = plan(per_voice, seed, unseen, extra_per_voice, open_per_voice, voice_limit)
    voices = [voice_named(name) for name in dict.fromkeys(c.voice for c in clips)]
    check_tools({v.engine for v in voices} | {"ffmpeg"})
    check_espeak_variants(voices)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    with get_context("spawn").Pool(workers) as pool:  # no fork: torch threads may be running
        if real is not None:
            real_clips, rows = plan_real_speech(real, out_dir, seed, pool)
            clips += real_clips
        todo = [(clip, out_dir, seed) for clip in clips if not (out_dir / clip.path).exists()]
        for _ in tqdm(pool.imap_unordered(_make, todo), total=len(todo), desc="making clips", unit="clip"):
            pass
    with (out_dir / "manifest.jsonl").open("w") as f:
        for clip in clips:
            f.write(json.dumps(_row(clip)) + "\n")
    (out_dir / "labels.json").write_text(json.dumps(LABELS) + "\n")
    roles = [{"voice": v.label, "engine": v.engine, "name": v.name, "warp": v.warp, "role": v.role} for v in voices]
    (out_dir / "voices.json").write_text(json.dumps(roles + rows, indent=1) + "\n")
    if command:
        summary = real_summary(rows, real.root) if real is not None else None
        record_corpus_run(
            out_dir, command, len(clips), len(voices) + len(rows), len(todo), time.monotonic() - started, summary
        )
    log.info("%d clips of %d voices in %s (%d made now)", len(clips), len(voices) + len(rows), out_dir, len(todo))
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
    real = RealSpeech(Path())
    parser.add_argument("--real", type=Path, help="a folder of real speech: one folder of speakers per source")
    parser.add_argument("--real-val", type=int, default=real.val, help="real speakers held out for validation")
    parser.add_argument("--real-test", type=int, default=real.test, help="real speakers held out for test")
    parser.add_argument(
        "--real-train-clips", type=int, default=real.train_clips, help="clips of up to 6 s per real training speaker"
    )
    parser.add_argument(
        "--real-trial-clips", type=int, default=real.trial_clips, help="clips of 3-6 s per held-out real speaker"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    unseen = args.conditions.removeprefix("unseen-") if args.conditions != "standard" else ""
    if unseen and (args.extra_per_voice or args.open_per_voice or args.real):
        parser.error("unseen condition sets hold the 9 labelled voices only")
    if args.real is not None:
        real = RealSpeech(args.real, args.real_val, args.real_test, args.real_train_clips, args.real_trial_clips)
    try:
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
            real if args.real is not None else None,
        )
    except ValueError as exc:  # a folder with no speakers, a reserved speaker, too few to hold out
        raise SystemExit(f"error: {exc}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
