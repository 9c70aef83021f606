"""Fortran format specifications (``"3F12.6"``, ``"(1X, 4D24.16)"``, ``"*(E16.8)"``) as a list of record ops.

A format is parsed once, when a `bbd.Executable` is created, into a flat tuple of `Op`s plus the index the
format *reverts* to when its list runs out (Fortran's rule: the left parenthesis matching the last
top-level group, or the start; reversion begins a new record, except inside an unlimited ``*(...)``
group, which goes on in the same record). The text reader and writer in `_textio` walk these ops.

Supported: the numeric edit descriptors ``F``, ``E``, ``EN``, ``ES``, ``D``, ``G`` (``w.d`` and an
optional ``Ee``) and ``I`` (``w`` or ``w.m``), position ``nX``/``TRn``, record end ``/``, quoted literals
(skipped on reading, written as they are), scale factors ``kP``, the edit modes ``BN BZ SP SS S`` (no
effect here), repeat counts and nested groups. A plain integer width ``w`` means "fields of ``w``
characters, as many per line as there are": the same as ``*(Gw.0)``.
"""

from __future__ import annotations

import dataclasses
import re

from blackbox_diff._errors import InputError

__all__ = ["FortranFormat", "Op", "parse_format"]

_MAX_OPS = 100_000  # a format expanding to more ops than this is surely a mistake (and would be slow)
_TOKEN = re.compile(
    r"""\s*(?:
      (?P<repeat>\d+|\*)?\s*(?P<open>\()
    | (?P<close>\))
    | (?P<comma>,)
    | (?P<slash>\d*/)
    | (?P<skip>\d+)\s*X | TR\s*(?P<tr>\d+)
    | (?P<scale>[+-]?\d+)\s*P
    | (?P<mode>BN|BZ|SP|SS|S)(?![A-Z])
    | (?P<literal>'(?:[^']|'')*'|"(?:[^"]|"")*")
    | (?P<count>\d+)?\s*(?P<kind>ES|EN|[FEDGI])\s*(?P<width>\d+)(?:\s*\.\s*(?P<digits>\d+))?(?:\s*E\s*(?P<exp>\d+))?
    )""",
    re.VERBOSE | re.IGNORECASE,
)


@dataclasses.dataclass(frozen=True)
class Op:
    """One step of a record: a number ``field``, a ``skip`` of columns, a ``literal`` or a ``newline``."""

    what: str  # "field" | "skip" | "literal" | "newline"
    width: int = 0
    kind: str = ""  # F E D G ES EN I
    digits: int | None = None
    scale: int = 0  # the kP scale factor in force (input: divides a value written without exponent)
    text: str = ""  # the literal's characters

    @property
    def descriptor(self) -> str:
        """The edit descriptor as written, e.g. ``F12.6``."""
        return f"{self.kind}{self.width}" + ("" if self.digits is None else f".{self.digits}")


@dataclasses.dataclass(frozen=True)
class FortranFormat:
    """A parsed format: `ops`, the op index `revert` reverts to, and whether reversion stays in the record."""

    spec: str
    ops: tuple[Op, ...]
    revert: int
    same_record: bool  # an unlimited ``*(...)`` group: reversion continues the current record

    @property
    def fields(self) -> int:
        return sum(op.what == "field" for op in self.ops)


def parse_format(spec: str | int, option: str) -> FortranFormat:
    """Parse a Fortran format (or an integer field width) for the option named `option`.

    Raises:
        InputError: the format is malformed, uses an unsupported descriptor, or has no number field.
    """
    if isinstance(spec, bool) or not isinstance(spec, (int, str)):
        raise InputError(f"{option} must be a Fortran format such as '3F12.6' or a field width (int); got {spec!r}.")
    if isinstance(spec, int):
        if spec < 1:
            raise InputError(f"{option} as a field width must be a positive number of characters; got {spec}.")
        return FortranFormat(spec=str(spec), ops=(Op("field", spec, "G", None),), revert=0, same_record=True)
    text = spec.strip()
    if text.startswith("(") and _matching(text, 0, spec, option) == len(text) - 1:
        text = text[1:-1]
    ops, revert, same_record = _Parser(spec, option).parse(text)
    if not any(op.what == "field" for op in ops):
        raise InputError(f"{option}={spec!r} has no number field (F, E, ES, EN, D, G or I); expected e.g. '3F12.6'.")
    return FortranFormat(spec=spec, ops=tuple(ops), revert=revert, same_record=same_record)


