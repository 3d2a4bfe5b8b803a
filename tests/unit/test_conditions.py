"""The switching-condition language: Karnak's syntax, our grammar, our evaluation."""

import io
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from orthanc_kheops.switching.conditions import (
    MAX_DEPTH,
    MAX_LENGTH,
    Condition,
    ConditionError,
    compile_condition,
    tag_value,
)

PRIVATE_TAG = 0x00091010


def dataset(**keywords: Any) -> Dataset:
    """An in-memory dataset with the given top-level elements."""
    result = Dataset()
    for keyword, value in keywords.items():
        setattr(result, keyword, value)
    return result


def encoded(source: Dataset, *, implicit_vr: bool = False) -> tuple[bytes, Dataset]:
    """The bytes of `source` as written to a file, and the dataset pydicom reads back from them."""
    source.file_meta = FileMetaDataset()
    source.file_meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian if implicit_vr else ExplicitVRLittleEndian
    )
    buffer = io.BytesIO()
    source.save_as(buffer)
    return buffer.getvalue(), pydicom.dcmread(io.BytesIO(buffer.getvalue()), force=True)


def reread(source: Dataset, *, implicit_vr: bool = False) -> Dataset:
    return encoded(source, implicit_vr=implicit_vr)[1]


def matches(condition: str, data: Dataset) -> bool:
    return compile_condition(condition).matches(data)


def rejection(condition: str) -> ConditionError:
    with pytest.raises(ConditionError) as caught:
        compile_condition(condition)
    message = str(caught.value)
    assert message.startswith("Condition: ")
    for internal in ("__ANON", "_LPAR", "_RPAR", "$END", "WORD", "OTHER", "Token(", "Tree("):
        assert internal not in message
    return caught.value


# ---------------------------------------------------------------------------------------------
# The examples of the specification

