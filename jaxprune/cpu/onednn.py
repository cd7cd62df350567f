"""oneDNN's convolutions in jitted JAX code on CPU: three JAX primitives over an XLA FFI library.

XLA:CPU's own convolution kernels are slow at the 3-32 channel widths of CIFAR ResNets, and its
kernel gradient is slow almost everywhere (RESULTS.md section 3). oneDNN, the library
behind PyTorch's CPU convolutions, is not. This module compiles `_onednn/conv.cc` (an XLA FFI
handler per direction) against the system's oneDNN (Debian/Ubuntu: ``apt-get install
libdnnl-dev``) and exposes the three directions of an NHWC/HWIO float32 convolution as primitives:

  ``conv_forward_p``          (x[N,H,W,C], w[kh,kw,C,O])  -> y[N,Ho,Wo,O]
  ``conv_backward_data_p``    (dy[N,Ho,Wo,O], w)          -> dx[N,H,W,C]
  ``conv_backward_weights_p`` (x, dy)                     -> dw[kh,kw,C,O]

The forward and input-gradient primitives take ``winograd=True`` for 3x3 windows at stride 1
(padding 0-2): then they run Winograd's F(2x2, 3x3) algorithm, 16 matrix products on transformed
2x2 output tiles (2.25x fewer multiplications than the direct convolution; AVX2 CPUs,
`winograd_supported`), equal to the direct form to float32 rounding (tested).

Each is bilinear in its two operands, and its transposes are the other two, so `jax.grad`,
`jax.jvp`, `jax.linearize` and their compositions (Hessian-vector products) stay on oneDNN to any
order. `jax.vmap` folds a mapped batch axis into N where that is exact (an unmapped kernel) and
otherwise runs XLA's convolution. Off CPU, or when the library is not loaded, each primitive lowers
to the XLA convolution it stands for.

The compiled library is cached in ``$JAXPRUNE_CACHE_DIR`` (default ``~/.cache/jaxprune``), keyed on
the source, jaxlib's version and the compiler; ``python -m jaxprune.cpu.onednn`` builds it ahead of
time (``install.sh`` does). ``JAXPRUNE_ONEDNN=0`` turns the library off.
"""

import ctypes
import functools
import hashlib
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

ENV_VAR = "JAXPRUNE_ONEDNN"
CACHE_ENV_VAR = "JAXPRUNE_CACHE_DIR"
SOURCE = Path(__file__).with_name("_onednn") / "conv.cc"
_TARGETS = {  # (direction, winograd) -> the FFI handler
    ("forward", False): "jaxprune_conv_fwd",
    ("backward_data", False): "jaxprune_conv_bwd_data",
    ("backward_weights", False): "jaxprune_conv_bwd_weights",
    ("forward", True): "jaxprune_conv_fwd_winograd",
    ("backward_data", True): "jaxprune_conv_bwd_data_winograd",
}
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


class BuildError(RuntimeError):
    """The oneDNN library could not be compiled or loaded; the message says why."""


# ----------------------------------------------------------------------------------------------
# Building and loading the library.


def cache_dir() -> Path:
    """Where compiled libraries are kept: ``$JAXPRUNE_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/jaxprune``, else ``~/.cache/jaxprune``."""
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxprune"


def _compile_command(output: Path, source: Path = SOURCE) -> list[str]:
    """The command that compiles ``source`` (the library's, or a variant of it) into ``output``."""
    compiler = shlex.split(os.environ.get("CXX", "c++"))
    return [
        *compiler, "-O2", "-std=c++20", "-fopenmp", "-shared", "-fPIC",
        "-I", jax.ffi.include_dir(), str(source), "-o", str(output), "-ldnnl",
    ]  # fmt: skip


def library_path() -> Path:
    """The cached library for this source, jaxlib and compiler (it may not exist yet)."""
    import jaxlib

    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(jaxlib.__version__.encode())
    key.update(" ".join(_compile_command(Path("out"))).encode())
    return cache_dir() / f"onednn-conv-{key.hexdigest()[:16]}.so"


