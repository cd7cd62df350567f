"""`jaxprune.ops.conv2d`: every implementation equals `lax.conv_general_dilated` in value and
gradients, under jit / vmap / forward-over-reverse, and the implementation switch works."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.ops import conv as conv_mod
from jaxprune.ops import onednn, xla_cpu
from jaxprune.ops.conv import conv2d, conv_impl

# oneDNN comes from the system (install.sh installs it); CI must have it, a developer may not.
needs_onednn = pytest.mark.skipif(
    not os.environ.get("CI") and not onednn.available(),
    reason=f"oneDNN not available: {onednn.unavailable_reason()}",
)
needs_winograd = pytest.mark.skipif(
    not os.environ.get("CI") and not onednn.winograd_supported(),
    reason="oneDNN's library or an AVX2 CPU is missing",
)

# (batch, height, width, c_in, c_out, kernel, stride, padding): every kernel size 1/3/5/7, stride
# 1/2, padding 0 and k//2, odd and even sizes, batch 1 and > 1 appear; not the full product.
CASES = [
    (2, 8, 8, 3, 4, 3, 1, 1),
    (1, 7, 9, 3, 5, 3, 1, 0),
    (2, 9, 8, 4, 3, 3, 2, 1),
    (3, 8, 7, 2, 3, 3, 2, 0),
    (2, 6, 6, 4, 6, 1, 1, 0),
    (1, 9, 7, 3, 2, 1, 2, 0),
    (2, 7, 8, 2, 3, 5, 1, 2),
    (1, 10, 10, 3, 2, 5, 2, 0),
    (2, 11, 9, 2, 3, 7, 2, 3),
    (1, 7, 7, 3, 2, 7, 1, 0),
    (2, 2, 2, 8, 8, 3, 1, 1),  # VGG's last stage: 2x2 pixels, padding larger than the output
    (1, 6, 5, 4, 3, 3, 1, 2),  # padding 2: the output larger than the input
]

# Every combination of the per-direction kernels, whatever the shape-based plans would choose.
PLANS = [
    conv_mod._Plan(forward, input_grad, kernel_grad)
    for forward in ("xla", "im2col")
    for input_grad in ("xla", "im2col")
    for kernel_grad in ("xla", "im2col", "rowshift")
]


def _inputs(case, seed=0, dtype=jnp.float32):
    n, h, w, c_in, c_out, k, _, _ = case
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, h, w, c_in)), dtype)
    kernel = jnp.asarray(rng.normal(size=(k, k, c_in, c_out)), dtype)
    return x, kernel


def _value_and_grads(conv, x, kernel, seed=1):
    y, vjp = jax.vjp(conv, x, kernel)
    dy = jnp.asarray(np.random.default_rng(seed).normal(size=y.shape), y.dtype)
    return (y, *vjp(dy))


def _assert_close(got, want, rtol=2e-5):
    for g, w in zip(got, want, strict=True):
        # float32 rounding of sums of products: relative to the largest magnitude.
        scale = float(jnp.max(jnp.abs(w))) or 1.0
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=rtol * scale)


def _reference(case):
    *_, stride, padding = case
    return lambda x, kernel: jax.lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        ((padding, padding),) * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


@pytest.mark.parametrize("impl", ["matmul", pytest.param("onednn", marks=needs_onednn)])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_value_and_gradients_match_lax_conv(case, impl):
    *_, stride, padding = case
    x, kernel = _inputs(case)
    want = _value_and_grads(_reference(case), x, kernel)
    conv = jax.jit(lambda x, kernel: conv2d(x, kernel, stride, padding, impl=impl))
    _assert_close(_value_and_grads(conv, x, kernel), want)


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: "-".join(vars(p).values()))
def test_every_direction_kernel_matches_lax_conv(plan):
    for case in [(2, 6, 7, 3, 4, 3, 1, 1), (1, 7, 6, 2, 3, 3, 2, 1)]:
        *_, stride, padding = case
        if plan.kernel_grad == "rowshift" and stride != 1:
            continue  # the rowshift form is stride-1 only; plans never pick it otherwise
        x, kernel = _inputs(case)
        conv = jax.jit(lambda x, kernel, s=stride, p=padding: conv_mod._conv(x, kernel, s, p, plan))
        _assert_close(
            _value_and_grads(conv, x, kernel), _value_and_grads(_reference(case), x, kernel)
        )


def test_cpu_plan_per_direction():
    Plan = conv_mod._Plan

    def plan(x_shape, kernel_shape, stride, padding, ynn_off):
        return conv_mod._cpu_plan(x_shape, kernel_shape, stride, padding, ynn_off=ynn_off)

    # YNNPACK's convolutions on (XLA's default): the kernel gradient is never XLA's.
    assert plan((128, 32, 32, 16), (3, 3, 16, 16), 1, 1, False) == Plan("xla", "xla", "rowshift")
    assert plan((128, 8, 8, 64), (3, 3, 64, 64), 1, 1, False) == Plan("xla", "xla", "im2col")
    assert plan((128, 32, 32, 16), (3, 3, 16, 32), 2, 1, False) == Plan("xla", "im2col", "im2col")
    assert plan((128, 32, 32, 16), (1, 1, 16, 32), 2, 0, False) == Plan("xla", "im2col", "im2col")
    assert plan((128, 2, 2, 512), (3, 3, 512, 512), 1, 1, False) == Plan(
        "im2col", "im2col", "im2col"
    )
    # Off (what `import jaxprune` arranges): XLA's own kernel gradient everywhere.
    assert plan((128, 32, 32, 16), (3, 3, 16, 16), 1, 1, True) == Plan("xla", "xla", "xla")
    assert plan((128, 32, 32, 16), (1, 1, 16, 32), 2, 0, True) == Plan("xla", "im2col", "xla")
    assert plan((128, 2, 2, 512), (3, 3, 512, 512), 1, 1, True) == Plan("im2col", "im2col", "xla")
    assert plan((128, 4, 4, 512), (3, 3, 512, 512), 1, 1, True) == Plan("im2col", "im2col", "xla")
    # With the Winograd form: 3x3, stride 1, padding <= 2, more than 32 channels on both sides.
    winograd = Plan("winograd", "winograd", "xla")
    for x_shape, kernel_shape, stride, padding, want in [
        ((128, 32, 32, 64), (3, 3, 64, 64), 1, 1, winograd),
        ((128, 2, 2, 512), (3, 3, 512, 512), 1, 1, winograd),
        ((128, 9, 9, 33), (3, 3, 33, 40), 1, 0, winograd),
        ((128, 8, 8, 48), (3, 3, 48, 40), 1, 2, winograd),
        # Narrower: from 24 channels with both counts multiples of 8, oneDNN's kernel gradient.
        ((128, 16, 16, 32), (3, 3, 32, 64), 1, 1, Plan("winograd", "winograd", "onednn")),
        ((128, 16, 16, 24), (3, 3, 24, 32), 1, 1, Plan("winograd", "winograd", "onednn")),
        ((128, 16, 16, 30), (3, 3, 30, 32), 1, 1, Plan("xla", "xla", "xla")),  # oneDNN's direct
        ((128, 32, 32, 16), (3, 3, 16, 16), 1, 1, Plan("xla", "xla", "xla")),  # oneDNN's direct
        ((128, 32, 32, 64), (3, 3, 64, 128), 2, 1, Plan("xla", "im2col", "xla")),
        ((128, 32, 32, 64), (5, 5, 64, 64), 1, 2, Plan("xla", "xla", "xla")),
        ((128, 32, 32, 64), (3, 3, 64, 64), 1, 3, Plan("xla", "xla", "xla")),
    ]:
        got = conv_mod._cpu_plan(x_shape, kernel_shape, stride, padding, True, winograd=True)
        assert got == want, (x_shape, kernel_shape, stride, padding)


def test_auto_follows_the_processes_ynn_setting(monkeypatch):
    x_shape, kernel_shape = (2, 16, 16, 8), (3, 3, 8, 4)
    for off, kernel_grad in [(True, "xla"), (False, "rowshift")]:
        monkeypatch.setitem(xla_cpu._state, "ynn_convolutions_off", off)
        assert conv_mod._cpu_plan(x_shape, kernel_shape, 1, 1).kernel_grad == kernel_grad


def test_auto_with_xla_forward_and_rowshift_kernel_gradient(monkeypatch):
    monkeypatch.setitem(xla_cpu._state, "ynn_convolutions_off", False)
    case = (2, 16, 16, 8, 4, 3, 1, 1)  # 256 output pixels: the plan with XLA forward + rowshift
    x, kernel = _inputs(case)
    assert conv_mod._cpu_plan(x.shape, kernel.shape, 1, 1).kernel_grad == "rowshift"
    conv = jax.jit(lambda x, kernel: conv2d(x, kernel, 1, 1, impl="auto"))
    _assert_close(_value_and_grads(conv, x, kernel), _value_and_grads(_reference(case), x, kernel))


# "matmul" runs the im2col forms; "auto" with 40 channels or more the Winograd forward pass and
# input gradient with XLA's kernel gradient (where oneDNN is not loaded: XLA's plan, at 2x2 pixels
# its im2col forms), at 24 -> 32 channels with oneDNN's kernel gradient; "onednn" oneDNN's direct
# primitives, stride 1 and 2.
IMPL_CASES = [
    ("matmul", (2, 6, 7, 3, 4, 3, 1, 1)),
    ("auto", (1, 2, 2, 40, 48, 3, 1, 1)),
    ("auto", (1, 16, 16, 40, 48, 3, 1, 1)),
    ("auto", (2, 5, 6, 24, 32, 3, 1, 1)),
    pytest.param("onednn", (2, 6, 7, 3, 4, 3, 1, 1), marks=needs_onednn),
    pytest.param("onednn", (2, 9, 8, 4, 3, 3, 2, 1), marks=needs_onednn),
]
IMPL_IDS = ["matmul", "auto-2px", "auto-16px", "auto-24ch", "onednn", "onednn-stride2"]


@pytest.mark.parametrize(("impl", "case"), IMPL_CASES, ids=IMPL_IDS)
def test_vmap_over_inputs_and_kernels(impl, case):
    *_, stride, padding = case
    xs = jnp.stack([_inputs(case, seed)[0] for seed in range(3)])
    kernels = jnp.stack([_inputs(case, seed)[1] for seed in range(3)])

    def loss(conv):
        return lambda x, kernel: jnp.sum(jnp.sin(conv(x, kernel, stride, padding)))

    fast = loss(lambda *a: conv2d(*a, impl=impl))
    ref = loss(lambda *a: conv2d(*a, impl="xla"))
    # (0, None): the mapped axis folds into oneDNN's batch; the others map XLA's convolution.
    for in_axes in [(0, 0), (None, 0), (0, None)]:
        args = (xs if in_axes[0] == 0 else xs[0], kernels if in_axes[1] == 0 else kernels[0])
        got = jax.jit(jax.vmap(jax.value_and_grad(fast, argnums=(0, 1)), in_axes))(*args)
        want = jax.vmap(jax.value_and_grad(ref, argnums=(0, 1)), in_axes)(*args)
        _assert_close(jax.tree.leaves(got), jax.tree.leaves(want))


@pytest.mark.parametrize(("impl", "case"), IMPL_CASES, ids=IMPL_IDS)
def test_forward_over_reverse_and_forward_mode(impl, case):
    # Importance criteria take Hessian-vector products as jax.jvp of jax.grad.
    *_, stride, padding = case
    x, kernel = _inputs(case)
    x_dir, kernel_dir = _inputs(case, seed=5)

    def loss(impl):
        def f(x, kernel):
            y = conv2d(x, kernel, stride, padding, impl=impl)
            return jnp.sum(jnp.tanh(y) ** 2)

        return f

    def hvp(impl):
        grad = jax.grad(loss(impl), argnums=(0, 1))
        return jax.jvp(grad, (x, kernel), (x_dir, kernel_dir))

    got = jax.jit(lambda: hvp(impl))()
    want = hvp("xla")
    _assert_close(jax.tree.leaves(got), jax.tree.leaves(want), rtol=1e-4)
    # Plain forward mode too (a custom_vjp would refuse it).
    got = jax.jvp(loss(impl), (x, kernel), (x_dir, kernel_dir))
    want = jax.jvp(loss("xla"), (x, kernel), (x_dir, kernel_dir))
    _assert_close(got, want, rtol=1e-4)


@pytest.mark.parametrize(("impl", "case"), IMPL_CASES[:3], ids=IMPL_IDS[:3])
def test_bfloat16(impl, case):
    *_, stride, padding = case
    x, kernel = _inputs(case, dtype=jnp.bfloat16)
    conv = jax.jit(lambda x, kernel: conv2d(x, kernel, stride, padding, impl=impl))
    got = _value_and_grads(conv, x, kernel)
    assert all(g.dtype == jnp.bfloat16 for g in got)
    want = _value_and_grads(_reference(case), x.astype(jnp.float32), kernel.astype(jnp.float32))
    _assert_close([g.astype(jnp.float32) for g in got], want, rtol=2e-2)


def _conv_primitives(impl, channels=(64, 48)):
    """(XLA convolutions, dots, oneDNN primitives) in the gradient's jaxpr, 16x16 pixels."""
    x, kernel = _inputs((2, 16, 16, *channels, 3, 1, 1))

    def loss(x, kernel):
        return jnp.sum(conv2d(x, kernel, 1, 1, impl=impl) ** 2)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, kernel)
    text = str(jaxpr)
    return text.count("conv_general_dilated"), text.count("dot_general"), text.count("onednn")


