"""Diarization measured on conversations made from held-out voices (``python -m
model.training.evaluate W DATA --diarization``).

Each conversation takes 2 to 5 speakers of one kind (the corpus's synthetic open-set voices, saying
fresh sentences, or its held-out real speakers, as recorded) and lets them take turns of 1.5 to
8 s, with pauses of 0.2 to 1 s, about one turn in eight overlapping the one before by 0.3 to 1 s,
1 to 3 minutes in all; a quarter of them go through an 8 kHz band limit. The reference turns run
from each piece's first to its last audible sample. The turns found (``model/diarize.py``, as
``/diarize`` does it) are scored with pyannote.metrics (``collar=0.5``: 0.25 s each side of a
reference boundary is not scored; overlapped speech is scored): DER and its parts, summed over the
conversations, and how often the number of speakers is right. With enrolment, two speakers of each
conversation are enrolled from clips the conversation does not use, and each found speaker is
named as ``/diarize?identify=true`` names it.
"""

from __future__ import annotations

import logging
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from model.audio import resample
from model.diarize import (
    Diarization,
    DiarizeConfig,
    Turn,
    diarize,
    keep_names_on_matching_turns,
    name_speakers,
    windows,
)
from model.runtime import EmbeddingModel
from model.speech import SpeechDetector
from model.training.data import Item, load_waves

log = logging.getLogger(__name__)
RATE = 16000
COLLAR = 0.5  # pyannote's collar: the total width around each reference boundary that is not scored


@dataclass
class Conversation:
    name: str
    kind: str  # synthetic | real
    wave: Tensor  # (N,) at 16 kHz
    reference: list[tuple[float, float, str]]  # (start, end, voice)
    narrowband: bool
    enrol: dict[str, list[Tensor]]  # voice -> clips kept out of the conversation, for enrolment


def audible(wave: Tensor, floor: float = 0.05) -> Tensor:
    """``wave`` from its first to its last sample above ``floor`` of its peak."""
    loud = torch.nonzero(wave.abs() > floor * float(wave.abs().max().clamp_min(1e-9))).flatten()
    return wave[int(loud[0]) : int(loud[-1]) + 1] if len(loud) else wave[:0]


def held_out_clips(items: list[Item]) -> dict[str, list[Item]]:
    """Per voice, the real speakers' clips as recorded (not the probes made of them)."""
    by_voice: dict[str, list[Item]] = {}
    for it in items:
        if it.real and not it.conditions:
            by_voice.setdefault(it.voice, []).append(it)
    return by_voice


