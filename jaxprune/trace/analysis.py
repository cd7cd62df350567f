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
``dot_general``), where a removed channel contributes nothing. The rules: `jaxprune.trace.rules`.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

from jax.extend import core as jcore

Node = tuple[Any, int]  # (jaxpr Var, axis)

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
