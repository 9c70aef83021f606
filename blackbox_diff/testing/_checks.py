"""The conformance checks. Each takes the `Context` of one sample, raises `Failed` (what is wrong and
what to do) or `Skipped` (why it cannot run), and otherwise returns a short note of what it verified."""

from __future__ import annotations

import math
import threading
import typing
import warnings
from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwad

from blackbox_diff._errors import BackendUnavailableError, CertificationError, InputError, SolverError
from blackbox_diff.plugin import Compiled
from blackbox_diff.testing._context import Context, Failed, Skipped, compare, flatten, grads, project
from blackbox_diff.tools import FAIL, central_difference, check_gradients, entry_scale

__all__ = ["CHECKS", "NEEDS_REFERENCE", "RUNNERS"]

UNKNOWN = "bbd_testing_unknown_option"
INVALID = "bbd-testing-invalid-value"
STATE_HINT = (
    "The answer depends on earlier calls: the backend keeps mutable state between calls (a cache, a warm start "
    "or a buffer its black box or condition shares). Make each call depend on its parameters only (warm starts "
    "off by default, and never changing the answer beyond the solver's tolerance)."
)
THREAD_HINT = (
    "Calls from several threads interfere: the black box or the condition shares mutable state between calls "
    "(a buffer, a solver object that is not thread-safe). Give each call its own state, or guard it with a lock."
)


def _rtol_grad(ctx: Context) -> float:
    # Gradients go through an adjoint solve (tolerance ~1e-10 relative): a little looser than the answers.
    return max(ctx.sample.rtol_repeat, 1e-6)


# --- compile and forward: the basis of every other check --------------------------------------------------
def check_compile(ctx: Context) -> str:
    b, s = ctx.backend, ctx.sample
    try:
        b.require()
    except BackendUnavailableError as err:
        raise Failed(f"the backend is unavailable: {err}") from err
    if not b.accepts(s.problem):
        raise Failed(
            f"accepts(problem) is False for the sample's {type(s.problem).__name__}, so bbd.layer(problem) would not "
            "find this backend. Return True for every problem the backend compiles."
        )
    ctx.layer_ = ctx.layer()
    compiled = ctx.layer_.compiled
    if compiled.backend != b.name:
        raise Failed(f"Compiled.backend is {compiled.backend!r}; expected the backend's name {b.name!r} (messages "
                     "name it).")
    shapes = compiled.parameter_shapes
    given = [tuple(t.shape) for t in ctx.instances[0]]
    if shapes is not None and [tuple(x) for x in shapes] != given:
        raise Failed(
            f"Compiled.parameter_shapes is {[tuple(x) for x in shapes]}, but the sample's instances have parameters "
            f"of shapes {given}: declare one shape per parameter, in the order the layer takes them."
        )
    own = {k: v for k, v in s.options.items() if k in getattr(b.Options, "model_fields", {})}
    direct = b.compile(s.problem, s.parameters, s.variables, dict(own))
    if not isinstance(direct, Compiled):
        raise Failed(
            f"compile called directly with a dict of options returned a {type(direct).__name__}; expected a "
            "bbd.Compiled. bbd.layer passes the validated Options model, a direct call a dict: begin compile with "
            "opts = self.validate_options(options), which takes either."
        )
    return f"parameter shapes {None if shapes is None else given}"


def check_forward(ctx: Context) -> str:
    refs = []
    for k, inst in enumerate(ctx.instances):
        try:
            ref = ctx.solve(ctx.layer(), inst)
        except Exception as err:  # noqa: BLE001 - the report says what was raised
            raise Failed(f"instance {k} raised {type(err).__name__}: {err}") from err
        for j, o in enumerate(ref.outputs):
            if o.dtype != torch.float64 or o.device.type != "cpu":
                raise Failed(f"instance {k}: output {j} is {o.dtype} on {o.device}; expected float64 on the CPU, the "
                             "dtype and device of the parameters.")
            if not bool(torch.isfinite(o).all()):
                raise Failed(f"instance {k}: output {j} is not finite: {o}.")
        for i, g in enumerate(ref.grads):
            if not bool(torch.isfinite(g).all()):
                raise Failed(f"instance {k}: the gradient with respect to parameter {i} is not finite: {g}.")
        refs.append(ref)
    shapes = [[tuple(o.shape) for o in r.outputs] for r in refs]
    if any(s != shapes[0] for s in shapes):
        raise Failed(f"the instances' outputs differ in number or shape: {shapes}.")
    declared = [tuple(v) for v in (ctx.layer_.compiled.variable_shapes or [])]
    if declared and shapes[0][: len(declared)] != declared:
        raise Failed(f"outputs have shapes {shapes[0]}; Compiled.variable_shapes declares {declared}.")
    ctx.references = refs
    return f"{len(refs)} instances, output shapes {shapes[0]}"