def build(force: bool = False) -> Path:
    """Compiles the library into `library_path` unless it is there; returns its path.

    Written to a temporary file and renamed, so a failed or concurrent build never leaves a
    half-written library. Raises `BuildError` with the compiler's last lines.
    """
    path = library_path()
    if path.exists() and not force:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        partial = Path(tmp) / path.name
        try:
            result = subprocess.run(
                _compile_command(partial), capture_output=True, text=True, check=False
            )
        except FileNotFoundError as error:
            raise BuildError(f"no C++ compiler ({error.filename}); set CXX") from None
        if result.returncode != 0:
            tail = " | ".join(result.stderr.strip().splitlines()[-3:])
            hint = " (install oneDNN: apt-get install libdnnl-dev)" if "dnnl" in tail else ""
            raise BuildError(f"compiling {SOURCE.name} failed{hint}: {tail}")
        os.replace(partial, path)
    return path


_state: dict = {}


def load() -> ctypes.CDLL:
    """Builds if needed, loads the library and registers its FFI targets (once per process).

    Raises `BuildError` when it cannot, or when ``JAXPRUNE_ONEDNN=0``.
    """
    if "library" in _state:
        return _state["library"]
    if "error" in _state:
        raise _state["error"]
    try:
        if os.environ.get(ENV_VAR, "1") == "0":
            raise BuildError(f"turned off by {ENV_VAR}=0")
        library = ctypes.CDLL(str(build()))
        for target in _TARGETS.values():
            capsule = jax.ffi.pycapsule(getattr(library, target))
            jax.ffi.register_ffi_target(target, capsule, platform="cpu")
        library.jaxprune_onednn_version.restype = ctypes.c_char_p
    except (BuildError, OSError) as error:
        _state["error"] = error if isinstance(error, BuildError) else BuildError(str(error))
        raise _state["error"] from None
    for primitive, direction in _PRIMITIVES.items():
        _mark_as_needing_devices(primitive)
        mlir.register_lowering(primitive, _ffi_lowering(direction), platform="cpu")
    _state["library"] = library
    return library


def available() -> bool:
    """Whether the library is (or can be) built and loaded in this process."""
    try:
        load()
    except BuildError:
        return False
    return True


def unavailable_reason() -> str | None:
    """Why `available` is false, None when it is true."""
    try:
        load()
    except BuildError as error:
        return str(error)
    return None


def winograd_supported() -> bool:
    """Whether the library is loaded and the host runs its Winograd form (it needs AVX2 and FMA)."""
    return available() and bool(load().jaxprune_winograd_supported())


def version() -> str:
    """oneDNN's version as the loaded library reports it, e.g. ``"2.6.3"``."""
    return load().jaxprune_onednn_version().decode()


# ----------------------------------------------------------------------------------------------
# The primitives.


def _out_size(size: int, k: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - k) // stride + 1


def conv_forward(x, kernel, stride: int, padding: int, winograd: bool = False):
    """y = x (*) kernel; f32[N,H,W,C], f32[kh,kw,C,O] -> f32[N,Ho,Wo,O].

    ``winograd``: by Winograd's F(2x2, 3x3) algorithm (2.25x fewer multiplications; 3x3 windows,
    stride 1, padding 0-2, where `winograd_supported`), its input gradient too; else oneDNN's
    direct convolution."""
    return conv_forward_p.bind(
        x, kernel, stride=int(stride), padding=int(padding), winograd=bool(winograd)
    )


def conv_backward_data(
    dy, kernel, stride: int, padding: int, in_hw: tuple[int, int], winograd: bool = False
):
    """The input gradient: the transpose of `conv_forward` in x, for inputs of size ``in_hw``."""
    return conv_backward_data_p.bind(
        dy, kernel, stride=int(stride), padding=int(padding), in_hw=tuple(map(int, in_hw)),
        winograd=bool(winograd),
    )  # fmt: skip


def winograd_applies(kernel_shape, stride: int, padding: int) -> bool:
    """Whether the Winograd form computes this convolution: a 3x3 window, stride 1, padding 0-2."""
    return tuple(kernel_shape[:2]) == (3, 3) and stride == 1 and 0 <= padding <= 2


