"""The convs and dense layers of a traced program: contractions with a variable kernel.

A `Contraction` records where a kernel's input and output channels sit in the channel graph, its
sizes and spatial extent (for counting), and the value it computes (for criteria that read a
layer's output, e.g. FSABP's feature maps and GFI-AP's class-mean activations).
"""

import dataclasses
import math
from typing import Any

from jaxprune.trace import analysis
from jaxprune.trace.analysis import is_var, shape


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
    out_var: Any = None  # the jaxpr Var the contraction computes
    out_axis: int | None = None  # its axis indexed by the kernel's output channels, or None


def find(jaxpr, graph: analysis.ChannelGraph, num_vars: int) -> list[Contraction]:
    """The program's contractions with a variable kernel, in program order."""
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
        out_var=o,
        out_axis=dn.out_spec[1],
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
    # dot_general's output axes: lhs free axes, then rhs free axes (no batch axes here)
    out_axis = None
    if len(kf) == 1:
        out_axis = len(af) if kernel is rhs else 0
    return Contraction(
        leaf=src[kernel],
        kind="dense",
        in_root=graph.find((kernel, kc[0])) if len(kc) == 1 else None,
        out_root=graph.find((kernel, kf[0])) if len(kf) == 1 else None,
        in_size=math.prod(shape(kernel)[a] for a in kc),
        out_size=math.prod(shape(kernel)[a] for a in kf),
        kernel_taps=(),
        out_positions=(positions,),
        out_var=eqn.outvars[0],
        out_axis=out_axis,
    )
