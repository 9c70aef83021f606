"""Numbers as Fortran and C programs write them, fixed-width fields, array orders: the text protocol.

The forms below are what gfortran, Intel Fortran, glibc's printf and MSVC's old runtime really print
(the gfortran lines were produced by gfortran 12 and are checked end to end in tests/test_fortran.py). A
plain ``float()`` or a "replace D by E" reader gets several of them wrong: each test names the value the
easy reader would produce instead.
"""

from __future__ import annotations

import math
import re
import struct
import sys

import numpy as np
import pytest
import torch
from fuzzing import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

import blackbox_diff as bbd
from blackbox_diff.runtime._fortran_format import parse_format
from blackbox_diff.runtime._textio import TextFormatError, parse_number, read_numbers, write_numbers

NUMBERS = [
    ("0.2000000000000000D+01", 2.0),  # gfortran D24.16
    ("-0.1000000000000000-299", -1e-300),  # three-digit exponent: no letter (naive: -0.1 and -299)
    ("0.1000000000000000+301", 1e300),
    ("1.0000000000000001+300", 1.0000000000000001e300),  # ES24.16 with a three-digit exponent
    ("0.3333333333333333d+00", 0.3333333333333333),  # lower-case d
    ("1.5Q-3", 1.5e-3),  # quad-precision letter
    ("2.", 2.0),
    ("-.5", -0.5),
    ("+7", 7.0),
    ("1.5e3", 1500.0),
    ("1-3", 1e-3),  # Fortran input: an exponent sign alone starts the exponent
    ("0x1.8p+1", 3.0),  # C printf("%a")
    ("-0X.8P-1", -0.25),
]
NANS = ["NaN", "nan", "-nan", "+NaN", "NAN", "nan(0x8000000000000)", "NaNQ", "NaNS", "1.#QNAN0", "-1.#IND00"]
INFS = ["Infinity", "-Infinity", "+Inf", "inf", "-INF", "1.#INF00", "-1.#INF"]


@pytest.mark.parametrize(("token", "value"), NUMBERS, ids=[t for t, _ in NUMBERS])
def test_fortran_and_c_number_forms(token, value):
    assert parse_number(token) == value


@pytest.mark.parametrize("token", NANS + INFS)
def test_nan_and_infinity_spellings(token):
    value = parse_number(token)
    if token in NANS:
        assert math.isnan(value)
    else:
        assert value == (-math.inf if token.startswith("-") else math.inf)


@pytest.mark.parametrize("token", ["1.2.3", "1e", "D+01", "1.0+", "--1", "0x1.8", "nanx", "infinit", "1,5", "1_0"])
def test_what_is_not_a_number(token):
    with pytest.raises(ValueError, match=re.escape("a number such as 1.5")):
        parse_number(token)


def test_free_format_reads_intel_repeat_counts_and_commas():
    # Intel Fortran's list-directed output writes r*c for r equal values; some programs separate by commas.
    assert read_numbers("3*0.5 1.0D0\n2.0, -1.0-300; 4") == [0.5, 0.5, 0.5, 1.0, 2.0, -1e-300, 4.0]


def test_free_format_error_names_line_field_columns_found_and_expected():
    with pytest.raises(TextFormatError) as info:
        read_numbers("1.0 2.0\n3.0  x7 4\n")
    assert str(info.value) == (
        "line 2, field 2 (columns 6-7): found 'x7', expected a number such as 1.5, -2.5E+03, 0.2D+01 (Fortran D "
        "exponent), -0.1-299 (Fortran three-digit exponent), 0x1.8p+1, NaN or Infinity"
    )
    assert (info.value.line, info.value.field, info.value.columns, info.value.found) == (2, 2, (6, 7), "x7")


def test_free_format_null_value_between_commas_is_an_error():
    with pytest.raises(TextFormatError, match=re.escape("line 1, field 2 (columns 4-5): found ',,'")):
        read_numbers("1.0,,2.0")


# --- fixed-width fields ---------------------------------------------------------------------------------
def test_fields_that_touch_are_split_by_width():
    # ES23.16: a negative number fills its field, so fields run together; white-space splitting would read
    # one token "2.0000000000000000E+00-1.0000000000000000-300" and fail.
    line = " 2.0000000000000000E+00-1.0000000000000000-300-3.5000000000000000E+00"
    assert read_numbers(line, parse_format("3ES23.16", "o")) == [2.0, -1e-300, -3.5]
    with pytest.raises(TextFormatError):
        read_numbers(line)


def test_a_plain_width_reads_any_number_of_fields_per_line():
    text = "    1.000000-100.000000    2.500000\n   -0.500000\n"
    assert read_numbers(text, parse_format(12, "o")) == [1.0, -100.0, 2.5, -0.5]


