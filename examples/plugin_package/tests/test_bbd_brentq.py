"""The plugin's own tests, as a plugin author writes them: the conformance kit on the backend, and the
entry point loaded as an installed one would be. Run with ``pytest examples/plugin_package/tests`` after
``pip install -e examples/plugin_package`` (blackbox_diff's own test suite runs them too)."""

from __future__ import annotations

import importlib.metadata

import torch
from bbd_brentq import BracketedRoot
from bbd_brentq.plugin import BrentqBackend

import blackbox_diff as bbd
from blackbox_diff.testing import Sample, check_backend

# x^3 + x = w on the bracket [-10, 10]; w = 2000 has its root outside it, so brentq must fail there.
SAMPLE = Sample(
    BracketedRoot(lambda x, w: x**3 + x - w, lo=-10.0, hi=10.0),
    instances=[(2.0,), (10.0,), (-4.0,)],
    parameters=[()],
    failing=(2000.0,),
    name="cubic-on-a-bracket",
)


def test_the_backend_passes_the_conformance_kit():
    report = check_backend(BrentqBackend(), SAMPLE)  # raises ConformanceError naming each failed check
    assert report.ok


def test_the_entry_point_registers_the_backend():
    entry_point = importlib.metadata.EntryPoint("brentq", "bbd_brentq.plugin", bbd.plugin.ENTRY_POINT_GROUP)
    with bbd.plugin.registered(entry_point):
        assert bbd.plugin.plugin_errors() == []
        layer = bbd.layer(SAMPLE.problem, parameters=[()])  # found through accepts()
        assert isinstance(bbd.plugin.get_backend("brentq"), BrentqBackend)
        w = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
        layer(w).backward()
        assert torch.allclose(w.grad, torch.tensor(0.25, dtype=torch.float64))  # 1 / (3 x^2 + 1) at x = 1
