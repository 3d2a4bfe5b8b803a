"""Plain request and response values for the plugin's REST routes.

The shell turns Orthanc's callback arguments into a `Request` and hands it to `Router.reply`,
which answers every request, whatever it holds: a body is bounded in size
and nesting before it is parsed (`json.loads` recurses, and Orthanc's HTTP threads have small
stacks: a deep body would crash Orthanc), text that cannot be encoded is refused naming its
field, the answer is encoded inside the error handling, and every answer passes through the
redactor. Every route can be tested without Orthanc.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

from ..observability.masking import excerpt
from ..state.errors import StoreUnavailable

log = logging.getLogger(__name__)

MAXIMUM_BODY_BYTES = 1024 * 1024
"""Largest body read: a rule is a few hundred bytes, a list of 20 000 Orthanc ids under 1 MB."""
MAXIMUM_DEPTH = 64
"""Deepest nesting of arrays and objects in a body; no route reads more than 3 levels."""

ORTHANC_ID = re.compile(r"[0-9a-f]{8}(?:-[0-9a-f]{8}){4}")
"""Orthanc's resource ids: a SHA-1 in five groups of eight lower-case hex digits."""
ORTHANC_ID_PATTERN = r"([0-9a-f]{8}(?:-[0-9a-f]{8}){4})"
_SECRET_KEY = re.compile(r"token|password|secret|authorization", re.IGNORECASE)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> object:
        """The body as JSON, bounded in size and depth; an empty body reads as an empty object."""
        if len(self.body) > MAXIMUM_BODY_BYTES:
            raise HttpError(
                413,
                f"the body is {len(self.body)} bytes; at most {MAXIMUM_BODY_BYTES} are read",
                field="body",
            )
        if not self.body.strip():
            return {}
        depth = nesting_depth(self.body)
        if depth > MAXIMUM_DEPTH:
            raise HttpError(
                400,
                f"the body nests arrays and objects deeper than {MAXIMUM_DEPTH} levels",
                field="body",
            )
        try:
            document = json.loads(self.body)
        except ValueError as exc:
            raise HttpError(400, f"the body is not valid JSON: {exc}", field="body") from None
        for path, text in _strings(document):
            if not encodable(text):
                raise HttpError(
                    400,
                    f"{path or 'body'}: holds text that is not valid Unicode"
                    " (a lone surrogate such as \\ud800)",
                    field=path or "body",
                )
        return document

    def secrets(self) -> list[str]:
        """The body's values under keys that name a credential: never echoed, even if wrong."""
        try:
            document = self.json()  # bounded: json.loads of a deep body would crash Orthanc
        except HttpError:
            return []
        return [
            text
            for path, text in _strings(document)
            if _SECRET_KEY.search(path.rpartition(".")[2]) and len(text) >= 6
        ]