# --- calls that must not depend on each other ---------------------------------------------------------------
def check_state(ctx: Context) -> str:
    refs = ctx.reference()
    n = len(refs)
    if all(all(torch.equal(a, b) for a, b in zip(r.outputs, refs[0].outputs, strict=True)) for r in refs):
        raise Skipped("every instance has the same answer; give instances whose answers differ")
    layer = ctx.layer()
    order = [*range(n), *reversed(range(n))]
    for step, k in enumerate(order):
        params = [p.clone() for p in ctx.instances[k]]
        after = f"after solving instance(s) {order[:step]}" if step else "first"
        try:
            got = ctx.solve(layer, params)
        except Exception as err:  # noqa: BLE001
            raise Failed(f"instance {k}, solved by a layer {after}, raised {type(err).__name__}: {err}; a fresh layer "
                         f"solves it. {STATE_HINT}") from err
        if any(not torch.equal(p, q) for p, q in zip(params, ctx.instances[k], strict=True)):
            raise Failed(f"solving instance {k} modified its parameter tensors in place; the black box must work on "
                         "its own copies.")
        try:
            compare(f"instance {k}, solved by a layer {after}, against a fresh layer", got.outputs,
                    refs[k].outputs, ctx.sample.rtol_repeat)
            compare(f"the gradient of instance {k}, solved by a layer {after}, against a fresh layer", got.grads,
                    refs[k].grads, _rtol_grad(ctx))
        except Failed as err:
            raise Failed(f"{err} {STATE_HINT}") from None
    return f"instances solved in the order {order} by one layer agree with fresh layers"


