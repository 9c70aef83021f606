"""`Sample`: one problem a backend accepts, with the parameter values the conformance checks use."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from blackbox_diff._errors import InputError

__all__ = ["Sample"]


@dataclasses.dataclass
class Sample:
    """A problem and parameter values for `check_backend`.

    The kit builds ``bbd.layer(problem, backend=..., parameters=parameters, variables=variables,
    **options)`` and calls it with the instances, one at a time and stacked into batches.

    Attributes:
        problem: what the backend compiles (a cvxpy.Problem, a casadi.Opti, a `bbd.Executable`, ...).
        instances: two or more tuples of parameter values, one value per parameter in the order the layer
            takes them (tensors, arrays or numbers; converted to float64 tensors). They should differ: the
            checks that calls do not depend on earlier calls, batching and threads compare instances. The
            first one is the point of the gradient and forward-mode checks.
        parameters: the ``parameters=`` of `bbd.layer` (handles or shapes; backend specific).
        variables: the ``variables=`` of `bbd.layer`.
        options: further `bbd.layer` options (the backend's own and the engine's).
        failing: parameter values of one instance the solver cannot solve (e.g. an infeasible problem), for
            the failure-isolation check; None skips that check for this sample.
        name: shown in the report.
        rtol: tolerance of the gradient and forward-mode checks against finite differences.
        float32_rtol: tolerance of float32 answers and gradients relative to float64 ones (relative to the
            size of each output).
        rtol_repeat: tolerance of answers that must agree across calls, batches and threads (relative to
            the size of each output): the same instance solved twice should give the same answer.
    """

    problem: Any
    instances: Sequence[Sequence[Any]]
    parameters: Any = None
    variables: Any = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    failing: Sequence[Any] | None = None
    name: str = ""
    rtol: float = 1e-5
    float32_rtol: float = 1e-3
    rtol_repeat: float = 1e-7

    def tensors(self) -> list[tuple[torch.Tensor, ...]]:
        """The instances as tuples of float64 tensors (checked: at least two, same count and shapes)."""
        if len(self.instances) < 2:
            raise InputError(
                f"Sample {self.label!r} has {len(self.instances)} instance(s); expected two or more (different "
                "parameter values), so that batches and repeated calls can be compared."
            )
        out = [_instance(values, f"instances[{k}]", self.label) for k, values in enumerate(self.instances)]
        shapes = [tuple(t.shape for t in inst) for inst in out]
        if any(s != shapes[0] for s in shapes):
            raise InputError(
                f"Sample {self.label!r}: the instances differ in their parameters' count or shapes ({shapes}); "
                "expected the same shapes in every instance."
            )
        return out

    def failing_tensors(self) -> tuple[torch.Tensor, ...] | None:
        return None if self.failing is None else _instance(self.failing, "failing", self.label)

    @property
    def label(self) -> str:
        return self.name or type(self.problem).__name__


def _instance(values: Any, where: str, label: str) -> tuple[torch.Tensor, ...]:
    if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
        raise InputError(
            f"Sample {label!r}: {where} must be a tuple with one value per parameter; got {type(values).__name__}."
        )
    out = []
    for i, v in enumerate(values):
        try:
            t = v.detach().to("cpu", torch.float64) if torch.is_tensor(v) else torch.from_numpy(
                np.array(v, dtype=np.float64))
        except (TypeError, ValueError) as err:
            raise InputError(f"Sample {label!r}: {where}[{i}] is not numeric ({err}).") from err
        out.append(t.clone())
    return tuple(out)
