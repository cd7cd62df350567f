"""2-D convolution in NHWC/HWIO layout, with a per-direction plan for the CPU backend.

`conv2d` is the only convolution the models call. On GPU and TPU it is `lax.conv_general_dilated`
unchanged. On CPU, XLA's convolution is slow in places its matrix product is not: every direction
at 2x2 to 4x4 pixels (VGG's last stages), the input gradient of strided and 1x1 convolutions, and,
while XLA hands convolutions to YNNPACK (see `jaxprune.ops.xla_cpu`, which turns that off on
``import jaxprune``), the kernel gradient. There `conv2d` writes that direction as one `jnp.dot`
over shifted copies of the input, and keeps XLA's convolution where it is not slower. The choice
is per direction and per shape; see `_cpu_plan`. Where the system's oneDNN is installed
(`jaxprune.ops.onednn`), the CPU plan runs the convolutions with few channels or a 1x1 window,
where XLA's kernels are slowest, on oneDNN in all three directions (`_onednn_wins`), and the
forward pass and input gradient of the 3x3, stride-1 ones from 24 channels by Winograd's
F(2x2, 3x3) algorithm (2.25x fewer multiplications; `jaxprune.ops.onednn`), keeping a direct
kernel gradient.

The three directions are tied together with `jax.custom_jvp`: the tangent rule is the product rule
``dy = conv(dx, w) + conv(x, dw)``, each term written with the implementation that is fastest for
the direction its transpose computes (the first term transposes to the input gradient, the second
to the kernel gradient). So `jax.grad` gets the chosen backward pass, and forward mode, `jax.vmap`
and forward-over-reverse (`jax.jvp` of `jax.grad`) work as for any JAX function.

Which implementation runs: ``conv2d(..., impl=...)``, else the innermost ``with conv_impl(...)``,
else the environment variable ``JAXPRUNE_CONV_IMPL``, else ``DEFAULT_IMPL`` (``"auto"``).
``"auto"`` is ``"xla"`` except on the CPU backend (`jax.default_backend()` at trace time).
"""

import contextlib
import dataclasses
import functools
import os
import threading
from collections.abc import Iterator
from typing import Literal, get_args

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jaxprune.ops import xla_cpu

ConvImpl = Literal["auto", "xla", "matmul", "onednn"]
"""``"xla"``: `lax.conv_general_dilated` in every direction. ``"matmul"``: matrix products in every
direction (for tests and benchmarks). ``"onednn"``: oneDNN in every direction (float32 on CPU; an
error where `jaxprune.ops.onednn` is not available). ``"auto"``: the per-shape CPU plan on CPU, else
``"xla"``."""