GE = "755523-st222-GE"
EXAMPLES: list[tuple[str, dict[str, Any], bool]] = [
    ('tagValueIsPresent(#Tag.StudyDescription, "755523-st222-GE")', {"StudyDescription": GE}, True),
    (
        'tagValueIsPresent(#Tag.StudyDescription, "755523-st222-GE")',
        {"StudyDescription": GE + "2"},
        False,
    ),
    (
        'tagValueIsPresent(#Tag.StudyDescription, "755523-st222-GE")',
        {"StudyDescription": "st222"},
        False,
    ),
    ('tagValueIsPresent(#Tag.StudyDescription, "755523-st222-GE")', {}, False),
    ('tagValueIsPresent("0008,1030", "755523-st222-GE")', {"StudyDescription": GE}, True),
    ('tagValueIsPresent("0008,1030", "755523-st222-GE")', {"StudyDescription": "755523"}, False),
    (
        '!tagValueIsPresent(#Tag.StudyDescription, "755523-st222-GE")',
        {"StudyDescription": "CT"},
        True,
    ),
    ('!tagValueIsPresent(#Tag.StudyDescription, "755523-st222-GE")', {}, True),
    (
        '!tagValueIsPresent(#Tag.StudyDescription, "755523-st222-GE")',
        {"StudyDescription": GE},
        False,
    ),
    ('tagValueContains(#Tag.StudyDescription, "st222")', {"StudyDescription": GE}, True),
    (
        'tagValueContains(#Tag.StudyDescription, "st222")',
        {"StudyDescription": "Brain MRI st222"},
        True,
    ),
    (
        'tagValueContains(#Tag.StudyDescription, "st222")',
        {"StudyDescription": "Brain ST222"},
        False,
    ),
    ('tagValueContains(#Tag.StudyDescription, "st222")', {}, False),
    ('tagValueBeginsWith(#Tag.StudyDescription, "755523")', {"StudyDescription": GE}, True),
    ('tagValueBeginsWith(#Tag.StudyDescription, "755523")', {"StudyDescription": "x755523"}, False),
    ('tagValueEndsWith("0008,1030", "GE")', {"StudyDescription": GE}, True),
    ('tagValueEndsWith("0008,1030", "GE")', {"StudyDescription": "755523-ge"}, False),
    ('tagValueEndsWith("0008,1030", "GE")', {"StudyDescription": "GE-755523"}, False),
    ("tagIsPresent(#Tag.StudyDescription)", {"StudyDescription": "x"}, True),
    ("tagIsPresent(#Tag.StudyDescription)", {"StudyDescription": ""}, False),
    ("tagIsPresent(#Tag.StudyDescription)", {}, False),
    ("tagIsPresent('00100010')", {"PatientName": "Doe^John"}, True),
    ("tagIsPresent('00100010')", {"PatientName": ""}, False),
    ("tagIsPresent('00100010')", {"PatientID": "42"}, False),
    (
        'tagValueEndsWith(#Tag.StudyDescription, "GE") && tagValueContains(#Tag.StationName, "CT1234")',
        {"StudyDescription": GE, "StationName": "XCT1234"},
        True,
    ),
    (
        'tagValueEndsWith(#Tag.StudyDescription, "GE") && tagValueContains(#Tag.StationName, "CT1234")',
        {"StudyDescription": GE, "StationName": "CT9"},
        False,
    ),
    (
        'tagValueEndsWith(#Tag.StudyDescription, "GE") && tagValueContains(#Tag.StationName, "CT1234")',
        {"StudyDescription": "MR", "StationName": "CT1234"},
        False,
    ),
    (
        'tagValueIsPresent("(0008,0060)", "CT") || tagValueContains("(0008,1030)", "BRAIN")',
        {"Modality": "CT"},
        True,
    ),
    (
        'tagValueIsPresent("(0008,0060)", "CT") || tagValueContains("(0008,1030)", "BRAIN")',
        {"Modality": "MR", "StudyDescription": "HEAD BRAIN"},
        True,
    ),
    (
        'tagValueIsPresent("(0008,0060)", "CT") || tagValueContains("(0008,1030)", "BRAIN")',
        {"Modality": "MR", "StudyDescription": "Brain"},
        False,
    ),
    (
        "tagValueIsPresent(#Tag.Modality, 'CT') and not tagIsPresent(#Tag.PatientAge)",
        {"Modality": "CT"},
        True,
    ),
    (
        "tagValueIsPresent(#Tag.Modality, 'CT') and not tagIsPresent(#Tag.PatientAge)",
        {"Modality": "CT", "PatientAge": "045Y"},
        False,
    ),
    (
        "tagValueIsPresent(#Tag.Modality, 'CT') and not tagIsPresent(#Tag.PatientAge)",
        {"Modality": "MR"},
        False,
    ),
    ('tagValueBeginsWith(#Tag.SeriesNumber, "1")', {"SeriesNumber": 1}, True),
    ('tagValueBeginsWith(#Tag.SeriesNumber, "1")', {"SeriesNumber": 12}, True),
    ('tagValueBeginsWith(#Tag.SeriesNumber, "1")', {"SeriesNumber": 21}, False),
    ('tagValueBeginsWith(#Tag.SeriesNumber, "1")', {}, False),
    ("tagValueContains(#Tag.SpecimenLabelInImage, 'YES')", {"SpecimenLabelInImage": "YES"}, True),
    ("tagValueContains(#Tag.SpecimenLabelInImage, 'YES')", {"SpecimenLabelInImage": "NO"}, False),
    ("!tagValueContains(#Tag.StationName,'ICT256')", {"StationName": "CT1"}, True),
    ("!tagValueContains(#Tag.StationName,'ICT256')", {}, True),
    ("!tagValueContains(#Tag.StationName,'ICT256')", {"StationName": "XICT256Y"}, False),
]


@pytest.mark.parametrize(("condition", "elements", "expected"), EXAMPLES)
def test_every_example_of_the_specification_matches_what_it_says(
    condition: str, elements: dict[str, Any], expected: bool
) -> None:
    assert matches(condition, dataset(**elements)) is expected


@pytest.mark.parametrize(("condition", "elements", "expected"), EXAMPLES)
def test_the_examples_give_the_same_result_on_a_dataset_read_from_a_file(
    condition: str, elements: dict[str, Any], expected: bool
) -> None:
    assert matches(condition, reread(dataset(**elements))) is expected


# ---------------------------------------------------------------------------------------------
# Rejected conditions: position and what was expected


def test_an_unknown_keyword_is_reported_with_its_column_and_the_closest_keyword() -> None:
    error = rejection("tagValueIsPresent(#Tag.Modalityy, 'CT')")
    assert str(error) == (
        "Condition: unknown DICOM keyword 'Modalityy' at column 24 (did you mean 'Modality'?)"
    )
    assert (error.line, error.column) == (1, 24)


