"""Enrolled speakers (issue 14): the API through real HTTP on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

import model
from app.speakers import MIGRATIONS, TYPES, SpeakerStore, SqliteDatabase, migrate
from app.speakers import Model as StoreModel
from model.convert import convert
from model.weights import write_manifest
from tests.conftest import SHIPPED_WEIGHTS, Server, free_port, speech, wav_bytes

KEYS = {"a": "key-alice-team", "b": "key-bob-team"}


def auth(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}"}


def clip(label: int, index: int) -> tuple[str, bytes, str]:
    return (f"clip-{label}-{index}.wav", wav_bytes(speech(label, index)), "audio/wav")


def enrol(
    client: httpx.Client, name: str, clips: list[tuple[int, int]], who: str = "a", **fields: str
) -> httpx.Response:
    files = [("file", clip(label, index)) for label, index in clips]
    return client.post("/speakers", data={"name": name, **fields}, files=files, headers=auth(who))


def start(env: dict[str, str], weights: Path = SHIPPED_WEIGHTS) -> Server:
    env = {"BACKEND": "torch", "API_KEYS": ",".join(KEYS.values()), **env}
    server = Server(env=env, weights=weights)
    server.wait_ready(timeout=180)
    return server


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("speakers-data")


@pytest.fixture(scope="module")
def sqlite_server(data_dir) -> Iterator[Server]:
    server = start({"DATA_DIR": str(data_dir)})
    yield server
    server.stop()


@pytest.fixture()
def client(sqlite_server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sqlite_server.url, timeout=120) as c:
        yield c


def test_enrol_add_read_patch_delete(client):
    r = enrol(client, "Alice", [(2, 0), (2, 1)], metadata='{"team": "blue", "n": 1}')
    assert r.status_code == 201, r.text
    alice = r.json()
    assert set(alice) == {
        "id", "name", "metadata", "clips", "seconds", "speech_seconds", "enough_speech", "created_at", "updated_at",
        "model", "stale",
    }  # fmt: skip
    # the speech in the clips, and whether it is enough for a reliable voiceprint
    limit = client.get("/v1/model", headers=auth("a")).json()["limits"]["min_enrol_speech_s"]
    assert 1 < alice["speech_seconds"] <= alice["seconds"] and alice["enough_speech"] == (
        alice["speech_seconds"] >= limit
    )
    half = ("half.wav", wav_bytes(speech(2, 0)[: int(16000 * limit / 2)]), "audio/wav")
    brief = client.post("/speakers", data={"name": "Brief"}, files=[("file", half)], headers=auth("a")).json()
    assert brief["speech_seconds"] < limit and brief["enough_speech"] is False
    client.delete(f"/speakers/{brief['id']}", headers=auth("a"))
    assert alice["name"] == "Alice" and alice["metadata"] == {"team": "blue", "n": 1} and alice["clips"] == 2
    assert alice["seconds"] > 1 and alice["stale"] is False and len(alice["model"]["sha256"]) == 64
    assert client.get(f"/speakers/{alice['id']}", headers=auth("a")).json() == alice
    with_emb = client.get(f"/speakers/{alice['id']}", params={"include_embedding": "true"}, headers=auth("a")).json()
    assert len(with_emb["embedding"]) == 256 and abs(sum(x * x for x in with_emb["embedding"]) - 1) < 1e-4

    r = client.post(f"/speakers/{alice['id']}/clips", files=[("file", clip(2, 2))], headers=auth("a"))
    assert r.status_code == 200 and r.json()["clips"] == 3 and r.json()["seconds"] > alice["seconds"]
    assert r.json()["speech_seconds"] > alice["speech_seconds"]
    assert r.json()["updated_at"] > alice["updated_at"]

    r = client.patch(
        f"/speakers/{alice['id']}", json={"name": "Alice B.", "metadata": {"team": "red"}}, headers=auth("a")
    )
    assert r.status_code == 200 and r.json()["name"] == "Alice B." and r.json()["metadata"] == {"team": "red"}
    assert r.json()["clips"] == 3
    assert client.patch(f"/speakers/{alice['id']}", json={"name": ""}, headers=auth("a")).status_code == 422
    assert client.patch(f"/speakers/{alice['id']}", json={"colour": "x"}, headers=auth("a")).status_code == 422

    assert client.delete(f"/speakers/{alice['id']}", headers=auth("a")).status_code == 204
    for method, path in [("GET", ""), ("DELETE", ""), ("PATCH", ""), ("POST", "/clips"), ("POST", "/verify")]:
        kwargs = {"json": {"name": "x"}} if method == "PATCH" else {}
        if method == "POST":
            kwargs = {"files": [("file", clip(2, 3))]}
        r = client.request(method, f"/speakers/{alice['id']}{path}", headers=auth("a"), **kwargs)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (method, path, r.text)
    assert alice["id"] not in {s["id"] for s in client.get("/speakers", headers=auth("a")).json()["speakers"]}


def test_list_paginates_oldest_first(client):
    ids = [enrol(client, f"page-{i}", [(i, 0)], who="b").json()["id"] for i in range(5)]
    seen, cursor = [], None
    for _ in range(10):
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/speakers", params=params, headers=auth("b")).json()
        assert len(page["speakers"]) <= 2
        seen += [s["id"] for s in page["speakers"]]
        cursor = page.get("next_cursor")
        if cursor is None:
            break
    assert [i for i in seen if i in ids] == ids
    assert client.get("/speakers", params={"cursor": "not-a-cursor"}, headers=auth("b")).status_code == 422
    for i in ids:
        client.delete(f"/speakers/{i}", headers=auth("b"))


def test_verify_and_identify(client):
    enrolled = {
        label: enrol(client, f"voice-{label}", [(label, 0), (label, 1), (label, 2)]).json() for label in (0, 4, 6)
    }
    for label, profile in enrolled.items():
        r = client.post(f"/speakers/{profile['id']}/verify", files=[("file", clip(label, 5))], headers=auth("a"))
        body = r.json()
        assert r.status_code == 200 and body["speaker"] == {"id": profile["id"], "name": profile["name"]}
        assert body["same_speaker"] is True and body["score"] >= body["threshold"]
        assert body["score_kind"] in ("cosine", "as-norm") and body["cosine"] > 0.5
        other = 4 if label != 4 else 0
        r = client.post(f"/speakers/{profile['id']}/verify", files=[("file", clip(other, 5))], headers=auth("a"))
        assert r.json()["same_speaker"] is False
        found = client.post("/identify", files=[("file", clip(label, 6))], headers=auth("a")).json()
        assert found["speaker"]["id"] == profile["id"] and found["matches"][0]["id"] == profile["id"]
        assert [m["score"] for m in found["matches"]] == sorted((m["score"] for m in found["matches"]), reverse=True)
        again = client.post(f"/speakers/{profile['id']}/verify", files=[("file", clip(label, 6))], headers=auth("a"))
        # /identify ranks by the score /speakers/{id}/verify gives, with its statistics cached
        assert again.json()["score"] == pytest.approx(found["matches"][0]["score"], abs=1e-3)
        assert again.json()["cosine"] == pytest.approx(found["matches"][0]["cosine"], abs=1e-5)
    # after writes (a profile's voiceprint changed, another enrolled), /identify scores every
    # profile as /speakers/{id}/verify does, the changed one with its new voiceprint
    changed = enrolled[0]["id"]
    assert client.post(f"/speakers/{changed}/clips", files=[("file", clip(4, 3))], headers=auth("a")).status_code == 200
    extra = enrol(client, "voice-3", [(3, 0), (3, 1)]).json()
    found = client.post("/identify", files=[("file", clip(0, 7))], params={"top_k": 4}, headers=auth("a")).json()
    assert found["searched"] == 4 and found["speaker"]["id"] == changed
    for match in found["matches"]:
        alone = client.post(f"/speakers/{match['id']}/verify", files=[("file", clip(0, 7))], headers=auth("a")).json()
        assert alone["score"] == pytest.approx(match["score"], abs=1e-3)
    client.delete(f"/speakers/{extra['id']}", headers=auth("a"))
    never = client.post("/identify", files=[("file", clip(7, 6))], params={"top_k": 2}, headers=auth("a")).json()
    assert never["speaker"] is None and len(never["matches"]) == 2  # a voice nobody enrolled
    assert never["matches"][0]["score"] < never["threshold"] and never["skipped_stale"] == 0
    info = client.get("/v1/model", headers=auth("a")).json()
    assert never["threshold"] == info["identify_threshold"]  # its own, not /verify's
    for profile in enrolled.values():
        client.delete(f"/speakers/{profile['id']}", headers=auth("a"))


def test_each_key_sees_only_its_own_speakers(client):
    mine = enrol(client, "mine", [(3, 0)], who="a").json()
    assert client.get(f"/speakers/{mine['id']}", headers=auth("b")).status_code == 404
    assert client.delete(f"/speakers/{mine['id']}", headers=auth("b")).status_code == 404
    assert client.patch(f"/speakers/{mine['id']}", json={"name": "x"}, headers=auth("b")).status_code == 404
    assert mine["id"] not in {s["id"] for s in client.get("/speakers", headers=auth("b")).json()["speakers"]}
    theirs = client.post("/identify", files=[("file", clip(3, 4))], headers=auth("b")).json()
    assert mine["id"] not in {m["id"] for m in theirs["matches"]}
    assert client.get(f"/speakers/{mine['id']}", headers=auth("a")).status_code == 200
    assert client.get("/speakers").status_code == 401  # no key, no speakers
    client.delete(f"/speakers/{mine['id']}", headers=auth("a"))


def refuses_text_a_database_cannot_keep(c: httpx.Client, who: str) -> None:
    """Names with control characters, and metadata with a NUL character or a lone surrogate, nested
    too deep or over 16 KiB, are bad input (422) in an enrolment and in a rename (which took 60 MB),
    never a store error or a 500: PostgreSQL keeps no NUL in text or jsonb, neither database can
    encode a lone surrogate, and metadata nested hundreds deep was stored and then broke every
    answer that showed it."""
    before = c.get("/speakers", headers=auth(who)).json()["speakers"]
    for name in ("a\x00b", "two\nlines", "bell\x07"):
        r = enrol(c, name, [(2, 0)], who=who)
        assert r.status_code == 422 and "name" in r.json()["error"]["message"], (name, r.text)
    deep, too_deep = ("[" * n + "]" * n for n in (31, 40))  # in the object: 32 and 41 deep
    assert enrol(c, "deep", [(2, 0)], who=who, metadata=f'{{"k": {deep}}}').status_code == 201
    assert enrol(c, "big", [(2, 0)], who=who, metadata=json.dumps({"k": "v" * 16_000})).status_code == 201
    for meta in ('{"k": "a\\u0000b"}', '{"a\\u0000": 1}', '{"k": ["\\ud800"]}', f'{{"k": {too_deep}}}',
                 json.dumps({"k": "v" * 16 * 1024}),
                 '{"k": ' + "[" * 100_000 + "]" * 100_000 + "}"):  # fmt: skip
        r = enrol(c, "ok", [(2, 0)], who=who, metadata=meta)
        assert r.status_code == 422 and "metadata" in r.json()["error"]["message"], (meta, r.text)
    listed = c.get("/speakers", headers=auth(who)).json()["speakers"]
    new = [p for p in listed if p["id"] not in {q["id"] for q in before}]
    assert [p["name"] for p in new] == ["deep", "big"]
    assert all(c.delete(f"/speakers/{p['id']}", headers=auth(who)).status_code == 204 for p in new)
    made = enrol(c, "kept", [(2, 0)], who=who).json()
    bodies = [{"name": "a\x00b"}, {"name": "\ud800"}, {"metadata": {"k": "a\x00b"}}, {"metadata": {"\ud800": 1}}]
    bodies.append({"metadata": {"k": "v" * 16 * 1024}})  # over 16 KiB as JSON, as an enrolment's would be
    for body in [*bodies, {"metadata": {"k": json.loads(too_deep)}}]:
        r = c.patch(
            f"/speakers/{made['id']}",
            content=json.dumps(body),
            headers={**auth(who), "content-type": "application/json"},
        )
        assert r.status_code == 422, (body, r.text)
    got = c.get(f"/speakers/{made['id']}", headers=auth(who)).json()
    assert (got["name"], got["metadata"]) == ("kept", {})
    assert c.delete(f"/speakers/{made['id']}", headers=auth(who)).status_code == 204


def test_bad_enrolments_store_nothing(client):
    refuses_text_a_database_cannot_keep(client, "a")
    before = client.get("/speakers", headers=auth("a")).json()["speakers"]
    r = enrol(client, "", [(1, 0)])
    assert r.status_code == 422 and "name" in r.json()["error"]["message"]
    assert enrol(client, "x" * 201, [(1, 0)]).status_code == 422
    assert enrol(client, "no files", []).status_code == 422
    for bad in ("{not json", "[1, 2]", '"text"'):
        r = enrol(client, "bad metadata", [(1, 0)], metadata=bad)
        assert r.status_code == 422 and "metadata" in r.json()["error"]["message"], bad
    # the second of three clips cannot be decoded: the whole enrolment fails, naming it
    files = [
        ("file", clip(1, 0)),
        ("file", ("notes.txt", b"not audio at all" * 100, "audio/wav")),
        ("file", clip(1, 1)),
    ]
    r = client.post("/speakers", data={"name": "half"}, files=files, headers=auth("a"))
    assert r.status_code == 415 and "file 1" in r.json()["error"]["message"]
    silent = ("silent.wav", wav_bytes(torch.zeros(16000)), "audio/wav")
    r = client.post(
        "/speakers", data={"name": "half"}, files=[("file", clip(1, 0)), ("file", silent)], headers=auth("a")
    )
    assert r.status_code == 422 and "file 1" in r.json()["error"]["message"]
    assert client.get("/speakers", headers=auth("a")).json()["speakers"] == before
    assert client.get("/speakers/nope", headers=auth("a")).status_code == 404


def test_profiles_survive_a_restart_and_other_weights_mark_them_stale(sqlite_server, data_dir, tmp_path):
    with httpx.Client(base_url=sqlite_server.url, timeout=120) as c:
        kept = enrol(c, "kept", [(5, 0), (5, 1)]).json()
    sqlite_server.stop()
    again = start({"DATA_DIR": str(data_dir)})
    try:
        with httpx.Client(base_url=again.url, timeout=120) as c:
            assert c.get(f"/speakers/{kept['id']}", headers=auth("a")).json() == kept
            assert (
                c.post("/identify", files=[("file", clip(5, 3))], headers=auth("a")).json()["speaker"]["id"]
                == kept["id"]
            )
    finally:
        again.stop()
    torch.manual_seed(0)  # other weights: a freshly initialised network, converted
    torch.save(model.ResNet18().state_dict(), tmp_path / "other.pt")
    convert(tmp_path / "other.pt", tmp_path / "other", "resnet18")
    manifest = model.load(tmp_path / "other").manifest
    manifest.verification_threshold = 0.5  # a converted checkpoint has none; /identify needs one
    write_manifest(tmp_path / "other", manifest)
    other = start({"DATA_DIR": str(data_dir)}, weights=tmp_path / "other")
    try:
        with httpx.Client(base_url=other.url, timeout=120) as c:
            listed = {s["id"]: s for s in c.get("/speakers", headers=auth("a")).json()["speakers"]}
            assert listed[kept["id"]]["stale"] is True
            found = c.post("/identify", files=[("file", clip(5, 3))], headers=auth("a")).json()
            assert found["matches"] == [] and found["speaker"] is None and found["skipped_stale"] >= 1
            r = c.post(f"/speakers/{kept['id']}/verify", files=[("file", clip(5, 3))], headers=auth("a"))
            assert r.status_code == 409 and r.json()["error"]["code"] == "stale_profile"
            r = c.post(f"/speakers/{kept['id']}/clips", files=[("file", clip(5, 3))], headers=auth("a"))
            assert r.status_code == 409
    finally:
        other.stop()


def test_a_store_made_before_speech_was_measured_migrates_and_says_it_does_not_know(tmp_path):
    db = SqliteDatabase(tmp_path / "speakers.sqlite3")
    with db.transaction() as cur:  # the schema as version 1 left it, with one profile
        cur.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        cur.execute("INSERT INTO schema_version (version) VALUES (1)")
        for statement in MIGRATIONS[0]:
            cur.execute(statement.format(**TYPES["sqlite"]))
        cur.execute(
            "INSERT INTO speakers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ("old", "ns", "Old", "{}", np.ones(4, np.float32).tobytes(), 1, 3.0, "m", "1", "abc", "t0", "t0"),
        )
    assert migrate(db) == len(MIGRATIONS) == 2
    store = SpeakerStore(db)
    old = store.get("ns", "old")
    assert old is not None and old.speech_seconds is None and old.clips == 1
    weights = StoreModel("m", "1", "abc")
    # clips added to it leave its speech unknown; a new profile's speech adds up
    assert store.add_clips("ns", "old", [np.ones(4, np.float32)], 2.0, weights, 1.5).speech_seconds is None
    new = store.create("ns", "New", {}, [np.ones(4, np.float32)], 3.0, weights, 2.5)
    assert store.add_clips("ns", new.id, [np.ones(4, np.float32)], 2.0, weights, 1.5).speech_seconds == 4.0
    db.close()


# PostgreSQL ---------------------------------------------------------------------------------


def test_two_replicas_on_postgres_see_each_others_changes(postgres, tmp_path):
    one = start({"DATABASE_URL": postgres, "DATA_DIR": str(tmp_path / "unused")})
    two = start({"DATABASE_URL": postgres, "DATA_DIR": str(tmp_path / "unused")})
    try:
        with httpx.Client(base_url=one.url, timeout=120) as a, httpx.Client(base_url=two.url, timeout=120) as b:
            assert b.post("/identify", files=[("file", clip(8, 3))], headers=auth("a")).json()["matches"] == []
            made = enrol(a, "on one", [(8, 0), (8, 1)]).json()  # through replica one ...
            found = b.post("/identify", files=[("file", clip(8, 3))], headers=auth("a")).json()
            assert found["speaker"]["id"] == made["id"]  # ... seen by replica two on its next request
            assert b.get(f"/speakers/{made['id']}", headers=auth("a")).json()["name"] == "on one"
            assert b.patch(f"/speakers/{made['id']}", json={"name": "renamed"}, headers=auth("a")).status_code == 200
            assert a.get(f"/speakers/{made['id']}", headers=auth("a")).json()["name"] == "renamed"
            assert b.delete(f"/speakers/{made['id']}", headers=auth("a")).status_code == 204
            assert a.post("/identify", files=[("file", clip(8, 3))], headers=auth("a")).json()["matches"] == []
            assert a.get(f"/speakers/{made['id']}", headers=auth("a")).status_code == 404
            assert not (tmp_path / "unused").exists()  # nothing went to SQLite
            # the same API as on SQLite: pagination, namespaces, an atomic failed enrolment
            ids = [enrol(a, f"pg-{i}", [(i, 0)], who="b").json()["id"] for i in range(3)]
            page = b.get("/speakers", params={"limit": 2}, headers=auth("b")).json()
            rest = b.get("/speakers", params={"limit": 2, "cursor": page["next_cursor"]}, headers=auth("b")).json()
            assert [s["id"] for s in page["speakers"] + rest["speakers"]] == ids and "next_cursor" not in rest
            assert b.get(f"/speakers/{ids[0]}", headers=auth("a")).status_code == 404
            files = [("file", clip(1, 0)), ("file", ("x.wav", b"garbage" * 50, "audio/wav"))]
            assert a.post("/speakers", data={"name": "half"}, files=files, headers=auth("b")).status_code == 415
            assert len(b.get("/speakers", headers=auth("b")).json()["speakers"]) == 3
            refuses_text_a_database_cannot_keep(a, "b")
    finally:
        one.stop()
        two.stop()


def test_postgres_down_answers_503_and_inference_still_works(tmp_path):
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    server = start({"DATABASE_URL": dead, "DATABASE_CONNECT_TIMEOUT_S": "0.5"})
    try:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            r = c.get("/speakers", headers=auth("a"))  # after DATABASE_CONNECT_TIMEOUT_S
            assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
            assert c.post("/embed", files={"file": clip(0, 0)}, headers=auth("a")).status_code == 200
    finally:
        server.stop()
