"""ResNets (He et al. 2016): CIFAR form (basic blocks, 16/32/64), ImageNet form (torchvision v1.5).

Where a block changes the shape of the residual stream it has a projection shortcut
(``proj_conv`` 1x1 + ``proj_bn``) instead of the zero-padding "option A" shortcut of the CIFAR
paper:
then every stage's residual channels can be pruned as one group. For CIFAR ResNets this adds the
two projections' MACs (~0.2% of the network: ResNet-56 125.75M vs 125.49M with option A).
Bottleneck blocks put the stride on the 3x3 conv, as torchvision does.

Prunable groups (see `jaxprune.graph`): the inner channels of each block
(``stage2/block1/conv1``; bottlenecks also ``.../conv2``) and one group per residual stream:
``stage{s}`` ties the stage's projection (or, for the first stage without one, the stem), every
block's last BatchNorm and the identity shortcuts between them. A stage whose first block has no
projection shares the stream (and so the group) of the stage before it; ResNet-50's stem has a
group of its own, ``stem``, because stage 1 starts with a projection.
"""

import dataclasses
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxprune.graph import Layer, conv_out_size, groups
from jaxprune.models import common
from jaxprune.ops import materialize

BlockKind = Literal["basic", "bottleneck"]
StemKind = Literal["cifar", "imagenet"]