ENV_VAR = "JAXPRUNE_CONV_IMPL"
# "auto": the CPU plan on CPU (measured with experiments/bench_cpu.py, RESULTS.md section 3),
# XLA's convolution elsewhere. Set JAXPRUNE_CONV_IMPL=xla to get XLA's convolution on CPU too.
DEFAULT_IMPL: ConvImpl = "auto"

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
# Thresholds of `_cpu_plan` in output pixels (H_out * W_out), measured on the convolutions of CIFAR
# ResNet-56 and VGG-16 at batch 128 (experiments/bench_cpu.py): up to 4x4 the forward pass and input
# gradient are dots over im2col patches (XLA's convolution runs at 2-14 GFLOP/s at 1x1 and 2x2; at
# 4x4 XLA's own is faster alone, but VGG-16's inference was slower with it: RESULTS.md section 3);
# from 16x16 the kernel gradient, when not XLA's, uses the rowshift form.
_IM2COL_MAX_PIXELS = 16
_ROWSHIFT_MIN_PIXELS = 256
# oneDNN 2.6 (AVX2) against XLA's convolution on CIFAR ResNet-56 / VGG-16 shapes (RESULTS.md
# section 3): 1.0x to 10x faster in every direction with 3 to 32 channels on a side, and in every
# direction of the 1x1 convolutions; from 64 channels its forward pass is 3-17% slower.
_ONEDNN_MAX_NARROW_CHANNELS = 32
# 3x3 stride-1 layers with more channels than that, or from 24 channels when both counts are
# multiples of 8 (oneDNN's library then runs its own few-channel products), run their forward pass
# and input gradient by Winograd's F(2x2, 3x3): 1.4x-1.5x the speed of oneDNN's direct convolution
# at 32 channels, 1.5x-2.3x of XLA's at 64-512 (RESULTS.md section 3); at 16 channels it was not
# faster than oneDNN's direct convolution.
_WINOGRAD_MIN_CHANNELS = 24


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
      impl: which implementation; None: `conv_impl`, else ``$JAXPRUNE_CONV_IMPL``, else
        ``DEFAULT_IMPL``.

    Returns:
      f[N, (H + 2p - kh) // stride + 1, (W + 2p - kw) // stride + 1, C_out], dtype of ``x``.
    """
    if x.ndim != 4 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
        raise ValueError(
            f"expected x [N,H,W,C] and kernel [kh,kw,C,O]; got {x.shape}, {kernel.shape}"
        )
    stride, padding = int(stride), int(padding)
    chosen = _resolve_impl(impl)
    if chosen == "xla":
        return _xla_conv(x, kernel, stride, padding)
    if chosen == "matmul":
        return _conv(x, kernel, stride, padding, _matmul_plan(kernel.shape, stride))
    if chosen == "cpu_plan":
        winograd = _winograd_runs(x, kernel)
        plan = _cpu_plan(x.shape, kernel.shape, stride, padding, winograd=winograd)
        if plan.forward == "winograd" or not _onednn_wins(x, kernel):
            return _conv(x, kernel, stride, padding, plan)
    from jaxprune.ops import onednn  # imported on CPU only: it registers JAX primitives

    if chosen == "onednn":
        _require_onednn(x, kernel)
    return onednn.conv_forward(x, kernel, stride, padding)


# ----------------------------------------------------------------------------------------------
# Choosing the implementation.

_local = threading.local()


def _resolve_impl(impl: ConvImpl | None = None) -> Literal["xla", "matmul", "onednn", "cpu_plan"]:
    """What ``conv2d(..., impl=impl)`` traced now would run: ``"auto"`` resolved for the backend."""
    chosen = impl or getattr(_local, "impl", None) or os.environ.get(ENV_VAR, "") or DEFAULT_IMPL
    if chosen not in get_args(ConvImpl):
        raise ValueError(f"conv impl must be one of {get_args(ConvImpl)}, got {chosen!r}")
    if chosen == "auto":
        return "cpu_plan" if jax.default_backend() == "cpu" else "xla"
    return chosen


@contextlib.contextmanager
def conv_impl(impl: ConvImpl) -> Iterator[None]:
    """Within the block, `conv2d` calls traced without ``impl=`` use ``impl`` (this thread).

    The choice is made at trace time, and JAX caches traces per Python function: a function
    already traced (even under a new ``jax.jit`` wrapper) keeps the implementation it was traced
    with. To compare implementations in one process, trace a fresh function under each, e.g.
    ``jax.jit(lambda *a: step(*a))``.
    """
    if impl not in get_args(ConvImpl):
        raise ValueError(f"conv impl must be one of {get_args(ConvImpl)}, got {impl!r}")
    previous = getattr(_local, "impl", None)
    _local.impl = impl
    try:
        yield
    finally:
        _local.impl = previous


def _float32(x, kernel) -> bool:
    """The oneDNN library's convolutions take float32 operands only."""
    return x.dtype == jnp.float32 and kernel.dtype == jnp.float32


def _onednn_wins(x, kernel) -> bool:
    """Whether the CPU plan hands this convolution to oneDNN: float32, the library available, and
    at most `_ONEDNN_MAX_NARROW_CHANNELS` channels on one side or a 1x1 window."""
    from jaxprune.ops import onednn

    kh, kw, c_in, c_out = kernel.shape
    shape_wins = min(c_in, c_out) <= _ONEDNN_MAX_NARROW_CHANNELS or kh * kw == 1
    return shape_wins and _float32(x, kernel) and onednn.available()


def _winograd_runs(x, kernel) -> bool:
    """Whether this process can run the Winograd form on these operands: float32, oneDNN's library
    loaded, and a CPU with AVX2."""
    from jaxprune.ops import onednn

    return _float32(x, kernel) and onednn.winograd_supported()


def _require_onednn(x, kernel) -> None:
    from jaxprune.ops import onednn

    if not _float32(x, kernel):
        raise TypeError(f"conv impl 'onednn' takes float32, got {x.dtype} and {kernel.dtype}")
    reason = onednn.unavailable_reason()
    if reason:
        raise RuntimeError(f"conv impl 'onednn' is not available: {reason}")


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How each direction is computed. ``im2col``: one dot over all kh*kw shifted copies;
    ``rowshift``: one dot over kw column shifts, the kh row shifts moved to the other operand;
    ``winograd``: Winograd's F(2x2, 3x3) through `jaxprune.ops.onednn` (3x3, stride 1);
    ``onednn``: oneDNN's direct kernel gradient."""

    forward: Literal["xla", "im2col", "winograd"]
    input_grad: Literal["xla", "im2col", "winograd"]
    kernel_grad: Literal["xla", "im2col", "rowshift", "onednn"]


def _matmul_plan(kernel_shape, stride: int) -> _Plan:
    """No XLA convolution in any direction (``rowshift`` needs stride 1)."""
    rowshift = stride == 1 and kernel_shape[0] * kernel_shape[1] > 1
    return _Plan("im2col", "im2col", "rowshift" if rowshift else "im2col")


def _cpu_plan(
    x_shape,
    kernel_shape,
    stride: int,
    padding: int,
    ynn_off: bool | None = None,
    winograd: bool = False,
) -> _Plan:
    """Fastest combination per direction on XLA:CPU, from CIFAR ResNet-56 / VGG-16 measurements.

    ``ynn_off``: whether XLA runs its own convolutions rather than YNNPACK's (default:
    `xla_cpu.ynn_convolutions_off`, true after ``import jaxprune``). XLA's convolution keeps the
    forward pass, except at the smallest maps (`_IM2COL_MAX_PIXELS`), where it is up to 100x
    slower than a dot, and the input gradient of stride-1 convolutions with a real window (the
    strided and 1x1 ones are 1.3x-2.8x faster as dots). The kernel gradient is XLA's own when
    YNNPACK convolutions are off (1.4x-4x faster than the dots), else a dot (YNNPACK's kernel
    gradient is 2x-10x slower than them).

    ``winograd``: whether the Winograd form can run (`_winograd_runs`); if so, it computes the
    forward pass and input gradient of 3x3, stride-1 convolutions with padding up to 2 and more
    than `_ONEDNN_MAX_NARROW_CHANNELS` channels on both sides, or from `_WINOGRAD_MIN_CHANNELS`
    when both counts are multiples of 8; the kernel gradient of those narrow ones is oneDNN's.
    """
    if ynn_off is None:
        ynn_off = xla_cpu.ynn_convolutions_off()
    kh, kw, c_in, c_out = kernel_shape
    pixels = _out_size(x_shape[1], kh, stride, padding) * _out_size(x_shape[2], kw, stride, padding)
    small = pixels <= _IM2COL_MAX_PIXELS
    windowed = stride == 1 and kh * kw > 1
    if ynn_off:
        kernel_grad = "xla"
    elif windowed and pixels >= _ROWSHIFT_MIN_PIXELS and c_in >= 8:
        kernel_grad = "rowshift"
    else:
        kernel_grad = "im2col"
    wide = min(c_in, c_out) > _ONEDNN_MAX_NARROW_CHANNELS
    lanes = c_in % 8 == 0 and c_out % 8 == 0 and min(c_in, c_out) >= _WINOGRAD_MIN_CHANNELS
    if winograd and (wide or lanes):
        from jaxprune.ops import onednn

        if onednn.winograd_applies(kernel_shape, stride, padding):
            return _Plan("winograd", "winograd", kernel_grad if wide else "onednn")
    return _Plan(
        forward="im2col" if small else "xla",
        input_grad="xla" if windowed and not small else "im2col",
        kernel_grad=kernel_grad,
    )


# ----------------------------------------------------------------------------------------------
# The convolution with a per-direction custom JVP.


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _conv(x, kernel, stride, padding, plan):
    return _forward(x, kernel, stride, padding, plan.forward)


def _conv_jvp(stride, padding, plan, primals, tangents):
    x, kernel = primals
    dx, dkernel = tangents
    y = _conv(x, kernel, stride, padding, plan)
    # The transpose of the first term is the input gradient, of the second the kernel gradient.
    # Symbolic zeros (e.g. the images, never differentiated) skip their term.
    terms = []
    if not isinstance(dx, SymbolicZero):
        terms.append(_forward(dx, kernel, stride, padding, plan.input_grad))
    if not isinstance(dkernel, SymbolicZero):
        terms.append(_kernel_linear(x, dkernel, stride, padding, plan.kernel_grad))
    return y, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(y)


_conv.defjvp(_conv_jvp, symbolic_zeros=True)


def _forward(x, kernel, stride, padding, how):
    if how == "xla":
        return _xla_conv(x, kernel, stride, padding)
    if how == "winograd":
        from jaxprune.ops import onednn

        return onednn.conv_forward(x, kernel, stride, padding, winograd=True)
    return _im2col_conv(x, kernel, stride, padding)


# Saving the shifted copies of x for the backward pass would triple to ninefold the activation
# memory; recomputing them there costs one more pass over x.
@functools.partial(jax.checkpoint, static_argnums=(2, 3, 4))
def _kernel_linear(x, kernel, stride, padding, how):
    if how == "xla":
        return _xla_conv(x, kernel, stride, padding)
    if how == "rowshift":
        return _rowshift_conv(x, kernel, padding)
    if how == "onednn":
        from jaxprune.ops import onednn

        return onednn.conv_forward(x, kernel, stride, padding)
    return _im2col_conv(x, kernel, stride, padding)


def _xla_conv(x, kernel, stride, padding):
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=_DIMENSION_NUMBERS,
    )