def test_gfortran_format_reversion_and_groups():
    # (1X, 2(F8.3, 1X), /, E12.4) with 7 values: a '/' record, then reversion to the group (no 1X).
    fmt = parse_format("(1X, 2(F8.3, 1X), /, E12.4)", "o")
    text = write_numbers(np.arange(7.0), fmt, "p")
    assert text == "    0.000    1.000 \n   2.000E+00\n   3.000    4.000 \n   5.000E+00\n   6.000\n"
    assert read_numbers(text, fmt) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def test_several_writes_with_one_format_restart_it_on_each_line():
    # write(*,'(3F6.2)') with 2 values, then with 3: the short line ends the first write.
    assert read_numbers("  1.00  2.00\n  3.00  4.00  5.00\n", parse_format("(3F6.2)", "o")) == [1, 2, 3, 4, 5]


def test_scale_factor_applies_only_without_an_exponent():
    fmt = parse_format("(1P, 2F10.3)", "o")  # 1PF: the program wrote 10 * value
    assert read_numbers("    12.345  1.5E+01", fmt) == [1.2345, 15.0]


def test_quoted_literals_are_skipped():
    assert read_numbers("x =    1.500 y =   -2.000", parse_format("('x = ', F8.3, ' y = ', F8.3)", "o")) == [1.5, -2.0]


def test_fixed_width_error_names_the_descriptor_and_columns():
    with pytest.raises(TextFormatError) as info:
        read_numbers("    2.000000************    0.333333", parse_format("3F12.6", "o"))
    assert str(info.value) == (
        "line 1, field 2 (columns 13-24): found '************', expected a number; a field of asterisks means the "
        "value did not fit its Fortran edit descriptor (widen the program's format, e.g. ES24.16) in this F12.6 "
        "field of format '3F12.6'"
    )


def test_text_after_the_last_field_of_a_format_is_an_error():
    with pytest.raises(TextFormatError, match=re.escape("found '  9.0', expected the end of the line after the "
                                                        "last field of format '2F6.1'")):
        read_numbers("   1.0   2.0  9.0", parse_format("2F6.1", "o"))


def test_a_blank_field_inside_a_line_is_an_error_not_a_zero():
    # Fortran reads a blank field as 0; here it almost always means the format is misaligned.
    with pytest.raises(TextFormatError, match=re.escape("(a blank field: is the format aligned with the output?)")):
        read_numbers("   1.0         2.0", parse_format("3F6.1", "o"))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("3F12", "F12 needs its digits (F12.d)"),
        ("(3F12.6", "has an unbalanced parenthesis"),
        ("3F12.6)", "unbalanced ')'"),
        ("A10", "unexpected text at 'A10'"),
        ("1X, /", "has no number field"),
        ("F0.3", "a zero width (F0) is free-format output"),
        ("*(F8.3), F8.3", "an unlimited group *(...) must be the last item"),
        (0, "as a field width must be a positive number of characters; got 0."),
        (2.5, "must be a Fortran format such as '3F12.6' or a field width (int); got 2.5."),
    ],
)
def test_format_errors(spec, message):
    with pytest.raises(bbd.InputError, match=re.escape(message)):
        parse_format(spec, "Executable output_format")


def test_writing_input_in_fields_refuses_values_that_do_not_fit():
    with pytest.raises(bbd.InputError, match=re.escape(
            "parameter 1, value 0 = 123456.0 does not fit the F8.3 field of format '3F8.3' (it needs 10 characters)")):
        write_numbers(np.array([123456.0]), parse_format("3F8.3", "o"), "parameter 1")
    with pytest.raises(bbd.InputError, match=re.escape("= 2.5 is not an integer, but format '(I4)' reads it with I4")):
        write_numbers(np.array([2.5]), parse_format("(I4)", "o"), "parameter 0")


# --- array order, through a real program ------------------------------------------------------------------
# Reads a 2x3 matrix as Fortran's read(*,*) A(2,3) does (column by column) and writes back 2*A^T (3x2) as
# Fortran's write(*,*) would (column by column): the program is the Fortran storage convention in miniature.
COLUMN_MAJOR = """
import sys
vals = [float(v) for v in open(sys.argv[1]).read().split()]
a = [[vals[i + 2 * j] for j in range(3)] for i in range(2)]  # A(i, j) = vals(i + 2 j)
out = [2 * a[i][j] for i in range(2) for j in range(3)]  # B = 2 A^T, 3x2; B(j, i) at j + 3 i
print(" ".join(repr(v) for v in out))
"""


@pytest.fixture
def column_major(tmp_path):
    path = tmp_path / "colmajor.py"
    path.write_text(COLUMN_MAJOR)
    return [sys.executable, str(path), "{input}"]


def test_fortran_order_for_a_column_major_program(column_major, tmp_path):
    A = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    exe = bbd.Executable(column_major, io="text", input_order="F", output_order="F", output_shape=(3, 2),
                         workdir=tmp_path)
    np.testing.assert_array_equal(exe(A), 2 * A.T)
    # The default (C order both ways) hands the program a scrambled matrix: not 2 A^T.
    scrambled = bbd.Executable(column_major, io="text", output_shape=(3, 2), workdir=tmp_path)(A)
    assert not np.array_equal(scrambled, 2 * A.T)
    # Gradients through the column-major program: d sum(W * X) / dA = 2 W^T for X = 2 A^T.
    solve = bbd.implicit(bbd.Root(lambda X, A: X - 2 * A.T))(exe)
    At = torch.tensor(A, requires_grad=True)
    W = torch.arange(6.0).reshape(3, 2)
    (solve(At) * W).sum().backward()
    torch.testing.assert_close(At.grad, 2 * W.T, rtol=0, atol=0)


