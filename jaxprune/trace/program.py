"""A traced program: its jaxpr, the variable paths of its inputs, its channel groups.

`build` runs `jax.make_jaxpr` on ``fn(variables, x)``, applies the channel rules of
`jaxprune.trace.rules`, blocks what reaches the inputs and outputs, finds the convs and dense
layers (`jaxprune.trace.contractions`) and names every group after the variable path of its first
producer (the conv or dense kernel whose output axis it indexes), in program order. Its `Layer`
list: `jaxprune.trace.layers`.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from jaxprune.ops.conv import conv_impl
from jaxprune.trace import analysis, contractions, rules
from jaxprune.trace.analysis import is_var, shape
from jaxprune.trace.contractions import Contraction
from jaxprune.trace.layers import layers, module_path


def path_names(path) -> tuple[str, ...]:
    """A pytree key path as strings; an NNX ``Variable``'s trailing ``value`` dropped."""
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
        else:
            names.append(str(key))
    if names and names[-1] == "value":
        names.pop()
    return tuple(names)


@dataclasses.dataclass(eq=False)
class Program:
    """One traced mode of a model (a fixed input shape and fixed keyword arguments)."""

    closed: Any  # jax ClosedJaxpr
    paths: list[tuple[str, ...]]  # variable leaf paths, in flattening order
    num_vars: int
    out_tree: Any
    graph: analysis.ChannelGraph
    groups: dict[str, Any]  # name -> root, forward order
    sizes: dict[str, int]
    contractions: list[Contraction]  # program order
    param_leaves: frozenset[int]  # the trainable variables (counted as parameters)
    unrepresented: tuple[str, ...] = ()  # prunable classes left out: see `build`

    @property
    def invars(self):
        return self.closed.jaxpr.invars

    def root(self, var, axis: int):
        return self.graph.find((var, axis))

    def leaf_root(self, leaf: int, axis: int):
        return self.graph.find((self.invars[leaf], axis))

    def name_of(self) -> dict[Any, str]:
        return {root: name for name, root in self.groups.items()}

    def group_signature(self) -> dict[str, frozenset]:
        """Group -> the set of (variable path, axis) it indexes directly."""
        out = {name: set() for name in self.groups}
        names = self.name_of()
        for i, path in enumerate(self.paths):
            for axis in range(len(shape(self.invars[i]))):
                name = names.get(self.leaf_root(i, axis))
                if name is not None:
                    out[name].add(("/".join(path), axis))
        return {k: frozenset(v) for k, v in out.items()}


