"""Sync and async clients of the service: one method per endpoint, typed results, retries.

Both clients describe each request as a ``Call`` (method, path, parts, how to read the answer) and
differ only in how they send it. A 503 (the service is at capacity, or over its memory budget) is
retried after the ``Retry-After`` the service sends; requests that change nothing (embed,
classify, verify, identify, reads) are also retried after connection failures and after 502/504
from a load balancer whose replica went away. Enrolment is retried on 503 only: the service
refuses a 503 before it stores anything, while a dropped connection may have enrolled already.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from client.results import (
    BatchItem,
    Classification,
    Diarization,
    Embedding,
    Identification,
    ServiceError,
    Speaker,
    SpeakerVerification,
    Verification,
)

T = TypeVar("T")
Audio = str | os.PathLike[str] | bytes | tuple[str, bytes]
"""A clip: a path, raw bytes of an audio file, or (filename, bytes)."""

RETRY_ON_ANY = frozenset({502, 503, 504})
MAX_WAIT_S = 30.0


def audio_part(audio: Audio, default_name: str = "clip") -> tuple[str, bytes]:
    if isinstance(audio, bytes):
        return default_name, audio
    if isinstance(audio, tuple):
        return audio
    path = Path(audio)
    return path.name, path.read_bytes()


def error_of(response: httpx.Response) -> ServiceError:
    """The service's JSON error, or a plain description of a non-JSON one (a proxy's page)."""
    retry_after = response.headers.get("retry-after")
    try:
        wait = float(retry_after) if retry_after is not None else None
    except ValueError:
        wait = None
    try:
        err = response.json()["error"]
        return ServiceError(response.status_code, str(err["code"]), str(err["message"]), wait)
    except (ValueError, KeyError, TypeError):
        text = response.text.strip().splitlines()[0][:200] if response.text.strip() else response.reason_phrase
        return ServiceError(response.status_code, "http_error", text, wait)


@dataclass
class Call:
    """One request: what to send and how to read a 2xx answer."""

    method: str
    path: str
    parse: Callable[[Any], Any]
    params: dict[str, Any] = field(default_factory=dict)
    files: list[tuple[str, tuple[str, bytes]]] = field(default_factory=list)
    data: dict[str, str] = field(default_factory=dict)
    json: Any = None
    idempotent: bool = True

    def retryable(self, error: ServiceError) -> bool:
        if error.status == 503:
            return True
        return self.idempotent and (error.status == 0 or error.status in RETRY_ON_ANY)

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"params": {k: v for k, v in self.params.items() if v is not None}}
        if self.files:
            out["files"] = self.files
        if self.data:
            out["data"] = self.data
        if self.json is not None:
            out["json"] = self.json
        return out

    def wait_before_retry(self, exc: Exception, attempt: int, retries: int) -> float:
        """Seconds to wait before retrying after ``exc`` (a ServiceError or a transport failure);
        raises the failure as a ServiceError when it is not to be retried."""
        if isinstance(exc, ServiceError):
            error = exc
        else:
            error = ServiceError(0, type(exc).__name__, str(exc) or "connection failed")
        if attempt >= retries or not self.retryable(error):
            raise error from None
        return backoff(attempt, error)

    def result(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            raise error_of(response)
        return self.parse(response.json() if response.content else None)


def backoff(attempt: int, error: ServiceError) -> float:
    """The service's Retry-After when it sent one, else exponential with jitter (capped)."""
    if error.retry_after is not None:
        return min(max(error.retry_after, 0.0), MAX_WAIT_S)
    return min(0.25 * 2**attempt, MAX_WAIT_S / 3) * (0.5 + random.random())


def batch_items(parse_one: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], list[BatchItem]]:
    def parse(d: dict[str, Any]) -> list[BatchItem]:
        items = []
        for item in d["results"]:
            err = item.get("error")
            items.append(
                BatchItem(
                    item["index"],
                    item.get("filename"),
                    None if err else parse_one(item["result"]),
                    ServiceError(0, err["code"], err["message"]) if err else None,
                )
            )
        return items

    return parse


