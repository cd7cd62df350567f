"""VGG with BatchNorm in the CIFAR form used by pruning papers (Li et al. 2017; HRank; GFI-AP).

Stages of 3x3 conv -> BN -> ReLU, a 2x2 max-pool between stages (none after the last), global
average pooling, then fc1 -> BN -> ReLU -> head. VGG-16 at 32x32x3: 313.5M MACs, 14.99M params.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxprune.graph import Layer, groups
from jaxprune.models import common

VGG_STAGES = {
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


@dataclasses.dataclass(frozen=True)
class VGGArch:
    """VGG with explicit widths.

    Attributes:
      stages: conv widths of each stage; convs are numbered conv1, conv2, ... across stages.
      dense_width: units of the hidden dense layer fc1.
      num_classes: outputs of the head.
      input_shape: (H, W, C) of one image.
      name: preset it came from.
    """

    stages: tuple[tuple[int, ...], ...] = VGG_STAGES[16]
    dense_width: int = 512
    num_classes: int = 10
    input_shape: tuple[int, int, int] = (32, 32, 3)
    name: str = "vgg16"

    def layers(self, input_shape: tuple[int, int, int] | None = None) -> list[Layer]:
        h, w, in_channels = input_shape or self.input_shape
        in_group, out = None, []
        i = 0
        for s, widths in enumerate(self.stages):
            if s > 0:
                h, w = h // 2, w // 2
            for width in widths:
                i += 1
                group = f"conv{i}"
                out.append(
                    Layer((group,), "conv", in_channels, width, in_group, group, 3, 1, 1, (h, w))
                )
                out.append(Layer((f"bn{i}",), "norm", width, width, group, group))
                in_group, in_channels = group, width
        out.append(
            Layer(("fc1",), "dense", in_channels, self.dense_width, in_group, "fc1", use_bias=True)
        )
        out.append(Layer(("fc1_bn",), "norm", self.dense_width, self.dense_width, "fc1", "fc1"))
        out.append(
            Layer(
                ("head",), "dense", self.dense_width, self.num_classes, "fc1", None, use_bias=True
            )
        )
        return out

    def resize(self, group_sizes: dict[str, int]) -> "VGGArch":
        names = iter(range(1, 1 + sum(len(s) for s in self.stages)))
        stages = tuple(tuple(group_sizes[f"conv{next(names)}"] for _ in s) for s in self.stages)
        return dataclasses.replace(self, stages=stages, dense_width=group_sizes["fc1"])

    def module(self, dtype: Any = jnp.float32) -> "VGG":
        return VGG(arch=self, dtype=dtype)

    def to_dict(self) -> dict:
        return common.arch_to_dict(self, "vgg")


class VGG(nn.Module):
    arch: VGGArch
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, gates: common.Gates = None) -> jax.Array:
        """f[N, H, W, C] images -> f32[N, num_classes] logits."""
        a, dt = self.arch, self.dtype
        common.check_gate_names(gates, groups(a))
        i = 0
        for s, widths in enumerate(a.stages):
            if s > 0:
                x = common.max_pool(x, 2, 2)
            for width in widths:
                i += 1
                x = common.Conv(width, 3, 1, 1, dtype=dt, name=f"conv{i}")(x)
                x = common.batch_norm(train, dt, f"bn{i}")(x)
                x = nn.relu(common.apply_gate(x, gates, f"conv{i}"))
        x = common.global_avg_pool(x)
        x = common.dense(a.dense_width, dt, "fc1")(x)
        x = common.batch_norm(train, dt, "fc1_bn")(x)
        x = nn.relu(common.apply_gate(x, gates, "fc1"))
        return common.dense(a.num_classes, dt, "head")(x).astype(jnp.float32)
