"""`trace`: a Flax model (linen apply function or NNX module) as a prunable `TracedNet`.

    net = jp.trace(model.apply, variables, x)          # linen, or any pure fn(variables, x)
    net = jp.trace(nnx_module, x)                      # NNX
    net.groups                                         # {name: channels}
    net.apply(variables, x, gates={name: f32[n]})      # NNX: net.apply(module, x, gates=...)
    apply2, variables2 = net.prune(variables, keep)    # NNX: small = net.prune(module, keep)

A `TracedNet` also has what jaxprune's criteria, selection and counting read from an architecture
(``layers()``, ``module().apply(variables, x, train=False, gates=...)``, ``num_classes``,
``input_shape``), so ``importance.l1(net, variables)``, ``select.adaptive(net, scores, ...)`` and
``jp.count_macs(net)`` work on it unchanged. For NNX the criteria take ``net.variables(module)``.
Three more methods serve the criteria and procedures that need more than gates and weights:
``producer_outputs`` (the layers' outputs: FSABP's feature maps, GFI-AP's activations), ``mask``
(channels zeroed at unchanged shapes) and ``narrowed`` (the pruned network, traced again: what
`jaxprune.prune` is to the zoo, for the sequential policies).
"""

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.graph import Layer
from jaxprune.surgery import Keep
from jaxprune.trace import interpret, layers
from jaxprune.trace import program as programs
from jaxprune.trace.program import Program, path_names


def trace(
    model: Any, *args: Any, name: str = "traced", train_kwargs: Mapping | None = None
) -> "TracedNet":
    """Traces a model and finds its prunable channel groups.

    Args:
      model: a pure ``fn(variables, x)`` (e.g. a linen ``model.apply``) followed by
        ``variables, x``; or an ``nnx.Module`` followed by ``x``.
      *args: ``(variables, x)`` for a function, ``(x,)`` for an NNX module. ``x`` is an example
        batch (its shape is traced; other batch sizes are traced again when used).
      name: the network's name (reports).
      train_kwargs: a function's keyword arguments for train mode (BatchNorm on the batch's
        statistics), e.g. ``{'train': True, 'mutable': ['batch_stats']}`` for a linen
        ``model.apply``; read by criteria that score in train mode (GFI-AP's authors' variant).
        NNX modules need none: their train mode is ``module.train()``.

    Returns:
      a `TracedNet`.

    Raises:
      TypeError: for a model that is neither, wrong arguments, or a function that cannot be traced.
      ValueError: when the model has no prunable channel group.
    """
    from flax import nnx

    if isinstance(model, nnx.Module):
        if len(args) != 1:
            raise TypeError("jp.trace(nnx_module, x): give the module and one example input")
        if train_kwargs is not None:
            raise TypeError("an NNX module's train mode is module.train(): give no train_kwargs")
        graphdef, state = nnx.split(model)
        params = {
            path_names(p)
            for p, _ in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
        }
        fn = functools.partial(_nnx_call, graphdef)
        return TracedNet(
            fn,
            state,
            args[0],
            name,
            "nnx",
            graphdef=graphdef,
            param_paths=params,
            train_kwargs={"train": True},
        )
    if not callable(model):
        raise TypeError(f"jp.trace needs a function or an nnx.Module, got {type(model).__name__}")
    if len(args) != 2:
        raise TypeError("jp.trace(fn, variables, x): give the function, its variables and x")
    return TracedNet(model, args[0], args[1], name, "fn", train_kwargs=train_kwargs)


def _nnx_call(graphdef, state, x, train: bool = False):
    from flax import nnx

    module = nnx.merge(graphdef, state)
    if train:
        module.train()
    return module(x)


def _struct(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), tree)


