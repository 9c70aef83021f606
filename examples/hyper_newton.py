"""Hyperparameter learning with second-order information: Newton's method on regularisation strengths.

The training problem is a black box: w*(eta) = argmin_w f(w, eta), solved by scipy (a LAPACK least-squares
solve for ridge regression, L-BFGS-B polished by Newton for logistic regression), with one regularisation
strength per group of features, lambda_g = exp(eta_g). The validation loss V(eta) = loss_val(w*(eta)) is
minimised over eta by Newton's method: the hypergradient and the hyper-Hessian come from
`bbd.implicit(bbd.Argmin(f))`, i.e. from the implicit function theorem at w*, including its second
derivatives (the adjoint solve is itself an implicit function, so differentiating the backward is exact).

Printed, for each task:

* the hypergradient against central differences of V (the black box itself) and, for ridge regression,
  against the closed form w* = (X^T X / n + diag(lambda))^{-1} X^T y / n differentiated by torch;
* the hyper-Hessian, reverse-over-reverse (`torch.autograd.functional.hessian`) and forward-over-reverse
  (`torch.func.jacfwd(torch.func.grad(V))`), against central differences of the hypergradient and the
  closed form;
* one Newton step: the decrease its quadratic model predicts against the decrease measured by re-solving,
  beside the best gradient step (exact line search along -grad V on the re-solved loss);
* Newton's iterations against gradient descent with exact line search: Newton converges quadratically
  (|grad V| squares each step), which it cannot do with a Hessian that is wrong.

Run:  python examples/hyper_newton.py [--fast]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable

import numpy as np
import scipy.linalg
import scipy.optimize
import torch

import blackbox_diff as bbd

F64 = torch.float64
MAX_STEP = 5.0  # the longest gradient step searched, in log(lambda): a factor e^5 on a regularisation strength


@dataclasses.dataclass
class Task:
    """A validation loss of regularisation hyperparameters, through a black-box training solver."""

    name: str
    eta0: torch.Tensor  # starting hyperparameters (log regularisation strengths)
    fit: Callable[[torch.Tensor], torch.Tensor]  # eta -> w*(eta), differentiable (bbd.implicit)
    black_box: Callable[[np.ndarray], np.ndarray]  # the raw solver: eta -> w*
    val_of_w: Callable[[torch.Tensor], torch.Tensor]  # the validation loss of weights
    closed_form: Callable[[torch.Tensor], torch.Tensor] | None = None  # V(eta) in torch, where one exists

    def V(self, eta: torch.Tensor) -> torch.Tensor:
        """The validation loss through the implicit layer (differentiable to any order)."""
        return self.val_of_w(self.fit(eta))

    def V_black_box(self, eta: torch.Tensor) -> float:
        """The validation loss from the raw solver, for finite differences: no autograd anywhere."""
        return float(self.val_of_w(torch.as_tensor(self.black_box(eta.detach().numpy()), dtype=F64)))


def _data(seed: int, n: int, n_val: int, d: int, groups: int, scales: list[float]):
    rng = np.random.default_rng(seed)
    group_of = np.repeat(np.arange(groups), d // groups)
    w_true = rng.standard_normal(d) * np.asarray(scales)[group_of]
    X = rng.standard_normal((n + n_val, d))
    return rng, group_of, w_true, X


def ridge_task(seed: int = 4) -> Task:
    """Ridge regression, three groups of ten features with true weights of scale 1, 0.3 and 0.1.

    Black box: the least-squares problem [X / sqrt(n); diag(sqrt(lambda))] w = [y / sqrt(n); 0], solved by
    LAPACK (scipy.linalg.lstsq). Its optimality condition is the gradient of the ridge objective.
    """
    n, n_val, d, groups = 60, 2000, 30, 3
    rng, group_of, w_true, X = _data(seed, n, n_val, d, groups, [1.0, 0.3, 0.1])
    y = X @ w_true + rng.standard_normal(n + n_val)
    Xt, yt = X[:n], y[:n]
    Xt_t, yt_t, Xv_t, yv_t = (torch.tensor(a, dtype=F64) for a in (X[:n], y[:n], X[n:], y[n:]))
    G = torch.tensor(np.eye(groups)[group_of], dtype=F64)  # feature -> group

    def objective(w, eta):
        return 0.5 * ((Xt_t @ w - yt_t) ** 2).mean() + 0.5 * ((G @ torch.exp(eta)) * w**2).sum()

    def black_box(eta):
        lam = np.exp(eta)[group_of]
        A = np.vstack([Xt / np.sqrt(n), np.diag(np.sqrt(lam))])
        return scipy.linalg.lstsq(A, np.concatenate([yt / np.sqrt(n), np.zeros(d)]))[0]

    def val_of_w(w):
        return 0.5 * ((Xv_t @ w - yv_t) ** 2).mean()

    def closed_form(eta):
        w = torch.linalg.solve(Xt_t.T @ Xt_t / n + torch.diag(G @ torch.exp(eta)), Xt_t.T @ yt_t / n)
        return val_of_w(w)

    fit = bbd.implicit(bbd.Argmin(objective))(black_box)
    return Task("ridge regression (3 groups, lstsq)", torch.zeros(groups, dtype=F64), fit, black_box, val_of_w,
                closed_form)


def logistic_task(seed: int = 1) -> Task:
    """L2-regularised logistic regression, two groups of ten features (true weights of scale 2 and 0.5).

    Black box: scipy L-BFGS-B on the regularised log-loss, polished by two Newton steps in numpy (so that
    finite differences of it are accurate). Labels are +-1; the validation loss is the mean log-loss.
    """
    n, n_val, d, groups = 200, 2000, 20, 2
    rng, group_of, w_true, X = _data(seed, n, n_val, d, groups, [2.0, 0.5])
    y = np.where(rng.random(n + n_val) < 1.0 / (1.0 + np.exp(-X @ w_true)), 1.0, -1.0)
    Xt, yt = X[:n], y[:n]
    Xt_t, yt_t, Xv_t, yv_t = (torch.tensor(a, dtype=F64) for a in (X[:n], y[:n], X[n:], y[n:]))
    G = torch.tensor(np.eye(groups)[group_of], dtype=F64)

    def objective(w, eta):
        data = torch.nn.functional.softplus(-yt_t * (Xt_t @ w)).mean()
        return data + 0.5 * ((G @ torch.exp(eta)) * w**2).sum()

    def black_box(eta):
        lam = np.exp(eta)[group_of]

        def value_and_grad(w):
            margin = -yt * (Xt @ w)
            s = scipy.special.expit(margin)
            return np.logaddexp(0.0, margin).mean() + 0.5 * (lam * w * w).sum(), Xt.T @ (-yt * s) / n + lam * w

        w = scipy.optimize.minimize(value_and_grad, np.zeros(d), jac=True, method="L-BFGS-B",
                                    options={"gtol": 1e-12, "ftol": 0.0, "maxiter": 5000}).x
        for _ in range(2):
            s = scipy.special.expit(-yt * (Xt @ w))
            hess = (Xt.T * (s * (1.0 - s))) @ Xt / n + np.diag(lam)
            w = w - np.linalg.solve(hess, value_and_grad(w)[1])
        return w

    def val_of_w(w):
        return torch.nn.functional.softplus(-yv_t * (Xv_t @ w)).mean()

    fit = bbd.implicit(bbd.Argmin(objective))(black_box)
    return Task("logistic regression (2 groups, L-BFGS-B)", torch.full((groups,), -2.0, dtype=F64), fit,
                black_box, val_of_w)


# --- derivatives and their checks ------------------------------------------------------------------------
def hypergradient(task: Task, eta: torch.Tensor) -> torch.Tensor:
    return torch.func.grad(task.V)(eta)


def central_differences(fn: Callable[[torch.Tensor], torch.Tensor | float], eta: torch.Tensor,
                        eps: float) -> torch.Tensor:
    """d fn / d eta by central differences, one column per coordinate of eta (fn scalar or vector)."""
    cols = []
    for i in range(eta.numel()):
        e = torch.zeros_like(eta)
        e[i] = eps
        cols.append((torch.as_tensor(fn(eta + e), dtype=F64) - torch.as_tensor(fn(eta - e), dtype=F64)) / (2 * eps))
    return torch.stack(cols, dim=-1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def check_derivatives(task: Task, eta: torch.Tensor) -> dict:
    """Hypergradient and hyper-Hessian at eta, each computed two ways and checked (see module docstring)."""
    g = hypergradient(task, eta)
    H_rr = torch.autograd.functional.hessian(task.V, eta)
    H_fr = torch.func.jacfwd(torch.func.grad(task.V))(eta)
    g_fd = central_differences(task.V_black_box, eta, 1e-5)
    H_fd = central_differences(lambda e: hypergradient(task, e), eta, 1e-5)
    out = {"grad": g, "hessian": H_rr, "grad_vs_fd": _rel(g, g_fd), "hessian_vs_fd": _rel(H_rr, H_fd),
           "forward_over_reverse_vs_reverse": _rel(H_fr, H_rr), "asymmetry": _rel(H_rr, H_rr.T)}
    if task.closed_form is not None:
        out["grad_vs_closed_form"] = _rel(g, torch.func.grad(task.closed_form)(eta))
        out["hessian_vs_closed_form"] = _rel(H_rr, torch.func.hessian(task.closed_form)(eta))
    return out


# --- Newton against gradient steps ------------------------------------------------------------------------
def _best_gradient_step(task: Task, eta: torch.Tensor, g: torch.Tensor) -> tuple[float, float]:
    """The step length along -g that minimises the re-solved validation loss (bounded scalar search: steps
    up to MAX_STEP long)."""
    alpha_max = MAX_STEP / max(float(g.norm()), 1e-300)
    res = scipy.optimize.minimize_scalar(lambda a: task.V_black_box(eta - a * g), bounds=(0.0, alpha_max),
                                         method="bounded", options={"xatol": 1e-6 * alpha_max})
    return float(res.x), float(res.fun)


def newton_step(task: Task, eta: torch.Tensor, check: dict) -> dict:
    """One Newton step against the best gradient step from the same point, both measured by re-solving."""
    g, H = check["grad"], check["hessian"]
    step = -torch.linalg.solve(H, g)
    V0 = task.V_black_box(eta)
    predicted = float(g @ step + 0.5 * step @ H @ step)
    actual = task.V_black_box(eta + step) - V0
    alpha, V_grad = _best_gradient_step(task, eta, g)
    return {"V0": V0, "newton_predicted": predicted, "newton_actual": actual, "gradient_best": V_grad - V0,
            "gradient_alpha": alpha, "newton_step": step}


def iterate(task: Task, eta: torch.Tensor, steps: int) -> dict:
    """Newton's method and gradient descent with exact line search, `steps` iterations each."""
    newton, gd, model = [], [], []
    e = eta.clone()
    for _ in range(steps):
        g = hypergradient(task, e)
        V = task.V_black_box(e)
        newton.append((V, float(g.norm())))
        H = torch.autograd.functional.hessian(task.V, e)
        step = -torch.linalg.solve(H, g)
        e = e + step
        # the change the quadratic model predicts against the change measured by re-solving
        model.append((float(g @ step + 0.5 * step @ H @ step), task.V_black_box(e) - V))
    newton.append((task.V_black_box(e), float(hypergradient(task, e).norm())))
    e_gd = eta.clone()
    for _ in range(steps):
        g = hypergradient(task, e_gd)
        gd.append((task.V_black_box(e_gd), float(g.norm())))
        alpha, _ = _best_gradient_step(task, e_gd, g)
        e_gd = e_gd - alpha * g
    gd.append((task.V_black_box(e_gd), float(hypergradient(task, e_gd).norm())))
    return {"newton": newton, "gradient": gd, "model": model, "eta_newton": e, "eta_gradient": e_gd}


