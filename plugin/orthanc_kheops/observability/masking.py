"""Capability tokens, kept out of logs, REST answers and exception messages.

A token is held in a `Secret`, whose repr and str are masked, so that a
dataclass or an f-string cannot leak it by accident; only `reveal()` gives the
clear text, and only the HTTP layer calls it. `Redactor` scrubs any known token
from text that is about to leave the process (log lines, error details).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

_VISIBLE_HEAD = 4
_VISIBLE_TAIL = 2
_EXCERPT = 40
_URL_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/?#@\s'\"]+@")


def mask(token: str) -> str:
    """The form a person may see: enough to tell two tokens apart, not enough to use one."""
    if len(token) <= _VISIBLE_HEAD + _VISIBLE_TAIL + 4:
        return "…" * min(len(token), 3)
    return f"{token[:_VISIBLE_HEAD]}…{token[-_VISIBLE_TAIL:]}"


def excerpt(text: str, limit: int = _EXCERPT) -> str:
    """A short quote of what a user sent: an error message never repeats a huge input whole."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text)} characters)"


def mask_url_credentials(text: str) -> str:
    """`https://user:password@host` becomes `https://…@host` wherever it appears."""
    return _URL_CREDENTIALS.sub(r"\g<scheme>…@", text)


def mask_url(url: str) -> str:
    """A URL fit to print: a user:password@ part and a query (which may carry a token) masked."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(a URL that cannot be read)"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "…@" + netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, netloc, parts.path, "…" if parts.query else "", ""))


class Secret:
    """A token whose printable forms are masked."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    @property
    def masked(self) -> str:
        return mask(self._value)

    def __repr__(self) -> str:
        return f"Secret({self.masked!r})"

    def __str__(self) -> str:
        return self.masked

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class Redactor:
    """Replaces every registered token, and URL credentials, in a text by a masked form."""

    def __init__(self, secrets: Iterable[Secret] = ()) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[str, str] = {}
        for secret in secrets:
            self.add(secret)

    def add(self, secret: Secret) -> None:
        with self._lock:
            self._tokens[secret.reveal()] = secret.masked

    def knows(self, text: str) -> bool:
        """Whether a text is a registered token (then it must be neither shown nor a name)."""
        with self._lock:
            return text in self._tokens

    def redact(self, text: str) -> str:
        with self._lock:
            tokens = list(self._tokens.items())
        for clear, masked in tokens:
            if clear in text:
                text = text.replace(clear, masked)
        return mask_url_credentials(text)
