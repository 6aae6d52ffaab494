"""Real recorded speakers for the corpus: a reader for folders of speakers, and the clips cut from them.

``REAL_SPEECH`` (``make corpus``; ``python -m model.training.corpus --real DIR``) is a folder of
sources, each a folder holding one corpus::

    DIR/<source>/<speaker>/**/*.flac     one folder per speaker, audio anywhere below it
                                         (LibriSpeech's <id>/<chapter>/, VoxCeleb's id10001/<video>/)
    DIR/<source>/<speaker>_<rest>.wav    or files named by their speaker: the name before the first
                                         "_" (Speech Commands' <hash>_nohash_0.wav), the whole name
                                         for a file with no "_" (one file per speaker)
    DIR/<source>/validated.tsv + clips/  or a Common Voice export: speakers by client_id
    DIR/speakers.tsv                     optional, at the top or in a source: speaker, license
                                         (and source, sex or gender) per speaker
    DIR/<source>/LICENSE                 optional: its first line is the licence of every speaker
                                         speakers.tsv does not name

So a LibriSpeech, VoxCeleb or Common Voice download reads as it comes: point ``REAL_SPEECH`` at the
folder above its subsets (LibriSpeech's ``SPEAKERS.TXT`` there gives each reader's sex). Every
speaker's licence and source go into ``corpus.json`` and from there into the weights' manifest.

Speakers of LibriSpeech's test and dev subsets and the Free Spoken Digit Dataset are reserved for an
independent evaluation: a source that holds one is refused (:class:`ReservedSpeakerError`), as the
voice catalogue refuses reserved synthetic voices.

Silence is cut with a voice activity detector (``model.speech``) before anything is cropped, and
each file's speech is cut into clips: for training up to 6 s each, for held-out speakers 3-6 s each
(shorter only where a file has less). Clips are made by ``model.training.corpus`` with its recording
conditions (noise, reverberation, band limits, codecs, telephone).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from model.audio import load
from model.training.data import AUDIO_SUFFIXES
from model.weights import replace_file

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
UNKNOWN_LICENCE = "unknown"

# LibriSpeech's test-clean, test-other, dev-clean and dev-other readers (its SPEAKERS.TXT):
# reserved for an independent evaluation of this project's models, never trained, validated,
# calibrated or selected on.
RESERVED_LIBRISPEECH_SPEAKERS = frozenset({
    61, 84, 116, 121, 174, 237, 251, 260, 367, 422, 533, 652, 672, 700, 777, 908, 1089, 1188, 1221, 1255, 1272,
    1284, 1320, 1462, 1580, 1585, 1630, 1650, 1651, 1673, 1686, 1688, 1701, 1919, 1988, 1993, 1995, 1998, 2033,
    2035, 2078, 2086, 2094, 2277, 2300, 2412, 2414, 2428, 2506, 2609, 2803, 2830, 2902, 2961, 3000, 3005, 3080,
    3081, 3170, 3331, 3528, 3536, 3538, 3570, 3575, 3576, 3660, 3663, 3729, 3752, 3764, 3853, 3915, 3997, 4077,
    4153, 4198, 4294, 4323, 4350, 4446, 4507, 4515, 4570, 4572, 4831, 4852, 4970, 4992, 5105, 5142, 5338, 5442,
    5484, 5536, 5543, 5639, 5683, 5694, 5764, 5849, 5895, 6070, 6123, 6128, 6241, 6267, 6295, 6313, 6319, 6345,
    6432, 6455, 6467, 6599, 6829, 6841, 6930, 6938, 7018, 7021, 7105, 7127, 7176, 7601, 7641, 7697, 7729, 7850,
    7902, 7975, 7976, 8131, 8173, 8188, 8224, 8230, 8254, 8280, 8288, 8297, 8455, 8461, 8463, 8555, 8842
})  # fmt: skip
RESERVED_LIBRISPEECH_SUBSETS = frozenset({"test-clean", "test-other", "dev-clean", "dev-other"})
LIBRISPEECH_SOURCE = re.compile(r"librispeech|^(train|dev|test)-(clean|other)(-\d+)?$", re.IGNORECASE)
FSDD_SOURCE = re.compile(r"free[-_ ]?spoken[-_ ]?digit|fsdd", re.IGNORECASE)
COMMON_VOICE_TABLES = ("validated.tsv", "train.tsv", "dev.tsv", "test.tsv", "other.tsv")


class ReservedSpeakerError(ValueError):
    """A speaker kept for independent evaluation was found in a real-speech folder."""


@dataclass(frozen=True)
class Speaker:
    name: str  # unique across sources: "<source>/<speaker>"
    source: str
    licence: str
    sex: str | None  # "F", "M", or None where unknown
    files: tuple[Path, ...]


def librispeech_id(speaker: str) -> int | None:
    """``ls-103`` or ``103`` -> 103; None for a name with no reader id."""
    found = re.fullmatch(r"(?:ls-)?(\d+)", speaker)
    return int(found.group(1)) if found else None


def check_not_reserved(source: str, speaker: str) -> None:
    """Refuse a reserved speaker: raises ReservedSpeakerError."""
    if source.lower() in RESERVED_LIBRISPEECH_SUBSETS:
        raise ReservedSpeakerError(f"{source}: LibriSpeech's {source} is reserved for independent evaluation")
    if FSDD_SOURCE.search(source):
        raise ReservedSpeakerError(f"{source}: the Free Spoken Digit Dataset is reserved for independent evaluation")
    reader = librispeech_id(speaker) if LIBRISPEECH_SOURCE.search(source) or speaker.startswith("ls-") else None
    if reader is not None and reader in RESERVED_LIBRISPEECH_SPEAKERS:
        raise ReservedSpeakerError(
            f"{source}/{speaker}: LibriSpeech reader {reader} (test or dev) is reserved for independent evaluation"
        )


def _audio(paths: Iterable[Path]) -> list[Path]:
    return sorted(p for p in paths if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)


def _sex(value: str) -> str | None:
    v = value.strip().lower()
    if v in ("f", "female") or v.startswith("female"):
        return "F"
    if v in ("m", "male") or v.startswith("male"):
        return "M"
    return None


def _table(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _speaker_table(folders: list[Path]) -> dict[str, dict[str, str]]:
    """``speakers.tsv`` rows by speaker, the later folders' rows over the earlier ones'."""
    rows: dict[str, dict[str, str]] = {}
    for folder in folders:
        path = folder / "speakers.tsv"
        if path.is_file():
            rows |= {r["speaker"]: r for r in _table(path) if r.get("speaker")}
    return rows


def _librispeech_sexes(folders: list[Path]) -> dict[int, str]:
    """Reader id -> sex from LibriSpeech's own ``SPEAKERS.TXT`` (``id | sex | subset | ...``)."""
    sexes: dict[int, str] = {}
    for folder in folders:
        for path in sorted(folder.glob("*SPEAKERS.TXT")):
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                parts = [p.strip() for p in line.split("|")]
                if len(parts) >= 2 and parts[0].isdigit() and _sex(parts[1]):
                    sexes[int(parts[0])] = str(_sex(parts[1]))
    return sexes


