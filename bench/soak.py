"""``make soak``: memory under many clip lengths.

    .venv/bin/python -m bench.soak [--requests 5000] [--min-s 0.5] [--max-s 4] [--concurrency 4]

Starts the service on the shipped weights, records its RSS once it is ready (after its own
warm-up), then sends ``--requests`` clips whose lengths are drawn at 10 ms resolution (so nearly
every request is a new tensor shape: the case that grows oneDNN's primitive cache and the
allocator), sampling RSS as it goes and once more a second after the last one. Exits 1 if that
final RSS is more than 10 % above the warmed-up RSS or any request failed. The samples under load
are reported too: they include the working set of the clips in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

from bench.clips import ensure
from bench.run import ROOT, Server, rss_mb
from model.audio import decode, wav_pcm16


@dataclass
class SoakResult:
    failures: int = 0
    rss_samples: list[tuple[int, float]] = field(default_factory=list)  # (requests done, RSS MB)


async def soak(server: Server, speech: np.ndarray, sr: int, args: argparse.Namespace) -> SoakResult:
    rng = random.Random(0)
    todo = list(range(args.requests))
    result = SoakResult()
    samples = result.rss_samples
    done = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal done
        while todo:
            todo.pop()
            n = int(round(rng.uniform(args.min_s, args.max_s), 2) * sr)
            start = rng.randrange(0, len(speech) - n)
            r = await http.post(
                server.url + "/embed",
                content=wav_pcm16(speech[start : start + n], sr),
                headers={"Content-Type": "audio/wav"},
            )
            result.failures += r.status_code != 200
            done += 1
            if done % args.sample_every == 0:
                samples.append((done, rss_mb(server.proc.pid)))
                print(f"{done:6d} requests  RSS {samples[-1][1]:.0f} MB  failures {result.failures}", file=sys.stderr)

    async with httpx.AsyncClient(timeout=300.0) as http:
        await asyncio.gather(*(client(http) for _ in range(args.concurrency)))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--min-s", type=float, default=0.5)
    parser.add_argument("--max-s", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--sample-every", type=int, default=250, help="requests between RSS samples")
    parser.add_argument("--json", type=Path, default=ROOT / "runs" / "bench" / "soak.json")
    args = parser.parse_args(argv)
    (ROOT / "runs" / "bench").mkdir(parents=True, exist_ok=True)
    clips = [decode(p) for p in ensure(ROOT / "data" / "bench", "mixed")]
    sr = clips[0].sample_rate
    speech = np.concatenate([c.samples.mean(axis=0) for c in clips]).astype(np.float32)

    server = Server("soak", [sys.executable, "-m", "app"], {"LOG_LEVEL": "WARNING"})
    try:
        server.wait_ready("/readyz")
        warm = rss_mb(server.proc.pid)
        started = time.perf_counter()
        result = asyncio.run(soak(server, speech, sr, args))
        time.sleep(1.0)  # the worker's idle housekeeping runs once the queue has been empty a moment
        final = rss_mb(server.proc.pid)
    finally:
        server.stop()
    growth = final / warm - 1
    peak = max([final] + [rss for _, rss in result.rss_samples])
    peak_growth = peak / warm - 1
    report = {
        **vars(args),
        "json": str(args.json),
        "rss_mb_warm": warm,
        "rss_mb_final": final,
        "growth": growth,
        "rss_mb_peak_sampled": peak,
        "peak_growth": peak_growth,
        "wall_s": time.perf_counter() - started,
        **asdict(result),
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    ok = growth <= 0.10 and result.failures == 0
    print(
        f"RSS warm {warm:.0f} MB -> after {args.requests} requests {final:.0f} MB "
        f"({100 * growth:+.1f} %), highest sample under load {peak:.0f} MB ({100 * peak_growth:+.1f} %), "
        f"failures {result.failures}: {'OK' if ok else 'FAIL'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