@pytest.mark.parametrize(
    ("condition", "column", "fragments"),
    [
        (
            "tagIsPresent(#Tag.PatientName);",
            31,
            ["unexpected ';'", "expected '&&'/'and', '||'/'or'", "end of the condition"],
        ),
        ("tagValueIsPresent(Tag.Modality, 'CT')", 19, ["'Tag' without '#'", "#Tag."]),
        (
            'tagValueBeginWith(#Tag.PatientName, "jo")',
            1,
            ["unknown function 'tagValueBeginWith'", "did you mean 'tagValueBeginsWith'?"],
        ),
        (
            "tagValueIsPresent(#Tag.SeriesNumber, 1)",
            38,
            ["second argument of tagValueIsPresent", "the number 1", "not a string", "'1'"],
        ),
        ("T(java.lang.System).exit(0)", 1, ["unknown function 'T'", "tagValueIsPresent"]),
    ],
)
def test_the_rejected_forms_of_the_specification_say_where_and_what_was_expected(
    condition: str, column: int, fragments: list[str]
) -> None:
    error = rejection(condition)
    assert error.column == column
    assert f"at column {column}" in str(error)
    for fragment in fragments:
        assert fragment in str(error)


@pytest.mark.parametrize("blank", ["   ", "\t", "\n", " \r\n "])
def test_a_condition_of_only_whitespace_is_rejected(blank: str) -> None:
    assert "whitespace" in str(rejection(blank))


@pytest.mark.parametrize(
    ("condition", "column", "fragments"),
    [
        ("tagIsPresent(#Tag.PatientName) & true", 32, ["unexpected '&'", "use '&&' or 'and'"]),
        ("tagIsPresent(#Tag.PatientName) | true", 32, ["unexpected '|'", "use '||' or 'or'"]),
        ("new java.io.File('x')", 1, ["unknown function 'new'"]),
        ("#root", 1, ["unknown variable '#root'", "#Tag.<keyword>"]),
        ("tagIsPresent(#root)", 14, ["unknown variable '#root'"]),
        ("tagIsPresent(#this.x)", 14, ["unknown variable '#this'"]),
        ("tagIsPresent(#tag.PatientName)", 14, ["unknown variable '#tag'"]),
        ("tagIsPresent(0x00100010 + 1)", 25, ["unexpected '+'", "arithmetic"]),
        ("true - false", 6, ["unexpected '-'", "arithmetic"]),
        ("true ? true : false", 6, ["unexpected '?'", "ternary"]),
        ("tagIsPresent(#Tag.PatientName) matches 'x'", 32, ["'matches'", "regular expressions"]),
        ("tagIsPresent(#Tag.PatientName).toString()", 31, ["unexpected '.'", "method calls"]),
        ("tagIsPresent(#Tag.PatientName)['x']", 31, ["unexpected '['", "indexing"]),
        ("tagIsPresent(#Tag.PatientName) = true", 32, ["unexpected '='", "use '=='"]),
        ("tagIsPresent(#Tag.PatientName) > false", 32, ["unexpected '>'"]),
        ("tagIsPresent(#Tag.PatientName) lt true", 32, ["unexpected 'lt'"]),
        (
            "tagIsPresent(00081030)",
            14,
            ["decimal number 00081030 with a leading zero", "0x00081030", "'00081030'"],
        ),
        ("tagIsPresent(0010)", 14, ["leading zero", "0x0010"]),
        ("tagIsPresent(0x123456789)", 14, ["not a tag", "8 hex digits"]),
        ("tagIsPresent(4294967296)", 14, ["not a tag"]),
        ("tagIsPresent('PatientName')", 14, ["'PatientName' is not a tag", "#Tag.PatientName"]),
        ("tagIsPresent('(0008, 1030)')", 14, ["is not a tag", "did you mean '(0008,1030)'?"]),
        ("tagIsPresent('0008 1030')", 14, ["is not a tag", "did you mean '00081030'?"]),
        ("tagIsPresent('(00081030)')", 14, ["is not a tag", "'0008,1030'"]),
        ("tagIsPresent('0x00081030')", 14, ["is not a tag"]),
        ("tagIsPresent('0008,10300')", 14, ["is not a tag"]),
        ("tagIsPresent(PatientName)", 14, ["keyword 'PatientName' without '#Tag.'"]),
        ("tagIsPresent(#Tag.patientName)", 19, ["did you mean 'PatientName'?"]),
        ("tagIsPresent(#Tag.NoSuchKeywordAtAll)", 19, ["unknown DICOM keyword"]),
        ("TagIsPresent(#Tag.PatientName)", 1, ["did you mean 'tagIsPresent'?"]),
        ("tagValueIsPresent(#Tag.Modality, #Tag.Modality)", 34, ["is a tag, not a string"]),
        ("tagIsPresent(#Tag.PatientName, 'x')", 1, ["takes 1 argument (a tag), not 2"]),
        ("tagValueContains(#Tag.PatientName)", 1, ["takes 2 arguments", "not 1"]),
        ("tagIsPresent()", 14, ["unexpected ')'", "#Tag.<keyword>", "a string"]),
        ("tagIsPresent(#Tag.PatientName", 30, ["unexpected end of the condition", "')'"]),
        ("tagIsPresent(#Tag.PatientName) &&", 34, ["end of the condition", "a function"]),
        ("tagValueContains(#Tag.PatientName, 'Doe)", 36, ["unterminated string", "close it"]),
        ('tagValueContains(#Tag.PatientName, "Doe)', 36, ["unterminated string"]),
        ("true == true == true", 14, ["unexpected '=='"]),
        ("true andy false", 6, ["unexpected 'andy'"]),
        ("true\u00a0", 5, ["character U+00A0"]),
        ("tagIsPresent(#Tag PatientName)", 19, ["expected '.'"]),
        ("tagIsPresent(#Tag.)", 19, ["expected a DICOM keyword"]),
        ("tagIsPresent(true)", 14, ["unexpected 'true'"]),
        ("'CT' == 'CT'", 1, ["unexpected string 'CT'"]),
        ("tagValueIsPresent(#Tag.Modality, 'CT') ; true", 40, ["single expression"]),
    ],
)
def test_a_mistake_is_reported_with_its_column_and_advice(
    condition: str, column: int, fragments: list[str]
) -> None:
    error = rejection(condition)
    assert (error.line, error.column) == (1, column), str(error)
    assert f"at column {column}" in str(error)
    for fragment in fragments:
        assert fragment in str(error)


