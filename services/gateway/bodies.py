"""Reading what clients send, before any field is looked at: size limits first (413), then
strict UTF-8, bounded JSON nesting, and form fields (urlencoded or multipart) as text."""

from __future__ import annotations

import email.parser
import email.policy
import json
import re
from urllib.parse import parse_qsl

from fastapi import Request

from services.errors import InvalidArgument, TooLarge

MAX_JSON_DEPTH = 16  # a request is a flat object; this leaves room and stops pathological nesting
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to pass `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"the body has {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the body passes the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def decode_utf8(raw: bytes, what: str, param: str | None = None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidArgument(f"{what} is not valid UTF-8 (byte {err.start})", param) from None


def parse_json(text: str, what: str = "the body") -> object:
    """JSON nested at most MAX_JSON_DEPTH deep; any failure is the client's (400)."""
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_STRINGS.sub('""', text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    if deepest > MAX_JSON_DEPTH:
        raise InvalidArgument(f"{what} nests JSON deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise InvalidArgument(f"{what} is not valid JSON: {err}") from None


def parse_object(text: str, what: str = "the body") -> dict:
    data = parse_json(text, what)
    if not isinstance(data, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return data


def parse_form(raw: bytes, content_type: str) -> dict[str, str]:
    """Text fields of a form; a file field (`input_reference`) is refused: text-to-video only."""
    if content_type.startswith("application/x-www-form-urlencoded"):
        try:
            return dict(parse_qsl(decode_utf8(raw, "the form"), keep_blank_values=True))
        except UnicodeDecodeError:
            raise InvalidArgument("the form is not valid UTF-8 once %-decoded") from None
    header = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(header + raw)
    if not message.is_multipart():
        raise InvalidArgument("the multipart form could not be read (boundary missing?)")
    fields: dict[str, str] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        if part.get_filename() is not None:
            raise InvalidArgument(
                f"{name} is a file; files are not supported: text-to-video only", param=name
            )
        payload = part.get_payload(decode=True) or b""
        fields[name] = decode_utf8(payload, f"form field {name}", param=name)
    return fields


async def read_fields(request: Request, limit: int) -> dict:
    """A request's fields: a JSON object, or a form's text fields."""
    raw = await read_body(request, limit)
    kind = request.headers.get("content-type", "")
    if kind.startswith(FORM_TYPES):
        return parse_form(raw, kind)
    return parse_object(decode_utf8(raw, "the body"))


async def read_upload(request: Request, limit: int) -> tuple[dict[str, str], str, bytes]:
    """A multipart upload (POST /v1/files): its text fields, and its one file part's name and
    bytes (`file`), the body refused with 413 past `limit` bytes."""
    kind = request.headers.get("content-type", "")
    if not kind.startswith("multipart/form-data"):
        raise InvalidArgument("upload a file as multipart/form-data with fields file and purpose")
    raw = await read_body(request, limit)
    header = f"Content-Type: {kind}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(header + raw)
    if not message.is_multipart():
        raise InvalidArgument("the multipart form could not be read (boundary missing?)")
    fields: dict[str, str] = {}
    upload: tuple[str, bytes] | None = None
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if name == "file" and part.get_filename() is not None:
            upload = (str(part.get_filename()), payload)
        elif isinstance(name, str):
            fields[name] = decode_utf8(payload, f"form field {name}", param=name)
    if upload is None:
        raise InvalidArgument("the upload has no file part named 'file'", param="file")
    return fields, upload[0], upload[1]
