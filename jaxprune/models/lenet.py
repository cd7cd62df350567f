"""LeNet-5 (LeCun et al. 1998) as used by FSABP (Geng & Niu 2022): 2 convs + 3 dense, no BatchNorm.

conv1 5x5 (padding 2) -> ReLU -> maxpool 2 -> conv2 5x5 -> ReLU -> maxpool 2 -> flatten ->
fc1 -> ReLU -> fc2 -> ReLU -> head. At 28x28x1: 6 and 16 filters, 120 and 84 hidden units,
416,520 MACs and 61,706 parameters.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxprune.graph import Layer, conv_out_size, groups
from jaxprune.models import common


@dataclasses.dataclass(frozen=True)
class LeNetArch:
    """LeNet-5 with explicit widths.

    Attributes:
      conv_widths: filters of conv1 and conv2.
      dense_widths: units of fc1 and fc2.
      num_classes: outputs of the head.
      input_shape: (H, W, C) of one image.
      name: preset it came from (kept through pruning, for display).
    """

    conv_widths: tuple[int, int] = (6, 16)
    dense_widths: tuple[int, int] = (120, 84)
    num_classes: int = 10
    input_shape: tuple[int, int, int] = (28, 28, 1)
    name: str = "lenet5"

    def layers(self, input_shape: tuple[int, int, int] | None = None) -> list[Layer]:
        h, w, c = input_shape or self.input_shape
        c1, c2 = self.conv_widths
        f1, f2 = self.dense_widths
        conv1 = Layer(("conv1",), "conv", c, c1, None, "conv1", 5, 1, 2, (h, w), use_bias=True)
        h, w = h // 2, w // 2
        h, w = conv_out_size(h, 5, 1, 0), conv_out_size(w, 5, 1, 0)
        conv2 = Layer(("conv2",), "conv", c1, c2, "conv1", "conv2", 5, 1, 0, (h, w), use_bias=True)
        h, w = h // 2, w // 2
        return [
            conv1,
            conv2,
            Layer(
                ("fc1",), "dense", c2, f1, "conv2", "fc1", use_bias=True, flatten_positions=h * w
            ),
            Layer(("fc2",), "dense", f1, f2, "fc1", "fc2", use_bias=True),
            Layer(("head",), "dense", f2, self.num_classes, "fc2", None, use_bias=True),
        ]

    def resize(self, group_sizes: dict[str, int]) -> "LeNetArch":
        g = group_sizes
        return dataclasses.replace(
            self,
            conv_widths=(g["conv1"], g["conv2"]),
            dense_widths=(g["fc1"], g["fc2"]),
        )

    def module(self, dtype: Any = jnp.float32) -> "LeNet":
        return LeNet(arch=self, dtype=dtype)

    def to_dict(self) -> dict:
        return common.arch_to_dict(self, "lenet")


class LeNet(nn.Module):
    arch: LeNetArch
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, gates: common.Gates = None) -> jax.Array:
        """f[N, H, W, C] images -> f32[N, num_classes] logits; ``train`` is unused (no BN)."""
        del train
        a, dt = self.arch, self.dtype
        common.check_gate_names(gates, groups(a))
        x = common.Conv(a.conv_widths[0], 5, 1, 2, use_bias=True, dtype=dt, name="conv1")(x)
        x = nn.relu(common.apply_gate(x, gates, "conv1"))
        x = common.max_pool(x, 2, 2)
        x = common.Conv(a.conv_widths[1], 5, 1, 0, use_bias=True, dtype=dt, name="conv2")(x)
        x = nn.relu(common.apply_gate(x, gates, "conv2"))
        x = common.max_pool(x, 2, 2)
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(a.dense_widths, start=1):
            x = common.dense(width, dt, f"fc{i}")(x)
            x = nn.relu(common.apply_gate(x, gates, f"fc{i}"))
        return common.dense(a.num_classes, dt, "head")(x).astype(jnp.float32)
