"""API keys, metrics, backpressure and graceful shutdown, against real server processes."""

from __future__ import annotations

import concurrent.futures
import signal
import time

import httpx

from tests.conftest import EAGER, Server, poll, speech, wav_bytes


def test_api_keys_guard_everything_but_probes_and_metrics():
    srv = Server(env={"API_KEYS": "first-key, second-key", **EAGER})
    try:
        srv.wait_ready()
        data = wav_bytes(speech(0))
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            for path in ("/healthz", "/readyz", "/metrics"):
                assert c.get(path).status_code == 200, path
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "first-key"}):
                r = c.post("/embed", content=data, headers={"Content-Type": "audio/wav", **headers})
                assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
                assert r.headers["www-authenticate"] == "Bearer"
            assert c.get("/v1/model").status_code == 401
            assert c.get("/openapi.json").status_code == 401
            for key in ("first-key", "second-key"):
                auth = {"Authorization": f"Bearer {key}"}
                assert c.get("/v1/model", headers=auth).status_code == 200
                r = c.post("/embed", content=data, headers={"Content-Type": "audio/wav", **auth})
                assert r.status_code == 200, r.text
    finally:
        srv.stop()


def test_without_keys_no_authentication_is_asked(client):
    assert client.get("/v1/model").status_code == 200


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        named = line.startswith(name + "{") or line.startswith(name + " ")
        if named and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_are_present_and_count(client):
    before = client.get("/metrics").text
    data = wav_bytes(speech(1))
    for _ in range(3):
        assert client.post("/embed", files={"file": ("a.wav", data)}).status_code == 200
    assert client.post("/embed", content=b"junk", headers={"Content-Type": "audio/wav"}).status_code == 415
    after = client.get("/metrics").text
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")
    ok = dict(route="/embed", status="200")
    assert metric(after, "voice_embed_requests_total", **ok) - metric(before, "voice_embed_requests_total", **ok) == 3
    bad = dict(route="/embed", status="415")
    assert metric(after, "voice_embed_requests_total", **bad) - metric(before, "voice_embed_requests_total", **bad) == 1
    seconds = metric(after, "voice_embed_audio_seconds_total") - metric(before, "voice_embed_audio_seconds_total")
    assert abs(seconds - 3 * speech(1).numel() / 16000) < 0.05
    assert metric(after, "voice_embed_request_duration_seconds_count", route="/embed") >= 4
    assert "voice_embed_pending_clips" in after and "voice_embed_batch_size_bucket" in after
    assert 'voice_embed_model_info{arch="resnet18"' in after


def test_overload_gets_quick_503s_and_recovers():
    srv = Server(env={"MAX_PENDING": "2", "TORCH_THREADS": "1", **EAGER})
    try:
        srv.wait_ready()
        data = wav_bytes(speech(2).repeat(3))  # several seconds: each takes a while

        def call(_: int) -> tuple[int, float, str | None]:
            started = time.perf_counter()
            with httpx.Client(base_url=srv.url, timeout=120) as c:
                r = c.post("/embed", content=data, headers={"Content-Type": "audio/wav"})
            return r.status_code, time.perf_counter() - started, r.headers.get("retry-after")

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            results = list(pool.map(call, range(12)))
        accepted = [r for r in results if r[0] == 200]
        refused = [r for r in results if r[0] == 503]
        assert len(accepted) + len(refused) == 12
        assert accepted and refused
        assert all(r[2] == "1" for r in refused)
        assert max(r[1] for r in refused) < min(r[1] for r in accepted) + 1.0  # refusals do not queue
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            assert c.get("/readyz").status_code == 200
            assert c.post("/embed", content=data, headers={"Content-Type": "audio/wav"}).status_code == 200
            assert metric(c.get("/metrics").text, "voice_embed_overload_rejections_total") == len(refused)
    finally:
        srv.stop()


def test_sigterm_finishes_in_flight_work_then_exits_zero():
    srv = Server()
    try:
        srv.wait_ready()
        data = wav_bytes(speech(3).repeat(4))
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            futures = [
                pool.submit(
                    lambda: httpx.post(
                        srv.url + "/embed", content=data, headers={"Content-Type": "audio/wav"}, timeout=120
                    )
                )
                for _ in range(3)
            ]
            # SIGTERM once all three are admitted (read and counted), so that each is in flight
            poll(lambda: metric(httpx.get(srv.url + "/metrics").text, "voice_embed_batch_size_count") >= 3)
            srv.proc.send_signal(signal.SIGTERM)
            statuses = [f.result().status_code for f in futures]
        assert statuses == [200, 200, 200]
        assert srv.proc.wait(timeout=60) == 0
        assert "shutting down: not ready" in srv.logs()
    finally:
        srv.stop()
