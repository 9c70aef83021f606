"""Projection onto the three-dimensional power cone, in torch.

K_alpha = {(x, y, z): x^alpha y^(1-alpha) >= |z|, x >= 0, y >= 0} (cvxpy's `PowCone3D`, Clarabel's and
SCS's power cone), with dual cone K* = {(u, v, w): (u/alpha)^alpha (v/(1-alpha))^(1-alpha) >= |w|, u, v >= 0}.

The projection of v0 = (x0, y0, z0) is v0 inside K, 0 in the polar cone -K*, (x0+, y0+, 0) when z0 = 0,
and otherwise (x(r), y(r), sign(z0) r) where r in (0, |z0|) is the root of

    phi(r) = x(r)^alpha y(r)^(1-alpha) - r,
    x(r) = (x0 + sqrt(x0^2 + 4 alpha r (|z0| - r))) / 2,   y(r) likewise with 1 - alpha

(Hien, "Differential properties of Euclidean projection onto power cone", 2015). The root is found by
bisection on detached values; one Newton step written in torch then carries the derivative: at the root
d(r)/d(v0) = -phi_v / phi_r, the implicit function theorem, so autograd, vmap and jacrev differentiate the
projection exactly (to first order) with no custom autograd rule.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["project_pow"]

_BISECTIONS = 80
_TINY = 1e-300


def _half_root(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(a + sqrt(a^2 + c)) / 2 for c >= 0, without cancellation when a < 0."""
    s = torch.sqrt(a * a + c)
    return torch.where(a >= 0, 0.5 * (a + s), 0.5 * c / torch.clamp(s - a, min=_TINY))


def _xy(x0: torch.Tensor, y0: torch.Tensor, az: torch.Tensor, r: torch.Tensor, alpha: torch.Tensor):
    q = torch.clamp(r * (az - r), min=0.0)
    return _half_root(x0, 4.0 * alpha * q), _half_root(y0, 4.0 * (1.0 - alpha) * q)


def _mono(x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """x^alpha y^(1-alpha) for x, y >= 0 (zero where either is zero), safe for autograd."""
    xs, ys = torch.clamp(x, min=_TINY), torch.clamp(y, min=_TINY)
    value = torch.exp(alpha * torch.log(xs) + (1.0 - alpha) * torch.log(ys))
    return torch.where((x > 0) & (y > 0), value, torch.zeros_like(value))


def _phi(x0, y0, az, r, alpha):
    """phi(r) and its derivative in r (detached use: the root is found without autograd)."""
    x, y = _xy(x0, y0, az, r, alpha)
    x, y = torch.clamp(x, min=_TINY), torch.clamp(y, min=_TINY)
    dq = az - 2.0 * r
    dx = alpha * dq / torch.clamp(2.0 * x - x0, min=_TINY)  # sqrt(x0^2 + 4 alpha q) = 2 x - x0
    dy = (1.0 - alpha) * dq / torch.clamp(2.0 * y - y0, min=_TINY)
    mono = _mono(x, y, alpha)
    return mono - r, alpha * mono / x * dx + (1.0 - alpha) * mono / y * dy - 1.0


def _root_numpy(x0: np.ndarray, y0: np.ndarray, az: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    lo, hi = np.zeros_like(az), az.copy()
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        for _ in range(_BISECTIONS):
            mid = 0.5 * (lo + hi)
            q = np.maximum(mid * (az - mid), 0.0)
            x = _half_root_np(x0, 4.0 * alpha * q)
            y = _half_root_np(y0, 4.0 * (1.0 - alpha) * q)
            mono = np.where((x > 0) & (y > 0), np.exp(alpha * np.log(np.maximum(x, _TINY))
                                                      + (1.0 - alpha) * np.log(np.maximum(y, _TINY))), 0.0)
            positive = mono - mid > 0
            lo, hi = np.where(positive, mid, lo), np.where(positive, hi, mid)
    return 0.5 * (lo + hi)


def _half_root_np(a: np.ndarray, c: np.ndarray) -> np.ndarray:
    s = np.sqrt(a * a + c)
    return np.where(a >= 0, 0.5 * (a + s), 0.5 * c / np.maximum(s - a, _TINY))


def _root(x0: torch.Tensor, y0: torch.Tensor, az: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The root of phi in (0, |z0|) by bisection (phi(0) >= 0 > phi(|z0|) outside K and its polar).

    In numpy when the values can be read (fast); inside a torch.func transform (vmap, jacrev), where they
    cannot, the same bisection in torch (no data-dependent branches).
    """
    try:
        arrays = [t.detach().cpu().numpy() for t in torch.broadcast_tensors(x0, y0, az, alpha)]
    except RuntimeError:  # a functorch-wrapped tensor has no storage to read
        arrays = None
    if arrays is not None:
        return torch.as_tensor(_root_numpy(*arrays)).to(az)
    lo, hi = torch.zeros_like(az), az.clone()
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        x, y = _xy(x0, y0, az, mid, alpha)
        positive = _mono(x, y, alpha) - mid > 0
        lo = torch.where(positive, mid, lo)
        hi = torch.where(positive, hi, mid)
    return 0.5 * (lo + hi)


def project_pow(v: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """Project consecutive 3-vectors (the last dimension, 3 * len(alphas)) onto their power cones.

    Args:
        v: (..., 3k) tensor, cone i on entries 3i, 3i+1, 3i+2 as (x, y, z).
        alphas: (k,) exponents in (0, 1).
    """
    blocks = v.reshape(*v.shape[:-1], -1, 3)
    alpha = alphas.to(v)
    x0, y0, z0 = blocks[..., 0], blocks[..., 1], blocks[..., 2]
    az = torch.abs(z0)
    inside = (x0 >= 0) & (y0 >= 0) & (_mono(x0, y0, alpha) >= az)
    u, w = torch.clamp(-x0, min=0.0) / alpha, torch.clamp(-y0, min=0.0) / (1.0 - alpha)
    polar = (x0 <= 0) & (y0 <= 0) & (_mono(u, w, alpha) >= az)
    flat = az == 0
    # Boundary case: the root on detached values, then one Newton step in torch for the derivative.
    with torch.no_grad():
        xd, yd, azd = x0.detach(), y0.detach(), torch.where(flat, torch.ones_like(az), az).detach()
        r0 = _root(xd, yd, azd, alpha)
        _, slope = _phi(xd, yd, azd, r0, alpha)
        slope = torch.where(slope.abs() > _TINY, slope, -torch.ones_like(slope))
    az_safe = torch.where(flat, torch.ones_like(az), az)
    xb, yb = _xy(x0, y0, az_safe, r0, alpha)
    r = r0 - (_mono(xb, yb, alpha) - r0) / slope
    x, y = _xy(x0, y0, az_safe, r, alpha)
    boundary = torch.stack([x, y, torch.sign(z0) * r], dim=-1)
    zero_z = torch.stack([torch.relu(x0), torch.relu(y0), torch.zeros_like(z0)], dim=-1)
    out = torch.where(flat.unsqueeze(-1), zero_z, boundary)
    out = torch.where(polar.unsqueeze(-1), torch.zeros_like(out), out)
    out = torch.where(inside.unsqueeze(-1), blocks, out)
    return out.reshape(v.shape)
