"""Channel rules on plain JAX functions: sub-programs (jit, checkpoint, custom_vjp) are followed,
dtype casts and iota-made tensors keep groups prunable, and unsupported uses block a group."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp


@jax.custom_vjp
def clipped_relu(x):
    return jnp.clip(x, 0.0, 6.0)


clipped_relu.defvjp(lambda x: (clipped_relu(x), x), lambda x, g: (g * (x > 0) * (x < 6),))


def mlp(params, x):
    h = jax.checkpoint(lambda h: jax.nn.gelu(h))(x @ params["w1"] + params["b1"])
    h = clipped_relu(h.astype(jnp.bfloat16).astype(jnp.float32))
    h = h * (1.0 + 0.01 * jnp.arange(h.shape[-1], dtype=jnp.float32))  # iota: follows the width
    h = jax.jit(lambda h, w: h @ w)(h, params["w2"])
    return h @ params["w3"]


def _params():
    keys = jax.random.split(jax.random.key(0), 3)
    return {
        "w1": jax.random.normal(keys[0], (5, 16)),
        "b1": jnp.linspace(-1, 1, 16),
        "w2": jax.random.normal(keys[1], (16, 12)),
        "w3": jax.random.normal(keys[2], (12, 3)),
    }


def test_sub_programs_are_followed_and_pruned_equals_gated():
    params, x = _params(), jax.random.normal(jax.random.key(1), (4, 5))
    net = jp.trace(mlp, params, x)
    assert net.groups == {"w1": 16, "w2": 12}
    keep = {"w1": np.array([0, 3, 4, 9, 15]), "w2": np.arange(0, 12, 3)}
    gates = {g: jnp.zeros(n).at[keep[g]].set(1.0) for g, n in net.groups.items()}
    apply2, params2 = net.prune(params, keep)
    assert params2["w1"].shape == (5, 5) and params2["w2"].shape == (5, 4)
    np.testing.assert_allclose(
        apply2(params2, x), net.apply(params, x, gates=gates), rtol=1e-5, atol=1e-5
    )
    grads = jax.grad(lambda p: apply2(p, x).sum())(params2)  # custom_vjp and remat differentiate
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_a_slice_of_the_channels_blocks_the_group():
    def fn(params, x):
        h = jax.nn.relu(x @ params["w1"])
        return h[:, :8] @ params["w2"]  # only half the hidden channels read: not prunable

    params = {"w1": jnp.ones((5, 16)), "w2": jnp.ones((8, 3))}
    with pytest.raises(ValueError, match="slice along this axis"):
        jp.trace(fn, params, jnp.ones((2, 5)))


class ViTBlock(nn.Module):
    """Patch embedding, pre-norm attention and MLP with residuals, as a ViT writes them."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(16, (4, 4), 4, name="patch")(x).reshape(x.shape[0], -1, 16)
        x = x + self.param("pos", nn.initializers.normal(0.02), (1, x.shape[1], 16))
        y = nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(nn.LayerNorm()(x))
        x = x + nn.Dropout(0.1, deterministic=not train)(y)
        y = nn.Dense(16, name="mlp2")(nn.gelu(nn.Dense(32, name="mlp1")(nn.LayerNorm()(x))))
        return nn.Dense(10, name="head")(nn.LayerNorm()(x + y).mean(1))


@pytest.mark.slow
def test_vit_block_prunes_its_mlp_and_leaves_attention():
    """Attention's [d, heads, head_dim] kernels are left out (`Program.unrepresented`); the
    LayerNorm'd stream is blocked; the MLP's hidden layer is the one group."""
    model, x = ViTBlock(), jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    net = jp.trace(model.apply, variables, x)
    assert net.groups == {"mlp1": 32} and jp.groups(net) == net.groups
    assert any(name.startswith("attn/") for name in net.base.unrepresented)
    keep = {"mlp1": np.arange(0, 32, 3)}
    gates = {"mlp1": jnp.zeros(32).at[keep["mlp1"]].set(1.0)}
    apply2, variables2 = net.prune(variables, keep)
    gated = jax.jit(lambda v, x: net.apply(v, x, gates=gates))(variables, x)
    np.testing.assert_allclose(jax.jit(apply2)(variables2, x), gated, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_linen_dropout_trains_pruned_with_rngs():
    """Array keyword arguments (dropout's rngs) are program inputs; the pruned program in train
    mode draws the kept channels' part of the full network's dropout mask: pruned == gated."""
    model, x = ViTBlock(), jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    net = jp.trace(model.apply, variables, x)
    keep = {"mlp1": np.arange(0, 32, 2)}
    gates = {"mlp1": jnp.zeros(32).at[keep["mlp1"]].set(1.0)}
    apply2, variables2 = net.prune(variables, keep)
    rngs = {"dropout": jax.random.key(3)}
    pruned = jax.jit(lambda v, r: apply2(v, x, train=True, rngs=r))(variables2, rngs)
    gated = jax.jit(lambda v, r: net.apply(v, x, gates=gates, train=True, rngs=r))(variables, rngs)
    eval_mode = jax.jit(apply2)(variables2, x)
    np.testing.assert_allclose(pruned, gated, rtol=1e-5, atol=1e-6)
    assert not np.allclose(pruned, eval_mode)  # dropout did act
    other = jax.jit(lambda v, r: apply2(v, x, train=True, rngs=r))(
        variables2, {"dropout": jax.random.key(4)}
    )
    assert not np.allclose(pruned, other)  # the key is an input, not a constant
