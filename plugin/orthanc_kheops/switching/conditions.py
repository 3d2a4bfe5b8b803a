"""Switching conditions: Karnak's condition syntax, parsed by our own grammar.

Karnak hands conditions to the Spring Expression Language, so whoever edits one can run code. We
accept only the grammar described in conditions.md, validate a condition completely when it is
compiled and evaluate it with small immutable nodes: nothing is ever `eval`-ed.

Precedence, loosest first, as in SpEL: `||`/`or`, then `&&`/`and`, then `==`/`!=`/`eq`/`ne`
(between two booleans, not chainable: `a == b == c` is an error), then `!`/`not`. So
`a || b && c` is `a || (b && c)`, `!a && b` is `(!a) && b` and `a && b == true` is
`a && (b == true)`. Word operators and literals are case-insensitive whole words: `andy` is an
unknown word, not `and` followed by `y`.
"""

from __future__ import annotations

import difflib
import math
import operator
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol, cast

from lark import Lark, Token, Transformer
from lark.exceptions import UnexpectedToken
from lark.lark import PostLex
from pydicom.charset import convert_encodings
from pydicom.datadict import keyword_dict, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

__all__ = [
    "MAX_DEPTH",
    "MAX_LENGTH",
    "Condition",
    "ConditionError",
    "compile_condition",
    "tag_value",
]

MAX_LENGTH = 1024
MAX_DEPTH = 32

_VALUE_TESTS: dict[str, Callable[[str, str], bool]] = {
    "tagValueIsPresent": operator.eq,
    "tagValueContains": operator.contains,
    "tagValueBeginsWith": str.startswith,
    "tagValueEndsWith": str.endswith,
}
_FUNCTIONS = (*_VALUE_TESTS, "tagIsPresent")


class ConditionError(Exception):
    """A condition that cannot be compiled; the message can be shown to the user as it is."""

    def __init__(self, message: str, *, line: int | None = None, column: int | None = None) -> None:
        super().__init__(message)
        self.line = line
        self.column = column


# ---------------------------------------------------------------------------------------------
# Evaluation: immutable nodes, short-circuiting


class _Node(Protocol):
    def evaluate(self, dataset: Dataset) -> bool: ...

    def tags(self) -> Iterator[BaseTag]: ...


@dataclass(frozen=True, slots=True)
class _Constant:
    value: bool

    def evaluate(self, dataset: Dataset) -> bool:
        return self.value

    def tags(self) -> Iterator[BaseTag]:
        return iter(())


@dataclass(frozen=True, slots=True)
class _Not:
    operand: _Node

    def evaluate(self, dataset: Dataset) -> bool:
        return not self.operand.evaluate(dataset)

    def tags(self) -> Iterator[BaseTag]:
        return self.operand.tags()


@dataclass(frozen=True, slots=True)
class _All:
    operands: tuple[_Node, ...]

    def evaluate(self, dataset: Dataset) -> bool:
        return all(operand.evaluate(dataset) for operand in self.operands)

    def tags(self) -> Iterator[BaseTag]:
        for operand in self.operands:
            yield from operand.tags()


@dataclass(frozen=True, slots=True)
class _Any:
    operands: tuple[_Node, ...]

    def evaluate(self, dataset: Dataset) -> bool:
        return any(operand.evaluate(dataset) for operand in self.operands)

    def tags(self) -> Iterator[BaseTag]:
        for operand in self.operands:
            yield from operand.tags()


@dataclass(frozen=True, slots=True)
class _Equality:
    """`a == b` / `a != b` between booleans, which Karnak users write as `... == true`."""

    left: _Node
    right: _Node
    equal: bool

    def evaluate(self, dataset: Dataset) -> bool:
        return (self.left.evaluate(dataset) == self.right.evaluate(dataset)) is self.equal

    def tags(self) -> Iterator[BaseTag]:
        yield from self.left.tags()
        yield from self.right.tags()


