"""RAMDA, RMDA, ProxGen (proximal AdamW) and ProxSGD as short ``optax.chain``s.

Every hyperparameter is a named argument, so ``optax.inject_hyperparams`` can
schedule ``learning_rate``, ``strength``, ``momentum``, ``eps``, ``rtol``...
The structural arguments must be passed as ``static_args`` when they are
callables: ``regularizer`` is never callable, but ``accumulator_dtype`` (a
dtype class) is::

  opt = optax.inject_hyperparams(optax_ramda.ramda,
                                 static_args=("accumulator_dtype",))(
      learning_rate=0.01, strength=1e-4, regularizer=reg)

``milestones`` given as a tuple is static without being listed; a single
milestone given as a bare int must be listed. ``solver`` (a string or None)
and ``track_residual`` (a bool) are static without being listed:
``inject_hyperparams`` passes strings, None and bools through unchanged.
``subgradient_tol`` may be a number or a schedule; under
``inject_hyperparams`` a schedule is evaluated at the wrapper's step count.

Each alias hands its stages the real floating-point leaves of the params only
(``non_float.float_leaves_only``): integer and boolean leaves get a zero
update and no state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optax
from optax._src import base

from optax_ramda._src.dual_averaging import dual_averaging
from optax_ramda._src.interpolation import interpolate
from optax_ramda._src.moments import adam_subproblem, sgd_subproblem
from optax_ramda._src.non_float import float_leaves_only
from optax_ramda._src.nuclear import NuclearNorm
from optax_ramda._src.preconditioners import cube_root_metric, sqrt_count_metric
from optax_ramda._src.regularizers import Regularizer
from optax_ramda._src.schedule import StageSchedule
from optax_ramda._src.solve import solve_subproblem


def _schedule(milestones: int | Sequence[int], gamma: Any, steps_per_epoch: Any) -> StageSchedule:
  """The aliases' :class:`StageSchedule`; its ``__post_init__`` makes an int one milestone."""
  return StageSchedule(milestones, gamma, steps_per_epoch)  # type: ignore[arg-type]