def _matching(text: str, start: int, spec: str, option: str) -> int:
    depth, quote = 0, ""
    for i in range(start, len(text)):
        c = text[i]
        if quote:
            quote = "" if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i
    raise InputError(f"{option}={spec!r} has an unbalanced parenthesis; expected e.g. '(1X, 3F12.6)'.")


class _Parser:
    """Recursive descent over the format text; expands repeat counts into a flat op list."""

    def __init__(self, spec: str, option: str) -> None:
        self.spec, self.option = spec, option
        self.scale = 0

    def fail(self, text: str, pos: int, what: str) -> InputError:
        return InputError(
            f"{self.option}={self.spec!r}: {what} at {text[pos:pos + 12]!r}. Supported: F, E, ES, EN, D, G, I "
            "edit descriptors (e.g. 3F12.6, 1PE24.16), nX, /, quoted literals, kP, repeat counts and groups."
        )

    def parse(self, text: str) -> tuple[list[Op], int, bool]:
        """Top level: returns (ops, reversion index, same_record)."""
        ops: list[Op] = []
        revert, same_record = 0, False
        pos = 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None or m.end() == pos:
                if text[pos:].strip() == "":
                    break
                raise self.fail(text, pos, "unexpected text")
            pos = m.end()
            if m.group("open"):
                end = _matching(text, m.start("open"), self.spec, self.option)
                inner = self.group(text[m.end("open"):end])
                pos = end + 1
                repeat = m.group("repeat")
                revert, same_record = len(ops), repeat == "*"
                if same_record and text[pos:].strip(" ,"):
                    raise self.fail(text, pos, "an unlimited group *(...) must be the last item")
                ops += inner * (1 if repeat in (None, "*") else int(repeat))
            else:
                ops += self.item(m, text)
            if len(ops) > _MAX_OPS:
                raise self.fail(text, 0, f"the format expands to more than {_MAX_OPS} items")
        return ops, revert, same_record

    def group(self, text: str) -> list[Op]:
        ops, _, same_record = self.parse(text)
        if same_record:
            raise self.fail(text, 0, "an unlimited group *(...) may only appear at the top level")
        return ops

    def item(self, m: re.Match, text: str) -> list[Op]:
        if m.group("close"):
            raise self.fail(text, m.start(), "unbalanced ')'")
        if m.group("comma") or m.group("mode"):
            return []
        if m.group("slash"):
            return [Op("newline")] * int(m.group("slash")[:-1] or 1)
        if m.group("skip") or m.group("tr"):
            return [Op("skip", int(m.group("skip") or m.group("tr")))]
        if m.group("scale"):
            self.scale = int(m.group("scale"))
            return []
        if m.group("literal"):
            quote = m.group("literal")[0]
            return [Op("literal", text=m.group("literal")[1:-1].replace(quote * 2, quote))]
        kind = m.group("kind").upper()
        width = int(m.group("width"))
        digits = None if m.group("digits") is None else int(m.group("digits"))
        if width == 0:
            raise self.fail(text, m.start(), f"a zero width ({kind}0) is free-format output; use io='text' without "
                            "a format for that")
        if kind in ("F", "E", "D", "ES", "EN") and digits is None:
            raise self.fail(text, m.start(), f"{kind}{width} needs its digits ({kind}{width}.d)")
        op = Op("field", width, kind, digits, self.scale)
        return [op] * int(m.group("count") or 1)
