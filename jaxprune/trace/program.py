"""A traced program: its jaxpr, the variable paths of its inputs, its channel groups and layers.

`build` runs `jax.make_jaxpr` on ``fn(variables, x)``, applies the channel rules of
`jaxprune.trace.analysis`, blocks what reaches the inputs and outputs, and names every group after
the variable path of its first producer (the conv or dense kernel whose output axis it indexes).
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxprune.graph import Layer
from jaxprune.ops.conv import conv_impl
from jaxprune.trace import analysis, rules
from jaxprune.trace.analysis import Concat, Flatten, is_var, shape


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


@dataclasses.dataclass(frozen=True)
class Contraction:
    """A conv or dense layer found in the program: a contraction with a variable kernel."""

    leaf: int  # index of the kernel among the variable leaves
    kind: str  # "conv" | "dense"
    in_root: Any  # class of the contracted (input channel) axis, or None
    out_root: Any  # class of the kernel's output axis, or None
    in_size: int
    out_size: int
    kernel_taps: tuple[int, ...]  # spatial kernel sizes (conv), () for dense
    out_positions: tuple[int, ...]  # output spatial sizes per example (conv), positions (dense)
    depthwise: bool = False


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
    contractions: list[Contraction]
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
    contractions = _contractions(jaxpr, graph, num_vars)
    groups = _name_groups(graph, jaxpr, paths, contractions)
    sizes = {name: _root_size(graph, root) for name, root in groups.items()}
    if param_paths is None:
        param_leaves = frozenset(i for i, p in enumerate(paths) if p and p[0] == "params")
    else:
        param_leaves = frozenset(i for i, p in enumerate(paths) if p in param_paths)
    program = Program(
        closed, paths, num_vars, out_tree, graph, groups, sizes, contractions, param_leaves
    )
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


def _name_groups(graph, jaxpr, paths, contractions) -> dict[str, Any]:
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
    for c in contractions:  # first producer, program order
        if c.out_root in candidates and c.out_root not in named:
            named[c.out_root] = _module_path(paths[c.leaf])
    for root, (leaf, _) in sorted(candidates.items(), key=lambda kv: kv[1]):
        named.setdefault(root, _module_path(paths[leaf]))
    out, seen = {}, {}
    order = [c.out_root for c in contractions if c.out_root in named]
    order += [r for r in named if r not in order]
    for root in dict.fromkeys(order):
        name = "/".join(named[root]) or "root"
        seen[name] = seen.get(name, 0) + 1
        out[name if seen[name] == 1 else f"{name}#{seen[name]}"] = root
    return out


def _module_path(path: tuple[str, ...]) -> tuple[str, ...]:
    """A variable's module path: the leaf name and a leading ``params`` collection dropped (a
    top-level variable, e.g. ``{'w1': ...}``, keeps its own name)."""
    path = path[1:] if path and path[0] == "params" else path
    return path[:-1] if len(path) > 1 else path


def _sources(jaxpr, outer: dict, num_vars: int | None = None) -> dict:
    """var -> variable leaf index, through calls and dtype conversions."""
    src = dict(outer)
    if num_vars is not None:
        src.update({v: i for i, v in enumerate(jaxpr.invars[:num_vars])})
    for eqn in jaxpr.eqns:
        inner = analysis.sub_jaxpr(eqn)
        if inner is not None:
            sub = inner[0]
            offset = len(eqn.invars) - len(sub.invars)
            inner_src = {
                v: src[x] for v, x in zip(sub.invars, eqn.invars[offset:], strict=False) if x in src
            }
            src.update(_sources(sub, inner_src))
        elif eqn.primitive.name in ("convert_element_type", "copy", "copy_p") and (
            eqn.invars[0] in src
        ):
            src[eqn.outvars[0]] = src[eqn.invars[0]]
    return src


def _eqns(jaxpr):
    for eqn in jaxpr.eqns:
        inner = analysis.sub_jaxpr(eqn)
        if inner is not None:
            yield from _eqns(inner[0])
        else:
            yield eqn


def _contractions(jaxpr, graph, num_vars) -> list[Contraction]:
    src = {v: s for v, s in _sources(jaxpr, {}, num_vars).items() if is_var(v)}
    batch = graph.find((jaxpr.invars[num_vars], 0)) if len(jaxpr.invars) > num_vars else None
    out = []
    for eqn in _eqns(jaxpr):
        name = eqn.primitive.name
        if name == "conv_general_dilated" and eqn.invars[1] in src:
            out.append(_conv_layer(eqn, graph, src))
        elif name == "dot_general":
            found = _dense_layer(eqn, graph, src, batch)
            if found is not None:
                out.append(found)
    return out


def _conv_layer(eqn, graph, src) -> Contraction:
    lhs, rhs = eqn.invars
    o = eqn.outvars[0]
    dn = eqn.params["dimension_numbers"]
    depthwise = eqn.params["feature_group_count"] > 1
    taps = tuple(shape(rhs)[a] for a in dn.rhs_spec[2:])
    return Contraction(
        leaf=src[rhs],
        kind="conv",
        in_root=None if depthwise else graph.find((lhs, dn.lhs_spec[1])),
        out_root=graph.find((rhs, dn.rhs_spec[0])),
        in_size=1 if depthwise else shape(lhs)[dn.lhs_spec[1]],
        out_size=shape(rhs)[dn.rhs_spec[0]],
        kernel_taps=taps,
        out_positions=tuple(shape(o)[a] for a in dn.out_spec[2:]),
        depthwise=depthwise,
    )


def _dense_layer(eqn, graph, src, batch) -> Contraction | None:
    lhs, rhs = eqn.invars
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if rhs in src and not lb:
        kernel, kc, act, ac = rhs, rc, lhs, lc
    elif lhs in src and not lb:
        kernel, kc, act, ac = lhs, lc, rhs, rc
    else:
        return None
    kf = [a for a in range(len(shape(kernel))) if a not in kc]
    af = [a for a in range(len(shape(act))) if a not in ac]
    positions = math.prod(
        shape(act)[a] for a in af if not is_var(act) or graph.find((act, a)) != batch
    )
    return Contraction(
        leaf=src[kernel],
        kind="dense",
        in_root=graph.find((kernel, kc[0])) if len(kc) == 1 else None,
        out_root=graph.find((kernel, kf[0])) if len(kf) == 1 else None,
        in_size=math.prod(shape(kernel)[a] for a in kc),
        out_size=math.prod(shape(kernel)[a] for a in kf),
        kernel_taps=(),
        out_positions=(positions,),
    )


# -- the Layer list the rest of jaxprune reads (counting, CostModel, weight criteria) -------------


def segments(program: Program, root, size: int) -> list[tuple[str | None, int, int]]:
    """A class as (group name or None, channels, repeats): a concat's parts, a flatten's inner."""
    names = program.name_of()
    if root is None:
        return [(None, size, 1)]
    if root in names:
        return [(names[root], size, 1)]
    form = program.graph.definition.get(root)
    if isinstance(form, Concat):
        out = []
        for part in form.parts:
            out += segments(program, program.graph.find(part), shape(part[0])[part[1]])
        return out
    if isinstance(form, Flatten):
        inner = form.inner
        return [
            (g, n, r * form.positions)
            for g, n, r in segments(program, program.graph.find(inner), shape(inner[0])[inner[1]])
        ]
    return [(None, size, 1)]


def layers(program: Program) -> list[Layer]:
    """`jaxprune.graph.Layer` records for the program: its convs and denses, then vector params.

    MACs (`jaxprune.flops.layer_macs`) are exact for every contraction; parameters are exact for
    conv and dense kernels, biases and pairs of per-channel vectors (BatchNorm, LayerNorm).
    """
    names = program.name_of()
    out: list[Layer] = []
    used: set[int] = set()
    for c in program.contractions:
        path = _module_path(program.paths[c.leaf])
        out_group = names.get(c.out_root)
        bias = _bias_leaf(program, c, path)
        if bias is not None:
            used.add(bias)
        used.add(c.leaf)
        taps, pos = c.kernel_taps, c.out_positions
        for k, (group, n, repeats) in enumerate(segments(program, c.in_root, c.in_size)):
            common = dict(
                path=path,
                in_channels=n,
                out_channels=c.out_size,
                in_group=group,
                out_group=out_group,
                use_bias=bias is not None and k == 0,
            )
            if c.kind == "conv" and len(taps) == 2 and taps[0] == taps[1] and repeats == 1:
                out.append(Layer(kind="conv", kernel_size=taps[0], out_hw=tuple(pos), **common))
            elif c.kind == "dense" and pos == (1,):
                out.append(Layer(kind="dense", flatten_positions=repeats, **common))
            else:  # MACs exact as a 1x1 conv over every (position, tap, repeat)
                spread = math.prod(pos) * math.prod(taps) * repeats
                out.append(Layer(kind="conv", kernel_size=1, out_hw=(spread, 1), **common))
    rest = [i for i in sorted(program.param_leaves) if i not in used]
    out += _vector_layers(program, rest, out)
    return out


def _bias_leaf(program: Program, c: Contraction, path: tuple[str, ...]) -> int | None:
    for i, p in enumerate(program.paths):
        if _module_path(p) == path and p[-1] == "bias" and len(shape(program.invars[i])) == 1:
            if program.leaf_root(i, 0) == c.out_root:
                return i
    return None


def _vector_layers(program: Program, leaves: list[int], layers_so_far: list[Layer]) -> list[Layer]:
    names = program.name_of()
    vectors: dict[tuple[tuple[str, ...], str], float] = {}
    fixed: dict[tuple[str, ...], int] = {}
    for i in leaves:
        path = _module_path(program.paths[i])
        dims = shape(program.invars[i])
        grouped = [a for a in range(len(dims)) if program.leaf_root(i, a) in names]
        if len(grouped) != 1:
            fixed[path] = fixed.get(path, 0) + int(np.prod(dims, dtype=np.int64))
            continue
        group = names[program.leaf_root(i, grouped[0])]
        key = (path, group)
        vectors[key] = vectors.get(key, 0) + int(np.prod(dims)) / dims[grouped[0]]
    out = []
    for (path, group), count in vectors.items():
        n = program.sizes[group]
        pairs, odd = divmod(int(round(count)), 2)
        out += [
            Layer(path=path, kind="norm", in_channels=n, out_channels=n, out_group=group)
        ] * pairs
        if odd:
            out.append(
                Layer(path=path, kind="norm", in_channels=n, out_channels=n, out_group=group)
            )
    for path, size in fixed.items():
        out.append(Layer(path=path, kind="conv", in_channels=size, out_channels=1, out_hw=(0, 0)))
    return out
