"""A narrower NNX module: the traced module's graph with sliced variables and matching widths."""

import jax


def narrow_module(graphdef, treedef, leaves):
    """``nnx.merge`` of the original graph with sliced leaves, then each standard layer's static
    widths (``in_features``, ``out_features``, ``num_features``, ``kernel_shape``,
    ``feature_group_count``) set from its new variables, so it runs, trains and prints right."""
    from flax import nnx

    module = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    for _, sub in nnx.iter_modules(module):
        if isinstance(sub, nnx.Conv):
            kernel = sub.kernel.get_value()
            depthwise = sub.feature_group_count > 1 and sub.feature_group_count == sub.in_features
            sub.out_features = kernel.shape[-1]
            sub.in_features = kernel.shape[-2] * (kernel.shape[-1] if depthwise else 1)
            if depthwise:
                sub.feature_group_count = kernel.shape[-1]
            sub.kernel_shape = tuple(kernel.shape)
        elif isinstance(sub, nnx.Linear):
            sub.in_features, sub.out_features = sub.kernel.get_value().shape
        elif isinstance(sub, nnx.BatchNorm | nnx.LayerNorm | nnx.RMSNorm):
            vector = sub.scale if getattr(sub, "scale", None) is not None else sub.mean
            sub.num_features = vector.get_value().shape[-1]
    return module
