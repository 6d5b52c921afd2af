"""Test configuration shared by every test module.

Eight virtual CPU devices let the cross-device tests run shard_map and pmap on
one machine; XLA reads the flag once, when jax starts, so it is set here,
before any test module imports jax.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