def ramda(
    learning_rate: base.ScalarOrSchedule,
    strength: Any = 0.0,
    regularizer: Regularizer | None = None,
    momentum: Any = 0.01,
    eps: Any = 1e-6,
    rtol: Any = 1e-8,
    max_iters: Any = 100,
    min_iters: Any = 2,
    milestones: int | Sequence[int] = (),
    gamma: float = 0.1,
    steps_per_epoch: int = 1,
    solver: str | None = None,
    subgradient_tol: base.ScalarOrSchedule | None = None,
    track_residual: bool = False,
    accumulator_dtype: Any | None = None,
) -> base.GradientTransformation:
  r"""RAMDA: Regularized Adaptive Momentum Dual Averaging (ALGORITHMS.md §2).

  Per step (``k`` counts steps within the current stage)::

    s = lr * sqrt(k) ;  alpha += s ;  V += s * g ;  U += s * g * g
    P = cbrt(U) + eps
    z = argmin_z <V, z - x0> + 1/2 <z - x0, P (z - x0)> + alpha * strength * psi(z)
    x <- (1 - c) x + c z

  The subproblem (§6) is solved exactly for group-LASSO leaves by default
  (``solver=None``; the paper's PG solver with ``solver="pg"``) and by the
  paper's nuclear PG for nuclear-norm leaves (see :func:`solve_subproblem`).
  Exact zeros appear
  in ``x`` once ``c`` reaches 1: in the last stage of the stage-wise schedule
  (``milestones``, §7) ``c`` ramps to 1, and at each milestone ``lr`` and
  ``eps`` are multiplied by ``gamma`` and the dual averages restart.

  Example::

    reg = optax_ramda.group_lasso({"w": optax_ramda.GroupSpec((1,)), "b": None})
    opt = optax_ramda.ramda(learning_rate=0.01, strength=1e-3, regularizer=reg,
                            milestones=(30, 60), steps_per_epoch=100)

  To reproduce the paper (and its reference traces) use ``solver="pg"``::

    opt = optax_ramda.ramda(0.01, 1e-3, reg, solver="pg")  # rtol 1e-8, 100 its

  Args:
    learning_rate: ``lr`` > 0, or a schedule of the step count.
    strength: ``lambda`` >= 0 of the regularizer.
    regularizer: ``group_lasso(...)``, ``l1(...)``, ``nuclear_norm(...)``, or
      None (then RAMDA is MADGRAD with momentum ``1 - c``).
    momentum: ``c`` in (0, 1], the interpolation weight (paper default 0.01).
    eps: > 0, added outside the cube root.
    rtol, max_iters, min_iters: the group PG solver's relative-decrease
      stopping rule (paper: 1e-8, 100, 2); unused by the exact solver.
      Nuclear leaves take theirs from ``nuclear_norm(rtol, max_iters)``.
    milestones: stage boundaries in epochs, strictly increasing (static).
    gamma: decay of lr and eps at each milestone (static).
    steps_per_epoch: steps in one epoch of ``milestones`` (static).
    solver: the group-LASSO solver (static): ``None`` (default: ``"exact"``,
      chosen by measurement, BENCHMARKS.md "Subproblem solvers"),
      ``"exact"``, ``"pg"`` (the paper's) or ``"pg_fused"``. Nuclear-norm
      leaves always use the nuclear PG, so ``solver="exact"`` with a
      ``nuclear_norm`` regularizer is an error and ``None`` is not.
    subgradient_tol: ``None`` or ``eps_t`` (a number or a schedule of the
      step count): the paper's formal inexactness condition as the PG
      solver's stopping rule (§6; see :func:`solve_subproblem`); needs
      ``solver="pg"``.
    track_residual: compute the PG solver's optimality residual every step
      for the diagnostics (static bool; see :class:`SolveState`).
    accumulator_dtype: dtype of ``x0``, ``V``, ``U``, a real float dtype;
      None: the params' (static). float16 params need a wider one (refused
      at ``init`` without it: the averages can leave float16's range).

  Integer and boolean leaves of ``params`` are passed through with a zero
  update and hold no state; complex leaves are refused at ``init``.

  References:
    Z.-S. Huang, C.-p. Lee, *Regularized Adaptive Momentum Dual Averaging with
    an Efficient Inexact Subproblem Solver for Training Structured Neural
    Network*, NeurIPS 2024, arXiv:2403.14398.
  """
  schedule = _schedule(milestones, gamma, steps_per_epoch)
  chain = optax.chain(
      dual_averaging(learning_rate, schedule, accumulator_dtype),
      cube_root_metric(eps, schedule, accumulator_dtype),
      solve_subproblem(
          regularizer, strength, rtol, max_iters, min_iters, solver, subgradient_tol,
          track_residual,
      ),
      interpolate(momentum, schedule),
  )
  return float_leaves_only(chain, regularizer)


def rmda(
    learning_rate: base.ScalarOrSchedule,
    strength: Any = 0.0,
    regularizer: Regularizer | None = None,
    momentum: Any = 0.01,
    milestones: int | Sequence[int] = (),
    gamma: float = 0.1,
    steps_per_epoch: int = 1,
    accumulator_dtype: Any | None = None,
) -> base.GradientTransformation:
  r"""RMDA: Regularized Modernized Dual Averaging (ALGORITHMS.md §3).

  Per step: ``beta = sqrt(k); s = lr * beta; alpha += s; V += s * g``;
  ``z = prox_{(alpha / beta) strength psi}(x0 - V / beta)`` in closed form;
  ``x <- (1 - c) x + c z``. Stage-wise schedule as in :func:`ramda` (no eps).

  Example::

    opt = optax_ramda.rmda(learning_rate=0.1, strength=1e-3, regularizer=reg)

  References:
    Z.-S. Huang, C.-p. Lee, *Training Structured Neural Networks Through
    Manifold Identification and Variance Reduction*, ICLR 2022,
    arXiv:2112.02612.
  """
  schedule = _schedule(milestones, gamma, steps_per_epoch)
  chain = optax.chain(
      dual_averaging(learning_rate, schedule, accumulator_dtype),
      sqrt_count_metric(),
      solve_subproblem(regularizer, strength),
      interpolate(momentum, schedule),
  )
  return float_leaves_only(chain, regularizer)


