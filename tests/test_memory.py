"""The memory budget and the streamed decode: uploads are admitted by the memory they will hold,
and decoding a long clip never holds it at its own rate and channel count."""

from __future__ import annotations

import io
import json
import random
import socket
import struct
import time
import wave as wavelib

import httpx
import numpy as np
import pytest
import torch
import torchaudio.functional as AF

import model
from app.budget import MIB, REQUEST_OVERHEAD
from model.audio import StreamingResampler, decode, decode_mono, to_mono
from tests.conftest import SHIPPED_WEIGHTS, Server, encode, poll, speech
from tests.test_production import metric


@pytest.mark.parametrize("orig,new", [(48000, 16000), (44100, 16000), (8000, 16000), (22050, 16000), (16000, 16000)])
def test_streaming_resampler_gives_the_samples_of_resampling_whole(orig, new):
    rng = random.Random(orig)
    x = torch.from_numpy(np.random.default_rng(orig).normal(0, 0.2, orig * 3 + 123).astype(np.float32))
    r = StreamingResampler(orig, new)
    pieces, at = [], 0
    while at < x.numel():  # pieces of every size, from one sample to a few seconds
        n = rng.choice([1, 7, 441, 1152, 4096, orig // 3, orig * 2])
        pieces.append(r.push(x[at : at + n]))
        at += n
    pieces.append(r.finish())
    streamed = torch.cat(pieces)
    whole = AF.resample(x, orig, new)
    assert streamed.shape == whole.shape
    assert float((streamed - whole).abs().max()) < 1e-5


@pytest.fixture(scope="module")
def shipped() -> model.EmbeddingModel:
    return model.load(SHIPPED_WEIGHTS)


@pytest.mark.parametrize(
    "fmt,rate,channels",
    [("wav-s16", 48000, 2), ("mp3", 44100, 2), ("ogg-opus", 48000, 1), ("flac", 22050, 6), ("wav-s16", 8000, 1)],
)
def test_streamed_decode_gives_the_embedding_of_the_whole_file_decode(shipped, fmt, rate, channels):
    data = encode(torch.cat([speech(1), speech(4)]), fmt, rate=rate, channels=channels)
    whole = to_mono(decode(data, downmix=True), 16000)  # the native-rate array, then resampled
    streamed = decode_mono(io.BytesIO(data), 16000)
    assert streamed.source_rate == rate and streamed.source_channels == channels
    assert streamed.wave.shape == whole.shape
    assert float((streamed.wave - whole).abs().max()) < 1e-5
    a, b = shipped.infer(whole).embedding, shipped.infer(streamed.wave).embedding
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.99999


def test_decoding_reports_what_it_keeps_and_can_be_stopped():
    data = encode(speech(2), "ogg-opus", rate=48000)
    kept: list[int] = []
    out = decode_mono(data, 16000, on_output=kept.append)
    assert sum(kept) == 2 * out.wave.numel() * 4  # the pieces, then the copy that joins them

    class FullError(Exception):
        pass

    def refuse(n: int) -> None:
        raise FullError

    with pytest.raises(FullError):
        decode_mono(data, 16000, on_output=refuse)


def wav_header(rate: int, channels: int, frames: int) -> bytes:
    buf = io.BytesIO()
    with wavelib.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"")
    header = bytearray(buf.getvalue())  # 44 bytes with zero sizes: set them for ``frames``
    data_bytes = frames * channels * 2
    struct.pack_into("<I", header, 4, 36 + data_bytes)
    struct.pack_into("<I", header, 40, data_bytes)
    return bytes(header)


def start_post(port: int, length: int, first: bytes = b"") -> socket.socket:
    """POST /embed with a Content-Length of ``length``, sending only ``first`` of the body."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = (
        f"POST /embed HTTP/1.1\r\nHost: test\r\nContent-Type: audio/wav\r\nContent-Length: {length}\r\n"
        "Connection: close\r\n\r\n"
    )
    sock.sendall(head.encode() + first)
    return sock


def response(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    raw = b""
    while chunk := sock.recv(65536):
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


def test_uploads_that_do_not_fit_the_memory_budget_are_refused_before_their_body_is_read(client):
    baseline_mb = metric(client.get("/metrics").text, "voice_embed_memory_budget_bytes", part="baseline") / MIB
    assert baseline_mb > 0
    env = {"MEMORY_BUDGET_MB": str(int(baseline_mb) + 160), "MAX_DURATION_S": "3600", "MAX_BODY_BYTES": str(1 << 30)}
    env["REQUIRE_SPEECH"] = "false"  # its long upload is a tone, made to size
    srv = Server(env=env)
    try:
        srv.wait_ready()
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            text = c.get("/metrics").text
            budget = metric(text, "voice_embed_memory_budget_bytes", part="budget")
            capacity = budget - metric(text, "voice_embed_memory_budget_bytes", part="baseline")
            assert capacity > 2 * REQUEST_OVERHEAD, capacity / MIB
            # A body reserves the overhead and four bytes per body byte (a 16-bit 16 kHz waveform,
            # twice): this one takes 60 % of what requests may hold, so two do not fit together.
            rate, channels = 96000, 2
            frames = int((0.6 * capacity - REQUEST_OVERHEAD) / 4) // (channels * 2)
            header = wav_header(rate, channels, frames)
            length = len(header) + frames * channels * 2
            t = np.arange(frames) / rate
            tone = (0.3 * np.sin(2 * np.pi * 180 * t * (1 + 0.05 * np.sin(3 * t))) * 32767).astype("<i2")
            pcm = np.repeat(tone, channels).tobytes()

            held = start_post(srv.port, length, header + pcm[: 1 << 16])  # the rest of its body comes later
            poll(lambda: metric(c.get("/metrics").text, "voice_embed_memory_reserved_bytes") >= 0.5 * capacity)

            started = time.perf_counter()
            second = start_post(srv.port, length)  # headers only: its body is never sent
            status, headers, body = response(second)
            assert (status, body["error"]["code"], headers.get("retry-after")) == (503, "over_memory_budget", "1")
            assert time.perf_counter() - started < 5  # answered at once, not after reading or waiting

            never = start_post(srv.port, int(capacity))  # needs more than the budget leaves, even alone
            status, _, body = response(never)
            assert (status, body["error"]["code"]) == (413, "too_large_for_memory")
            assert "MEMORY_BUDGET_MB" in body["error"]["message"]

            held.sendall(pcm[1 << 16 :])  # the admitted upload finishes, undisturbed
            status, _, body = response(held)
            assert status == 200, body
            assert body["dim"] == 256 and body["processing"]["input_sample_rate"] == rate

            # a compressed clip decodes to more than its body suggests: its reservation grows
            small = encode(torch.cat([speech(3)] * 6), "ogg-opus", rate=48000)
            r = c.post("/embed", content=small, headers={"Content-Type": "audio/ogg"})
            assert r.status_code == 200, r.text
            # everything reserved is handed back, and the refusals were counted
            poll(lambda: metric(c.get("/metrics").text, "voice_embed_memory_reserved_bytes") == 0)
            assert metric(c.get("/metrics").text, "voice_embed_memory_rejections_total") == 2
    finally:
        srv.stop()
