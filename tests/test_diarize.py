"""POST /diarize through real HTTP: conversations made here from generated voices, with known turns."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import model
from client import Client
from client.results import rttm_lines
from model.diarize import (
    Diarization,
    DiarizeConfig,
    Turn,
    diarize,
    estimate_speakers,
    keep_names_on_matching_turns,
    rttm,
    set_apart,
    turns,
    windows,
)
from model.training.data import UNLABELLED, Item
from model.training.diarization import (
    Conversation,
    audible,
    evaluate_diarization,
    format_diarization,
    named_speech,
)
from model.training.voices import catalogue
from tests.conftest import EAGER, SHIPPED_WEIGHTS, Server, conversation, speech, voice_speech, wav_bytes
from tests.test_client import cli

RATE = 16000
FRAME_S = 0.01


def frames(spans: list[tuple[float, float, object]], duration: float) -> list[object | None]:
    out: list[object | None] = [None] * int(duration / FRAME_S)
    for start, end, who in spans:
        for i in range(int(start / FRAME_S), min(len(out), int(end / FRAME_S))):
            out[i] = who
    return out


def speaker_error(reference: list[tuple[float, float, int]], found: list[dict], duration: float) -> float:
    """Share of the reference speech not given to its own speaker, under the best one-to-one
    mapping of found labels to voices (missed speech counts as an error; a simple frame DER)."""
    ref = frames(reference, duration)
    hyp = frames([(s["start"], s["end"], s["speaker"]) for s in found], duration)
    voices = sorted({v for v in ref if v is not None})
    labels = sorted({h for h in hyp if h is not None})
    overlap = np.zeros((len(voices), max(1, len(labels))))
    for r, h in zip(ref, hyp, strict=True):
        if r is not None and h is not None:
            overlap[voices.index(r), labels.index(h)] += 1
    rows, cols = linear_sum_assignment(-overlap)
    right = overlap[rows, cols].sum()
    speech_frames = sum(r is not None for r in ref)
    return 1 - right / speech_frames


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    data = tmp_path_factory.mktemp("diarize-store")
    srv = Server({**EAGER, "DATA_DIR": str(data), "DIARIZE_MAX_DURATION_S": "90"})
    try:
        srv.wait_ready()
        with httpx.Client(base_url=srv.url, timeout=300.0) as c:
            yield c
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def three_voices() -> tuple[torch.Tensor, list[tuple[float, float, int]]]:
    """Three of the generated voices taking turns, twice round, about 40 s."""
    return conversation([(0, 2), (6, 3), (2, 4), (0, 5), (6, 6), (2, 7)])


def test_a_conversation_is_split_into_its_speakers_turns(served, three_voices):
    wave, reference = three_voices
    r = served.post("/diarize", files={"file": ("talk.wav", wav_bytes(wave))})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["duration"] == pytest.approx(wave.numel() / RATE, abs=0.01)
    assert [s["label"] for s in body["speakers"]] == ["S1", "S2", "S3"]  # the count found, no hint given
    starts = [s["start"] for s in body["segments"]]
    assert starts == sorted(starts) and all(s["end"] > s["start"] for s in body["segments"])
    assert speaker_error(reference, body["segments"], body["duration"]) <= 0.1
    # each speaker's speech is what its turns add up to, and no match was asked for
    for s in body["speakers"]:
        total = sum(seg["end"] - seg["start"] for seg in body["segments"] if seg["speaker"] == s["label"])
        assert s["speech_seconds"] == pytest.approx(total, abs=0.01) and s["match"] is None


def test_hints_bound_the_count_and_contradictions_are_refused(served, three_voices):
    wave, _ = three_voices
    audio = wav_bytes(wave)
    two = served.post("/diarize", params={"num_speakers": 2}, files={"file": ("t.wav", audio)}).json()
    assert len(two["speakers"]) == 2
    at_most = served.post("/diarize", params={"max_speakers": 2}, files={"file": ("t.wav", audio)}).json()
    assert len(at_most["speakers"]) <= 2
    for params in ({"min_speakers": 3, "max_speakers": 2}, {"num_speakers": 4, "max_speakers": 3},
                   {"num_speakers": 0}, {"max_speakers": 1000}):  # fmt: skip
        r = served.post("/diarize", params=params, files={"file": ("t.wav", audio)})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_parameters", (params, r.text)


def test_rttm_answer_carries_the_same_turns(served, three_voices):
    wave, reference = three_voices
    r = served.post("/diarize", params={"format": "rttm"}, files={"file": ("talk.wav", wav_bytes(wave))})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    segments = []
    for line in r.text.splitlines():
        kind, file_id, channel, onset, dur, _, _, who, _, _ = line.split(" ")
        assert kind == "SPEAKER" and file_id == "talk" and channel == "1"
        segments.append({"start": float(onset), "end": float(onset) + float(dur), "speaker": who})
    assert speaker_error(reference, segments, wave.numel() / RATE) <= 0.1


def test_enrolled_speakers_are_named_and_others_are_not(served, three_voices):
    wave, reference = three_voices
    names = {0: "awb", 2: "slt"}
    for voice, name in names.items():  # enrolled from sentences the conversation does not use
        files = [("file", (f"{name}{i}.wav", wav_bytes(speech(voice, i)))) for i in (0, 1)]
        r = served.post("/speakers", data={"name": name}, files=files)
        assert r.status_code in (200, 201), r.text
    body = served.post("/diarize", params={"identify": True}, files={"file": ("t.wav", wav_bytes(wave))}).json()
    assert body["identify_threshold"] is not None
    named = {s["label"]: (s["match"] or {}).get("name") for s in body["speakers"]}
    # the speech each reference voice is given, by the name its label carries
    ref, hyp = (
        frames(reference, body["duration"]),
        frames([(s["start"], s["end"], named[s["speaker"]]) for s in body["segments"]], body["duration"]),
    )
    for voice, name in names.items():
        theirs = [h for r, h in zip(ref, hyp, strict=True) if r == voice]
        assert sum(h == name for h in theirs) >= 0.9 * len(theirs), (voice, named)
    others = [h for r, h in zip(ref, hyp, strict=True) if r == 6]
    assert not any(h in names.values() for h in others)
    assert sorted(n for n in named.values() if n) == sorted(names.values())


def test_the_client_and_its_command_line_write_rttm_and_jsonl(served, three_voices, tmp_path):
    """Client.diarize, and `python -m client diarize` over files (named from the speakers enrolled
    above): RTTM lines per file with the enrolled names, a JSONL row per file, a bad file's error."""
    wave, reference = three_voices
    talk, bad = tmp_path / "talk.wav", tmp_path / "bad.wav"
    talk.write_bytes(wav_bytes(wave))
    bad.write_bytes(b"not audio" * 50)
    with Client(str(served.base_url)) as c:
        found = c.diarize(talk, identify=True)
    assert len(found.speakers) == 3 and sorted(s.match.name for s in found.speakers if s.match) == ["awb", "slt"]
    assert speaker_error(reference, [vars(t) for t in found.segments], found.duration) <= 0.1
    out = tmp_path / "who.rttm"
    proc = cli("diarize", talk, bad, "--identify", "--out", out, "--url", str(served.base_url))
    assert proc.returncode == 1 and "bad.wav" in proc.stderr  # one file failed, and it says which
    lines = [line.split(" ") for line in out.read_text().splitlines()]
    assert {line[1] for line in lines} == {"talk"} and {"awb", "slt"} <= {line[7] for line in lines}
    assert found.rttm("talk") == out.read_text()
    # the service's own RTTM answer names the speakers as the client does
    r = served.post(
        "/diarize", params={"format": "rttm", "identify": True}, files={"file": ("talk.wav", wav_bytes(wave))}
    )
    assert r.status_code == 200 and r.text == found.rttm("talk")
    rows = tmp_path / "who.jsonl"
    proc = cli("diarize", talk, bad, "--num-speakers", "2", "--out", rows, "--url", str(served.base_url))
    by_path = {Path(r["path"]).name: r for r in map(json.loads, rows.read_text().splitlines())}
    assert len(by_path["talk.wav"]["speakers"]) == 2 and by_path["talk.wav"]["error"] is None
    assert by_path["bad.wav"]["error"].startswith("undecodable_audio")