def prox_adamw(
    learning_rate: base.ScalarOrSchedule,
    strength: Any = 0.0,
    regularizer: Regularizer | None = None,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    rtol: Any = 1e-8,
    max_iters: Any = 100,
    min_iters: Any = 2,
    milestones: int | Sequence[int] = (),
    gamma: float = 0.1,
    steps_per_epoch: int = 1,
    solver: str | None = None,
    subgradient_tol: base.ScalarOrSchedule | None = None,
    track_residual: bool = False,
    accumulator_dtype: Any | None = None,
) -> base.GradientTransformation:
  r"""ProxGen with AdamW moments (ALGORITHMS.md §4).

  ``x <- argmin_z <a m, z - x> + 1/2 <z - x, D (z - x)> + lr * strength *
  psi(z)`` with ``a = lr / (1 - b1^k)``, ``D = sqrt(v) / sqrt(1 - b2^k) +
  eps``, after decoupled weight decay. Without a regularizer this is AdamW.
  ``lr`` decays by ``gamma`` at each milestone (no restarts, no ramp). The
  subproblem (§6) is solved as in :func:`ramda`: exactly for group-LASSO
  leaves by default, by the nuclear PG for nuclear-norm leaves.

  Example::

    opt = optax_ramda.prox_adamw(learning_rate=1e-3, strength=1e-4, regularizer=reg)
    paper = optax_ramda.prox_adamw(1e-3, 1e-4, reg, solver="pg")  # ProxGen's PG

  Args:
    learning_rate: ``lr`` > 0, or a schedule of the step count.
    strength: ``lambda`` >= 0 of the regularizer.
    regularizer: ``group_lasso(...)``, ``l1(...)``, ``nuclear_norm(...)``, or
      None (then this is AdamW).
    b1, b2: Adam's moment decays, in [0, 1).
    eps: > 0, added after the bias-corrected square root.
    weight_decay: >= 0, decoupled (``x <- x (1 - lr * weight_decay)``
      before the step).
    rtol, max_iters, min_iters: the group PG solver's relative-decrease
      stopping rule (paper: 1e-8, 100, 2); unused by the exact solver.
      Nuclear leaves take theirs from ``nuclear_norm(rtol, max_iters)``.
    milestones: epochs at which ``lr`` decays by ``gamma``, strictly
      increasing (static).
    gamma: the decay factor (static).
    steps_per_epoch: steps in one epoch of ``milestones`` (static).
    solver: the group-LASSO solver (static): ``None`` (default: ``"exact"``),
      ``"exact"``, ``"pg"`` or ``"pg_fused"``; as in :func:`ramda`.
    subgradient_tol: ``None`` or ``eps_t`` (a number or a schedule): the
      paper's formal inexactness stopping rule of the PG solver; needs
      ``solver="pg"``.
    track_residual: compute the PG solver's optimality residual every step
      for the diagnostics (static bool; see :class:`SolveState`).
    accumulator_dtype: dtype of ``m``, ``v``; None: the params' (static).

  References:
    J. Yun, A. Lozano, E. Yang, *Adaptive Proximal Gradient Methods for
    Structured Neural Networks*, NeurIPS 2021.
  """
  schedule = _schedule(milestones, gamma, steps_per_epoch)
  chain = optax.chain(
      adam_subproblem(
          learning_rate, b1, b2, eps, weight_decay, schedule, accumulator_dtype
      ),
      solve_subproblem(
          regularizer, strength, rtol, max_iters, min_iters, solver, subgradient_tol,
          track_residual,
      ),
      interpolate(1.0),
  )
  return float_leaves_only(chain, regularizer)