@dataclass(frozen=True, slots=True)
class _ValueTest:
    """One of the four tagValue… functions: false when the tag has no value."""

    tag: BaseTag
    test: Callable[[str, str], bool]
    needle: str

    def evaluate(self, dataset: Dataset) -> bool:
        value = tag_value(dataset, self.tag)
        return value is not None and self.test(value, self.needle)

    def tags(self) -> Iterator[BaseTag]:
        yield self.tag


@dataclass(frozen=True, slots=True)
class _Present:
    """tagIsPresent: looks at the first value only, as Karnak does."""

    tag: BaseTag

    def evaluate(self, dataset: Dataset) -> bool:
        texts = _texts(dataset, self.tag)
        return bool(texts and texts[0])

    def tags(self) -> Iterator[BaseTag]:
        yield self.tag


@dataclass(frozen=True)
class Condition:
    """A compiled condition: cheap to evaluate on every instance, safe to share between threads.

    `tags` lists the tags it reads, once each in order of first appearance, for the dry run.
    """

    text: str
    tags: tuple[BaseTag, ...]
    _root: _Node

    def matches(self, dataset: Dataset) -> bool:
        return self._root.evaluate(dataset)


# ---------------------------------------------------------------------------------------------
# The value of a tag

_PADDING = " \x00"  # DICOM pads text with spaces, UIDs with NUL
_TRAILING_ONLY = frozenset({"ST", "LT", "UT", "UR"})
_FLOATS = {"FL": True, "FD": False}  # VR -> single precision


def tag_value(dataset: Dataset, tag: BaseTag | int) -> str | None:
    """The text the tagValue… functions compare, None when there is none.

    Values of a multi-valued element are joined with a backslash; a value that is empty once its
    padding is removed counts as absent, since pydicom cannot tell it from a zero-length one.
    """
    texts = _texts(dataset, tag)
    if texts is None:
        return None
    return "\\".join(texts) or None


def _texts(dataset: Dataset, tag: BaseTag | int) -> list[str] | None:
    """Each value of a top-level element as text; None when absent, empty, a sequence or binary."""
    element = dataset.get(tag)  # converts a raw element, decoding it with SpecificCharacterSet
    if element is None or element.VR == "SQ" or element.is_empty:
        return None
    vr = element.VR
    value = element.value
    # several values: a MultiValue, or a list for binary VRs read from a file
    values = list(value) if isinstance(value, MultiValue | list) else [value]
    if vr in _FLOATS:
        return [_format_float(float(item), single=_FLOATS[vr]) for item in values]
    if vr == "AT":
        return [f"{item:08X}" for item in values]
    if isinstance(value, bytes):
        if vr != "UN":
            return None  # OB, OW, OF…: binary data has no text to compare
        # A private tag in an implicit VR file whose creator pydicom does not know: read as text.
        encoding = convert_encodings(dataset.get("SpecificCharacterSet"))[0]
        values = value.decode(encoding, errors="replace").split("\\")
    if vr in _TRAILING_ONLY:
        return [str(item).rstrip(_PADDING) for item in values]
    return [_text(item) for item in values]


def _text(item: object) -> str:
    """A text value as written in the file: DS/IS/DA… keep their original string."""
    original = getattr(item, "original_string", None)
    return (original if isinstance(original, str) else str(item)).strip(_PADDING)


def _format_float(value: float, *, single: bool) -> str:
    """FL/FD values as dcm4che prints them, so that Karnak conditions keep matching.

    dcm4che applies `formatDS` to Java's `Float/Double.toString`: the shortest decimal that reads
    back as the same float of that precision (0.1 stored as FL is '0.1', not
    '0.10000000149011612'), without a trailing '.0' ('512'), in scientific notation below 1E-3 and
    from 1E7 ('1E-4', '1.5E10'), and FD values cut to 16 characters.
    """
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    shortest = Decimal(_shortest_single(value) if single else repr(value)).as_tuple()
    digits = "".join(map(str, shortest.digits)).rstrip("0")
    magnitude = len(shortest.digits) + int(shortest.exponent) - 1  # exponent of the first digit
    sign = "-" if shortest.sign else ""
    if -3 <= magnitude < 7:
        if magnitude >= 0:
            whole, fraction = (
                digits[: magnitude + 1].ljust(magnitude + 1, "0"),
                digits[magnitude + 1 :],
            )
        else:
            whole, fraction = "0", "0" * (-magnitude - 1) + digits
        text = sign + whole + ("." + fraction if fraction else "")
        return text if single else text[:16]
    text = f"{sign}{digits[0]}{'.' + digits[1:] if len(digits) > 1 else ''}E{magnitude}"
    excess = len(text) - 16
    if single or excess <= 0:
        return text
    exponent_at = text.index("E")
    return text[: exponent_at - excess] + text[exponent_at:]