def test_rttm_keeps_ten_fields_when_an_enrolled_name_has_spaces():
    """RTTM's fields are separated by spaces: an enrolled name such as "Ann Lee" is written Ann_Lee,
    by the service and by the client alike."""
    served = rttm([Turn(0.0, 1.5, 0), Turn(1.5, 2.0, 1)], ["Ann  Lee", "S2"], "talk")
    written = rttm_lines("talk", [(0.0, 1.5, "Ann  Lee"), (1.5, 2.0, "S2")])
    assert served == written
    assert [line.split(" ")[7] for line in served.splitlines()] == ["Ann_Lee", "S2"]
    assert all(len(line.split(" ")) == 10 for line in served.splitlines())


def speaker_at(body: dict, t: float) -> str:
    """The label of the segment of a /diarize answer that holds the instant ``t``."""
    return next(s["speaker"] for s in body["segments"] if s["start"] <= t <= s["end"])


def test_a_voice_joined_to_an_enrolled_speaker_keeps_its_turn_but_not_the_name(served):
    """A voice that says a few words alike a voice that said much joins that voice's cluster (see
    the small-cluster test below). With ``identify``, a named speaker's turns keep the name only where
    they match the profile themselves: that turn becomes a speaker of its own with no name, the
    enrolled voice's turns keep theirs; a hint on the count is not exceeded to do it."""
    words = voice_speech("espeak-en-gb-x-rp-john", 0)[: int(2.6 * RATE)]  # a voice of the corpus, 2.6 s
    m3, m7 = 5, 6  # espeak-en-us-m3 (to be enrolled) and espeak-en-gb-m7 (never enrolled in this module)
    wave, reference = conversation(
        [(m3, 0), (m7, 0), ("few", words), (m7, 1), (m3, 1), (m7, 2), (m3, 2), (m7, 3), (m3, 3)]
    )
    middle = {who: [(s + e) / 2 for s, e, w in reference if w == who] for who in (m3, m7, "few")}
    audio = wav_bytes(wave)
    plain = served.post("/diarize", files={"file": ("t.wav", audio)}).json()
    (few,) = middle["few"]
    assert speaker_at(plain, few) == speaker_at(plain, middle[m3][0])  # what this test is about: joined
    files = [("file", (f"m3-{i}.wav", wav_bytes(speech(m3, i)))) for i in (20, 21)]
    assert served.post("/speakers", data={"name": "m3"}, files=files).status_code in (200, 201)
    body = served.post("/diarize", params={"identify": True}, files={"file": ("t.wav", audio)}).json()
    named = {s["label"]: (s["match"] or {}).get("name") for s in body["speakers"]}
    assert len(body["speakers"]) == len(plain["speakers"]) + 1
    assert named[speaker_at(body, few)] is None and speaker_at(body, few) != speaker_at(body, middle[m3][0])
    assert all(named[speaker_at(body, t)] == "m3" for t in middle[m3])
    assert not any(named[speaker_at(body, t)] for t in middle[m7])
    for s in body["speakers"]:  # the speech and the scores are of the turns each speaker has now
        total = sum(seg["end"] - seg["start"] for seg in body["segments"] if seg["speaker"] == s["label"])
        assert s["speech_seconds"] == pytest.approx(total, abs=0.01)
    (match,) = [s["match"] for s in body["speakers"] if s["match"]]
    assert match["score"] >= body["identify_threshold"]
    hinted = served.post("/diarize", params={"identify": True, "num_speakers": len(plain["speakers"])},
                         files={"file": ("t.wav", audio)}).json()  # fmt: skip
    assert len(hinted["speakers"]) == len(plain["speakers"])


