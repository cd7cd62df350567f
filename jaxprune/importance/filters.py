"""A group's filters and output maps as matrices, for the weight- and feature-based criteria.

A group's channel ``c`` is produced by every conv or dense layer in ``jp.group_layers(arch)[group]``
(BatchNorm layers excepted): one layer for a plain network, several for a ResNet stage group (the
stem or projection conv and the last conv of every block of the stage). The *filter* of channel
``c`` is the concatenation of output column ``c`` of all those kernels (the weights that removing
the channel removes), so an L2 norm over it is ``sqrt(sum_l ||w_l[..., c]||^2)``, an L1 norm
``sum_l ||w_l[..., c]||_1``, and distances between filters add up over the layers.
Its *output map* is likewise the concatenation of every producer's output (before BatchNorm) over
the positions of all images.
"""

import functools
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxprune.graph import Architecture, Layer, group_layers
from jaxprune.models.common import Conv


def producers(arch: Architecture) -> dict[str, list[Layer]]:
    """Group -> its conv and dense producer layers (no norm layers), in forward order."""
    return {
        g: [layer for layer in layers if layer.kind != "norm"]
        for g, layers in group_layers(arch).items()
    }


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
    on the `jaxprune.models.common.Conv` and ``nn.Dense`` submodules: no model hook needed.
    """
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
