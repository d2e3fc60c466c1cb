"""The stage-wise schedule's step semantics (ALGORITHMS.md §7)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_ramda import StageSchedule


def _reference(milestones, lr0, c0, gamma, steps):
  """The reference scheduler, written from §7: called after every step t."""
  lr, c, count, out = lr0, c0, 1, []
  for t in range(steps):
    out.append((lr, c))
    if milestones and t + 1 >= milestones[-1]:
      count += 1
      c = min(c0 * np.sqrt(count), 1.0)
    if t + 1 in milestones:
      lr *= gamma
  return out


@pytest.mark.parametrize("milestones", [(), (15, 30), (1,), (3, 4, 9)])
def test_lr_and_momentum_match_reference(milestones):
  """Bit-for-bit in float64: lr is decayed by sequential multiplications."""
  sched = StageSchedule(milestones, 0.1)
  with jax.enable_x64(True):
    for t, (lr, c) in enumerate(_reference(milestones, 0.01, 0.1, 0.1, 60)):
      count = jnp.asarray(t, jnp.int32)
      assert float(sched.decay(jnp.asarray(0.01), count)) == lr
      assert float(sched.momentum(jnp.asarray(0.1), count)) == c


def test_restarts_and_stage_start():
  sched = StageSchedule((15, 30))
  restarts = [t for t in range(60) if bool(sched.is_restart(jnp.asarray(t)))]
  assert restarts == [0, 15, 30]
  assert int(sched.stage_start(jnp.asarray(29))) == 15
  assert int(sched.stage_start(jnp.asarray(30))) == 30


def test_steps_per_epoch():
  sched = StageSchedule((2,), steps_per_epoch=10)
  assert [t for t in range(40) if bool(sched.is_restart(jnp.asarray(t)))] == [0, 20]
  # the ramp moves once per epoch of the last stage
  cs = [float(sched.momentum(jnp.asarray(0.1), jnp.asarray(t))) for t in (19, 20, 29, 30)]
  expected = [0.1, 0.1 * np.sqrt(2), 0.1 * np.sqrt(2), 0.1 * np.sqrt(3)]
  np.testing.assert_allclose(cs, expected, rtol=1e-6)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"milestones": (5, 3)}, "strictly increasing"),
        ({"milestones": (0,)}, "positive"),
        ({"gamma": 0.0}, "gamma"),
        ({"steps_per_epoch": 0}, "steps_per_epoch"),
    ],
)
def test_bad_schedule(kw, match):
  with pytest.raises(ValueError, match=match):
    StageSchedule(**kw)
