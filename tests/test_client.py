"""The Python client and `python -m client` against a real server: folders of clips in several
formats, a bad file, an interrupted run that resumes, and a 503 that is retried."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

from client import AsyncClient, Client, ServiceError
from model.training.corpus import LABELS
from tests.conftest import ROOT, Server, encode, speech

FORMATS = {"wav": "wav-s16", "flac": "flac", "mp3": "mp3", "ogg": "ogg-opus", "m4a": "m4a-aac"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of 10 clips (two voices each in five formats, one in a sub-folder) and a bad file."""
    root = tmp_path_factory.mktemp("clips")
    (root / "more").mkdir()
    for i, (suffix, fmt) in enumerate(FORMATS.items()):
        for label in (3, 7):
            where = root / "more" if suffix == "flac" else root
            (where / f"voice{label}-{i}.{suffix}").write_bytes(encode(speech(label, i), fmt))
    (root / "broken.wav").write_bytes(b"RIFF not audio " * 40)
    (root / "notes.txt").write_text("not an audio file: left out of a folder walk")
    return root


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "client", *map(str, args)]
    return subprocess.run([*argv, "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_the_client_imports_without_torch() -> None:
    code = "import sys, client, client.cli; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_typed_results_for_every_endpoint(server: Server, folder: Path) -> None:
    clip = folder / "voice3-0.wav"
    with Client(server.url) as c:
        e = c.embed(clip, normalize=True)
        assert e.dim == len(e.vector) == 256 and e.normalized
        assert abs(sum(x * x for x in e.vector) - 1) < 1e-4
        assert e.speech_seconds is not None and 0.5 < e.speech_seconds <= e.duration_s
        k = c.classify(clip, top_k=2)
        assert k.label == LABELS[3] and len(k.top_k) == 2 and set(k.probabilities) == set(LABELS)
        assert k.speech_seconds == e.speech_seconds
        v = c.verify(clip, folder / "voice3-2.mp3")
        assert v.same_speaker and v.score >= v.threshold
        assert v.score_kind in ("cosine", "as-norm") and v.cosine is not None and 0 < v.cosine <= 1
        items = c.embed_batch([clip, folder / "broken.wav"])
        assert items[0].result is not None and items[0].error is None
        assert items[1].result is None and items[1].error is not None and items[1].error.code == "undecodable_audio"
        with pytest.raises(ServiceError) as bad:
            c.classify(folder / "broken.wav")
        assert bad.value.status == 415 and bad.value.code == "undecodable_audio"
        s = c.enrol("client test speaker", [clip, folder / "voice3-2.mp3"], {"team": "tests"})
        assert s.clips == 2 and s.metadata == {"team": "tests"}
        assert s.speech_seconds is not None and s.speech_seconds > 1 and s.enough_speech is not None
        assert any(p.id == s.id for p in c.speakers(page_size=1))
        found = c.identify(folder / "voice3-3.ogg")
        assert found.speaker is not None and found.speaker.id == s.id
        assert c.verify_speaker(s.id, folder / "voice3-4.m4a").same_speaker
        c.delete_speaker(s.id)
        with pytest.raises(ServiceError) as gone:
            c.speaker(s.id)
        assert gone.value.status == 404


def test_the_async_client_keeps_many_requests_in_flight(server: Server, folder: Path) -> None:
    clips = sorted(folder.glob("voice*.wav")) + sorted(folder.glob("voice*.mp3"))

    async def run() -> list[str]:
        async with AsyncClient(server.url) as c:
            return [r.label for r in await asyncio.gather(*(c.classify(p) for p in clips))]

    labels = asyncio.run(run())
    assert labels == [LABELS[int(p.name[5])] for p in clips]


def test_embed_a_folder_to_parquet_one_row_per_file_and_the_bad_one_with_its_error(
    server: Server, folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "embeddings.parquet"
    proc = cli("embed", folder, "--url", server.url, "--out", out, "--concurrency", "3")
    assert proc.returncode == 1, proc.stderr  # one file failed; its row says why
    rows = {Path(r["path"]).name: r for r in pq.read_table(out).to_pylist()}
    assert len(rows) == 11 and "notes.txt" not in rows
    assert "undecodable_audio" in rows["broken.wav"]["error"] and rows["broken.wav"]["embedding"] is None
    with Client(server.url) as c:
        alone = c.embed(folder / "more" / "voice7-1.flac").vector
    assert np.allclose(rows["voice7-1.flac"]["embedding"], alone, atol=1e-5)
    assert all(r["error"] is None and len(r["embedding"]) == 256 for n, r in rows.items() if n != "broken.wav")
    assert not out.with_name(out.name + ".partial.jsonl").exists()


def test_classify_to_jsonl_and_embed_to_npy(server: Server, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "classes.jsonl"
    proc = cli("classify", folder / "voice3-0.wav", folder / "voice7-2.mp3", "--url", server.url, "--out", out)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {Path(r["path"]).name: r["label"] for r in rows} == {"voice3-0.wav": LABELS[3], "voice7-2.mp3": LABELS[7]}

    npy = tmp_path / "embeddings.npy"
    proc = cli("embed", folder, "--url", server.url, "--out", npy)
    table = np.load(npy, allow_pickle=False)
    assert len(table) == 11 and table["embedding"].shape == (11, 256)
    bad = table[[p.endswith("broken.wav") for p in table["path"]]][0]
    assert bad["error"].startswith("undecodable_audio") and np.isnan(bad["embedding"]).all()


def test_an_interrupted_run_resumes_and_skips_what_is_done(server: Server, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run.parquet"
    journal = out.with_name(out.name + ".partial.jsonl")
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "client",
            "embed",
            str(folder),
            "--url",
            server.url,
            "--out",
            str(out),
            "--concurrency",
            "1",
            "--no-progress",
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    try:  # stop it once some rows, not all, are written
        while time.monotonic() < deadline and first.poll() is None:
            if journal.exists() and len(journal.read_text().splitlines()) >= 2:
                break
            time.sleep(0.02)
    finally:
        first.kill()
        first.wait()
    done_before = len(journal.read_text().splitlines())
    assert 2 <= done_before < 11, "the first run was not interrupted part way"
    assert not out.exists()

    proc = cli("embed", folder, "--url", server.url, "--out", out)
    assert f"resuming: {done_before} of 11" in proc.stderr, proc.stderr
    rows = pq.read_table(out).to_pylist()
    assert sorted(r["path"] for r in rows) == sorted({r["path"] for r in rows})
    assert len(rows) == 11


def test_verify_enrol_and_identify_from_the_command_line(server: Server, folder: Path, tmp_path: Path) -> None:
    proc = cli("verify", folder / "voice7-0.wav", folder / "more" / "voice7-1.flac", "--url", server.url)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["same_speaker"] is True
    proc = cli("enrol", "cli speaker", folder / "voice7-0.wav", folder / "voice7-2.mp3", "--url", server.url)
    assert proc.returncode == 0, proc.stderr
    speaker = json.loads(proc.stdout)
    assert speaker["clips"] == 2
    out = tmp_path / "who.jsonl"
    proc = cli("identify", folder / "voice7-3.ogg", "--url", server.url, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["speaker_id"] == speaker["id"]
    with Client(server.url) as c:
        c.delete_speaker(speaker["id"])


class Busy(BaseHTTPRequestHandler):
    """Answers the first two requests 503 + Retry-After, then forwards to the real server."""

    upstream = ""
    seen: list[int] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        self.seen.append(len(body))
        if len(self.seen) <= 2:
            payload = json.dumps({"error": {"code": "overloaded", "message": "busy"}}).encode()
            self.send_response(503)
            self.send_header("retry-after", "0.2")
        else:
            r = httpx.post(
                self.upstream + self.path, content=body, headers={"content-type": self.headers["content-type"]}
            )
            payload, status = r.content, r.status_code
            self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def busy_proxy(server: Server) -> Iterator[str]:
    Busy.upstream, Busy.seen = server.url, []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_a_503_is_retried_after_retry_after(busy_proxy: str, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "retried.jsonl"
    proc = cli("embed", folder / "voice3-0.wav", "--url", busy_proxy, "--out", out)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["error"] is None and len(rows[0]["embedding"]) == 256
    assert len(Busy.seen) == 3 and len(set(Busy.seen)) == 1  # two refusals, then the same body again

    out2 = tmp_path / "gave-up.jsonl"
    Busy.seen = []
    proc = cli("embed", folder / "voice3-0.wav", "--url", busy_proxy, "--out", out2, "--retries", "1")
    row = json.loads(out2.read_text())
    assert proc.returncode == 1 and row["error"].startswith("overloaded: busy (HTTP 503)")
