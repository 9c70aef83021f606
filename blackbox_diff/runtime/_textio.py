"""Numbers as Fortran and C programs really write them, in free format or in fixed-width fields.

`parse_number` reads one token: plain decimals (``2``, ``-.5``, ``1.5e3``), Fortran's ``D``/``Q``
exponents (``0.2000000000000000D+01``) and the exponent without a letter that Fortran writes when it has
three digits (``-0.1000000000000000-299``), C's hexadecimal floats (``0x1.8p+1``, from ``printf("%a")``)
and the NaN/Infinity spellings of the usual compilers and C libraries (``NaN``, ``-nan``,
``nan(0x8000)``, ``Infinity``, ``-Inf``, ``1.#INF00``, ``-1.#IND``, ``NaNQ``). A field of asterisks (a
number too wide for its Fortran edit descriptor) is an error that says so.

`read_numbers` reads a whole output: white-space (or comma) separated tokens, with Fortran's ``r*value``
repeat counts, or fixed-width fields following a `FortranFormat`. Every failure is a `TextFormatError`
naming the line, the field (and its columns), what was found and what was expected.
`write_numbers` writes one parameter for the program to read, free (shortest round-trip notation) or
in the fields of a format.
"""

from __future__ import annotations

import math
import re

import numpy as np

from blackbox_diff._errors import InputError
from blackbox_diff.runtime._fortran_format import FortranFormat, Op

__all__ = ["TextFormatError", "parse_number", "read_numbers", "write_numbers"]

EXPECTED = (
    "a number such as 1.5, -2.5E+03, 0.2D+01 (Fortran D exponent), -0.1-299 (Fortran three-digit exponent), "
    "0x1.8p+1, NaN or Infinity"
)
_DECIMAL = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))(?:[EDQ]([+-]?\d+)|([+-]\d+))?", re.IGNORECASE)
_HEX = re.compile(r"[+-]?0x(?:[0-9a-f]+\.?[0-9a-f]*|\.[0-9a-f]+)p[+-]?\d+", re.IGNORECASE)
_NAN = re.compile(r"[+-]?(?:nan(?:\([0-9a-z_]*\))?[qs]?|1\.#(?:qnan|snan|ind)0*)", re.IGNORECASE)
_INF = re.compile(r"([+-]?)(?:inf(?:inity)?|1\.#inf0*)", re.IGNORECASE)
_REPEAT = re.compile(r"(\d+)\*(.*)")
_SEPARATORS = re.compile(r"[^\s,;]+|[,;]")


class TextFormatError(ValueError):
    """A number could not be read: carries the line, field, columns, what was found and what was expected."""

    def __init__(self, line: int, field: int, columns: tuple[int, int] | None, found: str, expected: str) -> None:
        self.line, self.field, self.columns, self.found, self.expected = line, field, columns, found, expected
        where = f"line {line}, field {field}"
        if columns is not None:
            where += f" (column {columns[0]})" if columns[0] == columns[1] else f" (columns {columns[0]}-{columns[1]})"
        super().__init__(f"{where}: found {found!r}, expected {expected}")


def parse_number(token: str, scale: int = 0) -> float:
    """One number as a Fortran or C program writes it (see the module docstring).

    Args:
        token: the characters of one field or token, surrounding blanks allowed.
        scale: a Fortran ``kP`` scale factor in force: a value written without an exponent is divided by
            ``10**scale`` (Fortran's input rule).

    Raises:
        ValueError: not a number (the caller adds where it was).
    """
    text = token.strip()
    m = _DECIMAL.fullmatch(text)
    if m is not None:
        mantissa, lettered, bare = m.groups()
        exponent = lettered if lettered is not None else bare
        if exponent is None:
            return float(f"{mantissa}e{-scale}")  # one correctly rounded conversion, also under a kP scale
        return float(f"{mantissa}e{exponent}")
    if _HEX.fullmatch(text):
        return float.fromhex(text)
    if _NAN.fullmatch(text):
        return math.nan
    m = _INF.fullmatch(text)
    if m is not None:
        return -math.inf if m.group(1) == "-" else math.inf
    if text and set(text) == {"*"}:
        raise ValueError("a number; a field of asterisks means the value did not fit its Fortran edit descriptor "
                         "(widen the program's format, e.g. ES24.16)")
    raise ValueError(EXPECTED)


def read_numbers(text: str, fmt: FortranFormat | None = None) -> list[float]:
    """All the numbers of a program's text output, in order.

    Raises:
        TextFormatError: a field is not a number (line, field, columns, found, expected).
    """
    lines = text.splitlines()
    out = _read_free(lines) if fmt is None else _read_fixed(lines, fmt)
    if not out:
        raise TextFormatError(1, 1, None, text[:40], f"{EXPECTED}; the output holds no number")
    return out


