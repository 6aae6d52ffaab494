"""Evaluate a weights directory on any labelled audio folder.

    python -m model.training.evaluate WEIGHTS_DIR DATA_DIR [--split test|val|train|all] [--json]
        [--backend torch|openvino|auto] [--precision auto|fp32|bf16|int8] [--channels-last] [--parity]
    python -m model.training.evaluate WEIGHTS_DIR DATA_DIR --open-set [--split open-test|open-val]

Prints accuracy, per-class accuracy, same/different-voice EER and the confusion matrix.
``--open-set`` evaluates the embedding on voices held out of training (default: the open-set test
voices): EER over all pairs, minDCF, leave-one-out nearest-centroid accuracy, the same per
recording condition, and, for weights with class centroids, the share of those clips flagged as
none of the classes next to the share of the classes' own test clips flagged.
``--parity`` also runs the plain fp32 model on the split (with ``--open-set``, the open-set voices)
and reports how often the chosen execution's top-1 agrees with it, the cosine between their
embeddings and the EER with each (e.g. ``--precision int8 --parity``).
``--record KEY`` also writes the result into WEIGHTS_DIR's manifest under ``metrics.KEY`` (dots
nest: ``unseen_conditions.noise_hum``), with the command that measured it, through
``model.weights.write_manifest``, so that the manifest's figures are measured, never typed in.
The tensors, and so the weights' sha256, do not change.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from model.diarize import DiarizeConfig
from model.runtime import BACKENDS, PRECISIONS, EmbeddingModel, load
from model.training.corpus import PROBES
from model.training.data import Dataset, Item, load_waves, scan
from model.training.diarization import evaluate_diarization, format_diarization
from model.training.metrics import cross_condition, equal_error_rate, open_set_report, summarise
from model.training.provenance import command_line
from model.training.teachers import SAMPLE_RATE, TEACHERS, Teacher, load_teacher
from model.weights import WeightsError, read, write_manifest

log = logging.getLogger(__name__)


def load_split(model: EmbeddingModel, data_dir: Path, split: str) -> tuple[list[torch.Tensor], list[int]]:
    dataset = scan(data_dir, labels=None)
    unknown = sorted(set(dataset.labels) - set(model.labels))
    if unknown:
        raise ValueError(f"{data_dir}: classes the model does not know: {', '.join(unknown)}")
    items = dataset.items if split == "all" else dataset.split(split)
    if not items:
        raise ValueError(f"{data_dir}: no clips in split {split!r}")
    waves = load_waves(items, model.sample_rate, f"loading {split}")
    return waves, [model.labels.index(dataset.labels[it.label]) for it in items]


@torch.inference_mode()
def evaluate(model: EmbeddingModel, data_dir: Path, split: str = "test") -> dict[str, Any]:
    waves, labels = load_split(model, data_dir, split)
    results = [model.infer(w) for w in waves]
    return summarise(
        torch.stack([r.logits for r in results]),
        torch.stack([r.embedding for r in results]),
        torch.tensor(labels),
        model.labels,
    )


@torch.inference_mode()
def parity(
    model: EmbeddingModel, reference: EmbeddingModel, waves: list[torch.Tensor], voices: list[str] | None = None
) -> dict[str, Any]:
    """How closely ``model`` (int8, bf16, channels-last, ...) follows ``reference`` (fp32) on
    ``waves``: top-1 agreement, agreement of /classify's ``known`` flag, the cosine between their
    embeddings (minimum, 1st percentile, share at or above 0.995 and 0.99) and the
    same/different-voice EER over all pairs of the clips (``voices`` says whose each clip is)
    with each, and its change in points."""
    fast = [model.infer(w) for w in waves]
    ref = [reference.infer(w) for w in waves]
    agree = [int(f.logits.argmax()) == int(r.logits.argmax()) for f, r in zip(fast, ref, strict=True)]
    known = [
        (model.nearest_class(f.embedding), reference.nearest_class(r.embedding)) for f, r in zip(fast, ref, strict=True)
    ]
    cos = torch.tensor(
        [float(F.cosine_similarity(f.embedding, r.embedding, dim=0)) for f, r in zip(fast, ref, strict=True)]
    )
    report: dict[str, Any] = {
        "execution": {"backend": model.backend, "precision": model.precision, "channels_last": model.channels_last},
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "clips": len(waves),
        "top1_agreement": sum(agree) / len(agree),
        "min_cosine": float(cos.min()),
        "p1_cosine": float(torch.quantile(cos, 0.01)),
        "mean_cosine": float(cos.mean()),
        "share_cosine_at_least_0995": float((cos >= 0.995).float().mean()),
        "share_cosine_at_least_099": float((cos >= 0.99).float().mean()),
    }
    if all(a is not None and b is not None for a, b in known):  # weights with class centroids
        report["known_agreement"] = sum(a[2] == b[2] for a, b in known if a and b) / len(known)
    names = sorted(set(voices or []))
    if voices and len(names) < len(voices):  # some voice has two clips: there are same-voice pairs
        labels = torch.tensor([names.index(v) for v in voices])
        eer_model = equal_error_rate(torch.stack([f.embedding for f in fast]), labels)[0]
        eer_ref = equal_error_rate(torch.stack([r.embedding for r in ref]), labels)[0]
        report |= {
            "voices": len(names),
            "eer": eer_model,
            "eer_fp32": eer_ref,
            "eer_change_points": 100 * (eer_model - eer_ref),
        }
    return report


def parity_items(data_dir: Path, split: str) -> list[Item]:
    items = scan(data_dir).split(split)
    if not items:
        raise ValueError(f"{data_dir}: no clips in split {split!r}")
    return items


@torch.inference_mode()
def embed_split(
    model: EmbeddingModel, data_dir: Path, split: str, dataset: Dataset | None = None
) -> tuple[list[Item], torch.Tensor]:
    """A split's clips and their embeddings, as /embed computes them; ValueError for an empty split.
    ``dataset``: ``scan(data_dir)``, when already made."""
    items = (dataset or scan(data_dir)).split(split)
    if not items:
        raise ValueError(f"{data_dir}: no clips in split {split!r} (make the corpus with --open-per-voice)")
    waves = load_waves(items, model.sample_rate, f"loading {split}")
    return items, torch.stack([model.infer(w).embedding for w in waves])


def probe_name(conditions: dict[str, Any]) -> str | None:
    """Which of the corpus's probe conditions (``model.training.corpus.PROBES``) a held-out real
    clip was made under; None for other conditions."""
    return next((name for name, c in PROBES.items() if c == conditions), None)


def real_report(emb: torch.Tensor, items: list[Item]) -> dict[str, Any]:
    """The held-out real speakers' trials, by cosine: their clips as recorded among themselves (all
    pairs: EER, minDCF, leave-one-out centroid accuracy), the same within each source, and the clips
    as recorded enrolled against each probe condition (telephone, codecs, noise, reverberation:
    ``model.metrics.cross_condition``)."""
    voices, segments = [it.voice for it in items], [it.segment for it in items]
    clean = [i for i, it in enumerate(items) if not it.conditions]

    def figures(idx: list[int]) -> dict[str, Any]:
        r = open_set_report(emb[idx], [voices[i] for i in idx], segments=[segments[i] for i in idx])
        keep = ("clips", "voices", "min_clips_per_voice", "eer", "min_dcf", "centroid_accuracy")
        return {k: r[k] for k in keep}

    if len({voices[i] for i in clean}) < 2:
        raise ValueError("the real speakers' report needs two speakers with clips as recorded")
    report: dict[str, Any] = {"score": "cosine", "clean": figures(clean), "by_source": {}, "probes": {}}
    for source in sorted({items[i].source for i in clean}):
        idx = [i for i in clean if items[i].source == source]
        if len({voices[i] for i in idx}) >= 2:
            report["by_source"][source] = figures(idx)
    for name in PROBES:
        probe = [i for i, it in enumerate(items) if it.conditions and probe_name(it.conditions) == name]
        if probe:
            report["probes"][name] = cross_condition(emb, voices, segments, clean, probe)
    return report


def open_set_figures(
    items: list[Item],
    emb: torch.Tensor,
    norm_statistics: Callable[[torch.Tensor], torch.Tensor | None],
    known: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The open-set figures of held-out clips: the synthetic voices' at the top level (by the
    weights' score: ``norm_statistics`` gives adaptive s-norm's statistics, or None for the cosine),
    the real speakers' under ``real`` (:func:`real_report`); with ``known`` (a bool per embedding:
    /classify's ``known``), the share of each flagged as none of the classes."""
    synthetic = [i for i, it in enumerate(items) if not it.real]
    real = [i for i, it in enumerate(items) if it.real]
    report: dict[str, Any] = {}
    if synthetic:
        synth_items, synth_emb = [items[i] for i in synthetic], emb[synthetic]
        report = open_set_report(
            synth_emb, [it.voice for it in synth_items], [it.conditions for it in synth_items],
            statistics=norm_statistics(synth_emb),
        )  # fmt: skip
    if len({items[i].voice for i in real if not items[i].conditions}) < 2:
        real = []  # no trials without two speakers
    if real:
        report["real"] = real_report(emb[real], [items[i] for i in real])
    if known is not None:
        flagged = ~known(emb)
        if synthetic:
            report["flagged_unknown"] = float(flagged[synthetic].float().mean())
        if real:
            report["real"]["flagged_unknown"] = float(flagged[real].float().mean())
    return report


