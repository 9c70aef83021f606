"""ODE layers: implicit Runge-Kutta steps as implicit functions (`odeint`), and scipy's `solve_ivp` as a
differentiable black box (`solve_ivp_layer`)."""

from blackbox_diff.ode._ivp import solve_ivp_layer
from blackbox_diff.ode._newton import newton
from blackbox_diff.ode._odeint import OdeOptions, odeint
from blackbox_diff.ode._tableaux import METHODS

__all__ = ["METHODS", "OdeOptions", "newton", "odeint", "solve_ivp_layer"]