class Calls:
    """The requests of every endpoint (shared by both clients)."""

    @staticmethod
    def embed(audio: Audio, normalize: bool = False) -> Call:
        return Call("POST", "/embed", Embedding.of, {"normalize": normalize}, [("file", audio_part(audio))])

    @staticmethod
    def classify(audio: Audio, top_k: int = 3, include_embedding: bool = False) -> Call:
        params = {"top_k": top_k, "include_embedding": include_embedding}
        return Call("POST", "/classify", Classification.of, params, [("file", audio_part(audio))])

    @staticmethod
    def verify(a: Audio, b: Audio, threshold: float | None = None) -> Call:
        files = [("a", audio_part(a, "a")), ("b", audio_part(b, "b"))]
        return Call("POST", "/verify", Verification.of, {"threshold": threshold}, files)

    @staticmethod
    def embed_batch(clips: Sequence[Audio], normalize: bool = False) -> Call:
        files = [("file", audio_part(c, f"clip{i}")) for i, c in enumerate(clips)]
        return Call("POST", "/embed/batch", batch_items(Embedding.of), {"normalize": normalize}, files)

    @staticmethod
    def classify_batch(clips: Sequence[Audio], top_k: int = 3) -> Call:
        files = [("file", audio_part(c, f"clip{i}")) for i, c in enumerate(clips)]
        return Call("POST", "/classify/batch", batch_items(Classification.of), {"top_k": top_k}, files)

    @staticmethod
    def enrol(name: str, clips: Sequence[Audio], metadata: dict[str, Any] | None = None) -> Call:
        import json

        files = [("file", audio_part(c, f"clip{i}")) for i, c in enumerate(clips)]
        data = {"name": name, **({"metadata": json.dumps(metadata)} if metadata is not None else {})}
        return Call("POST", "/speakers", Speaker.of, files=files, data=data, idempotent=False)

    @staticmethod
    def add_clips(speaker_id: str, clips: Sequence[Audio]) -> Call:
        files = [("file", audio_part(c, f"clip{i}")) for i, c in enumerate(clips)]
        return Call("POST", f"/speakers/{speaker_id}/clips", Speaker.of, files=files, idempotent=False)

    @staticmethod
    def speakers_page(limit: int = 100, cursor: str | None = None) -> Call:
        def parse(d: dict[str, Any]) -> tuple[list[Speaker], str | None]:
            return [Speaker.of(s) for s in d["speakers"]], d.get("next_cursor")

        return Call("GET", "/speakers", parse, {"limit": limit, "cursor": cursor})

    @staticmethod
    def speaker(speaker_id: str) -> Call:
        return Call("GET", f"/speakers/{speaker_id}", Speaker.of)

    @staticmethod
    def rename(speaker_id: str, name: str | None = None, metadata: dict[str, Any] | None = None) -> Call:
        body = {k: v for k, v in {"name": name, "metadata": metadata}.items() if v is not None}
        return Call("PATCH", f"/speakers/{speaker_id}", Speaker.of, json=body)

    @staticmethod
    def delete_speaker(speaker_id: str) -> Call:
        return Call("DELETE", f"/speakers/{speaker_id}", lambda _: None)

    @staticmethod
    def verify_speaker(speaker_id: str, audio: Audio) -> Call:
        files = [("file", audio_part(audio))]
        return Call("POST", f"/speakers/{speaker_id}/verify", SpeakerVerification.of, files=files)

    @staticmethod
    def identify(audio: Audio, top_k: int = 5) -> Call:
        return Call("POST", "/identify", Identification.of, {"top_k": top_k}, [("file", audio_part(audio))])

    @staticmethod
    def diarize(
        audio: Audio,
        num_speakers: int | None = None,
        min_speakers: int | None = None,
        max_speakers: int | None = None,
        identify: bool = False,
    ) -> Call:
        params = {"num_speakers": num_speakers, "min_speakers": min_speakers, "max_speakers": max_speakers,
                  "identify": identify}  # fmt: skip
        return Call("POST", "/diarize", Diarization.of, params, [("file", audio_part(audio))])

    @staticmethod
    def model() -> Call:
        return Call("GET", "/v1/model", lambda d: d)