def _print_task(task: Task, check: dict, step: dict, runs: dict) -> None:
    print(f"\n== {task.name}: eta = log(lambda) per group, from eta0 = {task.eta0.tolist()} ==")
    fmt = lambda t: "[" + ", ".join(f"{v: .6e}" for v in t.reshape(-1).tolist()) + "]"  # noqa: E731
    print(f"hypergradient dV/deta          {fmt(check['grad'])}")
    print("hyper-Hessian d2V/deta2 (reverse-over-reverse):")
    for row in check["hessian"]:
        print(f"    {fmt(row)}")
    print(f"hypergradient vs central differences of the black box   rel. error {check['grad_vs_fd']:.1e}")
    print(f"Hessian vs central differences of the hypergradient     rel. error {check['hessian_vs_fd']:.1e}")
    print(f"Hessian forward-over-reverse vs reverse-over-reverse    rel. diff. "
          f"{check['forward_over_reverse_vs_reverse']:.1e}; asymmetry {check['asymmetry']:.1e}")
    if "grad_vs_closed_form" in check:
        print(f"closed form (torch.linalg.solve, differentiated):       hypergradient "
              f"{check['grad_vs_closed_form']:.1e}, Hessian {check['hessian_vs_closed_form']:.1e}")
    print(f"one Newton step from V = {step['V0']:.6f}: predicted change {step['newton_predicted']:+.6f}, "
          f"re-solved {step['newton_actual']:+.6f}; best gradient step (alpha = {step['gradient_alpha']:.3g}, "
          f"exact line search) {step['gradient_best']:+.6f}")
    print(f"{'iter':>4} | {'Newton V':>12} {'|grad V|':>9} {'next change: model':>18} {'re-solved':>10} | "
          f"{'gradient descent V':>18} {'|grad V|':>9}")
    model = [*runs["model"], (float("nan"), float("nan"))]
    for k, ((vn, gn), (pred, act), (vg, gg)) in enumerate(zip(runs["newton"], model, runs["gradient"], strict=True)):
        print(f"{k:>4} | {vn:12.8f} {gn:9.1e} {pred:18.3e} {act:10.3e} | {vg:18.8f} {gg:9.1e}")
    print(f"eta after Newton: {fmt(runs['eta_newton'])};  lambda = {fmt(torch.exp(runs['eta_newton']))}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="fewer iterations on the logistic task")
    args = parser.parse_args(argv)
    results = {}
    for task, steps in ((ridge_task(), 6), (logistic_task(), 4 if args.fast else 6)):
        t0 = time.perf_counter()
        check = check_derivatives(task, task.eta0)
        step = newton_step(task, task.eta0, check)
        runs = iterate(task, task.eta0, steps)
        _print_task(task, check, step, runs)
        print(f"({time.perf_counter() - t0:.1f} s)")
        results[task.name.split(" (")[0]] = {**check, **step, **runs}
    return results


if __name__ == "__main__":
    main()
