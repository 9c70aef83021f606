"""Fuzz the public API with hypothesis: every call ends in a documented error or a correct result.

The oracle problem has a closed form: the black box returns z = w / (1 + c^2), the condition is
F(z, w, c) = z (1 + c^2) - w, so values and gradients are checked against autograd of the closed form.
Hypothesis draws the shape of an instance (empty included), the batch size (0, small, 2000), where the
batch dimension sits (in_dims, negative included, which makes the parameters non-contiguous), extra
strided views, the dtype and container of every parameter (torch/numpy/python; float64, float32,
float16, bfloat16, int, bool, complex, strings), NaN/Inf, requires-grad/no-grad mixes, the meta device,
the executor and the array convention. A second property feeds options of the wrong type.

"Documented error" means a `bbd.BlackBoxDiffError` (InputError for malformed input); anything else
(a traceback from inside numpy or torch) is a failure. Each bug this suite found (7, all fixed in the
core) keeps one strict regression test at the end of the file.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import warnings
import zlib

import numpy as np
import pytest
import torch
from fuzzing import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

import blackbox_diff as bbd

COND = bbd.Root(lambda z, w, c: z * (1 + c**2) - w)
STATS: collections.Counter[str] = collections.Counter()  # outcome -> count, printed by the last test
FUZZ = fuzz_settings(ci=300, fuzz=6000)  # `make fuzz` runs the large profile (tests/fuzzing.py)
FUZZ_OPTIONS = fuzz_settings(ci=100, fuzz=1000)


def closed_form_solver(w, c):
    return w / (1 + c**2)


@dataclasses.dataclass
class Arg:
    container: str  # "torch", "numpy", "python"
    dtype: str  # float64 float32 float16 bfloat16 int64 bool complex128 str
    batched: bool
    dim: int  # in_dims entry when batched
    strided: bool  # pass a stride-2 view
    requires_grad: bool
    poison: str | None  # None, "nan", "inf"
    meta: bool
    shape: tuple[int, ...]  # per-instance shape


@dataclasses.dataclass
class Case:
    shape: tuple[int, ...]
    batch: int | None
    w: Arg
    c: Arg
    no_grad: bool
    executor: str | None
    arrays: str


FLOAT_OK = ("float64", "float32")
LOW = ("float16", "bfloat16")


@st.composite
def cases(draw) -> Case:
    # sampled_from with repeats sets the odds: hypothesis favours the bounds of st.integers.
    shape = tuple(draw(st.lists(st.sampled_from([1, 2, 3] * 3 + [0]), max_size=2)))
    batch = draw(st.sampled_from([None] * 6 + [1, 2, 3, 4] * 2 + [0, 2000]))
    if batch == 2000:
        shape = ()  # keep huge batches cheap

    def arg(c_scalar: bool) -> Arg:
        inst = () if c_scalar else shape
        batched = batch is not None and draw(st.booleans())
        container = draw(st.sampled_from(["torch"] * 4 + ["numpy", "numpy", "python"]))
        if container == "python" and (inst or batched):
            container = "numpy"
        dtypes = ["float64"] * 12 + ["float32"] * 6 + list(LOW) + ["int64", "bool", "complex128"]
        if container == "numpy":
            dtypes = [d for d in dtypes if d != "bfloat16"] + ["str"]
        if container == "python":
            dtypes = ["float64", "float64", "int64", "complex128"]
        nd = len(inst) + 1
        return Arg(
            container=container,
            dtype=draw(st.sampled_from(dtypes)),
            batched=batched,
            dim=draw(st.integers(-nd, nd - 1)) if batched else 0,
            strided=container == "torch" and draw(st.booleans()),
            requires_grad=container == "torch" and draw(st.booleans()),
            poison=draw(st.sampled_from([None] * 12 + ["nan", "inf"])),
            meta=container == "torch" and draw(st.sampled_from([False] * 20 + [True])),
            shape=inst,
        )

    w = arg(False)
    c = arg(draw(st.booleans()))
    if batch is not None and not (w.batched or c.batched):
        w = dataclasses.replace(w, batched=True, container="torch" if w.container == "python" else w.container)
    return Case(
        shape=shape,
        batch=batch if (w.batched or c.batched) else None,
        w=w,
        c=c,
        no_grad=draw(st.sampled_from([False] * 4 + [True])),
        executor=draw(st.sampled_from([None, None, "threads"])),
        arrays=draw(st.sampled_from(["numpy", "numpy", "torch"])),
    )


def _canonical(arg: Arg, batch: int | None, seed: int) -> np.ndarray:
    """Values in batch-first layout; multiples of 1/4 in [-3, 3], exact in every dtype drawn."""
    full = ((batch,) if arg.batched else ()) + arg.shape
    rng = np.random.default_rng(seed)
    vals = np.array(rng.integers(-12, 13, size=full) / 4.0, dtype=np.float64)
    if arg.dtype in ("int64", "bool"):
        vals = np.array(np.abs(np.round(vals)) % 2 if arg.dtype == "bool" else np.round(vals))
    if _poisoned(arg) and vals.size:
        vals.flat[rng.integers(vals.size)] = np.nan if arg.poison == "nan" else np.inf
    return vals


def _poisoned(arg: Arg) -> bool:
    return arg.poison is not None and arg.dtype in ("float64", "float32", *LOW, "complex128")


def _build(arg: Arg, vals: np.ndarray) -> tuple[object, torch.Tensor | None]:
    """(what is passed, the leaf whose .grad is checked in batch-first layout)."""
    if arg.container == "python":
        v = float(vals)
        return {"float64": v, "int64": int(v) if np.isfinite(v) else v, "complex128": complex(v, 1.0)}[arg.dtype], None
    if arg.container == "numpy":
        a = np.char.add("w=", vals.astype(np.str_)) if arg.dtype == "str" else vals.astype(arg.dtype)
        if arg.dtype == "complex128":
            a = a + 1j
        a = np.moveaxis(a, 0, arg.dim) if arg.batched else a
        return a, None
    t = torch.tensor(vals, dtype=getattr(torch, arg.dtype))
    if arg.dtype == "complex128":
        t = t + 1j
    leaf = None
    if arg.requires_grad and (t.is_floating_point() or t.is_complex()):
        leaf = t.requires_grad_(True)
    if arg.meta:
        t = t.detach().to("meta")
        leaf = None
    p = t.movedim(0, arg.dim) if arg.batched else t
    if arg.strided and p.dim():
        p = torch.stack([p, torch.zeros_like(p)], dim=-1)[..., 0]  # a stride-2, non-contiguous view
    return p, leaf


def _promoted(args: list[tuple[Arg, object]]) -> torch.dtype:
    dtypes = [p.dtype if torch.is_tensor(p) else torch.float64 for _, p in args]
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def _expected_error(case: Case) -> str | None:
    """Why the call must raise InputError (None: it must succeed)."""
    for a in (case.w, case.c):
        if a.dtype == "int64" and a.container == "torch" or a.dtype == "bool":
            return "dtype"  # booleans are not numbers, in torch or numpy
        if a.dtype in ("complex128", "str"):
            return "dtype"
        if a.dtype in LOW and a.container == "torch":
            return "low precision"
        if _poisoned(a) and np.prod(((case.batch,) if a.batched else ()) + a.shape) > 0:
            return "non-finite"
        if a.meta:
            return "device"
    if case.batch == 0:
        return "empty batch"
    return None


def _seed(case: Case) -> int:
    return zlib.crc32(repr(case).encode())


def run_case(case: Case) -> str:
    """Run one case; return the outcome label. Raises AssertionError when the API misbehaves."""
    seed = _seed(case)
    wv, cv = _canonical(case.w, case.batch, seed), _canonical(case.c, case.batch, seed + 1)
    (w, w_leaf), (c, c_leaf) = _build(case.w, wv), _build(case.c, cv)
    in_dims = None if case.batch is None else tuple(a.dim if a.batched else None for a in (case.w, case.c))
    fn = bbd.implicit(COND, in_dims=in_dims, executor=case.executor, max_workers=2, arrays=case.arrays)(
        closed_form_solver
    )
    expected_error = _expected_error(case)
    err: BaseException | None = None
    out = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.set_grad_enabled(not case.no_grad):
                out = fn(w, c)
                if out.requires_grad:
                    weight = torch.arange(1.0, out.numel() + 1, dtype=out.dtype).reshape(out.shape)
                    (out * weight).sum().backward()
    except Exception as exc:  # noqa: BLE001 - classified below
        err = exc
    if expected_error is not None:
        assert isinstance(err, bbd.InputError), f"{case}\nexpected InputError ({expected_error}), got {err!r}"
        return f"InputError: {expected_error}"
    assert err is None, f"{case}\nexpected a result, got {type(err).__name__}: {err}"
    _check_values(case, out, (case.w, case.c), (wv, cv), ((case.w, w), (case.c, c)), (w_leaf, c_leaf))
    return "correct result"


def _check_values(case, out, args, vals, passed, leaves) -> None:
    dtype = _promoted(list(passed))
    # Under arrays="torch" the black box computes in its inputs' dtypes: a float32 input limits the answer.
    low = case.arrays == "torch" and any(torch.is_tensor(p) and p.dtype == torch.float32 for _, p in passed)
    tol = 1e-5 if low else {torch.float64: 1e-10, torch.float32: 1e-5}[dtype]
    ref_leaves = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in vals]
    w_ref, c_ref = ref_leaves
    if case.c.batched and case.batch is not None:
        c_ref = c_ref.reshape(c_ref.shape + (1,) * (len(case.shape) - len(case.c.shape)))
    if case.batch is not None and not case.w.batched:
        w_ref = w_ref.expand((case.batch,) + case.shape)
    z_ref = w_ref / (1 + c_ref**2)
    if case.batch is not None:
        z_ref = z_ref.expand((case.batch,) + case.shape)
    assert out.dtype == dtype, f"{case}\nresult dtype {out.dtype}, expected {dtype}"
    assert tuple(out.shape) == tuple(z_ref.shape), f"{case}\nshape {tuple(out.shape)} != {tuple(z_ref.shape)}"
    torch.testing.assert_close(out.detach().double(), z_ref.detach(), atol=tol, rtol=tol)
    expect_graph = not case.no_grad and any(leaf is not None for leaf in leaves)
    assert out.requires_grad == expect_graph, f"{case}\nrequires_grad {out.requires_grad} != {expect_graph}"
    if not expect_graph:
        return
    weight = torch.arange(1.0, z_ref.numel() + 1, dtype=torch.float64).reshape(z_ref.shape)
    grads = torch.autograd.grad((z_ref * weight).sum(), ref_leaves)
    for leaf, g in zip(leaves, grads, strict=True):
        if leaf is not None:
            gtol = 10 * max(tol, {torch.float64: 1e-10, torch.float32: 1e-5}[leaf.dtype])
            torch.testing.assert_close(leaf.grad.double(), g, atol=gtol, rtol=gtol)


@FUZZ
@given(cases())
def test_fuzz_calls_end_in_a_documented_error_or_a_correct_result(case):
    STATS[run_case(case)] += 1
    STATS["cases"] += 1


# --- options of the wrong type ---------------------------------------------------------------------------
WRONG_OPTIONS = st.sampled_from(
    [
        ("linear_solver", "qr"), ("linear_solver", 3), ("rtol", "tight"), ("rtol", -1.0), ("rtol", None),
        ("max_steps", 0), ("max_steps", 2.5), ("max_steps", "many"), ("ridge", -1e-3), ("ridge", float("nan")),
        ("residual_tol", 0.0), ("residual_tol", "1e-6x"), ("certify", "maybe"), ("certify", True),
        ("on_failure", "ignore"), ("on_failure", None), ("fallback", "sometimes"), ("fallback", [1]),
        ("dense_max_size", -1), ("in_dims", "batch"), ("in_dims", 1.5), ("in_dims", (0, "x")), ("in_dims", True),
        ("executor", "gpu"), ("executor", 4), ("executor", object()), ("max_workers", 0), ("max_workers", "two"),
        ("arrays", "jax"), ("return_duals", "maybe"), ("capture_failures", 3), ("capture_failures", ["a"]),
        ("active_tol", 0.0), ("tolerance", 1e-3), ("solver", "dense"), ("verbose", True),
    ]
)


@FUZZ_OPTIONS
@given(WRONG_OPTIONS, st.booleans())
def test_fuzz_options_of_the_wrong_type_raise_input_error(option, via_with_options):
    name, value = option
    with pytest.raises(bbd.InputError, match=re.escape("Invalid options for ImplicitOptions")) as info:
        if via_with_options:
            bbd.implicit(COND)(closed_form_solver).with_options(**{name: value})
        else:
            bbd.implicit(COND, **{name: value})
    assert repr(name) in str(info.value) and "Valid options are:" in str(info.value)
    STATS["options: InputError"] += 1
    STATS["cases"] += 1


# --- one strict regression test per bug the fuzzer found --------------------------------------
def _strict(case: Case) -> None:
    """The strict oracle for one case."""
    wv, cv = _canonical(case.w, case.batch, 0), _canonical(case.c, case.batch, 1)
    (w, _), (c, _) = _build(case.w, wv), _build(case.c, cv)
    in_dims = None if case.batch is None else tuple(a.dim if a.batched else None for a in (case.w, case.c))
    fn = bbd.implicit(COND, in_dims=in_dims)(closed_form_solver)
    if _expected_error(case) is not None:
        with pytest.raises(bbd.InputError):
            fn(w, c)
    else:
        out = fn(w, c)
        assert out.shape == ((case.batch,) if case.batch is not None else ()) + case.shape


def _arg(**kw) -> Arg:
    base = dict(container="torch", dtype="float64", batched=False, dim=0, strided=False, requires_grad=False,
                poison=None, meta=False, shape=(2,))
    return Arg(**{**base, **kw})


def _case(w: Arg, c: Arg | None = None, batch: int | None = None) -> Case:
    return Case(shape=w.shape, batch=batch, w=w, c=c or _arg(shape=()), no_grad=False, executor=None,
                arrays="numpy")


def test_bug_half_precision_parameters_are_rejected():
    _strict(_case(_arg(dtype="float16")))


def test_bug_half_precision_backward_raises_a_documented_error():
    w = torch.tensor([1.0, 2.0], dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(bbd.InputError, match="half precision"):
        bbd.implicit(COND)(closed_form_solver)(w, torch.tensor(0.5, dtype=torch.bfloat16)).sum().backward()


def test_bug_complex_numpy_arrays_are_rejected():
    with pytest.raises(bbd.InputError, match=re.escape("expected a real floating dtype")):
        bbd.implicit(COND)(closed_form_solver)(np.array([1.0 + 1j, 2.0]), 0.5)


def test_bug_numpy_text_and_huge_ints_are_rejected():
    with pytest.raises(bbd.InputError):
        bbd.implicit(COND)(closed_form_solver)(np.array(["1.0", "x"]), 0.5)
    with pytest.raises(bbd.InputError):
        bbd.implicit(COND)(closed_form_solver)(10**400, 0.5)


def test_bug_meta_tensors_are_rejected():
    _strict(_case(_arg(meta=True)))


def test_bug_empty_batch_raises_input_error():
    _strict(_case(_arg(shape=(2,), batched=True), batch=0))


def test_bug_instances_with_no_unknowns_return_an_empty_result():
    w = torch.zeros(0, requires_grad=True)
    out = bbd.implicit(COND)(closed_form_solver)(w, torch.tensor(0.5))
    assert out.shape == (0,)
    out.sum().backward()
    assert w.grad.shape == (0,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a second real device")
def test_parameters_on_two_devices_raise_input_error():
    fn = bbd.implicit(COND)(closed_form_solver)
    with pytest.raises(bbd.InputError, match=re.escape("Parameters live on different devices ['cpu', 'cuda:0']")):
        fn(torch.ones(2), torch.tensor(0.5, device="cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_parameters_give_cuda_results_and_gradients():
    w = torch.tensor([1.0, 2.0], device="cuda", requires_grad=True)
    c = torch.tensor(0.5, device="cuda")
    out = bbd.implicit(COND)(closed_form_solver)(w, c)
    assert out.device.type == "cuda"
    out.sum().backward()
    torch.testing.assert_close(w.grad.cpu(), torch.full((2,), 1 / 1.25), atol=1e-12, rtol=0)


def test_zz_fuzz_counts(capsys):
    """Runs last in this file: prints how many cases ran and how they ended (for the report)."""
    with capsys.disabled():
        print("\nfuzz outcomes:", dict(sorted(STATS.items())))
