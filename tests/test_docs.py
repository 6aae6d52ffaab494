"""The docs: their tables of figures are what `make docs` renders from the records, and the
README and the training guide stay short enough to read."""

from __future__ import annotations

import json
import subprocess
import sys

from docs import render
from tests.conftest import ROOT


def test_committed_docs_are_what_make_docs_renders():
    proc = subprocess.run([sys.executable, "docs/render.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_a_table_edited_by_hand_is_caught():
    readme = (ROOT / "README.md").read_text()
    assert "<!-- rendered: weights-figures -->" in readme
    shipped = json.loads((ROOT / "weights" / "manifest.json").read_text())
    real_eer = f"{100 * shipped['metrics']['open_set_test']['real']['clean']['eer']:.2f} %"
    assert real_eer in render.weights_figures(None)  # the table shows the manifest's figure
    edited = readme.replace(real_eer, "0.01 %", 1)
    assert edited != readme and render.render(edited) == readme  # rendering puts it back


def test_every_version_in_the_history_is_rendered_from_its_manifest():
    history = (ROOT / "docs" / "weights-history.md").read_text()
    recorded = sorted(p.stem for p in (ROOT / "weights" / "history").glob("*.json"))
    shipped = json.loads((ROOT / "weights" / "manifest.json").read_text())["provenance"]["version"]
    for version in [*recorded, shipped]:
        assert f"<!-- rendered: history-figures {version} -->" in history, version
        assert f"## {version} " in history


def test_readme_and_guide_stay_short():
    # issue 43: at most 6 KB and 25 KB, held in thousands of bytes, the stricter reading
    assert len((ROOT / "README.md").read_bytes()) <= 6000
    assert len((ROOT / "docs" / "training.md").read_bytes()) <= 25000
