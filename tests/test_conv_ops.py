"""`jaxprune.ops.conv2d`, the seam the models call, and the CPU layer's forms behind it
(`jaxprune.cpu.conv`, `jaxprune.cpu.plan`): plain `lax` by default; with the layer, every form
equals `lax.conv_general_dilated` in value and gradients, under jit / vmap / forward-over-reverse;
the thresholds, the switches, and tuning with its cache.

Tolerances: a float32 sum of K products, in any order, is within K*u*sum|x_i*w_i| of the exact
sum (u = 2**-24; Higham, Accuracy and Stability of Numerical Algorithms, section 3.1). Each result
is compared with a float64 reference against that bound, K being the terms of the direction (the
window times C_in forward, times C_out for the input gradient, N*Ho*Wo for the kernel gradient).
"""

import itertools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune.cpu
from jaxprune import ops
from jaxprune.cpu import conv as cpu_conv
from jaxprune.cpu import onednn, plan, tune, xla_cpu
from jaxprune.cpu.conv import FixedForms
from jaxprune.ops import conv2d, conv_impl

U32 = 2.0**-24  # float32's unit roundoff
U_BF16 = 2.0**-8
# Winograd's F(2x2, 3x3) adds its transforms' roundings (sums of at most 4 terms with weights 1 or
# 1/2, on input, kernel and output): at most 3 more sums per product, so 4x the direct bound.
WINOGRAD_FACTOR = 4

# oneDNN comes from the system (install.sh installs it); CI must have it, a developer may not.
needs_onednn = pytest.mark.skipif(
    not os.environ.get("CI") and not onednn.available(),
    reason=f"oneDNN not available: {onednn.unavailable_reason()}",
)
needs_winograd = pytest.mark.skipif(
    not os.environ.get("CI") and not onednn.winograd_supported(),
    reason="oneDNN's library or an AVX2 CPU is missing",
)


@pytest.fixture
def layer(monkeypatch):
    """The CPU layer's plan (thresholds) installed for the test, whatever the process has (a
    suite run with ``JAXPRUNE_CONV_IMPL`` set included)."""
    monkeypatch.delenv(ops.conv.ENV_VAR, raising=False)
    with jaxprune.cpu.enabled() as backend:
        yield backend


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
    # 8 channels on both sides: oneDNN is handed NHWC as its 8-channel-blocked layout (same bytes)
    (2, 7, 6, 8, 8, 3, 1, 1),
    (2, 6, 5, 8, 8, 1, 2, 0),
]


def _inputs(case, seed=0, dtype=jnp.float32):
    n, h, w, c_in, c_out, k, _, _ = case
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, h, w, c_in)), dtype)
    kernel = jnp.asarray(rng.normal(size=(k, k, c_in, c_out)), dtype)
    return x, kernel


def _cotangent(y, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=y.shape), y.dtype)


def _reference(case):
    *_, stride, padding = case
    return lambda x, kernel: ops.conv.lax_conv(x, kernel, stride, padding)


def _value_and_grads(conv, x, kernel, dy):
    y, vjp = jax.vjp(conv, x, kernel)
    return (y, *vjp(dy.astype(y.dtype)))


def _terms(case):
    """Products summed per element: forward, input gradient, kernel gradient."""
    n, h, w, c_in, c_out, k, stride, padding = case
    ho, wo = cpu_conv.out_size(h, k, stride, padding), cpu_conv.out_size(w, k, stride, padding)
    return k * k * c_in, k * k * c_out, n * ho * wo


def _exact_and_bounds(case, x, kernel, dy, factor=1.0, u=U32):
    """float64 value and gradients, and the float32 error bound of each (module doc)."""
    with jax.enable_x64(True):
        as64 = [np.asarray(a, np.float64) for a in (x, kernel, dy)]
        exact = _value_and_grads(_reference(case), *as64)
        absolute = _value_and_grads(_reference(case), *map(np.abs, as64))
        exact, absolute = [np.asarray(a) for a in exact], [np.asarray(a) for a in absolute]
    bounds = [factor * terms * u * a for terms, a in zip(_terms(case), absolute, strict=True)]
    return exact, bounds


def _assert_within(got, exact, bounds):
    for g, e, b in zip(got, exact, bounds, strict=True):
        err = np.abs(np.asarray(g, np.float64) - e)
        assert np.all(err <= b), f"error {err.max():.3g} over its bound at {np.argmax(err - b)}"


