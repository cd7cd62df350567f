"""The two operations every model calls, behind one backend-neutral seam.

`conv2d` (NHWC/HWIO cross-correlation) and `materialize` (the identity) are what the models run.
By default they are `lax.conv_general_dilated` and ``x`` itself, on every backend. A speed layer
replaces them for the whole process by installing a `Backend` (`install`); the only one is
`jaxprune.cpu`, whose ``enable()`` installs its CPU convolution plan and XLA:CPU workaround. Nothing
in this module imports that layer.

Which implementation runs is read when a function is traced (by `jax.jit`, `jax.grad`, ...), not
when it runs: a function traced before `install` (or ``jaxprune.cpu.enable()``) keeps what it was
traced with, even under a new ``jax.jit`` wrapper; trace a fresh function (``jax.jit(lambda *a:
step(*a))``) to get the new one.

Per call: ``conv2d(..., impl=...)``, else the innermost ``with conv_impl(...)``, else
``$JAXPRUNE_CONV_IMPL``, else ``"auto"``. ``"xla"`` is always `lax.conv_general_dilated`;
``"auto"`` is the installed backend's choice; other names (``"matmul"``, ``"onednn"``) belong to
the installed backend, and the default backend refuses them.
"""

import contextlib
import dataclasses
import os
import threading
from collections.abc import Callable, Iterator
from typing import Literal, get_args

import jax
from jax import lax

ConvImpl = Literal["auto", "xla", "matmul", "onednn"]
"""``"xla"``: `lax.conv_general_dilated`. ``"auto"``: the installed backend's plan (plain
`lax.conv_general_dilated` by default). ``"matmul"``, ``"onednn"``: forms of the CPU layer
(`jaxprune.cpu`), for tests and benchmarks."""

ENV_VAR = "JAXPRUNE_CONV_IMPL"
DEFAULT_IMPL: ConvImpl = "auto"
DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def lax_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """`lax.conv_general_dilated` in NHWC/HWIO with a square stride and symmetric padding."""
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=DIMENSION_NUMBERS,
    )


@dataclasses.dataclass(frozen=True)
class Backend:
    """What the seam runs.

    Attributes:
      name: shown in messages.
      conv2d: ``(x, kernel, stride, padding, impl) -> y`` for every ``impl`` but ``"xla"``.
      materialize: ``x -> x`` in value and gradient.
    """

    name: str
    conv2d: Callable[[jax.Array, jax.Array, int, int, ConvImpl], jax.Array]
    materialize: Callable[[jax.Array], jax.Array]


def _lax_backend_conv(x, kernel, stride: int, padding: int, impl: ConvImpl) -> jax.Array:
    if impl != "auto":
        raise RuntimeError(
            f"conv impl {impl!r} is part of the CPU layer: call jaxprune.cpu.enable() first"
        )
    return lax_conv(x, kernel, stride, padding)


LAX = Backend("lax", _lax_backend_conv, lambda x: x)
"""The default: `lax.conv_general_dilated` and the identity."""

# The one mutable global of the seam: set only by `install` (``jaxprune.cpu.enable``/``disable``)
# and restored by `installed`.
_registry = {"backend": LAX}


def install(backend: Backend) -> Backend:
    """Makes ``backend`` what `conv2d` and `materialize` trace from now on; returns the previous."""
    previous, _registry["backend"] = _registry["backend"], backend
    return previous


def current() -> Backend:
    """The installed backend (`LAX` unless a speed layer was enabled)."""
    return _registry["backend"]


@contextlib.contextmanager
def installed(backend: Backend) -> Iterator[Backend]:
    """Within the block, ``backend`` is installed; the previous one is restored after it."""
    previous = install(backend)
    try:
        yield backend
    finally:
        install(previous)


_local = threading.local()


def resolve_impl(impl: ConvImpl | None = None) -> ConvImpl:
    """The ``impl`` a `conv2d` call traced now uses: argument, `conv_impl`, environment, default."""
    chosen = impl or getattr(_local, "impl", None) or os.environ.get(ENV_VAR, "") or DEFAULT_IMPL
    if chosen not in get_args(ConvImpl):
        raise ValueError(f"conv impl must be one of {get_args(ConvImpl)}, got {chosen!r}")
    return chosen


@contextlib.contextmanager
def conv_impl(impl: ConvImpl) -> Iterator[None]:
    """Within the block, `conv2d` calls traced without ``impl=`` use ``impl`` (this thread).

    Read at trace time: a function already traced keeps the implementation it was traced with.
    """
    if impl not in get_args(ConvImpl):
        raise ValueError(f"conv impl must be one of {get_args(ConvImpl)}, got {impl!r}")
    previous = getattr(_local, "impl", None)
    _local.impl = impl
    try:
        yield
    finally:
        _local.impl = previous


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    stride: int = 1,
    padding: int = 0,
    *,
    impl: ConvImpl | None = None,
) -> jax.Array:
    """Cross-correlation of ``x`` with ``kernel`` (the convention of every CNN framework).

    Args:
      x: f[N, H, W, C_in] input.
      kernel: f[kh, kw, C_in, C_out] filters.
      stride: the same stride along H and W.
      padding: zeros added on each side of H and W (PyTorch's ``padding=p``).
      impl: which implementation (see the module doc); None: `conv_impl`, else
        ``$JAXPRUNE_CONV_IMPL``, else ``"auto"``.

    Returns:
      f[N, (H + 2p - kh) // stride + 1, (W + 2p - kw) // stride + 1, C_out], dtype of ``x``.
    """
    if x.ndim != 4 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
        raise ValueError(
            f"expected x [N,H,W,C] and kernel [kh,kw,C,O]; got {x.shape}, {kernel.shape}"
        )
    stride, padding = int(stride), int(padding)
    chosen = resolve_impl(impl)
    if chosen == "xla":
        return lax_conv(x, kernel, stride, padding)
    return current().conv2d(x, kernel, stride, padding, chosen)


def materialize(x: jax.Array) -> jax.Array:
    """``x`` itself in value and gradient; the installed backend may keep XLA from recomputing it
    inside its consumers (the CPU layer does, for a ResNet's residual stream)."""
    return current().materialize(x)