def test_an_operand_position_lists_what_may_start_a_condition() -> None:
    message = str(rejection("true && )"))
    assert "expected a function such as tagIsPresent(#Tag.PatientName)" in message
    assert "'!'/'not'" in message and "'('" in message and "'true'/'false'" in message


def test_a_mistake_on_a_later_line_is_reported_with_its_line_and_column() -> None:
    error = rejection("tagIsPresent(#Tag.PatientName)\n  && tagIsPresent(#Tag.Modalityy)")
    assert (error.line, error.column) == (2, 24)
    assert "at line 2, column 24" in str(error)


def test_a_typo_after_and_is_found_without_evaluating() -> None:
    error = rejection("false && tagValueIsPresent(#Tag.Modalty, 'CT')")
    assert "did you mean 'Modality'?" in str(error)


# ---------------------------------------------------------------------------------------------
# Limits


def test_a_condition_of_exactly_the_maximum_length_is_accepted() -> None:
    condition = "true" + " " * (MAX_LENGTH - 4)
    assert len(condition) == 1024
    assert compile_condition(condition).matches(Dataset())


def test_a_condition_one_character_too_long_is_rejected() -> None:
    error = rejection("true" + " " * (MAX_LENGTH - 3))
    assert error.column == 1025
    assert "too long" in str(error) and "1025 characters" in str(error) and "1024" in str(error)


def test_parentheses_may_nest_32_deep() -> None:
    assert MAX_DEPTH == 32
    assert matches("(" * 32 + "tagIsPresent(#Tag.PatientName)" + ")" * 32, dataset(PatientName="A"))


def test_parentheses_nested_33_deep_are_rejected_at_the_33rd() -> None:
    error = rejection("(" * 33 + "true" + ")" * 33)
    assert error.column == 33
    assert "nested more than 32 deep" in str(error)


def test_function_parentheses_do_not_count_as_nesting() -> None:
    assert matches("(" * 32 + "tagIsPresent(#Tag.PatientName)" + ")" * 32, dataset(PatientName="A"))
    assert compile_condition("(" * 16 + "true" + ")" * 16 + "&&" + "(" * 32 + "true" + ")" * 32)


def test_a_long_chain_of_negations_neither_overflows_the_stack_nor_changes_the_result() -> None:
    assert matches("!" * 1000 + "true", Dataset()) is True
    assert matches("!" * 1001 + "true", Dataset()) is False
    assert matches("not " * 200 + "false", Dataset()) is False