def _check_conv(conv, case, factor=1.0):
    x, kernel = _inputs(case)
    dy = _cotangent(_reference(case)(x, kernel))
    exact, bounds = _exact_and_bounds(case, x, kernel, dy, factor)
    _assert_within(_value_and_grads(conv, x, kernel, dy), exact, bounds)


# ----------------------------------------------------------------------------------------------
# The seam without the layer.


def _conv_primitives(impl, channels=(64, 48)):
    """(XLA convolutions, dots, oneDNN primitives) in the gradient's jaxpr, 16x16 pixels."""
    x, kernel = _inputs((2, 16, 16, *channels, 3, 1, 1))

    def loss(x, kernel):
        return jnp.sum(conv2d(x, kernel, 1, 1, impl=impl) ** 2)

    text = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, kernel))
    return text.count("conv_general_dilated"), text.count("dot_general"), text.count("onednn")


def test_the_default_backend_is_plain_lax_and_refuses_the_layers_forms():
    with ops.installed(ops.conv.LAX):
        assert _conv_primitives(None) == (3, 0, 0)
        x = jnp.ones((2, 3))
        assert ops.materialize(x) is x
        with pytest.raises(RuntimeError, match="jaxprune.cpu.enable"):
            conv2d(jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 1)), impl="matmul")


def test_enabled_installs_the_plan_and_restores_the_previous_backend():
    with ops.installed(ops.conv.LAX):
        with jaxprune.cpu.enabled() as backend:
            assert ops.conv.current() is backend and backend.name == "cpu"
            assert _conv_primitives("matmul")[0] == 0
        assert ops.conv.current() is ops.conv.LAX


