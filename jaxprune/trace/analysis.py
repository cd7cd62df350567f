"""Channel groups found in a jaxpr: a union-find over (value, axis) with one rule per primitive.

Every axis of every value in the program is a node. A rule per primitive ties the axes that index
the same channels (an elementwise op ties its operands' axes to its output's, a convolution its
kernel's output-feature axis to its output's channel axis, a contraction its two contracted axes).
Two derived forms keep the map exact where channels move: ``Concat`` (a concatenated axis is the
segments of its operands' axes, with offsets) and ``Flatten`` (merging ``(P, C)`` into one axis maps
channel c to the indices ``p * C + c``).

A class is *blocked*, i.e. not prunable, when it reaches the model's inputs or outputs (except an
output that is an updated variable, e.g. BatchNorm's ``batch_stats`` in train mode, which follows
its variable), a program constant, a reduction over it (LayerNorm's mean over channels: pruning
would change the statistics), a slice, pad, split of it, a grouped convolution other than
depthwise, or any primitive without a rule (``scan``, ``while``, ``cond``, ``gather``...). A group
is an unblocked class that holds at least one variable axis and one computed value: removing its
channels is then exact, because every way channels leave a class is a contraction (conv or
``dot_general``), where a removed channel contributes nothing.
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from jax.extend import core as jcore

Node = tuple[Any, int]  # (jaxpr Var, axis)

# Primitives whose operands of the output's rank are tied axis by axis (scalars broadcast).
ELEMENTWISE = frozenset(
    """abs acos acosh add add_any and asin asinh atan atan2 atanh cbrt ceil clamp conj copy copy_p
    cos cosh convert_element_type div eq erf erf_inv erfc exp exp2 expm1 floor ge gt imag
    integer_pow is_finite le lgamma digamma log log1p logistic lt max min mul ne neg nextafter
    not or pow real reduce_precision rem round rsqrt select_n sign sin sinh sqrt square
    stop_gradient sub
    tan tanh xor sharding_constraint optimization_barrier""".split()
)
REDUCTIONS = frozenset(
    "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or argmax argmin".split()
)
# Primitives carrying a sub-program with the same inputs and outputs: analysed and run inline.
CALLS = {
    "pjit": "jaxpr",
    "jit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "remat": "jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
}


@dataclasses.dataclass(frozen=True)
class Concat:
    """A concatenated axis: its operands' axes in order."""

    parts: tuple[Node, ...]


@dataclasses.dataclass(frozen=True)
class Flatten:
    """An axis made by merging ``positions`` outer indices with a channel axis (channel-minor)."""

    positions: int
    inner: Node


Derived = Concat | Flatten


def sub_jaxpr(eqn) -> tuple[jcore.Jaxpr, Sequence[Any]] | None:
    """(open jaxpr, consts) of a call-like equation, or None."""
    key = CALLS.get(eqn.primitive.name)
    if key is None or key not in eqn.params:
        return None
    inner = eqn.params[key]
    if isinstance(inner, jcore.ClosedJaxpr):
        return inner.jaxpr, inner.consts
    return inner, ()


def is_var(x) -> bool:
    return isinstance(x, jcore.Var) and not isinstance(x, jcore.Literal)


def shape(x) -> tuple[int, ...]:
    return tuple(getattr(x.aval, "shape", ()))