# ---------------------------------------------------------------------------------------------
# Operators, precedence, words


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ("true || false && false", True),  # && binds tighter than ||
        ("false && false || true", True),
        ("!false && false", False),  # ! binds tighter than &&
        ("!true || true", True),
        ("false == false && false", False),  # == binds tighter than &&
        ("true != true || true", True),  # == binds tighter than ||
        ("false || true == false", False),
        ("(true || false) && false", False),
        ("!(false && false)", True),
        ("true == true", True),
        ("true == false", False),
        ("false != true", True),
        ("false != false", False),
        ("true eq true", True),
        ("true ne true", False),
        ("!true == false", True),
        ("true", True),
        ("false", False),
    ],
)
def test_operators_bind_and_evaluate_as_in_spel(condition: str, expected: bool) -> None:
    assert matches(condition, Dataset()) is expected


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ("TRUE", True),
        ("False", False),
        ("true AND false", False),
        ("false Or true", True),
        ("NOT false", True),
        ("Not(false)", True),
        ("true and(true)", True),
        ("(false)or(true)", True),
        ("true EQ TRUE", True),
        ("true Ne FALSE", True),
        ("not not true", True),
        ("!true||true", True),
        ("true&&!false", True),
    ],
)
def test_word_operators_and_literals_are_case_insensitive(condition: str, expected: bool) -> None:
    assert matches(condition, Dataset()) is expected


@pytest.mark.parametrize(
    ("condition", "with_name", "without_name"),
    [
        ("tagIsPresent(#Tag.PatientName) == true", True, False),
        ("tagIsPresent(#Tag.PatientName) != false", True, False),
        ("tagIsPresent(#Tag.PatientName) == false", False, True),
        ("tagIsPresent(#Tag.PatientName) eq TRUE", True, False),
        ("tagIsPresent(#Tag.PatientName) ne true", False, True),
        ("true == tagIsPresent(#Tag.PatientName)", True, False),
        ("tagIsPresent(#Tag.PatientName) == tagIsPresent(#Tag.PatientID)", False, True),
        ("tagIsPresent(#Tag.Modality) && tagIsPresent(#Tag.PatientName) == true", True, False),
    ],
)
def test_comparisons_with_booleans_behave_like_karnak(
    condition: str, with_name: bool, without_name: bool
) -> None:
    assert matches(condition, dataset(Modality="CT", PatientName="Doe")) is with_name
    assert matches(condition, dataset(Modality="CT")) is without_name


@pytest.mark.parametrize(
    "condition",
    [
        "tagIsPresent(\n#Tag.PatientName\n)",
        "\ttagIsPresent( #Tag . PatientName )\r\n",
        "  tagIsPresent('00100010')  ",
        "tagIsPresent(#Tag.PatientName)\n&&\ntagIsPresent(#Tag.Modality)",
        "tagIsPresent(#Tag.PatientName)and\ttagIsPresent(#Tag.Modality)",
    ],
)
def test_spaces_tabs_and_newlines_between_tokens_are_ignored(condition: str) -> None:
    assert matches(condition, dataset(PatientName="Doe", Modality="CT"))


def test_evaluation_stops_at_the_first_operand_that_decides() -> None:
    class Recording(Dataset):
        def get(self, key: Any, default: Any = None) -> Any:
            read.append(key)
            return super().get(key, default)

    read: list[Any] = []
    data = Recording()
    data.PatientName = "Doe"
    condition = compile_condition(
        "tagIsPresent(#Tag.PatientName) || tagIsPresent(#Tag.Modality) && tagIsPresent(#Tag.PatientID)"
    )
    assert condition.matches(data)
    assert read == [0x00100010]
    read.clear()
    assert not compile_condition(
        "tagIsPresent(#Tag.Modality) && tagIsPresent(#Tag.PatientName)"
    ).matches(data)
    assert read == [0x00080060]


# ---------------------------------------------------------------------------------------------
# Strings and tag references


@pytest.mark.parametrize(
    ("literal", "value"),
    [
        ("'O''Brien'", "O'Brien"),
        ('"Say ""hi"""', 'Say "hi"'),
        ('"O\'Brien"', "O'Brien"),
        ("'Say \"hi\"'", 'Say "hi"'),
        ("'back\\slash'", "back\\slash"),
        ("'trailing\\'", "trailing\\"),
        ("'Genève 東京 ☢'", "Genève 東京 ☢"),
        ("'&& || ! ( ) #Tag.X'", "&& || ! ( ) #Tag.X"),
    ],
)
def test_string_literals_double_their_quote_and_keep_everything_else(
    literal: str, value: str
) -> None:
    assert matches(
        f"tagValueIsPresent(#Tag.StudyDescription, {literal})", dataset(StudyDescription=value)
    )
    assert not matches(
        f"tagValueIsPresent(#Tag.StudyDescription, {literal})",
        dataset(StudyDescription=value + "x"),
    )