def test_a_function_traced_before_the_switch_keeps_its_plan(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    monkeypatch.delenv(ops.conv.ENV_VAR, raising=False)
    x, kernel = _inputs((1, 2, 2, 8, 8, 3, 1, 1))  # 2x2 pixels: never XLA's convolution on CPU

    def f(x, kernel):
        return conv2d(x, kernel, 1, 1)

    with ops.installed(ops.conv.LAX):
        jitted = jax.jit(f)
        assert "convolution" in jitted.lower(x, kernel).as_text()
        with jaxprune.cpu.enabled():
            assert "convolution" in jitted.lower(x, kernel).as_text()  # JAX's cached trace
            assert "convolution" not in jax.jit(lambda *a: f(*a)).lower(x, kernel).as_text()


# ----------------------------------------------------------------------------------------------
# The layer's forms, one direction at a time.


# oneDNN's calls compile in no time: every case in the fast tier. The im2col dots compile a program
# per case: the fast tier keeps a padded 3x3, a 1x1 and VGG's 2x2 case.
_FAST_DOT_CASES = {CASES[0], CASES[4], CASES[10]}


@pytest.mark.parametrize(
    "impl, case",
    [
        *(
            ("matmul", c)
            if c in _FAST_DOT_CASES
            else pytest.param("matmul", c, marks=pytest.mark.slow)
            for c in CASES
        ),
        *(pytest.param("onednn", c, marks=needs_onednn) for c in CASES),
    ],
    ids=str,
)
def test_value_and_gradients_match_lax_conv(layer, case, impl):
    *_, stride, padding = case
    _check_conv(jax.jit(lambda x, kernel: conv2d(x, kernel, stride, padding, impl=impl)), case)


def _all_forms():
    with_onednn = onednn.available()
    forward = ("xla", "im2col", *(("onednn",) if with_onednn else ()))
    kernel_grad = ("xla", "im2col", "rowshift", *(("onednn",) if with_onednn else ()))
    return [FixedForms(*c) for c in itertools.product(forward, forward, kernel_grad)]


def _form_params():
    """Every combination of forms; the fast tier keeps those that use one form in every direction,
    and XLA's with the rowshift kernel gradient: each form, in each direction, once."""
    params = []
    for forms in _all_forms():
        one_form = forms.forward == forms.input_grad == forms.kernel_grad
        rowshift = forms == FixedForms("xla", "xla", "rowshift")
        marks = () if one_form or rowshift else pytest.mark.slow
        params.append(pytest.param(forms, marks=marks, id="-".join(vars(forms).values())))
    return params


@pytest.mark.parametrize("forms", _form_params())
def test_every_direction_form_matches_lax_conv(forms):
    for case in [(2, 6, 7, 3, 4, 3, 1, 1), (1, 7, 6, 2, 3, 3, 2, 1)]:
        *_, stride, padding = case
        if forms.kernel_grad == "rowshift" and stride != 1:
            continue  # the rowshift form is stride-1 only; plans never pick it otherwise
        conv = jax.jit(lambda x, k, s=stride, p=padding: cpu_conv._conv(x, k, s, p, forms))
        _check_conv(conv, case)


def _shape(x_shape, kernel_shape, stride, padding):
    return plan.ConvShape(x_shape, kernel_shape, stride, padding)


def test_threshold_forms_per_direction():
    F = FixedForms

    def forms(x_shape, kernel_shape, stride, padding, ynn_off, onednn=False, winograd=False):
        shape = _shape(x_shape, kernel_shape, stride, padding)
        return plan.threshold_forms(shape, ynn_off, onednn, winograd)

    # YNNPACK's convolutions on (XLA's default): the kernel gradient is never XLA's.
    assert forms((128, 32, 32, 16), (3, 3, 16, 16), 1, 1, False) == F("xla", "xla", "rowshift")
    assert forms((128, 8, 8, 64), (3, 3, 64, 64), 1, 1, False) == F("xla", "xla", "im2col")
    assert forms((128, 32, 32, 16), (3, 3, 16, 32), 2, 1, False) == F("xla", "im2col", "im2col")
    assert forms((128, 32, 32, 16), (1, 1, 16, 32), 2, 0, False) == F("xla", "im2col", "im2col")
    assert forms((128, 2, 2, 512), (3, 3, 512, 512), 1, 1, False) == F("im2col", "im2col", "im2col")
    # Off (what enable() arranges): XLA's own kernel gradient everywhere.
    assert forms((128, 32, 32, 16), (3, 3, 16, 16), 1, 1, True) == F("xla", "xla", "xla")
    assert forms((128, 32, 32, 16), (1, 1, 16, 32), 2, 0, True) == F("xla", "im2col", "xla")
    assert forms((128, 4, 4, 512), (3, 3, 512, 512), 1, 1, True) == F("im2col", "im2col", "xla")
    # oneDNN in every direction with at most 32 channels on a side or a 1x1 window.
    onednn_everywhere = F("onednn", "onednn", "onednn")
    assert forms((128, 32, 32, 16), (3, 3, 16, 16), 1, 1, True, True) == onednn_everywhere
    assert forms((128, 8, 8, 64), (1, 1, 64, 128), 1, 0, True, True) == onednn_everywhere
    assert forms((128, 8, 8, 64), (3, 3, 64, 64), 1, 1, True, True) == F("xla", "xla", "xla")
    # Winograd: 3x3, stride 1, padding <= 2 (the caller's `winograd` says it applies), more than
    # 32 channels on both sides, or from 24 with both counts multiples of 8 (oneDNN's kernel grad).
    winograd = F("winograd", "winograd", "xla")
    for x_shape, kernel_shape, want in [
        ((128, 32, 32, 64), (3, 3, 64, 64), winograd),
        ((128, 2, 2, 512), (3, 3, 512, 512), winograd),
        ((128, 9, 9, 33), (3, 3, 33, 40), winograd),
        ((128, 16, 16, 32), (3, 3, 32, 64), F("winograd", "winograd", "onednn")),
        ((128, 16, 16, 24), (3, 3, 24, 32), F("winograd", "winograd", "onednn")),
        ((128, 16, 16, 30), (3, 3, 30, 32), onednn_everywhere),
        ((128, 32, 32, 16), (3, 3, 16, 16), onednn_everywhere),
    ]:
        assert forms(x_shape, kernel_shape, 1, 1, True, True, True) == want, (x_shape, want)


def test_switch_by_argument_context_and_environment(layer, monkeypatch):
    assert _conv_primitives("xla")[1] == 0
    assert _conv_primitives("matmul")[0] == 0
    monkeypatch.setenv(ops.conv.ENV_VAR, "matmul")
    assert _conv_primitives(None)[0] == 0
    with conv_impl("xla"):  # the context wins over the environment
        assert _conv_primitives(None)[1] == 0
    assert _conv_primitives("xla")[1] == 0  # the argument wins over both
    monkeypatch.setenv(ops.conv.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="conv impl"):
        conv2d(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 1)))
    with pytest.raises(ValueError, match="conv impl"), conv_impl("fast"):
        pass