def _source_licence(source: Path) -> str:
    for name in ("LICENSE", "LICENSE.txt", "LICENCE"):
        path = source / name
        if path.is_file():
            lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
            if lines:
                return lines[0]
    return UNKNOWN_LICENCE


def _common_voice(source: Path) -> dict[str, tuple[list[Path], str | None]]:
    """Speakers of a Common Voice export: client_id -> (clips, sex)."""
    found: dict[str, tuple[list[Path], str | None]] = {}
    for name in COMMON_VOICE_TABLES:
        table = source / name
        if not table.is_file():
            continue
        for row in _table(table):
            client, clip = row.get("client_id", ""), row.get("path", "")
            path = source / "clips" / clip
            if not client or not clip or not path.is_file():
                continue
            files, sex = found.setdefault(client, ([], None))
            if path not in files:
                files.append(path)
            found[client] = (files, sex or _sex(row.get("gender", "")))
    return found


def read_speakers(root: str | Path) -> list[Speaker]:
    """Every speaker under ``root`` (a folder of sources), sorted by name. ValueError for a folder
    with no speakers; ReservedSpeakerError for a reserved one."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: no such folder of real speech")
    speakers: list[Speaker] = []
    for source in sorted(p for p in root.iterdir() if p.is_dir()):
        table = _speaker_table([root, source])
        sexes = _librispeech_sexes([root, source])
        default_licence = _source_licence(source)
        found: dict[str, tuple[list[Path], str | None]] = _common_voice(source)
        if not found:
            for entry in sorted(source.iterdir()):
                if entry.is_dir():
                    files = _audio(entry.rglob("*"))
                    if files:
                        found[entry.name] = (files, None)
            for f in _audio(source.iterdir()):
                files, _ = found.setdefault(f.stem.partition("_")[0], ([], None))
                files.append(f)
        for name, (files, sex) in sorted(found.items()):
            check_not_reserved(source.name, name)
            row = table.get(name, {})
            if row.get("source") and row["source"] != source.name:
                row = {}  # the table's row is another source's speaker of the same name
            reader = librispeech_id(name) if LIBRISPEECH_SOURCE.search(source.name) else None
            sex = _sex(row.get("sex", row.get("gender", ""))) or sex or (sexes.get(reader) if reader else None)
            licence = row.get("license") or row.get("licence") or default_licence
            speakers.append(Speaker(f"{source.name}/{name}", source.name, licence, sex, tuple(sorted(files))))
    if not speakers:
        raise ValueError(f"{root}: no speakers (want <source>/<speaker>/ folders or <source>/<speaker>_*.wav files)")
    unlicensed = sorted({s.source for s in speakers if s.licence == UNKNOWN_LICENCE})
    if unlicensed:
        log.warning("no licence for the speakers of %s (speakers.tsv or a LICENSE file says it)", ", ".join(unlicensed))
    return speakers


# --- speech regions, cached beside the corpus --------------------------------------------------

SPEECH_CACHE = "real-speech.json"


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def speech_regions(
    speakers: list[Speaker], cache_dir: Path, detect: Callable[[list[Path]], list[list[tuple[int, int]]]]
) -> dict[Path, list[tuple[int, int]]]:
    """Each file's speech regions (16 kHz sample ranges), from ``detect`` (given the files whose
    regions are not known yet) or, for a file whose size and time are unchanged, from
    ``cache_dir/real-speech.json``, which is rewritten."""
    cache_path = cache_dir / SPEECH_CACHE
    try:
        cached = json.loads(cache_path.read_text())
    except (OSError, json.JSONDecodeError):
        cached = {}
    files = [f for s in speakers for f in s.files]
    keys = {f: (str(f.resolve()), _stamp(f)) for f in files}
    todo = [f for f in files if cached.get(keys[f][0], {}).get("stamp") != keys[f][1]]
    found = dict(zip(todo, detect(todo), strict=True)) if todo else {}
    fresh = {
        keys[f][0]: {"stamp": keys[f][1], "regions": [list(r) for r in found[f]]} if f in found else cached[keys[f][0]]
        for f in files
    }
    if todo or set(fresh) != set(cached):
        cache_dir.mkdir(parents=True, exist_ok=True)
        replace_file(cache_path, lambda tmp: tmp.write_text(json.dumps(fresh)))
    return {f: [(int(a), int(b)) for a, b in fresh[keys[f][0]]["regions"]] for f in files}  # type: ignore[arg-type]


# --- clips -------------------------------------------------------------------------------------

TRAIN_MAX_S = 6.0  # training clips: consecutive speech of up to this long
TRAIN_MIN_S = 1.0  # shorter leftovers are dropped
TRIAL_MIN_S = 3.0  # held-out clips: 3-6 s of speech each where a file has that much
TRIAL_MAX_S = 6.0
TRIAL_SHORT_S = 1.5  # a held-out file with less than 3 s gives one clip if it has at least this
HELD_OUT_MIN_CLIPS = 2  # a held-out speaker needs two clips for a same-speaker trial (identification: 4)


@dataclass
class Piece:
    """``length`` samples of speech from ``file``, from its speech regions joined, starting at
    ``offset`` into that joined speech."""

    file: Path
    offset: int
    length: int


def joined_length(regions: list[tuple[int, int]]) -> int:
    return sum(b - a for a, b in regions)


def cut(speech: int, min_s: float, max_s: float, short_s: float | None = None) -> list[tuple[int, int]]:
    """``speech`` samples cut into equal consecutive pieces of ``min_s`` to ``max_s`` seconds, as
    many as fit (``(offset, length)`` each); one piece of all of it when it is shorter than
    ``min_s`` but at least ``short_s`` (none with ``short_s`` None)."""
    lo, hi = round(min_s * SAMPLE_RATE), round(max_s * SAMPLE_RATE)
    if speech < lo:
        return [(0, speech)] if short_s is not None and speech >= short_s * SAMPLE_RATE else []
    n = max(math.ceil(speech / hi), 1)
    n = min(n, speech // lo) if speech // lo else 1
    size = speech // n
    return [(k * size, size) for k in range(n)]


def training_pieces(speaker: Speaker, regions: dict[Path, list[tuple[int, int]]], most: int) -> list[Piece]:
    """Up to ``most`` pieces of up to 6 s of a training speaker, taken in turn from each file so
    that a speaker's sessions are all heard."""
    per_file = [
        [Piece(f, a, n) for a, n in cut(joined_length(regions[f]), TRAIN_MIN_S, TRAIN_MAX_S)] for f in speaker.files
    ]
    return _interleave(per_file, most)


