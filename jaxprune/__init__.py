"""jaxprune: structured (filter) pruning of CNNs in JAX/Flax.

import jaxprune as jp
arch = jp.models.create("resnet56", num_classes=10)
jp.groups(arch)                               # prunable channel groups -> sizes
arch2, variables2 = jp.prune(arch, variables, keep)
jp.count_macs(arch2), jp.count_params(arch2)
net = jp.trace(model.apply, variables, x)     # any Flax model (linen fn or nnx.Module)
apply2, variables2 = net.prune(variables, keep)
"""

# Importing jaxprune changes nothing global (no XLA flag, no allocator setting, no C++ library);
# the CPU speed layer is opt-in: `jaxprune.cpu.enable()`.
from jaxprune import checkpoint, importance, methods, models, select, train, workdir
from jaxprune.flops import count_macs, count_params, macs_per_layer, params_per_layer
from jaxprune.graph import Layer, group_layers, groups, layers
from jaxprune.surgery import full_keep, prune, prune_like
from jaxprune.trace import TracedNet, trace

__version__ = "0.1.0"

__all__ = [
    "Layer",
    "TracedNet",
    "checkpoint",
    "count_macs",
    "count_params",
    "full_keep",
    "group_layers",
    "groups",
    "importance",
    "layers",
    "macs_per_layer",
    "methods",
    "models",
    "params_per_layer",
    "prune",
    "prune_like",
    "select",
    "trace",
    "train",
    "workdir",
]
