"""glibc's malloc settings that keep XLA:CPU's per-step buffers mapped.

With glibc's defaults, XLA:CPU's worker threads allocate their large buffers in per-thread arenas,
which hand freed memory back to the kernel; every train step then maps it afresh, one minor page
fault per 4 KiB page, hundreds of thousands per CIFAR ResNet-56 train step; without them the
step runs markedly faster (RESULTS.md section 3, "Page faults and the memory allocator"). One
arena, with large blocks served from the heap and the heap never trimmed, keeps the pages: no
faults.

`configure` (run by `jaxprune.cpu.enable`, before XLA starts its threads) sets that through
``mallopt`` in the running process, the equivalent of starting it with ``MALLOC_ARENA_MAX=1
MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647``. The price is memory: freed
memory stays with the process for reuse instead of going back to the system. It does nothing when
``JAXPRUNE_ALLOCATOR=system``, when the user set any ``MALLOC_*`` variable or a ``glibc.malloc``
tunable (theirs are kept), when another allocator is preloaded (the ``jaxprune`` command runs under
tcmalloc, which keeps freed memory itself), when the C library is not glibc, or when JAX will
compute on an accelerator (``JAX_PLATFORMS`` names another platform first, or, unset, a GPU/TPU
plugin is installed): there the step's buffers live on the device, and one arena could slow a
threaded input pipeline on the host. Only the speed changes, never a result.
"""

import ctypes
import importlib.metadata
import importlib.util
import os
import platform
from collections.abc import Mapping

ALLOCATOR_ENV = "JAXPRUNE_ALLOCATOR"
"""``system``: leave the allocator alone (no settings here, no tcmalloc for the CLI)."""

# mallopt(3) parameters (glibc's malloc.h) and the values set.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
GLIBC_SETTINGS = {
    M_ARENA_MAX: 1,  # XLA's threads share the main arena, whose freed memory stays mapped
    M_MMAP_THRESHOLD: 1 << 30,  # blocks under 1 GiB come from the heap, not a fresh mapping
    M_TRIM_THRESHOLD: 2**31 - 1,  # the heap is not shrunk (mallopt takes a C int)
}

_state = {"glibc_tuned": False}


def glibc_tuned() -> bool:
    """Whether `configure` applied `GLIBC_SETTINGS` in this process."""
    return _state["glibc_tuned"]


def other_allocator_preloaded(environ: Mapping[str, str]) -> bool:
    """Whether ``LD_PRELOAD`` names a malloc replacement (tcmalloc, jemalloc, mimalloc, ...)."""
    preloaded = environ.get("LD_PRELOAD", "").replace(" ", ":").split(":")
    return any("malloc" in os.path.basename(path) for path in preloaded if path)


def accelerator_plugin_installed() -> bool:
    """Whether JAX can find a GPU or TPU backend: a ``jax_plugins`` entry point or libtpu."""
    plugins = importlib.metadata.entry_points(group="jax_plugins")
    return bool(plugins) or importlib.util.find_spec("libtpu") is not None


def without_allocator_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` less everything that picks or tunes an allocator (``MALLOC_*``, ``LD_PRELOAD``,
    ``JAXPRUNE_ALLOCATOR``): the base environment of a child process that sets its own."""
    return {
        k: v
        for k, v in environ.items()
        if not k.startswith("MALLOC_") and k not in ("LD_PRELOAD", ALLOCATOR_ENV)
    }


def should_tune_glibc(
    environ: Mapping[str, str], libc_name: str, accelerator_installed: bool
) -> bool:
    """Whether `configure` sets `GLIBC_SETTINGS`, given the environment, the C library's name
    (``platform.libc_ver()[0]``: ``"glibc"`` on glibc systems) and whether a GPU/TPU plugin is
    installed (`accelerator_plugin_installed`)."""
    if libc_name != "glibc" or environ.get(ALLOCATOR_ENV) == "system":
        return False
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms.split(",")[0].strip() not in ("cpu", "") or (
        not platforms and accelerator_installed
    ):
        return False
    users_own = any(key.startswith("MALLOC_") for key in environ)
    users_own |= "glibc.malloc." in environ.get("GLIBC_TUNABLES", "")
    return not users_own and not other_allocator_preloaded(environ)


def would_tune(environ: Mapping[str, str] | None = None) -> bool:
    """Whether `configure` would set `GLIBC_SETTINGS` in this process (`should_tune_glibc`)."""
    environ = os.environ if environ is None else environ
    libc_name = platform.libc_ver()[0]
    return should_tune_glibc(
        environ, libc_name, libc_name == "glibc" and accelerator_plugin_installed()
    )


def configure(environ: Mapping[str, str] | None = None) -> bool:
    """Applies `GLIBC_SETTINGS` to this process's malloc if `should_tune_glibc`; returns whether
    they are in effect. Call before XLA starts its threads (`jaxprune.cpu.enable` does)."""
    if not _state["glibc_tuned"] and would_tune(environ):
        mallopt = ctypes.CDLL(None).mallopt
        mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        # mallopt returns 1 on success; a refused setting leaves glibc's default for it.
        _state["glibc_tuned"] = all(mallopt(p, v) == 1 for p, v in GLIBC_SETTINGS.items())
    return _state["glibc_tuned"]