# ----------------------------------------------------------------------------------------------
# Matrix-product forms. Their autodiff transposes are the backward passes wanted: the transpose of
# `_im2col_conv` in the kernel is patches^T @ dy and in x is col2im(dy @ W^T), and the transpose of
# `_rowshift_conv` in the kernel is one dot of the column shifts with the row-shifted dy.


def _out_size(size: int, k: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - k) // stride + 1


def _pad_hw(x, padding):
    return jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0))) if padding else x


def _dot_channels(a, b):
    """a[..., K] @ b[K, O] accumulated in float32 at least, result in a's dtype."""
    acc = jnp.promote_types(a.dtype, jnp.float32)
    out = lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())), preferred_element_type=acc)
    return out.astype(a.dtype)


def _im2col_conv(x, kernel, stride, padding):
    """[N,Ho,Wo,kh*kw*C] patches (one strided slice per tap) @ [kh*kw*C, O]."""
    kh, kw, c_in, c_out = kernel.shape
    n, h, w, _ = x.shape
    h_out, w_out = _out_size(h, kh, stride, padding), _out_size(w, kw, stride, padding)
    xp = _pad_hw(x, padding)
    taps = [
        lax.slice(
            xp,
            (0, i, j, 0),
            (n, i + stride * (h_out - 1) + 1, j + stride * (w_out - 1) + 1, c_in),
            (1, stride, stride, 1),
        )
        for i in range(kh)
        for j in range(kw)
    ]
    patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
    return _dot_channels(patches, kernel.reshape(kh * kw * c_in, c_out).astype(x.dtype))