def voice_pools(items: list[Item], kind: str, per_voice: int = 12, seed: int = 0) -> dict[str, list[Tensor]]:
    """Clean speech of each voice of ``items``: a real speaker's clips as recorded, or for a
    synthetic voice ``per_voice`` fresh sentences spoken by the corpus's own synthesiser (the
    corpus's clips of a synthetic voice each carry a different recording condition, which no
    conversation does: its condition is the conversation's)."""
    if kind == "real":
        clips = held_out_clips(items)
        flat = [it for v in sorted(clips) for it in clips[v]]
        waves = dict(zip((id(it) for it in flat), load_waves(flat, RATE, "loading real speakers"), strict=True))
        return {v: [audible(waves[id(it)]) for it in its] for v, its in clips.items()}
    from model.training.corpus import SENTENCE_POOL, speak, voice_named
    from model.training.sentences import sentences

    text = sentences(per_voice * 4, salt=f"diarization-{seed}", exclude=sentences(SENTENCE_POOL))
    voices = sorted({it.voice for it in items if not it.real})
    rng = random.Random(seed)
    pools: dict[str, list[Tensor]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in tqdm(voices, desc="speaking synthetic voices", unit="voice"):
            chosen = rng.sample(text, per_voice)
            pools[v] = [audible(speak(voice_named(v), t, 1.0, 0, Path(tmp))) for t in chosen]
    return pools


def make_conversations(
    pools: dict[str, list[Tensor]], kind: str, count: int, seed: int = 0, narrowband_share: float = 0.25
) -> list[Conversation]:
    """``count`` conversations of 2-5 of the voices of ``pools`` (module docstring). Two clips of
    each voice are kept out of the conversations for enrolment."""
    rng = random.Random(f"{seed}:{kind}")
    voices = sorted(v for v, clips in pools.items() if sum(c.numel() > 0 for c in clips) >= 4)
    if len(voices) < 2:
        raise ValueError(f"{len(voices)} {kind} voices with 4 clips or more: too few for conversations")
    out = []
    for n in range(count):
        chosen = rng.sample(voices, min(len(voices), rng.randint(2, 5)))
        usable = {v: [c for c in pools[v] if c.numel()] for v in chosen}
        enrol = {v: usable[v][:2] for v in chosen}
        speech = {v: usable[v][2:] for v in chosen}
        target = rng.uniform(60, 180)
        order = chosen[:]
        rng.shuffle(order)
        pieces: list[tuple[int, Tensor, str]] = []  # (start sample, audio, voice)
        end, previous, turn = 0, "", 0
        while end / RATE < target or turn < len(chosen):
            voice = order[turn] if turn < len(order) else rng.choice([v for v in chosen if v != previous])
            length = int(rng.uniform(1.5, 8.0) * RATE)
            audio = _speech_of(speech[voice], length, rng)
            if turn and rng.random() < 1 / 8:
                start = max(0, end - int(rng.uniform(0.3, 1.0) * RATE))
            else:
                start = end + int(rng.uniform(0.2, 1.0) * RATE)
            pieces.append((start, audio, voice))
            end, previous, turn = max(end, start + audio.numel()), voice, turn + 1
        wave = torch.zeros(end + RATE // 2)
        for start, audio, _ in pieces:
            wave[start : start + audio.numel()] += audio
        narrowband = rng.random() < narrowband_share
        if narrowband:
            wave = resample(resample(wave, RATE, 8000), 8000, RATE)
        wave = wave / wave.abs().max().clamp_min(1e-9) * 0.5
        reference = [(s / RATE, (s + a.numel()) / RATE, v) for s, a, v in pieces]
        out.append(Conversation(f"{kind}-{n:03d}", kind, wave, reference, narrowband, enrol))
    return out


def _speech_of(pool: list[Tensor], length: int, rng: random.Random) -> Tensor:
    """``length`` samples of a voice: its clips in a random order, joined with short gaps, cut."""
    joined: list[Tensor] = []
    total = 0
    order = pool[:]
    rng.shuffle(order)
    i = 0
    while total < length:
        clip = order[i % len(order)]
        joined += [clip, torch.zeros(int(0.1 * RATE))]
        total += clip.numel() + int(0.1 * RATE)
        i += 1
    return audible(torch.cat(joined)[:length])


def diarize_wave(
    model: EmbeddingModel, detector: SpeechDetector, wave: Tensor, config: DiarizeConfig | None = None
) -> Diarization:
    """What ``/diarize`` does, in one process (the windows batched 16 to a forward pass)."""
    config = config or DiarizeConfig()
    regions = [(a / RATE, b / RATE) for a, b in detector.regions(wave, RATE, whole=True)]
    spans = windows(regions, config)
    results = model.infer_many([wave[int(a * RATE) : int(b * RATE)] for a, b in spans], batch_windows=16)
    x = torch.stack([r.embedding for r in results]).numpy() if results else np.zeros((0, model.manifest.embedding_size))
    return diarize(wave.numel() / RATE, regions, spans, x, config=config)


def score(reference: list[tuple[float, float, str]], found: list[Turn], duration: float) -> dict[str, float]:
    """pyannote.metrics' DER parts (seconds) for one recording of ``duration`` seconds."""
    from pyannote.core import Annotation, Segment, Timeline
    from pyannote.metrics.diarization import DiarizationErrorRate

    ref, hyp = Annotation(), Annotation()
    for i, (start, end, voice) in enumerate(reference):
        ref[Segment(start, end), i] = voice
    for i, t in enumerate(found):
        hyp[Segment(t.start, t.end), i] = f"S{t.speaker + 1}"
    metric = DiarizationErrorRate(collar=COLLAR, skip_overlap=False)
    detail = metric(ref, hyp, uem=Timeline([Segment(0, duration)]), detailed=True)
    return {k: float(detail[k]) for k in ("total", "missed detection", "false alarm", "confusion")}


def named_speech(
    model: EmbeddingModel, conversation: Conversation, found: Diarization, threshold: float, enrolled: list[str]
) -> dict[str, float]:
    """Enrol ``enrolled`` from their kept-out clips, name the found speakers as /diarize does
    (each speaker's mean window embedding against the voiceprints, at ``threshold``, each profile
    naming one speaker at most; a name stays only on the turns that match its profile themselves,
    at the verification threshold, the others set apart), and measure: the share of the enrolled
    voices' reference speech that carries their own name, and the seconds of other voices' speech
    that carry any name, both outside DER's collar around each reference boundary; and of those
    seconds, the ones whose name is of an enrolled voice that is not speaking then (outside
    overlapped speech, where the one speaker a turn carries cannot be both voices, a name on
    another voice's speech is a wrong one)."""
    prints = torch.stack(
        [
            F.normalize(torch.stack([r.embedding for r in model.infer_many(conversation.enrol[v])]), dim=-1).mean(0)
            for v in enrolled
        ]
    )
    chosen: list[str | None] = [None] * found.speakers
    if found.speakers:
        scores, _ = model.verification_scores(torch.from_numpy(found.embeddings), prints)
        candidates = [[(v, float(scores[k, j])) for j, v in enumerate(enrolled)] for k in range(found.speakers)]
        chosen = name_speakers(candidates, threshold)
        verify = model.manifest.verification_threshold
        if verify is not None:  # as /diarize does: a name stays only on the turns that match the profile

            def against(voice: str, rows: np.ndarray) -> np.ndarray:
                scores, _ = model.verification_scores(torch.from_numpy(rows), prints[enrolled.index(voice)][None])
                return scores[:, 0].numpy()

            found, chosen = keep_names_on_matching_turns(found, chosen, against, verify)
    step = 0.01
    length = int(conversation.wave.numel() / RATE / step) + 1
    given = np.full(length, "", dtype=object)
    for t in found.turns:
        given[int(t.start / step) : int(t.end / step)] = chosen[t.speaker] or ""
    scored = np.ones(length, dtype=bool)  # DER's collar: COLLAR / 2 each side of a reference boundary is not scored
    for start, end, _ in conversation.reference:
        for edge in (start, end):
            scored[max(0, int((edge - COLLAR / 2) / step)) : int((edge + COLLAR / 2) / step)] = False
    speaking = {v: np.zeros(length, dtype=bool) for v in enrolled}
    for start, end, voice in conversation.reference:
        if voice in speaking:
            speaking[voice][int(start / step) : int(end / step)] = True
    silent = np.ones(length, dtype=bool)  # the name given is of a voice that is not speaking then
    for v, mask in speaking.items():
        silent[(given == v) & mask] = False
    own = total = wrong = wrong_silent = 0.0
    for start, end, voice in conversation.reference:
        a, b = int(start / step), int(end / step)
        span, named_silent = given[a:b][scored[a:b]], silent[a:b][scored[a:b]]
        if voice in enrolled:
            total += len(span)
            own += float(np.sum(span == voice))
        else:
            wrong += float(np.sum(span != ""))
            wrong_silent += float(np.sum((span != "") & named_silent))
    return {"enrolled_s": total * step, "named_right_s": own * step, "others_named_s": wrong * step,
            "others_misnamed_s": wrong_silent * step}  # fmt: skip


def evaluate_diarization(
    model: EmbeddingModel,
    items: list[Item],
    conversations: int = 20,
    seed: int = 0,
    config: DiarizeConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """DER, its parts and speaker-count accuracy on ``conversations`` of each kind of voice in
    ``items`` (synthetic, real), and the naming figures with two speakers of each enrolled."""
    detector = SpeechDetector()
    threshold = model.manifest.identify_threshold or model.manifest.verification_threshold
    report: dict[str, Any] = {"conversations_per_kind": conversations, "collar": COLLAR, "seed": seed}
    for kind in ("synthetic", "real"):
        chosen = [it for it in items if it.real == (kind == "real")]
        if not chosen:
            continue
        convs = make_conversations(voice_pools(chosen, kind, seed=seed), kind, conversations, seed)
        parts = {"total": 0.0, "missed detection": 0.0, "false alarm": 0.0, "confusion": 0.0}
        right_count = 0
        naming = dict.fromkeys(("enrolled_s", "named_right_s", "others_named_s", "others_misnamed_s", "others_s"), 0.0)
        per: list[dict[str, Any]] = []
        for conv in convs:
            found = diarize_wave(model, detector, conv.wave, config)
            s = score(conv.reference, found.turns, found.duration_s)
            for k in parts:
                parts[k] += s[k]
            speakers = len({v for _, _, v in conv.reference})
            got = found.speakers
            right_count += got == speakers
            if threshold is not None:
                enrolled = sorted({v for _, _, v in conv.reference})[:2]
                named = named_speech(model, conv, found, threshold, enrolled)
                for k in named:
                    naming[k] += named[k]
                naming["others_s"] += sum(e - b for b, e, v in conv.reference if v not in enrolled)
            der = (s["missed detection"] + s["false alarm"] + s["confusion"]) / max(s["total"], 1e-9)
            per.append({"name": conv.name, "speakers": speakers, "found": got, "der": der, "8k": conv.narrowband,
                        "seconds": conv.wave.numel() / RATE})  # fmt: skip
            if progress:
                progress(f"{conv.name}: {speakers} speakers, found {got}, DER {der:.3f}")
        total = max(parts["total"], 1e-9)
        report[kind] = {
            "conversations": len(convs),
            "seconds": sum(p["seconds"] for p in per),
            "der": (parts["missed detection"] + parts["false alarm"] + parts["confusion"]) / total,
            "missed": parts["missed detection"] / total,
            "false_alarm": parts["false alarm"] / total,
            "confusion": parts["confusion"] / total,
            "speaker_count_accuracy": right_count / len(convs),
            "der_8k": _der_of([p for p in per if p["8k"]]),
            "naming": None
            if threshold is None
            else {
                "enrolled_speech_named_right": naming["named_right_s"] / max(naming["enrolled_s"], 1e-9),
                "other_speech_named": naming["others_named_s"] / max(naming["others_s"], 1e-9),
                "other_speech_misnamed": naming["others_misnamed_s"] / max(naming["others_s"], 1e-9),
                "threshold": threshold,
            },
            "per_conversation": per,
        }
    return report


def _der_of(rows: list[dict[str, Any]]) -> float | None:
    if not rows:
        return None
    weights = sum(r["seconds"] for r in rows)
    return sum(r["der"] * r["seconds"] for r in rows) / weights


def format_diarization(report: dict[str, Any]) -> str:
    lines = [f"diarization, {report['conversations_per_kind']} conversations a kind, collar {report['collar']} s"]
    for kind in ("synthetic", "real"):
        r = report.get(kind)
        if not r:
            continue
        lines.append(
            f"  {kind:9s} DER {r['der']:.2%} (missed {r['missed']:.2%}, false alarm {r['false_alarm']:.2%}, "
            f"confusion {r['confusion']:.2%}); speaker count right {r['speaker_count_accuracy']:.0%}; "
            f"{r['seconds'] / 60:.1f} min" + ("" if r["der_8k"] is None else f"; 8 kHz ones DER {r['der_8k']:.2%}")
        )
        if r["naming"]:
            n = r["naming"]
            lines.append(
                f"            enrolled speakers' speech named right {n['enrolled_speech_named_right']:.1%}; "
                f"others' speech named {n['other_speech_named']:.2%} "
                f"({n['other_speech_misnamed']:.2%} while the named speaker is silent)"
            )
    return "\n".join(lines)
