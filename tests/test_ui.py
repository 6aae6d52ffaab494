"""The try-it page in a real browser: Debian's Chromium driven by Playwright against a real server.

The microphone is Chromium's fake capture device playing a WAV made by the project's synthesiser.
Screenshots of each state go to runs/ui/.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from model.training.corpus import LABELS
from tests.conftest import ROOT, SHIPPED_WEIGHTS, Server, conversation, speech, wav_bytes

SHOTS = ROOT / "runs" / "ui"
WAIT_MS = 60_000  # a bound for each answer (the first clip of a fresh server is the slowest)


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "Chromium is missing: `make system-deps` installs Debian's chromium"
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    out = {}
    for name, (label, index) in {"v1a": (1, 0), "v1b": (1, 1), "v5": (5, 0), "v4a": (4, 0), "v4b": (4, 1)}.items():
        out[name] = folder / f"{name}.wav"
        out[name].write_bytes(wav_bytes(speech(label, index)))
    out["mic"] = folder / "mic.wav"  # what the fake microphone plays, in a loop
    out["mic"].write_bytes(wav_bytes(speech(2, 3)))
    out["talk"] = folder / "talk.wav"  # three voices taking turns: 0, 6, 2, 0, 6, 2
    out["talk"].write_bytes(wav_bytes(conversation([(0, 2), (6, 3), (2, 4), (0, 5), (6, 6), (2, 7)])[0]))
    out["v0a"], out["v0b"] = folder / "v0a.wav", folder / "v0b.wav"
    out["v0a"].write_bytes(wav_bytes(speech(0, 0)))
    out["v0b"].write_bytes(wav_bytes(speech(0, 1)))
    out["broken"] = folder / "broken.wav"
    out["broken"].write_bytes(b"RIFF this is not audio at all " * 20)
    return out


@pytest.fixture(scope="module")
def browser(clips: dict[str, Path]) -> Iterator[Browser]:
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=chromium(),
            args=[
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={clips['mic']}",
            ],
        )
        yield b
        b.close()


@contextmanager
def open_page(browser: Browser, url: str) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 420, "height": 1000})  # a phone's width
    context.grant_permissions(["microphone"])
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(url + "/")
    try:
        yield page
    finally:
        context.close()


@pytest.fixture
def page(browser: Browser, server: Server) -> Iterator[Page]:
    with open_page(browser, server.url) as p:
        expect(p.locator("body")).to_have_attribute("data-ready", "true")
        yield p


def test_choose_a_file_shows_its_label_probabilities_and_spectrogram(page: Page, clips: dict[str, Path]) -> None:
    page.set_input_files("#file", clips["v5"])
    expect(page.locator("#result")).to_have_attribute("data-state", "done", timeout=WAIT_MS)
    expect(page.locator("#label")).to_have_text(LABELS[5])
    expect(page.locator("#known")).to_have_text(re.compile(r"^(one|none) of the 9 voices$"))
    bars = page.locator("#probs li")
    expect(bars).to_have_count(len(LABELS))
    expect(bars.first).to_contain_text(LABELS[5])
    # the canvas holds the spectrogram: as many rows as mel bands, and not one flat colour
    drawn = page.evaluate(
        """() => { const c = document.getElementById('spec'); const d = c.getContext('2d')
                   .getImageData(0, 0, c.width, c.height).data; const seen = new Set();
                   for (let i = 0; i < d.length; i += 4) seen.add(d[i] * 65536 + d[i+1] * 256 + d[i+2]);
                   return {w: c.width, h: c.height, colours: seen.size}; }"""
    )
    n_mels = json.loads((SHIPPED_WEIGHTS / "manifest.json").read_text())["features"]["n_mels"]
    assert drawn["h"] == n_mels and drawn["w"] > 100 and drawn["colours"] > 50, drawn
    page.screenshot(path=SHOTS / "classify.png", full_page=True)


def test_record_from_the_microphone_shows_a_label(page: Page) -> None:
    page.click("#record")
    expect(page.locator("#record")).to_have_attribute("aria-pressed", "true")
    page.wait_for_function("Number(document.getElementById('rec-status').dataset.seconds || 0) >= 2.5")
    page.click("#record")
    expect(page.locator("#result")).to_have_attribute("data-state", "done", timeout=WAIT_MS)
    expect(page.locator("#rec-status")).to_contain_text("Recorded")
    expect(page.locator("#label")).to_have_text(LABELS[2])  # the voice the fake microphone plays
    page.screenshot(path=SHOTS / "record.png", full_page=True)


def test_compare_two_clips(page: Page, clips: dict[str, Path]) -> None:
    page.set_input_files("#clip-a", clips["v1a"])
    page.set_input_files("#clip-b", clips["v1b"])
    page.click("#compare button[type=submit]")
    expect(page.locator("#compare-result")).to_have_attribute("data-state", "done", timeout=WAIT_MS)
    expect(page.locator("#same")).to_have_text("Same voice")
    expect(page.locator("#score-line")).to_contain_text(re.compile("[Cc]osine [0-9.]+"))
    page.screenshot(path=SHOTS / "compare-same.png", full_page=True)

    page.set_input_files("#clip-b", clips["v5"])
    page.click("#compare button[type=submit]")
    expect(page.locator("#same")).to_have_text("Different voices", timeout=WAIT_MS)


def test_an_undecodable_file_shows_the_services_error(page: Page, clips: dict[str, Path]) -> None:
    page.set_input_files("#file", clips["broken"])
    expect(page.locator("#result")).to_have_attribute("data-state", "error", timeout=WAIT_MS)
    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("undecodable_audio")
    page.screenshot(path=SHOTS / "error.png", full_page=True)


def test_enrol_identify_and_delete_a_speaker(page: Page, clips: dict[str, Path]) -> None:
    name = "Page test speaker"
    page.fill("#enrol-name", name)
    page.set_input_files("#enrol-files", [clips["v4a"]])
    page.click("#enrol button[type=submit]")
    entry = page.locator("#speakers li", has_text=name)
    expect(entry).to_have_count(1, timeout=WAIT_MS)
    page.set_input_files("#identify-file", clips["v4b"])
    page.click("#identify button[type=submit]")
    expect(page.locator("#identify-result")).to_have_text(re.compile(f"^This is {name} "), timeout=WAIT_MS)
    page.screenshot(path=SHOTS / "speakers.png", full_page=True)
    entry.get_by_role("button", name=f"Delete {name}").click()
    expect(entry).to_have_count(0, timeout=WAIT_MS)


def test_who_spoke_when_draws_the_turns_names_the_enrolled_one_and_plays_a_turn(
    page: Page, clips: dict[str, Path]
) -> None:
    name = "Timeline test speaker"
    page.fill("#enrol-name", name)
    page.set_input_files("#enrol-files", [clips["v0a"], clips["v0b"]])
    page.click("#enrol button[type=submit]")
    entry = page.locator("#speakers li", has_text=name)
    expect(entry).to_have_count(1, timeout=WAIT_MS)
    try:
        page.set_input_files("#diarize-file", clips["talk"])
        expect(page.locator("#diarize-result")).to_have_attribute("data-state", "done", timeout=WAIT_MS)
        legend = page.locator("#diarize-legend li")
        expect(legend).to_have_count(3)
        expect(page.locator("#diarize-legend")).to_contain_text(name)  # the enrolled voice, by name
        turns = page.locator("#timeline .turn")
        assert turns.count() >= 6
        speakers = turns.evaluate_all("ts => ts.map(t => t.dataset.speaker)")
        assert len(set(speakers)) == 3 and speakers[0] == name  # voice 0 speaks first
        # left to right in time, each block where its turn is
        starts = turns.evaluate_all("ts => ts.map(t => parseFloat(t.style.left))")
        assert starts == sorted(starts) and starts[0] < 5
        page.screenshot(path=SHOTS / "diarize.png", full_page=True)
        # a click plays that turn: the player jumps to its start and runs
        second = turns.nth(1)
        start = float(second.get_attribute("data-start") or "nan")
        second.click()
        page.wait_for_function(
            f"(() => {{ const a = document.getElementById('diarize-audio'); "
            f"return !a.paused && a.currentTime >= {start} && a.currentTime < {start} + 5; }})()"
        )
    finally:
        entry.get_by_role("button", name=f"Delete {name}").click()
        expect(entry).to_have_count(0, timeout=WAIT_MS)


def test_who_spoke_when_from_the_microphone(page: Page) -> None:
    page.click("#diarize-record")
    page.wait_for_function("Number(document.getElementById('diarize-rec-status').dataset.seconds || 0) >= 3")
    page.click("#diarize-record")
    expect(page.locator("#diarize-result")).to_have_attribute("data-state", "done", timeout=WAIT_MS)
    expect(page.locator("#diarize-legend li")).to_have_count(1)  # the one voice the fake microphone plays
    assert page.locator("#timeline .turn").count() >= 1


def test_with_api_keys_the_page_asks_for_a_key_and_uses_it(browser: Browser, clips: dict[str, Path]) -> None:
    srv = Server(env={"API_KEYS": "page-test-key"})
    try:
        srv.wait_ready()
        with open_page(browser, srv.url) as page:
            expect(page.locator("#key-section")).to_be_visible()
            page.fill("#api-key", "wrong")
            page.click("#key-save")
            expect(page.locator("#error")).to_contain_text("unauthorized")
            page.fill("#api-key", "page-test-key")
            page.click("#key-save")
            expect(page.locator("body")).to_have_attribute("data-ready", "true")
            page.set_input_files("#file", clips["v1a"])
            expect(page.locator("#label")).to_have_text(LABELS[1], timeout=WAIT_MS)
    finally:
        srv.stop()
