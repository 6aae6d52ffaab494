"""``make bench`` (second part): what ``/identify`` costs beyond the embedding, at many profiles.

    .venv/bin/python -m bench.identify [--profiles 10000 100000] [--calls 30]

For each store size: an SQLite store is filled with that many random voiceprints made "with" the
served weights (one transaction), the service starts on it, and one 3 s clip is sent alternately
to ``/embed`` and ``/identify`` (``--calls`` each, after warm-up calls). ``/identify`` does the
same decode and forward pass as ``/embed``, then checks the change counter and scores the clip
against every profile (one float32 matrix product, top-k). What the search adds is read from
the server itself (its ``search`` stage in ``/metrics``, the mean over the timed calls), and the
difference of the two endpoints' medians is shown beside it; the server runs with
``TRIM_MEMORY=false``, so that handing memory back between calls (which a sequential client
lets happen before every other call) does not land on one endpoint. The first ``/identify``
after start also loads the profiles into memory: that is reported on its own. Prints a table
and writes ``runs/bench/identify.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

import model
from app.speakers import Model, SpeakerStore, SqliteDatabase, migrate
from bench.clips import ensure
from bench.run import ROOT, Server

NAMESPACE = "default"  # the namespace of a service without API keys


def fill(data_dir: Path, n: int, m: Model, dim: int) -> float:
    """``n`` random profiles in ``data_dir``'s SQLite store; returns the seconds it took."""
    started = time.perf_counter()
    store = SpeakerStore(SqliteDatabase(data_dir / "speakers.sqlite3"))
    migrate(store.db)
    rng = np.random.default_rng(n)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    store.create_many(NAMESPACE, [(f"synthetic-{i}", {}, [v], 3.0) for i, v in enumerate(vectors)], m)
    store.close()
    return time.perf_counter() - started


def timed(client: httpx.Client, path: str, clip: bytes) -> float:
    started = time.perf_counter()
    r = client.post(path, files={"file": ("clip.wav", clip, "audio/wav")})
    elapsed = time.perf_counter() - started
    if r.status_code != 200:
        raise RuntimeError(f"{path}: {r.status_code} {r.text[:200]}")
    return elapsed


def search_stage(client: httpx.Client) -> tuple[float, float]:
    """The server's ``search`` stage so far: (seconds in total, calls)."""
    total = count = 0.0
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('voice_embed_stage_seconds_sum{stage="search"}'):
            total = float(line.split()[-1])
        elif line.startswith('voice_embed_stage_seconds_count{stage="search"}'):
            count = float(line.split()[-1])
    return total, count


def measure(n: int, calls: int, clip: bytes, weights: model.EmbeddingModel) -> dict[str, Any]:
    m = weights.manifest
    with tempfile.TemporaryDirectory(prefix="bench-identify-") as tmp:
        fill_s = fill(Path(tmp), n, Model(m.name, m.version, m.sha256), m.embedding_size)
        server = Server(
            f"identify-{n}",
            [sys.executable, "-m", "app"],
            {"LOG_LEVEL": "WARNING", "DATA_DIR": tmp, "TRIM_MEMORY": "false"},
        )
        try:
            server.wait_ready("/readyz")
            with httpx.Client(base_url=server.url, timeout=120) as c:
                first = timed(c, "/identify", clip)  # loads the profiles
                found = c.post("/identify", files={"file": ("clip.wav", clip, "audio/wav")}).json()
                assert found["searched"] == n, found
                for _ in range(3):
                    timed(c, "/embed", clip)
                embed, identify = [], []
                before = search_stage(c)
                for _ in range(calls):
                    embed.append(timed(c, "/embed", clip))
                    identify.append(timed(c, "/identify", clip))
                after = search_stage(c)
        finally:
            server.stop()
    e, i = statistics.median(embed), statistics.median(identify)
    return {
        "profiles": n,
        "fill_s": round(fill_s, 1),
        "embed_p50_ms": round(1000 * e, 1),
        "identify_p50_ms": round(1000 * i, 1),
        "search_ms": round(1000 * (after[0] - before[0]) / max(after[1] - before[1], 1), 2),
        "p50_difference_ms": round(1000 * (i - e), 1),
        "first_identify_ms": round(1000 * first, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.identify", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profiles", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--json", type=Path, default=ROOT / "runs" / "bench" / "identify.json")
    args = parser.parse_args(argv)
    (ROOT / "runs" / "bench").mkdir(parents=True, exist_ok=True)
    weights = model.load(ROOT / "weights")
    clip = ensure(ROOT / "data" / "bench", "3s")[0].read_bytes()
    capability = torch.backends.cpu.get_cpu_capability()
    rows = [measure(n, args.calls, clip, weights) for n in args.profiles]
    print(f"/identify beyond the embedding, one 3 s clip, CPU capability {capability}")
    print(
        f"{'profiles':>9} {'search (server)':>16} {'embed p50':>10} {'identify p50':>13} {'p50 diff':>9} "
        f"{'first (load)':>13} {'fill':>7}"
    )
    for r in rows:
        print(
            f"{r['profiles']:>9} {r['search_ms']:>13} ms {r['embed_p50_ms']:>8} ms {r['identify_p50_ms']:>10} ms "
            f"{r['p50_difference_ms']:>6} ms {r['first_identify_ms']:>10} ms {r['fill_s']:>5} s"
        )
    args.json.write_text(json.dumps({"cpu_capability": capability, "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