def _rowshift_conv(x, kernel, padding):
    """Stride-1 convolution as one dot: [N,Hp,Wo,kw*C] column shifts @ [kw*C, kh*O], then the sum
    of the kh output blocks shifted by their row. Linear in ``kernel``; its transpose there is
    ``colshifts^T @ [dy shifted down by 0..kh-1 rows]``, a single dot with a 3x (not 9x) copy of x.
    """
    kh, kw, c_in, c_out = kernel.shape
    n, h, w, _ = x.shape
    h_out, w_out = _out_size(h, kh, 1, padding), _out_size(w, kw, 1, padding)
    xp = _pad_hw(x, padding)
    cols = [lax.slice(xp, (0, 0, j, 0), (n, h + 2 * padding, j + w_out, c_in)) for j in range(kw)]
    cols = cols[0] if kw == 1 else jnp.concatenate(cols, axis=-1)
    # [kh, kw, C, O] -> [(kw, C), (kh, O)]
    k_rows = kernel.transpose(1, 2, 0, 3).reshape(kw * c_in, kh * c_out).astype(x.dtype)
    z = _dot_channels(cols, k_rows)
    y = z[:, 0:h_out, :, 0:c_out]
    for i in range(1, kh):
        y = y + z[:, i : i + h_out, :, i * c_out : (i + 1) * c_out]
    return y