def headers(api_key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


class Client:
    """A blocking client: ``Client("http://host:8000").embed("clip.wav").vector``."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 120.0, retries: int = 5) -> None:
        self.retries = retries
        self.http = httpx.Client(base_url=url, headers=headers(api_key), timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def send(self, call: Call) -> Any:
        attempt = 0
        while True:
            try:
                return call.result(self.http.request(call.method, call.path, **call.kwargs()))
            except (httpx.TransportError, ServiceError) as exc:
                time.sleep(call.wait_before_retry(exc, attempt, self.retries))
            attempt += 1

    def embed(self, audio: Audio, normalize: bool = False) -> Embedding:
        return self.send(Calls.embed(audio, normalize))

    def classify(self, audio: Audio, top_k: int = 3, include_embedding: bool = False) -> Classification:
        return self.send(Calls.classify(audio, top_k, include_embedding))

    def verify(self, a: Audio, b: Audio, threshold: float | None = None) -> Verification:
        return self.send(Calls.verify(a, b, threshold))

    def embed_batch(self, clips: Sequence[Audio], normalize: bool = False) -> list[BatchItem]:
        return self.send(Calls.embed_batch(clips, normalize))

    def classify_batch(self, clips: Sequence[Audio], top_k: int = 3) -> list[BatchItem]:
        return self.send(Calls.classify_batch(clips, top_k))

    def enrol(self, name: str, clips: Sequence[Audio], metadata: dict[str, Any] | None = None) -> Speaker:
        return self.send(Calls.enrol(name, clips, metadata))

    def add_clips(self, speaker_id: str, clips: Sequence[Audio]) -> Speaker:
        return self.send(Calls.add_clips(speaker_id, clips))

    def speakers(self, page_size: int = 100) -> Iterator[Speaker]:
        cursor = None
        while True:
            page, cursor = self.send(Calls.speakers_page(page_size, cursor))
            yield from page
            if cursor is None:
                return

    def speaker(self, speaker_id: str) -> Speaker:
        return self.send(Calls.speaker(speaker_id))

    def update_speaker(
        self, speaker_id: str, name: str | None = None, metadata: dict[str, Any] | None = None
    ) -> Speaker:
        return self.send(Calls.rename(speaker_id, name, metadata))

    def delete_speaker(self, speaker_id: str) -> None:
        self.send(Calls.delete_speaker(speaker_id))

    def verify_speaker(self, speaker_id: str, audio: Audio) -> SpeakerVerification:
        return self.send(Calls.verify_speaker(speaker_id, audio))

    def identify(self, audio: Audio, top_k: int = 5) -> Identification:
        return self.send(Calls.identify(audio, top_k))

    def diarize(
        self,
        audio: Audio,
        num_speakers: int | None = None,
        min_speakers: int | None = None,
        max_speakers: int | None = None,
        identify: bool = False,
    ) -> Diarization:
        """Who spoke when in one recording; with ``identify``, speakers named from the enrolled ones."""
        return self.send(Calls.diarize(audio, num_speakers, min_speakers, max_speakers, identify))

    def model(self) -> dict[str, Any]:
        return self.send(Calls.model())


class AsyncClient:
    """The same methods as ``Client``, awaitable: many requests in flight from one event loop."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 120.0, retries: int = 5) -> None:
        self.retries = retries
        self.http = httpx.AsyncClient(base_url=url, headers=headers(api_key), timeout=timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def send(self, call: Call) -> Any:
        attempt = 0
        while True:
            try:
                return call.result(await self.http.request(call.method, call.path, **call.kwargs()))
            except (httpx.TransportError, ServiceError) as exc:
                await asyncio.sleep(call.wait_before_retry(exc, attempt, self.retries))
            attempt += 1

    async def embed(self, audio: Audio, normalize: bool = False) -> Embedding:
        return await self.send(Calls.embed(audio, normalize))

    async def classify(self, audio: Audio, top_k: int = 3, include_embedding: bool = False) -> Classification:
        return await self.send(Calls.classify(audio, top_k, include_embedding))

    async def verify(self, a: Audio, b: Audio, threshold: float | None = None) -> Verification:
        return await self.send(Calls.verify(a, b, threshold))

    async def embed_batch(self, clips: Sequence[Audio], normalize: bool = False) -> list[BatchItem]:
        return await self.send(Calls.embed_batch(clips, normalize))

    async def classify_batch(self, clips: Sequence[Audio], top_k: int = 3) -> list[BatchItem]:
        return await self.send(Calls.classify_batch(clips, top_k))

    async def enrol(self, name: str, clips: Sequence[Audio], metadata: dict[str, Any] | None = None) -> Speaker:
        return await self.send(Calls.enrol(name, clips, metadata))

    async def add_clips(self, speaker_id: str, clips: Sequence[Audio]) -> Speaker:
        return await self.send(Calls.add_clips(speaker_id, clips))

    async def speakers(self, page_size: int = 100) -> AsyncIterator[Speaker]:
        cursor = None
        while True:
            page, cursor = await self.send(Calls.speakers_page(page_size, cursor))
            for speaker in page:
                yield speaker
            if cursor is None:
                return

    async def speaker(self, speaker_id: str) -> Speaker:
        return await self.send(Calls.speaker(speaker_id))

    async def update_speaker(
        self, speaker_id: str, name: str | None = None, metadata: dict[str, Any] | None = None
    ) -> Speaker:
        return await self.send(Calls.rename(speaker_id, name, metadata))

    async def delete_speaker(self, speaker_id: str) -> None:
        await self.send(Calls.delete_speaker(speaker_id))

    async def verify_speaker(self, speaker_id: str, audio: Audio) -> SpeakerVerification:
        return await self.send(Calls.verify_speaker(speaker_id, audio))

    async def identify(self, audio: Audio, top_k: int = 5) -> Identification:
        return await self.send(Calls.identify(audio, top_k))

    async def diarize(
        self,
        audio: Audio,
        num_speakers: int | None = None,
        min_speakers: int | None = None,
        max_speakers: int | None = None,
        identify: bool = False,
    ) -> Diarization:
        return await self.send(Calls.diarize(audio, num_speakers, min_speakers, max_speakers, identify))

    async def model(self) -> dict[str, Any]:
        return await self.send(Calls.model())
