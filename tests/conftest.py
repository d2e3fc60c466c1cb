"""Test configuration: 8 simulated CPU devices, hypothesis profile for CI."""

import os

# Must happen before any JAX backend is initialised.
os.environ.setdefault("XLA_FLAGS", "")
import jax

jax.config.update("jax_num_cpu_devices", 8)

try:
  from hypothesis import HealthCheck, settings

  # CI is derandomized so a run is reproducible; HYPOTHESIS_PROFILE=explore
  # draws fresh examples (use it when changing a solver).
  settings.register_profile(
      "ci", max_examples=40, deadline=None, derandomize=True,
      suppress_health_check=[HealthCheck.too_slow],
  )
  settings.register_profile(
      "explore", max_examples=200, deadline=None,
      suppress_health_check=[HealthCheck.too_slow],
  )
  settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # pragma: no cover
  pass

import pathlib  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