def test_switch_by_argument_context_and_environment(monkeypatch):
    assert _conv_primitives("xla")[1] == 0
    assert _conv_primitives("matmul")[0] == 0
    monkeypatch.setenv(conv_mod.ENV_VAR, "matmul")
    assert _conv_primitives(None)[0] == 0
    with conv_impl("xla"):  # the context wins over the environment
        assert _conv_primitives(None)[1] == 0
    assert _conv_primitives("xla")[1] == 0  # the argument wins over both
    monkeypatch.setenv(conv_mod.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="conv impl"):
        conv2d(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 1)))
    with pytest.raises(ValueError, match="conv impl"), conv_impl("fast"):
        pass


def test_auto_is_plain_lax_conv_off_cpu(monkeypatch):
    monkeypatch.setitem(xla_cpu._state, "ynn_convolutions_off", False)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert _conv_primitives("auto")[1] == 0
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    monkeypatch.setattr(conv_mod, "_winograd_runs", lambda x, kernel: False)  # XLA's plan
    n_conv, n_dot, _ = _conv_primitives("auto")
    assert n_dot > 0 and n_conv > 0  # XLA's forward/input gradient, a matmul kernel gradient
    monkeypatch.setitem(xla_cpu._state, "ynn_convolutions_off", True)
    assert _conv_primitives("auto")[1] == 0  # at 16x16 pixels XLA's own in every direction


