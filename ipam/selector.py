"""Calico's label selector language, the subset pools and nodes use.

    all()            every label set
    k == 'v'         label k present with value v
    k != 'v'         label k absent or with another value (Calico's semantics)
    has(k)  !has(k)  label k present / absent
    a && b, a || b, !a, ( ... )

Strings take single or double quotes (no escapes, as in Calico). `&&` binds tighter than
`||`. An empty selector means all(). Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "All",
    "And",
    "Eq",
    "Has",
    "Ne",
    "Not",
    "Or",
    "Selector",
    "SelectorError",
    "parse_selector",
]


class SelectorError(ValueError):
    """A selector that does not parse; the message names the position and the text."""


class Selector:
    """Base of the selector expression nodes; str() gives a canonical text."""

    def matches(self, labels: dict[str, str]) -> bool:
        raise NotImplementedError


@dataclass(frozen=True)
class All(Selector):
    def matches(self, labels: dict[str, str]) -> bool:
        return True

    def __str__(self) -> str:
        return "all()"


@dataclass(frozen=True)
class Has(Selector):
    key: str

    def matches(self, labels: dict[str, str]) -> bool:
        return self.key in labels

    def __str__(self) -> str:
        return f"has({self.key})"


@dataclass(frozen=True)
class Eq(Selector):
    key: str
    value: str

    def matches(self, labels: dict[str, str]) -> bool:
        return labels.get(self.key) == self.value

    def __str__(self) -> str:
        return f"{self.key} == {_quote(self.value)}"


@dataclass(frozen=True)
class Ne(Selector):
    key: str
    value: str

    def matches(self, labels: dict[str, str]) -> bool:
        return labels.get(self.key) != self.value

    def __str__(self) -> str:
        return f"{self.key} != {_quote(self.value)}"


@dataclass(frozen=True)
class Not(Selector):
    operand: Selector

    def matches(self, labels: dict[str, str]) -> bool:
        return not self.operand.matches(labels)

    def __str__(self) -> str:
        if isinstance(self.operand, Has | All):
            return f"!{self.operand}"
        return f"!({self.operand})"


@dataclass(frozen=True)
class And(Selector):
    operands: tuple[Selector, ...]

    def matches(self, labels: dict[str, str]) -> bool:
        return all(op.matches(labels) for op in self.operands)

    def __str__(self) -> str:
        return " && ".join(f"({op})" if isinstance(op, Or) else str(op) for op in self.operands)


@dataclass(frozen=True)
class Or(Selector):
    operands: tuple[Selector, ...]

    def matches(self, labels: dict[str, str]) -> bool:
        return any(op.matches(labels) for op in self.operands)

    def __str__(self) -> str:
        return " || ".join(str(op) for op in self.operands)


def _quote(value: str) -> str:
    return f'"{value}"' if "'" in value else f"'{value}'"


# Label keys as Kubernetes allows them: an optional DNS prefix and '/', then the name.
_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-/]*")
_SYMBOLS = ("&&", "||", "==", "!=", "!", "(", ")")


@dataclass(frozen=True)
class _Token:
    kind: str  # "sym", "key", "str" or "end"
    text: str  # the symbol, the key or the string's contents
    pos: int


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isspace():
            i += 1
            continue
        sym = next((s for s in _SYMBOLS if text.startswith(s, i)), None)
        if sym is not None:
            tokens.append(_Token("sym", sym, i))
            i += len(sym)
        elif ch in "'\"":
            end = text.find(ch, i + 1)
            if end < 0:
                raise _error(text, i, "unterminated string")
            tokens.append(_Token("str", text[i + 1 : end], i))
            i = end + 1
        elif m := _KEY.match(text, i):
            tokens.append(_Token("key", m.group(), i))
            i = m.end()
        else:
            raise _error(text, i, f"unexpected character {ch!r}")
    tokens.append(_Token("end", "", len(text)))
    return tokens


def _error(text: str, pos: int, what: str) -> SelectorError:
    return SelectorError(f"selector {text!r}: at position {pos}: {what}")


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0

    def peek(self, ahead: int = 0) -> _Token:
        return self.tokens[min(self.i + ahead, len(self.tokens) - 1)]

    def take(self) -> _Token:
        tok = self.peek()
        self.i += 1
        return tok

    def fail(self, tok: _Token, expected: str) -> SelectorError:
        found = "end of input" if tok.kind == "end" else repr(tok.text)
        if tok.kind == "str":
            found = f"string {_quote(tok.text)}"
        return _error(self.text, tok.pos, f"expected {expected}, found {found}")

    def expect_sym(self, sym: str) -> None:
        tok = self.take()
        if tok.kind != "sym" or tok.text != sym:
            raise self.fail(tok, repr(sym))

    def is_sym(self, sym: str) -> bool:
        tok = self.peek()
        return tok.kind == "sym" and tok.text == sym

    def parse(self) -> Selector:
        sel = self.parse_or()
        tok = self.peek()
        if tok.kind != "end":
            raise self.fail(tok, "'&&', '||' or end of input")
        return sel

    def parse_or(self) -> Selector:
        ops = [self.parse_and()]
        while self.is_sym("||"):
            self.take()
            ops.append(self.parse_and())
        if len(ops) == 1:
            return ops[0]
        # Flatten (a || b) || c so that str() and parse round-trip to equal trees.
        return Or(tuple(x for op in ops for x in (op.operands if isinstance(op, Or) else (op,))))

    def parse_and(self) -> Selector:
        ops = [self.parse_unary()]
        while self.is_sym("&&"):
            self.take()
            ops.append(self.parse_unary())
        if len(ops) == 1:
            return ops[0]
        return And(tuple(x for op in ops for x in (op.operands if isinstance(op, And) else (op,))))

    def parse_unary(self) -> Selector:
        if self.is_sym("!"):
            self.take()
            return Not(self.parse_unary())
        return self.parse_primary()

    def parse_primary(self) -> Selector:
        tok = self.take()
        if tok.kind == "sym" and tok.text == "(":
            inner = self.parse_or()
            self.expect_sym(")")
            return inner
        if tok.kind != "key":
            raise self.fail(tok, "a label key, 'all()', 'has(...)', '!' or '('")
        # all( and has( are functions only when a '(' follows; otherwise plain keys.
        if tok.text == "all" and self.is_sym("("):
            self.take()
            self.expect_sym(")")
            return All()
        if tok.text == "has" and self.is_sym("("):
            self.take()
            key = self.take()
            if key.kind != "key":
                raise self.fail(key, "a label key")
            self.expect_sym(")")
            return Has(key.text)
        op = self.take()
        if op.kind != "sym" or op.text not in ("==", "!="):
            raise self.fail(op, "'==' or '!='")
        value = self.take()
        if value.kind != "str":
            raise self.fail(value, "a quoted string")
        return Eq(tok.text, value.text) if op.text == "==" else Ne(tok.text, value.text)


def parse_selector(text: str) -> Selector:
    """Parse a selector; SelectorError names the position and the text when it is invalid."""
    if not isinstance(text, str):
        raise SelectorError(f"selector {text!r}: expected a string")
    if not text.strip():
        return All()
    return _Parser(text).parse()
