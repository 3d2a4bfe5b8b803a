"""Properties of the condition language, driven by hypothesis.

Conditions are generated from the grammar of the language (every function, every tag form,
every operator spelling, quotes doubled inside strings) together with an independent reference
evaluation written from the language's description; each is evaluated on generated datasets
and must agree. Mutated and arbitrary text must only ever compile or raise ConditionError.
Case counts: 400 generated conditions x their datasets, 1000 mutations, 500 arbitrary texts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from orthanc_kheops.switching.conditions import ConditionError, compile_condition

Values = Mapping[str, str | None]  # keyword -> value as stored (None: absent)
KEYWORDS = ("StudyDescription", "SeriesDescription", "StationName", "InstitutionName")
_TEXT = st.text(alphabet="ab'\"é", min_size=0, max_size=3)


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


@dataclass(frozen=True)
class Generated:
    text: str
    reference: Callable[[Values], bool]


def _value(values: Values, keyword: str) -> str | None:
    """The reference's reading of a value: an empty one is no value."""
    value = values.get(keyword)
    return value or None


_TESTS: dict[str, Callable[[str, str], bool]] = {
    "tagValueIsPresent": lambda value, literal: value == literal,
    "tagValueContains": lambda value, literal: literal in value,
    "tagValueBeginsWith": lambda value, literal: value.startswith(literal),
    "tagValueEndsWith": lambda value, literal: value.endswith(literal),
}


@st.composite
def _tag(draw: st.DrawFn, keyword: str) -> str:
    number = tag_for_keyword(keyword)
    assert number is not None
    group, element = divmod(number, 0x10000)
    return draw(
        st.sampled_from(
            [
                f"#Tag.{keyword}",
                f"0x{number:08X}",
                f"'{group:04X}{element:04x}'",
                f'"({group:04x},{element:04X})"',
                str(number),
            ]
        )
    )


def _literal(text: str, quote: str) -> str:
    return quote + text.replace(quote, quote * 2) + quote


@st.composite
def _leaf(draw: st.DrawFn) -> Generated:
    keyword = draw(st.sampled_from(KEYWORDS))
    tag = draw(_tag(keyword))
    function = draw(st.sampled_from([*_TESTS, "tagIsPresent"]))
    if function == "tagIsPresent":
        return Generated(f"tagIsPresent({tag})", lambda v: _value(v, keyword) is not None)
    literal = draw(_TEXT)
    quoted = _literal(literal, draw(st.sampled_from(["'", '"'])))
    test = _TESTS[function]

    def reference(values: Values) -> bool:
        value = _value(values, keyword)
        return value is not None and test(value, literal)

    return Generated(f"{function}({tag},{draw(_space())}{quoted})", reference)


def _space() -> st.SearchStrategy[str]:
    return st.sampled_from(["", " ", "  ", "\n", "\t"])


def _extend(children: st.SearchStrategy[Generated]) -> st.SearchStrategy[Generated]:
    @st.composite
    def combined(draw: st.DrawFn) -> Generated:
        left, right = draw(children), draw(children)
        space = draw(_space())
        kind = draw(st.sampled_from(["and", "or", "not", "paren"]))
        if kind == "not":
            word = draw(st.sampled_from(["!", "not ", "NOT ", "! "]))
            return Generated(f"{word}({left.text})", lambda v: not left.reference(v))
        if kind == "paren":
            return Generated(f"({space}{left.text}{space})", left.reference)
        words = ["&&", " and ", " AND "] if kind == "and" else ["||", " or ", " Or "]
        word = draw(st.sampled_from(words))
        text = f"({left.text}){space}{word}{space}({right.text})"
        if kind == "and":
            return Generated(text, lambda v: left.reference(v) and right.reference(v))
        return Generated(text, lambda v: left.reference(v) or right.reference(v))

    return combined()


CONDITIONS = st.recursive(_leaf(), _extend, max_leaves=6)
DATASETS = st.fixed_dictionaries({}, optional=dict.fromkeys(KEYWORDS, _TEXT))


def _dataset(values: Values) -> Dataset:
    dataset = Dataset()
    for keyword, value in values.items():
        if value is not None:
            setattr(dataset, keyword, value)
    return dataset


@_settings(400)
@given(generated=CONDITIONS, datasets=st.lists(DATASETS, min_size=1, max_size=4))
def test_a_generated_condition_agrees_with_the_reference_on_every_dataset(
    generated: Generated, datasets: list[dict[str, str]]
) -> None:
    condition = compile_condition(generated.text)

    for values in datasets:
        assert condition.matches(_dataset(values)) == generated.reference(values), (
            generated.text,
            values,
        )


_NOISE = st.sampled_from(list("()!&|'\"#.,;=<> \n\\x0aéT") + ["and", "or", "not", "Tag", "0x"])


@st.composite
def _mutated(draw: st.DrawFn) -> str:
    text = draw(CONDITIONS).text
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(text)))
        match draw(st.sampled_from(["delete", "insert", "truncate", "repeat"])):
            case "delete":
                text = text[:position] + text[position + 1 :]
            case "insert":
                text = text[:position] + draw(_NOISE) + text[position:]
            case "truncate":
                text = text[:position]
            case "repeat":
                text = text[:position] + text[position:] * 2
    return text


def _compiles_or_refuses(text: str) -> None:
    try:
        compile_condition(text)
    except ConditionError as error:
        assert str(error).startswith("Condition: "), str(error)


@_settings(1000)
@given(text=_mutated())
def test_a_mutated_condition_compiles_or_raises_condition_error_only(text: str) -> None:
    _compiles_or_refuses(text)


@_settings(500)
@given(text=st.text(max_size=200) | st.text(alphabet="()!&|'\"#.Tag0x, ", max_size=1100))
def test_arbitrary_text_compiles_or_raises_condition_error_only(text: str) -> None:
    _compiles_or_refuses(text)