CIFAR_BLOCKS_PER_STAGE = {20: 3, 32: 5, 56: 9, 110: 18}
IMAGENET_DEPTHS: dict[int, tuple[BlockKind, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


@dataclasses.dataclass(frozen=True)
class ResNetArch:
    """ResNet with explicit widths.

    Attributes:
      block: ``"basic"`` (two 3x3 convs) or ``"bottleneck"`` (1x1, 3x3, 1x1).
      stem: ``"cifar"`` (3x3 conv) or ``"imagenet"`` (7x7/2 conv + 3x3/2 max-pool).
      stem_width: output channels of the stem conv.
      stage_widths: residual-stream channels of each stage.
      inner_widths: ``[stage][block]`` -> the block's inner widths: ``(conv1,)`` for basic blocks,
        ``(conv1, conv2)`` for bottlenecks. The block count of a stage is ``len(inner_widths[s])``.
      strides: stride of each stage's first block.
      projections: whether each stage's first block has a projection shortcut.
      num_classes: outputs of the head.
      input_shape: (H, W, C) of one image.
      name: preset it came from.
    """

    block: BlockKind
    stem: StemKind
    stem_width: int
    stage_widths: tuple[int, ...]
    inner_widths: tuple[tuple[tuple[int, ...], ...], ...]
    strides: tuple[int, ...]
    projections: tuple[bool, ...]
    num_classes: int = 10
    input_shape: tuple[int, int, int] = (32, 32, 3)
    name: str = "resnet"

    def __post_init__(self):
        n = len(self.stage_widths)
        if not (len(self.inner_widths) == len(self.strides) == len(self.projections) == n):
            raise ValueError("stage_widths, inner_widths, strides and projections differ in length")
        convs_per_block = 1 if self.block == "basic" else 2
        for s in range(n):
            if any(len(widths) != convs_per_block for widths in self.inner_widths[s]):
                raise ValueError(
                    f"stage {s + 1}: {self.block} blocks need {convs_per_block} widths"
                )
            incoming = self.stem_width if s == 0 else self.stage_widths[s - 1]
            if not self.projections[s] and (
                self.strides[s] != 1 or incoming != self.stage_widths[s]
            ):
                raise ValueError(f"stage {s + 1} changes shape, so it needs a projection shortcut")

    def stream_groups(self) -> tuple[str, tuple[str, ...]]:
        """(group of the stem's channels, group of each stage's residual stream)."""
        stem_group = "stem" if self.projections[0] else "stage1"
        stage_groups, previous = [], stem_group
        for s, projection in enumerate(self.projections):
            previous = f"stage{s + 1}" if projection else previous
            stage_groups.append(previous)
        return stem_group, tuple(stage_groups)

    def inner_groups(self, s: int, b: int) -> tuple[str, ...]:
        """Group names of block ``b`` of stage ``s`` (0-based), one per inner conv."""
        return tuple(
            f"stage{s + 1}/block{b + 1}/conv{i + 1}" for i in range(len(self.inner_widths[s][b]))
        )

    def block_convs(self, s: int, b: int) -> list[tuple[int, int, int, int, str]]:
        """Convs of block ``b`` of stage ``s`` (0-based): (kernel, stride, padding, width, group).

        The last conv writes into the stage's residual stream; the stride sits on the first block's
        3x3 conv.
        """
        stride = self.strides[s] if b == 0 else 1
        names = self.inner_groups(s, b)
        inner = self.inner_widths[s][b]
        stream = (self.stage_widths[s], self.stream_groups()[1][s])
        if self.block == "basic":
            return [(3, stride, 1, inner[0], names[0]), (3, 1, 1, *stream)]
        return [
            (1, 1, 0, inner[0], names[0]),
            (3, stride, 1, inner[1], names[1]),
            (1, 1, 0, *stream),
        ]

    def layers(self, input_shape: tuple[int, int, int] | None = None) -> list[Layer]:
        h, w, c = input_shape or self.input_shape
        stem_group, stage_groups = self.stream_groups()
        out: list[Layer] = []

        def conv_bn(path, hw_in, cin, cout, gin, gout, k, stride, pad, bn_name):
            """Appends a conv and its BN; returns the conv's output size."""
            hw = tuple(conv_out_size(size, k, stride, pad) for size in hw_in)
            out.append(Layer(path, "conv", cin, cout, gin, gout, k, stride, pad, hw))
            out.append(Layer((*path[:-1], bn_name), "norm", cout, cout, gout, gout))
            return hw

        k, stride, pad = (3, 1, 1) if self.stem == "cifar" else (7, 2, 3)
        hw = conv_bn(
            ("stem_conv",), (h, w), c, self.stem_width, None, stem_group, k, stride, pad, "stem_bn"
        )
        if self.stem == "imagenet":
            hw = tuple(conv_out_size(size, 3, 2, 1) for size in hw)
        width, group = self.stem_width, stem_group
        for s, blocks in enumerate(self.inner_widths):
            for b in range(len(blocks)):
                prefix = (f"stage{s + 1}", f"block{b + 1}")
                block_in, cin, gin = hw, width, group
                for i, (k, stride, pad, cout, gout) in enumerate(self.block_convs(s, b), start=1):
                    hw = conv_bn(
                        (*prefix, f"conv{i}"), hw, cin, cout, gin, gout, k, stride, pad, f"bn{i}"
                    )
                    cin, gin = cout, gout
                if b == 0 and self.projections[s]:
                    path = (*prefix, "proj_conv")
                    conv_bn(
                        path, block_in, width, cin, group, gin, 1, self.strides[s], 0, "proj_bn"
                    )
                width, group = self.stage_widths[s], stage_groups[s]
        out.append(Layer(("head",), "dense", width, self.num_classes, group, None, use_bias=True))
        return out

    def resize(self, group_sizes: dict[str, int]) -> "ResNetArch":
        stem_group, stage_groups = self.stream_groups()
        inner = tuple(
            tuple(
                tuple(group_sizes[g] for g in self.inner_groups(s, b)) for b in range(len(blocks))
            )
            for s, blocks in enumerate(self.inner_widths)
        )
        return dataclasses.replace(
            self,
            stem_width=group_sizes[stem_group],
            stage_widths=tuple(group_sizes[g] for g in stage_groups),
            inner_widths=inner,
        )

    def module(self, dtype: Any = jnp.float32) -> "ResNet":
        return ResNet(arch=self, dtype=dtype)

    def to_dict(self) -> dict:
        return common.arch_to_dict(self, "resnet")


def cifar_resnet(depth: int, num_classes: int, input_shape: tuple[int, int, int]) -> ResNetArch:
    """CIFAR ResNet-``depth`` (6n+2 layers, widths 16/32/64)."""
    n = CIFAR_BLOCKS_PER_STAGE[depth]
    widths = (16, 32, 64)
    return ResNetArch(
        block="basic",
        stem="cifar",
        stem_width=16,
        stage_widths=widths,
        inner_widths=tuple(((w,),) * n for w in widths),
        strides=(1, 2, 2),
        projections=(False, True, True),
        num_classes=num_classes,
        input_shape=input_shape,
        name=f"resnet{depth}",
    )


def imagenet_resnet(depth: int, num_classes: int, input_shape: tuple[int, int, int]) -> ResNetArch:
    """ImageNet ResNet-``depth`` as in torchvision (v1.5: stride on the bottleneck's 3x3)."""
    block, blocks_per_stage = IMAGENET_DEPTHS[depth]
    base = (64, 128, 256, 512)
    expansion = 1 if block == "basic" else 4
    stage_widths = tuple(expansion * w for w in base)
    inner = tuple(
        ((w,) if block == "basic" else (w, w),) * n
        for w, n in zip(base, blocks_per_stage, strict=True)
    )
    incoming = (64, *stage_widths[:-1])
    strides = (1, 2, 2, 2)
    projections = tuple(
        st != 1 or cin != cout
        for st, cin, cout in zip(strides, incoming, stage_widths, strict=True)
    )
    return ResNetArch(
        block=block,
        stem="imagenet",
        stem_width=64,
        stage_widths=stage_widths,
        inner_widths=inner,
        strides=strides,
        projections=projections,
        num_classes=num_classes,
        input_shape=input_shape,
        name=f"resnet{depth}",
    )


class Block(nn.Module):
    """A basic or bottleneck residual block; gates sit after each BN, before ReLU and the add."""

    arch: ResNetArch
    stage: int
    index: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, gates: common.Gates) -> jax.Array:
        a, s, b, dt = self.arch, self.stage, self.index, self.dtype
        stream_group = a.stream_groups()[1][s]
        convs = a.block_convs(s, b)
        y = x
        for i, (k, st, pad, width, group) in enumerate(convs, start=1):
            y = common.Conv(width, k, st, pad, dtype=dt, name=f"conv{i}")(y)
            y = common.batch_norm(train, dt, f"bn{i}")(y)
            y = common.apply_gate(y, gates, group)
            if i < len(convs):
                y = nn.relu(y)
        shortcut = x
        if b == 0 and a.projections[s]:
            proj = common.Conv(a.stage_widths[s], 1, a.strides[s], 0, dtype=dt, name="proj_conv")
            shortcut = proj(x)
            shortcut = common.batch_norm(train, dt, "proj_bn")(shortcut)
            shortcut = common.apply_gate(shortcut, gates, stream_group)
        # The residual stream: read by the next block and by the backward pass (see materialize).
        return materialize(nn.relu(y + shortcut))


class Stage(nn.Module):
    arch: ResNetArch
    stage: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, gates: common.Gates) -> jax.Array:
        for b in range(len(self.arch.inner_widths[self.stage])):
            x = Block(self.arch, self.stage, b, self.dtype, name=f"block{b + 1}")(x, train, gates)
        return x


class ResNet(nn.Module):
    arch: ResNetArch
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, gates: common.Gates = None) -> jax.Array:
        """f[N, H, W, C] images -> f32[N, num_classes] logits."""
        a, dt = self.arch, self.dtype
        common.check_gate_names(gates, groups(a))
        stem_group = a.stream_groups()[0]
        if a.stem == "cifar":
            x = common.Conv(a.stem_width, 3, 1, 1, dtype=dt, name="stem_conv")(x)
        else:
            x = common.Conv(a.stem_width, 7, 2, 3, dtype=dt, name="stem_conv")(x)
        x = common.batch_norm(train, dt, "stem_bn")(x)
        x = nn.relu(common.apply_gate(x, gates, stem_group))
        if a.stem == "imagenet":
            x = common.max_pool(x, 3, 2, 1)
        for s in range(len(a.stage_widths)):
            x = Stage(a, s, dt, name=f"stage{s + 1}")(x, train, gates)
        x = common.global_avg_pool(x)
        return common.dense(a.num_classes, dt, "head")(x).astype(jnp.float32)
