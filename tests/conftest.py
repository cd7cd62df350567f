"""Shared fixtures: random, non-trivial variables for any architecture."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp

# Full-size ImageNet ResNets are checked at a smaller resolution where only the channel structure
# matters (surgery, gates): the structure does not depend on the input size.
SMALL_INPUT = {
    "resnet18": (64, 64, 3),
    "resnet34": (64, 64, 3),
    "resnet50": (64, 64, 3),
    "resnet101": (64, 64, 3),
}


def small_arch(name: str, num_classes: int = 10):
    return jp.models.create(name, num_classes=num_classes, input_shape=SMALL_INPUT.get(name))


def randomize_batch_stats(variables: dict, seed: int) -> dict:
    """Replaces BatchNorm's init values (scale 1, bias 0, mean 0, var 1) with random ones."""
    rng = np.random.default_rng(seed)

    def rand(path, x):
        name = path[-1].key
        if name == "mean":
            return jnp.asarray(rng.normal(0.0, 0.2, x.shape), x.dtype)
        if name == "var":
            return jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype)
        if name == "scale":
            return jnp.asarray(rng.uniform(0.5, 1.2, x.shape), x.dtype)
        if name == "bias":
            return jnp.asarray(rng.normal(0.0, 0.2, x.shape), x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(rand, variables)


def init_variables(arch, seed: int = 0) -> dict:
    x = jnp.zeros((1, *arch.input_shape), jnp.float32)
    variables = arch.module().init(jax.random.key(seed), x, train=False)
    return randomize_batch_stats(variables, seed)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