def test_auto_is_plain_lax_conv_off_cpu_and_follows_the_ynn_setting(layer, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert _conv_primitives("auto", (8, 4)) == (3, 0, 0)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    monkeypatch.setattr(plan, "_onednn_runs", lambda shape: False)
    monkeypatch.setattr(plan, "_winograd_runs", lambda shape: False)
    for off, dots in [(False, True), (True, False)]:
        monkeypatch.setitem(xla_cpu._state, "ynn_convolutions_off", off)
        with jaxprune.cpu.enabled():  # a fresh planner: choices are remembered per planner
            n_conv, n_dot, _ = _conv_primitives("auto")
        assert n_conv > 0 and (n_dot > 0) is dots  # a matmul kernel gradient under YNNPACK


@needs_onednn
def test_auto_hands_narrow_and_pointwise_convolutions_to_onednn_on_cpu(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    monkeypatch.setitem(xla_cpu._state, "ynn_convolutions_off", True)
    with jaxprune.cpu.enabled():
        # 8 -> 4 channels: oneDNN in all three directions, no XLA convolution or dot.
        assert _conv_primitives("auto", channels=(8, 4)) == (0, 0, 3)
        x, kernel = _inputs((1, 4, 4, 64, 48, 1, 1, 0))
        jaxpr = str(jax.make_jaxpr(lambda x, k: conv2d(x, k, 1, 0, impl="auto"))(x, kernel))
        assert "onednn" in jaxpr  # a 1x1 window, whatever the width
        # Other dtypes keep XLA's forms under "auto" and are refused by "onednn".
        x16, k16 = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
        assert "onednn" not in str(jax.make_jaxpr(lambda *a: conv2d(*a, impl="auto"))(x16, k16))
        with pytest.raises(TypeError, match="float32"):
            conv2d(x16, k16, impl="onednn")
    if onednn.winograd_supported():
        with jaxprune.cpu.enabled():  # 64 -> 48, 3x3: Winograd forward and input gradient
            assert _conv_primitives("auto", channels=(64, 48)) == (1, 0, 2)


# ----------------------------------------------------------------------------------------------
# Transformations.

# "matmul": the im2col forms; "auto" at 40 channels and more: Winograd's forward pass and input
# gradient with XLA's kernel gradient where the library is loaded (else XLA's forms, at 2x2 pixels
# the im2col ones), at 24 -> 32 channels oneDNN's kernel gradient; "onednn": stride 1 and 2.
# The fast tier keeps oneDNN's direct convolution (the forms the custom rules serve).
IMPL_CASES = [
    pytest.param("matmul", (2, 6, 7, 3, 4, 3, 1, 1), marks=pytest.mark.slow),
    pytest.param("auto", (1, 2, 2, 40, 48, 3, 1, 1), marks=pytest.mark.slow),
    pytest.param("auto", (1, 16, 16, 40, 48, 3, 1, 1), marks=pytest.mark.slow),
    pytest.param("auto", (2, 5, 6, 24, 32, 3, 1, 1), marks=pytest.mark.slow),
    pytest.param("onednn", (2, 6, 7, 3, 4, 3, 1, 1), marks=needs_onednn),
    pytest.param("onednn", (2, 9, 8, 4, 3, 3, 2, 1), marks=[needs_onednn, pytest.mark.slow]),
]
IMPL_IDS = ["matmul", "auto-2px", "auto-16px", "auto-24ch", "onednn", "onednn-stride2"]


def _chain_bound(case, convs: int, scale: float) -> float:
    """Error bound of a chain of ``convs`` convolutions with 1-Lipschitz nonlinearities between
    (sin, tanh and their derivatives): each adds at most K*u of its operands' absolute sum, which
    ``scale`` (the float64 result's largest magnitude times the window's K) stands in for; times
    `WINOGRAD_FACTOR` for the Winograd forms."""
    return WINOGRAD_FACTOR * convs * max(_terms(case)) * U32 * scale


def _assert_close64(got, want64, case, convs):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want64), strict=True):
        w = np.asarray(w)
        bound = _chain_bound(case, convs, float(np.max(np.abs(w))) * max(_terms(case)) ** 0.5)
        np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=0, atol=bound)


