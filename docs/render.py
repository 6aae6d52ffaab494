"""Render the tables of figures in the README and docs/ from what measured them (``make docs``).

A rendered block sits between two comments, which name what fills it::

    <!-- rendered: weights-figures -->
    ...
    <!-- end rendered -->

and is replaced by what its renderer makes of the records: the weights' manifests
(``weights/manifest.json``, and ``weights/history/<version>.json`` for the versions shipped before)
and the results ``make bench`` writes per CPU (``bench/results/*.json``). ``--check`` changes
nothing and exits 1 naming the files whose blocks differ (the test suite runs it), so a table
edited by hand fails the tests. Figures that no record holds are prose that names the command and
the machine that measured them.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(
    r"(<!-- rendered: (?P<name>[\w-]+)(?: (?P<arg>[\w.-]+))? -->\n)(?P<body>.*?)(<!-- end rendered -->)", re.S
)


@cache
def manifest(version: str | None = None) -> dict[str, Any]:
    """The shipped manifest, or a version shipped before (each read once)."""
    shipped = json.loads((ROOT / "weights" / "manifest.json").read_text())
    if version is None or version == shipped["provenance"]["version"]:
        return shipped
    path = ROOT / "weights" / "history" / f"{version}.json"
    if not path.is_file():
        raise ValueError(f"no recorded manifest for weights {version} ({path.relative_to(ROOT)})")
    return json.loads(path.read_text())


def get(record: dict[str, Any], dotted: str) -> Any:
    value: Any = record
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f} %"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)]) + "\n"


def weights_figures(_: str | None) -> str:
    """The README's one table: the shipped weights on test speakers, beside the public encoders."""
    m = manifest()
    t = m["metrics"]["open_set_test"]
    cam, rez = get(t, "teachers.campplus"), get(t, "teachers.resemblyzer")
    ident = m["metrics"].get("open_set_identification", {})
    diar = m["metrics"].get("diarization", {})
    rows = [
        [
            f"real speakers, as recorded ({get(t, 'real.clean.voices')})",
            "EER",
            pct(get(t, "real.clean.eer")),
            pct(get(cam, "real.clean.eer")),
            pct(get(rez, "real.clean.eer")),
        ],
        [
            "the same, against 8 kHz telephone",
            "EER",
            pct(get(t, "real.probes.telephone.eer")),
            pct(get(cam, "real.probes.telephone.eer")),
            pct(get(rez, "real.probes.telephone.eer")),
        ],
        [
            f"synthetic voices ({t['voices']}), 12 conditions",
            "EER",
            pct(t["eer"]),
            pct(get(cam, "synthetic.eer")),
            pct(get(rez, "synthetic.eer")),
        ],
        [
            "the 9 classes (test split)",
            "accuracy / EER",
            f"{m['metrics']['test_accuracy']:.3f} / {pct(m['metrics']['test_eer'])}",
            "",
            "",
        ],
    ]
    if ident:
        rows.append(
            [
                "/identify, enrolled real voices",
                "named right / others unnamed",
                f"{pct(get(ident, 'real.identified'), 1)} / {pct(get(ident, 'real.never_enrolled_answered_none'), 1)}",
                "",
                "",
            ]
        )
    for kind in ("synthetic", "real"):
        if kind in diar:
            d = diar[kind]
            rows.append(
                [
                    f"/diarize, {d['conversations']} {kind} conversations",
                    "DER / count right",
                    f"{pct(d['der'])} / {pct(d['speaker_count_accuracy'], 0)}",
                    "",
                    "",
                ]
            )
    head = ["held-out test speakers, never trained on", "figure", f"ours ({m['provenance']['version']})", "CAM++",
            "Resemblyzer"]  # fmt: skip
    note = (
        "Measured once, for these weights, by `python -m model.training.evaluate` with `--open-set --teachers`, "
        "`--open-set --identify` and `--diarization` (each command line is in `weights/manifest.json`'s metrics)."
    )
    return table(head, rows) + "\n" + note + "\n"


def history_figures(version: str | None) -> str:
    """A shipped version's headline figures, from its recorded manifest."""
    m = manifest(version)
    mt, p = m.get("metrics", {}), m["provenance"]
    figures = [
        ("9 classes, test: accuracy", mt.get("test_accuracy"), False),
        ("9 classes, test: EER", mt.get("test_eer"), True),
        ("9 classes, validation: EER", mt.get("val_eer"), True),
        ("open-set validation voices: EER", mt.get("open_val_eer"), True),
        ("open-set test voices (synthetic): EER", get(mt, "open_set_test.eer"), True),
        ("open-set test speakers (real): EER", get(mt, "open_set_test.real.clean.eer"), True),
        ("real validation speakers: EER", get(mt, "open_set_val.real.clean.eer"), True),
        ("/identify, test: named right", get(mt, "open_set_identification.identified"), True),
        ("/diarize, synthetic test conversations: DER", get(mt, "diarization.synthetic.der"), True),
        ("/diarize, real test conversations: DER", get(mt, "diarization.real.der"), True),
    ]
    rows = [[name, pct(v) if as_pct else f"{v:.3f}"] for name, v, as_pct in figures if isinstance(v, int | float)]
    wall = p.get("train_wall_s")
    lines = [f"Trained with `{p['train_command']}`" if p.get("train_command") else "Training command not recorded"]
    host = p.get("host") or {}
    if wall:
        where = (
            f"a {host.get('cores')}-core {host['cpu']} ({host.get('cpu_capability')})"
            if host.get("cpu")
            else "a host not recorded"
        )
        lines[0] += f" ({wall / 60:.0f} min of training on {where})"
    return "\n".join(lines) + ".\n\n" + table(["figure", "value"], rows)


