"""The REST API's OpenAPI document (config/openapi.json) is valid, and the README's route
tables list exactly its routes. A new route goes into the document and a README table: the
document is the one place routes are described, and these tests keep the two together."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import schemathesis
from jsonschema import Draft4Validator, Draft202012Validator
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.definitions import OPENAPI_30  # the meta-schema it checks with

ROOT = Path(__file__).resolve().parent.parent.parent
DOCUMENT = ROOT / "config" / "openapi.json"
_METHODS = ("get", "put", "post", "delete")
_ROW = re.compile(
    r"^\| ((?:`(?:GET|PUT|POST|DELETE)`, )*`(?:GET|PUT|POST|DELETE) /kheops/[^`]*`) \|"
)


def _document() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DOCUMENT.read_text(encoding="utf-8"))
    return document


def documented_routes() -> set[str]:
    """`METHOD /path` of every operation of the document."""
    return {
        f"{method.upper()} {path}"
        for path, item in _document()["paths"].items()
        for method in _METHODS
        if method in item
    }


def readme_routes() -> set[str]:
    """`METHOD /path` of every row of the README's route tables (query strings left out)."""
    routes: set[str] = set()
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        match = _ROW.match(line)
        if match is None:
            continue
        cell = match.group(1)
        path = re.search(r"/kheops/[^`?]*", cell)
        assert path is not None
        routes.update(f"{m} {path.group(0)}" for m in re.findall(r"GET|PUT|POST|DELETE", cell))
    return routes


def test_the_document_is_valid_against_the_openapi_3_0_meta_schema() -> None:
    errors = [e.message for e in Draft4Validator(OPENAPI_30).iter_errors(_document())]

    assert errors == []


def test_the_document_loads_as_openapi_with_every_operation() -> None:
    schema = schemathesis.openapi.from_path(str(DOCUMENT))

    results = list(schema.get_all_operations())
    labels = {result.ok().label for result in results if isinstance(result, Ok)}

    assert [result for result in results if not isinstance(result, Ok)] == []

    assert labels == documented_routes()
    assert len(labels) >= 15


def test_every_schema_in_the_document_is_a_valid_json_schema() -> None:
    for name, schema in _document()["components"]["schemas"].items():
        assert name and Draft202012Validator.check_schema(schema) is None


def test_every_operation_documents_its_answers_and_every_error_is_the_error_shape() -> None:
    for path, item in _document()["paths"].items():
        for method in _METHODS:
            if method not in item:
                continue
            responses = item[method]["responses"]
            assert any(code.startswith("2") for code in responses), f"{method} {path}"
            for code, response in responses.items():
                if code.startswith(("4", "5")):
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, f"{method} {path}"
            if "requestBody" in item[method]:
                assert "400" in responses and "413" in responses, f"{method} {path}"


def test_the_readme_route_tables_list_exactly_the_documented_routes() -> None:
    assert readme_routes() == documented_routes()
