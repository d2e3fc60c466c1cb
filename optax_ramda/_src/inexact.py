"""Schedules for the paper's formal inexactness condition (ALGORITHMS.md §6).

The convergence and manifold-identification theory of RAMDA allows an
inexact subproblem solution ``z_t`` if some subgradient of ``Q_t`` at ``z_t``
has norm ``<= eps_t`` with ``sum_t eps_t^2 < inf``, and ``Q_t(z_t) <=
Q_t(x_t)``. ``solve_subproblem(..., subgradient_tol=schedule)`` makes the PG
solvers stop on exactly that test (see ``solvers.pg_solve``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from optax_ramda._src import validation


def summable_tolerance(init_value: Any = 1e-3, power: Any = 1.0):
  """``eps_t = init_value / (t + 1) ** power``: square-summable iff ``power > 1/2``.

  Args:
    init_value: ``eps_0`` > 0, in the units of the gradient of ``Q``.
    power: decay exponent, > 0.5 so that ``sum_t eps_t^2`` is finite.

  Returns:
    A schedule ``t -> eps_t`` for ``solve_subproblem(subgradient_tol=...)``.

  Example::

    solve = optax_ramda.solve_subproblem(
        reg, strength=1e-3, subgradient_tol=optax_ramda.summable_tolerance(1e-2))
  """
  validation.check_positive("init_value", init_value)
  p = validation.concrete_float(power)
  if p is not None and not p > 0.5:
    raise ValueError(
        f"power must be > 0.5 so that sum_t eps_t^2 is finite (ALGORITHMS.md §6), got {p}."
    )

  def schedule(count: jax.Array) -> jax.Array:
    t = jnp.asarray(count, jnp.float32)
    return init_value / (t + 1) ** power

  return schedule