def _shortest_single(value: float) -> str:
    """The shortest decimal that rounds to the same single-precision float as `value`."""
    target = _as_single(value)
    if target is None:  # only a dataset built in memory can hold an FL beyond the float range
        return repr(value)
    for precision in range(1, 9):
        text = f"{target:.{precision}g}"
        if _as_single(float(text)) == target:
            return text
    return f"{target:.9g}"  # nine significant digits always identify a single-precision float


def _as_single(value: float) -> float | None:
    """`value` rounded to single precision, None beyond its range."""
    try:
        return float(struct.unpack("<f", struct.pack("<f", value))[0])
    except OverflowError:
        return None


# ---------------------------------------------------------------------------------------------
# Grammar. Words (functions, operators, keywords) are lexed as WORD and typed by _Words below, so
# that `andy` is a word, not `and` + `y`, and so that an unknown function is reported by name.
# OTHER catches any other character, so that every mistake reaches the parser, which knows what
# it expected there.

_GRAMMAR = r"""
start: expr
?expr: conj (_OR conj)*
?conj: comparison (_AND comparison)*
?comparison: unary (EQUALITY unary)?
?unary: _NOT unary -> negation
      | atom
?atom: call
     | constant
     | _LPAR expr _RPAR
constant: BOOLEAN
call: FUNCTION _LPAR argument (_COMMA argument)* _RPAR
argument: HASH _TAG _DOT KEYWORD -> keyword_tag
        | NUMBER -> number
        | STRING -> string

_OR: "||"
_AND: "&&"
EQUALITY: "==" | "!="
_NOT: "!"
_LPAR: "("
_RPAR: ")"
_COMMA: ","
HASH: "#"
_DOT: "."
NUMBER: /0[xX][0-9a-fA-F]+|[0-9]+/
STRING: /'(?:[^']|'')*'|"(?:[^"]|"")*"/
WORD: /[A-Za-z_][A-Za-z0-9_]*/
OTHER.-1: /./s
%ignore /[ \t\r\n]+/
%declare FUNCTION BOOLEAN _TAG KEYWORD
"""

_BLANKS = " \t\r\n"
_WORD_TYPES = {
    "and": "_AND",
    "or": "_OR",
    "not": "_NOT",
    "eq": "EQUALITY",
    "ne": "EQUALITY",
    "true": "BOOLEAN",
    "false": "BOOLEAN",
}
_OPERATORS_BEFORE_OPERAND = frozenset({"_AND", "_OR", "_NOT", "EQUALITY"})


class _Rejected(Exception):
    """A mistake found while parsing; compile_condition adds the line and column."""

    def __init__(self, what: str, offset: int | None, advice: str = "") -> None:
        super().__init__(what)
        self.what = what
        self.offset = offset
        self.advice = advice


class _Words(PostLex):
    """Types each WORD from its context and enforces the nesting limit, left to right."""

    always_accept = ("WORD", "OTHER")

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        previous: Token | None = None
        grouping: list[bool] = []  # per open parenthesis: grouping (True) or a call (False)
        depth = 0
        for token in stream:
            if token.type == "WORD":
                token = _typed_word(token, previous, grouping)
            elif token.type == "_LPAR":
                groups = previous is None or previous.type != "FUNCTION"
                depth += groups
                if depth > MAX_DEPTH:
                    raise _Rejected(
                        f"parentheses nested more than {MAX_DEPTH} deep",
                        token.start_pos,
                        "; simplify the condition",
                    )
                grouping.append(groups)
            elif token.type == "_RPAR" and grouping:
                depth -= grouping.pop()
            yield token
            previous = token


