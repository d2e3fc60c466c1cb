"""jnp.cbrt vs optax_ramda's cube_root (RAMDA's metric P = cbrt(U) + eps): time and ulps.

  python3 benchmarks/cube_root.py [--size 1000000] [--reps 30]

Times the jitted elementwise op on ``--size`` entries spread over 1e-20..1e20
(median over repeats after warm-up, a multiply as the memory-traffic floor) and
measures the error in ulps against a long-double reference, in float32 and
float64. Results in BENCHMARKS.md ("Cube root").
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from optax_ramda._src.preconditioners import cube_root


def bench(f, x, reps):
  f = jax.jit(f)
  jax.block_until_ready(f(x))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(x))
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def max_ulps(f, x, dtype):
  got = np.asarray(jax.jit(f)(x)).astype(np.longdouble)
  ref = np.cbrt(np.asarray(x).astype(np.longdouble))
  return float(np.max(np.abs(got - ref) / np.spacing(ref.astype(dtype))))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--size", type=int, default=1_000_000)
  ap.add_argument("--reps", type=int, default=30)
  args = ap.parse_args()
  jax.config.update("jax_enable_x64", True)
  rng = np.random.default_rng(0)
  print("| dtype | op | ms | max ulps |")
  print("|---|---|---|---|")
  for dtype in (np.float32, np.float64):
    x = jnp.asarray((10.0 ** rng.uniform(-20, 20, args.size)).astype(dtype))
    print(f"| {dtype.__name__} | x * 3 | {bench(lambda u: u * 3, x, args.reps):.3f} | |")
    for name, f in (("jnp.cbrt", jnp.cbrt), ("cube_root", cube_root)):
      print(f"| {dtype.__name__} | {name} | {bench(f, x, args.reps):.3f} "
            f"| {max_ulps(f, x, dtype):.2f} |")


if __name__ == "__main__":
  main()
