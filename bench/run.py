"""``make bench``: the service against its ceilings, measured in one run on this machine.

    .venv/bin/python -m bench.run [--duration 20] [--concurrency 8] [--json runs/bench/latest.json]

In one process and one run (the machines are noisy, so only ratios within a run mean much):
  1. hardware ceilings: fp32 and bf16 matrix-product GFLOP/s (torch, all cores), and the CPU's
     multiply-accumulate peaks at its real vector widths (``bench/peaks.c``: fp32 FMA, bf16 and
     int8 dot products where the CPU has them; built with the C compiler where there is one);
  2. model-only ceiling: the same clips through the same front end and network in-process, same
     precision, layout and threads as the service, no HTTP (one clip at a time, and batched the
     way the service's worker batches);
  3. the service (``python -m app`` on the shipped weights) over loopback: light load (one client,
     one request at a time) and saturating load (``--concurrency`` clients), on the 3 s set and
     on the mixed 1-30 s set;
  4. the naive baseline (``bench/naive.py``) served and driven the same way;
  5. every other precision this CPU and these weights run (fp32, bf16 where native, int8 where
     the weights have an int8 model): model-only and served on the 3 s set at saturation.
FLOPs per clip are counted with torch's FlopCounterMode (an int8 multiply or add counts as a
FLOP does). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families
from torch.utils.flop_counter import FlopCounterMode

import model
from app.config import Settings
from bench.clips import SETS, ensure
from model.audio import decode

ROOT = Path(__file__).resolve().parents[1]


# ceilings --------------------------------------------------------------------------------------


def matmul_gflops(dtype: torch.dtype, n: int = 1024, seconds: float = 3.0) -> float:
    """Square matrix products for ``seconds``. (Where bf16 is not native it runs at a few GFLOP/s,
    so ``n`` stays moderate to keep one product short.)"""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        done += 1
    return 2 * n**3 * done / (time.perf_counter() - start) / 1e9


def arithmetic_peaks(threads: int, seconds: float = 1.0) -> list[dict[str, Any]]:
    """Every multiply-accumulate peak this CPU has (``bench/peaks.c``: fp32 FMA at AVX2 and, where
    present, AVX-512 width; bf16 dot products with AVX512-BF16; int8 dot products with AVX-512 VNNI,
    AVX-VNNI or plain AVX2), on ``threads`` cores: what no kernel of that kind can exceed without
    doing fewer multiplications (Winograd). Empty where there is no C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "peaks"
        build = [cc, "-O3", "-fopenmp", str(ROOT / "bench" / "peaks.c"), "-o", str(exe)]
        if subprocess.run(build, capture_output=True).returncode != 0:
            return []
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        out = subprocess.run([str(exe), str(seconds)], capture_output=True, text=True, env=env, check=True)
    rows = [line.split() for line in out.stdout.splitlines() if len(line.split()) == 3]
    return [{"precision": p, "isa": isa, "gops": float(g)} for p, isa, g in rows]


def peak_per_precision(peaks: list[dict[str, Any]]) -> dict[str, float]:
    """The highest peak of each precision (the widest instructions the CPU has for it)."""
    best: dict[str, float] = {}
    for row in peaks:
        best[row["precision"]] = max(best.get(row["precision"], 0.0), row["gops"])
    return best


def precisions_to_run(settings: Settings, manifest: model.Manifest) -> list[str]:
    """The service's own precision first, then every other one this CPU and these weights run:
    fp32 always, bf16 where it is native (emulated bf16 is ~100x slower), int8 where the weights
    have an int8 model."""
    own = model.runtime.resolve_precision(settings.precision)
    others = ["fp32"]
    if model.runtime.bf16_native():
        others.append("bf16")
    if manifest.int8 is not None:
        others.append("int8")
    return [own, *(p for p in others if p != own)]


def flops_per_clip(m: model.EmbeddingModel, samples: int, window_s: float) -> int:
    """FLOPs of one clip (all its windows), counted on the meta device: no compute."""
    windows = m.windows(torch.zeros(samples), window_s)  # (n, S)
    frames = m.features(torch.zeros(1, windows.shape[-1])).shape[-1]
    net = model.build(m.manifest.architecture, m.manifest.num_classes, m.manifest.embedding_size).to("meta").eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.empty(windows.shape[0], 1, m.manifest.features.n_mels, frames, device="meta"))
    return int(counter.get_total_flops())


