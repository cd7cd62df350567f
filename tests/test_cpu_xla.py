"""`jaxprune.cpu.xla_cpu`: the XLA:CPU flag `jaxprune.cpu.enable()` sets (and when it does not),
and `materialize`, which keeps XLA:CPU from recomputing a residual stream inside every backward
fusion."""

import dataclasses
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp
import jaxprune.cpu
from jaxprune.cpu import xla_cpu
from jaxprune.cpu.xla_cpu import materialize
from jaxprune.models import resnet

FLAG = f"{xla_cpu.FLAG}={xla_cpu.VALUE}"


@pytest.fixture
def state(monkeypatch):
    """`configure` records its answer; give it back after each test."""
    monkeypatch.setitem(xla_cpu._state, "ynn_convolutions_off", xla_cpu.ynn_convolutions_off())


def _configure(environ, jaxlib_version=(0, 10), started=False):
    return xla_cpu.configure(environ, jaxlib_version=jaxlib_version, backend_started=started)


def test_configure_appends_the_flag_to_the_users_flags(state):
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert _configure(environ) is True
    assert environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {FLAG}"
    assert xla_cpu.ynn_convolutions_off()
    environ = {}
    assert _configure(environ) is True
    assert environ["XLA_FLAGS"] == FLAG


@pytest.mark.parametrize(
    ("why", "environ", "jaxlib_version", "started"),
    [
        ("opted out", {xla_cpu.OPT_OUT_ENV: "0"}, (0, 10), False),
        ("backend already started", {}, (0, 10), True),
        ("jaxlib where the flag was not measured", {}, (0, 99), False),
    ],
)
def test_configure_leaves_xla_flags_alone(state, why, environ, jaxlib_version, started):
    before = dict(environ)
    assert _configure(environ, jaxlib_version, started) is False, why
    assert environ == before
    assert not xla_cpu.ynn_convolutions_off()


@pytest.mark.parametrize(
    ("value", "off"),
    [
        ("", True),  # every YNNPACK fusion off
        ("-individual_convolution", True),
        ("-dot,-individual_convolution", True),
        ("+dot", False),  # the default list, convolutions included, plus dots
        ("dot,eltwise", True),  # a replacement list without convolutions
        ("individual_convolution", False),
    ],
)
def test_the_users_own_setting_is_kept_and_read(state, value, off):
    environ = {"XLA_FLAGS": f"--xla_cpu_enable_fast_math=false {xla_cpu.FLAG}={value}"}
    before = dict(environ)
    assert _configure(environ) is off
    assert environ == before


def _fresh_process(code, **env):
    inherited = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_cpu.OPT_OUT_ENV)}
    env = {**inherited, **env}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.split()


PROBE = """
import os, jax, jax.numpy as jnp, jaxprune.cpu
jaxprune.cpu.enable()
def kernel_grad(x, w):
    return jax.grad(lambda w: jnp.sum(jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) ** 2))(w)
x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
print(jaxprune.cpu.xla_cpu.ynn_convolutions_off(), float(jax.jit(kernel_grad)(x, w).sum()),
      os.environ.get("XLA_FLAGS", "-").replace(" ", ","))
"""


@pytest.mark.slow  # two fresh processes, each compiling a convolution
def test_enable_sets_the_flag_in_a_fresh_process_and_xla_accepts_it():
    # XLA aborts the process on a flag it does not know: this runs a convolution under it. On a
    # jaxlib the flag was not measured with, enable() leaves XLA_FLAGS alone.
    opted_out = _fresh_process(PROBE, **{xla_cpu.OPT_OUT_ENV: "0"})
    tested = xla_cpu._jaxlib_major_minor() in xla_cpu.TESTED_JAXLIB
    expected = ["True", opted_out[1], FLAG] if tested else ["False", opted_out[1], "-"]
    assert _fresh_process(PROBE) == expected
    assert opted_out == ["False", opted_out[1], "-"]


def test_materialize_is_the_identity_in_value_and_gradient():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 4)), jnp.float32)
    x = x.at[0, 0, 0].set(jnp.nan)  # the first element steers nothing, even when NaN
    y, vjp = jax.vjp(materialize, x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    g = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)
    np.testing.assert_array_equal(np.asarray(vjp(g)[0]), np.asarray(g))
    bf16 = x.astype(jnp.bfloat16)
    assert materialize(bf16).dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(materialize(bf16), np.float32), np.asarray(bf16, np.float32)
    )


def test_materialize_is_untouched_off_cpu(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    x = jnp.ones((2, 2))
    assert materialize(x) is x


def _largest_fusion(arch):
    """Operand count of the widest fusion in the compiled train-mode gradient of ``arch``."""
    model = arch.module()
    x = jnp.ones((4, *arch.input_shape))
    variables = model.init(jax.random.key(0), x[:1], train=False)

    def loss(params):
        logits, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.zeros(4, int)).mean()

    hlo = jax.jit(jax.grad(loss)).lower(variables["params"]).compile().as_text()
    entry = hlo[hlo.index("\nENTRY") :]
    fusions = re.findall(r"= \S+ fusion\((.*?)\), kind=", entry)
    return max(len(re.findall(r"%[\w.-]+", operands)) for operands in fusions)


@pytest.mark.slow
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="materialize acts on XLA:CPU only")
def test_resnet_backward_reads_the_residual_stream_instead_of_recomputing_it(monkeypatch):
    # ResNet-56's graph (9 blocks a stage) at widths 4/8/16 (fusion choices depend on the graph,
    # not on the widths). Without materialize each backward fusion gathers its stage's stream so
    # far (about 5 operands per block); with it, none exceeds a block's own.
    widths = (4, 8, 16)
    arch = dataclasses.replace(
        jp.models.create("resnet56"),
        stem_width=4,
        stage_widths=widths,
        inner_widths=tuple(((w,),) * 9 for w in widths),
    )
    with jaxprune.cpu.enabled():  # the models' `materialize` is the layer's
        with_materialize = _largest_fusion(arch)
        monkeypatch.setattr(resnet, "materialize", lambda x: x)
        without = _largest_fusion(arch)
    assert with_materialize <= 16, (with_materialize, without)
    if xla_cpu._jaxlib_major_minor() in xla_cpu.TESTED_JAXLIB:  # the XLA behaviour it works around
        assert without >= 40, (with_materialize, without)
