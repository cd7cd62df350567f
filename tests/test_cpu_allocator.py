"""`jaxprune.cpu.allocator`: when `jaxprune.cpu.enable()` tunes glibc's malloc, and that only it
does (in fresh processes: malloc settings are per process). How many page faults that saves is a
fact of the machine, measured by ``experiments/bench_cpu.py`` (its malloc section), not here."""

import os
import platform
import subprocess
import sys

import pytest

from jaxprune.cpu import allocator


@pytest.mark.parametrize(
    "environ, libc, tuned",
    [
        ({}, "glibc", True),
        ({"JAX_PLATFORMS": "cpu"}, "glibc", True),
        ({"JAX_PLATFORMS": "cuda,cpu"}, "glibc", False),  # the step's buffers live on the GPU
        ({"JAX_PLATFORMS": "tpu"}, "glibc", False),
        ({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}, "glibc", True),
        ({"LD_PRELOAD": "/usr/lib/libfoo.so"}, "glibc", True),  # not an allocator
        ({}, "", False),  # musl or unknown: mallopt's parameters may differ
        ({allocator.ALLOCATOR_ENV: "system"}, "glibc", False),
        ({"MALLOC_ARENA_MAX": "4"}, "glibc", False),  # the user's own settings are kept
        ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "glibc", False),
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "glibc", False),
        ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"}, "glibc", False),
        ({"LD_PRELOAD": "libfoo.so:libjemalloc.so.2"}, "glibc", False),
    ],
)
def test_when_glibc_is_tuned(environ, libc, tuned):
    assert allocator.should_tune_glibc(environ, libc, accelerator_installed=False) is tuned


@pytest.mark.parametrize("platforms, tuned", [(None, False), ("cpu", True), ("cuda", False)])
def test_an_installed_accelerator_leaves_malloc_alone_unless_jax_is_told_cpu(platforms, tuned):
    environ = {} if platforms is None else {"JAX_PLATFORMS": platforms}
    assert allocator.should_tune_glibc(environ, "glibc", accelerator_installed=True) is tuned


# Prints whether glibc is tuned after ``import jaxprune`` and a convolution (never), then after
# `enable` (which must run before the backend starts: a fresh process that enables first).
PROBE = """
import sys
import jaxprune, jaxprune.cpu
from jaxprune.cpu import allocator
enable_first = sys.argv[1] == "enable"
if enable_first:
    status = jaxprune.cpu.enable()
import jax.numpy as jnp
jaxprune.ops.conv2d(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2)))
print(allocator.glibc_tuned(), status.glibc_tuned if enable_first else "-")
"""


def _probe(how: str, **env) -> list[str]:
    inherited = allocator.without_allocator_settings(os.environ)
    return subprocess.run(
        [sys.executable, "-c", PROBE, how],
        env={**inherited, "JAX_PLATFORMS": "cpu", **env},  # CPU also where a GPU is installed
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_only_enable_tunes_glibc_and_the_opt_out_is_kept():
    assert _probe("import") == ["False", "-"]
    assert _probe("enable") == ["True", "True"]
    assert _probe("enable", **{allocator.ALLOCATOR_ENV: "system"}) == ["False", "False"]


@pytest.mark.slow  # a fresh process
def test_the_old_module_name_stays_importable_and_sets_nothing():
    done = subprocess.run(
        [sys.executable, "-c", "from jaxprune import allocator as a; print(a.glibc_tuned())"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert done.stdout.split() == ["False"]
