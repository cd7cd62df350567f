"""Exact structured surgery: remove channels for real, giving a narrower architecture and variables.

``prune(arch, variables, keep)`` slices every array that a group's channels index (conv kernels on
their output and input axes, biases, BatchNorm scale/bias/mean/var, dense rows, including the rows
of a dense layer that reads a flattened feature map), and returns the narrower architecture. The
result is checked against ``jax.eval_shape`` of the new model's ``init``.
"""

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxprune.graph import Architecture, Layer, groups

Keep = Mapping[str, Sequence[int] | np.ndarray | jax.Array]
# (path..., leaf name) -> [(axis, indices kept along it)]
_Slicers = dict[tuple[str, ...], list[tuple[int, np.ndarray]]]


def full_keep(arch: Architecture, keep: Keep) -> dict[str, np.ndarray]:
    """Checks ``keep`` and completes it with every channel of the groups it does not name.

    Raises:
      ValueError: naming the group, for an unknown group, indices out of range, duplicated or not
        increasing, an empty keep set, or indices that are not integers.
    """
    group_sizes = groups(arch)
    unknown = sorted(set(keep) - set(group_sizes))
    if unknown:
        raise ValueError(f"unknown groups {unknown}; valid groups: {list(group_sizes)}")
    out = {}
    for group, size in group_sizes.items():
        if group not in keep:
            out[group] = np.arange(size)
            continue
        indices = np.asarray(keep[group])
        if indices.ndim != 1:
            raise ValueError(
                f"group {group!r}: keep indices must be 1-D, got shape {indices.shape}"
            )
        if indices.size == 0:
            raise ValueError(f"group {group!r}: keep set is empty (a group must keep a channel)")
        if not np.issubdtype(indices.dtype, np.integer):
            raise ValueError(f"group {group!r}: keep indices must be integers, got {indices.dtype}")
        if indices.min() < 0 or indices.max() >= size:
            raise ValueError(
                f"group {group!r}: keep indices must lie in [0, {size}), got "
                f"{int(indices.min())}..{int(indices.max())}"
            )
        steps = np.diff(indices)
        if np.any(steps == 0):
            raise ValueError(f"group {group!r}: keep indices contain duplicates")
        if np.any(steps < 0):
            raise ValueError(f"group {group!r}: keep indices must be increasing")
        out[group] = indices.astype(np.int64)
    return out


def _dense_rows(layer: Layer, channels: np.ndarray) -> np.ndarray:
    """Rows of a dense kernel that read ``channels`` of a flattened NHWC map (channel-minor)."""
    positions = np.arange(layer.flatten_positions)[:, None] * layer.in_channels
    return (positions + channels[None, :]).reshape(-1)


def _slicers(arch: Architecture, keep: dict[str, np.ndarray]) -> tuple[_Slicers, _Slicers]:
    """Per-leaf slicing rules for the ``params`` and ``batch_stats`` collections."""
    params: _Slicers = {}
    stats: _Slicers = {}
    for layer in arch.layers(None):
        everything_in = np.arange(layer.in_channels)
        out_idx = keep[layer.out_group] if layer.out_group else np.arange(layer.out_channels)
        in_idx = keep[layer.in_group] if layer.in_group else everything_in
        if layer.kind == "conv":
            params[(*layer.path, "kernel")] = [(2, in_idx), (3, out_idx)]
        elif layer.kind == "dense":
            params[(*layer.path, "kernel")] = [(0, _dense_rows(layer, in_idx)), (1, out_idx)]
        else:
            params[(*layer.path, "scale")] = [(0, out_idx)]
            stats[(*layer.path, "mean")] = [(0, out_idx)]
            stats[(*layer.path, "var")] = [(0, out_idx)]
        if layer.kind == "norm" or layer.use_bias:
            params[(*layer.path, "bias")] = [(0, out_idx)]
    return params, stats


