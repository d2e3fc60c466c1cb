"""optax_ramda: RAMDA, RMDA, ProxGen and ProxSGD as Optax transformations.

Structured-sparsity training in JAX: the optimizers leave whole groups of
weights (neurons, channels, heads) exactly zero. See ``README.md`` and the
spec ``ALGORITHMS.md`` cited in the docstrings.
"""

from optax_ramda._src import presets
from optax_ramda._src.alias import prox_adamw, prox_sgd, prox_ssi, ramda, rmda
from optax_ramda._src.compaction import CompactionBoundary, compact, compaction_plan
from optax_ramda._src.dual_averaging import DualAveragingState, dual_averaging
from optax_ramda._src.exact import exact_solve
from optax_ramda._src.groups import GroupLeaf, GroupSpec, group_leaf
from optax_ramda._src.inexact import summable_tolerance
from optax_ramda._src.interpolation import InterpolateState, interpolate
from optax_ramda._src.moments import (
    AdamSubproblemState,
    SgdSubproblemState,
    adam_subproblem,
    sgd_subproblem,
)
from optax_ramda._src.nuclear import NuclearNorm, NuclearSpec, low_rank_level, nuclear_norm
from optax_ramda._src.preconditioners import (
    CubeRootMetricState,
    cube_root_metric,
    sqrt_count_metric,
)
from optax_ramda._src.regularizers import GroupLasso, Regularizer, group_lasso, l1
from optax_ramda._src.schedule import StageSchedule
from optax_ramda._src.solve import SolveState, solve_diagnostics, solve_subproblem
from optax_ramda._src.solvers import LeafProblem
from optax_ramda._src.structure import LeafStructure, StructureReport, structure
from optax_ramda._src.subproblem import DualAverage, NewPoint, Subproblem

__version__ = "0.1.0"

__all__ = [
    "AdamSubproblemState",
    "CompactionBoundary",
    "CubeRootMetricState",
    "DualAverage",
    "DualAveragingState",
    "GroupLasso",
    "GroupLeaf",
    "GroupSpec",
    "InterpolateState",
    "LeafProblem",
    "LeafStructure",
    "NewPoint",
    "NuclearNorm",
    "NuclearSpec",
    "Regularizer",
    "SgdSubproblemState",
    "SolveState",
    "StageSchedule",
    "StructureReport",
    "Subproblem",
    "adam_subproblem",
    "compact",
    "compaction_plan",
    "cube_root_metric",
    "dual_averaging",
    "exact_solve",
    "group_lasso",
    "group_leaf",
    "interpolate",
    "l1",
    "low_rank_level",
    "nuclear_norm",
    "presets",
    "prox_adamw",
    "prox_sgd",
    "prox_ssi",
    "ramda",
    "rmda",
    "sgd_subproblem",
    "solve_diagnostics",
    "solve_subproblem",
    "sqrt_count_metric",
    "structure",
    "summable_tolerance",
]