@pytest.mark.parametrize(("impl", "case"), IMPL_CASES, ids=IMPL_IDS)
def test_vmap_over_inputs_and_kernels(layer, impl, case):
    *_, stride, padding = case
    xs = jnp.stack([_inputs(case, seed)[0] for seed in range(3)])
    kernels = jnp.stack([_inputs(case, seed)[1] for seed in range(3)])

    def loss(impl):
        return lambda x, k: jnp.sum(jnp.sin(conv2d(x, k, stride, padding, impl=impl)))

    # (0, None): the mapped axis folds into oneDNN's batch; the others map XLA's convolution.
    for in_axes in [(0, 0), (None, 0), (0, None)]:
        args = (xs if in_axes[0] == 0 else xs[0], kernels if in_axes[1] == 0 else kernels[0])
        got = jax.jit(jax.vmap(jax.value_and_grad(loss(impl), argnums=(0, 1)), in_axes))(*args)
        with jax.enable_x64(True):
            args64 = [np.asarray(a, np.float64) for a in args]
            want = jax.vmap(jax.value_and_grad(loss("xla"), argnums=(0, 1)), in_axes)(*args64)
        _assert_close64(got, want, case, convs=2)


@pytest.mark.parametrize(("impl", "case"), IMPL_CASES, ids=IMPL_IDS)
def test_forward_over_reverse_and_forward_mode(layer, impl, case):
    # Importance criteria take Hessian-vector products as jax.jvp of jax.grad.
    *_, stride, padding = case
    primals, directions = _inputs(case), _inputs(case, seed=5)

    def loss(impl):
        return lambda x, k: jnp.sum(jnp.tanh(conv2d(x, k, stride, padding, impl=impl)) ** 2)

    def hvp(impl, primals, directions):
        return jax.jvp(jax.grad(loss(impl), argnums=(0, 1)), primals, directions)

    got = jax.jit(lambda: hvp(impl, primals, directions))()
    jvp_got = jax.jvp(loss(impl), primals, directions)  # plain forward mode (custom_vjp can't)
    with jax.enable_x64(True):
        p64, d64 = [[np.asarray(a, np.float64) for a in t] for t in (primals, directions)]
        want, jvp_want = hvp("xla", p64, d64), jax.jvp(loss("xla"), p64, d64)
    _assert_close64(got, want, case, convs=4)
    _assert_close64(jvp_got, jvp_want, case, convs=2)


@pytest.mark.parametrize(("impl", "case"), IMPL_CASES[:3], ids=IMPL_IDS[:3])
def test_bfloat16(layer, impl, case):
    *_, stride, padding = case
    x, kernel = _inputs(case, dtype=jnp.bfloat16)
    conv = jax.jit(lambda x, kernel: conv2d(x, kernel, stride, padding, impl=impl))
    dy = _cotangent(_reference(case)(x, kernel))
    got = _value_and_grads(conv, x, kernel, dy)
    assert all(g.dtype == jnp.bfloat16 for g in got)
    # float32 accumulation, then one bfloat16 rounding of the result (2 with the concatenated
    # patches' transposes): bounded by 2 * u_bf16 of the absolute sum, with room for float32's.
    exact, bounds = _exact_and_bounds(case, x, kernel, dy)
    k_max = max(_terms(case))
    bounds = [b / (terms * U32) * (2 * U_BF16 + k_max * U32) for b, terms in
              zip(bounds, _terms(case), strict=True)]  # fmt: skip
    _assert_within(got, exact, bounds)


# ----------------------------------------------------------------------------------------------
# oneDNN and Winograd.


@pytest.mark.slow  # compiles second-order programs; test_forward_over_reverse checks the values
@needs_onednn
def test_onednn_second_order_stays_on_onednn(layer):
    case = (2, 6, 7, 3, 4, 3, 2, 1)
    x, kernel = _inputs(case)

    def loss(impl):
        return lambda x, kernel: jnp.sum(jnp.tanh(conv2d(x, kernel, 2, 1, impl=impl)) ** 2)

    def hvp(impl):  # forward-over-reverse, as the importance criteria take it
        grad = jax.grad(loss(impl), argnums=(0, 1))
        return lambda *primals: jax.jvp(grad, primals, tuple(primals))[1]

    jaxpr = str(jax.make_jaxpr(hvp("onednn"))(x, kernel))
    assert "onednn" in jaxpr and "conv_general_dilated" not in jaxpr
    with jax.enable_x64(True):
        x64, k64 = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
        want, hessian_want = hvp("xla")(x64, k64), jax.hessian(loss("xla"), argnums=1)(x64, k64)
    _assert_close64(jax.jit(hvp("onednn"))(x, kernel), want, case, convs=4)
    # A full Hessian (vmapped over kernel directions: XLA's convolution for the mapped kernel).
    hessian = jax.jit(jax.hessian(loss("onednn"), argnums=1))(x, kernel)
    _assert_close64(hessian, hessian_want, case, convs=4)