def test_turns_set_apart_become_one_speaker_for_each_speaker_that_lost_them():
    """``set_apart`` and ``keep_names_on_matching_turns`` on turns whose embeddings are given:
    numbering by first speech, speech seconds and mean embeddings of the turns each speaker keeps,
    the profile each speaker stands for, and the bound a hint puts on the count."""
    e = np.eye(4, dtype=np.float32)
    found = Diarization(
        12.0,
        [Turn(0, 2, 0), Turn(2, 4, 1), Turn(4, 5, 0), Turn(5, 8, 1), Turn(8, 12, 0)],
        [7.0, 5.0],
        np.stack([e[0], e[1]]),
        np.stack([e[0], e[1], e[2], e[1], e[0]]),
        np.array([2, 2, 1, 3, 4]),
    )
    result, origin = set_apart(found, [True, True, False, True, True])
    assert [t.speaker for t in result.turns] == [0, 1, 2, 1, 0] and origin == [0, 1, None]
    assert result.speech_s == [6.0, 5.0, 1.0]
    assert np.allclose(result.embeddings, np.stack([e[0], e[1], e[2]]))
    everything, origin = set_apart(found, [False] * 5)  # a speaker left with no turn is gone
    assert everything.speakers == 2 and origin == [None, None]

    def scores(profile: str, rows: np.ndarray) -> np.ndarray:  # the "A" profile is e[0]
        return rows @ e[0] * 10

    named, profiles = keep_names_on_matching_turns(found, ["A", None], scores, threshold=5.0)
    assert profiles == ["A", None, None] and [t.speaker for t in named.turns] == [0, 1, 2, 1, 0]
    same, profiles = keep_names_on_matching_turns(found, ["A", None], scores, threshold=5.0, most=2)
    assert same is found and profiles == ["A", None]


