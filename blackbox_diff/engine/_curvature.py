"""Is a stationary point a minimum? Negative curvature of the Hessian at an Argmin answer, found cheaply.

An `Argmin` black box may return a saddle point or a maximum (a local solver started badly, a stopping test
on the gradient alone). The implicit function theorem still describes how that stationary point moves, but
the user asked for a minimiser. For each instance, the smallest eigenvalue of the Hessian H (the residual's
Jacobian) is estimated: exactly from the dense H when n is small, else from a few Lanczos steps on
Hessian-vector products (a Ritz value is a Rayleigh quotient, so a negative one proves negative curvature:
no false alarms, possibly a missed one).
"""

from __future__ import annotations

import torch

from blackbox_diff.engine._system import Linearization

__all__ = ["smallest_curvature"]

DENSE_MAX = 64
LANCZOS_STEPS = 8


def smallest_curvature(lin: Linearization) -> tuple[torch.Tensor, torch.Tensor]:
    """(smallest, largest) eigenvalue estimates of the symmetric Jacobian per instance, each (B,)."""
    B, n = lin.Z.shape
    if n <= DENSE_MAX:
        H = lin.dense(transpose=True)
        H = 0.5 * (H + H.transpose(1, 2))
        ev = torch.linalg.eigvalsh(H)
        return ev[:, 0], ev[:, -1]
    return _lanczos(lin.vjp_z, B, n, lin.Z)


def _lanczos(matvec, B: int, n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(B, n, generator=gen, dtype=like.dtype).to(like.device)
    q = q / q.norm(dim=1, keepdim=True)
    q_prev = torch.zeros_like(q)
    beta = torch.zeros(B, dtype=like.dtype, device=like.device)
    alphas, betas = [], []
    for _ in range(min(LANCZOS_STEPS, n)):
        w = matvec(q) - beta[:, None] * q_prev
        alpha = (w * q).sum(dim=1)
        w = w - alpha[:, None] * q
        beta = w.norm(dim=1)
        alphas.append(alpha)
        betas.append(beta)
        q_prev, q = q, w / beta.clamp_min(torch.finfo(like.dtype).tiny)[:, None]
    k = len(alphas)
    T = torch.diag_embed(torch.stack(alphas, dim=1))
    if k > 1:
        off = torch.stack(betas[:-1], dim=1)
        T = T + torch.diag_embed(off, offset=1) + torch.diag_embed(off, offset=-1)
    ev = torch.linalg.eigvalsh(T)
    return ev[:, 0], ev[:, -1]
