"""Private implementation modules of optax_ramda."""