def _read_free(lines: list[str]) -> list[float]:
    out: list[float] = []
    for number, line in enumerate(lines, start=1):
        field, separator = 0, None  # separator: where the last "," or ";" not yet followed by a number is
        for m in _SEPARATORS.finditer(line):
            token = m.group()
            if token in ",;":
                if separator is not None:  # "1.0,,2.0": a null value, which we cannot turn into a number
                    raise TextFormatError(number, field + 1, (separator + 1, m.end()), line[separator : m.end()],
                                          f"{EXPECTED} between the separators")
                separator = m.start()
                continue
            separator = None
            field += 1
            count, value = 1, token
            rep = _REPEAT.fullmatch(token)
            if rep is not None:  # Fortran list-directed output may write r*c for r equal values
                count, value = int(rep.group(1)), rep.group(2)
            try:
                out.extend([parse_number(value)] * count)
            except ValueError as err:
                raise TextFormatError(number, field, (m.start() + 1, m.end()), token, str(err)) from None
    return out


def _read_fixed(lines: list[str], fmt: FortranFormat) -> list[float]:
    """Walk the format's ops over the lines (see docs/backends/executable.md for the record rules)."""
    out: list[float] = []
    ops = fmt.ops
    row, col, pos, field = 0, 0, 0, 0
    while row < len(lines):
        line = lines[row].rstrip()
        if pos == len(ops):  # the format ran out: revert (a new record unless inside *(...))
            pos = fmt.revert
            if not fmt.same_record:
                if line[col:].strip():
                    raise TextFormatError(row + 1, field + 1, (col + 1, len(line)), line[col:],
                                          f"the end of the line after the last field of format {fmt.spec!r}")
                row, col, field = row + 1, 0, 0
                continue
        op = ops[pos]
        if op.what == "newline":
            row, col, pos, field = row + 1, 0, pos + 1, 0
            continue
        if op.what != "field":
            col += op.width if op.what == "skip" else len(op.text)
            pos += 1
            continue
        if not line[col:].strip():  # the line ended: the next line is a new write with the same format
            row, col, pos, field = row + 1, 0, 0, 0
            continue
        chunk = line[col : col + op.width]
        field += 1
        where = (col + 1, col + op.width)
        if not chunk.strip():
            raise TextFormatError(row + 1, field, where, chunk, f"{EXPECTED} in this {op.descriptor} field of "
                                  f"format {fmt.spec!r} (a blank field: is the format aligned with the output?)")
        try:
            out.append(parse_number(chunk, op.scale))
        except ValueError as err:
            raise TextFormatError(row + 1, field, where, chunk,
                                  f"{err} in this {op.descriptor} field of format {fmt.spec!r}") from None
        col, pos = col + op.width, pos + 1
    return out


def write_numbers(values: np.ndarray, fmt: FortranFormat | None, name: str) -> str:
    """One parameter's numbers (already flattened in the order the program expects) as text lines.

    Free format: one line, shortest round-trip notation. With a format: the fields of `fmt`, reverting as
    a Fortran ``write`` does.

    Raises:
        InputError: a value does not fit its field (`name` says which parameter).
    """
    flat = [float(v) for v in values]
    if fmt is None:
        return " ".join(repr(v) for v in flat) + "\n"
    lines, line, pos = [], "", 0
    i = 0
    while i < len(flat):
        if pos == len(fmt.ops):
            pos = fmt.revert
            if not fmt.same_record:
                lines.append(line)
                line = ""
        op = fmt.ops[pos]
        pos += 1
        if op.what == "newline":
            lines.append(line)
            line = ""
        elif op.what == "skip":
            line += " " * op.width
        elif op.what == "literal":
            line += op.text
        else:
            line += _field(flat[i], op, fmt.spec, f"{name}, value {i}")
            i += 1
    lines.append(line)
    return "\n".join(lines) + "\n"


def _field(value: float, op: Op, spec: str, where: str) -> str:
    """`value` right-justified in `op.width` characters, in a form every Fortran read edit descriptor takes."""
    w = op.width
    if op.kind == "I":
        if not value.is_integer():
            raise InputError(f"{where} = {value!r} is not an integer, but format {spec!r} reads it with I{w}.")
        text = str(int(value))
    elif not math.isfinite(value):
        text = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        text = text if len(text) <= w else text[:3] if value > 0 or math.isnan(value) else "-Inf"
    elif op.kind == "F":
        text = f"{value:#.{op.digits}f}"
    elif op.digits is not None:  # ESw.d and ENw.d: d digits after the point; Ew.d, Dw.d, Gw.d: d significant
        after = op.digits if op.kind in ("ES", "EN") else max(op.digits - 1, 0)
        text = f"{value:#.{after}E}"  # read back by any real edit descriptor; always a decimal point
    else:  # a bare width: as many digits as fit (a round trip when repr fits)
        text = _widest(value, w)
    if len(text) > w:
        raise InputError(
            f"{where} = {value!r} does not fit the {op.descriptor} field "
            f"of format {spec!r} (it needs {len(text)} characters). Widen the field or choose another format."
        )
    return text.rjust(w)


def _widest(value: float, width: int) -> str:
    text = repr(value)
    digits = 17
    while len(text) > width and digits > 0:
        digits -= 1
        text = f"{value:#.{digits}E}"
    return text
