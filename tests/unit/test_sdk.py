"""The SDK calls the shell makes, chosen by what the running SDK offers (sdk.py), with fakes of
python plugin 4.0 (Orthanc 1.10), 5.0 (1.12) and 7.1 (1.13)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from orthanc_kheops.sdk import (
    SUPPORTED,
    Sdk,
    UnsupportedPlatform,
    ascii_json,
    check_platform,
    orthanc_version,
)

_PLUGIN_4_0 = {
    "CheckVersionAdvanced",
    "GenerateRestApiAuthorizationToken",
    "GetConfiguration",
    "GetConfigurationPath",
    "ExtendOrthancExplorer",
    "LogError",
    "LogInfo",
    "LogWarning",
    "RegisterOnChangeCallback",
    "RegisterOnStoredInstanceCallback",
    "RegisterReceivedInstanceCallback",
    "RegisterRestCallback",
    "SetMetricsValue",
    "SetRootUri",
}
_PLUGIN_5_0 = _PLUGIN_4_0 | {"SetRootUri2"}
_PLUGIN_7_1 = _PLUGIN_5_0 | {"SetMetricsIntegerValue"}


class FakeOrthanc:
    """The `orthanc` module of one python plugin on one core; calls are recorded.

    Only the functions of `functions` exist; those a test did not expect raise.
    """

    class MetricsType:
        DEFAULT = 0

    def __init__(self, core: tuple[int, int, int], functions: set[str]) -> None:
        self._core = core
        self._functions = functions
        self.calls: list[tuple[Any, ...]] = []

    def __getattr__(self, name: str) -> Any:
        if name not in self._functions:
            raise AttributeError(name)
        if name == "CheckVersionAdvanced":
            return lambda *version: int(self._core >= version)

        def record(*arguments: Any) -> None:
            if name in ("LogError", "LogInfo", "LogWarning", "GetConfiguration"):
                raise NotImplementedError(name)
            self.calls.append((name, *arguments))

        return record


class FakeOutput:
    """RestOutput of python plugin 4.0 (`sizes` True) or 4.2 and later; calls are recorded.

    Like the real one, a call with the other form raises TypeError before sending anything.
    """

    def __init__(self, *, sizes: bool) -> None:
        self._sizes = sizes
        self.calls: list[tuple[Any, ...]] = []
        self.refused = 0

    def AnswerBuffer(self, body: bytes, content_type: str) -> None:
        self.calls.append(("AnswerBuffer", body, content_type))

    def SetHttpHeader(self, key: str, value: str) -> None:
        self.calls.append(("SetHttpHeader", key, value))

    def SendHttpStatus(self, status: int, body: bytes | str, *size: int) -> None:
        if len(size) != int(self._sizes) or not isinstance(body, str if self._sizes else bytes):
            self.refused += 1
            raise TypeError(f"Bad types for the arguments ({2 + self._sizes} arguments expected)")
        self.calls.append(("SendHttpStatus", status, body, *size))

    def __getattr__(self, name: str) -> Any:
        raise NotImplementedError(name)


BODY = json.dumps({"HttpStatus": 400, "Message": "Condition: café … 🩻"}, ensure_ascii=False)


# --- which platform ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("core", "expected"),
    [((1, 10, 1), "1.10.1"), ((1, 12, 7), "1.12.7"), ((1, 13, 0), "1.13.0"), ((2, 0, 3), "2.0.3")],
)
def test_the_orthanc_version_is_found_with_the_sdks_own_check(
    core: tuple[int, int, int], expected: str
) -> None:
    assert orthanc_version(lambda *version: int(core >= version)) == expected


def test_a_core_that_passes_every_check_is_a_mainline_build() -> None:
    assert orthanc_version(lambda *version: 1) == "mainline"


def test_bookworms_stack_is_supported_and_named() -> None:
    running = check_platform(
        FakeOrthanc((1, 10, 1), _PLUGIN_4_0), python=(3, 11, 2), sqlite=(3, 40, 1)
    )

    assert (running.orthanc, running.python) == ("1.10.1", "3.11.2")


def test_a_python_whose_sqlite_lacks_what_the_queue_uses_is_refused() -> None:
    with pytest.raises(UnsupportedPlatform) as refused:
        check_platform(FakeOrthanc((1, 12, 7), _PLUGIN_5_0), python=(3, 11, 2), sqlite=(3, 37, 2))

    assert str(refused.value) == f"needs {SUPPORTED}; this is SQLite 3.37.2 (Python's sqlite3)"


@pytest.mark.parametrize(
    ("core", "functions", "python", "seen"),
    [
        ((1, 9, 7), _PLUGIN_4_0, (3, 11, 2), "Orthanc 1.9.7"),
        ((1, 12, 7), _PLUGIN_5_0, (3, 10, 12), "Python 3.10.12"),
        (
            (1, 10, 1),
            _PLUGIN_4_0 - {"RegisterReceivedInstanceCallback"},
            (3, 11, 2),
            "a python plugin without RegisterReceivedInstanceCallback",
        ),
        ((1, 5, 7), {"LogError"}, (3, 9, 2), "Python 3.9.2 and Orthanc older than 1.10"),
    ],
)
def test_an_older_platform_is_refused_naming_what_is_needed_and_what_it_is(
    core: tuple[int, int, int], functions: set[str], python: tuple[int, int, int], seen: str
) -> None:
    with pytest.raises(UnsupportedPlatform) as refused:
        check_platform(FakeOrthanc(core, functions), python=python)

    assert str(refused.value).startswith(f"needs {SUPPORTED}; this is {seen}")
    assert "Orthanc 1.10.0" in SUPPORTED and "4.0" in SUPPORTED and "3.11" in SUPPORTED
    assert "SQLite 3.38" in SUPPORTED


# --- REST answers -----------------------------------------------------------------------------


def test_a_200_answer_carries_its_content_type_on_every_stack() -> None:
    for core, functions, sizes in [
        ((1, 10, 1), _PLUGIN_4_0, True),
        ((1, 13, 0), _PLUGIN_7_1, False),
    ]:
        output = FakeOutput(sizes=sizes)

        Sdk(FakeOrthanc(core, functions)).answer(output, 200, BODY.encode(), "application/json")

        assert output.calls == [("AnswerBuffer", BODY.encode(), "application/json")]


def test_python_plugin_4_0_gets_the_body_as_text_with_its_size_in_bytes() -> None:
    sdk = Sdk(FakeOrthanc((1, 10, 1), _PLUGIN_4_0))
    output = FakeOutput(sizes=True)

    sdk.answer(output, 400, BODY.encode(), "application/json")

    assert output.calls == [
        ("SetHttpHeader", "Content-Type", "application/json"),
        ("SendHttpStatus", 400, BODY, len(BODY.encode())),
    ]


def test_the_form_python_plugin_4_0_takes_is_chosen_once() -> None:
    sdk = Sdk(FakeOrthanc((1, 10, 1), _PLUGIN_4_0))
    output = FakeOutput(sizes=True)

    for status in (400, 404, 409):
        sdk.answer(output, status, BODY.encode(), "application/json")

    assert output.refused == 1
    assert [call[1] for call in output.calls if call[0] == "SendHttpStatus"] == [400, 404, 409]


def test_python_plugin_5_and_later_get_status_and_body() -> None:
    sdk = Sdk(FakeOrthanc((1, 11, 3), _PLUGIN_5_0))
    output = FakeOutput(sizes=False)

    sdk.answer(output, 201, BODY.encode(), "application/json")
    sdk.answer(output, 502, BODY.encode(), "application/json")

    assert output.refused == 0
    assert output.calls[:2] == [
        ("SetHttpHeader", "Content-Type", "application/json"),
        ("SendHttpStatus", 201, BODY.encode()),
    ]


@pytest.mark.parametrize("core", [(1, 12, 2), (1, 12, 7), (1, 13, 0)])
def test_where_orthanc_sets_its_own_content_type_there_is_no_second_and_the_body_is_ascii(
    core: tuple[int, int, int],
) -> None:
    sdk = Sdk(FakeOrthanc(core, _PLUGIN_7_1))
    output = FakeOutput(sizes=False)

    sdk.answer(output, 400, BODY.encode(), "application/json")

    [(call, status, body)] = output.calls
    assert (call, status) == ("SendHttpStatus", 400)
    assert body.isascii()
    assert json.loads(body.decode("latin-1")) == json.loads(BODY)


def test_orthanc_before_1_12_2_gets_the_content_type_header_of_the_plugin() -> None:
    sdk = Sdk(FakeOrthanc((1, 12, 1), _PLUGIN_5_0))
    output = FakeOutput(sizes=False)

    sdk.answer(output, 404, BODY.encode(), "application/json")

    assert output.calls[0] == ("SetHttpHeader", "Content-Type", "application/json")


def test_ascii_json_is_the_same_document_whatever_the_characters() -> None:
    for document in ({"a": "é"}, {"Message": "… 🩻 \u2028 \\u00e9"}, ["plain"], {"n": 1.5e300}):
        body = json.dumps(document, ensure_ascii=False).encode()

        converted = ascii_json(body)

        assert converted.isascii()
        assert json.loads(converted) == document
    assert ascii_json(b'{"a": 1}') == b'{"a": 1}'


# --- metrics and the root URI ------------------------------------------------------------------


def test_counts_are_exact_integer_metrics_where_the_sdk_has_them() -> None:
    orthanc = FakeOrthanc((1, 13, 0), _PLUGIN_7_1)
    sdk = Sdk(orthanc)

    sdk.set_metric("kheops_stow_sent_bytes_total", 2**40 + 1)
    sdk.set_metric("kheops_last_send_age_seconds", 1.25)

    assert orthanc.calls == [
        ("SetMetricsIntegerValue", "kheops_stow_sent_bytes_total", 2**40 + 1, 0),
        ("SetMetricsValue", "kheops_last_send_age_seconds", 1.25, 0),
    ]


def test_counts_are_float_metrics_on_an_sdk_without_integer_ones() -> None:
    orthanc = FakeOrthanc((1, 12, 7), _PLUGIN_5_0)

    Sdk(orthanc).set_metric("kheops_instances_sent_total", 3)

    assert orthanc.calls == [("SetMetricsValue", "kheops_instances_sent_total", 3.0, 0)]
    assert isinstance(orthanc.calls[0][2], float)


@pytest.mark.parametrize(
    ("functions", "expected"),
    [
        (_PLUGIN_4_0, ("SetRootUri", "/kheops/app/")),
        (_PLUGIN_5_0, ("SetRootUri2", "python", "/kheops/app/")),
    ],
)
def test_the_root_uri_goes_through_the_call_orthanc_does_not_deprecate(
    functions: set[str], expected: tuple[str, ...]
) -> None:
    orthanc = FakeOrthanc((1, 12, 7), functions)

    Sdk(orthanc).set_root_uri("/kheops/app/")

    assert orthanc.calls == [expected]


@pytest.mark.parametrize(
    ("core", "costly"),
    [((1, 10, 1), False), ((1, 11, 3), False), ((1, 12, 0), True), ((1, 13, 0), True)],
)
def test_reads_through_the_sdk_are_taken_as_costly_from_orthanc_1_12(
    core: tuple[int, int, int], costly: bool
) -> None:
    assert Sdk(FakeOrthanc(core, _PLUGIN_5_0)).costly_reads is costly
