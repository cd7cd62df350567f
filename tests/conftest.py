"""Shared fixtures and helpers: random variables for any architecture, float32 tolerances."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp

# Full-size ImageNet ResNets are checked at a smaller resolution where only the channel structure
# matters (surgery, gates): the structure does not depend on the input size.
# The tests compare float32 results to tight tolerances. On GPU, JAX's default precision lets
# f32 convolutions and dots run in TF32 (10-bit mantissa), which those tolerances reject (seen on
# an H100: RESULTS.md section 4); on CPU this is already the behaviour.
jax.config.update("jax_default_matmul_precision", "highest")

# The CPU speed layer: its plan takes the thresholds in tests (and in the commands they run), not
# measurements, unless a test tunes on purpose. The suite runs with the layer off (the library's
# default) and, under JAXPRUNE_TEST_CPU_LAYER=1, with it on as the `jaxprune` command has it.
os.environ.setdefault("JAXPRUNE_CPU_AUTOTUNE", "0")
if os.environ.get("JAXPRUNE_TEST_CPU_LAYER") == "1":
    import jaxprune.cpu

    jaxprune.cpu.enable()


@pytest.fixture(autouse=True)
def _conv_backend_restored():
    """Each test ends with the convolution backend it started with: a command run in-process
    (`jaxprune.cli.main` enables the CPU layer, as the `jaxprune` command does) leaks nothing."""
    from jaxprune.ops import conv

    with conv.installed(conv.current()):
        yield


SMALL_INPUT = {
    "resnet18": (64, 64, 3),
    "resnet34": (64, 64, 3),
    "resnet50": (64, 64, 3),
    "resnet101": (64, 64, 3),
}


def small_arch(name: str, num_classes: int = 10):
    return jp.models.create(name, num_classes=num_classes, input_shape=SMALL_INPUT.get(name))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def fashion_lenet():
    """LeNet-5 trained briefly on real Fashion-MNIST (300 SGD steps of 128: ~84% test accuracy).

    Returns a dict: ``arch``, ``variables``, ``score_batches`` (2 train batches of 256, no
    augmentation) and ``eval_batch`` (the first 1024 test images, labels).
    """
    import optax

    import jaxprune.data as jd

    dataset = jd.load_dataset("fashion_mnist")
    arch = jp.models.create("lenet5")
    model = arch.module()
    params = model.init(jax.random.key(0), jnp.zeros((1, *arch.input_shape)))["params"]
    optimizer = optax.sgd(0.05, momentum=0.9)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, images, labels):
        def loss_fn(p):
            logits = model.apply({"params": p}, images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def normalized(images):
        return np.asarray(jd.normalize(images, dataset.mean, dataset.std))

    for images, labels in jd.train_batches(
        dataset, global_batch_size=128, seed=0, num_steps=300, augment=False
    ):
        params, opt_state = step(params, opt_state, normalized(images), labels)
    score_batches = [
        (normalized(images), labels)
        for images, labels in (
            jd.train_batch(dataset, s, global_batch_size=256, seed=1, augment=False)
            for s in range(2)
        )
    ]
    test = next(jd.eval_batches(dataset, global_batch_size=1024))
    return {
        "arch": arch,
        "variables": {"params": params},
        "score_batches": score_batches,
        "eval_batch": (normalized(test[0]), test[1]),
    }


def tiny_resnet():
    """A ResNet with every kind of group at toy size: stem-tied stage 1, projected stage 2."""
    return jp.models.ResNetArch(
        block="basic",
        stem="cifar",
        stem_width=4,
        stage_widths=(4, 6),
        inner_widths=(((3,),), ((5,),)),
        strides=(1, 2),
        projections=(False, True),
        input_shape=(8, 8, 3),
        name="tiny_resnet",
    )


def random_variables(arch, seed: int = 0) -> dict:
    """Random, non-trivial variables (He-scaled kernels, random BatchNorm statistics), from numpy.

    Eager ``model.init`` compiles every random initializer separately (seconds per model on a
    loaded CPU); shapes from ``jax.eval_shape`` and numpy values cost milliseconds.
    """
    from jaxprune.surgery import variable_shapes

    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape)
        elif name == "var":
            value = rng.uniform(0.5, 1.5, leaf.shape)
        elif name == "scale":
            value = rng.uniform(0.5, 1.2, leaf.shape)
        else:  # bias, mean
            value = rng.normal(0.0, 0.2, leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, variable_shapes(arch))


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``jaxprune ARGV`` run in this process."""
    from jaxprune import cli

    capsys.readouterr()
    try:
        cli.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


F32_EPS = float(np.finfo(np.float32).eps)  # 2**-23: one float32 ulp of 1.0


def assert_close_in_ulps(got, want, ulps: float) -> None:
    """``|got - want| <= ulps`` float32 ulps of ``want``'s largest magnitude, entry by entry.

    The rounding of a float32 sum is relative to the magnitude of its terms, not of its result: an
    entry near zero carries the rounding of the large ones. So the bound is in ulps of the compared
    quantity's scale, whatever the CPU's kernels; each caller says where its ``ulps`` comes from.
    """
    want = np.asarray(want, np.float64)
    got = np.asarray(got, np.float64)
    scale = float(np.abs(want).max(initial=0.0))
    if scale == 0.0:
        np.testing.assert_array_equal(got, want)
        return
    error_ulps = float(np.abs(got - want).max()) / (F32_EPS * scale)
    assert error_ulps <= ulps, (
        f"error {error_ulps:.1f} ulps of the scale {scale:.3g}, over the bound of {ulps:.1f}"
    )


def pass_ulps(variables) -> float:
    """Ulps of its scale by which one pass through a network (forward or backward) may differ
    between two float32 programs that sum in other orders (fusions, kernels, pruned widths).

    Each layer sums fan-in terms, rounding by about sqrt(fan-in) ulps of their scale (rounding
    errors of a sum add like a random walk: Higham and Mary, SIAM J. Sci. Comput. 2019); the
    layers' errors add.
    """
    kernels = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])
        if path[-1].key == "kernel"
    ]
    return sum(float(np.sqrt(np.prod(k.shape[:-1]))) for k in kernels)
