"""JSON Schema validation with messages a person can act on.

The schemas live in the repository's `config/` folder. Each error names the
field as a path (`Kheops.SwitchingAlbums[2].Condition`) and says what is
wrong; a schema may word it itself with an `x-message` keyword. Values of
fields marked `x-secret` are never repeated in a message.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource

from .observability.masking import excerpt, mask_url_credentials

SCHEMA_DIRECTORY = Path(__file__).resolve().parent.parent.parent / "config"
_SECRET_KEYS = frozenset({"Token", "DestinationToken", "SourceToken"})


class SchemaError(ValueError):
    """A document does not follow its schema; `field` is the path of the first offending field."""

    def __init__(self, message: str, *, field: str, problems: Sequence[str]) -> None:
        super().__init__(message)
        self.field = field
        self.problems = tuple(problems)


@cache
def _registry() -> Registry:
    resources = []
    for path in sorted(SCHEMA_DIRECTORY.glob("*.schema.json")):
        resources.append((path.name, Resource.from_contents(json.loads(path.read_text()))))
    return Registry().with_resources(resources)


@cache
def _validator(schema_name: str) -> Draft202012Validator:
    schema = _registry().contents(schema_name)
    return Draft202012Validator(schema, registry=_registry())


def validate(document: object, schema_name: str, *, root: str) -> None:
    """Raise SchemaError naming every problem, the first one in the message."""
    errors = sorted(
        _validator(schema_name).iter_errors(document),
        key=lambda e: (list(e.absolute_path).__len__(), [str(p) for p in e.absolute_path]),
    )
    if not errors:
        return
    described = [_describe(error, root) for error in errors]
    first_field = described[0][0]
    problems = [f"{field}: {text}" for field, text in described]
    raise SchemaError(
        problems[0] if len(problems) == 1 else "; ".join(problems),
        field=first_field,
        problems=problems,
    )


def defaults(schema_name: str, *path: str) -> dict[str, Any]:
    """The `default` of each property of the object at `path` (the top level without one):
    the one place a setting's default is written."""
    schema = _registry().contents(schema_name)
    for key in path:
        schema = schema["properties"][key]
    properties = schema.get("properties", {})
    return {key: spec["default"] for key, spec in properties.items() if "default" in spec}


def field_path(root: str, path: Sequence[str | int]) -> str:
    text = root
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _describe(error: ValidationError, root: str) -> tuple[str, str]:
    path = list(error.absolute_path)
    secret = bool(path) and path[-1] in _SECRET_KEYS
    schema: Mapping[str, Any] = error.schema if isinstance(error.schema, Mapping) else {}
    if error.validator == "required":
        missing = _missing_key(error)
        return field_path(root, [*path, missing]), "is required"
    if error.validator == "additionalProperties":
        known = list(schema.get("properties", {}))
        texts = []
        for key in _unexpected_keys(error):
            hint = difflib.get_close_matches(key, known, n=1)
            texts.append(
                f"unknown key {excerpt(key)}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            )
        keys = _unexpected_keys(error)
        # At the top of a REST body, an unknown key names itself as the field.
        where = [keys[0]] if len(keys) == 1 and not path and not root else path
        return field_path(root, where) or "body", "; ".join(texts)
    message = schema.get("x-message")
    if isinstance(message, str) and error.validator in ("pattern", "format"):
        # Not str.format: a message may hold other braces ("${...}"), and a secret's value
        # must not be substituted.
        shown = "(hidden)" if secret else _shown(error.instance)
        return field_path(root, path), message.replace("{value!r}", shown)
    if secret:
        return field_path(root, path), _secret_safe(error)
    return field_path(root, path), _plain(error)


def _missing_key(error: ValidationError) -> str:
    # jsonschema words it "'Url' is a required property".
    return str(error.message).split("'")[1] if "'" in error.message else str(error.message)


def _unexpected_keys(error: ValidationError) -> list[str]:
    instance = error.instance if isinstance(error.instance, Mapping) else {}
    allowed = (
        set(error.schema.get("properties", {})) if isinstance(error.schema, Mapping) else set()
    )
    return sorted(k for k in instance if k not in allowed)


def _secret_safe(error: ValidationError) -> str:
    if error.validator == "type":
        return f"must be a {error.validator_value}"
    if error.validator == "pattern":
        return "is not a KHEOPS capability token (letters and digits)"
    return f"is invalid ({error.validator})"


def _article(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def _plain(error: ValidationError) -> str:
    value = error.instance
    match error.validator:
        case "type":
            expected = error.validator_value
            names = [str(n) for n in expected] if isinstance(expected, list) else [str(expected)]
            wanted = _article(" or ".join(names))
            if isinstance(value, Mapping | list):
                # An object or array may hold tokens (a rule's DestinationToken): never repeat it.
                found = "object" if isinstance(value, Mapping) else "array"
                return f"must be {wanted}, not {_article(found)}"
            return f"{_shown(value)} is not {wanted}"
        case "enum":
            choices = error.validator_value if isinstance(error.validator_value, list) else []
            return f"{_shown(value)} is not one of {', '.join(map(repr, choices))}"
        case "minLength":
            return "must not be empty"
        case "maxLength":
            length = len(value) if isinstance(value, str) else 0
            return f"is {length} characters long; at most {error.validator_value} are allowed"
        case "pattern":
            return f"{_shown(value)} does not match {error.validator_value!r}"
    return mask_url_credentials(str(error.message))


def _shown(value: object) -> str:
    """A short quote of a value: never a huge input whole, never a password in a URL."""
    if isinstance(value, str):
        return excerpt(mask_url_credentials(value))
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:40]}…"
