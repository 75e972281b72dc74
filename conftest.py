import jax
import pytest

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