def model_only(m: model.EmbeddingModel, waves: list[torch.Tensor], s: Settings, seconds: float) -> dict[str, Any]:
    """In-process throughput: one clip per call (latency) and batches of ``batch_clips`` (the
    worker's best case at saturation)."""
    out: dict[str, Any] = {}
    for mode, size in (("single", 1), ("batched", s.batch_clips)):
        m.infer_many(waves[:size], s.window_s, s.batch_windows)  # warm
        times, clips, audio, i = [], 0, 0.0, 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            batch = [waves[(i + k) % len(waves)] for k in range(size)]
            t = time.perf_counter()
            m.infer_many(batch, s.window_s, s.batch_windows)
            times.append(time.perf_counter() - t)
            clips += size
            audio += sum(w.numel() for w in batch) / m.sample_rate
            i += size
        elapsed = time.perf_counter() - start
        out[mode] = {
            "clips_per_s": clips / elapsed,
            "audio_s_per_s": audio / elapsed,
            "ms_per_call_p50": 1000 * statistics.median(times),
            "calls": len(times),
        }
    best = max(out.values(), key=lambda r: r["audio_s_per_s"])
    out["clips_per_s"], out["audio_s_per_s"] = best["clips_per_s"], best["audio_s_per_s"]
    return out


# serving ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A process's resident set now in MB, or its peak so far with ``field="VmHWM"``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """A uvicorn process on loopback, started and stopped like a deployment would."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        self.name, self.port = name, free_port()
        self.log = open(ROOT / "runs" / "bench" / f"{name}.log", "w")  # noqa: SIM115
        env = {**os.environ, "PORT": str(self.port), "HOST": "127.0.0.1", **env}
        self.proc = subprocess.Popen(
            [*cmd, "--port", str(self.port)] if "uvicorn" in cmd else cmd,
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, path: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + path, timeout=1.0).status_code in (200, 405):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def drive(url: str, bodies: list[tuple[str, bytes, float]], clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` concurrent loops of POST /embed (multipart) for ``seconds``; every response
    must be a 200 with a 256-d embedding."""
    latencies: list[float] = []
    audio, failures, counter = 0.0, 0, 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal audio, failures, counter
        while time.perf_counter() < deadline:
            name, data, duration = bodies[counter % len(bodies)]
            counter += 1
            t = time.perf_counter()
            r = await http.post(url + "/embed", files={"file": (name, data, "audio/wav")})
            latencies.append(time.perf_counter() - t)
            if r.status_code != 200 or len(r.json()["embedding"]) != 256:
                failures += 1
            else:
                audio += duration

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600.0, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    elapsed = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [latencies[0]] * 99
    return {
        "clients": clients,
        "requests": len(latencies),
        "failures": failures,
        "clips_per_s": (len(latencies) - failures) / elapsed,
        "audio_s_per_s": audio / elapsed,
        "mean_ms": 1000 * statistics.fmean(latencies),
        "p50_ms": 1000 * statistics.median(latencies),
        "p95_ms": 1000 * q[94],
        "p99_ms": 1000 * q[98],
    }


def stage_seconds(url: str) -> dict[str, float] | None:
    """Total seconds per server stage from the service's ``/metrics`` (None for a server without)."""
    r = httpx.get(url + "/metrics")
    if r.status_code != 200:
        return None
    return {
        sample.labels["stage"]: sample.value
        for family in text_string_to_metric_families(r.text)
        if family.name == "voice_embed_stage_seconds"
        for sample in family.samples
        if sample.name.endswith("_sum")
    }


Sets = dict[str, list[tuple[str, bytes, float]]]  # set name -> (file name, body, seconds)


def serve_and_drive(server: Server, ready_path: str, sets: Sets, args: argparse.Namespace) -> dict[str, Any]:
    server.wait_ready(ready_path)
    out: dict[str, Any] = {"rss_mb_before": rss_mb(server.proc.pid)}
    try:
        before = stage_seconds(server.url)
        out["3s_light"] = light = asyncio.run(drive(server.url, sets["3s"], 1, args.duration / 2))
        after = stage_seconds(server.url)
        if before is not None and after is not None:  # where a light-load request's time goes
            stages = {k: 1000 * (after[k] - before.get(k, 0.0)) / light["requests"] for k in after}
            light["stage_mean_ms"] = {**stages, "outside": light["mean_ms"] - sum(stages.values())}
        for name in SETS:
            out[f"{name}_saturated"] = asyncio.run(drive(server.url, sets[name], args.concurrency, args.duration))
        out["rss_mb_after"] = rss_mb(server.proc.pid)
    finally:
        server.stop()
    return out


def serve_3s(server: Server, sets: Sets, args: argparse.Namespace) -> dict[str, Any]:
    server.wait_ready("/readyz")
    try:
        return asyncio.run(drive(server.url, sets["3s"], args.concurrency, args.duration))
    finally:
        server.stop()


# report ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per measured phase")
    parser.add_argument("--concurrency", type=int, default=8, help="clients at saturating load")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "bench")
    parser.add_argument("--json", type=Path, default=ROOT / "runs" / "bench" / "latest.json")
    parser.add_argument(
        "--results", type=Path, default=ROOT / "bench" / "results", help="where the per-CPU figures for make docs go"
    )
    args = parser.parse_args(argv)
    (ROOT / "runs" / "bench").mkdir(parents=True, exist_ok=True)

    settings = Settings()
    threads = settings.torch_threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    files = {name: ensure(args.data, name) for name in SETS}
    m = model.load(settings.weights_dir).configure(settings.precision, settings.channels_last, settings.backend)
    decoded = {name: [(p, decode(p)) for p in paths] for name, paths in files.items()}  # each file once
    sets = {name: [(p.name, p.read_bytes(), a.duration_s) for p, a in items] for name, items in decoded.items()}
    waves = {name: [m.prepare(a) for _, a in items] for name, items in decoded.items()}

    report: dict[str, Any] = {
        "machine": model.runtime.machine(),  # after set_num_threads: its threads are the bench's
        "service_settings": {
            "backend": m.backend,
            "precision": m.precision,
            "channels_last": m.channels_last,
            "batch_clips": settings.batch_clips,
            "batch_windows": settings.batch_windows,
            "window_s": settings.window_s,
        },
        "duration_s": args.duration,
        "concurrency": args.concurrency,
    }
    print("hardware ceiling ...", file=sys.stderr)
    # a peak run that anything disturbs comes out low, never high: the best of three is the ceiling
    runs = [arithmetic_peaks(threads) for _ in range(3)]
    best: dict[tuple[str, str], float] = {}
    for row in (r for run in runs for r in run):
        best[(row["precision"], row["isa"])] = max(best.get((row["precision"], row["isa"]), 0.0), row["gops"])
    peaks = [{"precision": p, "isa": isa, "gops": g} for (p, isa), g in best.items()]
    report["hardware"] = {
        "fp32_gflops": matmul_gflops(torch.float32),
        "bf16_gflops": matmul_gflops(torch.bfloat16),
        "peaks": peaks,
        "peak_gops": peak_per_precision(peaks),
        "fp32_fma_peak_gflops": peak_per_precision(peaks).get("fp32"),
    }
    report["flops_per_3s_clip"] = flops_per_clip(m, 3 * m.sample_rate, settings.window_s)
    mixed_flops = [flops_per_clip(m, w.numel(), settings.window_s) for w in waves["mixed"]]
    report["flops_per_mixed_audio_s"] = sum(mixed_flops) / sum(w.numel() / m.sample_rate for w in waves["mixed"])

    print("model-only ceiling ...", file=sys.stderr)
    report["model_only"] = {name: model_only(m, waves[name], settings, args.duration) for name in SETS}
    own, *others = precisions_to_run(settings, m.manifest)
    three_s_waves = waves["3s"]
    del m, waves

    print("service ...", file=sys.stderr)
    service = Server("service", [sys.executable, "-m", "app"], {"LOG_LEVEL": "WARNING"})
    report["service"] = serve_and_drive(service, "/readyz", sets, args)
    print("naive baseline ...", file=sys.stderr)
    naive = Server("naive", [sys.executable, "-m", "uvicorn", "bench.naive:app", "--host", "127.0.0.1"], {})
    report["naive"] = serve_and_drive(naive, "/docs", sets, args)
    report["precisions"] = {
        own: {"model_only_3s": report["model_only"]["3s"], "served_3s_saturated": report["service"]["3s_saturated"]}
    }
    for precision in others:
        print(f"{precision}: model-only and service, 3 s set ...", file=sys.stderr)
        mp = model.load(settings.weights_dir).configure(precision, settings.channels_last, settings.backend)
        row = {"model_only_3s": model_only(mp, three_s_waves, settings, args.duration)}
        del mp
        env = {"LOG_LEVEL": "WARNING", "PRECISION": precision}
        server = Server(f"service-{precision}", [sys.executable, "-m", "app"], env)
        row["served_3s_saturated"] = serve_3s(server, sets, args)
        report["precisions"][precision] = row

    svc, mo, nv, hw = report["service"], report["model_only"], report["naive"], report["hardware"]

    def gflops_3s(served: dict[str, Any]) -> float:
        return float(served["3s_saturated"]["clips_per_s"] * report["flops_per_3s_clip"] / 1e9)

    achieved = gflops_3s(svc)
    report["achieved_gflops_3s"] = achieved
    report["ratios"] = {
        "served_over_model_only_3s": svc["3s_saturated"]["clips_per_s"] / mo["3s"]["clips_per_s"],
        "served_over_model_only_mixed": svc["mixed_saturated"]["audio_s_per_s"] / mo["mixed"]["audio_s_per_s"],
        "served_over_naive_3s": svc["3s_saturated"]["clips_per_s"] / nv["3s_saturated"]["clips_per_s"],
        "served_over_naive_mixed": svc["mixed_saturated"]["audio_s_per_s"] / nv["mixed_saturated"]["audio_s_per_s"],
        "achieved_over_bf16_matmul": achieved / hw["bf16_gflops"],
        "achieved_over_fp32_matmul": achieved / hw["fp32_gflops"],
        "light_p50_minus_model_only_ms": svc["3s_light"]["p50_ms"] - mo["3s"]["single"]["ms_per_call_p50"],
    }
    for precision, row in report["precisions"].items():
        served, alone = row["served_3s_saturated"], row["model_only_3s"]
        row["achieved_gops"] = served["clips_per_s"] * report["flops_per_3s_clip"] / 1e9
        row["served_over_model_only_3s"] = served["clips_per_s"] / alone["clips_per_s"]
        row["peak_gops"] = hw["peak_gops"].get(precision)
        if row["peak_gops"]:
            row["achieved_over_peak"] = row["achieved_gops"] / row["peak_gops"]
    if "int8" in report["precisions"] and "fp32" in report["precisions"]:
        p = report["precisions"]
        report["ratios"]["served_int8_over_served_fp32_3s"] = (
            p["int8"]["served_3s_saturated"]["clips_per_s"] / p["fp32"]["served_3s_saturated"]["clips_per_s"]
        )
    peak = hw["fp32_fma_peak_gflops"]
    if peak:
        naive_gflops = gflops_3s(nv)
        # the naive server runs fp32: its ceiling is the fp32 peak (the service's is its own precision's)
        report["ratios"]["naive_over_fp32_fma_peak"] = naive_gflops / peak
        # the most served/naive any direct fp32 convolution can reach here: the naive run's work at FMA peak
        report["ratios"]["served_over_naive_3s_at_fma_peak"] = peak / naive_gflops
    # achieved counts the network's nominal multiply-adds; a kernel doing fewer (Winograd) could
    # pass its precision's peak, and then that peak is no ceiling here: say so rather than print > 1
    report["ceiling_holds"] = all(row.get("achieved_over_peak", 0.0) <= 1.0 for row in report["precisions"].values())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    recorded = record_result(report, args.results)
    print_table(report)
    print(f"\nrecorded for `make docs`: {recorded}")
    print(f"\nJSON: {args.json}")
    return 0


def record_result(report: dict[str, Any], folder: Path) -> Path:
    """The figures `make docs` renders (docs/performance.md), one file per CPU: this run's
    replaces the last run's on the same kind of CPU."""
    machine = report["machine"]
    key = "-".join(str(machine.get(k, "")) for k in ("cpu", "cpu_family", "cpu_model", "cpu_capability"))
    slug = re.sub(r"[^a-z0-9]+", "-", key.lower()).strip("-")
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine,
        "service_settings": report["service_settings"],
        "precisions": {
            precision: {
                "served_clips_per_s": row["served_3s_saturated"]["clips_per_s"],
                "model_only_clips_per_s": row["model_only_3s"]["clips_per_s"],
                "achieved_gops": row["achieved_gops"],
                "peak_gops": row.get("peak_gops"),
                "achieved_over_ceiling": row.get("achieved_over_peak"),
            }
            for precision, row in report["precisions"].items()
        },
        "ratios": report["ratios"],
        "ceiling_holds": report["ceiling_holds"],
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{slug}.json"
    path.write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return path


def print_table(r: dict[str, Any]) -> None:
    mo, svc, nv = r["model_only"], r["service"], r["naive"]
    print(f"\nmachine: {r['machine']}; service: {r['service_settings']}")
    print(
        f"hardware: fp32 matmul {r['hardware']['fp32_gflops']:.0f} GFLOP/s, "
        f"bf16 matmul {r['hardware']['bf16_gflops']:.0f} GFLOP/s, "
        f"fp32 FMA peak {r['hardware'].get('fp32_fma_peak_gflops') or float('nan'):.0f} GFLOP/s; "
        f"ResNet18 3 s clip = {r['flops_per_3s_clip'] / 1e9:.1f} GFLOP"
    )
    print(f"\n{'':28}{'clips/s':>9}{'audio s/s':>11}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'fail':>6}")
    for name in SETS:
        for mode in ("single", "batched"):
            x = mo[name][mode]
            label = f"model-only {name} {mode}"
            print(f"{label:28}{x['clips_per_s']:9.2f}{x['audio_s_per_s']:11.1f}{x['ms_per_call_p50']:9.0f}")
    for who, res in (("service", svc), ("naive", nv)):
        for phase in ("3s_light", "3s_saturated", "mixed_saturated"):
            x = res[phase]
            label = f"{who} {phase} (c={x['clients']})"
            print(
                f"{label:28}{x['clips_per_s']:9.2f}{x['audio_s_per_s']:11.1f}"
                f"{x['p50_ms']:9.0f}{x['p95_ms']:9.0f}{x['p99_ms']:9.0f}{x['failures']:6d}"
            )
        label = f"{who} RSS MB before/after"
        print(f"{label:28}{res['rss_mb_before']:9.0f}{res['rss_mb_after']:11.0f}")
    split = svc["3s_light"].get("stage_mean_ms")
    if split:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in split.items())
        print(f"service light-load mean ms per request: {parts} (outside = HTTP, framework, client)")
    peaks = ", ".join(f"{x['precision']} {x['isa']} {x['gops']:.0f}" for x in r["hardware"]["peaks"])
    print(f"\npeaks (G(FL)OP/s, {r['machine']['cpu_capability']}): {peaks or 'not measured (no C compiler)'}")
    print(f"{'precision, 3 s set':28}{'model-only':>11}{'served':>9}{'served/mo':>10}{'GOP/s':>8}{'/peak':>8}")
    for precision, row in r["precisions"].items():
        alone, served = row["model_only_3s"]["clips_per_s"], row["served_3s_saturated"]["clips_per_s"]
        of_peak = row.get("achieved_over_peak", float("nan"))
        print(
            f"{precision:28}{alone:11.2f}{served:9.2f}"
            f"{row['served_over_model_only_3s']:10.3f}{row['achieved_gops']:8.1f}{of_peak:8.3f}"
        )
    print(f"\nachieved {r['achieved_gflops_3s']:.1f} GFLOP/s (service, 3 s set, saturated)")
    if not r["ceiling_holds"]:
        print(
            "a precision's achieved rate passed its peak: its kernels do fewer multiply-adds than the network's "
            "nominal count (e.g. Winograd convolutions), so no ceiling holds for it on this CPU"
        )
    for k, v in r["ratios"].items():
        print(f"  {k:34} {v:8.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
