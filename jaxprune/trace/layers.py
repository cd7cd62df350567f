"""The `jaxprune.graph.Layer` list of a traced program: what counting, the cost model and the
weight criteria read, derived from its contractions and per-channel vectors."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from jaxprune.graph import Layer
from jaxprune.trace.analysis import Concat, Flatten, shape
from jaxprune.trace.contractions import Contraction

if TYPE_CHECKING:
    from jaxprune.trace.program import Program


def module_path(path: tuple[str, ...]) -> tuple[str, ...]:
    """A variable's module path: the leaf name and a leading ``params`` collection dropped (a
    top-level variable, e.g. ``{'w1': ...}``, keeps its own name)."""
    path = path[1:] if path and path[0] == "params" else path
    return path[:-1] if len(path) > 1 else path


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
        path = module_path(program.paths[c.leaf])
        out_group = names.get(c.out_root)
        bias = bias_leaf(program, c, path)
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


def bias_leaf(program: Program, c: Contraction, path: tuple[str, ...]) -> int | None:
    """The variable leaf of the bias added to contraction ``c``'s output (same module), or None."""
    for i, p in enumerate(program.paths):
        if module_path(p) == path and p[-1] == "bias" and len(shape(program.invars[i])) == 1:
            if program.leaf_root(i, 0) == c.out_root:
                return i
    return None


def _vector_layers(program: Program, leaves: list[int], layers_so_far: list[Layer]) -> list[Layer]:
    names = program.name_of()
    vectors: dict[tuple[tuple[str, ...], str], float] = {}
    fixed: dict[tuple[str, ...], int] = {}
    for i in leaves:
        path = module_path(program.paths[i])
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
