"""Test-session setup: CPU only, and a persistent XLA compilation cache in a temporary directory.

Every `train()` call builds new jitted closures, so without it each end-to-end test (and each
`python -m g2rpo_jax.train` subprocess) recompiles the same rollout and update programs, about 20 s
each on 2 CPU cores; with it, an identical program compiles once per session. Set
JAX_COMPILATION_CACHE_DIR yourself to keep the cache between sessions.
"""

import atexit
import os
import shutil
import tempfile

# libtpu is installed for the TPU compile tests (requirements-test.txt); the tests run on the CPU
# and must not probe for TPU chips (subprocesses inherit this).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _cache = tempfile.mkdtemp(prefix="g2rpo_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache  # subprocesses inherit it
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                  int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))
