"""`jaxprune.cpu.enable()`: importing jaxprune changes nothing in the process; enabling turns the
XLA:CPU flag, the malloc settings and the convolution plan on, and says what it could not do when
called after JAX's backend started. Each case runs in a fresh process (these are process state)."""

import json
import os
import subprocess
import sys

import pytest

import jaxprune.cpu
from jaxprune import ops
from jaxprune.cpu import allocator, xla_cpu

# A ResNet's forward and backward pass after a plain ``import jaxprune``; printed as JSON: whether
# XLA_FLAGS changed, the jaxprune.cpu modules loaded, the jaxprune/oneDNN libraries mapped.
IMPORT_PROBE = """
import json, os, sys
before = os.environ.get("XLA_FLAGS")
import jax, jax.numpy as jnp
import jaxprune as jp
arch = jp.models.ResNetArch(  # a toy ResNet: convolutions, strides, projection, materialize
    block="basic", stem="cifar", stem_width=4, stage_widths=(4, 6), inner_widths=(((3,),), ((5,),)),
    strides=(1, 2), projections=(False, True), input_shape=(8, 8, 3), name="tiny")
model = arch.module()
x = jnp.ones((2, *arch.input_shape))
variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
jax.jit(jax.grad(lambda p: model.apply({**variables, "params": p}, x, train=False).sum()))(
    variables["params"])
maps = open("/proc/self/maps").read().splitlines()
print(json.dumps({
    "xla_flags_unchanged": os.environ.get("XLA_FLAGS") == before,
    "cpu_modules": sorted(m for m in sys.modules if m.startswith("jaxprune.cpu")),
    "libraries": sorted({line.split()[-1] for line in maps
                         if "onednn-conv" in line or "libdnnl" in line}),
}))
"""


def _run(code: str, **env) -> subprocess.CompletedProcess:
    inherited = allocator.without_allocator_settings(os.environ)
    # (a conv impl chosen for the whole suite, e.g. JAXPRUNE_CONV_IMPL=xla, would hide the plan)
    dropped = ("XLA_FLAGS", xla_cpu.OPT_OUT_ENV, ops.conv.ENV_VAR)
    inherited = {k: v for k, v in inherited.items() if k not in dropped}
    done = subprocess.run(
        [sys.executable, "-c", code], env={**inherited, "JAX_PLATFORMS": "cpu", **env},
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_import_jaxprune_changes_nothing_in_the_process():
    record = json.loads(_run(IMPORT_PROBE).stdout)  # XLA_FLAGS unset: it stays unset
    assert record == {"xla_flags_unchanged": True, "cpu_modules": [], "libraries": []}


ENABLE_PROBE = """
import json, os, warnings
import jaxprune.cpu
late = os.environ["PROBE_LATE"] == "1"
import jax, jax.numpy as jnp
if late:
    jnp.ones(1).block_until_ready()  # the backend starts
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    status = jaxprune.cpu.enable()
jaxpr = str(jax.make_jaxpr(lambda x, k: jaxprune.ops.conv2d(x, k, 1, 1))(
    jnp.ones((1, 2, 2, 8)), jnp.ones((3, 3, 8, 8))))
print(json.dumps({
    "status": [status.xla_own_convolutions, status.glibc_tuned, status.late],
    "flag_in_xla_flags": "individual_convolution" in os.environ.get("XLA_FLAGS", ""),
    "warnings": [str(w.message) for w in caught],
    "plan_installed": "conv_general_dilated" not in jaxpr,
}))
"""


@pytest.mark.slow  # a fresh process; the CLI tests and the demo take this path too
def test_enable_before_the_backend_starts_turns_everything_on():
    record = json.loads(_run(ENABLE_PROBE, PROBE_LATE="0").stdout)
    tested = xla_cpu._jaxlib_major_minor() in xla_cpu.TESTED_JAXLIB
    environ = {**allocator.without_allocator_settings(os.environ), "JAX_PLATFORMS": "cpu"}
    glibc = allocator.would_tune(environ)
    assert record["status"] == [tested, glibc, False]
    assert record["flag_in_xla_flags"] is tested
    assert record["warnings"] == [] and record["plan_installed"]


def test_enable_after_the_backend_started_warns_and_still_installs_the_plan():
    record = json.loads(_run(ENABLE_PROBE, PROBE_LATE="1").stdout)
    assert record["status"] == [False, False, True]
    assert not record["flag_in_xla_flags"] and record["plan_installed"]
    if xla_cpu._jaxlib_major_minor() in xla_cpu.TESTED_JAXLIB:
        (message,) = record["warnings"]
        assert "after JAX's backend started" in message and "XLA:CPU flag" in message
        assert "convolution plan is on" in message


@pytest.mark.slow  # a fresh process
def test_opting_out_by_environment_is_no_late_warning():
    env = {xla_cpu.OPT_OUT_ENV: "0", allocator.ALLOCATOR_ENV: "system", "PROBE_LATE": "1"}
    record = json.loads(_run(ENABLE_PROBE, **env).stdout)
    assert record["warnings"] == [] and record["status"] == [False, False, True]


def test_disable_and_enabled_put_the_previous_backend_back():
    previous = ops.conv.current()
    try:
        jaxprune.cpu.disable()
        assert ops.conv.current() is ops.conv.LAX
        with jaxprune.cpu.enabled() as backend:
            assert ops.conv.current() is backend and not backend.planner.autotune
        assert ops.conv.current() is ops.conv.LAX
    finally:
        ops.install(previous)
