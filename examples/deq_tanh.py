"""Deep equilibrium layers: the tutorial's z = tanh(W z + x) and a small DEQ classifier.

Part 1 reproduces the NeurIPS 2020 implicit-layers tutorial's tanh fixed-point layer: the fixed point
is found by plain iteration and by Anderson acceleration (``bbd.deq``), the gradient comes from the IFT
(`bbd.FixedPoint` through `bbd.implicit`, Neumann or GMRES adjoint), and is checked against the dense
IFT formula; forward and backward times and the memory kept for the backward are compared with
unrolling the iteration through autograd.

Part 2 trains a DEQ classifier (input projection, one tanh equilibrium layer, linear read-out) on three
interleaved 2-D spirals generated in code, and reports train/test accuracy and the solver statistics.

Run:  python examples/deq_tanh.py [--fast]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from blackbox_diff import saved_tensor_bytes
from blackbox_diff.deq import DEQ, anderson, fixed_point_iteration


class TanhLayer(torch.nn.Module):
    """f(z, x) = tanh(W z + x), W scaled so the map contracts (||W|| about `scale`)."""

    def __init__(self, d: int, scale: float = 0.5) -> None:
        super().__init__()
        self.W = torch.nn.Linear(d, d, bias=False)
        torch.nn.init.normal_(self.W.weight, 0.0, scale / math.sqrt(d))

    def forward(self, z, x):  # noqa: D102
        return torch.tanh(self.W(z) + x)


def part1(d: int, batch: int) -> None:
    torch.manual_seed(0)
    f = TanhLayer(d, 0.5).double()
    x = torch.randn(batch, d, dtype=torch.float64)
    T = lambda z: f(z, x)  # noqa: E731
    for name, solver in [("plain iteration", fixed_point_iteration), ("anderson", anderson)]:
        r = solver(T, torch.zeros_like(x), tol=1e-10)
        print(f"  {name:16s} T-evaluations {r.iterations:4d}   max|T(z)-z| {r.residual.max().item():.1e}")

    layer = DEQ(f, tol=1e-10, solver="iteration")
    xs = x.clone().requires_grad_(True)
    z = layer(xs)
    (gx,) = torch.autograd.grad(z.sum(), xs)
    # Dense IFT for the first instance: dL/dx = ((I - J)^-T 1) * D, J = D W, D = 1 - z*^2.
    D = 1 - z[0].detach() ** 2
    u = torch.linalg.solve((torch.eye(d, dtype=x.dtype) - D[:, None] * f.W.weight).T, torch.ones(d, dtype=x.dtype))
    err = (gx[0] - u * D).abs().max().item() / (u * D).abs().max().item()
    print(f"  IFT gradient vs dense IFT: max rel err {err:.1e} (adjoint: {layer.last_linear_solver})")

    def timed(fn, repeat=3):
        best_f = best_b = float("inf")
        for _ in range(repeat):
            xs = x.clone().requires_grad_(True)
            t0 = time.perf_counter()
            out = fn(xs)
            t1 = time.perf_counter()
            out.sum().backward()
            best_f, best_b = min(best_f, t1 - t0), min(best_b, time.perf_counter() - t1)
        return best_f, best_b

    def unrolled(xs, k):
        z = torch.zeros_like(xs)
        for _ in range(k):
            z = f(z, xs)
        return z

    k = layer.last.iterations
    print(f"  {'':24s} {'fwd ms':>8s} {'bwd ms':>8s} {'bwd/fwd':>8s} {'saved MB':>9s}")
    for name, fn in [("DEQ (iteration + IFT)", layer),
                     (f"unrolled {k} iterations", lambda xs: unrolled(xs, k)),
                     (f"unrolled {2 * k} iterations", lambda xs: unrolled(xs, 2 * k))]:
        fwd, bwd = timed(fn)
        mb = saved_tensor_bytes(lambda fn=fn: fn(x.clone().requires_grad_(True))) / 2**20
        print(f"  {name:24s} {1e3 * fwd:8.1f} {1e3 * bwd:8.1f} {bwd / fwd:8.2f} {mb:9.2f}")


def spirals(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three interleaved noisy spirals in the plane; labels 0, 1, 2."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, 3, (n,), generator=g)
    r = torch.rand(n, generator=g)
    angle = 4.0 * r + 2 * math.pi * k / 3 + 0.15 * torch.randn(n, generator=g)
    X = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], dim=1)
    return X, k


class ContractiveTanh(torch.nn.Module):
    """f(z, x) = tanh(W z + x) with W = 0.9 V / max(1, ||V||_F): ||W||_2 <= 0.9, so f stays a contraction
    (tanh' <= 1) however training moves V, and the fixed point exists, is unique and is found."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.V = torch.nn.Parameter(0.5 * torch.randn(d, d) / math.sqrt(d))

    def forward(self, z, x):  # noqa: D102
        W = 0.9 * self.V / torch.clamp(self.V.norm(), min=1.0)
        return torch.tanh(z @ W.T + x)


class DEQClassifier(torch.nn.Module):
    """Input projection, one tanh equilibrium layer, linear read-out."""

    def __init__(self, hidden: int = 48) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(2, hidden)
        self.deq = DEQ(ContractiveTanh(hidden), tol=1e-6, max_iter=200)
        self.out = torch.nn.Linear(hidden, 3)

    def forward(self, x):  # noqa: D102
        return self.out(self.deq(self.inp(x)))


def part2(epochs: int, n: int) -> float:
    torch.manual_seed(0)
    Xtr, ytr = spirals(n, 1)
    Xte, yte = spirals(n, 2)
    model = DEQClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for epoch in range(epochs):
        for idx in torch.randperm(n).split(64):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
        if epoch % max(1, epochs // 4) == 0 or epoch == epochs - 1:
            last = model.deq.last
            print(f"  epoch {epoch:3d} loss {loss.item():.3f}  forward T-evals {last.iterations:3d} "
                  f"contraction {last.rate:.2f}  adjoint {model.deq.last_linear_solver}")
    with torch.no_grad():
        acc_tr = (model(Xtr).argmax(1) == ytr).double().mean().item()
        acc_te = (model(Xte).argmax(1) == yte).double().mean().item()
    print(f"  accuracy: train {acc_tr:.3f}  test {acc_te:.3f}")
    return acc_te


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small layer, few epochs (a smoke run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # timings of small matmuls: threads only add noise
    print("Part 1: z = tanh(W z + x)")
    part1(*((200, 16) if args.fast else (1000, 32)))
    print("Part 2: DEQ classifier on three spirals")
    return part2(*((8, 600) if args.fast else (60, 1500)))


if __name__ == "__main__":
    main()