def _typed_word(token: Token, previous: Token | None, grouping: list[bool]) -> Token:
    word = str(token)
    after = previous.type if previous is not None else None
    if previous is not None and after == "HASH":
        if word != "Tag":
            raise _Rejected(
                f"unknown variable '#{word}'",
                previous.start_pos,
                "; only #Tag.<keyword> can be used",
            )
        return Token.new_borrow_pos("_TAG", word, token)
    if after == "_DOT":
        return Token.new_borrow_pos("KEYWORD", word, token)
    if word.lower() in _WORD_TYPES:
        return Token.new_borrow_pos(_WORD_TYPES[word.lower()], word, token)
    if word in _FUNCTIONS:
        return Token.new_borrow_pos("FUNCTION", word, token)
    if word == "Tag":
        raise _Rejected(
            "'Tag' without '#'", token.start_pos, "; write #Tag.<keyword>, e.g. #Tag.Modality"
        )
    in_call = bool(grouping) and not grouping[-1]
    if after == "_COMMA" or (after == "_LPAR" and in_call):
        if tag_for_keyword(word) is not None:
            raise _Rejected(
                f"DICOM keyword '{word}' without '#Tag.'", token.start_pos, f"; write #Tag.{word}"
            )
    elif after is None or after in _OPERATORS_BEFORE_OPERAND or after == "_LPAR":
        raise _Rejected(f"unknown function '{word}'", token.start_pos, _function_advice(word))
    return token  # where an operator is expected: the parser reports it with what it expected


def _function_advice(word: str) -> str:
    close = difflib.get_close_matches(word, _FUNCTIONS, n=1)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return "; expected one of " + ", ".join(_FUNCTIONS)


@dataclass(frozen=True, slots=True)
class _KeywordTag:
    tag: BaseTag
    offset: int | None  # of the '#'


_Argument = _KeywordTag | Token
_STRING_TAG = re.compile(
    r"([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})|\(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)"
)
_KEYWORDS = tuple(keyword for keyword in keyword_dict if keyword)
_KEYWORDS_BY_LOWER = {keyword.lower(): keyword for keyword in _KEYWORDS}


class _Build(Transformer[Token, _Node]):
    """Turns each rule into a node as soon as the parser reduces it, validating it on the way."""

    def start(self, children: list[_Node]) -> _Node:
        return children[0]

    def expr(self, children: list[_Node]) -> _Node:
        return _Any(tuple(children))

    def conj(self, children: list[_Node]) -> _Node:
        return _All(tuple(children))

    def comparison(self, children: list[_Node | Token]) -> _Node:
        left, operator_token, right = children
        assert isinstance(operator_token, Token)
        equal = operator_token == "==" or operator_token.lower() == "eq"
        return _Equality(_node(left), _node(right), equal)

    def negation(self, children: list[_Node]) -> _Node:
        (operand,) = children
        return operand.operand if isinstance(operand, _Not) else _Not(operand)

    def constant(self, children: list[Token]) -> _Node:
        return _Constant(children[0].lower() == "true")

    def keyword_tag(self, children: list[Token]) -> _KeywordTag:
        hash_sign, keyword = children
        tag = tag_for_keyword(str(keyword))
        if tag is None:
            raise _Rejected(
                f"unknown DICOM keyword '{keyword}'", keyword.start_pos, _keyword_advice(keyword)
            )
        return _KeywordTag(BaseTag(tag), hash_sign.start_pos)

    def number(self, children: list[Token]) -> Token:
        return children[0]

    def string(self, children: list[Token]) -> Token:
        return children[0]

    def call(self, children: list[Token | _KeywordTag]) -> _Node:
        function, *arguments = children
        assert isinstance(function, Token)
        expected = 1 if function == "tagIsPresent" else 2
        if len(arguments) != expected:
            shape = "a tag" if expected == 1 else "a tag and a string"
            plural = "" if expected == 1 else "s"
            raise _Rejected(
                str(function),
                function.start_pos,
                f" takes {expected} argument{plural} ({shape}), not {len(arguments)}",
            )
        tag = _argument_tag(arguments[0])
        if expected == 1:
            return _Present(tag)
        needle = arguments[1]
        if isinstance(needle, Token) and needle.type == "STRING":
            return _ValueTest(tag, _VALUE_TESTS[str(function)], _unquote(needle))
        if isinstance(needle, _KeywordTag):
            position, found, example = needle.offset, "a tag", "'CT'"
        else:
            position, found, example = needle.start_pos, f"the number {needle}", f"'{needle}'"
        raise _Rejected(
            f"the second argument of {function}",
            position,
            f" is {found}, not a string; write a quoted string such as {example}",
        )