@needs_onednn
def test_onednn_eagerly_and_its_cpu_lowering_is_the_ffi_call(layer):
    case = (2, 6, 6, 4, 6, 1, 1, 0)
    _check_conv(lambda x, k: conv2d(x, k, impl="onednn"), case)
    x, kernel = _inputs(case)
    hlo = jax.jit(lambda x, k: conv2d(x, k, impl="onednn")).lower(x, kernel).as_text()
    assert "jaxprune_conv_fwd" in hlo and "convolution" not in hlo


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip


def test_without_onednn_auto_falls_back_and_onednn_says_why(tmp_path):
    code = """if True:
        import jax, jax.numpy as jnp, jaxprune.cpu
        from jaxprune.cpu import onednn
        from jaxprune.ops import conv2d
        jaxprune.cpu.enable()
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
    assert lines[1] == "False"  # "auto" runs XLA's forms
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


@pytest.mark.slow
@needs_onednn
def test_prebuild_command_reports_the_library(tmp_path):
    done = _run_python(
        "from jaxprune.cpu import onednn; raise SystemExit(onednn.main([]))",
        JAXPRUNE_CACHE_DIR=str(tmp_path),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("jaxprune.cpu.onednn: oneDNN ")
    (library,) = tmp_path.glob("onednn-conv-*.so")
    assert str(library) in done.stdout


def _grad_over_eight_devices(impl, x_shape, kernel_shape, stride):
    """Value and gradients of a conv2d loss under `jax.jit` over 8 CPU devices (the batch split),
    in a subprocess: (largest error against XLA's relative to the largest magnitude, whether the
    program all-gathers, the lines of its oneDNN custom calls)."""
    code = f"""if True:
        import jax, jax.numpy as jnp, numpy as np, jaxprune.cpu
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from jaxprune.ops import conv2d
        jaxprune.cpu.enable()
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


# Two float32 gradients of the same loss, each within 2 convolutions' K*u*sqrt(K) of the exact
# one relative to its largest magnitude (`_chain_bound`), K = 3*3*6 = 54 or 3*3*40 = 360 at most.
def _eight_device_bound(k_terms):
    return 2 * _chain_bound((1, 1, 1, k_terms, 1, 1, 1, 0), 2, k_terms**0.5)


@pytest.mark.slow  # a fresh process with eight devices
@needs_onednn
def test_onednn_under_jit_over_eight_devices_convolves_each_devices_rows():
    err, gathers, calls = _grad_over_eight_devices("onednn", (16, 8, 8, 4), (3, 3, 4, 6), 2)
    assert err < _eight_device_bound(16 * 4 * 4) and not gathers
    assert len(calls) == 3  # forward, input gradient, kernel gradient
    # Each call that takes x sees 2 of the 16 rows.
    assert all("f32[2,8,8,4]" in line for line in calls if "conv_fwd" in line or "weights" in line)


@pytest.mark.slow  # a fresh process with eight devices
@needs_winograd
def test_winograd_under_jit_over_eight_devices_convolves_each_devices_rows():
    err, gathers, calls = _grad_over_eight_devices("auto", (16, 6, 6, 40), (3, 3, 40, 36), 1)
    assert err < _eight_device_bound(16 * 6 * 6) and not gathers
    assert len(calls) == 2  # Winograd's forward and input gradient; XLA's kernel gradient
    assert all("winograd" in line and "f32[2,6,6," in line for line in calls)


