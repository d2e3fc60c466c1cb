"""Fused vs per-leaf while_loop for the PG solver: compile and run time.

  python3 benchmarks/solver_loop.py [--leaves 60] [--width 128]

Builds a model of ``--leaves`` regularized Dense-like kernels (input-wise
groups), takes a few RAMDA steps to get a realistic metric, then times the
jitted update of RAMDA with ``solver="pg_fused"`` (one fused loop) and
``solver="pg"`` (one loop per leaf): compile time of the update, and
the median run time over repeated calls after warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import optax_ramda


def make_params(n_leaves, width, seed=0):
  key = jax.random.PRNGKey(seed)
  params = {}
  for i in range(n_leaves):
    key, k = jax.random.split(key)
    w = width if i % 3 else width // 2  # mixed shapes
    params[f"layer{i:03d}"] = {"kernel": jax.random.normal(k, (w, width)) * 0.1,
                               "bias": jnp.zeros(width)}
  return params


def spec(params):
  return {k: {"kernel": optax_ramda.GroupSpec((1,)), "bias": None} for k in params}


def bench(solver, params, grads, reps):
  opt = optax_ramda.ramda(0.01, 1e-3, optax_ramda.group_lasso(spec), momentum=0.1, solver=solver)
  state = opt.init(params)
  upd = jax.jit(opt.update)
  t0 = time.perf_counter()
  compiled = upd.lower(grads, state, params).compile()
  compile_s = time.perf_counter() - t0
  # warm the state up so the metric is realistic
  for g in grads_seq(grads, 5):
    _, state = compiled(g, state, params)
  jax.block_until_ready(state)
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    out = compiled(grads, state, params)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t0)
  iters = [int(i) for i in optax.tree_utils.tree_get(out[1], "iterations")]
  return compile_s, statistics.median(times), sum(iters) / max(1, sum(i > 0 for i in iters))


def grads_seq(grads, n):
  for i in range(n):
    scale = 1 + 0.1 * i
    yield jax.tree.map(lambda g, scale=scale: g * scale, grads)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--leaves", type=int, default=60)
  ap.add_argument("--width", type=int, default=128)
  ap.add_argument("--reps", type=int, default=20)
  args = ap.parse_args()
  params = make_params(args.leaves, args.width)
  grads = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(1), x.shape) * 0.01, params)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"{args.leaves} regularized leaves, {n_params:,} params")
  print("| solver | compile (s) | update median (ms) | mean PG iterations |")
  print("|---|---|---|---|")
  for solver in ("pg_fused", "pg"):
    c, r, it = bench(solver, params, grads, args.reps)
    print(f"| {solver} | {c:.2f} | {1e3 * r:.2f} | {it:.1f} |")


if __name__ == "__main__":
  main()