def test_default_is_auto_and_the_environment_turns_it_off(monkeypatch):
    monkeypatch.delenv(conv_mod.ENV_VAR, raising=False)
    monkeypatch.setitem(xla_cpu._state, "ynn_convolutions_off", False)
    assert conv_mod.DEFAULT_IMPL == "auto"
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert _conv_primitives(None) == _conv_primitives("auto")
    assert _conv_primitives(None)[1] > 0  # the CPU plan's matmul kernel gradient
    monkeypatch.setenv(conv_mod.ENV_VAR, "xla")
    assert _conv_primitives(None)[1] == 0


@needs_onednn
def test_auto_hands_narrow_and_pointwise_convolutions_to_onednn_on_cpu(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    # 8 -> 4 channels: oneDNN in all three directions, no XLA convolution or dot.
    assert _conv_primitives("auto", channels=(8, 4)) == (0, 0, 3)
    # 64 -> 48, 3x3: Winograd forward and input gradient, XLA's kernel gradient.
    monkeypatch.setitem(xla_cpu._state, "ynn_convolutions_off", True)
    assert _conv_primitives("auto", channels=(64, 48)) == (1, 0, 2)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert _conv_primitives("auto", channels=(8, 4))[2] == 0  # never off CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    x, kernel = _inputs((1, 4, 4, 64, 48, 1, 1, 0))
    jaxpr = str(jax.make_jaxpr(lambda x, k: conv2d(x, k, 1, 0, impl="auto"))(x, kernel))
    assert "onednn" in jaxpr  # a 1x1 window, whatever the width
    # Other dtypes keep XLA's plan under "auto" and are refused by "onednn".
    x16, kernel16 = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    assert "onednn" not in str(jax.make_jaxpr(lambda *a: conv2d(*a, impl="auto"))(x16, kernel16))
    with pytest.raises(TypeError, match="float32"):
        conv2d(x16, kernel16, impl="onednn")


@needs_onednn
def test_onednn_second_order_stays_on_onednn():
    case = (2, 6, 7, 3, 4, 3, 2, 1)
    x, kernel = _inputs(case)

    def loss(impl):
        return lambda x, kernel: jnp.sum(jnp.tanh(conv2d(x, kernel, 2, 1, impl=impl)) ** 2)

    def hvp(impl):  # forward-over-reverse, as the importance criteria take it
        grad = jax.grad(loss(impl), argnums=(0, 1))
        return lambda *primals: jax.jvp(grad, primals, (x, kernel))[1]

    jaxpr = str(jax.make_jaxpr(hvp("onednn"))(x, kernel))
    assert "onednn" in jaxpr and "conv_general_dilated" not in jaxpr
    _assert_close(jax.jit(hvp("onednn"))(x, kernel), hvp("xla")(x, kernel), rtol=1e-4)
    # A full Hessian (vmapped over kernel directions: XLA's convolution for the mapped kernel).
    hessian = jax.hessian(loss("onednn"), argnums=1)
    _assert_close([jax.jit(hessian)(x, kernel)], [jax.hessian(loss("xla"), argnums=1)(x, kernel)])


@needs_onednn
def test_onednn_eagerly_and_its_cpu_lowering_is_the_ffi_call():
    case = (2, 6, 6, 4, 6, 1, 1, 0)
    x, kernel = _inputs(case)
    _assert_close([conv2d(x, kernel, impl="onednn")], [_reference(case)(x, kernel)])
    hlo = jax.jit(lambda x, k: conv2d(x, k, impl="onednn")).lower(x, kernel).as_text()
    assert "jaxprune_conv_fwd" in hlo and "convolution" not in hlo


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip


def test_without_onednn_auto_falls_back_and_onednn_says_why(tmp_path):
    code = """if True:
        import jax, jax.numpy as jnp
        from jaxprune.ops import conv2d, onednn
        x, k = jnp.ones((1, 5, 5, 3)), jnp.ones((3, 3, 3, 4))
        print(onednn.available(), onednn.unavailable_reason())
        print("onednn" in str(jax.make_jaxpr(lambda x, k: conv2d(x, k, impl="auto"))(x, k)))
        try:
            conv2d(x, k, impl="onednn")
        except RuntimeError as error:
            print(error)
    """
    done = _run_python(code, JAXPRUNE_ONEDNN="0", JAXPRUNE_CACHE_DIR=str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "False turned off by JAXPRUNE_ONEDNN=0"
    assert lines[1] == "False"  # "auto" runs XLA's plan
    assert lines[2] == "conv impl 'onednn' is not available: turned off by JAXPRUNE_ONEDNN=0"


def test_a_failed_build_leaves_no_library_behind(tmp_path, monkeypatch):
    monkeypatch.setenv(onednn.CACHE_ENV_VAR, str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails without output
    with pytest.raises(onednn.BuildError, match="compiling conv.cc failed"):
        onednn.build()
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(onednn.BuildError, match="no C\\+\\+ compiler"):
        onednn.build()
    # The cache key follows the compiler: another CXX, another library file.
    other = onednn.library_path()
    monkeypatch.setenv("CXX", "c++")
    assert onednn.library_path() != other


@needs_onednn
def test_prebuild_command_reports_the_library(tmp_path):
    done = _run_python(
        "from jaxprune.ops import onednn; raise SystemExit(onednn.main([]))",
        JAXPRUNE_CACHE_DIR=str(tmp_path),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("jaxprune.ops.onednn: oneDNN ")
    (library,) = tmp_path.glob("onednn-conv-*.so")
    assert str(library) in done.stdout


def _grad_over_eight_devices(impl, x_shape, kernel_shape, stride):
    """Value and gradients of a conv2d loss under `jax.jit` over 8 CPU devices (the batch split),
    in a subprocess: (largest error against XLA's, whether the program all-gathers, the lines
    of its oneDNN custom calls)."""
    code = f"""if True:
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from jaxprune.ops import conv2d
        mesh = Mesh(np.array(jax.devices()), ("data",))
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(size={x_shape}), jnp.float32)
        k = jnp.asarray(rng.normal(size={kernel_shape}), jnp.float32) / 10
        def loss(impl):
            return lambda x, k: jnp.sum(jnp.sin(conv2d(x, k, {stride}, 1, impl=impl)))
        grad = jax.jit(jax.value_and_grad(loss("{impl}"), argnums=(0, 1)))
        args = (jax.device_put(x, NamedSharding(mesh, P("data"))),
                jax.device_put(k, NamedSharding(mesh, P())))
        got = grad(*args)
        want = jax.value_and_grad(loss("xla"), argnums=(0, 1))(x, k)
        err = max(float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w)))
                  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
        hlo = grad.lower(*args).compile().as_text()
        assert len(jax.devices()) == 8
        print(err, "all-gather" in hlo)
        for line in hlo.splitlines():
            if 'custom_call_target="jaxprune_conv' in line:
                print(line)
    """
    done = _run_python(code, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    first = next(i for i, line in enumerate(lines) if line.split()[-1] in ("True", "False"))
    err, gathers = lines[first].split()
    return float(err), gathers == "True", lines[first + 1 :]


@needs_onednn
def test_onednn_under_jit_over_eight_devices_convolves_each_devices_rows():
    err, gathers, calls = _grad_over_eight_devices("onednn", (16, 8, 8, 4), (3, 3, 4, 6), 2)
    assert err < 2e-5 and not gathers
    assert len(calls) == 3  # forward, input gradient, kernel gradient
    # Each call that takes x sees 2 of the 16 rows.
    assert all("f32[2,8,8,4]" in line for line in calls if "conv_fwd" in line or "weights" in line)


# (batch, height, width, c_in, c_out, padding) of 3x3, stride-1 convolutions: padding 0-2, odd
# sizes, channel counts below, at and past a multiple of 8 (the AVX2 lanes and the tail), a 1x1
# and a 2x2 output, and 578 tiles (a block of 512 and a shorter one). Multiples of 8 up to 32
# take the library's few-channel products: 16 + 8 columns, and 578 tiles in blocks of 128.
WINOGRAD_CASES = [
    (2, 8, 8, 3, 4, 1),
    (1, 7, 9, 9, 11, 0),
    (2, 7, 8, 17, 8, 2),
    (2, 2, 2, 8, 16, 1),
    (3, 1, 1, 4, 4, 1),
    (2, 34, 34, 5, 3, 1),
    (2, 9, 7, 16, 24, 1),
    (2, 34, 34, 8, 32, 1),
]


@needs_winograd
@pytest.mark.parametrize("case", WINOGRAD_CASES, ids=str)
def test_winograd_matches_lax_conv_in_value_and_gradients(case):
    n, h, w, c_in, c_out, padding = case
    x, kernel = _inputs((n, h, w, c_in, c_out, 3, 1, padding))
    conv = jax.jit(lambda x, k: onednn.conv_forward(x, k, 1, padding, winograd=True))
    hlo = conv.lower(x, kernel).as_text()
    assert "jaxprune_conv_fwd_winograd" in hlo
    grad_hlo = jax.jit(jax.grad(lambda x, k: jnp.sum(conv(x, k)))).lower(x, kernel).as_text()
    assert "jaxprune_conv_bwd_data_winograd" in grad_hlo
    want = _value_and_grads(_reference((n, h, w, c_in, c_out, 3, 1, padding)), x, kernel)
    _assert_close(_value_and_grads(conv, x, kernel), want)


@needs_winograd
def test_winograd_refuses_what_it_cannot_compute():
    x, kernel = _inputs((1, 8, 8, 4, 4, 5, 1, 2))
    with pytest.raises(ValueError, match="3x3 window, stride 1 and padding 0-2"):
        onednn.conv_forward(x, kernel, 1, 2, winograd=True)
    x, kernel = _inputs((1, 8, 8, 4, 4, 3, 1, 1))
    with pytest.raises(ValueError, match="got window \\(3, 3\\), stride 2"):
        onednn.conv_forward(x, kernel, 2, 1, winograd=True)


@needs_winograd
def test_winograd_under_jit_over_eight_devices_convolves_each_devices_rows():
    err, gathers, calls = _grad_over_eight_devices("auto", (16, 6, 6, 40), (3, 3, 40, 36), 1)
    assert err < 2e-5 and not gathers
    assert len(calls) == 2  # Winograd's forward and input gradient; XLA's kernel gradient
    assert all("winograd" in line and "f32[2,6,6," in line for line in calls)