class ChannelGraph:
    """Union-find over (var, axis) nodes, with derived (concat/flatten) and blocked classes."""

    def __init__(self):
        self.parent: dict[Node, Node] = {}
        self.definition: dict[Node, Derived] = {}
        self.blocked: set[Node] = set()
        self.reasons: dict[Node, str] = {}

    # -- union-find ------------------------------------------------------------------------------
    def find(self, node: Node) -> Node:
        self.parent.setdefault(node, node)
        root = node
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[node] != root:
            self.parent[node], node = root, self.parent[node]
        return root

    def union(self, a: Node, b: Node) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        self.parent[rb] = ra
        if rb in self.blocked:
            self.blocked.add(ra)
            self.reasons.setdefault(ra, self.reasons.get(rb, ""))
        da, db = self.definition.pop(ra, None), self.definition.pop(rb, None)
        if da is not None and db is not None:
            self.definition[ra] = da
            if _same_form(self, da, db):
                for x, y in _children_pairs(da, db):
                    self.union(x, y)
            else:
                self.block(ra, "two different concatenations/flattenings are added together")
        elif da is not None or db is not None:
            self.definition[ra] = da if da is not None else db

    def block(self, node: Node, reason: str) -> None:
        root = self.find(node)
        if root not in self.blocked:
            self.blocked.add(root)
            self.reasons[root] = reason

    def define(self, node: Node, form: Derived) -> None:
        root = self.find(node)
        if root in self.definition:
            self.union(node, _fresh_with(self, form))
        else:
            self.definition[root] = form

    def block_all(self, values, reason: str) -> None:
        for v in values:
            if is_var(v):
                for axis in range(len(shape(v))):
                    self.block((v, axis), reason)

    def is_blocked(self, node: Node) -> bool:
        return self.find(node) in self.blocked

    def children(self, root: Node) -> list[Node]:
        form = self.definition.get(root)
        if form is None:
            return []
        parts = form.parts if isinstance(form, Concat) else (form.inner,)
        return [self.find(p) for p in parts]

    def propagate_blocks(self) -> None:
        """A blocked derived class blocks its parts (their channels reach what blocked it)."""
        changed = True
        while changed:
            changed = False
            for root in list(self.definition):
                if self.find(root) != root or root not in self.blocked:
                    continue
                for child in self.children(root):
                    if child not in self.blocked:
                        self.blocked.add(child)
                        self.reasons[child] = self.reasons.get(root, "")
                        changed = True


class _Fresh:
    """A placeholder var for a derived form that must be united with an existing definition."""

    aval = None


def _fresh_with(graph: ChannelGraph, form: Derived) -> Node:
    node = (_Fresh(), 0)
    graph.definition[graph.find(node)] = form
    return node


def _same_form(graph: ChannelGraph, a: Derived, b: Derived) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, Flatten):
        return a.positions == b.positions
    return len(a.parts) == len(b.parts) and all(
        shape(x[0])[x[1]] == shape(y[0])[y[1]] for x, y in zip(a.parts, b.parts, strict=False)
    )


def _children_pairs(a: Derived, b: Derived) -> list[tuple[Node, Node]]:
    if isinstance(a, Flatten):
        return [(a.inner, b.inner)]
    return list(zip(a.parts, b.parts, strict=False))


# -- rules -----------------------------------------------------------------------------------------


def analyse(jaxpr: jcore.Jaxpr, graph: ChannelGraph) -> None:
    """Applies every equation's rule (recursing into sub-programs) to ``graph``."""
    for eqn in jaxpr.eqns:
        _rule(eqn, graph)


def _rule(eqn, g: ChannelGraph) -> None:
    name = eqn.primitive.name
    ins, outs = eqn.invars, eqn.outvars
    inner = sub_jaxpr(eqn)
    if inner is not None:
        sub, _ = inner
        g.block_all(sub.constvars, "a constant of the program")
        _tie_all(g, ins[len(ins) - len(sub.invars) :], sub.invars)
        g.block_all(ins[: len(ins) - len(sub.invars)], f"an operand of {name}")
        analyse(sub, g)
        _tie_all(g, sub.outvars, outs)
        return
    if name in ELEMENTWISE and len(outs) > 1:
        _tie_all(g, ins, outs)
        return
    if name in ELEMENTWISE:
        out = outs[0]
        for x in ins:
            if not is_var(x) or not shape(x):
                continue
            if len(shape(x)) != len(shape(out)):
                g.block_all([x, out], f"{name} of mismatched ranks")
                continue
            for axis, (a, b) in enumerate(zip(shape(x), shape(out), strict=False)):
                if a == b:
                    g.union((x, axis), (out, axis))
        return
    rule = RULES.get(name)
    if rule is None:
        g.block_all([*ins, *outs], f"primitive {name} has no channel rule")
        return
    rule(eqn, g)


def _tie_all(g: ChannelGraph, xs, ys) -> None:
    for x, y in zip(xs, ys, strict=False):
        if is_var(x) and is_var(y):
            for axis in range(len(shape(x))):
                g.union((x, axis), (y, axis))