# (batch, height, width, c_in, c_out, padding) of 3x3, stride-1 convolutions: padding 0-2, odd
# sizes, channel counts below, at and past a multiple of 8 (the AVX2 lanes and the tail), a 1x1
# and a 2x2 output, and 578 tiles (a block of 512 and a shorter one). Multiples of 8 up to 64
# take the library's few-channel products: column panels of 24, 16 and 8, tile counts that leave
# rows over in each (25 tiles: 4-row, 6-row and 12-row steps), and 578 tiles in blocks of 128.
WINOGRAD_CASES = [
    (2, 8, 8, 3, 4, 1),
    (1, 7, 9, 9, 11, 0),
    (2, 7, 8, 17, 8, 2),
    (2, 2, 2, 8, 16, 1),
    (3, 1, 1, 4, 4, 1),
    (2, 34, 34, 5, 3, 1),
    (2, 9, 7, 16, 24, 1),
    (2, 34, 34, 8, 32, 1),
    (1, 9, 9, 24, 24, 1),
    (1, 9, 9, 56, 40, 1),
    (1, 9, 9, 40, 64, 1),
]


@needs_winograd
@pytest.mark.parametrize("case", WINOGRAD_CASES, ids=str)
def test_winograd_matches_lax_conv_in_value_and_gradients(case):
    n, h, w, c_in, c_out, padding = case
    full_case = (n, h, w, c_in, c_out, 3, 1, padding)
    conv = jax.jit(lambda x, k: onednn.conv_forward(x, k, 1, padding, winograd=True))
    x, kernel = _inputs(full_case)
    assert "jaxprune_conv_fwd_winograd" in conv.lower(x, kernel).as_text()
    grad_hlo = jax.jit(jax.grad(lambda x, k: jnp.sum(conv(x, k)))).lower(x, kernel).as_text()
    assert "jaxprune_conv_bwd_data_winograd" in grad_hlo
    _check_conv(conv, full_case, factor=WINOGRAD_FACTOR)


@needs_winograd
def test_winograd_refuses_what_it_cannot_compute():
    x, kernel = _inputs((1, 8, 8, 4, 4, 5, 1, 2))
    with pytest.raises(ValueError, match="3x3 window, stride 1 and padding 0-2"):
        onednn.conv_forward(x, kernel, 1, 2, winograd=True)
    x, kernel = _inputs((1, 8, 8, 4, 4, 3, 1, 1))
    with pytest.raises(ValueError, match="got window \\(3, 3\\), stride 2"):
        onednn.conv_forward(x, kernel, 2, 1, winograd=True)


# ----------------------------------------------------------------------------------------------
# Tuning.


@pytest.mark.slow  # compiles and times 14 candidates
def test_tuning_measures_once_caches_on_disk_and_computes_lax_conv(tmp_path, monkeypatch):
    monkeypatch.setenv(onednn.CACHE_ENV_VAR, str(tmp_path))
    monkeypatch.setattr(plan, "MIN_TUNED_MACS", 0)  # tune even this tiny shape
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    case = (2, 6, 7, 3, 4, 3, 1, 1)
    conv = jax.jit(lambda x, k: conv2d(x, k, 1, 1, impl="auto"))

    with jaxprune.cpu.enabled(autotune=True) as backend:
        _check_conv(conv, case)  # traced here: tuned here
        choices = backend.planner.choices
        assert {c.reason for c in choices.values()} == {"tuned"}
        assert {d for _, d in choices} == {"forward", "input_grad", "kernel_grad"}
        assert backend.planner.tuning_s > 0
        report = jaxprune.cpu.plan_report()
    (cache_file,) = tmp_path.glob("cpu-plan-*.json")
    assert cache_file == tune.cache_path()
    stored = tune.load(cache_file)
    assert len(stored) == 3 and all(e["form"] in e["seconds"] for e in stored.values())
    assert "2x6x7x3 k3x3x3->4 s1 p1 float32" in report and "tuned" in report
    assert not list(tmp_path.glob("*.tmp"))  # written by rename

    # A new process (here: a new planner) reads the choices instead of measuring.
    with jaxprune.cpu.enabled(autotune=True) as backend:
        _check_conv(jax.jit(lambda x, k: conv2d(x, k, 1, 1, impl="auto")), case)
        assert {c.reason for c in backend.planner.choices.values()} == {"cached"}
        assert backend.planner.tuning_s == 0


@pytest.mark.parametrize("variable", tune.ONEDNN_ISA_ENV_VARS)
def test_the_plan_cache_is_kept_apart_per_onednn_instruction_set_cap(variable, monkeypatch):
    # Capping oneDNN's instruction sets changes its kernels, hence which form wins.
    for name in tune.ONEDNN_ISA_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    uncapped = tune.cache_path()
    monkeypatch.setenv(variable, "AVX2")
    assert tune.cache_path() != uncapped
    assert tune.machine_key()["onednn_max_isa"].count("AVX2") == 1


