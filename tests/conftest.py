"""Test-session setup: several host CPU devices (sharding tests), strict rank promotion."""
import os

# Must happen before JAX initialises its backends. Appended, so XLA_FLAGS already set by the
# caller (dumps, CPU options) keep working and the sharding tests still get their 8 devices.
_DEVICES = "--xla_force_host_platform_device_count"
_flags = os.environ.get("XLA_FLAGS", "")
if _DEVICES not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} {_DEVICES}=8".strip()

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