@pytest.mark.parametrize(
    ("reference", "tag"),
    [
        ("#Tag.StudyDescription", 0x00081030),
        ("0x00081030", 0x00081030),
        ("0X00081030", 0x00081030),
        ("0x81030", 0x00081030),
        ("528432", 0x00081030),
        ("'00081030'", 0x00081030),
        ("'0008,1030'", 0x00081030),
        ("'(0008,1030)'", 0x00081030),
        ('"(0008,1030)"', 0x00081030),
        ("'0008103e'", 0x0008103E),
        ("'(0008,103E)'", 0x0008103E),
        ("0x0008103e", 0x0008103E),
        ("'00091010'", PRIVATE_TAG),
        ("0", 0),
    ],
)
def test_every_form_of_tag_reference_names_the_same_tag(reference: str, tag: int) -> None:
    condition = compile_condition(f"tagIsPresent({reference})")
    assert condition.tags == (tag,)
    assert all(isinstance(item, BaseTag) for item in condition.tags)


def test_the_tags_a_condition_reads_are_listed_once_in_order_of_first_appearance() -> None:
    condition = compile_condition(
        "tagIsPresent(#Tag.Modality) && (tagValueContains('0008,1030', 'x') "
        "|| !tagValueIsPresent(0x00080060, 'CT')) || tagIsPresent(#Tag.PatientName) == true"
    )
    assert condition.tags == (0x00080060, 0x00081030, 0x00100010)
    assert condition.text.startswith("tagIsPresent(#Tag.Modality)")


def test_an_empty_condition_matches_everything_and_reads_no_tag() -> None:
    condition = compile_condition("")
    assert isinstance(condition, Condition)
    assert condition.tags == ()
    assert condition.text == ""
    assert condition.matches(Dataset())
    assert condition.matches(dataset(Modality="CT"))


def test_a_compiled_condition_is_immutable() -> None:
    condition = compile_condition("true")
    with pytest.raises(AttributeError):
        condition.text = "false"  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# The value of a tag


def _sequence_dataset() -> Dataset:
    item = dataset(ReferencedSOPInstanceUID="1.2.3", StudyDescription="inside")
    return dataset(ReferencedStudySequence=Sequence([item]))


def _multi_dataset() -> Dataset:
    return dataset(
        SpecificCharacterSet="ISO_IR 192",
        ImageType=["ORIGINAL", "PRIMARY", "AXIAL"],
        Rows=512,
        AcquisitionMatrix=[0, 256, 256, 0],
        SliceThickness="1.50",
        PixelSpacing=["0.5", "0.75"],
        PatientName="Doe^John=ドウ^ジョン",
        StudyDescription="  padded both ends  ",
        SeriesInstanceUID="1.2.840.10008.1",
        StudyComments="  kept leading  ",
        ContentDate="20180102",
    )


