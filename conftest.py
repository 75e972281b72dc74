import os
import subprocess
import sys

# XLA compilation is most of this suite's time: each test compiles its own small programs,
# and runs them on a few steps. XLA's older CPU fusion emitters (docs/performance.md, "XLA's
# CPU fusion emitters") and no LLVM optimization compile them in about a third of the
# time, and the suite runs in half the time; the numbers agree to round-off, far inside
# the tests' tolerances. The suite sets these flags for its own processes (xdist's workers
# and the example scripts inherit them) when this jaxlib knows them, since XLA aborts on
# an unknown flag, and leaves a user's own XLA_FLAGS alone. The sharded example runs with
# XLA's defaults, as the README's command does (``helpers.user_environment``): its
# devices' timing is what it tests.
TEST_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0"


def _xla_accepts(flags):
    probe = "import jax; jax.numpy.zeros(1).block_until_ready()"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    probed = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True)
    return probed.returncode == 0


if "XLA_FLAGS" not in os.environ and "PYTEST_XDIST_WORKER" not in os.environ:
    if _xla_accepts(TEST_XLA_FLAGS):
        os.environ["XLA_FLAGS"] = TEST_XLA_FLAGS
        os.environ["NUMPYRO_LDS_TEST_XLA_FLAGS"] = TEST_XLA_FLAGS

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_code():
    """Drop compiled executables after each module.

    Every XLA executable holds a few memory mappings; a suite compiling thousands of them
    in one process reaches the kernel's ``vm.max_map_count`` (65 530) and crashes in the
    compiler. Clearing JAX's caches releases them.
    """
    yield
    jax.clear_caches()
