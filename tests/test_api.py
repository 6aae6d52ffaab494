"""The HTTP service through real HTTP against a real uvicorn process on the shipped weights (issue 4)."""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import numpy as np
import pytest
import torch

import model
from model.training.corpus import LABELS
from model.training.voices import catalogue
from tests.conftest import EAGER, FORMATS, SHIPPED_WEIGHTS, Server, encode, speech, voice_speech, wav_bytes

# Voices none of the 9 classes, held out of training (the open-set test voices of the catalogue)
OPEN_TEST_VOICES = [v.label for v in catalogue() if v.role == "open-test"]

# format -> (sample rate, channels); a spread of odd rates and stereo
FORMAT_CASES = {
    "wav-u8": (11025, 1),
    "wav-s16": (16000, 1),
    "wav-s24": (48000, 2),
    "wav-s32": (22050, 1),
    "wav-f32": (44100, 2),
    "wav-mulaw": (8000, 1),
    "wav-alaw": (8000, 1),
    "flac": (44100, 2),
    "mp3": (44100, 2),
    "ogg-vorbis": (48000, 2),
    "ogg-opus": (48000, 1),
    "webm-opus": (48000, 2),
    "m4a-aac": (44100, 2),
}
assert set(FORMAT_CASES) == set(FORMATS)


def cosine(a: list[float], b: list[float]) -> float:
    x, y = np.asarray(a), np.asarray(b)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def post_file(client: httpx.Client, path: str, data: bytes, name: str = "clip", **params: object) -> httpx.Response:
    return client.post(path, files={"file": (name, data)}, params=params)


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    if code:
        assert body["error"]["code"] == code
    return body["error"]


