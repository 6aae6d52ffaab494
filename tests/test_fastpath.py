"""The fast path (issue 6): precision parity, batching that never changes a result, the worker."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

import model
from app.worker import BatchingWorker
from model.audio import decode
from model.runtime import bf16_native, resolve_backend, resolve_precision
from model.training import corpus
from model.training.evaluate import parity
from tests.conftest import SHIPPED_WEIGHTS, poll, speech, stays, wav_bytes


@pytest.fixture(scope="module")
def test_split_waves(tmp_path_factory) -> list[torch.Tensor]:
    """One clip per voice from the shipped corpus's own test split (its sentences, conditions,
    codecs), made by the generator."""
    out = tmp_path_factory.mktemp("test-split")
    chosen: dict[int, corpus.Clip] = {}
    for clip in corpus.plan(200, seed=0):
        if clip.split == "test" and clip.label not in chosen:
            chosen[clip.label] = clip
    ref = model.load(SHIPPED_WEIGHTS)
    waves = []
    for clip in chosen.values():
        corpus.make_clip(clip, out, seed=0)
        waves.append(ref.prepare(decode(out / clip.path)))
    assert len(waves) == 9
    return waves


@pytest.mark.parametrize(
    ("backend", "precision", "channels_last"),
    [("torch", "fp32", True), ("torch", "bf16", True), ("openvino", "fp32", False), ("openvino", "auto", False)],
)
def test_every_execution_matches_fp32(test_split_waves, openvino_cache, backend, precision, channels_last):
    """Where bf16 is not native it is emulated (about 100x slower), so clips are cut to 2.5 s."""
    reference = model.load(SHIPPED_WEIGHTS)
    fast = model.load(SHIPPED_WEIGHTS).configure(precision, channels_last, backend, openvino_cache)
    assert fast.backend == backend
    result = parity(fast, reference, [w[:40000] for w in test_split_waves])
    assert result["top1_agreement"] >= 0.995, result
    assert result["min_cosine"] >= 0.999, result


def test_auto_precision_is_bf16_only_where_native():
    assert resolve_precision("auto") == ("bf16" if bf16_native() else "fp32")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8")
    assert resolve_backend("auto") == "openvino"  # installed by the project's dependencies
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("tensorrt")


@pytest.mark.parametrize("backend", ["torch", "openvino"])
def test_batching_only_equal_length_windows_never_changes_a_result(openvino_cache, backend):
    m = model.load(SHIPPED_WEIGHTS).configure("fp32", channels_last=True, backend=backend, cache_dir=openvino_cache)
    waves = [speech(0, 0), speech(3, 1), speech(0, 0), speech(5, 2)[:30000], speech(7, 3).repeat(4)]
    alone = [m.infer(w, window_s=6.0) for w in waves]
    together = m.infer_many(waves, window_s=6.0, batch_windows=4)
    for a, t in zip(alone, together, strict=True):
        assert a.windows == t.windows
        assert torch.allclose(a.logits, t.logits, atol=1e-4)
        assert torch.nn.functional.cosine_similarity(a.embedding, t.embedding, dim=0) > 0.99999
    assert together[0].windows == 1 and together[4].windows > 1


def test_worker_takes_what_is_queued_as_one_batch_and_isolates_a_failing_batch():
    gate, started = threading.Event(), threading.Event()
    batches: list[list[int]] = []

    def run(items: list[int]) -> list[int]:
        started.set()
        gate.wait(10)
        batches.append(items)
        if -1 in items:
            raise RuntimeError("bad batch")
        return [i * 10 for i in items]

    worker: BatchingWorker[int, int] = BatchingWorker(run, max_clips=3)
    first = worker.submit(0)  # taken alone; the worker blocks on the gate
    assert started.wait(10)
    rest = [worker.submit(i) for i in (1, 2, 3, 4, -1)]
    gate.set()
    assert first.result(5) == 0
    assert [f.result(5) for f in rest[:3]] == [10, 20, 30]
    with pytest.raises(RuntimeError, match="bad batch"):
        rest[4].result(5)
    assert rest[3].exception(5) is not None  # batched with the failing clip, told so
    assert batches == [[0], [1, 2, 3], [4, -1]]
    after = worker.submit(5)  # the worker survived
    assert after.result(5) == 50
    worker.close(5)


def test_background_jobs_wait_for_every_other_job_and_go_a_few_at_a_time():
    """A diarization's windows (background) never hold up a request that arrives behind them
    for more than one small batch, and all of them are served, also when the worker is closed."""
    batches: list[list[int]] = []
    gate, started = threading.Event(), threading.Event()

    def run(items: list[int]) -> list[int]:
        started.set()
        gate.wait(10)
        batches.append(items)
        return items

    worker: BatchingWorker[int, int] = BatchingWorker(run, max_clips=8, max_background=2)
    background = [worker.submit_background(100 + i) for i in range(7)]
    assert started.wait(10)  # the first two background jobs are running
    light = [worker.submit(i) for i in range(3)]  # requests arriving behind the other five
    gate.set()
    assert [f.result(5) for f in light] == [0, 1, 2]
    assert [f.result(5) for f in background] == list(range(100, 107))
    assert batches[0] == [100, 101] and batches[1] == [0, 1, 2]  # served next, before the rest
    assert all(len(b) <= 2 for b in batches[2:]) and [i for b in batches[2:] for i in b] == list(range(102, 107))
    late = [worker.submit_background(i) for i in range(5)]
    worker.close(5)  # closing finishes the background jobs still queued
    assert [f.result(5) for f in late] == list(range(5))


def test_worker_housekeeping_waits_for_a_quiet_queue_and_still_runs_under_steady_load():
    events: list[str] = []

    def run(items: list[int]) -> list[int]:
        events.append(f"run{len(items)}")
        time.sleep(0.05)
        return items

    worker: BatchingWorker[int, int] = BatchingWorker(
        run, max_clips=1, on_idle=lambda: events.append("idle"), idle_after_s=0.2, idle_every_s=60.0
    )
    stays(lambda: events == [], 0.5)  # nothing done yet: nothing to tidy, however long it waits
    futures = [worker.submit(i) for i in range(4)]  # back to back: no quiet moment between them
    assert [f.result(5) for f in futures] == [0, 1, 2, 3]
    assert "idle" not in events
    poll(lambda: "idle" in events)
    assert events == ["run1"] * 4 + ["idle"]  # once, after the queue stayed empty
    stays(lambda: events.count("idle") == 1, 0.5)  # and not again until there is new work
    worker.close(5)

    events.clear()
    worker = BatchingWorker(run, max_clips=1, on_idle=lambda: events.append("idle"), idle_after_s=5.0, idle_every_s=0.1)
    futures = [worker.submit(i) for i in range(8)]  # 0.4 s or more of continuous work
    assert [f.result(5) for f in futures] == list(range(8))
    # never quiet for 5 s, yet tidied between batches, each time 0.1 s or more after the last
    assert events.count("idle") >= 2 and events.index("idle") < max(i for i, e in enumerate(events) if e == "run1")
    assert "idle, idle" not in ", ".join(events)
    worker.close(5)


def test_worker_housekeeping_asked_for_runs_once_the_queue_is_quiet_and_never_delays_work():
    tidied = threading.Event()
    worker: BatchingWorker[int, int] = BatchingWorker(
        lambda items: [2 * i for i in items], max_clips=4, on_idle=tidied.set, idle_after_s=0.05, idle_every_s=60.0
    )
    worker.housekeeping_soon()  # no work done: housekeeping only because it was asked for
    assert tidied.wait(10)
    tidied.clear()
    worker.housekeeping_soon()
    assert worker.submit(21).result(10) == 42  # a request queued behind the ask is served, not lost
    assert tidied.wait(10)
    worker.close(5)


def test_service_batches_concurrent_requests_and_reports_its_execution(client: httpx.Client):
    info = client.get("/v1/model").json()["execution"]
    assert info["backend"] == "openvino"
    assert info["precision"] == ("bf16" if bf16_native() else "fp32")
    assert info["channels_last"] is False and info["torch_threads"] >= 1  # a PyTorch layout setting

    def count() -> tuple[float, float]:
        text = client.get("/metrics").text
        values = {}
        for line in text.splitlines():
            if line.startswith("voice_embed_inference_batch_clips_"):
                name, value = line.split(" ")
                values[name] = float(value)
        return values["voice_embed_inference_batch_clips_count"], values["voice_embed_inference_batch_clips_sum"]

    batches_before, clips_before = count()
    body = wav_bytes(speech(2, 4)[:48000])
    with ThreadPoolExecutor(8) as pool:
        responses = list(
            pool.map(lambda _: client.post("/embed", content=body, headers={"Content-Type": "audio/wav"}), range(8))
        )
    assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses]
    first = torch.tensor(responses[0].json()["embedding"])
    for r in responses[1:]:
        assert torch.nn.functional.cosine_similarity(first, torch.tensor(r.json()["embedding"]), dim=0) > 0.9999
    batches, clips = count()
    assert clips - clips_before == 8
    assert batches - batches_before < 8  # concurrent clips shared forward passes
    stages = {
        line.split('"')[1]: float(line.split(" ")[1])
        for line in client.get("/metrics").text.splitlines()
        if line.startswith("voice_embed_stage_seconds_count")
    }
    # every stage of a clip is timed ('search' too, once a test has used /identify on this server)
    assert {"decode", "queue", "inference"} <= set(stages) <= {"decode", "queue", "inference", "search"}
    assert stages["decode"] >= 8 and stages["queue"] >= 8 and stages["inference"] >= 1
