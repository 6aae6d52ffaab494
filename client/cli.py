"""``python -m client``: embed, classify or identify files and folders; verify two clips; enrol.

    python -m client embed FILES_OR_DIRS --url URL --out out.parquet|out.jsonl|out.npy
    python -m client classify FILES_OR_DIRS --url URL --out out.jsonl
    python -m client identify FILES_OR_DIRS --url URL --out out.jsonl
    python -m client verify A B --url URL
    python -m client enrol NAME FILES_OR_DIRS --url URL [--metadata JSON]
    python -m client diarize FILES_OR_DIRS --url URL --out out.rttm|out.jsonl [--identify] [--num-speakers N]

Folders are walked for audio files (by extension; files named on the command line are always
sent). Every file gets one row: its result, or its error in the ``error`` column (the run goes
on). Up to ``--concurrency`` requests are in flight; a 503 is retried after the service's
Retry-After. Rows are written as they come (a ``.jsonl`` output directly, a ``.parquet`` or
``.npy`` output through ``OUT.partial.jsonl``, turned into the final file at the end), so an
interrupted run resumes: run the same command again and files already in the output are skipped.
Exit status 0 when every file succeeded, 1 when some failed (their rows say why), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from client.api import AsyncClient, Client
from client.results import Classification, Diarization, Embedding, Identification, ServiceError, rttm_lines

AUDIO_SUFFIXES = frozenset(
    [
        ".wav",
        ".wave",
        ".flac",
        ".mp3",
        ".ogg",
        ".oga",
        ".opus",
        ".webm",
        ".m4a",
        ".mp4",
        ".aac",
        ".wma",
        ".aif",
        ".aiff",
        ".au",
        ".amr",
        ".3gp",
        ".caf",
        ".mka",
    ]
)
FORMATS = (".jsonl", ".parquet", ".npy", ".rttm")


def find_audio(paths: Iterable[Path], suffixes: frozenset[str] = AUDIO_SUFFIXES) -> list[Path]:
    """Files named directly, and audio files under the folders named, in a stable order."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(
                sorted(
                    p
                    for p in path.rglob("*")
                    if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith(".")
                )
            )
        elif path.exists():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return list(dict.fromkeys(found))


