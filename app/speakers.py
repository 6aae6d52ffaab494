"""Enrolled speakers: profiles kept in SQLite (default) or PostgreSQL, searched exactly in memory.

A profile is the sum of its clips' L2-normalised embeddings (each clip counts once, whatever its
length) with its clip count; its voiceprint is that sum normalised. Only embeddings are stored,
never audio. Every profile records the sha256 of the weights that made it: a profile made with
other weights is stale and is never scored against the current model's embeddings.

Every write also bumps a change counter in the same transaction. Each replica keeps, per
namespace, a float32 matrix of the fresh voiceprints and reloads it when the counter it read on
its last request has moved, so an enrolment made through one replica is seen by every replica on
its next request.

SQL is parameterised; the schema is versioned (``schema_version``) and migrated at start-up, under
an advisory lock on PostgreSQL so replicas starting together do not race.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

# Each entry migrates the schema from version i to i + 1; {blob} and {real} are the dialect's types.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE speakers (
            id TEXT PRIMARY KEY,
            namespace TEXT NOT NULL,
            name TEXT NOT NULL,
            metadata TEXT NOT NULL,
            embedding_sum {blob} NOT NULL,
            clips INTEGER NOT NULL,
            seconds {real} NOT NULL,
            model_name TEXT NOT NULL,
            model_version TEXT NOT NULL,
            model_sha256 TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )""",
        "CREATE INDEX speakers_by_namespace ON speakers (namespace, created_at, id)",
        "CREATE TABLE changes (id INTEGER PRIMARY KEY, counter BIGINT NOT NULL)",
        "INSERT INTO changes (id, counter) VALUES (1, 0)",
    ],
    # seconds of speech the VAD found in a profile's clips; NULL for profiles enrolled before it was measured
    ["ALTER TABLE speakers ADD COLUMN speech_seconds {real}"],
]
TYPES = {"sqlite": {"blob": "BLOB", "real": "REAL"}, "postgresql": {"blob": "BYTEA", "real": "DOUBLE PRECISION"}}
COLUMNS = (
    "id, name, metadata, embedding_sum, clips, seconds, model_name, model_version, model_sha256, created_at, "
    "updated_at, speech_seconds"
)


class StoreUnavailableError(RuntimeError):
    """The database cannot be reached or opened."""


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


class Database(Protocol):
    dialect: str

    def transaction(self) -> Any: ...  # a context manager yielding a Cursor
    def close(self) -> None: ...


