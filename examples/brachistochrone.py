"""The brachistochrone (Vie slides): fit R so that the cycloid y(1 + y'^2) = 2R passes through a target point.

A marble slides without friction from the origin (y measured downward). The Euler-Lagrange equation of the
travel time gives y (1 + y'^2) = 2R; the slides ask for the R whose curve passes through P = (P_x, P_y),
found by gradient descent on |y_R(P_x) - P_y|^2. Here y_R(P_x) comes from two black boxes that autograd
cannot see into, each differentiated by the implicit function theorem:

* ``ode``: scipy's ``solve_ivp`` integrates the curve as x(y), dx/dy = sqrt(y / (2R - y)) (regular at the
  origin, unlike y'), and stops at the event x = P_x. The condition it satisfies is X(y, R) = P_x with
  X(y, R) = int_0^y sqrt(s / (2R - s)) ds, written in torch by Gauss-Legendre quadrature (after a change
  of variables that removes the integrand's singularity at the lowest point).
* ``cycloid``: brentq finds the rolling angle t with R (t - sin t) = P_x; then y = R (1 - cos t).

Both are checked against central finite differences of the black box itself and the fitted R against the
closed form (the point on the cycloid: P_y / P_x = (1 - cos t) / (t - sin t)).
"""

from __future__ import annotations

import argparse
import math
import os

import numpy as np
import scipy.integrate
import scipy.optimize
import torch

import blackbox_diff as bbd

LR = 0.3  # about 1 / (d^2 loss / dR^2): the loss is close to quadratic near the answer
TARGET = (1.0, 0.8)  # before the cycloid's lowest point: P_y / P_x > 2 / pi
_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(48)