@pytest.mark.parametrize(
    ("tag", "value"),
    [
        (0x00080008, "ORIGINAL\\PRIMARY\\AXIAL"),
        (0x00280010, "512"),
        (0x00181310, "0\\256\\256\\0"),
        (0x00180050, "1.50"),
        (0x00280030, "0.5\\0.75"),
        (0x00100010, "Doe^John=ドウ^ジョン"),
        (0x00081030, "padded both ends"),
        (0x0020000E, "1.2.840.10008.1"),
        (0x00324000, "  kept leading"),
        (0x00080023, "20180102"),
        (0x00100020, None),
    ],
)
@pytest.mark.parametrize("from_file", [False, True], ids=["in memory", "read from a file"])
def test_the_value_of_a_tag_follows_the_specification(
    tag: int, value: str | None, from_file: bool
) -> None:
    data = reread(_multi_dataset()) if from_file else _multi_dataset()
    assert tag_value(data, tag) == value
    assert tag_value(data, BaseTag(tag)) == value


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ("tagValueIsPresent(#Tag.ImageType, 'ORIGINAL')", False),
        ("tagValueContains(#Tag.ImageType, 'PRIMARY')", True),
        ("tagValueIsPresent(#Tag.ImageType, 'ORIGINAL\\PRIMARY\\AXIAL')", True),
        ("tagValueEndsWith(#Tag.ImageType, 'AXIAL')", True),
        ("tagValueContains(#Tag.ImageType, 'PRIMARY\\AXIAL')", True),
        ("tagIsPresent(#Tag.ImageType)", True),
        ("tagValueIsPresent(#Tag.Rows, '512')", True),
        ("tagValueIsPresent(#Tag.Rows, '512.0')", False),
        ("tagValueIsPresent(#Tag.SliceThickness, '1.50')", True),
        ("tagValueIsPresent(#Tag.SliceThickness, '1.5')", False),
        ("tagValueIsPresent(#Tag.PatientName, 'Doe^John=ドウ^ジョン')", True),
        ("tagValueBeginsWith(#Tag.PatientName, 'Doe^John')", True),
        ("tagValueIsPresent(#Tag.StudyDescription, 'padded both ends')", True),
        ("tagValueIsPresent(#Tag.StudyComments, '  kept leading')", True),
        ("tagValueBeginsWith(#Tag.ContentDate, '2018')", True),
        ("tagValueBeginsWith(#Tag.ContentDate, '2019')", False),
    ],
)
def test_functions_compare_the_value_as_text(condition: str, expected: bool) -> None:
    assert matches(condition, _multi_dataset()) is expected
    assert matches(condition, reread(_multi_dataset())) is expected


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ("tagValueIsPresent(#Tag.Modality, 'ct')", False),
        ("tagValueIsPresent(#Tag.Modality, 'CT')", True),
        ("tagValueContains(#Tag.Modality, 'C*')", False),
        ("tagValueContains(#Tag.Modality, '.*')", False),
        ("tagValueContains(#Tag.Modality, '')", True),
        ("tagValueBeginsWith(#Tag.Modality, '')", True),
        ("tagValueContains(#Tag.PatientID, '')", False),
        ("!tagValueContains(#Tag.PatientID, '')", True),
    ],
)
def test_comparison_is_literal_and_case_sensitive(condition: str, expected: bool) -> None:
    assert matches(condition, dataset(Modality="CT")) is expected


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(Dataset(), id="absent"),
        pytest.param(dataset(StudyDescription=""), id="zero-length"),
        pytest.param(reread(dataset(StudyDescription="")), id="zero-length in a file"),
        pytest.param(dataset(StudyDescription="   "), id="only padding"),
        pytest.param(reread(dataset(StudyDescription="   ")), id="only padding in a file"),
        pytest.param(_sequence_dataset(), id="only inside a sequence item"),
    ],
)
def test_a_tag_without_a_value_fails_every_function_and_passes_their_negation(
    data: Dataset,
) -> None:
    assert tag_value(data, 0x00081030) is None
    for function in (
        "tagValueIsPresent",
        "tagValueContains",
        "tagValueBeginsWith",
        "tagValueEndsWith",
    ):
        assert not matches(f"{function}(#Tag.StudyDescription, '')", data)
        assert matches(f"!{function}(#Tag.StudyDescription, '')", data)
    assert not matches("tagIsPresent(#Tag.StudyDescription)", data)
    assert matches("!tagIsPresent(#Tag.StudyDescription)", data)


@pytest.mark.parametrize("from_file", [False, True], ids=["in memory", "read from a file"])
def test_a_sequence_has_no_value(from_file: bool) -> None:
    data = reread(_sequence_dataset()) if from_file else _sequence_dataset()
    assert tag_value(data, 0x00081110) is None
    assert not matches("tagIsPresent(#Tag.ReferencedStudySequence)", data)
    assert not matches("tagValueContains(#Tag.ReferencedStudySequence, '')", data)
    assert not matches("tagValueContains(#Tag.ReferencedSOPInstanceUID, '1.2.3')", data)


def test_tag_is_present_looks_at_the_first_value_only() -> None:
    data = dataset(ImageType=["", "PRIMARY"])
    assert tag_value(data, 0x00080008) == "\\PRIMARY"
    assert not matches("tagIsPresent(#Tag.ImageType)", data)
    assert matches("tagValueContains(#Tag.ImageType, 'PRIMARY')", data)
    assert matches("tagIsPresent(#Tag.ImageType)", dataset(ImageType=["ORIGINAL", ""]))


def test_binary_data_has_no_value() -> None:
    data = Dataset()
    data.add_new(0x7FE00010, "OB", b"\x00\x01")
    assert tag_value(data, 0x7FE00010) is None
    assert not matches("tagIsPresent(#Tag.PixelData)", data)