def _node(child: _Node | Token) -> _Node:
    assert not isinstance(child, Token)
    return child


def _keyword_advice(keyword: str) -> str:
    close = [_KEYWORDS_BY_LOWER[keyword.lower()]] if keyword.lower() in _KEYWORDS_BY_LOWER else []
    close = close or difflib.get_close_matches(keyword, _KEYWORDS, n=1)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return "; keywords are the DICOM dictionary's, case-sensitive, e.g. #Tag.StudyDescription"


def _argument_tag(argument: _Argument) -> BaseTag:
    """The tag a first argument names: #Tag.X, 0x00081030, 528432 or '0008,1030'."""
    if isinstance(argument, _KeywordTag):
        return argument.tag
    text = str(argument)
    if argument.type == "STRING":
        shape = _STRING_TAG.fullmatch(_unquote(argument))
        if shape is None:
            raise _Rejected(
                f"string {text} is not a tag", argument.start_pos, _string_tag_advice(argument)
            )
        return BaseTag(int("".join(part for part in shape.groups() if part), 16))
    if len(text) > 1 and text[0] == "0" and text[1] not in "xX":
        quoted = f" or '{text}'" if len(text) == 8 else ""
        raise _Rejected(
            f"decimal number {text} with a leading zero",
            argument.start_pos,
            f"; write the tag in hexadecimal as 0x{text}{quoted}",
        )
    number = int(text, 0)
    if number > 0xFFFFFFFF:
        raise _Rejected(
            f"number {text} is not a tag", argument.start_pos, "; tags have 8 hex digits"
        )
    return BaseTag(number)


def _string_tag_advice(argument: Token) -> str:
    value = _unquote(argument)
    tight = "".join(value.split())
    if _STRING_TAG.fullmatch(tight):
        return f" (did you mean '{tight}'?)"
    if tag_for_keyword(value) is not None:
        return f" (did you mean #Tag.{value}?)"
    return "; write 8 hex digits as '00081030', '0008,1030' or '(0008,1030)', or #Tag.<keyword>"


def _unquote(token: Token) -> str:
    quote = token[0]
    return token[1:-1].replace(quote * 2, quote)


_PARSER = Lark(
    _GRAMMAR,
    parser="lalr",
    lexer="basic",
    postlex=_Words(),
    transformer=_Build(),
    maybe_placeholders=False,
)


# ---------------------------------------------------------------------------------------------
# Compiling, and syntax errors in words