def _slice_collection(tree: Mapping, slicers: _Slicers, what: str) -> dict:
    flat = traverse_util.flatten_dict(tree)
    unknown = sorted("/".join(k) for k in set(flat) - set(slicers))
    if unknown:
        raise ValueError(f"{what} has arrays the architecture does not describe: {unknown[:5]}")
    missing = sorted("/".join(k) for k in set(slicers) - set(flat))
    if missing:
        raise ValueError(f"{what} lacks arrays the architecture has: {missing[:5]}")
    out = {}
    for key, value in flat.items():
        for axis, indices in slicers[key]:
            if indices.shape[0] != value.shape[axis] or np.any(
                indices != np.arange(value.shape[axis])
            ):
                # on the host: under XLA each array shape would compile a gather of its own
                value = np.take(np.asarray(value), indices, axis=axis)
        out[key] = jnp.asarray(value)
    return traverse_util.unflatten_dict(out)


@functools.lru_cache(maxsize=64)
def variable_shapes(arch: Architecture) -> dict:
    """Shapes and dtypes of ``arch.module().init`` (jax.ShapeDtypeStruct leaves), not computed."""
    x = jax.ShapeDtypeStruct((1, *arch.input_shape), jnp.float32)
    return jax.eval_shape(lambda x: arch.module().init(jax.random.key(0), x, train=False), x)


def _check_shapes(arch: Architecture, variables: Mapping) -> None:
    expected = variable_shapes(arch)
    for collection, tree in variables.items():
        want = traverse_util.flatten_dict(expected.get(collection, {}))
        got = traverse_util.flatten_dict(tree)
        for key in set(want) | set(got):
            if key not in want or key not in got or want[key].shape != got[key].shape:
                raise AssertionError(
                    f"surgery produced {collection}/{'/'.join(key)} of shape "
                    f"{getattr(got.get(key), 'shape', None)}, the pruned model expects "
                    f"{getattr(want.get(key), 'shape', None)}"
                )


def prune(arch: Architecture, variables: Mapping, keep: Keep) -> tuple[Architecture, dict]:
    """Removes every channel not in ``keep``: a narrower architecture and sliced variables.

    Args:
      arch: the architecture ``variables`` belong to.
      variables: ``{'params': ..., 'batch_stats': ...}`` as ``arch.module().init`` makes them
        (``batch_stats`` absent for models without BatchNorm).
      keep: group -> increasing int indices of the channels to keep; groups not named keep all.

    Returns:
      ``(pruned_arch, pruned_variables)``; inputs are not modified. With the pruned channels gated
      to zero, the full model computes the same logits as the pruned one (BatchNorm in eval mode).
    """
    indices = full_keep(arch, keep)
    param_slicers, stat_slicers = _slicers(arch, indices)
    out = {}
    for collection, tree in variables.items():
        if collection == "params":
            out[collection] = _slice_collection(tree, param_slicers, "params")
        elif collection == "batch_stats":
            out[collection] = _slice_collection(tree, stat_slicers, "batch_stats")
        else:
            raise ValueError(f"cannot prune variable collection {collection!r}")
    pruned_arch = arch.resize({g: len(i) for g, i in indices.items()})
    _check_shapes(pruned_arch, out)
    return pruned_arch, out


def prune_like(arch: Architecture, tree: Any, keep: Keep) -> Any:
    """Slices every subtree of ``tree`` that is shaped like ``arch``'s params; other leaves stay.

    For optimizer states: an optax momentum (trace) or Adam moments are params-shaped subtrees, so
    ``prune_like(arch, opt_state, keep)`` lets fine-tuning continue without resetting them.
    """
    params_structure = jax.tree.structure(variable_shapes(arch)["params"])
    param_slicers, _ = _slicers(arch, full_keep(arch, keep))

    def is_params(node: Any) -> bool:
        return isinstance(node, Mapping) and jax.tree.structure(node) == params_structure

    def slice_node(node: Any) -> Any:
        return _slice_collection(node, param_slicers, "params") if is_params(node) else node

    return jax.tree.map(slice_node, tree, is_leaf=is_params)
