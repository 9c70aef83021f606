"""Imitation learning through a differentiable MPC (the Differentiable Implicit Layers poster, 4.2).

A cart-pole MPC is written with `casadi.Opti` (RK4 dynamics, |u| bounds, horizon T) and wrapped as a torch
layer with ``bbd.layer``: IPOPT solves it forward, the implicit function theorem on its KKT conditions
gives the gradient. An expert MPC with the true cost weights and pole length produces trajectories from
initial states x0 ~ N(0, 0.04 I) about the upright; a learner MPC starts from wrong weights and a wrong
pole length and fits them by gradient descent on the squared error to the observed states and controls.
Behavioural cloning (an MLP policy u = pi(x) fitted to the same state/control pairs) is the baseline.
Both, and the expert, are then run in closed loop on held-out initial states, drawn with the training
variance and with twice it, and scored with the true task cost (the poster's table).

Run:  blackbox-diff demo mpc_imitation [--full] [--out DIR]      (any install: --fast unless --full)
      python examples/mpc_imitation.py [--fast] [--out DIR]      (a checkout)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

import blackbox_diff as bbd

# Cart-pole (Barto et al.; theta = 0 upright), masses in kg, length = half pole length in m.
M_CART, M_POLE, GRAVITY = 1.0, 0.1, 9.81
TRUE_WEIGHTS = (1.0, 0.1, 5.0, 0.1)  # state weights (position, velocity, angle, angular velocity)
TRUE_LENGTH = 0.5
CONTROL_WEIGHT = 0.05  # fixed: cost weights are only defined up to scale
U_MAX = 10.0


@dataclass
class Config:
    horizon: int = 20
    dt: float = 0.05
    n_train: int = 16
    n_test: int = 10
    iterations: int = 40
    lr: float = 0.08
    rollout: int = 60
    bc_epochs: int = 600
    seed: int = 0


FAST = Config(horizon=12, n_train=8, n_test=3, iterations=12, rollout=25, bc_epochs=200)


def cartpole_rhs(s, u, length, ca=None):
    """Continuous dynamics ds/dt for state s = (x, dx, theta, dtheta) and force u (casadi or numpy)."""
    sin, cos = (ca.sin, ca.cos) if ca is not None else (np.sin, np.cos)
    th, dth = s[2], s[3]
    total = M_CART + M_POLE
    tmp = (u + M_POLE * length * dth**2 * sin(th)) / total
    ddth = (GRAVITY * sin(th) - cos(th) * tmp) / (length * (4.0 / 3.0 - M_POLE * cos(th) ** 2 / total))
    ddx = tmp - M_POLE * length * ddth * cos(th) / total
    if ca is not None:
        return ca.vertcat(s[1], ddx, dth, ddth)
    return np.array([s[1], ddx, dth, ddth])


def rk4(s, u, length, dt, ca=None):
    k1 = cartpole_rhs(s, u, length, ca)
    k2 = cartpole_rhs(s + dt / 2 * k1, u, length, ca)
    k3 = cartpole_rhs(s + dt / 2 * k2, u, length, ca)
    k4 = cartpole_rhs(s + dt * k3, u, length, ca)
    return s + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def build_mpc(horizon: int, dt: float):
    """The MPC as a casadi.Opti: parameters (x0, state weights, pole length), variables (X, U)."""
    import casadi as ca

    opti = ca.Opti()
    X = opti.variable(4, horizon + 1)
    U = opti.variable(1, horizon)
    x0 = opti.parameter(4)
    w = opti.parameter(4)
    length = opti.parameter()
    cost = 0
    for t in range(horizon):
        cost += ca.dot(w, X[:, t + 1] ** 2) + CONTROL_WEIGHT * U[0, t] ** 2
        opti.subject_to(X[:, t + 1] == rk4(X[:, t], U[0, t], length, dt, ca))
    opti.subject_to(X[:, 0] == x0)
    opti.subject_to(opti.bounded(-U_MAX, U, U_MAX))
    opti.minimize(cost)
    return opti, (x0, w, length), (X, U)


def mpc_layer(horizon: int, dt: float, **options):
    opti, params, variables = build_mpc(horizon, dt)
    return bbd.layer(opti, parameters=list(params), variables=list(variables), **options)


def task_cost(states: np.ndarray, controls: np.ndarray) -> float:
    """The true stage cost summed over a closed-loop rollout (what the table reports)."""
    w = np.asarray(TRUE_WEIGHTS)
    return float((states[1:] ** 2 @ w).sum() + CONTROL_WEIGHT * (controls**2).sum())


def rollout(policy, x0: np.ndarray, steps: int, dt: float) -> tuple[np.ndarray, np.ndarray]:
    s, xs, us = x0.copy(), [x0.copy()], []
    for _ in range(steps):
        u = float(np.clip(policy(s), -U_MAX, U_MAX))
        s = rk4(s, u, TRUE_LENGTH, dt)
        xs.append(s)
        us.append(u)
    return np.array(xs), np.array(us)


def mpc_policy(layer, weights: torch.Tensor, length: torch.Tensor):
    def act(s: np.ndarray) -> float:
        with torch.no_grad():
            _, U = layer(torch.as_tensor(s), weights, length)
        return float(U[0, 0])

    return act


def train_mpc(cfg: Config, layer, x0: torch.Tensor, X_exp: torch.Tensor, U_exp: torch.Tensor, progress):
    """Gradient descent on log-weights and log-length through the MPC layer."""
    log_w = torch.zeros(4, dtype=torch.float64, requires_grad=True)  # weights 1, 1, 1, 1
    log_l = torch.tensor(math.log(1.0), dtype=torch.float64, requires_grad=True)  # length 1.0 (true 0.5)
    opt = torch.optim.Adam([log_w, log_l], lr=cfg.lr)
    losses = []
    for _ in progress(range(cfg.iterations), desc="MPC-IFT"):
        X, U = layer(x0, log_w.exp(), log_l.exp())
        loss = ((X - X_exp) ** 2).mean() + ((U - U_exp) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return log_w.detach().exp(), log_l.detach().exp(), losses


def train_bc(cfg: Config, X_exp: torch.Tensor, U_exp: torch.Tensor):
    """Behavioural cloning: an MLP u = pi(x) on the expert's (state, control) pairs."""
    torch.manual_seed(cfg.seed)
    states = X_exp[:, :, :-1].transpose(1, 2).reshape(-1, 4).double()
    controls = U_exp.reshape(-1, 1).double()
    net = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                              torch.nn.Linear(64, 1)).double()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(cfg.bc_epochs):
        loss = ((net(states) - controls) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def act(s: np.ndarray) -> float:
        with torch.no_grad():
            return float(net(torch.as_tensor(s, dtype=torch.float64))[0])

    return act, float(loss.detach())


def evaluate(policies: dict, starts: dict, cfg: Config, progress) -> dict:
    table, trajectories = {}, {}
    for name, policy in policies.items():
        for split, x0s in starts.items():
            costs = []
            for i, x0 in enumerate(progress(x0s, desc=f"eval {name} {split}", leave=False)):
                xs, us = rollout(policy, x0, cfg.rollout, cfg.dt)
                costs.append(task_cost(xs, us))
                if i == 0 and split == "high":
                    trajectories[name] = xs
            table[(name, split)] = (float(np.mean(costs)), float(np.std(costs)))
    return {"table": table, "trajectories": trajectories}


def plot(trajectories: dict, dt: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, xs in trajectories.items():
        t = np.arange(len(xs)) * dt
        axes[0].plot(t, xs[:, 0], label=name)
        axes[1].plot(t, xs[:, 2], label=name)
    axes[0].set(xlabel="time [s]", ylabel="cart position [m]")
    axes[1].set(xlabel="time [s]", ylabel="pole angle [rad]")
    axes[1].legend()
    fig.suptitle("Closed loop from a held-out high-variance start: expert vs learned")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _progress(enabled: bool):
    if not enabled:
        return lambda it, **_: it
    from tqdm.auto import tqdm

    return lambda it, **kw: tqdm(it, **kw)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small setting for the test suite (< 60 s)")
    parser.add_argument("--out", default=None, help="directory for the PNG (default: ./outputs)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = dataclasses.replace(FAST if args.fast else Config(), seed=args.seed)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    progress = _progress(not args.quiet)
    rng = np.random.default_rng(cfg.seed)
    start = time.perf_counter()

    expert = mpc_layer(cfg.horizon, cfg.dt, warm_start=True)
    learner = mpc_layer(cfg.horizon, cfg.dt, warm_start=True)
    true_w = torch.tensor(TRUE_WEIGHTS, dtype=torch.float64)
    true_l = torch.tensor(TRUE_LENGTH, dtype=torch.float64)
    x0_train = torch.as_tensor(rng.normal(0.0, math.sqrt(0.04), (cfg.n_train, 4)))
    with torch.no_grad():
        X_exp, U_exp = expert(x0_train, true_w, true_l)

    w_hat, l_hat, losses = train_mpc(cfg, learner, x0_train, X_exp, U_exp, progress)
    bc, bc_loss = train_bc(cfg, X_exp, U_exp)
    starts = {"low": rng.normal(0.0, math.sqrt(0.04), (cfg.n_test, 4)),
              "high": rng.normal(0.0, math.sqrt(0.08), (cfg.n_test, 4))}
    policies = {"Expert": mpc_policy(expert, true_w, true_l), "Behavioral Cloning": bc,
                "MPC-IFT (ours)": mpc_policy(learner, w_hat, l_hat)}
    result = evaluate(policies, starts, cfg, progress)

    out_dir = args.out or os.path.join(os.getcwd(), "outputs")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError:
        out_dir = tempfile.mkdtemp(prefix="bbd_mpc_")
    png = os.path.join(out_dir, "mpc_imitation.png")
    plot(result["trajectories"], cfg.dt, png)

    table = result["table"]
    print(f"\nCart-pole MPC imitation (T={cfg.horizon}, {cfg.n_train} expert trajectories, "
          f"{cfg.n_test} held-out starts per column, closed loop {cfg.rollout} steps; true task cost)")
    print(f"{'Model':<22}{'Low variance N(0,0.04I)':>26}{'High variance N(0,0.08I)':>27}")
    for name in policies:
        lo, hi = table[(name, "low")], table[(name, "high")]
        print(f"{name:<22}{lo[0]:>17.2f} ± {lo[1]:<6.2f}{hi[0]:>18.2f} ± {hi[1]:<6.2f}")
    print(f"learned weights {np.round(w_hat.numpy(), 3).tolist()} (true {list(TRUE_WEIGHTS)}), pole length "
          f"{float(l_hat):.3f} (true {TRUE_LENGTH}); imitation loss {losses[0]:.4g} -> {losses[-1]:.4g}; "
          f"BC training MSE {bc_loss:.3g}")
    print(f"plot: {png}   ({time.perf_counter() - start:.1f} s)")
    return {"table": table, "losses": losses, "weights": w_hat.numpy(), "length": float(l_hat),
            "bc_loss": bc_loss, "png": png, "config": cfg}


if __name__ == "__main__":
    main(sys.argv[1:])