@torch.inference_mode()
def evaluate_open_set(
    model: EmbeddingModel,
    data_dir: Path,
    split: str = "open-test",
    embedded: tuple[list[Item], torch.Tensor] | None = None,
    teachers: list[Teacher] | None = None,
) -> dict[str, Any]:
    """The open-set report of a split (:func:`open_set_figures`; ``embedded``: its
    :func:`embed_split`, when already made), the share of the classes' own clips flagged as none
    of them, and with ``teachers``, theirs on the same trials under ``teachers``."""
    dataset = scan(data_dir)  # once, for the split and the known classes' clips
    items, emb = embedded or embed_split(model, data_dir, split, dataset)
    has_known = model.nearest_class(emb[0]) is not None
    report = open_set_figures(items, emb, model.norm_statistics, _known_many(model) if has_known else None)
    report["split"] = split
    if has_known:
        known_split = {"open-test": "test", "open-val": "val"}[split]
        known_items = dataset.split(known_split)
        if known_items:
            known_waves = load_waves(known_items, model.sample_rate, f"loading {known_split}")
            flagged = [not _known(model, model.infer(w).embedding) for w in known_waves]
            report["classes_flagged_unknown"] = {
                "split": known_split,
                "clips": len(flagged),
                "share": sum(flagged) / len(flagged),
            }
    if teachers:
        synthetic = [i for i, it in enumerate(items) if not it.real]
        real = [i for i, it in enumerate(items) if it.real]
        waves = load_waves(items, SAMPLE_RATE, f"loading {split} for the teachers")
        report["teachers"] = {}
        for teacher in teachers:
            t_emb = teacher.embed(waves)
            theirs: dict[str, Any] = {"dim": teacher.dim, "score": "cosine"}
            if synthetic:
                r = open_set_report(t_emb[synthetic], [items[i].voice for i in synthetic])
                theirs["synthetic"] = {k: r[k] for k in ("eer", "min_dcf", "centroid_accuracy")}
            if real:
                theirs["real"] = real_report(t_emb[real], [items[i] for i in real])
            report["teachers"][teacher.name] = theirs
    return report