def test_no_speech_gives_no_turns_and_bad_input_a_clear_error(served):
    silence = wav_bytes(torch.zeros(5 * RATE))
    body = served.post("/diarize", files={"file": ("quiet.wav", silence)}).json()
    assert body["segments"] == [] and body["speakers"] == [] and body["duration"] == pytest.approx(5.0)
    hum = wav_bytes(0.1 * torch.sin(2 * torch.pi * 50 * torch.arange(5 * RATE) / RATE))
    assert served.post("/diarize", files={"file": ("hum.wav", hum)}).json()["segments"] == []
    r = served.post("/diarize", files={"file": ("x.wav", b"not audio at all" * 100)})
    assert r.status_code == 415 and r.json()["error"]["code"] == "undecodable_audio"
    long = wav_bytes(torch.zeros(91 * RATE))  # DIARIZE_MAX_DURATION_S=90 on this server
    r = served.post("/diarize", files={"file": ("long.wav", long)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "audio_too_long"
    # and the server still answers
    assert served.post("/embed", files={"file": ("a.wav", wav_bytes(speech(1, 0)))}).status_code == 200


def test_turns_change_halfway_between_windows_that_disagree():
    regions = [(0.0, 6.0), (7.0, 7.2)]
    wins = windows(regions, DiarizeConfig())
    assert wins[0] == (0.0, 1.5) and wins[-1] == (4.5, 6.0) and all(b - a == 1.5 for a, b in wins)
    labels = np.array([0 if (a + b) / 2 < 3 else 1 for a, b in wins])
    found = turns(regions, wins, labels)
    centres = [(a + b) / 2 for a, b in wins]
    cut = next((centres[i] + centres[i + 1]) / 2 for i in range(len(wins) - 1) if labels[i] != labels[i + 1])
    assert [(t.start, t.end, t.speaker) for t in found] == [(0.0, cut, 0), (cut, 6.0, 1), (7.0, 7.2, 1)]
    # clusters as alike as one voice are one speaker, and a hint's count is kept
    rng = np.random.default_rng(0)
    one = rng.normal(size=(1, 64)) + 0.05 * rng.normal(size=(30, 64))
    assert set(estimate_speakers(one).tolist()) == {0}
    assert len(set(estimate_speakers(one, num_speakers=2).tolist())) == 2


def test_a_change_inside_one_stretch_of_speech_is_placed_where_the_windows_hear_it():
    """Two generated voices with no pause between them: the turn changes where the two windows that
    hear both voices put it (within 0.2 s, inside the scoring collar), not halfway between their
    centres (0.28-0.33 s off for these changes)."""
    config = DiarizeConfig()
    network = model.load(SHIPPED_WEIGHTS)
    regions = [(0.0, 12.0)]
    wins = windows(regions, config)
    for first, then in ((0, 6), (2, 4)):
        a = torch.cat([audible(speech(first, i)) for i in range(4)])
        b = torch.cat([audible(speech(then, i)) for i in range(4)])
        for change in (5.3, 5.9):
            wave = torch.cat([a[: int(change * RATE)], b[: int((12 - change) * RATE)]])
            pieces = [wave[int(s * RATE) : int(e * RATE)] for s, e in wins]
            x = torch.stack([r.embedding for r in network.infer_many(pieces)])
            labels = np.array([0 if (s + e) / 2 < change else 1 for s, e in wins])
            halfway = turns(regions, wins, labels)[0].end
            heard = turns(regions, wins, labels, embeddings=x.numpy())
            assert [t.speaker for t in heard] == [0, 1] and heard[1].start == heard[0].end
            assert abs(heard[0].end - change) <= 0.2 < abs(halfway - change), (first, then, change, heard[0].end)


def test_a_short_pause_of_one_speaker_stays_inside_the_turn():
    """A pause no longer than twice the scoring collar (0.5 s) inside one voice's speech is part of
    its turn; a longer one, or a pause before another voice, still ends it."""
    regions = [(0.0, 3.0), (3.4, 6.0), (6.8, 9.0), (9.3, 12.0)]
    config = DiarizeConfig()
    wins = windows(regions, config)
    labels = np.array([0 if (a + b) / 2 < 9.1 else 1 for a, b in wins])
    spans = [(t.start, t.end, t.speaker) for t in turns(regions, wins, labels, config.bridge_s)]
    assert spans == [(0.0, 6.0, 0), (6.8, 9.0, 0), (9.3, 12.0, 1)]
    assert len(turns(regions, wins, labels)) == 4  # without bridging, every pause ends a turn
    a, b = np.eye(64)[:2]
    noise = 0.05 * np.random.default_rng(0).normal(size=(len(wins), 64))
    x = np.stack([a if lab == 0 else b for lab in labels]) + noise
    found = diarize(12.0, regions, wins, x, config=config)
    assert [(t.start, t.end) for t in found.turns] == [(0.0, 6.0), (6.8, 9.0), (9.3, 12.0)]
    assert found.speech_s == pytest.approx([6.0 + 2.2, 2.7])


def test_speakers_found_on_long_windows_change_where_the_short_windows_hear_it():
    """The long windows (3 s, each the mean of the short windows inside it) find the speakers; the
    one astride the change leans to the first voice, and the short windows still place the change
    where their own voices change (at 6 s), not where the long windows' labels change (7.1 s)."""
    regions = [(0.0, 12.0)]
    config = DiarizeConfig()
    wins, long_wins = windows(regions, config), windows(regions, config, clustering=True)
    assert long_wins[3] == (4.5, 7.5) and all(b - a == 3.0 for a, b in long_wins)
    a, b = np.eye(64)[:2]
    rng = np.random.default_rng(2)
    share = np.array([(min(e, 6.0) - min(s, 6.0)) / (e - s) for s, e in wins])[:, None]
    share[wins.index((5.25, 6.75))] = 0.8  # the short window astride the change: nearer the first voice
    x = share * a + (1 - share) * b + 0.05 * rng.normal(size=(len(wins), 64))
    found = diarize(12.0, regions, wins, x, config=config)
    assert found.speakers == 2 and [t.speaker for t in found.turns] == [0, 1]
    assert abs(found.turns[0].end - 6.0) <= 0.4  # within about half a short window's hop
    assert diarize(12.0, regions, wins, x, num_speakers=1, config=config).speakers == 1  # a hint holds


def test_a_right_hint_does_no_worse_than_none():
    """Three voices, one heard in two moods (its two clusters' centroids 0.8 alike, as one voice):
    told the right count, or that there are at most three, the answer is the one found unhinted,
    not a voice split in two and two voices joined."""
    e = np.eye(64)
    moods = [e[0], 0.8 * e[0] + 0.6 * e[1]]
    rng = np.random.default_rng(1)
    x = np.concatenate([3 * centre + 0.1 * rng.normal(size=(30, 64)) for centre in [*moods, e[2], e[3]]])
    truth = np.repeat([0, 0, 1, 2], 30)
    for hint in ({}, {"num_speakers": 3}, {"max_speakers": 3}):
        labels = estimate_speakers(x, **hint)
        assert labels.tolist() == truth.tolist(), hint


def test_a_hinted_count_the_long_windows_cannot_hold_is_found_on_the_short_windows():
    """3.5 s of three voices asked for as three speakers: two 3 s windows can hold only two
    speakers, so the 1.5 s windows are clustered themselves and the hint holds."""
    regions = [(0.0, 3.5)]
    config = DiarizeConfig()
    wins = windows(regions, config)
    assert len(wins) == 4 and len(windows(regions, config, clustering=True)) == 2
    a, b, c = np.eye(64)[:3]
    x = np.stack([a, a, b, c]) + 0.05 * np.random.default_rng(0).normal(size=(4, 64))
    for hint in ({"num_speakers": 3}, {"min_speakers": 3}):
        found = diarize(3.5, regions, wins, x, config=config, **hint)
        assert found.speakers == 3 and [t.speaker for t in found.turns] == [0, 1, 2], hint


def test_a_few_seconds_of_a_voice_count_as_a_speaker_unless_it_is_alike_a_voice_that_said_much():
    rng = np.random.default_rng(1)
    a, b, c = np.eye(64)[:3] * 3
    near_a = 3 * (0.5 * np.eye(64)[0] + 0.866 * np.eye(64)[3])  # cosine 0.5 to a: alike, not one voice

    def voice(centre: np.ndarray, n: int) -> np.ndarray:
        return centre + 0.3 * rng.normal(size=(n, 64))

    # 5 windows (about 4 s of speech) of a third voice: a speaker beside 20 of the others' ...
    short = np.concatenate([voice(a, 10), voice(b, 10), voice(c, 5)])
    assert DiarizeConfig().small_cluster(len(short)) <= 5
    assert len(set(estimate_speakers(short).tolist())) == 3
    # ... and beside 200, when unlike both (a speaker who spoke little) ...
    distinct = np.concatenate([voice(a, 100), voice(b, 100), voice(c, 5)])
    assert DiarizeConfig().small_cluster(len(distinct)) == 8
    assert len(set(estimate_speakers(distinct).tolist())) == 3
    # ... but not when alike one of them: a stray cluster that joins its nearest, unless a hint asks
    stray = np.concatenate([voice(a, 100), voice(b, 100), voice(near_a, 5)])
    labels = estimate_speakers(stray)
    assert len(set(labels.tolist())) == 2 and set(labels[-5:].tolist()) == {labels[0]}
    assert len(set(estimate_speakers(stray, num_speakers=3).tolist())) == 3


def test_a_name_on_overlapped_speech_of_the_named_speaker_is_told_apart_from_a_wrong_name():
    """The naming figures of the evaluation: in overlapped speech one turn can carry only one of the
    two voices, so an enrolled name there is counted as others' speech named but not as misnamed;
    an enrolled name on another voice's speech alone is both. Outside the 0.25 s collars."""
    shipped = model.load(SHIPPED_WEIGHTS)
    reference = [(0.0, 6.0, "A"), (4.0, 10.0, "B")]  # B starts 2 s before A stops
    conv = Conversation("c", "synthetic", torch.zeros(10 * RATE), reference, False, {"A": [speech(0, 1), speech(0, 2)]})
    x = torch.stack([r.embedding for r in shipped.infer_many([speech(0, 3), speech(6, 3)])]).numpy()
    turns_ = [Turn(0.0, 7.0, 0), Turn(7.0, 10.0, 1)]  # A's turn runs 1 s into B's
    found = Diarization(10.0, turns_, [7.0, 3.0], x, x, np.array([1, 1]))  # a turn of each speaker
    named = named_speech(shipped, conv, found, shipped.manifest.identify_threshold, ["A"])
    assert named["enrolled_s"] == pytest.approx(5.0, abs=0.03)  # 0.25-3.75 and 4.25-5.75
    assert named["named_right_s"] == pytest.approx(5.0, abs=0.03)
    assert named["others_named_s"] == pytest.approx(1.5 + 0.75, abs=0.03)  # 4.25-5.75 with A, 6.25-7 alone
    assert named["others_misnamed_s"] == pytest.approx(0.75, abs=0.03)


def test_the_evaluation_scores_conversations_of_held_out_voices_with_pyannote():
    """`evaluate --diarization`'s path on one conversation of two held-out synthetic voices (of the
    validation ones: test voices are measured once, for what ships), spoken afresh:
    pyannote.metrics' DER and its parts, the speaker count, and the naming figures."""
    shipped = model.load(SHIPPED_WEIGHTS)
    voices = [v.label for v in catalogue() if v.role == "open-val"][:2]
    items = [Item(Path(f"{v}.wav"), UNLABELLED, "open-val", voice=v) for v in voices]
    report = evaluate_diarization(shipped, items, conversations=1, seed=3)
    r = report["synthetic"]
    assert r["conversations"] == 1 and 60 <= r["seconds"] <= 190 and "real" not in report
    (conv,) = r["per_conversation"]
    assert conv["speakers"] == 2 and r["speaker_count_accuracy"] == (conv["found"] == 2)
    assert r["der"] == pytest.approx(r["missed"] + r["false_alarm"] + r["confusion"]) and r["der"] <= 0.1
    assert r["naming"]["enrolled_speech_named_right"] >= 0.9
    assert r["naming"]["other_speech_named"] == r["naming"]["other_speech_misnamed"] == 0
    assert "DER" in format_diarization(report)
