"""Imitation learning through a differentiable MPC (the Differentiable Implicit Layers poster, 4.2).

The showcase ships inside the package, so that ``blackbox-diff demo`` runs it from any install; its code is
blackbox_diff/demos/mpc_imitation.py. This script runs that code from a checkout, and re-exports its names
(``mpc_layer``, ``TRUE_WEIGHTS``, ...) for the tests and benchmarks that import ``mpc_imitation``.

Run:  python examples/mpc_imitation.py [--fast] [--out DIR]
"""

from __future__ import annotations

import sys

from blackbox_diff.demos.mpc_imitation import *  # noqa: F403 - this script is the demo under its old path
from blackbox_diff.demos.mpc_imitation import main

if __name__ == "__main__":
    main(sys.argv[1:])
