"""A property-based fuzzer of the REST API: schemathesis reads config/openapi.json and
hypothesis drives requests that fit it (positive) and that do not (negative) against a live
Orthanc with the plugin. Whatever arrives: no 5xx, Orthanc lives, every 4xx names its field,
every answer has a status and a shape the document gives, and no token appears in any answer. Bounded: EXAMPLES cases per operation and mode."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration.test_switching import Env
from tests.kheops_server import KheopsTestServer
from tests.orthanc_process import OrthancProcess

pytestmark = pytest.mark.integration

DOCUMENT = Path(__file__).resolve().parent.parent.parent / "config" / "openapi.json"
EXAMPLES = 20  # 26 operation-mode pairs x at most 20: about 440 requests, some 10 s


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with KheopsTestServer() as kheops:
        made = Env(kheops)
        orthanc = OrthancProcess(tmp_path_factory.mktemp("api-fuzz"), kheops=made.section())
        made.orthancs.append(orthanc)
        with orthanc:
            made.create("fuzz", made.album()[1])
            yield made
        made.assert_no_token_shown()


_SCHEMA = schemathesis.openapi.from_path(str(DOCUMENT))
_CONFORMANCE = [status_code_conformance, content_type_conformance, response_schema_conformance]
_OPERATIONS = [r.ok() for r in _SCHEMA.get_all_operations() if isinstance(r, Ok)]
# Negative cases need a query or a body to break: a path parameter that is any text but "/"
# has no negative value a URL can carry.
_CASES = [
    pytest.param(operation, mode, id=f"{operation.label} {mode.value}")
    for operation in _OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or len(operation.query) + len(operation.body)
]


@pytest.mark.parametrize(("operation", "mode"), _CASES)
def test_no_request_the_document_describes_or_breaks_gets_a_5xx_or_a_token(
    fuzzed: Env, operation: schemathesis.APIOperation, mode: GenerationMode
) -> None:
    cases: list[int] = []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
    def request(case: schemathesis.Case, data: st.DataObject) -> None:
        response = case.call(base_url=fuzzed.orthanc.url, timeout=30)
        cases.append(response.status_code)
        text = response.content.decode("utf-8", errors="replace")
        fuzzed.answers.append(text)
        assert response.status_code < 500, f"{case.method} {case.path}: {text[:300]}"
        if 400 <= response.status_code < 500 and response.status_code != 405:
            field = response.json().get("Field")
            assert isinstance(field, str) and field, f"{case.method} {case.path}: {text[:300]}"
        if mode is GenerationMode.POSITIVE:
            # The answer is one the document lists, of the shape it gives. (Not for negative
            # cases: Orthanc reads a path step of "\\" or "..." itself, onto another route.)
            case.validate_response(response, checks=_CONFORMANCE)

    request()

    assert cases
    assert fuzzed.orthanc.get("/system").status_code == 200