class _Scripted:
    """Stands in for a candidate's compiled program, with scripted run times (no clock, so no
    machine's load can change the outcome): its first run takes ``first_s`` (a cold start: oneDNN
    generating its kernels), later ones ``then_s``; each run is appended to ``log``."""

    def __init__(self, first_s: float, then_s: float, log: list | None = None):
        self.first_s, self.then_s, self.calls, self.log = first_s, then_s, 0, log

    def lower(self, *args):
        return self

    def compile(self):
        return self

    def run_seconds(self) -> float:
        seconds = self.then_s if self.calls else self.first_s
        self.calls += 1
        if self.log is not None:
            self.log.append(self)
        return seconds


def _script_candidates(monkeypatch, programs: dict) -> None:
    monkeypatch.setattr(tune, "program", lambda shape, direction, form: programs[form])
    monkeypatch.setattr(tune, "_seconds", lambda compiled, args: compiled.run_seconds())


def test_tuning_does_not_judge_a_candidate_by_its_cold_start_alone(monkeypatch):
    programs = {
        "steady": _Scripted(0.04, 0.04),
        "cold": _Scripted(0.1, 0.01),  # 2.5x the best on its first call, 4x faster warm
        "hopeless": _Scripted(1.0, 0.001),  # 25x the best so far on its first call
    }
    _script_candidates(monkeypatch, programs)
    shape = _shape((1, 4, 4, 2), (3, 3, 2, 2), 1, 1)
    seconds = tune.measure(shape, "forward", list(programs))
    assert min(seconds, key=seconds.get) == "cold"
    assert programs["cold"].calls > 1 and programs["hopeless"].calls == 1


def test_tuning_times_the_candidates_in_rounds(monkeypatch):
    # A slow spell of the machine then hits every candidate alike, not the one being timed.
    log = []
    programs = {form: _Scripted(0.001, 0.001, log) for form in ("xla", "im2col", "onednn")}
    _script_candidates(monkeypatch, programs)
    tune.measure(_shape((1, 4, 4, 2), (3, 3, 2, 2), 1, 1), "forward", list(programs))
    each_once = list(programs.values())
    assert log == each_once * (1 + tune.MAX_REPS)  # the cold runs, then the rounds


def test_tuning_drops_a_candidate_once_it_lost_warm(monkeypatch):
    programs = {"fast": _Scripted(0.01, 0.01), "slow": _Scripted(0.012, 0.02)}  # 2x warm
    _script_candidates(monkeypatch, programs)
    seconds = tune.measure(_shape((1, 4, 4, 2), (3, 3, 2, 2), 1, 1), "forward", list(programs))
    assert seconds == {"fast": 0.01, "slow": 0.02}
    assert programs["fast"].calls == 1 + tune.MAX_REPS and programs["slow"].calls == 2


def test_tuning_stops_at_its_budget_and_skips_tiny_shapes(tmp_path, monkeypatch):
    monkeypatch.setenv(onednn.CACHE_ENV_VAR, str(tmp_path))
    shape = _shape((2, 6, 7, 3), (3, 3, 3, 4), 1, 1)
    planner = plan.Planner(autotune=True)
    assert planner.choose(shape, "forward").reason == "threshold: too small to tune"
    monkeypatch.setattr(plan, "MIN_TUNED_MACS", 0)
    spent = plan.Planner(autotune=True, budget_s=0.0)
    assert spent.choose(shape, "forward").reason == "threshold: tuning budget spent"
    assert not list(tmp_path.glob("cpu-plan-*.json"))


def test_describe_lists_each_convolution_and_its_forms(layer):
    import jaxprune as jp

    arch = jp.models.create("resnet20")
    model = arch.module()
    x = jnp.ones((2, *arch.input_shape))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    table = jaxprune.cpu.describe(lambda v, x: model.apply(v, x, train=False), variables, x)
    rows = table.splitlines()[2:]
    # ResNet-20's distinct shapes: stem, 3 stages' 3x3, 2 strided 3x3 and 2 projections.
    assert len(rows) == 8
    # Inference traces the forward pass only: the gradients' forms are never chosen.
    assert all(row.count("(threshold)") == 1 and row.endswith("| - | - |") for row in rows)
