"""OptNet-style learning with bbd.QPLayer: recover a hidden QP layer's cost and constraints from its answers.

A "teacher" QP maps an input y to z*(y) = argmin 1/2 z^T Q z + (W y)^T z  s.t.  G z <= h, with Q, W, G, h
hidden. A student QPLayer with its own Q = L L^T + eps I, W, G and h = G z0 + s0 (s0 >= 0: feasible by
construction, as OptNet parametrises it) is fitted to (y, z*) pairs by Adam on the squared error, exactly
as one trains an OptNet layer with qpth: only the import and the layer change (`qpth.qp.QPFunction()` ->
`bbd.QPLayer()`). The black box is DAQP, an active-set QP solver; gradients come from the implicit
function theorem on the active set, so they are exact even where constraints are barely active.

Printed: the training loss (initial -> final), the held-out error, the forward/backward time per step, and
the student's gradient at the final parameters against central finite differences of the layer's forward
pass (the black box itself).

Run:  python examples/optnet_qp.py [--fast] [--steps N] [--solver daqp]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "plugins")]

import blackbox_diff as bbd  # noqa: E402

NONE = torch.empty(0, dtype=torch.float64)


class OptNetLayer(torch.nn.Module):
    """y -> argmin 1/2 z^T Q z + (W y)^T z  s.t.  G z <= G z0 + s0, with every matrix learned."""

    def __init__(self, n_in: int, n: int, m: int, solver: str, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.L = torch.nn.Parameter(torch.eye(n, dtype=torch.float64))
        self.W = torch.nn.Parameter(0.3 * torch.randn(n, n_in, generator=g, dtype=torch.float64))
        self.G = torch.nn.Parameter(torch.randn(m, n, generator=g, dtype=torch.float64))
        self.z0 = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))
        self.s0 = torch.nn.Parameter(torch.ones(m, dtype=torch.float64))
        self.qp = bbd.QPLayer(solver)

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.L.shape[0]
        Q = self.L @ self.L.T + 1e-3 * torch.eye(n, dtype=torch.float64)
        h = self.G @ self.z0 + torch.nn.functional.softplus(self.s0)
        return Q, self.G, h

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        Q, G, h = self.matrices()
        return self.qp(Q, y @ self.W.T, G, h, NONE, NONE)


def teacher(n_in: int, n: int, m: int, seed: int):
    """The hidden QP layer (its parameters drawn once) and its answers as the targets."""
    g = torch.Generator().manual_seed(seed + 100)
    M = torch.randn(n, n, generator=g, dtype=torch.float64)
    Q = M @ M.T / n + 0.5 * torch.eye(n, dtype=torch.float64)
    W = torch.randn(n, n_in, generator=g, dtype=torch.float64)
    G = torch.randn(m, n, generator=g, dtype=torch.float64)
    h = 0.5 * torch.rand(m, generator=g, dtype=torch.float64)  # z = 0 strictly feasible
    qp = bbd.QPLayer()

    def answer(y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return qp(Q, y @ W.T, G, h, NONE, NONE)

    return answer


def gradient_check(model: OptNetLayer, y: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> float:
    """Relative error of the directional derivative of the loss vs central differences of the forward."""
    g = torch.Generator().manual_seed(7)
    params = list(model.parameters())
    directions = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    model.zero_grad()
    ((model(y) - target) ** 2).mean().backward()
    implicit = sum(float((p.grad * d).sum()) for p, d in zip(params, directions, strict=True))

    def loss_at(sign: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, directions, strict=True):
                p.add_(sign * eps * d)
            value = float(((model(y) - target) ** 2).mean())
            for p, d in zip(params, directions, strict=True):
                p.sub_(sign * eps * d)
        return value

    fd = (loss_at(1.0) - loss_at(-1.0)) / (2 * eps)
    return abs(implicit - fd) / max(abs(fd), 1e-12)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a small QP and few steps (the test suite's setting)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--solver", default="daqp")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: these ops are tiny, and extra threads only wait)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n_in, n, m, batch = (3, 4, 6, 32) if args.fast else (5, 10, 15, 64)
    steps = args.steps or (60 if args.fast else 400)
    torch.manual_seed(args.seed)
    answer = teacher(n_in, n, m, args.seed)
    y_train, y_test = torch.randn(512, n_in, dtype=torch.float64), torch.randn(256, n_in, dtype=torch.float64)
    z_train, z_test = answer(y_train), answer(y_test)

    model = OptNetLayer(n_in, n, m, args.solver, args.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    with torch.no_grad():
        initial = float(((model(y_train) - z_train) ** 2).mean())
    forward_s = backward_s = 0.0
    for step in range(steps):
        idx = torch.randint(0, y_train.shape[0], (batch,))
        t = time.perf_counter()
        loss = ((model(y_train[idx]) - z_train[idx]) ** 2).mean()
        forward_s += time.perf_counter() - t
        optimizer.zero_grad()
        t = time.perf_counter()
        loss.backward()
        backward_s += time.perf_counter() - t
        optimizer.step()
        if step % max(steps // 5, 1) == 0:
            print(f"step {step:4d}  batch loss {loss.item():.3e}")
    with torch.no_grad():
        final = float(((model(y_train) - z_train) ** 2).mean())
        test = float(((model(y_test) - z_test) ** 2).mean())
    error = gradient_check(model, y_test[:8], z_test[:8])
    print(f"train loss {initial:.3e} -> {final:.3e}; held-out loss {test:.3e}")
    print(f"per step ({batch} QPs of n = {n}, {m} inequalities): forward {1e3 * forward_s / steps:.1f} ms, "
          f"backward {1e3 * backward_s / steps:.1f} ms")
    print(f"gradient vs central differences of the black box: relative error {error:.1e}")
    return {"initial": initial, "final": final, "test": test, "grad_error": error}


if __name__ == "__main__":
    main()
