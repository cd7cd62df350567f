"""`jaxprune.allocator`: when ``import jaxprune`` tunes glibc's malloc, and that it removes the
page faults of a train step (in fresh processes: malloc settings are per process)."""

import os
import platform
import subprocess
import sys

import pytest

from jaxprune import allocator


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


# A narrow ResNet-20 gradient at batch 64: XLA's threads free and re-allocate ~1 MiB buffers;
# printed: whether tuned, and the median page faults of a call.
PROBE = """
import dataclasses, resource, jax, jax.numpy as jnp, optax
import jaxprune as jp
widths = (8, 16, 32)
arch = dataclasses.replace(jp.models.create("resnet20"), stem_width=8, stage_widths=widths,
                           inner_widths=tuple(((w,),) * 3 for w in widths))
model = arch.module()
x = jnp.ones((64, *arch.input_shape))
v = model.init(jax.random.key(0), x[:1], train=False)
def loss(p):
    logits, _ = model.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True,
                            mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.zeros(64, int)).mean()
grad = jax.jit(jax.grad(loss))
jax.block_until_ready(grad(v["params"]))
faults = []
for _ in range(7):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(grad(v["params"]))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(jp.allocator.glibc_tuned(), sorted(faults)[3])
"""


def _probe(**env) -> tuple[str, int]:
    inherited = allocator.without_allocator_settings(os.environ)
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**inherited, "JAX_PLATFORMS": "cpu", **env},  # CPU also where a GPU is installed
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_import_removes_the_page_faults_of_a_train_step():
    tuned, tuned_faults = _probe()
    untouched, faults = _probe(**{allocator.ALLOCATOR_ENV: "system"})
    assert (tuned, untouched) == ("True", "False")
    # Median over calls; measured: 0 vs ~20.7k faults per call (each a 4 KiB page mapped afresh).
    # Tuned, an occasional call still faults while the heap grows to its steady size.
    assert tuned_faults < 1000 and faults > 5000, (tuned_faults, faults)