class TracedNet:
    """A traced model: its groups, gated and pruned forms, and the `Architecture` duck type.

    Hashable by identity, so it can be the static ``arch`` argument of jitted criteria.
    """

    def __init__(
        self, fn, variables, x, name, kind, graphdef=None, param_paths=None, train_kwargs=None
    ):
        self.fn = fn
        self.kind = kind
        self.name = name
        self.graphdef = graphdef
        self.train_kwargs = None if train_kwargs is None else dict(train_kwargs)
        leaves, self.treedef = jax.tree_util.tree_flatten(variables)
        self.var_struct = _struct(variables)
        self.x_struct = _struct(x)
        self.param_paths = None if param_paths is None else frozenset(param_paths)
        self._programs: dict = {}
        base = self.program(x, {})
        if not base.groups:
            reasons = sorted({r for r in base.graph.reasons.values() if r})
            left_out = f"; left out: {list(base.unrepresented)}" if base.unrepresented else ""
            raise ValueError(
                f"the model has no prunable channel group (every channel axis is blocked: "
                f"{'; '.join(reasons[:6])}{left_out})"
            )
        self.base = base
        self.param_leaves = base.param_leaves
        out_shape = base.closed.out_avals[0].shape
        self.num_classes = int(out_shape[-1]) if out_shape else 1
        x_leaves = jax.tree.leaves(x)
        self.input_shape = tuple(x_leaves[0].shape[1:])

    # -- programs ---------------------------------------------------------------------------------
    def program(self, x, kwargs: Mapping) -> Program:
        """The program traced for inputs shaped like ``x`` and these keyword arguments (cached).

        Keyword values holding arrays (e.g. linen's ``rngs={'dropout': key}``) are inputs of the
        program; the others (``train=True``, ``mutable=['batch_stats']``) are fixed in it.
        """
        static, dynamic = _split_kwargs(kwargs)
        inputs = _struct((x, dynamic))
        key = (
            jax.tree.structure(inputs),
            tuple((a.shape, a.dtype) for a in jax.tree.leaves(inputs)),
            _freeze(static),
        )
        if key not in self._programs:
            prog = programs.build(
                functools.partial(_with_dynamic, self.fn),
                self.var_struct,
                inputs,
                static,
                self.param_paths,
            )
            if self._programs and prog.group_signature() != self.base.group_signature():
                raise ValueError(
                    f"tracing again with input {key[1]} and {dict(kwargs)} found other channel "
                    f"groups than the first trace; prune this mode with a net traced in it"
                )
            self._programs[key] = prog
        return self._programs[key]

    def _inputs(self, x, kwargs: Mapping) -> list:
        return jax.tree.leaves((x, _split_kwargs(kwargs)[1]))

    @property
    def groups(self) -> dict[str, int]:
        """Prunable groups -> number of channels, in forward order."""
        return dict(self.base.sizes)

    # -- variables ----------------------------------------------------------------------------
    def _leaves(self, variables) -> list:
        """The traced variable leaves, in order, from variables / an NNX module or state / a dict
        ``{'params': pure_dict}`` (`variables`)."""
        from flax import nnx

        if isinstance(variables, nnx.Module):
            variables = nnx.state(variables)
        flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
        if treedef == self.treedef:
            leaves = [leaf for _, leaf in flat]
        else:
            by_path = {path_names(p): leaf for p, leaf in flat}
            leaves = []
            for path in self.base.paths:
                leaf = by_path.get(path, by_path.get(("params", *path)))
                if leaf is None:
                    raise ValueError(
                        f"variables lack {'/'.join(path)} of the traced network "
                        f"(have e.g. {['/'.join(p) for p in list(by_path)[:4]]})"
                    )
                leaves.append(leaf)
        for leaf, want, path in zip(
            leaves, jax.tree.leaves(self.var_struct), self.base.paths, strict=False
        ):
            if np.shape(leaf) != want.shape:
                raise ValueError(
                    f"variable {'/'.join(path)} has shape {np.shape(leaf)}, the traced network "
                    f"has {want.shape}: variables of another network?"
                )
        return leaves

    def _with_leaves(self, variables, leaves: list):
        """``variables`` (in the form `_leaves` reads) with its traced leaves replaced."""
        flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
        if treedef == self.treedef:
            return jax.tree.unflatten(treedef, leaves)
        index = {path: i for i, path in enumerate(self.base.paths)}
        out = []
        for p, leaf in flat:
            path = path_names(p)
            i = index.get(path, index.get(path[1:]) if path[:1] == ("params",) else None)
            out.append(leaf if i is None else leaves[i])
        return jax.tree.unflatten(treedef, out)

    def variables(self, module) -> dict:
        """An NNX module's state as ``{'params': nested dict, string keys}``: what the criteria
        take (they read ``variables['params'][layer path]['kernel']``)."""
        from flax import nnx
        from flax.traverse_util import unflatten_dict

        flat = jax.tree_util.tree_flatten_with_path(nnx.state(module))[0]
        return {"params": unflatten_dict({path_names(p): leaf for p, leaf in flat})}

    # -- gates and keep sets ------------------------------------------------------------------
    def check_gates(self, gates: Mapping | None) -> dict:
        if not gates:
            return {}
        unknown = sorted(set(gates) - set(self.groups))
        if unknown:
            raise ValueError(
                f"gates for unknown groups {unknown}; valid groups: {list(self.groups)}"
            )
        for g, v in gates.items():
            if np.shape(v) != (self.groups[g],):
                raise ValueError(
                    f"gate for group {g!r} has shape {np.shape(v)}, expected ({self.groups[g]},)"
                )
        return dict(gates)

    def full_keep(self, keep: Keep) -> dict[str, np.ndarray]:
        from jaxprune.surgery import full_keep

        if not isinstance(keep, Mapping):
            raise TypeError(f"keep must be a mapping group -> indices, got {type(keep).__name__}")
        return full_keep(self, keep)

    # -- running --------------------------------------------------------------------------------
    def apply(self, variables, x, gates: Mapping | None = None, **kwargs):
        """The traced model's outputs, each group's channels multiplied by ``gates[group]``."""
        gates = self.check_gates(gates)
        prog = self.program(x, kwargs)
        vectors = interpret.gate_vectors(prog, gates)
        outs = interpret.run(prog, self._leaves(variables), self._inputs(x, kwargs), gates=vectors)
        return jax.tree.unflatten(prog.out_tree, outs)

    def prune(self, variables, keep: Keep):
        """Removes every channel not in ``keep``.

        Args:
          variables: the traced network's variables (linen), or the NNX module.
          keep: group -> increasing indices kept; groups not named keep every channel.

        Returns:
          linen/fn: ``(apply2, variables2)``, ``apply2(variables2, x, **kwargs)`` the narrower
          program (other batch sizes and keyword arguments, e.g. ``train=True,
          mutable=['batch_stats']``, are traced from the original function and narrowed the same
          way; keyword values holding arrays, such as linen dropout's ``rngs``, are inputs).
          NNX: a narrower copy of the module.
        """
        kept_by_name = self.full_keep(keep)
        leaves = self._leaves(variables)
        kept = interpret.keep_indices(self.base, kept_by_name)
        small = interpret.slice_leaves(self.base, leaves, kept)
        if self.kind == "nnx":
            from jaxprune.trace.nnx_resize import narrow_module

            return narrow_module(self.graphdef, self.treedef, small)
        variables2 = jax.tree.unflatten(self.treedef, small)

        def apply2(variables, x, **kwargs):
            prog = self.program(x, kwargs)
            kept_here = interpret.keep_indices(prog, kept_by_name)
            outs = interpret.run(
                prog, jax.tree.leaves(variables), self._inputs(x, kwargs), kept=kept_here
            )
            return jax.tree.unflatten(prog.out_tree, outs)

        return apply2, variables2

    def narrowed(self, variables, keep: Keep) -> tuple["TracedNet", Any]:
        """The pruned network, traced again, and its variables: what `jaxprune.prune` returns for
        a zoo architecture, so procedures that prune as they go (`jaxprune.select.backward`,
        `forward`, `iterative`) run on traced networks. Group names are kept.

        Returns:
          ``(net2, variables2)``: linen/fn: ``net2`` traces ``net.prune``'s ``apply2`` and
          ``variables2`` is its variable tree; NNX: ``net2`` traces the narrower module and
          ``variables2 = net2.variables(module2)`` (the module: ``net2.prune(variables2, {})``).
        """
        if self.kind == "nnx":
            small = self.prune(variables, keep)
            net = trace(small, self.x_struct, name=self.name)
            out = net, net.variables(small)
        else:
            apply2, variables2 = self.prune(variables, keep)
            net = TracedNet(
                apply2, variables2, self.x_struct, self.name, "fn", train_kwargs=self.train_kwargs
            )
            out = net, variables2
        if list(net.groups) != list(self.groups):
            raise AssertionError(
                f"pruning renamed groups: {list(self.groups)} -> {list(net.groups)}"
            )
        return out

    def mask(self, variables, group: str, channels) -> Any:
        """``variables`` with ``channels`` of ``group`` zeroed in every parameter indexing them
        (producers' kernels, biases and norm scales and shifts, consumers' input rows), at
        unchanged shapes: the network then computes what it computes with those channels' gates
        at zero, which is what the pruned network computes, with no recompilation.

        Args:
          variables: the network's variables (as the criteria take them).
          group: a group of ``net.groups``.
          channels: int[m] channel indices to zero.
        """
        full = {g: np.arange(n) for g, n in self.groups.items()}
        full[group] = np.setdiff1d(full[group], np.asarray(channels, np.int64))
        kept = interpret.keep_indices(self.base, full)
        leaves = interpret.mask_leaves(self.base, self._leaves(variables), kept, self.param_leaves)
        return self._with_leaves(variables, leaves)

    def producer_outputs(self, variables, images, train: bool = False) -> dict[str, list]:
        """Every group's producers' outputs for one batch: group -> [f32[N, P, n]], program order.

        A producer is a conv or dense layer whose output channels the group indexes; its output
        is read where the contraction computes it, plus the layer's bias where it has one (before
        any normalisation), as `jaxprune.importance.filters.producer_outputs` reads the zoo's. P:
        output positions per example (H * W for a conv, 1 for a dense layer on vectors).

        Args:
          variables: the network's variables.
          images: one batch, shaped like the traced input except for the batch size.
          train: run in train mode (BatchNorm on the batch's statistics, running statistics not
            updated): ``train_kwargs`` given to `trace`; NNX: ``module.train()``.
        """
        kwargs = self._train_kwargs() if train else {}
        prog = self.program(images, kwargs)
        names = prog.name_of()
        producers = [c for c in prog.contractions if c.out_root in names]
        leaves = self._leaves(variables)
        values = interpret.capture(
            prog, leaves, self._inputs(images, kwargs), frozenset(c.out_var for c in producers)
        )
        batch = prog.root(prog.invars[prog.num_vars], 0)
        out: dict[str, list] = {g: [] for g in prog.groups}
        for c in producers:
            y = values[c.out_var].astype(jnp.float32)
            bias = layers.bias_leaf(prog, c, layers.module_path(prog.paths[c.leaf]))
            if bias is not None:
                y = y + jnp.expand_dims(leaves[bias], [a for a in range(y.ndim) if a != c.out_axis])
            batch_axes = [a for a in range(y.ndim) if prog.root(c.out_var, a) == batch]
            if len(batch_axes) != 1:
                raise ValueError(
                    f"the output of {'/'.join(prog.paths[c.leaf])} has no single batch axis: its "
                    f"outputs cannot be read per example"
                )
            y = jnp.moveaxis(y, (batch_axes[0], c.out_axis), (0, -1))
            out[names[c.out_root]].append(y.reshape(y.shape[0], -1, y.shape[-1]))
        return out

    def _train_kwargs(self) -> dict:
        if self.train_kwargs is None:
            raise ValueError(
                "this criterion runs the network in train mode: trace it with "
                "jp.trace(fn, variables, x, train_kwargs=...), e.g. "
                "train_kwargs={'train': True, 'mutable': ['batch_stats']} for a linen model.apply"
            )
        return self.train_kwargs

    # -- the Architecture duck type ------------------------------------------------------------
    def layers(self, input_shape: tuple | None = None) -> list[Layer]:
        if input_shape is not None and tuple(input_shape) != self.input_shape:
            raise ValueError(
                f"a traced network counts at its traced input {self.input_shape}; trace again "
                f"for {tuple(input_shape)}"
            )
        return self._layers

    @functools.cached_property
    def _layers(self) -> list[Layer]:
        return layers.layers(self.base)

    def count_params(self) -> int:
        """Scalars in the traced network's trainable parameters."""
        return int(
            sum(
                np.prod(a.shape, dtype=np.int64)
                for i, a in enumerate(jax.tree.leaves(self.var_struct))
                if i in self.param_leaves
            )
        )

    def module(self, dtype=None) -> "_GateModule":
        return _GateModule(self)

    def resize(self, group_sizes):
        raise NotImplementedError("a traced network is pruned with net.prune(variables, keep)")

    def to_dict(self) -> dict:
        return {"name": self.name, "groups": self.groups}

    def __repr__(self) -> str:
        return f"TracedNet({self.name!r}, {self.kind}, {len(self.groups)} groups)"


class _GateModule:
    """``module().apply(variables, x, train=False, gates=...)`` as the criteria call it."""

    def __init__(self, net: TracedNet):
        self.net = net

    def apply(self, variables, x, train: bool = False, gates=None, **kwargs):
        if train or kwargs:
            raise NotImplementedError(
                "a traced network's criteria run in the traced (eval) mode only; "
                f"got train={train}, {sorted(kwargs)}"
            )
        return self.net.apply(variables, x, gates=gates)


def _with_dynamic(fn, variables, inputs, **static):
    x, dynamic = inputs
    return fn(variables, x, **static, **dynamic)


def _split_kwargs(kwargs: Mapping) -> tuple[dict, dict]:
    """(keyword arguments fixed in the program, those holding arrays: inputs of the program)."""
    dynamic = {
        k: v
        for k, v in kwargs.items()
        if any(isinstance(leaf, jax.Array | np.ndarray) for leaf in jax.tree.leaves(v))
    }
    return {k: v for k, v in kwargs.items() if k not in dynamic}, dynamic


def _freeze(value):
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple | set):
        return tuple(_freeze(v) for v in value)
    return value
