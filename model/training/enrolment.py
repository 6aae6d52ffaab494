"""How much speech a speaker profile needs (``python -m model.training.enrolment WEIGHTS DATA``):
the measurement behind the service's ``MIN_ENROL_SPEECH_S``.

Each held-out voice of a split (open-val by default: never the test voices) gives a stream of
clean speech: a synthetic voice says fresh sentences with the corpus's own synthesiser; a real
speaker's recordings are read with their speech regions joined (the corpus's VAD cache). The
stream is cut into 4 s pieces. The last ``probes`` pieces are kept to be identified; from the
others, a profile is enrolled as /speakers makes one (each piece embedded alone, the unit
embeddings summed) from the first 2, 4, 8 ... seconds. Every probe is then identified among the
profiles of the same enrolment length, as /identify does (the weights' scoring and identify
threshold): named right when the best profile is its own and scores at the threshold or above.
The figure is the shortest enrolment whose rate of probes named right is within ``tolerance``
of the longest enrolment's.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from model.audio import resample
from model.runtime import BACKENDS, PRECISIONS, EmbeddingModel, load
from model.training.corpus import degrade, draw_conditions
from model.training.data import scan
from model.training.diarization import voice_pools
from model.training.evaluate import check_record_key, record
from model.training.metrics import eer_of_scores
from model.training.provenance import command_line
from model.training.realspeech import read_spans, read_speakers, speech_regions
from model.weights import WeightsError

log = logging.getLogger(__name__)
RATE = 16000
PIECE_S = 4.0
LENGTHS_S = (2, 4, 8, 12, 16, 24)


def real_streams(data_dir: Path, voices: set[str]) -> dict[str, Tensor]:
    """The joined speech of each real speaker of ``voices``, from the sources the corpus read
    (its ``corpus.json``) and the speech regions it cached."""
    root = (json.loads((data_dir / "corpus.json").read_text()).get("real_speech") or {}).get("root")
    if root is None:
        raise ValueError(f"{data_dir}/corpus.json names no real speech")
    speakers = [s for s in read_speakers(root) if s.name in voices]

    def not_cached(files: list[Path]) -> list[list[tuple[int, int]]]:
        raise ValueError(f"{len(files)} files have no cached speech regions: make the corpus again")

    regions = speech_regions(speakers, data_dir, not_cached)
    return {s.name: torch.cat([read_spans(f, regions[f]) for f in s.files]) for s in speakers}


def pieces_of(stream: Tensor, seconds: float = PIECE_S) -> list[Tensor]:
    n = int(seconds * RATE)
    return [stream[i : i + n] for i in range(0, stream.numel() - n + 1, n)]


def recorded_elsewhere(piece: Tensor, rng: random.Random) -> Tensor:
    """``piece`` as another recording would give it: the corpus's reverberation, noise and band
    limits (drawn as for its clips; no codec, no change of speed), back at 16 kHz."""
    c = {k: v for k, v in draw_conditions(rng).items() if k in ("reverb_rt60", "noise", "snr_db", "band", "gain_db")}
    wave, sr = degrade(piece, RATE, c, torch.Generator().manual_seed(rng.randrange(1 << 31)))
    return resample(wave, sr, RATE) if sr != RATE else wave


@torch.inference_mode()
def measure(
    model: EmbeddingModel,
    streams: dict[str, Tensor],
    probes: int = 4,
    lengths: tuple[int, ...] = LENGTHS_S,
    seed: int = 0,
) -> dict[str, Any]:
    """Identification of ``probes`` pieces per voice, each as another recording gives it
    (:func:`recorded_elsewhere`), against profiles enrolled from each length in ``lengths`` of
    clean speech (voices with speech enough for the longest enrolment and the probes)."""
    need = int(max(lengths) / PIECE_S) + probes
    cut = {v: pieces_of(s) for v, s in streams.items()}
    voices = sorted(v for v, pieces in cut.items() if len(pieces) >= need)
    if len(voices) < 2:
        return {"voices": len(voices), "rows": []}
    threshold = model.manifest.identify_threshold or model.manifest.verification_threshold
    rng = random.Random(seed)
    embedded = {}
    for v in voices:
        pieces = cut[v][:need]
        pieces[-probes:] = [recorded_elsewhere(p, rng) for p in pieces[-probes:]]
        embedded[v] = [model.infer(p).embedding for p in pieces]
    queries = torch.stack([e for v in voices for e in embedded[v][-probes:]])
    truth = torch.tensor([i for i, _ in enumerate(voices) for _ in range(probes)])
    rows = []
    for length in lengths:
        if length < PIECE_S:  # a shorter enrolment: the start of the first piece
            seconds = float(length)
            clips = [model.infer(cut[v][0][: int(length * RATE)]).embedding[None] for v in voices]
        else:
            count = int(length // PIECE_S)
            seconds = count * PIECE_S
            clips = [torch.stack(embedded[v][:count]) for v in voices]
        prints = torch.stack([F.normalize(c, dim=-1).sum(0) for c in clips])
        scores, _ = model.verification_scores(queries, prints)
        best, index = scores.max(dim=1)
        right = (index == truth) & (best >= (threshold if threshold is not None else -1e9))
        same = truth[:, None] == torch.arange(len(voices))[None, :]
        eer, _ = eer_of_scores(scores.flatten(), same.flatten())
        rows.append({
            "enrolled_s": seconds,
            "named_right": float(right.float().mean()),
            "top1": float((index == truth).float().mean()),
            "eer": eer,
        })  # fmt: skip
    return {"voices": len(voices), "probes_per_voice": probes, "threshold": threshold, "rows": rows}


def shortest_enough(rows: list[dict[str, Any]], tolerance: float) -> float | None:
    """The shortest enrolment whose named-right rate is within ``tolerance`` of the longest's."""
    if not rows:
        return None
    goal = rows[-1]["named_right"] - tolerance
    return next(r["enrolled_s"] for r in rows if r["named_right"] >= goal)