@dataclass(frozen=True)
class Response:
    status: int
    body: object = None
    allowed: tuple[str, ...] = ()
    payload: bytes | None = field(default=None, compare=False)  # set by `Router.reply`

    def encoded(self) -> bytes:
        """UTF-8 JSON; text that UTF-8 cannot carry (a lone surrogate) is escaped, never a crash."""
        if self.payload is not None:
            return self.payload
        try:
            return json.dumps(self.body, indent=2, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return json.dumps(self.body, indent=2, ensure_ascii=True).encode("ascii")


class HttpError(Exception):
    """Ends a request with an error status and a JSON body naming the problem."""

    def __init__(self, status: int, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field

    def response(self) -> Response:
        body: dict[str, object] = {"HttpStatus": self.status, "Message": self.message}
        if self.field is not None:
            body["Field"] = self.field
        return Response(self.status, body)


Handler = Callable[[Request, Sequence[str]], Response]


class Router:
    """Routes `METHOD path` to handlers; path patterns are regular expressions."""

    def __init__(self, *, redact: Callable[[str], str] = lambda text: text) -> None:
        self._routes: list[tuple[re.Pattern[str], dict[str, Handler]]] = []
        self._redact = redact

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        compiled = re.compile(pattern + r"\Z")
        for existing, methods in self._routes:
            if existing.pattern == compiled.pattern:
                methods[method] = handler
                return
        self._routes.append((compiled, {method: handler}))

    def handle(self, request: Request) -> Response:
        for name, text in (("path", request.path), *request.query.items()):
            if not encodable(name) or not encodable(text):
                return HttpError(
                    400, f"{name}: is not valid Unicode", field=name if encodable(name) else "query"
                ).response()
        for pattern, methods in self._routes:
            match = pattern.match(request.path)
            if match is None:
                continue
            handler = methods.get(request.method)
            if handler is None:
                return Response(405, allowed=tuple(sorted(methods)))
            try:
                return handler(request, match.groups())
            except HttpError as error:
                return error.response()
            except (sqlite3.Error, StoreUnavailable) as exc:
                log.error("the plugin's state cannot be read or written: %s", exc)
                return HttpError(
                    503,
                    f"the plugin's state cannot be written now ({exc}); nothing was"
                    " changed, try again once the state directory is writable",
                ).response()
        shown = request.path if len(request.path) <= 80 else f"{request.path[:80]}…"
        return HttpError(404, f"no route {request.method} /kheops/{shown}", field="path").response()

    def reply(self, request: Request) -> Response:
        """The answer to any request, its payload encoded and redacted; never raises."""
        try:
            response = self.handle(request)
            secrets = request.secrets()
            if secrets:
                response = replace(response, body=_hidden(response.body, secrets))
            text = response.encoded().decode("utf-8")
        except Exception:
            log.exception("REST %s /kheops/%s failed", request.method, request.path[:80])
            response = Response(
                500,
                {"HttpStatus": 500, "Message": "internal error; see Orthanc's log for details"},
            )
            text = response.encoded().decode("utf-8")
        return replace(response, payload=self._redact(text).encode("utf-8"))


def nesting_depth(body: bytes) -> int:
    """How deep arrays and objects nest in a JSON text, by a scan without recursion.

    Brackets inside strings do not count; the scan stops at the first level past the limit.
    """
    depth = deepest = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAXIMUM_DEPTH:
                    return deepest
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


def encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _hidden(value: object, secrets: Sequence[str]) -> object:
    """The answer with every secret the request carried hidden in its text values.

    Values only: a "token" that happens to read like a key of the answer ("Message") must not
    change the answer's shape. Answers are the plugin's own, a few levels deep.
    """
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "(hidden)")
        return value
    if isinstance(value, dict):
        return {key: _hidden(item, secrets) for key, item in value.items()}
    if isinstance(value, list):
        return [_hidden(item, secrets) for item in value]
    return value


def _strings(document: object) -> Iterator[tuple[str, str]]:
    """Every key and string value of a parsed document with its field path, without recursion."""
    stack: list[tuple[str, object]] = [("", document)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            yield path, value
        elif isinstance(value, dict):
            for key, item in value.items():
                child = f"{path}.{key}" if path else str(key)
                if not encodable(key):
                    yield path, key
                else:
                    stack.append((child, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{index}]", item) for index, item in enumerate(value))


def json_object(request: Request) -> Mapping[str, object]:
    document = request.json()
    if not isinstance(document, dict):
        raise HttpError(400, "the body must be a JSON object", field="body")
    return document


def string_list(document: Mapping[str, object], key: str, *, required: bool) -> list[str] | None:
    value = document.get(key)
    if value is None:
        if required:
            raise HttpError(400, f"{key}: is required (a list of Orthanc ids)", field=key)
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise HttpError(400, f"{key}: must be a list of Orthanc ids (strings)", field=key)
    return value


def orthanc_ids(document: Mapping[str, object], key: str, *, required: bool) -> list[str] | None:
    """A list of Orthanc ids, each checked before it can go into a loopback URL."""
    ids = string_list(document, key, required=required)
    for index, orthanc_id in enumerate(ids or ()):
        if ORTHANC_ID.fullmatch(orthanc_id) is None:
            raise HttpError(
                400,
                f"{key}[{index}]: {excerpt(orthanc_id)} is not an Orthanc id"
                " (five groups of eight hex digits joined by '-')",
                field=key,
            )
    return ids
