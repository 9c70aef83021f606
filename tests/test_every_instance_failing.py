"""on_failure='nan' when every instance fails, for every output type: NaN outputs of the right shape and
a warning per instance, never a bare Python exception (StopIteration used to escape) and never a lost batch;
on_failure='raise' gives the documented error instead."""

from __future__ import annotations

import re
import sys

import casadi as ca
import cvxpy as cp
import numpy as np
import pytest
import torch

import blackbox_diff as bbd
from blackbox_diff.deq import DEQ

torch.set_default_dtype(torch.float64)
ROOT = bbd.Root(lambda x, w: x**2 - w)


def _nan_with_warnings(call, shape, count):
    with pytest.warns(RuntimeWarning) as record:
        out = call()
    out = out[0] if isinstance(out, tuple) else out
    assert tuple(out.shape) == shape and bool(torch.isnan(out).all())
    assert sum("NaN" in str(r.message) for r in record) >= count
    return out


def test_implicit_unbatched_and_batched_certification_failures():
    wrong = lambda w: np.sqrt(w) + 1.0  # noqa: E731
    _nan_with_warnings(lambda: bbd.implicit(ROOT, on_failure="nan")(wrong)(torch.tensor(4.0)), (), 1)
    _nan_with_warnings(lambda: bbd.implicit(ROOT, on_failure="nan", in_dims=0)(wrong)(torch.tensor([4.0, 9.0])),
                       (2,), 2)


def test_implicit_all_nan_answers_and_all_raising_black_boxes():
    nan = lambda w: np.full_like(w, np.nan)  # noqa: E731
    w = torch.tensor([[4.0, 1.0], [9.0, 1.0]])
    # NaN answers, on a first call: their own shape shapes the output
    _nan_with_warnings(lambda: bbd.implicit(ROOT, on_failure="nan", in_dims=0)(nan)(w), (2, 2), 2)
    _nan_with_warnings(lambda: bbd.implicit(ROOT, on_failure="nan")(nan)(torch.tensor([4.0, 9.0])), (2,), 1)

    def boom(w):
        raise ArithmeticError("no root")

    boom.output_shape = (2,)  # declared by the black box (as Executable's output_shape)
    _nan_with_warnings(lambda: bbd.implicit(ROOT, on_failure="nan", in_dims=0)(boom)(w), (2, 2), 2)
    with pytest.raises(bbd.SolverError, match=re.escape("declares no output shape")):
        bbd.implicit(ROOT, on_failure="nan", in_dims=0)(lambda w: boom(w))(w)  # raised: no shape to be had
    with pytest.raises(bbd.SolverError, match="raised ArithmeticError: no root"):
        bbd.implicit(ROOT, in_dims=0)(boom)(w)


def test_deq_every_row_failing():
    class Expanding(torch.nn.Module):
        def forward(self, z, x):
            return 2 * z + x  # not a contraction: no fixed point is reached

    _nan_with_warnings(lambda: DEQ(Expanding(), on_failure="nan", max_iter=5)(torch.ones(3, 4)), (3, 4), 3)


def test_cvxpy_layer_every_instance_infeasible():
    x = cp.Variable(2)
    lo, hi = cp.Parameter(2), cp.Parameter(2)
    layer = bbd.layer(cp.Problem(cp.Minimize(cp.sum_squares(x)), [x >= lo, x <= hi]), parameters=[lo, hi],
                      variables=[x], on_failure="nan")
    lo_t, hi_t = torch.ones(3, 2), -torch.ones(3, 2)
    _nan_with_warnings(lambda: layer(lo_t, hi_t), (3, 2), 3)


def test_casadi_layer_every_instance_infeasible():
    opti = ca.Opti()
    x = opti.variable()
    p = opti.parameter()
    opti.minimize((x - 2) ** 2)
    opti.subject_to(x >= 1)
    opti.subject_to(x <= p)
    layer = bbd.layer(opti, parameters=[p], variables=[x], on_failure="nan")
    _nan_with_warnings(lambda: layer(torch.tensor([0.0, -1.0])), (2,), 2)


def test_qp_layer_every_instance_infeasible():
    Q = torch.eye(2).expand(2, 2, 2)
    p = torch.zeros(2, 2)
    G = torch.tensor([[1.0, 0.0], [-1.0, 0.0]]).expand(2, 2, 2)
    h = -torch.ones(2, 2)  # x0 <= -1 and x0 >= 1
    _nan_with_warnings(lambda: bbd.QPLayer(on_failure="nan")(Q, p, G, h, None, None), (2, 2), 2)


def test_executable_every_instance_failing(tmp_path):
    program = tmp_path / "fails.py"
    program.write_text("import sys\nsys.exit(3)\n")
    exe = bbd.Executable([sys.executable, str(program)], io="json", timeout=30, output_shape=(2,))
    fn = bbd.implicit(ROOT, on_failure="nan", in_dims=0)(exe)
    _nan_with_warnings(lambda: fn(torch.tensor([[4.0, 1.0], [9.0, 1.0]])), (2, 2), 2)


def test_scipy_layer_every_instance_failing():
    # x**2 + w = 0 has no real root for w > 0: scipy's root finder fails (or its answer is refused) on every row
    layer = bbd.layer(bbd.Root(lambda x, w: x**2 + w), backend="scipy", parameters=[(2,)], variables=[(2,)],
                      on_failure="nan")
    _nan_with_warnings(lambda: layer(torch.tensor([[4.0, 1.0], [9.0, 1.0]])), (2, 2), 2)


def test_subprocess_layer_every_instance_failing(tmp_path):
    program = tmp_path / "fails.py"
    program.write_text("import sys\nsys.exit(3)\n")
    exe = bbd.Executable([sys.executable, str(program)], io="json", timeout=30)
    layer = bbd.layer(exe, condition=ROOT, parameters=[(2,)], variables=[(2,)], on_failure="nan")
    _nan_with_warnings(lambda: layer(torch.tensor([[4.0, 1.0], [9.0, 1.0]])), (2, 2), 2)
