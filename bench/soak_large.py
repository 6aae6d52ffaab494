"""``make soak`` (second phase): memory under concurrent maximum-size uploads.

    .venv/bin/python -m bench.soak_large [--uploads 32] [--budget-mb 2000]

Three long clips (made once under ``data/bench/large/``): a 48 kHz stereo 16-bit WAV just under
the 100 MiB body limit (546 s), a 599 s 48 kHz stereo FLAC and a 599 s 48 kHz stereo MP3 at
320 kb/s (the service takes at most 600 s, so these two are as long as a clip may be; a 100 MiB
MP3 would be 44 minutes and is refused as too long). The service starts with
``MEMORY_BUDGET_MB=--budget-mb``; each clip is sent alone once (its reference embedding), then
``--uploads`` raw-body uploads of them go at once; those the budget does not admit are answered
503 + ``Retry-After`` (with ``--retry``, retried after it until every upload has had a 200: the
whole queue of 10-minute clips then takes about half an hour on two cores). Passes when the
process's peak RSS (``VmHWM``, over the whole run) stays within the budget + 10 %, no answer is
a 5xx other than a 503 with ``Retry-After`` given within 1 s, and every 200's embedding is the
reference one (cosine >= 0.99999). Reports the peak, the RSS warm, and the RSS once the load is
over; writes ``runs/bench/soak_large.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.clips import ensure
from bench.run import ROOT, Server, rss_mb
from model.audio import decode

MAX_BODY = 100 * 1024 * 1024
RATE, CHANNELS = 48000, 2


def make_clips(out: Path) -> list[Path]:
    """The three long clips, from the bench's speech looped (with a slow level change, so no two
    windows are the same)."""
    out.mkdir(parents=True, exist_ok=True)
    wav_seconds = (MAX_BODY - 1024 - 44) // (RATE * CHANNELS * 2)
    specs = [
        ("long-48k-stereo.wav", wav_seconds, ["-c:a", "pcm_s16le"]),
        ("long-48k-stereo.flac", 599, ["-c:a", "flac"]),
        ("long-48k-stereo.mp3", 599, ["-c:a", "libmp3lame", "-b:a", "320k"]),
    ]
    paths = []
    speech: np.ndarray | None = None
    sr = 16000
    for name, seconds, codec in specs:
        path = out / name
        paths.append(path)
        if path.exists():
            continue
        if speech is None:
            clips = [decode(p) for p in ensure(ROOT / "data" / "bench", "mixed")]
            speech = np.concatenate([c.samples.mean(axis=0) for c in clips]).astype(np.float32)
            sr = clips[0].sample_rate
        n = seconds * sr
        mono = np.resize(speech, n) * (0.6 + 0.4 * np.sin(np.arange(n) * (2 * np.pi / (sr * 37.0))))
        stereo = np.stack([mono, 0.8 * np.roll(mono, 40)], axis=1).astype(np.float32)
        cmd = ["ffmpeg", "-v", "error", "-y", "-f", "f32le", "-ar", str(sr), "-ac", "2", "-i", "-"]
        cmd += ["-ar", str(RATE), *codec, str(path)]
        subprocess.run(cmd, input=stereo.tobytes(), check=True)
        assert path.stat().st_size <= MAX_BODY, (path, path.stat().st_size)
    return paths


async def read_head(reader: asyncio.StreamReader) -> bytes:
    """The header lines after a status line, up to the empty line that ends them."""
    lines = []
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        lines.append(line)
    return b"".join(lines)


async def upload(url: str, body: bytes, kind: str) -> tuple[int, float, str | None, Any]:
    """POST /embed as curl does with a large body: ``Expect: 100-continue``, and the body only
    after the server's ``100 Continue``. A server that refuses the upload answers at once, before
    the body is sent; the time is until the final answer's status line."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        started = time.perf_counter()
        writer.write(
            f"POST /embed HTTP/1.1\r\nHost: {host}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
            "Expect: 100-continue\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        head = await read_head(reader)
        if status == 100:
            for at in range(0, len(body), 1 << 20):
                writer.write(body[at : at + (1 << 20)])
                await writer.drain()
            status = int((await reader.readline()).split()[1])
            head = await read_head(reader)
        elapsed = time.perf_counter() - started
        headers = {}
        for line in head.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        raw = await reader.readexactly(int(headers.get("content-length", "0")))
    finally:
        writer.close()
    payload = json.loads(raw) if headers.get("content-type", "").startswith("application/json") else raw
    return status, elapsed, headers.get("retry-after"), payload


KINDS = {".wav": "audio/wav", ".flac": "audio/flac", ".mp3": "audio/mpeg"}


async def load(
    url: str, bodies: list[tuple[str, bytes, str]], uploads: int, refs: dict[str, np.ndarray], retry: bool
) -> dict:
    attempts: list[dict[str, Any]] = []

    async def one(k: int) -> None:
        name, body, kind = bodies[k % len(bodies)]
        for _ in range(200):
            status, elapsed, retry_after, payload = await upload(url, body, kind)
            row: dict[str, Any] = {"upload": k, "clip": name, "status": status, "s": round(elapsed, 3)}
            if status == 503:
                row["retry_after"] = retry_after
                row["code"] = payload["error"]["code"] if isinstance(payload, dict) else None
            elif status == 200:
                emb = np.asarray(payload["embedding"])
                ref = refs[name]
                row["cosine"] = float(emb @ ref / np.linalg.norm(emb) / np.linalg.norm(ref))
                row["max_abs_diff"] = float(np.abs(emb - ref).max())
            else:
                row["error"] = payload
            attempts.append(row)
            if status != 503 or not retry:
                return
            await asyncio.sleep(float(retry_after or 1))

    await asyncio.gather(*(one(k) for k in range(uploads)))
    return {"attempts": attempts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uploads", type=int, default=32)
    parser.add_argument("--budget-mb", type=int, default=2000)
    parser.add_argument("--retry", action="store_true", help="retry 503s after Retry-After until all are served")
    parser.add_argument("--json", type=Path, default=ROOT / "runs" / "bench" / "soak_large.json")
    args = parser.parse_args(argv)
    (ROOT / "runs" / "bench").mkdir(parents=True, exist_ok=True)
    paths = make_clips(ROOT / "data" / "bench" / "large")
    bodies = [(p.name, p.read_bytes(), KINDS[p.suffix]) for p in paths]

    env = {"LOG_LEVEL": "WARNING", "MEMORY_BUDGET_MB": str(args.budget_mb)}
    server = Server("soak-large", [sys.executable, "-m", "app"], env)
    rss: list[float] = []
    stop = threading.Event()
    try:
        server.wait_ready("/readyz")
        warm = rss_mb(server.proc.pid)

        def sample() -> None:
            while not stop.wait(0.2):
                rss.append(rss_mb(server.proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        refs: dict[str, np.ndarray] = {}
        with httpx.Client(timeout=1800) as c:
            for name, body, kind in bodies:
                r = c.post(server.url + "/embed", content=body, headers={"Content-Type": kind})
                assert r.status_code == 200, (name, r.status_code, r.text[:300])
                refs[name] = np.asarray(r.json()["embedding"])
        started = time.perf_counter()
        result = asyncio.run(load(server.url, bodies, args.uploads, refs, args.retry))
        wall = time.perf_counter() - started
        time.sleep(2.0)  # the worker's idle housekeeping hands memory back once the queue is empty
        after = rss_mb(server.proc.pid)
        peak = rss_mb(server.proc.pid, "VmHWM")
        stop.set()
        sampler.join()
    finally:
        stop.set()
        server.stop()

    attempts = result["attempts"]
    served = [a for a in attempts if a["status"] == 200]
    refused = [a for a in attempts if a["status"] == 503]
    other = [a for a in attempts if a["status"] not in (200, 503)]
    bad_503 = [a for a in refused if a.get("retry_after") is None or a["s"] > 1.0]
    mismatched = [a for a in served if a["cosine"] < 0.99999]
    ceiling = args.budget_mb * 1.10
    everyone = len(served) == args.uploads if args.retry else len(served) + len(refused) == args.uploads
    ok = peak <= ceiling and not other and not bad_503 and not mismatched and bool(served) and everyone
    report = {
        "uploads": args.uploads,
        "budget_mb": args.budget_mb,
        "clips": {name: len(body) for name, body, _ in bodies},
        "rss_mb_warm": warm,
        "rss_mb_peak": peak,
        "rss_mb_after": after,
        "rss_mb_highest_sample": max(rss, default=float("nan")),
        "served": len(served),
        "refused_503": len(refused),
        "slowest_503_s": max((a["s"] for a in refused), default=None),
        "other_statuses": other,
        "min_cosine": min((a["cosine"] for a in served), default=None),
        "max_abs_diff": max((a["max_abs_diff"] for a in served), default=None),
        "wall_s": round(wall, 1),
        "ok": ok,
        "attempts": attempts,
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{args.uploads} uploads of {', '.join(n for n, _, _ in bodies)} with MEMORY_BUDGET_MB={args.budget_mb}: "
        f"RSS warm {warm:.0f} MB, peak {peak:.0f} MB (ceiling {ceiling:.0f}), after the load {after:.0f} MB; "
        f"{len(served)} answered 200 (min cosine to the clip sent alone {report['min_cosine']}), "
        f"{len(refused)} refusals with 503 (slowest {report['slowest_503_s']} s), {len(other)} other: "
        f"{'OK' if ok else 'FAIL'} ({wall:.0f} s)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
