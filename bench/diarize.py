"""``make bench`` (third part): what ``/diarize`` costs, and what it costs everyone else.

    .venv/bin/python -m bench.diarize [--minutes 10] [--calls 30]

A recording of ``--minutes`` is made of four held-out synthetic voices taking turns of 2 to 8 s
(the corpus's own synthesiser, fresh sentences; written once to ``data/bench/``). The service
starts with its defaults and the recording is sent to ``/diarize`` twice (the first call warms
the speech detector and the clustering); the second's wall time over the recording's length is
the real-time factor. Then one 3 s clip is sent to ``/embed`` ``--calls`` times in a row, alone,
and again one after another for as long as a diarization of the recording runs beside it: the two
medians say how much a long diarization slows light requests (its windows go through the worker a few at a time, so
light requests queue between them). Prints a table and writes ``runs/bench/diarize.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import sys
import tempfile
import threading
import time
import wave
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from bench.clips import ensure
from bench.run import ROOT, Server

RATE = 16000


def recording(path: Path, minutes: float, seed: int = 0) -> Path:
    """``minutes`` of four held-out synthetic voices taking turns, as 16-bit WAV (made once)."""
    if path.exists():
        return path
    from model.training.corpus import SENTENCE_POOL, speak, voice_named
    from model.training.sentences import sentences
    from model.training.voices import catalogue

    voices = [v.label for v in catalogue() if v.role == "open-test"][:4]
    text = sentences(40, salt="bench-diarize", exclude=sentences(SENTENCE_POOL))
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        pool = {v: [speak(voice_named(v), t, 1.0, 0, Path(tmp)) for t in rng.sample(text, 8)] for v in voices}
    pieces, total, previous = [], 0, ""
    while total < minutes * 60 * RATE:
        voice = rng.choice([v for v in voices if v != previous])
        turn = torch.cat(rng.sample(pool[voice], 2))[: int(rng.uniform(2, 8) * RATE)]
        gap = torch.zeros(int(rng.uniform(0.2, 0.8) * RATE))
        pieces += [turn, gap]
        total += turn.numel() + gap.numel()
        previous = voice
    audio = torch.cat(pieces)[: int(minutes * 60 * RATE)]
    pcm = (audio / audio.abs().max() * 0.5 * 32767).to(torch.int16).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm.tobytes())
    path.write_bytes(buf.getvalue())
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
    long = recording(ROOT / "data" / "bench" / f"conversation-{args.minutes:g}min.wav", args.minutes).read_bytes()
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
