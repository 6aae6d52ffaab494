"""Getting audio bytes out of a request: multipart ``file`` parts, or the raw body."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from app.errors import ApiError, bad_request

RAW_TYPES = ("application/octet-stream",)


@dataclass
class Upload:
    filename: str | None
    data: bytes


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_form_files(request: Request, fields: list[str], max_files: int) -> dict[str, list[Upload]]:
    """All file parts of a multipart body, by field name, in order."""
    return (await read_form(request, fields, [], max_files))[0]


async def read_form(
    request: Request, file_fields: list[str], text_fields: list[str], max_files: int
) -> tuple[dict[str, list[Upload]], dict[str, str]]:
    """The file parts (by field name, in order) and the text fields of a multipart body."""
    try:
        form = await request.form(max_files=max_files, max_fields=max_files + 8)
    except MultiPartException as exc:
        raise bad_request(f"malformed multipart body: {exc.message}") from None
    except (ValueError, KeyError, UnicodeDecodeError) as exc:
        raise bad_request(f"malformed multipart body: {exc}") from None
    found: dict[str, list[Upload]] = {name: [] for name in file_fields}
    texts: dict[str, str] = {}
    try:
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
                found[name].append(Upload(value.filename, await value.read()))
    finally:
        await form.close()
    return found, texts


async def read_audio(request: Request, max_files: int, field: str = "file") -> list[Upload]:
    """One or more clips: repeated multipart ``field`` parts, or the raw body (audio/*, octet-stream)."""
    kind = media_type(request)
    if kind == "multipart/form-data":
        uploads = (await read_form_files(request, [field], max_files))[field]
        if not uploads:
            raise bad_request(f"multipart body has no {field!r} file part")
        return uploads
    if kind.startswith("audio/") or kind in RAW_TYPES:
        data = await request.body()
        if not data:
            raise bad_request("empty request body")
        return [Upload(None, data)]
    raise ApiError(
        415,
        "unsupported_media",
        f"Content-Type {kind or '(none)'!r} is not accepted: send multipart/form-data with a {field!r} "
        "file part, or the audio bytes with Content-Type audio/* or application/octet-stream",
    )
