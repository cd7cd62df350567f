"""One channel rule per primitive: which (value, axis) nodes index the same channels.

`analyse` walks a jaxpr and applies, per equation, the rule of its primitive to a
`jaxprune.trace.analysis.ChannelGraph`; a primitive without a rule blocks every axis it touches.
"""

import math

from jax.extend import core as jcore

from jaxprune.trace.analysis import (
    ChannelGraph,
    Concat,
    Flatten,
    is_var,
    shape,
    sub_jaxpr,
)

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
        tie_all(g, ins[len(ins) - len(sub.invars) :], sub.invars)
        g.block_all(ins[: len(ins) - len(sub.invars)], f"an operand of {name}")
        analyse(sub, g)
        tie_all(g, sub.outvars, outs)
        return
    if name in ELEMENTWISE and len(outs) > 1:
        tie_all(g, ins, outs)
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


def tie_all(g: ChannelGraph, xs, ys) -> None:
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