@pytest.mark.parametrize("fmt", sorted(FORMAT_CASES))
def test_every_format_decodes_and_classifies(client, fmt):
    label = sorted(FORMAT_CASES).index(fmt) % len(LABELS)
    rate, channels = FORMAT_CASES[fmt]
    data = encode(speech(label), fmt, rate=rate, channels=channels)
    r = post_file(client, "/classify", data, name=f"clip.{FORMATS[fmt][1]}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["label"] == LABELS[label], (fmt, body["top_k"])
    assert body["processing"]["input_sample_rate"] == rate
    assert body["processing"]["input_channels"] == channels


def test_stereo_aac_and_mulaw_of_one_voice_get_its_label(client):
    wave = speech(6, index=1)
    for data in (encode(wave, "m4a-aac", 44100, 2), encode(wave, "wav-mulaw", 8000, 1)):
        r = client.post("/classify", content=data, headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 200 and r.json()["label"] == LABELS[6], r.text


def test_embed_contract_and_normalisation(client):
    data = wav_bytes(speech(0))
    raw = post_file(client, "/embed", data).json()
    assert raw["dim"] == 256 and len(raw["embedding"]) == 256 and raw["normalized"] is False
    assert set(raw["model"]) == {"name", "version", "sha256"}
    assert abs(raw["duration_s"] - speech(0).numel() / 16000) < 0.01
    norm = post_file(client, "/embed", data, normalize="true").json()
    assert norm["normalized"] is True
    assert abs(np.linalg.norm(norm["embedding"]) - 1) < 1e-5
    assert cosine(raw["embedding"], norm["embedding"]) > 0.99999
    # the raw body gives the same answer as the multipart upload
    body = client.post("/embed", content=data, headers={"Content-Type": "audio/wav"}).json()
    assert cosine(raw["embedding"], body["embedding"]) > 0.99999


def test_classify_contract(client):
    data = wav_bytes(speech(3))
    body = post_file(client, "/classify", data, top_k=4, include_embedding="true").json()
    assert list(body["probabilities"]) == LABELS
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-4
    assert [t["score"] for t in body["top_k"]] == sorted((t["score"] for t in body["top_k"]), reverse=True)
    assert len(body["top_k"]) == 4 and body["top_k"][0]["label"] == body["label"] == LABELS[body["index"]]
    assert len(body["embedding"]) == 256
    # one forward pass serves both heads: the embedding matches /embed's
    emb = post_file(client, "/embed", data).json()["embedding"]
    assert cosine(emb, body["embedding"]) > 0.99999
    assert "embedding" not in post_file(client, "/classify", data).json()
    assert body["known"] is True and body["known_score"] >= body["known_threshold"]


def test_classify_says_when_the_voice_is_none_of_the_classes(client):
    """A voice outside the 9 still gets the nearest label, and 'known': false says it is none of them."""
    outside, flagged = [], 0
    for label in OPEN_TEST_VOICES[:8]:  # voices never trained on, two fresh sentences each
        for sentence in (0, 1):
            body = post_file(client, "/classify", wav_bytes(voice_speech(label, sentence))).json()
            assert body["label"] in LABELS
            assert body["known"] == (body["known_score"] >= body["known_threshold"])
            flagged += body["known"] is False
            outside.append(body["known_score"])
    # The shipped weights flag 98.4 % of the open-set test clips (README); most of these must be.
    assert flagged >= 0.75 * len(outside), (flagged, outside)
    inside = []
    for label in range(9):  # the 9 voices, saying sentences they never trained on, score higher
        body = post_file(client, "/classify", wav_bytes(speech(label, 1))).json()
        assert body["known"] == (body["known_score"] >= body["known_threshold"])
        inside.append(body["known_score"])
    # (the shipped weights still flag some of the 9 voices' clips: the README gives the rate)
    assert sum(inside) / len(inside) > max(outside)


def test_verify_same_and_different_voices(client):
    a, same_b, diff_b = wav_bytes(speech(2, 0)), wav_bytes(speech(2, 1)), wav_bytes(speech(7, 1))
    same = client.post("/verify", files={"a": ("a.wav", a), "b": ("b.wav", same_b)}).json()
    diff = client.post("/verify", files={"a": ("a.wav", a), "b": ("b.wav", diff_b)}).json()
    info = client.get("/v1/model").json()
    assert same["threshold"] == diff["threshold"] == info["verification_threshold"]
    assert same["score_kind"] == diff["score_kind"] == info["verification_score"]
    assert same["same_speaker"] is True and diff["same_speaker"] is False
    assert same["score"] > diff["score"] and same["cosine"] > diff["cosine"]
    # the score is what the weights' scoring gives the clips' /embed embeddings: the cosine, or
    # under adaptive s-norm each side's cosine against its nearest background voices taken out
    emb = [torch.tensor(post_file(client, "/embed", x).json()["embedding"]) for x in (a, same_b, diff_b)]
    weights = model.load(SHIPPED_WEIGHTS)
    scores, cosines = weights.verification_scores(emb[0].reshape(1, -1), torch.stack(emb[1:]))
    assert [same["score"], diff["score"]] == pytest.approx(scores[0].tolist(), abs=2e-3)
    assert [same["cosine"], diff["cosine"]] == pytest.approx(cosines[0].tolist(), abs=1e-4)
    strict = client.post(
        "/verify", params={"threshold": same["score"] + 0.01}, files={"a": ("a.wav", a), "b": ("b.wav", same_b)}
    ).json()
    assert strict["threshold"] == same["score"] + 0.01 and strict["same_speaker"] is False


def test_verify_errors_name_the_bad_part(client):
    err = assert_error(
        client.post("/verify", files={"a": ("a.wav", b"not audio"), "b": ("b.wav", wav_bytes(speech(1)))}), 415
    )
    assert err["message"].startswith("a: ")
    assert_error(client.post("/verify", files={"a": ("a.wav", wav_bytes(speech(1)))}), 400, "bad_request")
    # a threshold off the scores' scale, before any audio is decoded: beyond any normalised score,
    # and beyond a cosine's [-1, 1] where the weights score by cosine
    bad = {"cosine": 2, "as-norm": 2000}[client.get("/v1/model").json()["verification_score"]]
    assert_error(client.post("/verify", params={"threshold": bad}, files={"a": ("a", b"x"), "b": ("b", b"x")}), 422)


def test_batch_keeps_order_and_isolates_a_bad_file(client):
    files = [
        ("file", ("one.wav", wav_bytes(speech(0)))),
        ("file", ("bad.wav", b"RIFF\x00\x00garbage")),
        ("file", ("three.flac", encode(speech(5), "flac", 44100, 2))),
    ]
    r = client.post("/classify/batch", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["index"] for x in results] == [0, 1, 2]
    assert [x["filename"] for x in results] == ["one.wav", "bad.wav", "three.flac"]
    assert results[0]["result"]["label"] == LABELS[0]
    assert results[1]["error"]["code"] == "undecodable_audio" and results[1].get("result") is None
    assert results[2]["result"]["label"] == LABELS[5]
    emb = client.post("/embed/batch", files=files[:1] + files[2:], params={"normalize": "true"}).json()["results"]
    assert all(abs(np.linalg.norm(x["result"]["embedding"]) - 1) < 1e-5 for x in emb)
    assert_error(
        post_file(client, "/embed", wav_bytes(speech(0))) if False else client.post("/embed", files=files), 400
    )


def test_speech_is_measured_and_a_clip_without_speech_gets_422(client):
    voice = speech(5)
    pause = torch.zeros(2 * 16000)
    alone = post_file(client, "/embed", wav_bytes(voice)).json()
    padded = post_file(client, "/classify", wav_bytes(torch.cat([pause, voice, pause]))).json()
    # the VAD finds the same speech with 4 s of silence around it, and less speech than audio
    assert 0.5 < alone["speech_seconds"] <= alone["duration_s"]
    assert abs(padded["speech_seconds"] - alone["speech_seconds"]) < 0.2
    assert padded["duration_s"] - padded["speech_seconds"] > 3.5
    both = client.post("/verify", files={"a": ("a.wav", wav_bytes(voice)), "b": ("b.wav", wav_bytes(speech(6)))})
    assert both.json()["speech_seconds"]["a"] == alone["speech_seconds"] > 0 < both.json()["speech_seconds"]["b"]

    t = np.arange(3 * 16000) / 16000
    tone = torch.from_numpy((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))
    noise = torch.from_numpy(np.random.default_rng(0).normal(0, 0.1, 3 * 16000).astype(np.float32))
    for path in ("/embed", "/classify"):
        for sound in (tone, noise):
            error = assert_error(post_file(client, path, wav_bytes(sound)), 422, "no_speech")
            assert "no speech" in error["message"]
    # in a batch, the clip without speech gets its own error and the others their results
    files = [("file", ("tone.wav", wav_bytes(tone))), ("file", ("voice.wav", wav_bytes(voice)))]
    results = client.post("/embed/batch", files=files).json()["results"]
    assert results[0]["error"]["code"] == "no_speech" and len(results[1]["result"]["embedding"]) == 256


def test_require_speech_false_embeds_any_sound():
    srv = Server(env={"REQUIRE_SPEECH": "false", **EAGER})
    try:
        srv.wait_ready()
        with httpx.Client(base_url=srv.url, timeout=120) as client:
            t = np.arange(3 * 16000) / 16000
            tone = torch.from_numpy((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))
            r = post_file(client, "/embed", wav_bytes(tone))
            assert r.status_code == 200 and r.json()["speech_seconds"] == 0 and r.json()["dim"] == 256
    finally:
        srv.stop()


def test_short_silent_long_and_oversized_audio(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        assert_error(post_file(client, "/embed", wav_bytes(speech(0)[:4000])), 422, "audio_too_short")
        assert_error(post_file(client, "/embed", wav_bytes(torch.zeros(16000))), 422, "silent_audio")
    # a separate server with small limits, to keep the inputs small
    small = Server(env={"MAX_DURATION_S": "12", "WINDOW_S": "4", "MAX_BODY_BYTES": "2000000", **EAGER})
    try:
        small.wait_ready()
        with httpx.Client(base_url=small.url, timeout=120) as client:
            clip = speech(4)
            long_wave = clip.repeat(int(11 * 16000 / clip.numel()) + 1)[: 11 * 16000]
            ok = post_file(client, "/classify", wav_bytes(long_wave))
            assert ok.status_code == 200, ok.text
            assert ok.json()["processing"]["windows"] == 3 and ok.json()["label"] == LABELS[4]
            too_long = torch.cat([long_wave, long_wave[: 2 * 16000]])
            assert_error(post_file(client, "/embed", encode(too_long, "mp3")), 413, "audio_too_long")
            big = bytes(2_100_000)
            assert_error(client.post("/embed", content=big, headers={"Content-Type": "audio/wav"}), 413)

            def chunks():  # no Content-Length: the limit is enforced while reading
                for _ in range(30):
                    yield bytes(100_000)

            assert_error(client.post("/embed", content=chunks(), headers={"Content-Type": "audio/wav"}), 413)
            assert client.get("/readyz").status_code == 200
    finally:
        small.stop()


def test_bad_requests_get_json_4xx(client):
    assert_error(client.post("/embed", content=b"", headers={"Content-Type": "audio/wav"}), 400)
    assert_error(client.post("/embed", content=b"hello", headers={"Content-Type": "text/plain"}), 415)
    assert_error(client.post("/embed", content=b"\x00" * 500, headers={"Content-Type": "audio/wav"}), 415)
    assert_error(client.post("/embed", files={"other": ("x.wav", b"abc")}), 400)
    assert_error(
        client.post("/embed", content=b"--x\r\nbroken", headers={"Content-Type": "multipart/form-data; boundary=x"}),
        400,
    )
    assert_error(post_file(client, "/embed", wav_bytes(speech(0)), normalize="maybe"), 422, "invalid_parameters")
    assert_error(post_file(client, "/classify", wav_bytes(speech(0)), top_k=0), 422)
    assert_error(client.get("/nowhere"), 404)
    assert_error(client.get("/embed"), 405)


def test_health_ready_model_and_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    for probe in ("/healthz", "/readyz"):  # some load balancers check with HEAD: the status, no body
        r = client.head(probe)
        assert r.status_code == 200 and r.content == b"", probe
    info = client.get("/v1/model").json()
    assert info["labels"] == LABELS and info["embedding_size"] == 256 and info["architecture"] == "resnet18"
    shipped = json.loads((SHIPPED_WEIGHTS / "manifest.json").read_text())
    assert info["features"] == shipped["features"] and info["sha256"] == shipped["sha256"]
    assert info["verification_threshold"] == shipped["verification_threshold"] and -1 <= info["known_threshold"] <= 1
    # /identify's threshold: the weights' own where calibrated, never below /verify's
    assert info["identify_threshold"] == shipped.get("identify_threshold", shipped["verification_threshold"])
    assert info["identify_threshold"] >= info["verification_threshold"]
    # the shipped weights score /verify by adaptive s-norm: a threshold in standard deviations, not a cosine
    assert info["verification_score"] == "as-norm" and shipped["verification_norm"] == {"method": "as-norm", "top": 300}
    assert "open-set validation voices" in info["metrics"]["calibration"]["verification"]["source"]
    spec = client.get("/openapi.json").json()
    known = spec["components"]["schemas"]["ClassifyResponse"]["properties"]["known"]
    assert "none of them" in known["description"]
    for path in (
        "/embed",
        "/classify",
        "/verify",
        "/embed/batch",
        "/classify/batch",
        "/healthz",
        "/readyz",
        "/v1/model",
    ):
        assert path in spec["paths"], path
    content = spec["paths"]["/embed"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "audio/*", "application/octet-stream"} <= set(content)
    assert "EmbedResponse" in spec["components"]["schemas"]
    assert client.get("/docs").status_code == 200


def test_two_files_to_a_single_clip_endpoint_point_to_its_batch_twin_only_where_one_exists(client):
    files = [("file", (f"{i}.wav", wav_bytes(speech(0, i)))) for i in (0, 1)]
    paths = set(client.get("/openapi.json").json()["paths"])  # the endpoints the service has
    assert {"/embed/batch", "/classify/batch"} <= paths
    for path in ("/embed", "/classify", "/spectrogram", "/diarize"):
        r = client.post(path, files=files)
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request", (path, r.text)
        message = r.json()["error"]["message"]
        assert message.startswith("2 files sent to a single-clip endpoint")
        if f"{path}/batch" in paths:
            assert message.endswith(f"use {path}/batch")
            assert client.post(f"{path}/batch", files=files).status_code == 200
        else:
            assert "/batch" not in message and message.endswith("send one file a request"), (path, message)


def test_request_id_is_honoured_and_returned(client):
    r = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert len(client.get("/healthz").headers["x-request-id"]) >= 16


def test_same_clip_same_embedding_under_concurrent_load(client, server):
    clips = [wav_bytes(speech(i)) for i in range(4)]
    alone = [post_file(client, "/embed", c).json()["embedding"] for c in clips]

    def call(i: int) -> tuple[int, list[float]]:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            return i % 4, post_file(c, "/embed", clips[i % 4]).json()["embedding"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(16)))
    for i, emb in results:
        assert cosine(alone[i], emb) >= 0.9999


def test_readyz_is_503_until_the_model_is_loaded(tmp_path):
    """A server whose weights are refused never reports ready and exits with the reason."""
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 1}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    bad = Server(weights=tmp_path)
    try:
        bad.proc.wait(timeout=60)
        assert bad.proc.returncode != 0
        assert "missing fields" in bad.logs()
    finally:
        bad.stop()
