"""Subproblem solvers: paper PG vs exact vs PG to convergence (BENCHMARKS.md).

  python3 benchmarks/solvers.py [--sizes 1e5 1e6 1e7] [--reps 5] [--converged-iters 3000]
                                [--updates]

Realistic metrics: a short RAMDA run (group LASSO, input-wise groups) on a
small MLP for a synthetic classification task gives, for its first kernel
``(64, 128)``, the metric ``P = cbrt(U) + eps``, the dual average ``V``, the
centre ``x0`` and the scale ``alpha``. Each target size tiles these rows
(``(n, 128)`` kernels, one group per row) and multiplies each tiled copy by a
random positive factor f per row (log-uniform over 1e-2..1e2): P -> f P,
x0 -> x0 / f, which widens the metric's spread across groups as in a deep
network while keeping ``P x0 - V``, hence the run's screening pattern; all
in float32 like training.

For each solver the script reports the median wall time of the jitted solve
(after compilation and a warm-up call), the iterations (PG sweeps; Newton
steps of the slowest group for exact), and the accuracy of ``z``:
``(Q(z) - Q*) / |Q*|`` with ``Q*`` from the exact solver run in float64 on
the same float32 inputs, and the relative optimality residual (PG to
convergence is timed once; the others report the median of ``--reps``)
``dist(0, dQ(z)) / ||P x0 - V||``, both evaluated in float64. It prints a
markdown table to paste into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_ramda
from optax_ramda._src import exact, solvers
from optax_ramda._src.groups import GroupSpec, group_leaf

WIDTH = 128


def ramda_metric(steps=200, strength=2e-3, seed=0):
  """``(x0, V, P, alpha)`` of the first kernel after a short RAMDA run."""
  rng = np.random.default_rng(seed)
  x_data = rng.normal(size=(2048, 64)).astype(np.float32)
  w_true = rng.normal(size=(64, 10)) * (rng.random((64, 1)) < 0.5)  # half the inputs matter
  y_data = np.argmax(x_data @ w_true + 0.5 * rng.normal(size=(2048, 10)), axis=1)
  key = jax.random.PRNGKey(seed)
  k1, k2 = jax.random.split(key)
  params = {
      "w1": jax.random.normal(k1, (64, WIDTH)) / 8,
      "b1": jnp.zeros(WIDTH),
      "w2": jax.random.normal(k2, (WIDTH, 10)) / np.sqrt(WIDTH),
      "b2": jnp.zeros(10),
  }

  def loss(p, xb, yb):
    h = jax.nn.relu(xb @ p["w1"] + p["b1"])
    return optax.softmax_cross_entropy_with_integer_labels(h @ p["w2"] + p["b2"], yb).mean()

  reg = optax_ramda.group_lasso(
      {"w1": GroupSpec((1,)), "b1": None, "w2": GroupSpec((1,)), "b2": None}
  )
  # The paper's solver, so the benchmark's data do not depend on the solvers compared.
  opt = optax_ramda.ramda(0.05, strength, reg, momentum=0.1, solver="pg")
  state = opt.init(params)

  @jax.jit
  def step(p, s, xb, yb):
    g = jax.grad(loss)(p, xb, yb)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  for _ in range(steps):
    idx = rng.integers(0, 2048, 128)
    params, state = step(params, state, x_data[idx], y_data[idx])
  da = state[0]
  u = optax.tree_utils.tree_get(state, "sum_sq_grad")["w1"]
  p = np.cbrt(np.asarray(u, np.float64)) + 1e-6
  return (
      np.asarray(da.centre["w1"]),
      np.asarray(da.sum_grad["w1"]),
      p,
      float(da.alpha),
      strength,
  )


def tiled_problem(base, size, seed=1):
  x0, v, p, alpha, strength = base
  rows = max(1, round(size / WIDTH))
  reps = -(-rows // x0.shape[0])
  rng = np.random.default_rng(seed)
  tile = lambda a: np.tile(a, (reps, 1))[:rows]
  factor = 10.0 ** rng.uniform(-2, 2, size=(rows, 1))
  jitter = 1 + 0.01 * rng.standard_normal((rows, WIDTH))
  # P -> f P and x0 -> x0 / f keep b = P x0 - V, hence the screening of the
  # run, while widening the metric's spread across groups.
  pt = tile(p) * factor
  x0t = tile(x0) * jitter / factor
  vt = tile(v) * jitter
  t = alpha * strength * np.sqrt(WIDTH)
  f32 = lambda a: np.asarray(a, np.float32)
  return f32(x0t), f32(vt), f32(pt), f32(t)


def objective(x0, v, p, t, z):
  d = z - x0
  return float(np.sum(v * d + 0.5 * p * d * d) + t * np.sum(np.linalg.norm(z, axis=1)))


def residual(x0, v, p, t, z):
  g = v + p * (z - x0)
  nz = np.linalg.norm(z, axis=1, keepdims=True)
  on = np.linalg.norm(g + t * z / np.where(nz > 0, nz, 1), axis=1)
  off = np.maximum(np.linalg.norm(g, axis=1) - t, 0)
  res = np.where(nz[:, 0] > 0, on, off)
  return float(np.sqrt(np.sum(res**2)) / np.linalg.norm(p * x0 - v))


def make_solver(name, leaf, converged_iters):
  if name == "exact":
    f = lambda pr: exact.exact_solve([leaf], [pr])[0]
  elif name == "pg-paper":
    f = lambda pr: solvers.pg_solve([leaf], [pr], 1e-8, 100, 2)[0]
  else:
    f = lambda pr: solvers.pg_solve([leaf], [pr], -1.0, converged_iters, 2)[0]
  return jax.jit(f)


def run(sizes, reps, converged_iters):
  base = ramda_metric()
  rows_out = []
  for size in sizes:
    x0, v, p, t = tiled_problem(base, size)
    leaf = group_leaf(GroupSpec((1,)), x0, "w")
    prob = solvers.LeafProblem(*(jnp.asarray(a) for a in (x0, v, p, x0, t)))
    with jax.enable_x64(True):
      ref_prob = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), prob)
      z_ref = np.asarray(exact.exact_solve([leaf], [ref_prob])[0].z)
    x64 = [np.asarray(a, np.float64) for a in (x0, v, p)] + [float(t)]
    q_ref = objective(*x64, z_ref)
    screened = float(np.mean(np.linalg.norm(z_ref, axis=1) == 0))
    for name in ("pg-paper", "exact", "pg-converged"):
      f = make_solver(name, leaf, converged_iters)
      sol = jax.block_until_ready(f(prob))  # compile + warm-up
      times = []
      # PG to convergence is a reference, timed once.
      for _ in range(1 if name == "pg-converged" else reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(prob))
        times.append(time.perf_counter() - t0)
      z = np.asarray(sol.z, np.float64)
      gap = (objective(*x64, z) - q_ref) / abs(q_ref)
      rows_out.append(
          (x0.size, screened, name, statistics.median(times) * 1e3, int(sol.iterations), gap,
           residual(*x64, z))
      )
      print(rows_out[-1], flush=True)
  return rows_out


def update_times(reps):
  """Median time of one jitted optimizer update, pg vs exact (8 kernels (1024, 128))."""
  params = {
      f"l{i}": {"kernel": jax.random.normal(jax.random.PRNGKey(i), (1024, WIDTH)) * 0.1,
                "bias": jnp.zeros(WIDTH)}
      for i in range(8)
  }
  spec = {k: {"kernel": GroupSpec((1,)), "bias": None} for k in params}
  reg = optax_ramda.group_lasso(spec)

  def grads(k):
    return jax.tree.map(
        lambda x: jax.random.normal(jax.random.PRNGKey(k), x.shape) * 0.1 + 0.05 * x, params
    )

  makers = {
      "ramda": lambda s: optax_ramda.ramda(0.01, 1e-3, reg, momentum=0.1, solver=s),
      "prox_adamw": lambda s: optax_ramda.prox_adamw(1e-3, 1e-2, reg, solver=s),
  }
  print("\n| optimizer (1.05e6 params, after 20 steps) | solver | ms / update | max iterations |")
  print("|---|---|---|---|")
  for name, make in makers.items():
    for solver in ("pg", "exact"):
      opt = make(solver)
      state = opt.init(params)
      update = jax.jit(opt.update)
      for k in range(20):
        _, state = update(grads(k), state, params)
      g = grads(99)
      jax.block_until_ready(state)
      times = []
      for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(update(g, state, params))
        times.append(time.perf_counter() - t0)
      its = int(jnp.max(optax.tree_utils.tree_get(state, "iterations")))
      print(f"| {name} | {solver} | {statistics.median(times) * 1e3:.1f} | {its} |")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sizes", type=float, nargs="+", default=[1e5, 1e6, 1e7])
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--converged-iters", type=int, default=3000)
  ap.add_argument("--updates", action="store_true", help="also time full optimizer updates")
  args = ap.parse_args()
  rows = run([int(s) for s in args.sizes], args.reps, args.converged_iters)
  print()
  print(
      f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, nproc={os.cpu_count()}, "
      f"{jax.devices()[0].device_kind}, jax {jax.__version__}, float32 solves"
  )
  print()
  print("| entries | screened groups | solver | ms / solve | iterations | "
        "(Q - Q*) / abs(Q*) | rel. residual |")
  print("|---|---|---|---|---|---|---|")
  for n, scr, name, ms, it, gap, res in rows:
    label = name if name != "pg-converged" else f"pg, {args.converged_iters} sweeps"
    print(f"| {n:.0e} | {scr:.0%} | {label} | {ms:.2f} | {it} | {gap:.1e} | {res:.1e} |")
  if args.updates:
    update_times(args.reps)


if __name__ == "__main__":
  main()