def conv_backward_weights(x, dy, stride: int, padding: int, kernel_hw: tuple[int, int]):
    """The kernel gradient: the transpose of `conv_forward` in the kernel, of size ``kernel_hw``."""
    return conv_backward_weights_p.bind(
        x, dy, stride=int(stride), padding=int(padding), kernel_hw=tuple(map(int, kernel_hw))
    )


conv_forward_p = Primitive("jaxprune_onednn_conv_forward")
conv_backward_data_p = Primitive("jaxprune_onednn_conv_backward_data")
conv_backward_weights_p = Primitive("jaxprune_onednn_conv_backward_weights")
_PRIMITIVES = {
    conv_forward_p: "forward",
    conv_backward_data_p: "backward_data",
    conv_backward_weights_p: "backward_weights",
}


def _check_operands(name, a, b):
    if a.ndim != 4 or b.ndim != 4:
        raise ValueError(f"{name}: expected 4-D operands, got {a.shape} and {b.shape}")
    if a.dtype != jnp.float32 or b.dtype != jnp.float32:
        raise TypeError(f"{name}: oneDNN convolutions take float32, got {a.dtype} and {b.dtype}")


def _check_winograd(name, kernel_shape, stride, padding, winograd):
    if winograd and not winograd_applies(kernel_shape, stride, padding):
        raise ValueError(
            f"{name}: the Winograd form takes a 3x3 window, stride 1 and padding 0-2; got "
            f"window {tuple(kernel_shape[:2])}, stride {stride}, padding {padding}"
        )


def _forward_abstract(x, kernel, *, stride, padding, winograd):
    _check_operands("conv_forward", x, kernel)
    _check_winograd("conv_forward", kernel.shape, stride, padding, winograd)
    n, h, w, _ = x.shape
    kh, kw, _, o = kernel.shape
    shape = (n, _out_size(h, kh, stride, padding), _out_size(w, kw, stride, padding), o)
    return jax.core.ShapedArray(shape, x.dtype)


def _backward_data_abstract(dy, kernel, *, stride, padding, in_hw, winograd):
    _check_operands("conv_backward_data", dy, kernel)
    _check_winograd("conv_backward_data", kernel.shape, stride, padding, winograd)
    return jax.core.ShapedArray((dy.shape[0], *in_hw, kernel.shape[2]), dy.dtype)


def _backward_weights_abstract(x, dy, *, stride, padding, kernel_hw):
    _check_operands("conv_backward_weights", x, dy)
    return jax.core.ShapedArray((*kernel_hw, x.shape[3], dy.shape[3]), x.dtype)


@functools.cache
def _jitted_bind(primitive, params: tuple):
    return jax.jit(functools.partial(primitive.bind, **dict(params)))


def _eager(primitive):
    """Outside `jax.jit` a primitive runs as its own small jitted computation."""
    return lambda *args, **params: _jitted_bind(primitive, tuple(sorted(params.items())))(*args)


for _primitive, _rule in [
    (conv_forward_p, _forward_abstract),
    (conv_backward_data_p, _backward_data_abstract),
    (conv_backward_weights_p, _backward_weights_abstract),
]:
    _primitive.def_impl(_eager(_primitive))
    _primitive.def_abstract_eval(_rule)


# What each primitive computes, written with XLA's convolution: the lowering off CPU (or without
# the library), the batching rule's fallback, and the reference the tests compare against.


def xla_forward(x, kernel, *, stride, padding, winograd=False):
    return lax.conv_general_dilated(
        x, kernel, (stride, stride), ((padding, padding), (padding, padding)),
        dimension_numbers=_DIMENSION_NUMBERS,
    )  # fmt: skip


def xla_backward_data(dy, kernel, *, stride, padding, in_hw, winograd=False):
    x_aval = jax.ShapeDtypeStruct((dy.shape[0], *in_hw, kernel.shape[2]), dy.dtype)
    forward = functools.partial(xla_forward, kernel=kernel, stride=stride, padding=padding)
    return jax.linear_transpose(forward, x_aval)(dy)[0]


