"""Getting audio out of a request: multipart ``file`` parts, or the raw body.

Bodies are never held whole in memory: multipart parts are spooled by Starlette (in memory up to
1 MiB, then to a temporary file), and a raw body is streamed into the same kind of spool. The
decoder reads the spool. Everything a request opened is closed by its :class:`Intake`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from tempfile import SpooledTemporaryFile
from typing import BinaryIO, cast

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from app.budget import Reservation
from app.errors import ApiError, bad_request

RAW_TYPES = ("application/octet-stream",)
SPOOL_BYTES = 1024 * 1024  # a body part stays in memory up to this, then goes to a temporary file


@dataclass
class Upload:
    filename: str | None
    file: BinaryIO  # the spooled body part, read by the decoder
    size: int


class Intake:
    """One request's share of the memory budget and the spools it opened; closed when it ends.

    ``expect(n)`` says how many clips will be decoded; once the last of them is decoded
    (or failed), the reservation shrinks from the estimate to what the request still holds."""

    def __init__(self, reservation: Reservation) -> None:
        self.reservation = reservation
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self._to_decode = 0

    def on_close(self, closer: Callable[[], Awaitable[None]]) -> None:
        self._closers.append(closer)

    def expect(self, clips: int) -> None:
        self._to_decode = clips

    def decoded(self) -> None:
        self._to_decode -= 1
        if self._to_decode <= 0:
            self.reservation.shrink()

    async def aclose(self) -> None:
        try:
            for closer in reversed(self._closers):
                await closer()
        finally:
            self.reservation.close()


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_form_files(
    request: Request, intake: Intake, fields: list[str], max_files: int
) -> dict[str, list[Upload]]:
    """All file parts of a multipart body, by field name, in order."""
    return (await read_form(request, intake, fields, [], max_files))[0]


async def read_form(
    request: Request, intake: Intake, file_fields: list[str], text_fields: list[str], max_files: int
) -> tuple[dict[str, list[Upload]], dict[str, str]]:
    """The file parts (by field name, in order) and the text fields of a multipart body."""
    try:
        form = await request.form(max_files=max_files, max_fields=max_files + 8)
    except MultiPartException as exc:
        raise bad_request(f"malformed multipart body: {exc.message}") from None
    except (ValueError, KeyError, UnicodeDecodeError) as exc:
        raise bad_request(f"malformed multipart body: {exc}") from None
    intake.on_close(form.close)
    found: dict[str, list[Upload]] = {name: [] for name in file_fields}
    texts: dict[str, str] = {}
    for name, value in form.multi_items():
        if name in text_fields:
            if isinstance(value, UploadFile):
                raise bad_request(f"form field {name!r} must be a text value, not a file upload")
            if name in texts:
                raise bad_request(f"form field {name!r} is given more than once")
            texts[name] = value
        elif name in found:
            if not isinstance(value, UploadFile):
                raise bad_request(f"form field {name!r} must be a file upload, not a text value")
            found[name].append(Upload(value.filename, value.file, value.size or 0))
    return found, texts


async def read_audio(request: Request, intake: Intake, max_files: int, field: str = "file") -> list[Upload]:
    """One or more clips: repeated multipart ``field`` parts, or the raw body (audio/*, octet-stream)."""
    kind = media_type(request)
    if kind == "multipart/form-data":
        uploads = (await read_form_files(request, intake, [field], max_files))[field]
        if not uploads:
            raise bad_request(f"multipart body has no {field!r} file part")
        return uploads
    if kind.startswith("audio/") or kind in RAW_TYPES:
        spooled = cast(BinaryIO, SpooledTemporaryFile(max_size=SPOOL_BYTES))  # noqa: SIM115 (closed by the intake)
        spool = UploadFile(spooled, size=0)
        intake.on_close(spool.close)
        async for chunk in request.stream():
            if chunk:
                await spool.write(chunk)
        if not spool.size:
            raise bad_request("empty request body")
        await spool.seek(0)
        return [Upload(None, spool.file, spool.size)]
    raise ApiError(
        415,
        "unsupported_media",
        f"Content-Type {kind or '(none)'!r} is not accepted: send multipart/form-data with a {field!r} "
        "file part, or the audio bytes with Content-Type audio/* or application/octet-stream",
    )
