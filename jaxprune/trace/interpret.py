"""Running a traced program gated (channels multiplied by gates) or pruned (narrower shapes).

Both are an evaluation of the traced jaxpr, equation by equation, with sub-programs inlined:

* **gated**: every contraction (conv, ``dot_general``) over a gated group's axis first multiplies
  that operand's channels by the gate. Contractions are the only way a group's channels leave it
  (see `jaxprune.trace.analysis`), so a zero gate removes the channel's effect exactly; behind a
  ReLU, ``d loss / d gate`` is the same as for a gate after BatchNorm (``relu(g z) = g relu(z)``).
* **pruned**: the variables are sliced to the kept channels and every shape parameter
  (``broadcast_in_dim``'s shape, ``reshape``'s sizes, a depthwise conv's group count) is rewritten
  for the narrower classes, so XLA compiles a genuinely narrower program. Tensors made from
  nothing but a shape (``iota``, random bits) are made at full width and sliced, so they hold the
  kept channels' values.

An evaluation can also hand back chosen intermediate values (`capture`): the criteria that read a
layer's output (FSABP's feature maps, GFI-AP's class-mean activations) take their producers'
outputs this way, with no hook in the model.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.trace.analysis import Concat, is_var, shape, sub_jaxpr
from jaxprune.trace.program import Program


def keep_indices(program: Program, keep: Mapping[str, np.ndarray]) -> dict[Any, np.ndarray]:
    """Class root -> kept indices along it, for every class that changes (groups and derived)."""
    graph = program.graph
    out: dict[Any, np.ndarray] = {}
    for name, root in program.groups.items():
        if len(keep[name]) != program.sizes[name]:
            out[root] = np.asarray(keep[name])

    def indices(root):
        if root in out:
            return out[root]
        form = graph.definition.get(root)
        if form is None:
            return None
        if isinstance(form, Concat):
            parts, offset, changed = [], 0, False
            for node in form.parts:
                n = shape(node[0])[node[1]]
                sub = indices(graph.find(node))
                changed |= sub is not None
                parts.append((np.arange(n) if sub is None else sub) + offset)
                offset += n
            result = np.concatenate(parts) if changed else None
        else:
            n = shape(form.inner[0])[form.inner[1]]
            sub = indices(graph.find(form.inner))
            result = (
                None
                if sub is None
                else (np.arange(form.positions)[:, None] * n + sub[None, :]).reshape(-1)
            )
        if result is not None:
            out[root] = result
        return result

    for root in list(graph.definition):
        if graph.find(root) == root:
            indices(root)
    return out


def gate_vectors(program: Program, gates: Mapping[str, jax.Array]) -> dict[Any, jax.Array]:
    """Class root -> the gate multiplying it (groups and the concats/flattens built from them)."""
    graph = program.graph
    out = {program.groups[name]: jnp.asarray(g) for name, g in gates.items()}

    def vector(root):
        if root in out:
            return out[root]
        form = graph.definition.get(root)
        if form is None:
            return None
        if isinstance(form, Concat):
            parts = [vector(graph.find(p)) for p in form.parts]
            if all(p is None for p in parts):
                return None
            result = jnp.concatenate(
                [
                    jnp.ones((shape(node[0])[node[1]],), jnp.float32) if p is None else p
                    for node, p in zip(form.parts, parts, strict=False)
                ]
            )
        else:
            inner = vector(graph.find(form.inner))
            result = None if inner is None else jnp.tile(inner, form.positions)
        if result is not None:
            out[root] = result
        return result

    for root in list(graph.definition):
        if graph.find(root) == root:
            vector(root)
    return out


def slice_leaves(program: Program, leaves: list, kept: dict[Any, np.ndarray]) -> list:
    """Variable leaves with every axis of a changing class cut to its kept indices (on the host)."""
    out = []
    for i, leaf in enumerate(leaves):
        var = program.invars[i]
        value = leaf
        for axis in range(len(shape(var))):
            idx = kept.get(program.leaf_root(i, axis))
            if idx is not None:
                value = np.take(np.asarray(value), idx, axis=axis)
        out.append(jnp.asarray(value) if value is not leaf else leaf)
    return out


def mask_leaves(program: Program, leaves: list, kept: dict[Any, np.ndarray], which) -> list:
    """The leaves numbered in ``which`` with every axis of a changing class zeroed outside its
    kept indices (shapes unchanged); the other leaves as given."""
    out = []
    for i, leaf in enumerate(leaves):
        value = leaf
        for axis in range(len(shape(program.invars[i])) if i in which else 0):
            idx = kept.get(program.leaf_root(i, axis))
            if idx is not None:
                mask = np.zeros(np.shape(leaf)[axis], np.float32)
                mask[idx] = 1.0
                bshape = [1] * np.ndim(leaf)
                bshape[axis] = -1
                value = value * jnp.asarray(mask.reshape(bshape), jnp.asarray(leaf).dtype)
        out.append(value)
    return out


# Made from nothing but their shape, with values that depend on the channel index (iota) or that
# should match the unpruned program (random bits, e.g. dropout masks): made full, then sliced.
FULL_THEN_SLICED = frozenset({"iota", "random_bits"})


class _Run:
    def __init__(self, program: Program, gates=None, kept=None, capture=frozenset()):
        self.program = program
        self.graph = program.graph
        self.gates = gates or {}
        self.kept = kept or {}
        self.new_size = {root: len(idx) for root, idx in self.kept.items()}
        self.capture = capture
        self.captured: dict[Any, jax.Array] = {}

    def new_shape(self, var) -> tuple[int, ...]:
        return tuple(
            self.new_size.get(self.graph.find((var, a)), n) for a, n in enumerate(shape(var))
        )

    def gate(self, x, var, axis):
        vec = self.gates.get(self.graph.find((var, axis)))
        if vec is None:
            return x
        bshape = [1] * x.ndim
        bshape[axis] = -1
        return x * vec.reshape(bshape).astype(x.dtype)

    def eval(self, jaxpr, consts, args):
        env = {}

        def read(v):
            return v.val if not is_var(v) else env[v]

        for var, val in zip(jaxpr.constvars, consts, strict=False):
            env[var] = val
        for var, val in zip(jaxpr.invars, args, strict=False):
            env[var] = val
        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            inner = sub_jaxpr(eqn)
            if inner is not None:
                sub, sub_consts = inner
                outs = self.eval(sub, sub_consts, invals[len(invals) - len(sub.invars) :])
            else:
                outs = self.bind(eqn, invals)
            for var, val in zip(eqn.outvars, outs, strict=False):
                if is_var(var):
                    env[var] = val
                    if var in self.capture:
                        self.captured[var] = val
        return [read(v) for v in jaxpr.outvars]

    def bind(self, eqn, invals):
        name = eqn.primitive.name
        params = dict(eqn.params)
        if self.gates and name == "conv_general_dilated" and params["feature_group_count"] == 1:
            axis = params["dimension_numbers"].lhs_spec[1]
            invals[0] = self.gate(invals[0], eqn.invars[0], axis)
        elif self.gates and name == "dot_general" and is_var(eqn.invars[0]):
            for axis in params["dimension_numbers"][0][0]:
                invals[0] = self.gate(invals[0], eqn.invars[0], axis)
        if self.new_size and name in FULL_THEN_SLICED:
            return [self.sliced(eqn.outvars[0], eqn.primitive.bind(*invals, **params))]
        if self.new_size:
            params = self.reshape_params(eqn, params, invals)
        outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))
        outs = outs if eqn.primitive.multiple_results else [outs]
        if self.new_size:
            for var, val in zip(eqn.outvars, outs, strict=False):
                if is_var(var) and tuple(val.shape) != self.new_shape(var):
                    raise AssertionError(
                        f"pruned {name} made shape {val.shape}, expected {self.new_shape(var)}"
                    )
        return outs

    def sliced(self, var, value):
        """``value`` made at full width, cut to the kept channels (iota keeps its indices)."""
        for axis in range(len(shape(var))):
            idx = self.kept.get(self.graph.find((var, axis)))
            if idx is not None:
                value = jnp.take(value, jnp.asarray(idx), axis=axis)
        return value

    def reshape_params(self, eqn, params, invals):
        name = eqn.primitive.name
        out = eqn.outvars[0]
        if "shape" in params and name != "reshape":
            params["shape"] = self.new_shape(out)
        if name == "reshape":
            params["new_sizes"] = self.new_shape(out)
            params["dimensions"] = None
        if name == "conv_general_dilated" and params["feature_group_count"] > 1:
            params["feature_group_count"] = invals[0].shape[params["dimension_numbers"].lhs_spec[1]]
        return params


def run(program: Program, leaves: list, x_leaves: list, gates=None, kept=None) -> list:
    """Evaluates the program on variable leaves (sliced when ``kept``) and input leaves."""
    closed = program.closed
    return _Run(program, gates, kept).eval(closed.jaxpr, closed.consts, [*leaves, *x_leaves])


def capture(
    program: Program, leaves: list, x_leaves: list, values: frozenset
) -> dict[Any, jax.Array]:
    """Evaluates the program (ungated, unpruned) and returns the values of the jaxpr Vars
    ``values``: ``{var: array}``."""
    closed = program.closed
    run_ = _Run(program, capture=values)
    run_.eval(closed.jaxpr, closed.consts, [*leaves, *x_leaves])
    return run_.captured