def evaluate_enrolment(
    model: EmbeddingModel, data_dir: Path, split: str = "open-val", tolerance: float = 0.01, sentences: int = 24
) -> dict[str, Any]:
    items = scan(data_dir, model.labels).split(split)
    if not items:
        raise ValueError(f"{data_dir}: no clips in split {split!r}")
    report: dict[str, Any] = {"split": split, "piece_s": PIECE_S, "tolerance": tolerance}
    synthetic = [it for it in items if not it.real]
    if synthetic:
        pools = voice_pools(synthetic, "synthetic", per_voice=sentences)
        report["synthetic"] = measure(model, {v: torch.cat(p) for v, p in pools.items()})
    real = {it.voice for it in items if it.real}
    if real:
        report["real"] = measure(model, real_streams(data_dir, real))
    found = [shortest_enough(report[k]["rows"], tolerance) for k in ("synthetic", "real") if k in report]
    known = [f for f in found if f is not None]
    report["min_enrol_speech_s"] = max(known) if known else None
    return report


def format_enrolment(r: dict[str, Any]) -> str:
    lines = [f"enrolment speech on {r['split']} voices (probes of {r['piece_s']:g} s, identified as /identify does)"]
    for kind in ("synthetic", "real"):
        if kind not in r:
            continue
        lines.append(f"  {kind}: {r[kind]['voices']} voices")
        for row in r[kind]["rows"]:
            right, top1, eer = row["named_right"], row["top1"], row["eer"]
            lines.append(
                f"    {row['enrolled_s']:5.1f} s enrolled: named right {right:.3f}, top-1 {top1:.3f}, EER {eer:.4f}"
            )
    lines.append(f"shortest enrolment within {r['tolerance']:.0%} of the longest: {r['min_enrol_speech_s']} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.training.enrolment", description=__doc__.split("\n\n")[0])
    parser.add_argument("weights_dir", type=Path)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--split", default="open-val", choices=["open-val", "open-test"])
    parser.add_argument("--tolerance", type=float, default=0.01, help="named-right rate given up against the longest")
    parser.add_argument("--sentences", type=int, default=24, help="fresh sentences per synthetic voice")
    parser.add_argument("--backend", default="torch", choices=list(BACKENDS))
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--record", metavar="KEY", help="also write the result into WEIGHTS_DIR's manifest at metrics.KEY"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    command = command_line("model.training.enrolment", argv)
    try:
        if args.record:
            check_record_key(args.record)
        model = load(args.weights_dir).configure(args.precision, False, args.backend)
        report = evaluate_enrolment(model, args.data_dir, args.split, args.tolerance, args.sentences)
        if args.record:
            record(args.weights_dir, args.record, report, command)
    except (WeightsError, ValueError, FileNotFoundError) as exc:
        log.error("error: %s", exc)
        return 2
    report["command"] = command
    sys.stdout.write((json.dumps(report, indent=2) if args.json else format_enrolment(report)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
