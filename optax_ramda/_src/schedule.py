"""The paper's stage-wise schedule, as pure functions of the step count (ALGORITHMS.md §7).

Training is split into stages at ``milestones`` (in epochs of
``steps_per_epoch`` steps). At each milestone the learning rate is multiplied
by ``gamma``; RAMDA and RMDA restart their dual averages there, RAMDA also
multiplies ``eps`` by ``gamma``; in the last stage RAMDA's and RMDA's
interpolation weight ``c`` ramps up to 1.

Everything is derived from the 0-based count ``t`` of optimizer steps taken
so far, kept in each stage's state, so one compiled ``update`` serves the
whole run and a checkpoint captures the schedule. With
``steps_per_epoch = 1`` this is exactly the semantics of the reference traces:

* step ``t`` belongs to epoch ``e = t // steps_per_epoch``; a restart happens
  before the first step of epoch ``m`` for every milestone ``m``;
* the learning rate of step ``t`` is ``lr`` multiplied by ``gamma`` once per
  milestone ``m <= e``, one multiplication after another (as the reference
  scheduler does, so the rounding matches);
* the ramp: ``c = min(c0 * sqrt(n), 1)`` with ``n = 1 + max(0, e - M + 1)``,
  ``M = milestones[-1]``. So the j-th epoch of the last stage (j = 1, 2, ...)
  uses ``min(c0 * sqrt(j + 1), 1)`` and every epoch before it uses ``c0``.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp

from optax_ramda._src import validation


@dataclasses.dataclass(frozen=True)
class StageSchedule:
  """Milestones (in epochs), decay ``gamma`` and epoch length in steps.

  ``StageSchedule()`` (no milestones) is a single stage: no decay, no
  restart, no ramp.
  """

  milestones: tuple[int, ...] = ()
  gamma: float = 0.1
  steps_per_epoch: int = 1
  ramp_momentum: bool = True

  def __post_init__(self):
    ms = self.milestones
    if isinstance(ms, jax.Array) and ms.ndim == 0:  # inject_hyperparams made it one
      raise ValueError(
          "milestones must be static (a tuple of ints, or an int), got an array. "
          "Under optax.inject_hyperparams pass a tuple, e.g. milestones=(30,), or "
          "list it in static_args=('milestones',)."
      )
    if isinstance(ms, int):
      ms = (ms,)
    ms = tuple(int(m) if float(m) == int(m) else m for m in ms)
    if any(not isinstance(m, int) or m <= 0 for m in ms):
      raise ValueError(
          f"milestones must be positive integers (epochs), got {self.milestones}."
      )
    if any(b <= a for a, b in itertools.pairwise(ms)):
      raise ValueError(
          f"milestones must be strictly increasing, got {self.milestones}. "
          "Sort them and drop duplicates, e.g. (15, 30)."
      )
    object.__setattr__(self, "milestones", ms)
    # gamma and steps_per_epoch may be traced (optax.inject_hyperparams turns
    # every numeric argument into an array); only concrete values are checked.
    validation.check_positive("gamma", self.gamma)
    spe = validation.concrete_float(self.steps_per_epoch)
    if spe is not None and (spe < 1 or spe != int(spe)):
      raise ValueError(
          f"steps_per_epoch must be an integer >= 1, got {self.steps_per_epoch}."
      )

  # --- all below take the 0-based step count t (int32 array) -------------

  def epoch(self, count: jax.Array) -> jax.Array:
    return count // jnp.asarray(self.steps_per_epoch, count.dtype)

  def is_restart(self, count: jax.Array) -> jax.Array:
    """True at the first step and at the first step of every milestone epoch."""
    restart = count == 0
    for m in self.milestones:
      restart = restart | (count == m * jnp.asarray(self.steps_per_epoch, count.dtype))
    return restart

  def stage_start(self, count: jax.Array) -> jax.Array:
    """The step at which the current stage began."""
    start = jnp.zeros_like(count)
    for m in self.milestones:
      step = m * jnp.asarray(self.steps_per_epoch, count.dtype)
      start = jnp.where(count >= step, step, start)
    return start

  def decay(self, value: jax.Array, count: jax.Array) -> jax.Array:
    """``value`` multiplied by ``gamma`` once per milestone passed, in sequence."""
    e = self.epoch(count)
    for m in self.milestones:
      value = jnp.where(e >= m, value * jnp.asarray(self.gamma, value.dtype), value)
    return value

  def momentum(self, c0: jax.Array, count: jax.Array) -> jax.Array:
    """The interpolation weight of step ``count``, with the last-stage ramp."""
    if not self.milestones or not self.ramp_momentum:
      return c0
    e = self.epoch(count)
    n = 1 + jnp.maximum(0, e - self.milestones[-1] + 1)
    ramped = jnp.minimum(c0 * jnp.sqrt(n.astype(jnp.result_type(c0, float))), 1)
    return jnp.where(n > 1, ramped, c0)

