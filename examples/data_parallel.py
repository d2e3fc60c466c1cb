"""Data-parallel and FSDP-style training with RAMDA on several devices.

Trains a small MLP on scikit-learn's 8x8 digits with input-wise group LASSO
(presets.from_params) on all local devices:

* ``--mode data``: the batch is sharded over a ``data`` mesh axis, params and
  optimizer state are replicated (``NamedSharding`` + ``jax.jit``);
* ``--mode fsdp``: the params are sharded over a ``model`` axis; the first
  kernel's input-wise groups span all shards, so each group norm is reduced
  across devices (jit inserts the collectives).

It then replays the same steps on one device and prints the largest
difference (float32 rounding only). On a CPU-only machine simulate devices::

  python3 examples/data_parallel.py --devices 8 --mode fsdp

The jitted step donates the params and optimizer-state buffers.
"""

from __future__ import annotations

import argparse
import time


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--mode", choices=("data", "fsdp"), default="data")
  ap.add_argument("--devices", type=int, default=0, help="simulate N CPU devices (0: as is)")
  ap.add_argument("--steps", type=int, default=100)
  ap.add_argument("--strength", type=float, default=1e-3)
  args = ap.parse_args(argv)
  if args.steps <= 0:
    ap.error("--steps must be > 0")

  import jax

  if args.devices:
    jax.config.update("jax_num_cpu_devices", args.devices)
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P
  from sklearn.datasets import load_digits

  import optax_ramda
  from optax_ramda import presets

  n_dev = jax.device_count()
  digits = load_digits()
  n = (len(digits.data) // n_dev) * n_dev
  x = jnp.asarray(digits.data[:n] / 16.0, jnp.float32)
  y = jnp.asarray(digits.target[:n])

  k1, k2 = jax.random.split(jax.random.key(0))
  hidden = 8 * n_dev
  params = {
      "fc1": {"kernel": jax.random.normal(k1, (64, hidden)) / 8, "bias": jnp.zeros(hidden)},
      "fc2": {"kernel": jax.random.normal(k2, (hidden, 10)) / 8, "bias": jnp.zeros(10)},
  }
  reg = presets.from_params(params)  # Dense kernels input-wise (spec §9)
  # momentum c0 = 0.2: the last stage's ramp c = min(c0 sqrt(n), 1) reaches 1 after
  # 25 of its steps, so the run ends with exact zero groups.
  opt = optax_ramda.ramda(
      0.05, strength=args.strength, regularizer=reg, momentum=0.2,
      milestones=(args.steps // 2,), steps_per_epoch=1,
  )

  def loss_fn(p, x, y):
    h = jax.nn.relu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    logits = h @ p["fc2"]["kernel"] + p["fc2"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(p, state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
    updates, state = opt.update(grads, state, p)
    return optax.apply_updates(p, updates), state, loss

  mesh = Mesh(np.array(jax.devices()), ("data",) if args.mode == "data" else ("model",))
  if args.mode == "data":
    p_specs = jax.tree.map(lambda _: P(), params)
    x_spec = P("data")
  else:
    p_specs = {
        "fc1": {"kernel": P(None, "model"), "bias": P("model")},  # groups cross shards
        "fc2": {"kernel": P("model", None), "bias": P()},
    }
    x_spec = P()
  p_shard = jax.tree.map(lambda s: NamedSharding(mesh, s), p_specs)
  host_params = jax.tree.map(np.array, params)  # the sharded copy's buffers are donated
  sharded_params = jax.device_put(params, p_shard)
  state = opt.init(sharded_params)  # eager init keeps each param's sharding
  xs, ys = (jax.device_put(a, NamedSharding(mesh, x_spec)) for a in (x, y))
  train = jax.jit(step, out_shardings=(p_shard, None, None), donate_argnums=(0, 1))

  t0 = time.perf_counter()
  p = sharded_params
  for i in range(args.steps):
    p, state, loss = train(p, state, xs, ys)
    if i % max(1, args.steps // 5) == 0 or i == args.steps - 1:
      print(f"step {i:4d}  loss {float(loss):.4f}")
  print(f"{n_dev} devices, mode {args.mode}: {time.perf_counter() - t0:.2f}s")
  print("fc1 kernel sharding:", p["fc1"]["kernel"].sharding)

  # Same steps on one device.
  single = jax.jit(step)
  q = jax.tree.map(jnp.asarray, host_params)
  s1 = opt.init(q)
  for _ in range(args.steps):
    q, s1, _ = single(q, s1, x, y)
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q)))
  print(f"max |multi-device - single-device| = {diff:.2e}")
  rep = optax_ramda.structure(p, reg)
  print(f"group sparsity {float(rep.group_sparsity):.3f}")


if __name__ == "__main__":
  main()