class SqliteDatabase:
    """One connection in WAL mode, used by one thread at a time; other processes on the same file
    wait for its write lock (busy timeout) instead of failing."""

    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._conn = sqlite3.connect(path, timeout=30.0, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._lock = threading.Lock()

    @contextmanager
    def transaction(self) -> Iterator[Cursor]:
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def close(self) -> None:
        self._conn.close()


class _PgCursor:
    """psycopg's cursor with SQLite's ``?`` placeholders (our SQL holds no literal '?')."""

    def __init__(self, cur: Any) -> None:
        self._cur = cur

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._cur.execute(sql.replace("?", "%s"), tuple(params))

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def fetchall(self) -> list[Any]:
        return list(self._cur.fetchall())

    @property
    def rowcount(self) -> int:
        return int(self._cur.rowcount)


class PostgresDatabase:
    """A psycopg 3 connection pool."""

    dialect = "postgresql"

    def __init__(self, url: str, connect_timeout_s: float, max_size: int = 4) -> None:
        from psycopg_pool import ConnectionPool

        self._pool = ConnectionPool(url, min_size=1, max_size=max_size, open=False, timeout=10.0)
        try:
            self._pool.open(wait=True, timeout=connect_timeout_s)
        except Exception as exc:
            self._pool.close()
            raise StoreUnavailableError(f"cannot connect to PostgreSQL: {exc}") from None

    @contextmanager
    def transaction(self) -> Iterator[Cursor]:
        with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            yield _PgCursor(cur)

    def close(self) -> None:
        self._pool.close()


def open_database(url: str | None, data_dir: Path, connect_timeout_s: float) -> Database:
    """``postgresql://...`` (waiting up to ``connect_timeout_s`` for the server), ``sqlite:///path``,
    or (no URL) an SQLite file under ``data_dir``."""
    if not url:
        return SqliteDatabase(data_dir / "speakers.sqlite3")
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(url, connect_timeout_s)
    if url.startswith("sqlite:///"):
        return SqliteDatabase(Path(url.removeprefix("sqlite:///")))
    raise StoreUnavailableError("DATABASE_URL must start with postgresql:// or sqlite:///")


def migrate(db: Database) -> int:
    """Bring the schema to the newest version; returns it."""
    types = TYPES[db.dialect]
    with db.transaction() as cur:
        if db.dialect == "postgresql":
            cur.execute("SELECT pg_advisory_xact_lock(?)", (0x766F6963,))  # one migrator at a time
        cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        cur.execute("SELECT version FROM schema_version")
        row = cur.fetchone()
        version = 0 if row is None else int(row[0])
        if row is None:
            cur.execute("INSERT INTO schema_version (version) VALUES (0)")
        for target in range(version, len(MIGRATIONS)):
            for statement in MIGRATIONS[target]:
                cur.execute(statement.format(**types))
            cur.execute("UPDATE schema_version SET version = ?", (target + 1,))
            log.info("speaker store schema migrated to version %d", target + 1)
    return len(MIGRATIONS)


@dataclass
class Profile:
    id: str
    name: str
    metadata: dict[str, Any]
    embedding_sum: np.ndarray  # float32 (E,), the sum of the clips' normalised embeddings
    clips: int
    seconds: float
    model_name: str
    model_version: str
    model_sha256: str
    created_at: str
    updated_at: str
    speech_seconds: float | None = None  # None: enrolled before speech was measured

    @property
    def voiceprint(self) -> np.ndarray:
        return normalise(self.embedding_sum)


def normalise(v: np.ndarray) -> np.ndarray:
    return (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)


def _profile(row: Sequence[Any]) -> Profile:
    return Profile(
        id=row[0],
        name=row[1],
        metadata=json.loads(row[2]),
        embedding_sum=np.frombuffer(bytes(row[3]), dtype=np.float32).copy(),
        clips=int(row[4]),
        seconds=float(row[5]),
        model_name=row[6],
        model_version=row[7],
        model_sha256=row[8],
        created_at=row[9],
        updated_at=row[10],
        speech_seconds=None if row[11] is None else float(row[11]),
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def encode_cursor(profile: Profile) -> str:
    return base64.urlsafe_b64encode(json.dumps([profile.created_at, profile.id]).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        created_at, pid = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error, TypeError) as exc:
        raise ValueError("cursor is not one this service issued") from exc
    if not isinstance(created_at, str) or not isinstance(pid, str):
        raise ValueError("cursor is not one this service issued")
    return created_at, pid


@dataclass
class Model:
    """The weights whose embeddings are being stored or compared."""

    name: str
    version: str
    sha256: str


@dataclass
class Index:
    """One namespace's fresh voiceprints as a matrix, and how many stale profiles it left out."""

    ids: list[str]
    names: list[str]
    matrix: np.ndarray  # (N, E) float32, rows normalised
    stale: int
    # what scoring needs of each voiceprint (adaptive s-norm statistics), made by the first
    # search under a model and kept while the index is: key (the scoring's identity) -> (N, 2)
    statistics: dict[Any, np.ndarray | None] = field(default_factory=dict)
    # a fingerprint of each voiceprint (its dot product with a fixed random vector), and what the
    # index this one replaced knew (ids, fingerprints, statistics): after a write, only the
    # profiles it added or changed need their statistics made again
    fingerprint: np.ndarray = field(default_factory=lambda: np.zeros(0))
    earlier: tuple[list[str], np.ndarray, dict[Any, np.ndarray | None]] | None = None

    def statistics_for(self, key: Any, compute: Callable[[np.ndarray], np.ndarray | None]) -> np.ndarray | None:
        """The voiceprints' statistics under the scoring ``key``: made by ``compute`` (rows ->
        (rows, 2), or None where scores need none) once, reusing those of unchanged profiles from
        the index this one replaced. Blocking: call it from a worker thread."""
        if key not in self.statistics:
            self.statistics[key] = self._reuse(key, compute) if self.ids else None
            self.earlier = None
        return self.statistics[key]

    def _reuse(self, key: Any, compute: Callable[[np.ndarray], np.ndarray | None]) -> np.ndarray | None:
        before = None if self.earlier is None else self.earlier[2].get(key)
        if self.earlier is None or before is None:
            return compute(self.matrix)
        ids, fingerprint = self.earlier[0], self.earlier[1]
        position = {pid: i for i, pid in enumerate(ids)}
        where = np.fromiter((position.get(pid, -1) for pid in self.ids), dtype=np.int64, count=len(self.ids))
        same = where >= 0
        same[same] = fingerprint[where[same]] == self.fingerprint[same]
        out = np.empty((len(self.ids), 2), dtype=np.float32)
        out[same] = before[where[same]]
        if not same.all():
            fresh = compute(self.matrix[~same])
            if fresh is None:
                return None
            out[~same] = fresh
        return out


FINGERPRINT = np.random.default_rng(0).standard_normal(4096)  # Index.fingerprint's fixed vector


class SpeakerStore:
    """Profiles by namespace. Blocking: call it from a worker thread."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._indexes: dict[tuple[str, str], Index] = {}
        self._retired: dict[tuple[str, str], tuple[list[str], np.ndarray, dict[Any, np.ndarray | None]]] = {}
        self._seen_counter: int | None = None
        self._index_lock = threading.Lock()

    def close(self) -> None:
        self.db.close()

    @staticmethod
    def _bump(cur: Cursor) -> None:
        cur.execute("UPDATE changes SET counter = counter + 1 WHERE id = 1")

    def create(
        self,
        namespace: str,
        name: str,
        metadata: dict[str, Any],
        vectors: list[np.ndarray],
        seconds: float,
        model: Model,
        speech_seconds: float | None = None,
    ) -> Profile:
        profile = self._new(name, metadata, vectors, seconds, model, _now(), speech_seconds)
        with self.db.transaction() as cur:
            self._insert(cur, namespace, profile)
            self._bump(cur)
        return profile

    @staticmethod
    def _new(
        name: str,
        metadata: dict[str, Any],
        vectors: list[np.ndarray],
        seconds: float,
        model: Model,
        now: str,
        speech_seconds: float | None = None,
    ) -> Profile:
        total = np.sum([normalise(v) for v in vectors], axis=0).astype(np.float32)
        return Profile(
            uuid.uuid4().hex, name, metadata, total, len(vectors), seconds,
            model.name, model.version, model.sha256, now, now, speech_seconds,
        )  # fmt: skip

    @staticmethod
    def _insert(cur: Cursor, namespace: str, p: Profile) -> None:
        cur.execute(
            f"INSERT INTO speakers (namespace, {COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                namespace, p.id, p.name, json.dumps(p.metadata), p.embedding_sum.tobytes(), p.clips, p.seconds,
                p.model_name, p.model_version, p.model_sha256, p.created_at, p.updated_at, p.speech_seconds,
            ),
        )  # fmt: skip

    def create_many(
        self, namespace: str, entries: list[tuple[str, dict[str, Any], list[np.ndarray], float]], model: Model
    ) -> int:
        """Bulk import in one transaction: ``(name, metadata, clip embeddings, seconds)`` each."""
        now = _now()
        with self.db.transaction() as cur:
            for name, metadata, vectors, seconds in entries:
                self._insert(cur, namespace, self._new(name, metadata, vectors, seconds, model, now))
            self._bump(cur)
        return len(entries)

    def _select(self, cur: Cursor, namespace: str, pid: str, lock: bool = False) -> Profile | None:
        suffix = " FOR UPDATE" if lock and self.db.dialect == "postgresql" else ""
        cur.execute(f"SELECT {COLUMNS} FROM speakers WHERE namespace = ? AND id = ?{suffix}", (namespace, pid))
        row = cur.fetchone()
        return None if row is None else _profile(row)

    def get(self, namespace: str, pid: str) -> Profile | None:
        with self.db.transaction() as cur:
            return self._select(cur, namespace, pid)

    def add_clips(
        self,
        namespace: str,
        pid: str,
        vectors: list[np.ndarray],
        seconds: float,
        model: Model,
        speech_seconds: float | None = None,
    ) -> Profile:
        """Raises KeyError (no such profile) or ValueError (made with other weights). The profile's
        speech stays unknown (None) if it or the new clips' is."""
        with self.db.transaction() as cur:
            profile = self._select(cur, namespace, pid, lock=True)
            if profile is None:
                raise KeyError(pid)
            if profile.model_sha256 != model.sha256:
                raise ValueError("the profile was made with other weights")
            profile.embedding_sum = profile.embedding_sum + np.sum([normalise(v) for v in vectors], axis=0)
            profile.embedding_sum = profile.embedding_sum.astype(np.float32)
            profile.clips += len(vectors)
            profile.seconds += seconds
            if profile.speech_seconds is None or speech_seconds is None:
                profile.speech_seconds = None
            else:
                profile.speech_seconds += speech_seconds
            profile.updated_at = _now()
            cur.execute(
                "UPDATE speakers SET embedding_sum = ?, clips = ?, seconds = ?, speech_seconds = ?, updated_at = ? "
                "WHERE namespace = ? AND id = ?",
                (
                    profile.embedding_sum.tobytes(), profile.clips, profile.seconds, profile.speech_seconds,
                    profile.updated_at, namespace, pid,
                ),
            )  # fmt: skip
            self._bump(cur)
        return profile

    def update(
        self, namespace: str, pid: str, name: str | None = None, metadata: dict[str, Any] | None = None
    ) -> Profile | None:
        with self.db.transaction() as cur:
            profile = self._select(cur, namespace, pid, lock=True)
            if profile is None:
                return None
            profile.name = profile.name if name is None else name
            profile.metadata = profile.metadata if metadata is None else metadata
            profile.updated_at = _now()
            cur.execute(
                "UPDATE speakers SET name = ?, metadata = ?, updated_at = ? WHERE namespace = ? AND id = ?",
                (profile.name, json.dumps(profile.metadata), profile.updated_at, namespace, pid),
            )
            self._bump(cur)
        return profile

    def delete(self, namespace: str, pid: str) -> bool:
        with self.db.transaction() as cur:
            cur.execute("DELETE FROM speakers WHERE namespace = ? AND id = ?", (namespace, pid))
            deleted = cur.rowcount > 0
            if deleted:
                self._bump(cur)
        return deleted

    def page(self, namespace: str, limit: int, cursor: str | None) -> tuple[list[Profile], str | None]:
        """Profiles oldest first, ``limit`` at a time; the next page's cursor or None."""
        after = decode_cursor(cursor) if cursor else ("", "")
        with self.db.transaction() as cur:
            cur.execute(
                f"SELECT {COLUMNS} FROM speakers WHERE namespace = ? AND (created_at > ? OR "
                "(created_at = ? AND id > ?)) ORDER BY created_at, id LIMIT ?",
                (namespace, after[0], after[0], after[1], limit + 1),
            )
            rows = [_profile(r) for r in cur.fetchall()]
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, encode_cursor(rows[-1]) if more and rows else None

    def counter(self) -> int:
        with self.db.transaction() as cur:
            cur.execute("SELECT counter FROM changes WHERE id = 1")
            return int(cur.fetchone()[0])

    def index(self, namespace: str, model_sha256: str) -> Index:
        """The namespace's fresh voiceprints, reloaded when any replica has written since."""
        counter = self.counter()
        with self._index_lock:
            if counter != self._seen_counter:
                # keep what the old indexes knew of each voiceprint, not their matrices
                self._retired.update({k: (i.ids, i.fingerprint, i.statistics) for k, i in self._indexes.items()})
                self._indexes.clear()
                self._seen_counter = counter
            key = (namespace, model_sha256)
            if key not in self._indexes:
                index = self._load(namespace, model_sha256)
                index.earlier = self._retired.pop(key, None)
                self._indexes[key] = index
            return self._indexes[key]

    def _load(self, namespace: str, model_sha256: str) -> Index:
        with self.db.transaction() as cur:
            cur.execute(
                "SELECT id, name, embedding_sum, model_sha256 FROM speakers WHERE namespace = ? "
                "ORDER BY created_at, id",
                (namespace,),
            )
            rows = cur.fetchall()
        fresh = [r for r in rows if r[3] == model_sha256]
        matrix = np.stack([normalise(np.frombuffer(bytes(r[2]), dtype=np.float32)) for r in fresh]) if fresh else None
        matrix = matrix if matrix is not None else np.zeros((0, 0), dtype=np.float32)
        return Index(
            ids=[r[0] for r in fresh],
            names=[r[1] for r in fresh],
            matrix=matrix,
            stale=len(rows) - len(fresh),
            fingerprint=matrix.astype(np.float64) @ FINGERPRINT[: matrix.shape[1]] if len(matrix) else np.zeros(0),
        )
