"""Plain request and response values for the plugin's REST routes.

The shell turns Orthanc's callback arguments into a `Request` and a
`Response` back into calls on Orthanc's output object, so that every route
can be tested without Orthanc.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> object:
        """The body as JSON; an empty body reads as an empty object."""
        if not self.body.strip():
            return {}
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise HttpError(400, f"the body is not valid JSON: {exc}") from None


@dataclass(frozen=True)
class Response:
    status: int
    body: object = None
    allowed: tuple[str, ...] = ()

    def encoded(self) -> bytes:
        return json.dumps(self.body, indent=2, ensure_ascii=False).encode("utf-8")


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

    def __init__(self) -> None:
        self._routes: list[tuple[re.Pattern[str], dict[str, Handler]]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        compiled = re.compile(pattern + r"\Z")
        for existing, methods in self._routes:
            if existing.pattern == compiled.pattern:
                methods[method] = handler
                return
        self._routes.append((compiled, {method: handler}))

    def handle(self, request: Request) -> Response:
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
        return HttpError(404, f"no route {request.method} /kheops/{request.path}").response()


def json_object(request: Request) -> Mapping[str, object]:
    document = request.json()
    if not isinstance(document, dict):
        raise HttpError(400, "the body must be a JSON object")
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
