"""Optimality conditions: what holds at a black box's answer, one small residual type per problem class.

`Root`, `FixedPoint`, `Argmin` and `KKT` (with its `KKTSolution` answers) state ``F(z, *params) = 0``
for the engine; `KKT` identifies its active set with the KKT toolkit (`blackbox_diff.kkt`). This layer
sits on the engine (it hands the engine a `Degeneracy` at a degenerate point) and below everything that
calls a black box.
"""

from blackbox_diff.conditions._conditions import KKT, AbstractCondition, Argmin, FixedPoint, Root, Structure
from blackbox_diff.conditions._solution import KKTSolution

__all__ = ["KKT", "AbstractCondition", "Argmin", "FixedPoint", "KKTSolution", "Root", "Structure"]
