"""Shared test settings: float64 everywhere (gradient checks need it)."""

import torch

torch.set_default_dtype(torch.float64)
