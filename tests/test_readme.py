"""The README's curl examples, run as written against a real server on the shipped weights."""

from __future__ import annotations

import json
import re
import shlex
import subprocess

from tests.conftest import ROOT


def readme_curls() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Using the service", 1)[1].split("\n## ", 1)[0]
    return [line for line in re.findall(r"^curl .*$", section, flags=re.M)]


def test_readme_curl_examples_work_as_written(server):
    commands = readme_curls()
    assert len(commands) >= 8
    seen_paths = set()
    for command in commands:
        argv = shlex.split(command.replace("localhost:8000", f"127.0.0.1:{server.port}"))
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (command, proc.stdout, proc.stderr)
        body = json.loads(proc.stdout)
        assert "error" not in body, (command, body)
        path = re.search(r"localhost:8000(/[a-z0-9/]+)", command).group(1)
        if path == "/diarize":  # samples/conversation.mp3: three voices taking turns, twice round
            assert len(body["speakers"]) == 3, body
            assert [s["speaker"] for s in body["segments"]] == ["S1", "S2", "S3"] * 2, body
        seen_paths.add(path)
    assert {"/embed", "/classify", "/verify", "/classify/batch", "/diarize", "/v1/model", "/readyz", "/healthz"} <= (
        seen_paths
    )