_EXPECTED = {
    "FUNCTION": "a function such as tagIsPresent(#Tag.PatientName)",
    "_NOT": "'!'/'not'",
    "_LPAR": "'('",
    "BOOLEAN": "'true'/'false'",
    "HASH": "#Tag.<keyword>",
    "NUMBER": "a tag number",
    "STRING": "a string",
    "_TAG": "'Tag'",
    "_DOT": "'.'",
    "KEYWORD": "a DICOM keyword",
    "_AND": "'&&'/'and'",
    "_OR": "'||'/'or'",
    "EQUALITY": "'=='/'!='",
    "_COMMA": "','",
    "_RPAR": "')'",
    "$END": "the end of the condition",
}
_HINTS = {
    ";": "a condition is a single expression: remove the ';'",
    "&": "use '&&' or 'and'",
    "|": "use '||' or 'or'",
    "=": "use '==' to compare",
    "?": "the ternary operator is not supported",
    ":": "the ternary operator is not supported",
    ".": "method calls and properties are not supported",
    "[": "indexing is not supported",
    "matches": "regular expressions are not supported; use tagValueContains, "
    "tagValueBeginsWith or tagValueEndsWith",
    **dict.fromkeys("+-*/%^", "arithmetic is not supported"),
    **dict.fromkeys("<>", "only '==' and '!=' between conditions are supported"),
}


_VARIABLE = re.compile(r"#[ \t\r\n]*([A-Za-z_][A-Za-z0-9_]*)")


def compile_condition(text: str) -> Condition:
    """Parses and validates a condition completely (every branch), raising ConditionError.

    An empty condition matches every instance.
    """
    if len(text) > MAX_LENGTH:
        raise _error(
            text,
            _Rejected(
                "too long",
                MAX_LENGTH,
                f": {len(text)} characters, at most {MAX_LENGTH} are allowed; shorten it",
            ),
        )
    if not text:
        return Condition(text, (), _Constant(True))
    if not text.strip(_BLANKS):
        raise ConditionError(
            "Condition: only whitespace; write a condition, or leave it empty to share every series"
        )
    try:
        root = cast(_Node, _PARSER.parse(text))  # _Build turns the tree into nodes
    except _Rejected as rejected:
        raise _error(text, rejected) from None
    except UnexpectedToken as unexpected:
        raise _error(text, _syntax_error(text, unexpected)) from None
    return Condition(text, tuple(dict.fromkeys(root.tags())), root)


def _syntax_error(text: str, unexpected: UnexpectedToken) -> _Rejected:
    token = unexpected.token
    variable = _VARIABLE.match(text, token.start_pos or 0) if token.type == "HASH" else None
    if variable and variable[1] != "Tag":
        return _Rejected(
            f"unknown variable '#{variable[1]}'",
            token.start_pos,
            "; only #Tag.<keyword> can be used, as the tag of a function",
        )
    if token.type == "OTHER" and token in ("'", '"'):
        return _Rejected("unterminated string", token.start_pos, f"; close it with {token}")
    if token.type == "$END":
        found, offset = "end of the condition", len(text.rstrip(_BLANKS))
    else:
        found, offset = _describe(token), token.start_pos
    accepted = unexpected.accepts or unexpected.expected
    words = [phrase for name, phrase in _EXPECTED.items() if name in accepted]
    expected = ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0]
    hint = _HINTS.get(str(token)) if token.type in ("OTHER", "_DOT", "WORD") else None
    return _Rejected(
        f"unexpected {found}", offset, f"; expected {expected}" + (f" ({hint})" if hint else "")
    )


def _describe(token: Token) -> str:
    if token.type == "STRING":
        return f"string {token if len(token) <= 40 else token[:37] + '...'}"
    if token.type == "NUMBER":
        return f"number {token}"
    if token.type == "OTHER" and (not token.isprintable() or token.isspace()):
        return f"character U+{ord(token):04X}"
    return f"'{token}'" if len(token) <= 40 else f"'{token[:37]}...'"


def _error(text: str, rejected: _Rejected) -> ConditionError:
    if rejected.offset is None:
        return ConditionError(f"Condition: {rejected.what}{rejected.advice}")
    line = text.count("\n", 0, rejected.offset) + 1
    column = rejected.offset - (text.rfind("\n", 0, rejected.offset) + 1) + 1
    where = f"line {line}, column {column}" if "\n" in text else f"column {column}"
    return ConditionError(
        f"Condition: {rejected.what} at {where}{rejected.advice}", line=line, column=column
    )