def xla_backward_weights(x, dy, *, stride, padding, kernel_hw):
    kernel_aval = jax.ShapeDtypeStruct((*kernel_hw, x.shape[3], dy.shape[3]), x.dtype)
    forward = functools.partial(xla_forward, x, stride=stride, padding=padding)
    return jax.linear_transpose(forward, kernel_aval)(dy)[0]


_XLA = {
    conv_forward_p: xla_forward,
    conv_backward_data_p: xla_backward_data,
    conv_backward_weights_p: xla_backward_weights,
}


# Transposes. Each primitive is bilinear, <conv_forward(x, w), dy> = <x, backward_data(dy, w)> =
# <w, backward_weights(x, dy)>, so every transpose is one of the three.


def _hw(aval_or_array, start):
    return tuple(aval_or_array.aval.shape[start : start + 2])


def _forward_transpose_x(ct, x, kernel, *, stride, padding, winograd):
    return conv_backward_data(ct, kernel, stride, padding, _hw(x, 1), winograd)


def _forward_transpose_kernel(ct, x, kernel, *, stride, padding, winograd):
    return conv_backward_weights(x, ct, stride, padding, _hw(kernel, 0))


def _backward_data_transpose_dy(ct, dy, kernel, *, stride, padding, in_hw, winograd):
    return conv_forward(ct, kernel, stride, padding, winograd)


def _backward_data_transpose_kernel(ct, dy, kernel, *, stride, padding, in_hw, winograd):
    return conv_backward_weights(ct, dy, stride, padding, _hw(kernel, 0))


def _backward_weights_transpose_x(ct, x, dy, *, stride, padding, kernel_hw):
    return conv_backward_data(dy, ct, stride, padding, _hw(x, 1))


def _backward_weights_transpose_dy(ct, x, dy, *, stride, padding, kernel_hw):
    return conv_forward(x, ct, stride, padding)


ad.defbilinear(conv_forward_p, _forward_transpose_x, _forward_transpose_kernel)
ad.defbilinear(conv_backward_data_p, _backward_data_transpose_dy, _backward_data_transpose_kernel)
ad.defbilinear(
    conv_backward_weights_p, _backward_weights_transpose_x, _backward_weights_transpose_dy
)


# Batching: a mapped axis on the N-carrying operand alone (forward's x, backward_data's dy) folds
# into N; anything else (a mapped kernel, or backward_weights, which sums over N) maps XLA's form.


def _batch_rule(primitive, folds_first_operand: bool):
    def rule(args, dims, **params):
        a, b = args
        da, db = dims
        if folds_first_operand and db is None:
            a = jnp.moveaxis(a, da, 0)
            m, n = a.shape[:2]
            out = primitive.bind(a.reshape(m * n, *a.shape[2:]), b, **params)
            return out.reshape(m, n, *out.shape[1:]), 0
        in_axes = tuple(dims)
        fallback = functools.partial(_XLA[primitive], **params)
        return jax.vmap(fallback, in_axes=in_axes)(a, b), 0

    return rule


batching.primitive_batchers[conv_forward_p] = _batch_rule(conv_forward_p, True)
batching.primitive_batchers[conv_backward_data_p] = _batch_rule(conv_backward_data_p, True)
batching.primitive_batchers[conv_backward_weights_p] = _batch_rule(conv_backward_weights_p, False)


# Lowerings: XLA's convolution everywhere; on CPU the FFI call once `load` has registered it.

for _primitive, _xla in _XLA.items():
    mlir.register_lowering(_primitive, mlir.lower_fun(_xla, multiple_results=False))


# The CPU lowering. Under `jax.jit` over several devices (a ``"data"`` mesh), XLA's partitioner
# cannot see into a custom call and would gather every operand onto every device; the call is
# wrapped in `custom_partitioning` so that each device convolves its own rows of the batch (and
# the kernel gradient is summed over the batch axes). On one device, or inside `jax.shard_map`,
# the wrapper lowers to the plain call.

_RULES = {
    "forward": "n h w c, k l c o -> n i j o",
    "backward_data": "n i j o, k l c o -> n h w c",
    "backward_weights": "n h w c, n i j o -> k l c o",
}