def bench_figures(_: str | None) -> str:
    """``make bench``'s results, one row per CPU and precision it recorded."""
    rows = []
    for path in sorted((ROOT / "bench" / "results").glob("*.json")):
        r = json.loads(path.read_text())
        m = r["machine"]
        cpu = f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, family {m.get('cpu_family', '?')} model "
        cpu += f"{m.get('cpu_model', '?')} ({m.get('cpu_capability', '?')})"
        for precision, x in sorted(r.get("precisions", {}).items()):
            ratio = x.get("achieved_over_ceiling")
            rows.append(
                [
                    cpu,
                    precision,
                    f"{x['served_clips_per_s']:.2f}",
                    f"{x['model_only_clips_per_s']:.2f}",
                    "-" if ratio is None else f"{ratio:.2f}",
                    r.get("date", "?"),
                ]
            )
    if not rows:
        return "No results recorded yet: run `make bench`.\n"
    head = ["CPU", "precision", "served clips/s (3 s)", "model-only clips/s", "achieved / ceiling", "measured"]
    return table(head, rows)


def diarization_figures(key: str | None) -> str:
    """``/diarize`` on conversations of held-out voices, from the shipped manifest's
    ``metrics.<key>`` (``diarization``: test voices; ``diarization_val``: validation voices)."""
    r = manifest()["metrics"].get(key or "diarization")
    if not r:
        command = f"python -m model.training.evaluate weights DATA --diarization --record {key}"
        return f"Not measured for these weights: `{command}`.\n"
    rows = []
    for kind in ("synthetic", "real"):
        if kind not in r:
            continue
        d, naming = r[kind], r[kind].get("naming") or {}
        rows.append(
            [
                f"{kind}: {d['conversations']} conversations, {d['seconds'] / 60:.1f} min",
                pct(d["der"]),
                f"{pct(d['missed'])} / {pct(d['false_alarm'])} / {pct(d['confusion'])}",
                pct(d["speaker_count_accuracy"], 0),
                pct(naming.get("enrolled_speech_named_right"), 1),
                pct(naming.get("other_speech_named"), 2)
                + ("" if "other_speech_misnamed" not in naming else f" / {pct(naming['other_speech_misnamed'], 2)}"),
            ]
        )
    head = ["voices (" + r.get("split", "?") + ")", "DER", "missed / false alarm / confusion", "count right",
            "enrolled speech named right", "others' speech named / while the named speaker is silent"]  # fmt: skip
    return table(head, rows) + f"\n`{r.get('command', '?')}`\n"


def enrolment_figures(_: str | None) -> str:
    """How much speech an enrolment needs, from the shipped manifest's ``metrics.enrolment``."""
    r = manifest()["metrics"].get("enrolment")
    if not r:
        return "Not measured for these weights: `python -m model.training.enrolment weights DATA --record enrolment`.\n"
    kinds = [k for k in ("synthetic", "real") if r.get(k, {}).get("rows")]
    lengths = [row["enrolled_s"] for row in r[kinds[0]]["rows"]] if kinds else []
    rows = []
    for i, seconds in enumerate(lengths):
        rows.append([f"{seconds:g} s"] + [pct(r[k]["rows"][i]["named_right"], 1) for k in kinds])
    head = ["speech enrolled"] + [f"{k} ({r[k]['voices']} voices): probes named right" for k in kinds]
    shortest = r.get("min_enrol_speech_s")
    return (
        table(head, rows)
        + f"\nShortest enrolment within {100 * r['tolerance']:.0f} point of the longest: {shortest} s. "
        + f"`{r.get('command', '?')}`\n"
    )


RENDERERS: dict[str, Callable[[str | None], str]] = {
    "diarization-figures": diarization_figures,
    "enrolment-figures": enrolment_figures,
    "weights-figures": weights_figures,
    "history-figures": history_figures,
    "bench-figures": bench_figures,
}


def render(text: str) -> str:
    def fill(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in RENDERERS:
            raise ValueError(f"unknown rendered block {name!r}")
        return match.group(1) + RENDERERS[name](match["arg"]) + match.group(5)

    return BLOCK.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python docs/render.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block differs")
    args = parser.parse_args(argv)
    stale = []
    for path in DOCS:
        text = path.read_text()
        new = render(text)
        if new != text:
            stale.append(path.relative_to(ROOT))
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"rendered blocks differ from `make docs` in: {', '.join(map(str, stale))}", file=sys.stderr)
        return 1
    verb = "differ" if args.check else "changed"
    print(f"{len(DOCS)} files, {len(stale)} {verb}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
