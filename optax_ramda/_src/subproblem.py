"""The typed values that pass between the stages of a chain.

``optax.chain`` only requires the first stage's input and the last stage's
output to look like updates; in between, stages hand each other these
NamedTuples of pytrees (DESIGN-NOTES "One subproblem, four optimizers"):

* RAMDA: ``dual_averaging`` -> :class:`DualAverage` -> ``cube_root_metric``
  -> :class:`Subproblem` -> ``solve_subproblem`` -> :class:`NewPoint` ->
  ``interpolate``.
* RMDA: the same with ``sqrt_count_metric`` (a scalar metric).
* ProxGen: ``adam_subproblem`` -> :class:`Subproblem` -> ``solve_subproblem``
  -> :class:`NewPoint` -> ``interpolate(1)``.
* ProxSGD: ``sgd_subproblem`` -> :class:`Subproblem` -> ``solve_subproblem``
  -> :class:`NewPoint` -> ``interpolate(1)``.

Every stage checks at trace time that it got the right one of these
(:func:`check_stage_input`), so stages chained by hand in the wrong order
raise a ValueError that names the order; a chain that ends at
``solve_subproblem`` returns a :class:`NewPoint`, which
``optax.apply_updates`` refuses, instead of a point that would be added to
the params as if it were an update.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax


class DualAverage(NamedTuple):
  """Output of :func:`dual_averaging` (ALGORITHMS.md §2, §3).

  Attributes:
    grad: this step's gradient ``g``.
    weight: ``s = lr * sqrt(k)``, the weight of ``g`` in the averages.
    beta: ``sqrt(k)``, RMDA's scalar metric.
    alpha: ``sum_{i<=k} s_i``, the regularizer's scale.
    centre: ``x0``, the point the averages are anchored at.
    linear: ``V = sum_{i<=k} s_i g_i``.
    restart: whether this step restarted the averages (§7).
    count: the 0-based step count ``t`` (for schedules of later stages).
  """

  grad: Any
  weight: jax.Array
  beta: jax.Array
  alpha: jax.Array
  centre: Any
  linear: Any
  restart: jax.Array
  count: jax.Array  # type: ignore[assignment]


class Subproblem(NamedTuple):
  r"""The diagonally-scaled proximal subproblem (ALGORITHMS.md §6).

  .. math::

    z = \arg\min_z \langle linear, z - centre\rangle
        + \tfrac12 \langle z - centre, metric \odot (z - centre)\rangle
        + scale \cdot strength \cdot \psi(z)

  i.e. the ``metric``-scaled prox of ``y = centre - linear / metric``
  (``centre`` times ``centre_scale`` and ``linear`` times ``linear_scale``
  where those are given).

  Attributes:
    centre: pytree like the params.
    linear: pytree like the params.
    metric: pytree like the params; a leaf is either an array of the param's
      shape (diagonal metric: solved by a solver) or a scalar (a multiple of
      the identity: closed-form prox).
    scale: scalar multiplying ``strength * psi``.
    warm_start: pytree like the params, where an iterative solver starts.
    linear_scale: ``None``, or a scalar: the linear term is then
      ``linear_scale * linear`` (each leaf multiplied in its dtype), formed
      by the solve stage where it is used. ProxGen passes its
      ``(lr / (1 - b1^k)) m`` this way, so that the exact solver's chunked
      solves never hold the product as a full-size temporary (BENCHMARKS.md,
      "ProxGen's linear term").
    centre_scale: ``None``, or a scalar: the centre is then
      ``centre * centre_scale``, likewise (ProxGen's decoupled weight decay
      ``x (1 - lr weight_decay)``). ``warm_start`` is never scaled: it is the
      start point itself.
  """

  centre: Any
  linear: Any
  metric: Any
  scale: jax.Array
  warm_start: Any
  linear_scale: jax.Array | None = None
  centre_scale: jax.Array | None = None


class NewPoint(NamedTuple):
  """Output of :func:`solve_subproblem`: the subproblem's solution.

  Not an update: :func:`interpolate` turns it into one
  (``x <- (1 - c) x + c z``, returned as ``x_new - x``).

  Attributes:
    z: pytree like the params, the minimiser of the :class:`Subproblem`.
  """

  z: Any


_CHAINS = (
    "chain the stages in this order: RAMDA optax.chain(dual_averaging(...), "
    "cube_root_metric(...), solve_subproblem(...), interpolate(...)) (RMDA: "
    "sqrt_count_metric() for cube_root_metric); ProxGen / ProxSGD "
    "optax.chain(adam_subproblem(...) or sgd_subproblem(...), "
    "solve_subproblem(...), interpolate(1.0)); or use the aliases "
    "optax_ramda.ramda / rmda / prox_adamw / prox_sgd, which build these "
    "chains"
)

_PRODUCERS = {
    DualAverage: "dual_averaging",
    Subproblem: "cube_root_metric, sqrt_count_metric, adam_subproblem or sgd_subproblem",
    NewPoint: "solve_subproblem",
}


def _described(value: Any) -> str:
  for cls, producer in _PRODUCERS.items():
    if isinstance(value, cls):
      return f"the {cls.__name__} made by {producer}"
  return f"a {type(value).__name__} (updates or gradients)"


def check_stage_input(stage: str, value: Any, expected: type | None) -> None:
  """Raises a ValueError naming the right order if a stage got the wrong input.

  Stages chained by hand in the wrong order would otherwise fail deep inside
  with an ``AttributeError`` or a pytree-structure error, or not at all.
  Trace-time only (a Python type check): nothing of it is in the compiled
  update.

  Args:
    stage: the stage's name, for the message.
    value: what the stage received as ``updates``.
    expected: :class:`DualAverage`, :class:`Subproblem` or :class:`NewPoint`
      for the stages that take one; ``None`` for the first stages, which take
      gradients (a plain tree like the params) and must not be given a
      stage's typed output.
  """
  if expected is None:
    wrong = isinstance(value, tuple(_PRODUCERS))
  else:
    wrong = not isinstance(value, expected)
  if wrong:
    wanted = (
        f"the {expected.__name__} made by {_PRODUCERS[expected]}"
        if expected is not None
        else "a plain tree like the params"
    )
    raise ValueError(
        f"{stage} takes {wanted}, but got {_described(value)}: {_CHAINS}."
    )