def _broadcast_in_dim(eqn, g):
    (x,), (out,) = eqn.invars[:1], eqn.outvars
    if not is_var(x):
        return
    for i, d in enumerate(eqn.params["broadcast_dimensions"]):
        if shape(x)[i] == shape(out)[d]:
            g.union((x, i), (out, d))


def _transpose(eqn, g):
    x, out = eqn.invars[0], eqn.outvars[0]
    for i, p in enumerate(eqn.params["permutation"]):
        g.union((x, p), (out, i))


def _squeeze(eqn, g):
    x, out = eqn.invars[0], eqn.outvars[0]
    dropped = {d % len(shape(x)) for d in eqn.params["dimensions"]}
    kept = [a for a in range(len(shape(x))) if a not in dropped]
    for i, a in enumerate(kept):
        g.union((x, a), (out, i))


def _reduction(eqn, g):
    x, out = eqn.invars[0], eqn.outvars[0]
    axes = set(eqn.params["axes"])
    kept = [a for a in range(len(shape(x))) if a not in axes]
    for a in axes:
        g.block((x, a), f"{eqn.primitive.name} over this axis (pruning would change it)")
    for i, a in enumerate(kept):
        g.union((x, a), (out, i))


def reshape_chunks(src: tuple[int, ...], dst: tuple[int, ...]):
    """Pairs (src axes, dst axes) whose sizes multiply to the same number; size-1 axes left out."""
    a = [i for i, s in enumerate(src) if s != 1]
    b = [i for i, s in enumerate(dst) if s != 1]
    chunks, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        ca, cb = [a[i]], [b[j]]
        pa, pb = src[a[i]], dst[b[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                ca.append(a[i])
                pa *= src[a[i]]
                i += 1
            else:
                cb.append(b[j])
                pb *= dst[b[j]]
                j += 1
        chunks.append((ca, cb))
    return chunks


def _reshape(eqn, g):
    x, out = eqn.invars[0], eqn.outvars[0]
    if not is_var(x):
        return
    for ca, cb in reshape_chunks(shape(x), shape(out)):
        if len(ca) == 1 and len(cb) == 1:
            g.union((x, ca[0]), (out, cb[0]))
        elif len(cb) == 1:  # merge: (..., P, C) -> P*C, channel-minor
            for a in ca[:-1]:
                g.block((x, a), "merged into a flattened axis as an outer index")
            positions = math.prod(shape(x)[a] for a in ca[:-1])
            g.define((out, cb[0]), Flatten(positions, (x, ca[-1])))
        else:
            for a in ca:
                g.block((x, a), "split by a reshape")
            for b in cb:
                g.block((out, b), "made by splitting an axis")


def _concatenate(eqn, g):
    out, dim = eqn.outvars[0], eqn.params["dimension"]
    parts = []
    for x in eqn.invars:
        if not is_var(x):
            g.block((out, dim), "concatenated with a constant")
            return
        parts.append((x, dim))
        for a in range(len(shape(out))):
            if a != dim:
                g.union((x, a), (out, a))
    g.define((out, dim), Concat(tuple(parts)))


def _same_size_axes(eqn, g):
    """slice, pad, rev, dynamic_slice...: axes that keep their size tie; the others block."""
    x = eqn.invars[0]
    for out in eqn.outvars:
        for a, (n, m) in enumerate(zip(shape(x), shape(out), strict=False)):
            changed = n != m or _touched(eqn, a)
            if changed:
                g.block((x, a), f"{eqn.primitive.name} along this axis")
                g.block((out, a), f"{eqn.primitive.name} along this axis")
            else:
                g.union((x, a), (out, a))
    g.block_all(eqn.invars[1:], f"index operand of {eqn.primitive.name}")


def _touched(eqn, axis: int) -> bool:
    p = eqn.params
    if eqn.primitive.name == "pad":
        lo, hi, interior = p["padding_config"][axis]
        return bool(lo or hi or interior)
    if eqn.primitive.name == "rev":
        return axis in p["dimensions"]
    if eqn.primitive.name == "split":
        return axis == p["axis"]
    return False


def _reduce_window(eqn, g):
    x, out = eqn.invars[0], eqn.outvars[0]
    p = eqn.params
    for a in range(len(shape(x))):
        plain = (
            p["window_dimensions"][a] == 1
            and p["window_strides"][a] == 1
            and tuple(p["padding"][a]) == (0, 0)
            and p.get("base_dilation", (1,) * len(shape(x)))[a] == 1
        )
        if plain and shape(x)[a] == shape(out)[a]:
            g.union((x, a), (out, a))
        else:
            g.block((x, a), "pooled over")
            g.block((out, a), "pooled over")


def _dot_general(eqn, g):
    lhs, rhs = eqn.invars
    out = eqn.outvars[0]
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    for a, b in zip(lc, rc, strict=False):
        if is_var(lhs) and is_var(rhs):
            g.union((lhs, a), (rhs, b))
    for i, (a, b) in enumerate(zip(lb, rb, strict=False)):
        g.union((lhs, a), (out, i))
        g.union((rhs, b), (out, i))
    k = len(lb)
    free_l = [a for a in range(len(shape(lhs))) if a not in lc and a not in lb]
    free_r = [a for a in range(len(shape(rhs))) if a not in rc and a not in rb]
    for i, a in enumerate(free_l):
        g.union((lhs, a), (out, k + i))
    for i, a in enumerate(free_r):
        g.union((rhs, a), (out, k + len(free_l) + i))


def _conv(eqn, g):
    lhs, rhs = eqn.invars
    out = eqn.outvars[0]
    p = eqn.params
    dn = p["dimension_numbers"]
    lspec, rspec, ospec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    if p["batch_group_count"] != 1:
        g.block_all([lhs, rhs, out], "convolution with batch_group_count > 1")
        return
    g.union((lhs, lspec[0]), (out, ospec[0]))
    for a in rspec[2:]:  # spatial axes are not tied: they are not channels
        g.block((rhs, a), "a kernel's spatial axis")
    fgc = p["feature_group_count"]
    c_in, c_out = shape(lhs)[lspec[1]], shape(rhs)[rspec[0]]
    if fgc == 1:
        g.union((lhs, lspec[1]), (rhs, rspec[1]))
        g.union((rhs, rspec[0]), (out, ospec[1]))
    elif fgc == c_in == c_out:  # depthwise: channel c reads channel c
        g.union((lhs, lspec[1]), (out, ospec[1]))
        g.union((rhs, rspec[0]), (out, ospec[1]))
        g.block((rhs, rspec[1]), "a depthwise kernel's unit input axis")
    else:
        g.block_all([lhs, rhs, out], "grouped convolution (other than depthwise)")


def _fresh_output(eqn, g):
    """iota, random bits: an output made from no channels (its shape follows its consumers)."""
    g.block_all(eqn.invars, f"operand of {eqn.primitive.name}")


RULES = {
    "iota": _fresh_output,
    "random_bits": _fresh_output,
    "broadcast_in_dim": _broadcast_in_dim,
    "transpose": _transpose,
    "squeeze": _squeeze,
    "reshape": _reshape,
    "concatenate": _concatenate,
    "slice": _same_size_axes,
    "pad": _same_size_axes,
    "rev": _same_size_axes,
    "split": _same_size_axes,
    "dynamic_slice": _same_size_axes,
    "reduce_window_sum": _reduce_window,
    "reduce_window_max": _reduce_window,
    "reduce_window_min": _reduce_window,
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    **{name: _reduction for name in REDUCTIONS},
}


def inline(jaxpr: jcore.Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    """Evaluates ``jaxpr`` with every call-like sub-program inlined (under `jax.make_jaxpr` this
    gives a flat program: a sub-jaxpr that JAX shares between call sites, such as ``relu``'s,
    then gets fresh variables at each site)."""
    env = dict(zip(jaxpr.constvars, consts, strict=False))
    env.update(zip(jaxpr.invars, args, strict=False))

    def read(v):
        return env[v] if is_var(v) else v.val

    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        inner = sub_jaxpr(eqn)
        if inner is not None:
            sub, sub_consts = inner
            outs = inline(sub, sub_consts, invals[len(invals) - len(sub.invars) :])
        else:
            outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            outs = outs if eqn.primitive.multiple_results else [outs]
        env.update((v, o) for v, o in zip(eqn.outvars, outs, strict=False) if is_var(v))
    return [read(v) for v in jaxpr.outvars]
