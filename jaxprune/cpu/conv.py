"""The CPU layer's convolution: each direction computed by the form its plan chooses.

XLA:CPU's convolution is slow in places its matrix product or oneDNN is not: every direction at
2x2 to 4x4 pixels, the input gradient of strided and 1x1 convolutions, everything at 3-32 channels,
and (while XLA hands convolutions to YNNPACK, see `jaxprune.cpu.xla_cpu`) the kernel gradient.
Each direction of a convolution (forward pass, input gradient, kernel gradient) therefore runs one
of these forms (`Form`):

- ``xla``: `lax.conv_general_dilated`;
- ``im2col``: one dot over all kh*kw shifted copies of the input;
- ``rowshift``: (kernel gradient, stride 1) one dot over kw column shifts, the kh row shifts moved
  to the other operand;
- ``onednn``: oneDNN's direct convolution (`jaxprune.cpu.onednn`, float32);
- ``winograd``: (forward pass, input gradient; 3x3, stride 1) Winograd's F(2x2, 3x3) in the same
  library.

`jaxprune.cpu.plan` picks the form per direction and shape. The three directions are tied together
with `jax.custom_jvp`: the tangent rule is the product rule ``dy = conv(dx, w) + conv(x, dw)``, each
term written with the form chosen for the direction its transpose computes (the first term
transposes to the input gradient, the second to the kernel gradient). So `jax.grad` gets the chosen
backward pass, and forward mode, `jax.vmap` and forward-over-reverse work as for any JAX function.
The gradients' forms are chosen when the tangent rule is traced, i.e. only when a function is
differentiated.
"""

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jaxprune.cpu import onednn
from jaxprune.ops.conv import ConvImpl, lax_conv

Direction = Literal["forward", "input_grad", "kernel_grad"]
DIRECTIONS: tuple[Direction, ...] = ("forward", "input_grad", "kernel_grad")
Form = Literal["xla", "im2col", "rowshift", "onednn", "winograd"]


def conv2d(x, kernel, stride: int, padding: int, impl: ConvImpl, planner) -> jax.Array:
    """The CPU layer's `jaxprune.ops.conv2d` for ``impl`` in ``auto``/``matmul``/``onednn``.

    ``auto`` asks ``planner`` (a `jaxprune.cpu.plan.Planner`) for each direction's form on the CPU
    backend and is `lax.conv_general_dilated` on others (`jax.default_backend()` at trace time).
    ``matmul``: dots in every direction; ``onednn``: oneDNN in every direction (float32; an error
    where the library is not available).
    """
    if impl == "onednn":
        require_onednn(x, kernel)
        return onednn.conv_forward(x, kernel, stride, padding)
    if impl == "matmul":
        return _conv(x, kernel, stride, padding, matmul_forms(kernel.shape, stride))
    if jax.default_backend() != "cpu":
        return lax_conv(x, kernel, stride, padding)
    from jaxprune.cpu.plan import ConvShape  # the plan imports this module's forms

    return _conv(x, kernel, stride, padding, planner.bind(ConvShape.of(x, kernel, stride, padding)))


def float32(x, kernel) -> bool:
    """The oneDNN library's convolutions take float32 operands only."""
    return x.dtype == jnp.float32 and kernel.dtype == jnp.float32


def require_onednn(x, kernel) -> None:
    if not float32(x, kernel):
        raise TypeError(f"conv impl 'onednn' takes float32, got {x.dtype} and {kernel.dtype}")
    reason = onednn.unavailable_reason()
    if reason:
        raise RuntimeError(f"conv impl 'onednn' is not available: {reason}")


@dataclasses.dataclass(frozen=True)
class FixedForms:
    """One form per direction, whatever the shape (hashable: `_conv`'s static argument, as is a
    `jaxprune.cpu.plan.Planner` bound to one shape)."""

    forward: Form
    input_grad: Form
    kernel_grad: Form

    def form(self, direction: Direction) -> Form:
        return getattr(self, direction)


def matmul_forms(kernel_shape, stride: int) -> FixedForms:
    """No XLA convolution in any direction (``rowshift`` needs stride 1)."""
    rowshift = stride == 1 and kernel_shape[0] * kernel_shape[1] > 1
    return FixedForms("im2col", "im2col", "rowshift" if rowshift else "im2col")


# ----------------------------------------------------------------------------------------------
# The convolution with a per-direction custom JVP. ``forms`` is static: anything with
# ``form(direction) -> Form``, hashable (`FixedForms`, or a planner bound to one shape).


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _conv(x, kernel, stride, padding, forms):
    return forward(x, kernel, stride, padding, forms.form("forward"))


def _conv_jvp(stride, padding, forms, primals, tangents):
    x, kernel = primals
    dx, dkernel = tangents
    y = _conv(x, kernel, stride, padding, forms)
    # The transpose of the first term is the input gradient, of the second the kernel gradient.
    # Symbolic zeros (e.g. the images, never differentiated) skip their term.
    terms = []
    if not isinstance(dx, SymbolicZero):
        terms.append(forward(dx, kernel, stride, padding, forms.form("input_grad")))
    if not isinstance(dkernel, SymbolicZero):
        terms.append(kernel_linear(x, dkernel, stride, padding, forms.form("kernel_grad")))
    return y, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(y)


_conv.defjvp(_conv_jvp, symbolic_zeros=True)


def forward(x, kernel, stride: int, padding: int, form: Form) -> jax.Array:
    """``x (*) kernel`` by ``form``; linear in ``x``, so its transpose there is the input gradient
    by the same form."""
    if form == "xla":
        return lax_conv(x, kernel, stride, padding)
    if form in ("onednn", "winograd"):
        return onednn.conv_forward(x, kernel, stride, padding, winograd=form == "winograd")
    if form == "im2col":
        return _im2col_conv(x, kernel, stride, padding)
    raise ValueError(f"no forward form {form!r}")


# Saving the shifted copies of x for the backward pass would triple to ninefold the activation
# memory; recomputing them there costs one more pass over x.
@functools.partial(jax.checkpoint, static_argnums=(2, 3, 4))
def kernel_linear(x, kernel, stride: int, padding: int, form: Form) -> jax.Array:
    """``x (*) kernel`` by ``form``, linear in ``kernel``: its transpose there is the kernel
    gradient by that form."""
    if form == "xla":
        return lax_conv(x, kernel, stride, padding)
    if form == "rowshift":
        return _rowshift_conv(x, kernel, padding)
    if form == "onednn":
        return onednn.conv_forward(x, kernel, stride, padding)
    if form == "im2col":
        return _im2col_conv(x, kernel, stride, padding)
    raise ValueError(f"no kernel-gradient form {form!r}")


# ----------------------------------------------------------------------------------------------
# Matrix-product forms. Their autodiff transposes are the backward passes wanted: the transpose of
# `_im2col_conv` in the kernel is patches^T @ dy and in x is col2im(dy @ W^T), and the transpose of
# `_rowshift_conv` in the kernel is one dot of the column shifts with the row-shifted dy.


def out_size(size: int, k: int, stride: int, padding: int) -> int:
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
    h_out, w_out = out_size(h, kh, stride, padding), out_size(w, kw, stride, padding)
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
    h_out, w_out = out_size(h, kh, 1, padding), out_size(w, kw, 1, padding)
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