class Output:
    """Rows keyed by path, written as they come and read back on resume."""

    def __init__(self, path: Path) -> None:
        if path.suffix not in FORMATS:
            raise ValueError(f"{path}: the output must end in one of {', '.join(FORMATS)}")
        self.path = path
        self.journal = path if path.suffix == ".jsonl" else path.with_name(path.name + ".partial.jsonl")

    def done(self) -> dict[str, dict[str, Any]]:
        rows: dict[str, dict[str, Any]] = {}
        if self.path != self.journal and self.path.exists():
            rows.update((r["path"], r) for r in read_rows(self.path))
        if self.journal.exists():
            rows.update((r["path"], r) for r in read_jsonl(self.journal))
        return rows

    def open(self) -> None:
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        if self.journal.exists():  # a run killed mid-line leaves a partial last line: drop it
            text = self.journal.read_bytes()
            if text and not text.endswith(b"\n"):
                self.journal.write_bytes(text[: text.rfind(b"\n") + 1])
        self.file = self.journal.open("a", encoding="utf-8")

    def append(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def finish(self) -> None:
        self.file.close()
        if self.path == self.journal:
            return
        rows = list(self.done().values())
        tmp = self.path.with_name(self.path.name + ".tmp")
        write_rows(tmp, rows, self.path.suffix)
        os.replace(tmp, self.path)
        self.journal.unlink()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by an interrupted run
    return rows


def read_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    import numpy as np

    table = np.load(path, allow_pickle=False)
    return [
        {
            "path": str(r["path"]),
            "embedding": None if r["error"] else r["embedding"].tolist(),
            "duration_s": None if r["error"] else float(r["duration_s"]),
            "error": str(r["error"]) or None,
        }
        for r in table
    ]


def write_rows(path: Path, rows: list[dict[str, Any]], suffix: str) -> None:
    if suffix == ".rttm":
        path.write_text("".join(rttm_of(r) for r in rows if not r.get("error")), encoding="utf-8")
        return
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
        return
    import numpy as np

    dim = next((len(r["embedding"]) for r in rows if r.get("embedding")), 0)
    longest = max([1, *(len(r["path"]) for r in rows)])
    longest_error = max([1, *(len(r["error"] or "") for r in rows)])
    dtype = [("path", f"U{longest}"), ("embedding", "f4", (dim,)), ("duration_s", "f4"), ("error", f"U{longest_error}")]
    table = np.zeros(len(rows), dtype=dtype)
    for i, r in enumerate(rows):
        table[i]["path"] = r["path"]
        table[i]["error"] = r["error"] or ""
        if r.get("embedding"):
            table[i]["embedding"] = r["embedding"]
            table[i]["duration_s"] = r["duration_s"]
        else:
            table[i]["embedding"] = np.nan
            table[i]["duration_s"] = np.nan
    with path.open("wb") as f:  # np.save on a name adds .npy to a .tmp name
        np.save(f, table, allow_pickle=False)


def embed_row(r: Embedding) -> dict[str, Any]:
    return {"embedding": r.vector, "duration_s": r.duration_s}


def classify_row(r: Classification) -> dict[str, Any]:
    return {
        "label": r.label,
        "score": r.score,
        "known": r.known,
        "known_score": r.known_score,
        "probabilities": r.probabilities,
        "duration_s": r.duration_s,
    }


def identify_row(r: Identification) -> dict[str, Any]:
    best = r.speaker
    return {
        "speaker_id": best.id if best else None,
        "speaker_name": best.name if best else None,
        "score": r.matches[0].score if r.matches else None,
        "matches": [{"id": m.id, "name": m.name, "score": m.score} for m in r.matches],
    }


def diarize_row(r: Diarization) -> dict[str, Any]:
    return {
        "duration": r.duration,
        "speakers": [
            {
                "label": s.label,
                "speech_seconds": s.speech_seconds,
                "name": s.match.name if s.match else None,
                "id": s.match.id if s.match else None,
            }
            for s in r.speakers
        ],
        "segments": [{"start": t.start, "end": t.end, "speaker": t.speaker} for t in r.segments],
    }


def rttm_of(row: dict[str, Any]) -> str:
    """A diarize row as RTTM lines: the file's stem as its id, enrolled names where matched."""
    names = {s["label"]: s["name"] or s["label"] for s in row["speakers"]}
    return rttm_lines(Path(row["path"]).stem, [(t["start"], t["end"], names[t["speaker"]]) for t in row["segments"]])


EMPTY: dict[str, dict[str, Any]] = {
    "embed": {"embedding": None, "duration_s": None},
    "classify": dict.fromkeys(["label", "score", "known", "known_score", "probabilities", "duration_s"]),
    "identify": {"speaker_id": None, "speaker_name": None, "score": None, "matches": None},
    "diarize": {"duration": None, "speakers": None, "segments": None},
}


def request_for(args: argparse.Namespace, http: AsyncClient) -> Callable[[Path], Awaitable[dict[str, Any]]]:
    async def one(path: Path) -> dict[str, Any]:
        if args.command == "embed":
            return embed_row(await http.embed(path, normalize=args.normalize))
        if args.command == "classify":
            return classify_row(await http.classify(path, top_k=args.top_k))
        if args.command == "diarize":
            found = await http.diarize(path, args.num_speakers, args.min_speakers, args.max_speakers, args.identify)
            return diarize_row(found)
        return identify_row(await http.identify(path, top_k=args.top_k))

    return one


async def run_files(args: argparse.Namespace, files: list[Path], output: Output) -> int:
    """Send ``files`` with bounded concurrency, one row each; returns how many failed."""
    failed = 0
    queue: asyncio.Queue[Path] = asyncio.Queue()
    for f in files:
        queue.put_nowait(f)
    bar = tqdm(total=len(files), unit="file", disable=args.no_progress or None, file=sys.stderr)
    async with AsyncClient(args.url, args.api_key, args.timeout, args.retries) as http:
        one = request_for(args, http)

        async def worker() -> None:
            nonlocal failed
            while not queue.empty():
                path = queue.get_nowait()
                row: dict[str, Any] = {"path": str(path), **EMPTY[args.command], "error": None}
                try:
                    row.update(await one(path))
                except ServiceError as exc:
                    row["error"] = f"{exc.code}: {exc.message}" + (f" (HTTP {exc.status})" if exc.status else "")
                except OSError as exc:
                    row["error"] = f"unreadable: {exc}"
                failed += row["error"] is not None
                if row["error"] is not None:
                    tqdm.write(f"{path}: {row['error']}", file=sys.stderr)
                output.append(row)
                bar.update(1)

        await asyncio.gather(*(worker() for _ in range(max(1, args.concurrency))))
    bar.close()
    return failed


def many(args: argparse.Namespace) -> int:
    output = Output(args.out)
    if args.command != "embed" and args.out.suffix == ".npy":
        raise ValueError(".npy holds embeddings only; write classify and identify rows to .jsonl or .parquet")
    if (args.command == "diarize") != (args.out.suffix == ".rttm") and args.out.suffix != ".jsonl":
        raise ValueError("diarize writes .rttm or .jsonl; .rttm holds diarize turns only")
    files = find_audio(args.paths)
    done = output.done()
    todo = [f for f in files if str(f) not in done]
    if done:
        print(f"resuming: {len(files) - len(todo)} of {len(files)} files already in {args.out}", file=sys.stderr)
    output.open()
    try:
        failed = asyncio.run(run_files(args, todo, output))
    except KeyboardInterrupt:
        print(f"interrupted; run the same command again to resume ({output.journal})", file=sys.stderr)
        return 130
    output.finish()
    failed_before = sum(1 for f in files if str(f) in done and done[str(f)].get("error"))
    print(f"{len(files)} files, {failed + failed_before} failed -> {args.out}", file=sys.stderr)
    return 1 if failed + failed_before else 0


def single(args: argparse.Namespace) -> int:
    with Client(args.url, args.api_key, args.timeout, args.retries) as http:
        if args.command == "verify":
            v = http.verify(args.a, args.b)
            out: dict[str, Any] = {
                "score": v.score,
                "cosine": v.cosine,
                "score_kind": v.score_kind,
                "same_speaker": v.same_speaker,
                "threshold": v.threshold,
            }
        else:
            metadata = json.loads(args.metadata) if args.metadata else None
            s = http.enrol(args.name, find_audio(args.paths), metadata)
            out = {"id": s.id, "name": s.name, "clips": s.clips, "seconds": s.seconds}
    print(json.dumps(out))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m client", description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("VOICE_EMBED_URL", "http://localhost:8000"))
    common.add_argument(
        "--api-key", default=os.environ.get("VOICE_EMBED_API_KEY"), help="or VOICE_EMBED_API_KEY in the environment"
    )
    common.add_argument("--retries", type=int, default=5, help="retries of a 503 (after its Retry-After) and more")
    common.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    common.add_argument("--no-progress", action="store_true", help="no progress bar")
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("embed", "embeddings"), ("classify", "classes"), ("identify", "enrolled speakers")):
        cmd = sub.add_parser(name, parents=[common], help=f"{text} of files and folders, one row per file")
        cmd.add_argument("paths", nargs="+", type=Path)
        cmd.add_argument("--out", type=Path, required=True, help="out.jsonl, out.parquet or out.npy (embed only)")
        cmd.add_argument("--concurrency", type=int, default=4, help="requests in flight")
        if name == "embed":
            cmd.add_argument("--normalize", action="store_true", help="L2-normalised embeddings")
        else:
            cmd.add_argument("--top-k", type=int, default=3 if name == "classify" else 5)
    diarize = sub.add_parser("diarize", parents=[common], help="who spoke when in each recording")
    diarize.add_argument("paths", nargs="+", type=Path)
    diarize.add_argument("--out", type=Path, required=True, help="out.rttm (NIST RTTM) or out.jsonl (a row a file)")
    diarize.add_argument("--concurrency", type=int, default=1, help="recordings in flight")
    diarize.add_argument("--num-speakers", type=int, help="how many speakers there are, if known")
    diarize.add_argument("--min-speakers", type=int)
    diarize.add_argument("--max-speakers", type=int)
    diarize.add_argument("--identify", action="store_true", help="name speakers from the enrolled profiles")
    verify = sub.add_parser("verify", parents=[common], help="are two clips the same voice?")
    verify.add_argument("a", type=Path)
    verify.add_argument("b", type=Path)
    enrol = sub.add_parser("enrol", parents=[common], help="enrol a speaker from clips")
    enrol.add_argument("name")
    enrol.add_argument("paths", nargs="+", type=Path)
    enrol.add_argument("--metadata", help="a JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return many(args) if args.command in EMPTY else single(args)
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