def build(
    fn: Callable,
    variables: Any,
    x: Any,
    kwargs: dict | None = None,
    param_paths: frozenset[tuple[str, ...]] | None = None,
) -> Program:
    """Traces ``fn(variables, x, **kwargs)`` and finds its channel groups.

    A group must have a producer that `jaxprune.graph.Layer` can describe (the output axis of a
    conv or dense kernel, or per-channel vectors), so that counting, the cost model and the weight
    criteria see it. Classes that only index an axis of a kernel with several output axes (the
    heads and head dimensions of flax's attention, whose kernels are [d, heads, head_dim]) are
    exactly prunable but are left out (``unrepresented``): attention stays unpruned.

    Args:
      fn, variables, x, kwargs: what is traced; ``variables`` may hold ShapeDtypeStructs.
      param_paths: the variable paths that are trainable parameters; None: linen's ``params``
        collection (paths starting with ``params``).

    Raises:
      TypeError: when ``fn`` cannot be traced with these arguments.
    """
    kwargs = dict(kwargs or {})
    leaves_with_paths, _ = jax.tree_util.tree_flatten_with_path(variables)
    paths = [path_names(p) for p, _ in leaves_with_paths]
    try:
        with conv_impl("xla"):
            closed, out_shape = jax.make_jaxpr(lambda v, x: fn(v, x, **kwargs), return_shape=True)(
                variables, x
            )
    except Exception as error:  # noqa: BLE001 - any failure to trace is the user's to see
        raise TypeError(
            f"jp.trace could not trace the function with these arguments "
            f"({type(error).__name__}: {error}); it must be a pure fn(variables, x) of JAX arrays"
        ) from error
    flat_args = jax.tree.leaves((variables, x))
    closed = jax.make_jaxpr(lambda *args: analysis.inline(closed.jaxpr, closed.consts, args))(
        *flat_args
    )
    out_leaves, out_tree = jax.tree_util.tree_flatten_with_path(out_shape)
    jaxpr = closed.jaxpr
    graph = analysis.ChannelGraph()
    num_vars = len(paths)
    graph.block_all(jaxpr.constvars, "a constant of the program")
    graph.block_all(jaxpr.invars[num_vars:], "reaches the model's input")
    rules.analyse(jaxpr, graph)
    by_path = {p: i for i, p in enumerate(paths)}
    for (out_path, _), var in zip(out_leaves, jaxpr.outvars, strict=False):
        leaf = _state_leaf(path_names(out_path), by_path)
        if leaf is not None and is_var(var) and shape(var) == shape(jaxpr.invars[leaf]):
            rules.tie_all(graph, [jaxpr.invars[leaf]], [var])
        else:
            graph.block_all([var], "reaches the model's output")
    graph.propagate_blocks()
    found = contractions.find(jaxpr, graph, num_vars)
    groups = _name_groups(graph, jaxpr, paths, found)
    sizes = {name: _root_size(graph, root) for name, root in groups.items()}
    if param_paths is None:
        param_leaves = frozenset(i for i, p in enumerate(paths) if p and p[0] == "params")
    else:
        param_leaves = frozenset(i for i, p in enumerate(paths) if p in param_paths)
    program = Program(closed, paths, num_vars, out_tree, graph, groups, sizes, found, param_leaves)
    described = {layer.out_group for layer in layers(program)}
    left_out = tuple(name for name in groups if name not in described)
    if left_out:
        program.groups = {n: r for n, r in groups.items() if n in described}
        program.sizes = {n: sizes[n] for n in program.groups}
        program.unrepresented = left_out
    return program


def _state_leaf(out_path: tuple[str, ...], by_path: dict) -> int | None:
    """The variable an output leaf updates (its path ends with the variable's path), or None."""
    for start in range(len(out_path)):
        leaf = by_path.get(out_path[start:])
        if leaf is not None:
            return leaf
    return None


def _root_size(graph, root) -> int:
    var, axis = root
    if getattr(var, "aval", None) is not None:
        return shape(var)[axis]
    for node in graph.parent:
        if graph.find(node) == root and getattr(node[0], "aval", None) is not None:
            return shape(node[0])[node[1]]
    raise AssertionError("class without a size")


def _all_vars(jaxpr):
    for eqn in jaxpr.eqns:
        yield from (v for v in eqn.outvars if is_var(v))
        inner = analysis.sub_jaxpr(eqn)
        if inner is not None:
            yield from inner[0].invars
            yield from _all_vars(inner[0])


def _name_groups(graph, jaxpr, paths, found) -> dict[str, Any]:
    """Unblocked, underived classes with a variable axis and a computed value, named, in order."""
    computed = set()
    for var in _all_vars(jaxpr):
        for axis in range(len(shape(var))):
            computed.add(graph.find((var, axis)))
    candidates = {}
    for i, var in enumerate(jaxpr.invars[: len(paths)]):
        for axis in range(len(shape(var))):
            root = graph.find((var, axis))
            if root in graph.blocked or root in graph.definition or root not in computed:
                continue
            candidates.setdefault(root, (i, axis))
    named: dict[Any, tuple[str, ...]] = {}
    for c in found:  # first producer, program order
        if c.out_root in candidates and c.out_root not in named:
            named[c.out_root] = module_path(paths[c.leaf])
    for root, (leaf, _) in sorted(candidates.items(), key=lambda kv: kv[1]):
        named.setdefault(root, module_path(paths[leaf]))
    out, seen = {}, {}
    order = [c.out_root for c in found if c.out_root in named]
    order += [r for r in named if r not in order]
    for root in dict.fromkeys(order):
        name = "/".join(named[root]) or "root"
        seen[name] = seen.get(name, 0) + 1
        out[name if seen[name] == 1 else f"{name}#{seen[name]}"] = root
    return out
