"""Test configuration shared by every test module.

Eight virtual CPU devices let the cross-device tests run shard_map and pmap on
one machine; XLA reads the flag once, when jax starts, so it is set here,
before any test module imports jax.

``NORMJAX_TEST_PATHS=off-cpu pytest`` runs every test with the ops lowered as
they are off the CPU (a GPU's paths: the branch-free statistics wherever
there is no mask and no axis_name), on the CPU; the tests of the CPU's own
compiled programs skip then. The ``off_cpu_paths`` fixture does the same for
one test.
"""

import os
import types

import pytest

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

_PATHS = os.environ.get("NORMJAX_TEST_PATHS", "platform")
if _PATHS not in ("platform", "off-cpu"):
    raise ValueError(f"NORMJAX_TEST_PATHS must be 'platform' or 'off-cpu', got {_PATHS!r}")


@pytest.fixture
def off_cpu_paths(monkeypatch):
    """normjax's ``lax.platform_dependent`` takes its ``default`` (off-CPU)
    branch on every platform, for the duration of the test."""
    import jax

    import normjax as nj

    lax = types.SimpleNamespace(**vars(jax.lax))
    lax.platform_dependent = lambda *args, default, **per_platform: default(*args)
    monkeypatch.setattr(nj._stats, "lax", lax)
    nj._stats._standardize_op.cache_clear()  # ops traced with the CPU's paths
    yield
    nj._stats._standardize_op.cache_clear()


if _PATHS == "off-cpu":

    @pytest.fixture(autouse=True)
    def _every_test_off_cpu_paths(off_cpu_paths):
        yield