def prox_sgd(
    learning_rate: base.ScalarOrSchedule,
    strength: Any = 0.0,
    regularizer: Regularizer | None = None,
    momentum: Any = 0.1,
    milestones: int | Sequence[int] = (),
    gamma: float = 0.1,
    steps_per_epoch: int = 1,
    accumulator_dtype: Any | None = None,
) -> base.GradientTransformation:
  r"""ProxSGD (ALGORITHMS.md §5).

  ``buf <- (1 - c) buf + c g``; ``x <- prox_{lr strength psi}(x - lr buf)``.
  ``lr`` decays by ``gamma`` at each milestone.

  Example::

    opt = optax_ramda.prox_sgd(learning_rate=0.1, strength=1e-3, regularizer=reg)

  References:
    Yang et al., *ProxSGD: Training Structured Neural Networks under
    Regularization and Constraints*, ICLR 2020.
  """
  schedule = _schedule(milestones, gamma, steps_per_epoch)
  chain = optax.chain(
      sgd_subproblem(learning_rate, momentum, schedule, accumulator_dtype),
      solve_subproblem(regularizer, strength),
      interpolate(1.0),
  )
  return float_leaves_only(chain, regularizer)


def prox_ssi(
    learning_rate: base.ScalarOrSchedule,
    strength: Any = 0.0,
    regularizer: Regularizer | None = None,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    milestones: int | Sequence[int] = (),
    gamma: float = 0.1,
    steps_per_epoch: int = 1,
    accumulator_dtype: Any | None = None,
) -> base.GradientTransformation:
  r"""ProxSSI: an Adam step then the group prox scaled by Adam's denominator.

  The ProxGen subproblem (ALGORITHMS.md §4) solved exactly (§6, "Exact
  solution", ``solver="exact"``)::

    m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g * g
    D = sqrt(v) / sqrt(1 - b2^k) + eps ;  a = lr / (1 - b1^k)
    x <- argmin_z <a m, z - x> + 1/2 <z - x, D (z - x)> + lr * strength * psi(z)

  i.e. ``y = x - a m / D`` (the Adam step) followed by the ``D``-scaled prox
  of ``lr * strength * psi`` at ``y``. Bias correction and eps placement are
  those of ``torch.optim.Adam`` (eps added after the bias-corrected square
  root), as in :func:`prox_adamw`; the only differences from
  ``prox_adamw(..., solver="exact")`` are that there is no weight decay and no
  solver settings. (Deleu & Bengio solve the scaled prox by a Newton-type
  root search per group; our exact solver is screening + Newton on the
  secular equation, which reaches the same minimiser.)

  Example::

    opt = optax_ramda.prox_ssi(learning_rate=1e-3, strength=1e-4, regularizer=reg)

  References:
    T. Deleu, Y. Bengio, *Structured Sparsity Inducing Adaptive Optimizers for
    Deep Learning*, arXiv:2102.03869, 2021.
  """
  if isinstance(regularizer, NuclearNorm):
    raise ValueError(
        "prox_ssi solves the group LASSO prox exactly and has no solver for the nuclear "
        "norm. Use prox_adamw(..., regularizer=nuclear_norm(...)) (ProxGen: the nuclear "
        "PG solver for nuclear leaves); for group specs only, use group_lasso(...)."
    )
  return prox_adamw(
      learning_rate,
      strength,
      regularizer,
      b1=b1,
      b2=b2,
      eps=eps,
      weight_decay=0.0,
      milestones=milestones,
      gamma=gamma,
      steps_per_epoch=steps_per_epoch,
      solver="exact",
      accumulator_dtype=accumulator_dtype,
  )