def _local_call(direction, a, b, out_hw, stride, padding, winograd):
    if direction == "forward":
        shape = (a.shape[0], *out_hw, b.shape[3])
    elif direction == "backward_data":
        shape = (a.shape[0], *out_hw, b.shape[2])
    else:
        shape = (*out_hw, a.shape[3], b.shape[3])
    call = jax.ffi.ffi_call(_TARGETS[direction, winograd], jax.ShapeDtypeStruct(shape, a.dtype))
    return call(a, b, stride=np.int64(stride), padding=np.int64(padding))


def _batch_axes(shape_with_sharding):
    """The mesh axes the leading (batch) dimension is split over, or None."""
    sharding = shape_with_sharding.sharding
    spec = getattr(sharding, "spec", None)
    return spec[0] if spec else None


def _partitioned(direction: str):
    from jax.experimental.custom_partitioning import custom_partitioning
    from jax.sharding import NamedSharding, PartitionSpec

    sums_over_batch = direction == "backward_weights"

    @functools.partial(custom_partitioning, static_argnums=(2, 3, 4, 5))
    def call(a, b, out_hw, stride, padding, winograd):
        return _local_call(direction, a, b, out_hw, stride, padding, winograd)

    def result_sharding(mesh, batch):
        return NamedSharding(mesh, PartitionSpec() if sums_over_batch else PartitionSpec(batch))

    def infer(out_hw, stride, padding, winograd, mesh, arg_shapes, result_shape):
        return result_sharding(mesh, _batch_axes(arg_shapes[0]))

    def partition(out_hw, stride, padding, winograd, mesh, arg_shapes, result_shape):
        batch = _batch_axes(arg_shapes[0])
        rows = NamedSharding(mesh, PartitionSpec(batch))
        second = rows if sums_over_batch else NamedSharding(mesh, PartitionSpec())

        def lower(a, b):
            out = _local_call(direction, a, b, out_hw, stride, padding, winograd)
            return lax.psum(out, batch) if sums_over_batch and batch else out

        return mesh, lower, result_sharding(mesh, batch), (rows, second)

    def rule(out_hw, stride, padding, winograd, mesh, value_types, result_types):
        # Only the batch may stay split; every other dimension is gathered whole.
        factors = dict.fromkeys(_RULES[direction].replace("->", " ").replace(",", " ").split())
        whole = tuple(f for f in factors if f != "n")  # in order of appearance, as Shardy wants
        options = {"need_replication_factors": whole}
        if sums_over_batch:
            options["reduction_factors"] = ("n",)
        return _RULES[direction], options

    call.def_partition(partition=partition, infer_sharding_from_operands=infer, sharding_rule=rule)
    return call


def _mark_as_needing_devices(primitive) -> None:
    """JAX hands the device assignment to lowering rules only for primitives in this (private)
    set, and `custom_partitioning` needs it."""
    from jax._src import dispatch

    dispatch.prim_requires_devices_during_lowering.add(primitive)


def _ffi_lowering(direction: str):
    partitioned = _partitioned(direction)

    def run(a, b, *, stride, padding, winograd=False, **shape_params):
        out_hw = _result_hw(direction, a, b, stride, padding, shape_params)
        return partitioned(a, b, out_hw, stride, padding, winograd)

    return mlir.lower_fun(run, multiple_results=False)


def _result_hw(direction, a, b, stride, padding, shape_params):
    if direction == "forward":
        return (_out_size(a.shape[1], b.shape[0], stride, padding),
                _out_size(a.shape[2], b.shape[1], stride, padding))  # fmt: skip
    return shape_params["in_hw" if direction == "backward_data" else "kernel_hw"]


def main(argv: list[str]) -> int:
    """``python -m jaxprune.cpu.onednn``: build (or find) the library, load it, say where it is."""
    try:
        load()
    except BuildError as error:
        print(f"jaxprune.cpu.onednn: not available: {error}", file=sys.stderr)
        return 1
    winograd = "with" if winograd_supported() else "without (no AVX2)"
    print(f"jaxprune.cpu.onednn: oneDNN {version()} {winograd} Winograd, {library_path()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