def test_an_attribute_tag_is_written_as_eight_hex_digits() -> None:
    data = Dataset()
    data.add_new(0x00209165, "AT", [0x00100010, 0x0008103E])
    assert tag_value(reread(data), 0x00209165) == "00100010\\0008103E"


@pytest.mark.parametrize(
    ("vr", "tag", "values", "text"),
    [
        ("US", 0x00280010, [512], "512"),
        ("SS", 0x00189219, [-5, 7], "-5\\7"),
        ("UL", 0x00080301, [4294967295], "4294967295"),
        ("SL", 0x00189216, [-2147483648], "-2147483648"),
        ("FL", 0x00189087, [0.1], "0.1"),
        ("FL", 0x00189087, [512.0], "512"),
        ("FL", 0x00189087, [-2.5, 1.5e10, 1e-4, 123456.78], "-2.5\\1.5E10\\1E-4\\123456.78"),
        ("FL", 0x00189087, [0.001, 1e7, 3.4028234663852886e38], "0.001\\1E7\\3.4028235E38"),
        ("FL", 0x00189087, [0.0, -0.0], "0\\-0"),
        ("FL", 0x00189087, [float("nan"), float("-inf")], "NaN\\-Infinity"),
        ("FD", 0x00189089, [0.1, 512.0, -0.5], "0.1\\512\\-0.5"),
        ("FD", 0x00189089, [123456789.0, 1e-5, 0.00099], "1.23456789E8\\1E-5\\9.9E-4"),
        ("FD", 0x00189089, [1234567.0, 12345678.0], "1234567\\1.2345678E7"),
        ("FD", 0x00189089, [0.12345678901234568], "0.12345678901234"),
        ("FD", 0x00189089, [1.2345678901234568e-05], "1.23456789012E-5"),
    ],
)
def test_numeric_binary_values_are_decimal_text_as_dcm4che_prints_them(
    vr: str, tag: int, values: list[float], text: str
) -> None:
    data = Dataset()
    data.add_new(tag, vr, values if len(values) > 1 else values[0])
    assert tag_value(reread(data), tag) == text
    assert tag_value(data, tag) == text


def test_a_value_beyond_the_float_range_stored_in_memory_as_fl_is_still_text() -> None:
    data = Dataset()
    data.add_new(0x00189087, "FL", 1e39)
    assert tag_value(data, 0x00189087) == "1E39"


@pytest.mark.parametrize("charset", ["ISO_IR 100", "ISO_IR 192"])
def test_values_are_decoded_with_the_specific_character_set(charset: str) -> None:
    source = dataset(
        SpecificCharacterSet=charset, StudyDescription="Genève", PatientName="Müller^Zoë"
    )
    raw, data = encoded(source)
    latin_1 = charset == "ISO_IR 100"
    assert ("Genève".encode("latin-1") in raw) is latin_1
    assert ("Genève".encode() in raw) is not latin_1
    assert matches("tagValueIsPresent(#Tag.StudyDescription, 'Genève')", data)
    assert matches("tagValueContains(#Tag.StudyDescription, 'è')", data)
    assert matches("tagValueIsPresent(#Tag.PatientName, 'Müller^Zoë')", data)
    assert not matches("tagValueIsPresent(#Tag.StudyDescription, 'Geneve')", data)


@pytest.mark.parametrize("implicit_vr", [False, True], ids=["explicit VR", "implicit VR"])
@pytest.mark.parametrize("reference", ["'00091010'", "'(0009,1010)'", "0x00091010", "593936"])
def test_a_private_tag_is_read_by_number(implicit_vr: bool, reference: str) -> None:
    source = dataset(SpecificCharacterSet="ISO_IR 100")
    source.add_new(PRIVATE_TAG, "LO", "Genève site ")
    data = reread(source, implicit_vr=implicit_vr)
    assert tag_value(data, PRIVATE_TAG) == "Genève site"
    assert matches(f"tagValueIsPresent({reference}, 'Genève site')", data)
    assert matches(f"tagIsPresent({reference})", data)


def test_an_unknown_private_value_keeps_its_backslash_separated_values() -> None:
    source = Dataset()
    source.add_new(PRIVATE_TAG, "LO", ["A ", " B"])
    data = reread(source, implicit_vr=True)
    assert data[PRIVATE_TAG].VR == "UN"
    assert tag_value(data, PRIVATE_TAG) == "A\\B"