@torch.inference_mode()
def evaluate_identification(
    model: EmbeddingModel,
    data_dir: Path,
    split: str = "open-test",
    enrol_clips: int = 3,
    embedded: tuple[list[Item], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Open-set identification as the service's /identify does it, among the synthetic voices (at
    the top level) and among the real speakers (under ``real``) of the split: every other voice
    (sorted by name) is enrolled from its first ``enrol_clips`` clips (a real speaker's clips as
    recorded; voiceprint: the normalised sum of the clips' normalised embeddings); every clip of
    its other speech is identified against all voiceprints with the weights' threshold. Reports
    top-1 accuracy on the enrolled voices' other clips and the share of the never-enrolled voices'
    clips answered with no speaker. Only voices with more than ``enrol_clips`` clips of speech are
    enrolled; every voice not enrolled is a stranger. ``embedded``: the split's
    :func:`embed_split`, when made."""
    if model.manifest.verification_threshold is None:
        raise ValueError("these weights have no verification threshold")
    items, emb = embedded or embed_split(model, data_dir, split)
    emb = F.normalize(emb, dim=-1)
    synthetic = [i for i, it in enumerate(items) if not it.real]
    real = [i for i, it in enumerate(items) if it.real]
    report = _identify(model, emb, items, synthetic, enrol_clips) if synthetic else {}
    report["split"] = split
    if real:
        report["real"] = _identify(model, emb, items, real, enrol_clips)
    return report


def _identify(
    model: EmbeddingModel, emb: torch.Tensor, items: list[Item], group: list[int], enrol_clips: int
) -> dict[str, Any]:
    threshold = model.manifest.identify_threshold or model.manifest.verification_threshold
    assert threshold is not None
    trial = identification_trials(lambda a, b: model.verification_scores(a, b)[0], emb, items, group, enrol_clips)
    return {**trial.report(threshold), "threshold": threshold}


@dataclass
class IdentificationTrials:
    """/identify's protocol on held-out voices: each probe's scores against every voiceprint and
    which is its own, and each never-enrolled clip's best score."""

    enrolled: int
    strangers: int
    enrol_clips: int
    probe_scores: torch.Tensor  # (probes, voiceprints)
    probe_voice: torch.Tensor  # (probes,)
    stranger_best: torch.Tensor  # (never-enrolled clips,)

    def report(self, threshold: float) -> dict[str, Any]:
        hits = (
            self.probe_scores.argmax(-1) == self.probe_voice
            if len(self.probe_voice)
            else torch.zeros(0, dtype=torch.bool)
        )
        accepted = self.probe_scores.max(-1).values >= threshold if len(self.probe_voice) else hits
        rejected = self.stranger_best < threshold
        share = lambda x: float(x.float().mean()) if len(x) else None  # noqa: E731
        return {
            "enrolled_voices": self.enrolled,
            "enrol_clips": self.enrol_clips,
            "probe_clips": len(self.probe_voice),
            "top1_accuracy": share(hits),
            "identified": share(hits & accepted),
            "never_enrolled_voices": self.strangers,
            "never_enrolled_clips": len(self.stranger_best),
            "never_enrolled_answered_none": share(rejected),
        }


def identification_trials(
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    emb: torch.Tensor,
    items: list[Item],
    group: list[int],
    enrol_clips: int,
) -> IdentificationTrials:
    """Every other voice of ``group`` (sorted by name, among those with more than ``enrol_clips``
    clips of speech) enrolled from its first ``enrol_clips`` clips (a real speaker's clips as
    recorded; voiceprint: the normalised sum of the clips' normalised embeddings); its clips of
    other speech are probes, every clip of a voice not enrolled is a stranger. ``score(a, b)``: the
    verification scores (N, M) of rows of ``a`` against rows of ``b``."""
    emb = F.normalize(emb.float(), dim=-1)
    names = sorted({items[k].voice for k in group})
    speech = {v: len({items[k].segment or k for k in group if items[k].voice == v}) for v in names}
    enrolled = [v for v in names if speech[v] > enrol_clips][::2]
    prints, probes, voice_of = [], [], []
    for j, v in enumerate(enrolled):
        mine = [k for k in group if items[k].voice == v]
        enrol = [k for k in mine if not (items[k].real and items[k].conditions)][:enrol_clips]
        taken = {items[k].segment for k in enrol if items[k].segment}
        prints.append(F.normalize(emb[enrol].sum(0), dim=0))
        for k in mine:
            if k not in enrol and items[k].segment not in taken:
                probes.append(k)
                voice_of.append(j)
    strangers = [k for k in group if items[k].voice not in enrolled]
    if not prints:
        raise ValueError(f"no voice has more than {enrol_clips} clips of speech to enrol")
    scores = score(emb, torch.stack(prints))  # (clips, voiceprints)
    best = scores[strangers].max(-1).values if strangers else torch.zeros(0)
    probe_voice = torch.tensor(voice_of, dtype=torch.long)
    return IdentificationTrials(
        len(enrolled), len(names) - len(enrolled), enrol_clips, scores[probes], probe_voice, best
    )


def _known_many(model: EmbeddingModel) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda emb: torch.tensor([_known(model, e) for e in emb], dtype=torch.bool)


def _known(model: EmbeddingModel, embedding: torch.Tensor) -> bool:
    found = model.nearest_class(embedding)
    return found is not None and found[2]


RECORD_KEY = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*")


def check_record_key(key: str) -> None:
    if not RECORD_KEY.fullmatch(key):
        raise ValueError(f"--record {key!r}: want lower-case names joined by dots (unseen_conditions.noise_hum)")


def record(weights_dir: Path, key: str, summary: dict[str, Any], command: str) -> None:
    """Write ``summary`` (and ``command``) into the manifest of ``weights_dir`` at ``metrics.KEY``
    (dotted: nested), replacing what was there. ValueError for a malformed key, or one whose
    path runs through a figure that is not a table (``test_eer.x``)."""
    check_record_key(key)
    _, manifest = read(weights_dir)
    *parents, last = key.split(".")
    table = manifest.metrics
    for depth, name in enumerate(parents):
        table = table.setdefault(name, {})
        if not isinstance(table, dict):
            raise ValueError(f"--record {key!r}: metrics.{'.'.join(parents[: depth + 1])} is a figure, not a table")
    table[last] = {**summary, "command": command}
    write_manifest(weights_dir, manifest)
    log.info("recorded in %s: metrics.%s", weights_dir, key)


def _scale(r: dict[str, Any]) -> str:
    return "adaptive s-norm" if r.get("score") == "as-norm" else "cosine"


def format_open_set(r: dict[str, Any]) -> str:
    lines = []
    if "eer" in r:
        lines += [
            f"open-set split   {r['split']}: {r['clips']} clips of {r['voices']} synthetic voices never trained on "
            f"(at least {r['min_clips_per_voice']} per voice)",
            f"EER              {r['eer']:.4f} ({_scale(r)} threshold {r['eer_threshold']:.4f}), all pairs"
            + (f"; by the plain cosine {r['eer_cosine']:.4f}" if "eer_cosine" in r else ""),
            f"minDCF           {r['min_dcf']:.4f} (p_target {r['p_target']})",
            f"centroid acc.    {r['centroid_accuracy']:.4f} (leave-one-out nearest voice centroid)",
        ]
    if "flagged_unknown" in r:
        lines.append(f"flagged unknown  {r['flagged_unknown']:.4f} of these clips (none of the classes)")
    if "classes_flagged_unknown" in r:
        k = r["classes_flagged_unknown"]
        lines.append(f"                 {k['share']:.4f} of the classes' own {k['split']} clips ({k['clips']})")
    if "per_condition" in r:
        lines += ["", "per recording condition (EER: pairs with a clip in it; accuracy: its clips)"]
        for tag, row in r["per_condition"].items():
            eer = "n/a" if row["eer"] is None else f"{row['eer']:.4f}"
            lines.append(
                f"  {tag:<16} clips {row['clips']:>4}  EER {eer:>6}  centroid acc. {row['centroid_accuracy']:.4f}"
            )
    models = {"ours": r.get("real")} | {name: t.get("real") for name, t in r.get("teachers", {}).items()}
    models = {name: real for name, real in models.items() if real}
    if models:
        c = r["real"]["clean"]
        lines += [
            "",
            f"real speakers ({c['voices']} never trained on, {c['clips']} clips as recorded), by cosine: "
            "EER / centroid accuracy",
            "  " + " " * 34 + "".join(f"{name:>22}" for name in models),
        ]

        def row(label: str, pick: Any) -> str:
            cells = []
            for real in models.values():
                got = pick(real)
                cells.append("n/a" if got is None else f"{100 * got['eer']:.2f} % / {got['centroid_accuracy']:.3f}")
            return f"  {label:<34}" + "".join(f"{c:>22}" for c in cells)

        lines.append(row("as recorded, all pairs", lambda real: real["clean"]))
        for source in r["real"]["by_source"]:
            lines.append(row(f"  {source}", lambda real, s=source: real["by_source"].get(s)))
        for probe in r["real"]["probes"]:
            lines.append(row(f"enrol as recorded, {probe}", lambda real, p=probe: real["probes"].get(p)))
        if "flagged_unknown" in r["real"]:
            lines.append(f"  flagged unknown: {r['real']['flagged_unknown']:.4f} of the real speakers' clips")
    for name, t in r.get("teachers", {}).items():
        if "synthetic" in t:
            syn = t["synthetic"]
            lines.append(
                f"{name}: synthetic voices EER {100 * syn['eer']:.2f} % (cosine), "
                f"centroid accuracy {syn['centroid_accuracy']:.3f}"
            )
    return "\n".join(lines)


def format_report(summary: dict[str, Any], labels: list[str]) -> str:
    eer, threshold = summary["eer"], summary["eer_threshold"]
    eer_text = "n/a" if eer is None else f"{eer:.4f} (cosine threshold {threshold:.4f})"
    lines = [
        f"clips     {summary['clips']}",
        f"accuracy  {summary['accuracy']:.4f}",
        f"EER       {eer_text}",
        "",
        "per-class accuracy",
    ]
    for name, acc in summary["per_class_accuracy"].items():
        lines.append(f"  {name:<28} {'n/a' if acc is None else f'{acc:.4f}'}")
    width = max(4, *(len(str(v)) for row in summary["confusion_matrix"] for v in row))
    lines += ["", "confusion matrix (rows: true, columns: predicted, in label order)"]
    for name, row in zip(labels, summary["confusion_matrix"], strict=True):
        lines.append(f"  {name:<28} " + " ".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.training.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("weights_dir", type=Path)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument(
        "--split", help="test (default), val, train, all; with --open-set: open-test (default), open-val"
    )
    parser.add_argument("--open-set", action="store_true", help="the embedding on voices never trained on")
    parser.add_argument(
        "--identify", action="store_true", help="with --open-set: enrol 3 clips of every other voice, identify the rest"
    )
    parser.add_argument(
        "--teachers",
        nargs="*",
        choices=TEACHERS,
        help="with --open-set: the teachers on the same trials (make teachers)",
    )
    parser.add_argument(
        "--diarization",
        action="store_true",
        help="who spoke when, on conversations made of the open-set voices (open-test by default, or open-val)",
    )
    parser.add_argument("--conversations", type=int, default=20, help="with --diarization: how many of each kind")
    parser.add_argument("--seed", type=int, default=0, help="with --diarization: which conversations are made")
    parser.add_argument(
        "--merge-cosine", type=float, help="with --diarization: merge clusters nearer than this (default: /diarize's)"
    )
    parser.add_argument(
        "--cluster-window",
        type=float,
        nargs=2,
        metavar=("LENGTH_S", "HOP_S"),
        help="with --diarization: the windows that find the speakers (default /diarize's: 3 1.5; 1.5 0.75: one scale)",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--backend", default="torch", choices=list(BACKENDS))
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--parity", action="store_true", help="compare with the plain fp32 model")
    parser.add_argument(
        "--record", metavar="KEY", help="also write the result into WEIGHTS_DIR's manifest at metrics.KEY (dots nest)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.open_set = args.open_set or args.diarization
    split = args.split or ("open-test" if args.open_set else "test")
    allowed = ["open-test", "open-val"] if args.open_set else ["train", "val", "test", "all"]
    if split not in allowed:
        parser.error(f"--split must be one of {', '.join(allowed)}")
    args.split = split
    try:
        check_record_key(args.record or "ok")  # before the evaluation, not after it
    except ValueError as exc:
        parser.error(str(exc))
    try:
        model = load(args.weights_dir).configure(args.precision, args.channels_last, args.backend)
        if args.parity:
            items = parity_items(args.data_dir, split)
            waves = load_waves(items, model.sample_rate, f"loading {split}")
            summary = parity(model, load(args.weights_dir), waves, [it.voice for it in items])
            summary["split"] = split
        elif args.diarization:
            config = DiarizeConfig()
            if args.merge_cosine is not None:
                config = dataclasses.replace(config, merge_cosine=args.merge_cosine)
            if args.cluster_window:
                length, hop = args.cluster_window
                config = dataclasses.replace(config, cluster_window_s=length, cluster_hop_s=hop)
            items = scan(args.data_dir, model.labels).split(split)
            summary = evaluate_diarization(model, items, args.conversations, args.seed, config, progress=log.info)
            summary["split"] = split
        elif args.open_set and args.identify:
            summary = evaluate_identification(model, args.data_dir, split)
        elif args.open_set:
            teachers = [load_teacher(name) for name in args.teachers or []]
            summary = evaluate_open_set(model, args.data_dir, split, teachers=teachers)
        else:
            summary = evaluate(model, args.data_dir, args.split)
        if args.record:
            record(args.weights_dir, args.record, summary, command_line("model.training.evaluate", argv))
    except (WeightsError, ValueError, FileNotFoundError) as exc:
        log.error("error: %s", exc)
        return 2
    if args.json or args.parity or args.identify:
        text = json.dumps(summary, indent=2)
    elif args.diarization:
        text = format_diarization(summary)
    else:
        text = format_open_set(summary) if args.open_set else format_report(summary, model.labels)
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
