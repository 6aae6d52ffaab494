"""nginx (deploy/nginx/voice-embed.conf) in front of three real replicas sharing one PostgreSQL:
a speaker enrolled through the balancer is identified by every replica (issue 14), and a steady
stream of requests while one replica is SIGKILLed and another SIGTERMed loses nothing (issue 5)."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import EAGER, ROOT, Server, free_port, poll, speech, wav_bytes

CLIENTS = 3
STEADY = 12  # answers between one fault and the next


def nginx_config(tmp: Path, ports: list[int], listen: int) -> Path:
    site = (ROOT / "deploy" / "nginx" / "voice-embed.conf").read_text()
    params = re.search(r"^    server app1:8000 ([^;]*);", site, re.MULTILINE)
    assert params, "deploy/nginx/voice-embed.conf: no 'server app1:8000 ...;' line"
    servers = "\n".join(f"    server 127.0.0.1:{p} {params.group(1)};" for p in ports)
    site = re.sub(r"(upstream voice_embed \{\n    zone [^\n]*\n)(?:    server [^\n]*\n)+", rf"\g<1>{servers}\n", site)
    site = site.replace("listen 8080;", f"listen 127.0.0.1:{listen};")
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"""
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
{site}
}}
"""
    )
    return conf


@pytest.fixture()
def nginx_bin() -> str:
    path = shutil.which("nginx") or "/usr/sbin/nginx"
    assert Path(path).exists(), "nginx is installed by make system-deps"
    return path


def served_embeds(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    m = re.search(r'voice_embed_requests_total\{method="POST",route="/embed",status="200"\} ([0-9.e+]+)', text)
    return float(m.group(1)) if m else 0.0


def enrol_through_balancer_and_identify_on_every_replica(url: str, replicas: list[Server]) -> None:
    files = [("file", (f"{i}.wav", wav_bytes(speech(6, i)), "audio/wav")) for i in range(3)]
    with httpx.Client(base_url=url, timeout=60) as c:
        made = c.post("/speakers", data={"name": "through nginx"}, files=files)
        assert made.status_code == 201, made.text
    probe = wav_bytes(speech(6, 4))
    for r in replicas:  # each replica, asked directly, finds the voice on its next request
        found = httpx.post(r.url + "/identify", files={"file": ("probe.wav", probe)}, timeout=60).json()
        assert found["speaker"] is not None and found["speaker"]["id"] == made.json()["id"], (r.port, found)


def test_replica_killed_and_terminated_under_load_loses_no_request(tmp_path, nginx_bin, postgres):
    # four replicas start here, three at once: what is under test is the balancer and their lifecycle
    env = {**EAGER, "TORCH_THREADS": "1", "DATABASE_URL": postgres}
    replicas = [Server(env=env) for _ in range(3)]
    proxy_port = free_port()
    conf = nginx_config(tmp_path, [r.port for r in replicas], proxy_port)
    nginx = None
    restarted: Server | None = None
    try:
        for r in replicas:
            r.wait_ready(timeout=180)  # three start at once on two cores
        nginx = subprocess.Popen([nginx_bin, "-c", str(conf), "-g", "daemon off;"], stderr=subprocess.PIPE)
        url = f"http://127.0.0.1:{proxy_port}"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        enrol_through_balancer_and_identify_on_every_replica(url, replicas)
        clip = wav_bytes(speech(5)[:16000])
        reference = np.asarray(
            httpx.post(url + "/embed", content=clip, headers={"Content-Type": "audio/wav"}, timeout=60).json()[
                "embedding"
            ]
        )

        outcomes: list[tuple[int, float]] = []
        lock = threading.Lock()
        stop = threading.Event()

        def client() -> None:
            with httpx.Client(base_url=url, timeout=60) as c:
                while not stop.is_set():
                    try:
                        r = c.post("/embed", content=clip, headers={"Content-Type": "audio/wav"})
                        emb = np.asarray(r.json()["embedding"]) if r.status_code == 200 else None
                        cos = (
                            float(emb @ reference / np.linalg.norm(emb) / np.linalg.norm(reference))
                            if emb is not None
                            else 0.0
                        )
                        result = (r.status_code, cos)
                    except (httpx.HTTPError, ValueError, KeyError):
                        result = (0, 0.0)
                    with lock:
                        outcomes.append(result)

        threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
        for t in threads:
            t.start()

        def answered_more(n: int) -> None:  # paced by answers, not by the clock, on any machine
            target = len(outcomes) + n
            poll(lambda: len(outcomes) >= target, timeout=120)

        answered_more(STEADY)
        replicas[0].proc.send_signal(signal.SIGKILL)
        answered_more(STEADY)
        replicas[1].proc.send_signal(signal.SIGTERM)
        answered_more(STEADY // 2)
        # bring the killed replica back on its port; nginx takes it back after fail_timeout
        restarted = Server(env=env, port=replicas[0].port)
        restarted.wait_ready(timeout=180)
        answered_more(STEADY // 2)
        stop.set()
        for t in threads:
            t.join()

        failures = [o for o in outcomes if o[0] != 200 or o[1] < 0.9999]
        assert not failures, f"{len(failures)} of {len(outcomes)} failed: {failures[:5]}"
        assert replicas[1].proc.wait(timeout=60) == 0  # the SIGTERMed replica drained and exited cleanly
        # The restarted replica takes traffic again. nginx marks a replica unavailable for
        # fail_timeout after a failed attempt (it refused connections until its model was loaded),
        # then tries it with a live request: keep sending, with a bound, until it has served one.
        before = served_embeds(restarted.url)
        deadline = time.monotonic() + 60
        sent = 0
        with httpx.Client(base_url=url, timeout=60) as c:
            while served_embeds(restarted.url) == before:
                assert time.monotonic() < deadline, f"nginx did not take the restarted replica back ({sent} requests)"
                assert c.post("/embed", content=clip, headers={"Content-Type": "audio/wav"}).status_code == 200
                sent += 1
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait(timeout=10)
        for r in [*replicas, *([restarted] if restarted else [])]:
            r.stop()