# --- black box 1: integrate the ODE with scipy, stop at x = P_x ------------------------------------------
def arc_length_x(y: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """X(y, R) = int_0^y sqrt(s / (2R - s)) ds by Gauss-Legendre quadrature.

    The integrand is singular at s = 2R (the lowest point); with s = 2R sin^2(phi) it becomes the smooth
    4R sin^2(phi) on [0, asin(sqrt(y / 2R))], which 48 nodes integrate to round-off.
    """
    top = torch.asin(torch.sqrt(y / (2 * R)))
    phi = top * (torch.as_tensor(_NODES, dtype=y.dtype) + 1) / 2
    w = top * torch.as_tensor(_WEIGHTS, dtype=y.dtype) / 2
    return (w * 4 * R * torch.sin(phi) ** 2).sum()


def y_at_ode(R: np.ndarray, px: np.ndarray) -> np.ndarray:
    R, px = float(R), float(px)

    def hit(y, x):
        return x[0] - px

    hit.terminal, hit.direction = True, 1
    sol = scipy.integrate.solve_ivp(lambda y, x: [math.sqrt(y / (2 * R - y))], (0.0, 2 * R * (1 - 1e-12)), [0.0],
                                    events=hit, rtol=1e-12, atol=1e-14, method="DOP853")
    if sol.status != 1:
        raise bbd.SolverError(f"the curve for R={R:.4g} reaches its lowest point before x={px:g}: "
                              f"no y(P_x) on this arch (need R > P_x / pi = {px / math.pi:.4g})")
    return np.array(sol.t_events[0][0])


ode_layer = bbd.implicit(bbd.Root(lambda y, R, px: arc_length_x(y, R) - px), residual_tol=1e-9)(y_at_ode)


# --- black box 2: the cycloid's rolling angle by brentq --------------------------------------------------
def angle(R: np.ndarray, px: np.ndarray) -> np.ndarray:
    R, px = float(R), float(px)
    if px >= 2 * math.pi * R:
        raise bbd.SolverError(f"x={px:g} is beyond the first arch of the cycloid with R={R:.4g}")
    return np.array(scipy.optimize.brentq(lambda t: R * (t - math.sin(t)) - px, 0.0, 2 * math.pi, xtol=1e-15))


angle_layer = bbd.implicit(bbd.Root(lambda t, R, px: R * (t - torch.sin(t)) - px))(angle)


def y_at_cycloid(R: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
    t = angle_layer(R, px)
    return R * (1 - torch.cos(t))


BLACK_BOXES = {"ode": lambda R, px: ode_layer(R, px), "cycloid": y_at_cycloid}


# --- the fit --------------------------------------------------------------------------------------------
def closed_form_R(px: float, py: float) -> float:
    # (1 - cos t) / (t - sin t) falls from +inf (t -> 0) to 0 (t = 2 pi): one root
    t = scipy.optimize.brentq(lambda t: (1 - math.cos(t)) / (t - math.sin(t)) - py / px, 1e-3, 2 * math.pi,
                              xtol=1e-15)
    return px / (t - math.sin(t))


def loss_and_grad(black_box, R: float, target=TARGET) -> tuple[float, float]:
    Rt = torch.tensor(R, dtype=torch.float64, requires_grad=True)
    px, py = (torch.tensor(v, dtype=torch.float64) for v in target)
    loss = (black_box(Rt, px) - py) ** 2
    loss.backward()
    return loss.item(), Rt.grad.item()


def loss_value(black_box, R: float, target=TARGET) -> float:
    px, py = (torch.tensor(v, dtype=torch.float64) for v in target)
    with torch.no_grad():
        return ((black_box(torch.tensor(R, dtype=torch.float64), px) - py) ** 2).item()


def finite_difference(black_box, R: float, h: float = 1e-6, target=TARGET) -> float:
    """Central difference of the loss: two more runs of the black box itself."""
    return (loss_value(black_box, R + h, target) - loss_value(black_box, R - h, target)) / (2 * h)


def fit(black_box, R0: float, steps: int, lr: float, target=TARGET) -> list[tuple[int, float, float, float]]:
    """Gradient descent on R; returns (step, R, loss, dloss/dR) per step."""
    R, history = R0, []
    for k in range(steps):
        loss, g = loss_and_grad(black_box, R, target)
        history.append((k, R, loss, g))
        R -= lr * g
    return history


def plot(R: float, target, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.linspace(0, 2 * math.pi, 400)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(R * (t - np.sin(t)), R * (1 - np.cos(t)), label=f"fitted cycloid, R = {R:.5f}")
    ax.plot([0, target[0]], [0, target[1]], "--", color="grey", label="straight line")
    ax.plot(*target, "o", color="C3", label=f"target P = {target}")
    ax.invert_yaxis()
    ax.set_aspect("equal")
    ax.set_xlabel("x")
    ax.set_ylabel("y (down)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a few steps only")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", default=os.path.join("outputs", "brachistochrone.png"))
    args = parser.parse_args(argv)
    steps = args.steps or (12 if args.fast else 40)
    R_true = closed_form_R(*TARGET)
    print(f"target P = {TARGET}; closed-form R = {R_true:.12f}")
    result = {"R_true": R_true}
    for name, box in BLACK_BOXES.items():
        history = fit(box, R0=0.5, steps=steps, lr=LR)
        print(f"\nblack box: {name}")
        print(f"{'step':>5} {'R':>14} {'loss':>11} {'dloss/dR (IFT)':>15} {'central FD':>13}")
        for k, R, loss, g in history:
            if k % max(1, steps // 6) == 0 or k == steps - 1:
                fd = finite_difference(box, R)
                print(f"{k:>5} {R:>14.10f} {loss:>11.3e} {g:>15.8e} {fd:>13.8e}")
        R_fit = history[-1][1] - LR * history[-1][3]
        _, g = loss_and_grad(box, 0.6)
        fd = finite_difference(box, 0.6)
        result[name] = {"R": R_fit, "grad_at_0.6": g, "fd_at_0.6": fd, "loss": history[-1][2]}
        print(f"fitted R = {R_fit:.10f} (closed form {R_true:.10f}, |diff| {abs(R_fit - R_true):.1e}); "
              f"at R = 0.6: IFT {g:.10e}, FD {fd:.10e}, rel diff {abs(g - fd) / abs(fd):.1e}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    plot(result["ode"]["R"], TARGET, args.out)
    print(f"\nplot: {os.path.abspath(args.out)}")
    result["plot"] = os.path.abspath(args.out)
    return result


if __name__ == "__main__":
    main()
