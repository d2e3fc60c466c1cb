"""Orbax checkpoints resume exactly, mid-stage and at a restart milestone.

The parent process runs the uninterrupted trajectory and saves params + the
optimizer state with Orbax after step 3 (mid-stage) and after step 4 (the
next step is the milestone restart: dual averages reset, lr/eps decay, the
momentum ramp starts). A fresh Python process restores each checkpoint into
the abstract tree from ``jax.eval_shape(opt.init, params)``, continues to the
end, and writes its final params; they must be bit-identical to the
uninterrupted run (same program, same inputs, same device kind).
"""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optax_ramda
from optax_ramda import presets

TOTAL = 8
SAVE_AT = (3, 4)  # steps done when saving; milestone epoch 2 x 2 steps = step 4


def params0():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {
      "dense": {"kernel": jax.random.normal(k1, (6, 5)), "bias": jnp.zeros(5)},
      "conv": {"kernel": jax.random.normal(k2, (3, 3, 2, 4))},
  }


def make_opt(name):
  reg = presets.from_params(params0())
  stages = dict(milestones=(2,), steps_per_epoch=2)
  if name == "ramda":
    return optax_ramda.ramda(0.1, strength=0.05, regularizer=reg, momentum=0.2, **stages)
  if name == "rmda":
    return optax_ramda.rmda(0.1, strength=0.05, regularizer=reg, momentum=0.2, **stages)
  if name == "prox_sgd":
    return optax_ramda.prox_sgd(0.1, strength=0.05, regularizer=reg, momentum=0.2, **stages)
  return optax_ramda.prox_adamw(0.05, strength=0.05, regularizer=reg, **stages)


def grad(i, params):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.fold_in(jax.random.key(7), i), len(leaves))
  return treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def steps(opt, params, state, start, stop):
  update = jax.jit(opt.update)
  for i in range(start, stop):
    u, state = update(grad(i, params), state, params)
    params = optax.apply_updates(params, u)
  return params, state


def resume(name, ckpt_dir, out_file):
  """Runs in the fresh process: restore, continue, save final params (npz)."""
  opt = make_opt(name)
  target = jax.eval_shape(lambda p: {"params": p, "opt_state": opt.init(p)}, params0())
  results = {}
  with ocp.StandardCheckpointer() as ckptr:
    for k in SAVE_AT:
      restored = ckptr.restore(pathlib.Path(ckpt_dir) / f"step_{k}", target)
      params, _ = steps(opt, restored["params"], restored["opt_state"], k, TOTAL)
      for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        results[f"{k}{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
  np.savez(out_file, **results)


@pytest.mark.parametrize("name", ["ramda", "rmda", "prox_adamw", "prox_sgd"])
def test_resume_in_fresh_process_is_bit_identical(name, tmp_path):
  opt = make_opt(name)
  params = params0()
  state = opt.init(params)
  done = 0
  with ocp.StandardCheckpointer() as ckptr:
    for k in SAVE_AT:
      params, state = steps(opt, params, state, done, k)
      done = k
      ckptr.save(tmp_path / f"step_{k}", {"params": params, "opt_state": state})
    ckptr.wait_until_finished()
  final, _ = steps(opt, params, state, done, TOTAL)

  out = tmp_path / "resumed.npz"
  code = (
      "import sys; sys.path.insert(0, sys.argv[1]); import test_checkpoint as t; "
      "t.resume(sys.argv[2], sys.argv[3], sys.argv[4])"
  )
  proc = subprocess.run(
      [sys.executable, "-c", code, str(pathlib.Path(__file__).parent), name,
       str(tmp_path), str(out)],
      capture_output=True, text=True, timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  resumed = np.load(out)
  for k in SAVE_AT:
    for path, leaf in jax.tree_util.tree_flatten_with_path(final)[0]:
      got = resumed[f"{k}{jax.tree_util.keystr(path)}"]
      np.testing.assert_array_equal(got, np.asarray(leaf), err_msg=f"resumed at {k}")
  # The run crossed the restart and moved away from the saved point.
  moved = np.asarray(final["conv"]["kernel"]) != np.asarray(params["conv"]["kernel"])
  assert moved.any()
