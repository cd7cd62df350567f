"""A group's filters and output maps as matrices, for the weight- and feature-based criteria.

A group's channel ``c`` is produced by every conv or dense layer in ``jp.group_layers(arch)[group]``
(BatchNorm layers excepted): one layer for a plain network, several for a ResNet stage group (the
stem or projection conv and the last conv of every block of the stage). The *filter* of channel
``c`` is the concatenation of output column ``c`` of all those kernels (the weights that removing
the channel removes), so an L2 norm over it is ``sqrt(sum_l ||w_l[..., c]||^2)``, an L1 norm
``sum_l ||w_l[..., c]||_1``, and distances between filters add up over the layers.
Its *output map* is likewise the concatenation of every producer's output (before BatchNorm) over
the positions of all images.

The same functions serve the zoo and traced networks (`jaxprune.trace.TracedNet`): both describe
their producers in ``layers()``; a network that computes its producers' outputs itself (a traced
one reads them from its program) has a ``producer_outputs(variables, images, train)`` method, and
the zoo's are captured with flax's ``capture_intermediates``.
"""

import functools
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxprune.graph import Architecture, Layer, group_layers
from jaxprune.models.common import Conv


def producers(arch: Architecture) -> dict[str, list[Layer]]:
    """Group -> its conv and dense producer layers (no norm layers), in forward order, one per
    layer path (a traced conv reading a concatenation is described once per input segment)."""
    out = {}
    for g, layers in group_layers(arch).items():
        first: dict[tuple[str, ...], Layer] = {}
        for layer in layers:
            if layer.kind != "norm":
                first.setdefault(layer.path, layer)  # the first segment carries the bias
        out[g] = list(first.values())
    return out


def _params_at(variables: Mapping, path: tuple[str, ...]) -> Mapping:
    node = variables["params"]
    for key in path:
        node = node[key]
    return node


def filter_matrix(
    arch: Architecture, variables: Mapping, group: str, include_bias: bool = False
) -> jax.Array:
    """The filters of ``group`` as rows: f32[n, d], d the summed fan-in of its producer layers.

    Args:
      arch: the architecture.
      variables: its variables (``params`` is read).
      group: a group of ``jp.groups(arch)``.
      include_bias: append each producer's bias, where the layer has one, to its filter.
    """
    parts = []
    for layer in producers(arch)[group]:
        params = _params_at(variables, layer.path)
        kernel = params["kernel"]
        parts.append(kernel.reshape(-1, kernel.shape[-1]).T)
        if include_bias and layer.use_bias:
            parts.append(params["bias"][:, None])
    return jnp.concatenate(parts, axis=1).astype(jnp.float32)


def _is_producer(module: nn.Module, method_name: str) -> bool:
    return method_name == "__call__" and isinstance(module, Conv | nn.Dense)


@functools.partial(jax.jit, static_argnames=("arch", "train"))
def producer_outputs(
    arch: Architecture, variables: Mapping, images: jax.Array, train: bool = False
) -> dict[str, list[jax.Array]]:
    """Every producer's output for one batch: group -> [f32[N, P, n]].

    BatchNorm in eval mode, or with ``train=True`` in train mode (normalising by the batch's own
    statistics, as the network runs during training; running statistics are not updated).

    P is the layer's number of output positions (H * W; 1 for a dense layer). The conv output is
    taken before BatchNorm (with the conv's bias, for LeNet), via flax's ``capture_intermediates``
    on the `jaxprune.models.common.Conv` and ``nn.Dense`` submodules: no model hook needed. A
    network with its own ``producer_outputs`` method (a traced one) computes them itself.
    """
    own = getattr(arch, "producer_outputs", None)
    if own is not None:
        return own(variables, images, train)
    model = arch.module()
    mutable = ["intermediates", "batch_stats"] if train else ["intermediates"]
    _, state = model.apply(
        variables, images, train, capture_intermediates=_is_producer, mutable=mutable
    )
    captured = state["intermediates"]
    out = {}
    for group, layers in producers(arch).items():
        maps = []
        for layer in layers:
            node = captured
            for key in layer.path:
                node = node[key]
            y = node["__call__"][0].astype(jnp.float32)
            maps.append(y.reshape(y.shape[0], -1, y.shape[-1]))
        out[group] = maps
    return out