def trial_pieces(speaker: Speaker, regions: dict[Path, list[tuple[int, int]]], most: int) -> list[Piece]:
    """Up to ``most`` pieces of 3-6 s of a held-out speaker, in turn from each file."""
    per_file = [
        [Piece(f, a, n) for a, n in cut(joined_length(regions[f]), TRIAL_MIN_S, TRIAL_MAX_S, TRIAL_SHORT_S)]
        for f in speaker.files
    ]
    return _interleave(per_file, most)


def _interleave(lists: list[list[Piece]], most: int) -> list[Piece]:
    out: list[Piece] = []
    for k in range(max((len(x) for x in lists), default=0)):
        out += [x[k] for x in lists if k < len(x)]
    return out[:most]


def spans_of(piece: Piece, regions: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The sample ranges of ``piece``'s file that make it up: its stretch of the joined speech,
    mapped back through the regions it was joined from."""
    spans, start, end, at = [], piece.offset, piece.offset + piece.length, 0
    for a, b in regions:
        lo, hi = max(start, at), min(end, at + b - a)
        if lo < hi:
            spans.append((a + lo - at, a + hi - at))
        at += b - a
    return spans


def read_spans(file: str | Path, spans: list[tuple[int, int]] | list[list[int]]) -> Tensor:
    """The samples of ``spans`` of ``file``, decoded at 16 kHz, joined."""
    wave = load(file, SAMPLE_RATE)
    return torch.cat([wave[a:b] for a, b in spans]) if spans else wave[:0]


# --- the split ---------------------------------------------------------------------------------


@dataclass
class RealSplit:
    """Which real speakers are held out: ``roles`` maps a speaker's name to train, open-val or
    open-test."""

    roles: dict[str, str] = field(default_factory=dict)

    def of(self, role: str) -> list[str]:
        return sorted(n for n, r in self.roles.items() if r == role)


def _order(name: str, seed: int) -> str:
    return hashlib.sha256(f"real-split:{seed}:{name}".encode()).hexdigest()


def split_speakers(speakers: list[Speaker], eligible: set[str], val: int, test: int, seed: int = 0) -> RealSplit:
    """Hold out ``val`` and ``test`` speakers among the ``eligible`` ones (those with enough speech
    for held-out trials), spread over the sources in proportion to their eligible speakers (at
    least one each from every source that has two), and within a source alternating the sexes
    where they are known; the rest train. Deterministic for a seed and a set of speakers."""
    by_source: dict[str, list[Speaker]] = {}
    for s in speakers:
        if s.name in eligible:
            by_source.setdefault(s.source, []).append(s)
    total = sum(len(v) for v in by_source.values())
    if total < val + test:
        raise ValueError(f"{total} real speakers have enough speech to hold out; {val} + {test} were asked for")
    roles = {s.name: "train" for s in speakers}
    for role, count in (("open-test", test), ("open-val", val)):
        quota = _quotas({src: sum(roles[s.name] == "train" for s in v) for src, v in by_source.items()}, count)
        for src, members in by_source.items():
            free = [s for s in members if roles[s.name] == "train"]
            for s in _alternate_sexes(sorted(free, key=lambda s: _order(s.name, seed)))[: quota[src]]:
                roles[s.name] = role
    return RealSplit(roles)


def _quotas(sizes: dict[str, int], count: int) -> dict[str, int]:
    """``count`` shared out in proportion to ``sizes`` (largest remainders), at least one to every
    source with two or more, or, where ``count`` is smaller than the number of those sources, one
    to each of the ``count`` largest."""
    total = sum(sizes.values())
    floor = sorted((k for k, n in sizes.items() if n >= 2), key=lambda k: (-sizes[k], k))[:count]
    quota = {k: int(k in floor) for k in sizes}
    left = count - sum(quota.values())
    shares = {k: left * n / total for k, n in sizes.items()}
    for k in sizes:
        quota[k] += math.floor(shares[k])
    rest = count - sum(quota.values())
    for k in sorted(sizes, key=lambda k: shares[k] - math.floor(shares[k]), reverse=True)[:rest]:
        quota[k] += 1
    quota = {k: min(q, sizes[k]) for k, q in quota.items()}
    for k in sorted(sizes, key=lambda k: (-(sizes[k] - quota[k]), k)):  # what a small source could not take
        quota[k] += min(sizes[k] - quota[k], count - sum(quota.values()))
    return quota


def _alternate_sexes(ordered: list[Speaker]) -> list[Speaker]:
    """Female, male, female, ... in the given order within each sex, then those of unknown sex."""
    f = [s for s in ordered if s.sex == "F"]
    m = [s for s in ordered if s.sex == "M"]
    unknown = [s for s in ordered if s.sex is None]
    mixed = [x for pair in zip(f, m, strict=False) for x in pair]
    longer = f[len(m) :] if len(f) > len(m) else m[len(f) :]
    if not f or not m:
        return ordered
    return mixed + longer + unknown
