"""Moved to `jaxprune.cpu.allocator` (the opt-in CPU speed layer); this name stays importable and
sets nothing: `jaxprune.cpu.enable()` applies the settings."""

from jaxprune.cpu.allocator import (  # noqa: F401
    ALLOCATOR_ENV,
    GLIBC_SETTINGS,
    accelerator_plugin_installed,
    glibc_tuned,
    other_allocator_preloaded,
    should_tune_glibc,
    without_allocator_settings,
)