def test_input_order_per_parameter(tmp_path):
    echo = tmp_path / "echo.py"
    echo.write_text("import sys; print(open(sys.argv[1]).read())")
    exe = bbd.Executable([sys.executable, str(echo), "{input}"], io="text", input_order=["C", "F"])
    M = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert exe(M, M).tolist() == [1.0, 2.0, 3.0, 4.0, 1.0, 3.0, 2.0, 4.0]
    with pytest.raises(bbd.SolverError, match=re.escape("input_order has 2 entries ['C', 'F'], but the program was "
                                                        "called with 1 parameters")):
        bbd.implicit(bbd.Root(lambda x, m: x - m.reshape(-1)))(exe)(torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_order": "K"}, "Executable input_order must be 'C' (row-major) or 'F' (column-major, Fortran), "
                               "or a list with one of them per parameter; got 'K'."),
        ({"output_order": "fortran"}, "Executable output_order must be 'C' (row-major) or 'F' (column-major, "
                                      "Fortran); got 'fortran'."),
        ({"io": "json", "input_order": "F"}, "Executable input_order='F' applies to io='text' only"),
        ({"io": "npy", "output_format": "3F12.6"}, "Executable output_format applies to io='text' only; got "
                                                   "io='npy'."),
        ({"output_shape": (2, -1)}, "Executable output_shape must be a tuple of non-negative ints"),
        ({"max_output_bytes": 0}, "Executable max_output_bytes must be a positive int (bytes); got 0."),
        ({"timeout": float("inf")}, "Executable timeout must be a positive number of seconds or None; got inf."),
    ],
)
def test_constructor_rejects_bad_text_settings(kwargs, message):
    with pytest.raises(bbd.InputError, match=re.escape(message)):
        bbd.Executable(["prog"], **{"io": "text", **kwargs})


# --- properties -------------------------------------------------------------------------------------------
def fortran_e(value: float, letter: str, digits: int = 17) -> str:
    """`value` as Fortran's Ew.d/Dw.d write it: 0.ddd, two-digit exponents with the letter, three without."""
    mantissa, exponent = f"{value:.{digits - 1}e}".split("e")
    sign = "-" if mantissa.startswith("-") else ""
    e = int(exponent) + 1
    body = "0." + mantissa.lstrip("-").replace(".", "")
    tail = f"{letter}{e:+03d}" if abs(e) <= 99 else f"{e:+04d}"
    return sign + body + tail


FINITE = st.floats(allow_nan=False, allow_infinity=False, width=64)


@fuzz_settings(ci=200, fuzz=3000)
@given(FINITE, st.sampled_from(["D", "E", "d", "e", "Q"]))
def test_property_fortran_exponent_forms_round_trip_exactly(value, letter):
    text = fortran_e(value, letter)
    assert struct.pack("<d", parse_number(text)) == struct.pack("<d", value), text  # bit for bit, -0.0 included


@fuzz_settings(ci=100, fuzz=2000)
@given(st.lists(FINITE, min_size=1, max_size=12),
       st.sampled_from(["3ES24.16", "(1X, 2D25.17)", "*(ES24.16E3)", "(2(E26.17, 1X), /, G25.17)", "25", "24"]))
def test_property_fixed_width_write_then_read_is_exact(values, spec):
    fmt = parse_format(int(spec) if spec.isdigit() else spec, "o")
    text = write_numbers(np.array(values), fmt, "p")
    assert read_numbers(text, fmt) == [v + 0.0 for v in values]


@fuzz_settings(ci=200, fuzz=3000)
@given(st.text(alphabet="0123456789.+-eEdDqQxXpP*,; \n\tnaNiIfFy#()", max_size=60),
       st.sampled_from([None, "3F8.3", "(1X, 2E12.4)", 7, "*(D10.3)"]))
def test_property_any_text_reads_or_fails_with_a_located_error(text, spec):
    fmt = None if spec is None else parse_format(spec, "o")
    try:
        out = read_numbers(text, fmt)
    except TextFormatError as err:
        assert err.line >= 1 and err.field >= 1 and err.expected
        return
    assert out and all(isinstance(v, float) for v in out)


@fuzz_settings(ci=100, fuzz=1000)
@given(st.text(alphabet="0123456789FEDGISNXPT()*,/'. ", max_size=24))
def test_property_any_format_parses_or_fails_with_input_error(spec):
    try:
        fmt = parse_format(spec, "output_format")
    except bbd.InputError as err:
        assert "output_format=" in str(err) or "output_format " in str(err)
        return
    assert fmt.fields >= 1