def _stack(instances: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
    return [torch.stack([inst[i] for inst in instances]) for i in range(len(instances[0]))]


def check_batch(ctx: Context) -> str:
    refs = ctx.reference()
    n = len(refs)
    leaves = [p.requires_grad_(True) for p in _stack(ctx.instances)]
    try:
        out = flatten(ctx.layer(**ctx.batched_dims)(*leaves))
    except Exception as err:  # noqa: BLE001
        raise Failed(f"a batch of the {n} instances raised {type(err).__name__}: {err}") from err
    for k in range(n):
        compare(f"row {k} of a batch of {n}, against instance {k} solved alone", [o[k] for o in out],
                refs[k].outputs, ctx.sample.rtol_repeat)
    g = grads(project(out, ctx.weights(refs[0].outputs)), leaves)
    for k in range(n):
        compare(f"row {k} of the batch's gradients, against instance {k}'s", [x[k] for x in g], refs[k].grads,
                _rtol_grad(ctx))
    return f"a batch of {n} matches the single calls (answers and gradients); {_broadcast(ctx)}"


def _broadcast(ctx: Context) -> str:
    """Parameter 0 batched, the others shared (instance 0's): rows as single calls, shared gradients summed."""
    first = ctx.instances[0]
    if len(first) < 2 or ctx.layer_.compiled.parameter_shapes is None:
        return "broadcasting not checked (one parameter, or no declared shapes)"
    mixed = [(inst[0], *first[1:]) for inst in ctx.instances]
    try:
        singles = [ctx.solve(ctx.layer(), m) for m in mixed]
    except Exception as err:  # noqa: BLE001 - such a mix may be a problem the solver cannot solve
        return f"broadcasting not checked: (instance k's parameter 0, instance 0's others) raised {err}"
    leaves = [torch.stack([m[0] for m in mixed]).requires_grad_(True),
              *[p.clone().requires_grad_(True) for p in first[1:]]]
    out = flatten(ctx.layer()(*leaves))
    for k, ref in enumerate(singles):
        compare(f"row {k} of a batch in parameter 0 only (the others shared)", [o[k] for o in out], ref.outputs,
                ctx.sample.rtol_repeat)
    g = grads(project(out, ctx.weights(singles[0].outputs)), leaves)
    compare("the batched parameter 0's gradient rows", list(g[0]), [s.grads[0] for s in singles], _rtol_grad(ctx))
    summed = [sum(s.grads[i] for s in singles) for i in range(1, len(first))]
    compare("the shared parameters' gradients (the sum over the batch)", g[1:], summed, _rtol_grad(ctx))
    return "shared parameters broadcast, their gradients summed"


# --- derivatives against finite differences of the black box ---------------------------------------------
def check_gradient(ctx: Context) -> str:
    layer = ctx.layer()
    report = check_gradients(lambda *p: tuple(flatten(layer(*p))), *ctx.instances[0], rtol=ctx.sample.rtol)
    if report.ok:
        return f"max relative error {report.max_rel_error:.2g} (rtol {ctx.sample.rtol:g})"
    if report.verdict == FAIL:
        raise Failed(
            f"the implicit gradient disagrees with finite differences of the black box for parameter(s) "
            f"{report.failed} at instance 0: the optimality condition does not describe what the solver computes "
            "(a wrong condition, or one that ignores or detaches a parameter), or the answer is not differentiable "
            f"there.\n{report}"
        )
    raise Failed(
        f"finite differences of the black box are too noisy to confirm the gradient at rtol={ctx.sample.rtol:g}: "
        f"tighten the solver's tolerance in Sample.options, or loosen Sample.rtol.\n{report}"
    )


def check_jvp(ctx: Context) -> str:
    """Forward mode (torch.autograd.forward_ad) along a random direction, against a directional central
    difference of the black box (Richardson-extrapolated) and against reverse mode."""
    refs = ctx.reference()
    params, rtol = ctx.instances[0], ctx.sample.rtol
    gen = torch.Generator().manual_seed(7)
    tangents = [torch.randn(p.shape, generator=gen, dtype=torch.float64) * entry_scale(p) for p in params]
    weights = ctx.weights(refs[0].outputs)
    layer = ctx.layer()
    try:
        with fwad.dual_level():
            out = flatten(layer(*[fwad.make_dual(p.clone(), t) for p, t in zip(params, tangents, strict=True)]))
            jv = [fwad.unpack_dual(o).tangent for o in out]
    except Exception as err:  # noqa: BLE001
        raise Failed(f"forward mode (torch.autograd.forward_ad) raised {type(err).__name__}: {err}") from err
    jv = [torch.zeros_like(o) if t is None else t for o, t in zip(out, jv, strict=True)]
    forward = float(project(jv, weights))
    reverse = float(sum((g * t).sum() for g, t in zip(refs[0].grads, tangents, strict=True)))

    def along(t: float) -> float:
        with torch.no_grad():
            return float(project(flatten(layer(*[p + t * v for p, v in zip(params, tangents, strict=True)])), weights))

    size = float(project([o.abs() for o in refs[0].outputs], [w.abs() for w in weights]))
    fd = central_difference(along, torch.finfo(torch.float64).eps * size, rtol)
    scale = max(abs(forward), abs(fd.estimate), 1e-8 * size, 1e-300)
    where = f"along a random direction at instance 0: forward mode gives {forward:.10g}"
    if not math.isfinite(fd.estimate) or abs(forward - fd.estimate) > rtol * scale + 3 * fd.uncertainty:
        raise Failed(f"the forward-mode derivative disagrees with finite differences of the black box {where}, finite "
                     f"differences {fd.estimate:.10g} (+- {fd.uncertainty:.2g}); reverse mode gives {reverse:.10g}.")
    if abs(forward - reverse) > 1e-6 * scale:
        raise Failed(f"forward and reverse mode disagree {where}, reverse mode <J^T w, v> = {reverse:.10g}.")
    if fd.uncertainty > rtol * scale:
        raise Failed(f"finite differences of the black box are too noisy to confirm forward mode at rtol={rtol:g} "
                     f"({where}, finite differences {fd.estimate:.10g} +- {fd.uncertainty:.2g}): tighten the "
                     "solver's tolerance in Sample.options, or loosen Sample.rtol.")
    return f"relative error {abs(forward - fd.estimate) / scale:.2g} against finite differences"


# --- failures, options ---------------------------------------------------------------------------------------
def check_failure(ctx: Context) -> str:
    bad = ctx.sample.failing_tensors()
    if bad is None:
        raise Skipped("the sample gives no failing instance (Sample(failing=...)), so failure isolation is not checked")
    refs = ctx.reference()
    b = ctx.backend
    try:
        ctx.layer()(*bad)
    except (SolverError, CertificationError) as err:
        if isinstance(err, SolverError) and err.backend != b.name:
            raise Failed(f"the failing instance's SolverError has backend={err.backend!r}; expected "
                         f"{b.name!r}.") from err
    except Exception as err:  # noqa: BLE001
        raise Failed(f"the failing instance raised {type(err).__name__} ({err}); expected a bbd.SolverError (the "
                     "black box should raise bbd.SolverError with the solver's message when it fails).") from err
    else:
        raise Failed("the failing instance did not fail: Sample.failing must be parameter values the solver cannot "
                     "solve (e.g. an infeasible problem).")
    trio = [ctx.instances[0], bad, ctx.instances[1]]
    try:
        ctx.layer(**ctx.batched_dims)(*_stack(trio))
    except (SolverError, CertificationError) as err:
        if err.batch_index != 1:
            raise Failed(f"in a batch whose instance 1 fails, the error has batch_index={err.batch_index}; expected "
                         f"1: {err}") from err
    else:
        raise Failed("a batch whose instance 1 cannot be solved did not raise with on_failure='raise'.")
    leaves = [p.requires_grad_(True) for p in _stack(trio)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # each failing instance is warned about; expected here
        out = flatten(ctx.layer(on_failure="nan", **ctx.batched_dims)(*leaves))
    for row, ref in ((0, refs[0]), (2, refs[1])):
        compare(f"with on_failure='nan', row {row} of a batch whose row 1 fails", [o[row] for o in out], ref.outputs,
                ctx.sample.rtol_repeat)
    if not all(bool(torch.isnan(o[1]).all()) for o in out):
        raise Failed(f"with on_failure='nan', the failing row 1 is not NaN: {[o[1] for o in out]}.")
    g = grads(project(out, ctx.weights(refs[0].outputs)), leaves)
    for row, ref in ((0, refs[0]), (2, refs[1])):
        compare(f"with on_failure='nan', the gradient of row {row}", [x[row] for x in g], ref.grads, _rtol_grad(ctx))
    if not all(bool((x[1] == 0).all()) for x in g):
        raise Failed(f"with on_failure='nan', the failing row's gradient is not zero: {[x[1] for x in g]}.")
    return "the failing instance raises with its batch index, or is NaN (gradient zero) while the others are exact"


def _typed(annotation: object) -> bool:
    """Whether a string is never a valid value: numbers, booleans, Literal choices, and unions of those."""
    if typing.get_origin(annotation) is typing.Literal:
        return INVALID not in typing.get_args(annotation)
    if annotation in (int, float, bool):
        return True
    members = [a for a in typing.get_args(annotation) if a is not type(None)]
    return bool(members) and all(_typed(a) for a in members)


def check_options(ctx: Context) -> str:
    b, s = ctx.backend, ctx.sample
    try:
        b.validate_options({UNKNOWN: 1})
    except InputError:
        pass
    else:
        raise Failed("the backend's Options model accepts unknown keys: derive it from bbd.plugin.BackendOptions (or "
                     "set model_config = ConfigDict(extra='forbid')).")
    try:
        ctx.layer(**{UNKNOWN: 1})
    except InputError as err:
        if UNKNOWN not in str(err):
            raise Failed(f"bbd.layer refused an unknown option without naming it: {err}") from err
    else:
        raise Failed(f"bbd.layer accepted the unknown option {UNKNOWN!r}.")
    own = {k: v for k, v in s.options.items() if k in b.Options.model_fields}
    try:
        b.compile(s.problem, s.parameters, s.variables, {**own, UNKNOWN: 1})
    except InputError:
        pass
    except Exception as err:  # noqa: BLE001
        raise Failed(f"compile, called directly with a dict holding the unknown option {UNKNOWN!r}, raised "
                     f"{type(err).__name__} instead of a bbd.InputError: validate with opts = "
                     "self.validate_options(options), which turns the model's error into an InputError naming the "
                     "option.") from err
    else:
        raise Failed(f"compile, called directly with a dict holding the unknown option {UNKNOWN!r}, did not refuse it: "
                     "begin compile with opts = self.validate_options(options), which validates a dict (and passes "
                     "the model bbd.layer gives through).")
    typed = [name for name, field in b.Options.model_fields.items() if _typed(field.annotation)]
    for name in typed:
        try:
            ctx.layer(**{name: INVALID})
        except InputError as err:
            if name not in str(err):
                raise Failed(f"a wrongly typed value of option {name!r} was refused without naming it: {err}") from err
        else:
            raise Failed(f"option {name!r} accepted the string {INVALID!r}; declare its type in Options.")
    return f"unknown options refused (bbd.layer, compile with a dict); wrong values refused for {typed}"


# --- dtype, device, threads ---------------------------------------------------------------------------------
def check_dtype(ctx: Context) -> str:
    refs = ctx.reference()
    leaves = [p.float().requires_grad_(True) for p in ctx.instances[0]]
    out = flatten(ctx.layer()(*leaves))
    for j, o in enumerate(out):
        if o.dtype != torch.float32:
            raise Failed(f"float32 parameters gave a {o.dtype} output {j}; expected float32, the parameters' dtype "
                         "(solve in float64 if needed, and return the parameters' dtype).")
    compare("float32 answers against float64 ones", out, refs[0].outputs, ctx.sample.float32_rtol)
    g = grads(project(out, ctx.weights(refs[0].outputs)), leaves)
    for i, x in enumerate(g):
        if x.dtype != torch.float32:
            raise Failed(f"float32 parameters gave a {x.dtype} gradient for parameter {i}; expected float32.")
    compare("float32 gradients against float64 ones", g, refs[0].grads, ctx.sample.float32_rtol)
    return "float32 in, float32 out (answers and gradients), float64 likewise"


def check_device(ctx: Context, devices: list[str]) -> str:
    if not devices:
        raise Skipped("no accelerator here (torch.cuda.is_available() is False); the check runs where one is")
    refs = ctx.reference()
    for device in devices:
        leaves = [p.to(device).requires_grad_(True) for p in ctx.instances[0]]
        out = flatten(ctx.layer()(*leaves))
        g = grads(project(out, ctx.weights(refs[0].outputs)), leaves)
        for what, tensors in (("output", out), ("gradient", g)):
            for j, t in enumerate(tensors):
                if t.device.type != torch.device(device).type:
                    raise Failed(f"parameters on {device} gave {what} {j} on {t.device}; expected {device}.")
        compare(f"answers on {device} against the CPU", out, refs[0].outputs, 1e-6)
        compare(f"gradients on {device} against the CPU", g, refs[0].grads, 1e-6)
    return f"answers and gradients on {devices} match the CPU"


def check_threads(ctx: Context, workers: int = 4, rounds: int = 2) -> str:
    refs = ctx.reference()
    n = len(refs)
    layer = ctx.layer()
    barrier = threading.Barrier(workers)
    results: dict[tuple[int, int], tuple[int, object]] = {}

    def work(t: int) -> None:
        barrier.wait(timeout=60)
        for r in range(rounds):
            k = (t + r) % n
            try:
                results[t, r] = (k, ctx.solve(layer, ctx.instances[k]))
            except Exception as err:  # noqa: BLE001 - reported below
                results[t, r] = (k, err)

    threads = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(workers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=600)
    if len(results) != workers * rounds:
        raise Failed(f"{workers} threads calling one layer did not finish within 10 minutes (a deadlock?).")
    for (t, _), (k, got) in sorted(results.items()):
        what = f"instance {k}, solved in thread {t} while {workers - 1} other threads used the same layer"
        if isinstance(got, Exception):
            raise Failed(f"{what}, raised {type(got).__name__}: {got}. {THREAD_HINT}")
        try:
            compare(what, got.outputs, refs[k].outputs, ctx.sample.rtol_repeat)
            compare(f"the gradient of {what}", got.grads, refs[k].grads, _rtol_grad(ctx))
        except Failed as err:
            raise Failed(f"{err} {THREAD_HINT}") from None
    pooled = ctx.layer(executor="threads", max_workers=workers, **ctx.batched_dims)
    out = flatten(pooled(*_stack(ctx.instances)))
    for k in range(n):
        try:
            compare(f"row {k} of a batch run with executor='threads'", [o[k] for o in out], refs[k].outputs,
                    ctx.sample.rtol_repeat)
        except Failed as err:
            raise Failed(f"{err} {THREAD_HINT}") from None
    return f"{workers} threads x {rounds} calls on one layer, and executor='threads', match serial calls"


#: name -> check, in the order they run.
RUNNERS: dict[str, Callable[..., str]] = {
    "compile": check_compile,
    "forward": check_forward,
    "state": check_state,
    "batch": check_batch,
    "gradients": check_gradient,
    "jvp": check_jvp,
    "failure": check_failure,
    "options": check_options,
    "dtype": check_dtype,
    "device": check_device,
    "threads": check_threads,
}
CHECKS: tuple[str, ...] = tuple(RUNNERS)
#: the checks that compare with the forward check's answers (skipped when it failed).
NEEDS_REFERENCE = frozenset({"state", "batch", "gradients", "jvp", "failure", "dtype", "device", "threads"})
