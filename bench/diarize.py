"""``make bench`` (third part): what ``/diarize`` costs, and what it costs everyone else.

    .venv/bin/python -m bench.diarize [--minutes 10] [--calls 30]

A recording of ``--minutes`` is made of four open-set validation voices taking turns of 2 to 8 s
(the corpus's own synthesiser, fresh sentences; written once to ``data/bench/``). The service
starts with its defaults and the recording is sent to ``/diarize`` twice (the first call warms
the speech detector and the clustering); the second's wall time over the recording's length is
the real-time factor. Then one 3 s clip is sent to ``/embed`` ``--calls`` times in a row, alone,
and again one after another for as long as a diarization of the recording runs beside it: the two
medians say how much a long diarization slows light requests (its windows are background jobs of
the inference worker, taken only when no other clip waits). Prints a table and writes
``runs/bench/diarize.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from bench.clips import ensure
from bench.run import ROOT, Server
from model.training.corpus import encode
from model.training.data import UNLABELLED, Item
from model.training.diarization import voice_pools
from model.training.voices import catalogue

RATE = 16000


def recording(path: Path, minutes: float, seed: int = 0) -> Path:
    """``minutes`` of four validation voices taking turns, as 16-bit WAV (made once). Validation
    voices, not test voices: this is where settings are chosen (DIARIZE_CHUNK_WINDOWS was)."""
    if path.exists():
        return path
    voices = [v.label for v in catalogue() if v.role == "open-val"][:4]
    items = [Item(Path(f"{v}.wav"), UNLABELLED, "open-val", voice=v) for v in voices]
    pool = voice_pools(items, "synthetic", per_voice=8, seed=seed)
    rng = random.Random(seed)
    pieces, total, previous = [], 0, ""
    while total < minutes * 60 * RATE:
        voice = rng.choice([v for v in voices if v != previous])
        turn = torch.cat(rng.sample(pool[voice], 2))[: int(rng.uniform(2, 8) * RATE)]
        gap = torch.zeros(int(rng.uniform(0.2, 0.8) * RATE))
        pieces += [turn, gap]
        total += turn.numel() + gap.numel()
        previous = voice
    audio = torch.cat(pieces)[: int(minutes * 60 * RATE)]
    path.parent.mkdir(parents=True, exist_ok=True)
    encode(audio / audio.abs().max() * 0.5, RATE, "wav", path)
    return path


def embed_latencies(client: httpx.Client, clip: bytes, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        started = time.perf_counter()
        r = client.post("/embed", files={"file": ("clip.wav", clip, "audio/wav")})
        out.append(time.perf_counter() - started)
        if r.status_code != 200:
            raise RuntimeError(f"/embed: {r.status_code} {r.text[:200]}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.diarize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--json", type=Path, default=ROOT / "runs" / "bench" / "diarize.json")
    args = parser.parse_args(argv)
    (ROOT / "runs" / "bench").mkdir(parents=True, exist_ok=True)
    long = recording(ROOT / "data" / "bench" / f"conversation-val-{args.minutes:g}min.wav", args.minutes).read_bytes()
    clip = ensure(ROOT / "data" / "bench", "3s")[0].read_bytes()
    server = Server("diarize", [sys.executable, "-m", "app"], {"LOG_LEVEL": "WARNING"})
    result: dict[str, Any] = {"minutes": args.minutes, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        server.wait_ready("/readyz")
        with httpx.Client(base_url=server.url, timeout=600) as c:
            files = {"file": ("talk.wav", long, "audio/wav")}
            c.post("/diarize", files=files).raise_for_status()  # warm-up
            started = time.perf_counter()
            found = c.post("/diarize", files=files).json()
            seconds = time.perf_counter() - started
            result.update(diarize_s=round(seconds, 2), rtf=round(seconds / (args.minutes * 60), 4),
                          speakers_found=len(found["speakers"]))  # fmt: skip
            embed_latencies(c, clip, 3)
            alone = embed_latencies(c, clip, args.calls)
            done = threading.Event()

            def diarize_beside() -> None:
                with httpx.Client(base_url=server.url, timeout=600) as other:
                    other.post("/diarize", files=files).raise_for_status()
                done.set()

            worker = threading.Thread(target=diarize_beside, daemon=True)
            worker.start()
            busy: list[float] = []
            while not done.is_set():  # light calls for the whole diarization: decode, speech, windows, clusters
                busy += embed_latencies(c, clip, 1)
            worker.join(timeout=600)
    finally:
        server.stop()
    p50_alone, p50_busy = statistics.median(alone), statistics.median(busy)
    result.update(
        embed_p50_ms_alone=round(1000 * p50_alone, 1),
        embed_p50_ms_beside_diarize=round(1000 * p50_busy, 1),
        embed_p50_ratio=round(p50_busy / p50_alone, 2),
        embed_p90_ms_beside_diarize=round(1000 * float(np.percentile(busy, 90)), 1),
        embed_calls_beside_diarize=len(busy),
    )
    print(f"/diarize on a {args.minutes:g}-minute recording, CPU capability {result['cpu_capability']}")
    found_of = f"{result['speakers_found']} speakers found of 4"
    print(f"  {result['diarize_s']} s: real-time factor {result['rtf']} ({found_of})")
    print(
        f"  /embed of a 3 s clip, p50: {result['embed_p50_ms_alone']} ms alone, "
        f"{result['embed_p50_ms_beside_diarize']} ms beside a diarization ({result['embed_p50_ratio']}x)"
    )
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
