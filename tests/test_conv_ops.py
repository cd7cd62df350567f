"""`jaxprune.ops.conv2d`: every implementation equals `lax.conv_general_dilated` in value and
gradients, under jit / vmap / forward-over-reverse, and the implementation switch works."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.ops import conv as conv_mod
from jaxprune.ops import xla_cpu
from jaxprune.ops.conv import conv2d, conv_impl

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


@pytest.mark.parametrize("case", CASES, ids=str)
def test_value_and_gradients_match_lax_conv(case):
    *_, stride, padding = case
    x, kernel = _inputs(case)
    want = _value_and_grads(_reference(case), x, kernel)
    conv = jax.jit(lambda x, kernel: conv2d(x, kernel, stride, padding, impl="matmul"))
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


# "matmul" runs the im2col forms; "auto" at 2x2 pixels the im2col forward and input gradient with
# XLA's kernel gradient (YNNPACK convolutions off, as `import jaxprune` arranges), at 16x16 XLA's.
IMPL_CASES = [
    ("matmul", (2, 6, 7, 3, 4, 3, 1, 1)),
    ("auto", (1, 2, 2, 8, 4, 3, 1, 1)),
    ("auto", (1, 16, 16, 8, 4, 3, 1, 1)),
]
IMPL_IDS = ["matmul", "auto-2px", "auto-16px"]


@pytest.mark.parametrize(("impl", "case"), IMPL_CASES, ids=IMPL_IDS)
def test_vmap_over_inputs_and_kernels(impl, case):
    xs = jnp.stack([_inputs(case, seed)[0] for seed in range(3)])
    kernels = jnp.stack([_inputs(case, seed)[1] for seed in range(3)])

    def loss(conv):
        return lambda x, kernel: jnp.sum(jnp.sin(conv(x, kernel, 1, 1)))

    fast = loss(lambda *a: conv2d(*a, impl=impl))
    ref = loss(lambda *a: conv2d(*a, impl="xla"))
    for in_axes in [(0, 0), (None, 0)]:
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


@pytest.mark.parametrize(("impl", "case"), IMPL_CASES, ids=IMPL_IDS)
def test_bfloat16(impl, case):
    *_, stride, padding = case
    x, kernel = _inputs(case, dtype=jnp.bfloat16)
    conv = jax.jit(lambda x, kernel: conv2d(x, kernel, stride, padding, impl=impl))
    got = _value_and_grads(conv, x, kernel)
    assert all(g.dtype == jnp.bfloat16 for g in got)
    want = _value_and_grads(_reference(case), x.astype(jnp.float32), kernel.astype(jnp.float32))
    _assert_close([g.astype(jnp.float32) for g in got], want, rtol=2e-2)


def _conv_primitives(impl):
    x, kernel = _inputs((2, 16, 16, 8, 4, 3, 1, 1))

    def loss(x, kernel):
        return jnp.sum(conv2d(x, kernel, 1, 1, impl=impl) ** 2)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, kernel)
    text = str(jaxpr)
    return text.count("conv_general_dilated"), text.count("dot_general")


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
    n_conv, n_dot = _conv_primitives("auto")
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
