"""Models written the way users write them (not jaxprune's zoo), in linen and NNX, small widths.

ResNet-18 (torchvision style, projection shortcuts), MobileNetV2 (depthwise convs, inverted
residuals), an Inception-style concat of branches, a conv net flattened into dense layers and an
MLP-Mixer. Every ``linen_*`` factory returns a module taking ``(x, train=False)``; every ``nnx_*``
factory an ``nnx.Module`` (eval mode set by the tests).
"""

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

# ------------------------------------------------------------------------------------------ linen


class BasicBlock(nn.Module):
    planes: int
    stride: int = 1

    @nn.compact
    def __call__(self, x, train=False):
        bn = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
        y = nn.Conv(self.planes, (3, 3), self.stride, padding=1, use_bias=False, name="conv1")(x)
        y = nn.relu(bn(name="bn1")(y))
        y = nn.Conv(self.planes, (3, 3), padding=1, use_bias=False, name="conv2")(y)
        y = bn(name="bn2")(y)
        if self.stride != 1 or x.shape[-1] != self.planes:
            x = nn.Conv(self.planes, (1, 1), self.stride, use_bias=False, name="downsample_conv")(x)
            x = bn(name="downsample_bn")(x)
        return nn.relu(x + y)


class ResNet18(nn.Module):
    widths: tuple = (8, 16, 32, 64)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(self.widths[0], (3, 3), padding=1, use_bias=False, name="conv1")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn1")(x))
        for i, w in enumerate(self.widths):
            for j in range(2):
                stride = 2 if i > 0 and j == 0 else 1
                x = BasicBlock(w, stride, name=f"layer{i + 1}_{j}")(x, train)
        return nn.Dense(self.num_classes, name="fc")(x.mean(axis=(1, 2)))


class InvertedResidual(nn.Module):
    out: int
    stride: int
    expand: int

    @nn.compact
    def __call__(self, x, train=False):
        bn = partial(nn.BatchNorm, use_running_average=not train)
        hidden = x.shape[-1] * self.expand
        y = x
        if self.expand != 1:
            y = nn.relu6(bn()(nn.Conv(hidden, (1, 1), use_bias=False)(y)))
        y = nn.Conv(
            hidden, (3, 3), self.stride, padding=1, feature_group_count=hidden, use_bias=False
        )(y)
        y = nn.relu6(bn()(y))
        y = bn()(nn.Conv(self.out, (1, 1), use_bias=False)(y))
        return x + y if self.stride == 1 and x.shape[-1] == self.out else y


# (expansion, out channels, blocks, first stride): small for tests; MOBILENETV2_CIFAR is the
# paper's table with CIFAR strides (stem stride 1, stem 32, head 1280)
MOBILENETV2_SMALL = (8, ((1, 8, 1, 1), (4, 12, 2, 2), (4, 16, 2, 2)), 32, 2)
MOBILENETV2_CIFAR = (
    32,
    (
        (1, 16, 1, 1),
        (6, 24, 2, 1),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ),
    1280,
    1,
)


class MobileNetV2(nn.Module):
    num_classes: int = 10
    config: tuple = MOBILENETV2_SMALL

    @nn.compact
    def __call__(self, x, train=False):
        stem, stages, head, stem_stride = self.config
        x = nn.relu6(
            nn.BatchNorm(use_running_average=not train)(
                nn.Conv(stem, (3, 3), stem_stride, padding=1, use_bias=False)(x)
            )
        )
        for expand, out, n, stride in stages:
            for i in range(n):
                x = InvertedResidual(out, stride if i == 0 else 1, expand)(x, train)
        x = nn.relu6(
            nn.BatchNorm(use_running_average=not train)(nn.Conv(head, (1, 1), use_bias=False)(x))
        )
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class Inception(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train=False):
        def conv_bn(x, f, k, name):
            x = nn.Conv(f, (k, k), padding="SAME", use_bias=False, name=f"{name}_conv")(x)
            return nn.relu(nn.BatchNorm(use_running_average=not train, name=f"{name}_bn")(x))

        x = conv_bn(x, 8, 3, "stem")
        b1 = conv_bn(x, 4, 1, "branch1x1")
        b2 = conv_bn(conv_bn(x, 4, 1, "branch3x3_reduce"), 6, 3, "branch3x3")
        b3 = conv_bn(nn.max_pool(x, (3, 3), (1, 1), "SAME"), 3, 1, "branch_pool")
        x = jnp.concatenate([b1, b2, b3], axis=-1)
        x = conv_bn(x, 10, 3, "mix")
        return nn.Dense(self.num_classes, name="head")(x.mean(axis=(1, 2)))


class FlattenNet(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(6, (5, 5))(x)))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(12, (3, 3), padding="VALID")(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(24)(x))
        return nn.Dense(self.num_classes)(x)


class MixerBlock(nn.Module):
    tokens_hidden: int
    channels_hidden: int

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm()(x).transpose(0, 2, 1)
        y = nn.Dense(x.shape[1])(nn.gelu(nn.Dense(self.tokens_hidden)(y)))
        x = x + y.transpose(0, 2, 1)
        y = nn.LayerNorm()(x)
        return x + nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(self.channels_hidden)(y)))


class Mixer(nn.Module):
    num_classes: int = 10
    patch: int = 8
    dim: int = 16

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(self.dim, (self.patch, self.patch), self.patch, name="stem")(x)
        x = x.reshape(x.shape[0], -1, self.dim)
        for i in range(2):
            x = MixerBlock(12, 24, name=f"block{i}")(x)
        x = nn.LayerNorm(name="pre_head_norm")(x)
        return nn.Dense(self.num_classes, name="head")(x.mean(axis=1))


LINEN = {
    "resnet18": ResNet18,
    "mobilenetv2": MobileNetV2,
    "inception": Inception,
    "flatten": FlattenNet,
    "mixer": Mixer,
}

# -------------------------------------------------------------------------------------------- nnx


class NBasicBlock(nnx.Module):
    def __init__(self, cin, planes, stride, rngs):
        self.conv1 = nnx.Conv(
            cin, planes, (3, 3), strides=stride, padding=1, use_bias=False, rngs=rngs
        )
        self.bn1 = nnx.BatchNorm(planes, rngs=rngs)
        self.conv2 = nnx.Conv(planes, planes, (3, 3), padding=1, use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(planes, rngs=rngs)
        self.downsample = (
            nnx.Sequential(
                nnx.Conv(cin, planes, (1, 1), strides=stride, use_bias=False, rngs=rngs),
                nnx.BatchNorm(planes, rngs=rngs),
            )
            if stride != 1 or cin != planes
            else None
        )

    def __call__(self, x):
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return nnx.relu(shortcut + y)


class NResNet18(nnx.Module):
    def __init__(self, rngs, widths=(8, 16, 32, 64), num_classes=10):
        self.conv1 = nnx.Conv(3, widths[0], (3, 3), padding=1, use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(widths[0], rngs=rngs)
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(2):
                blocks.append(NBasicBlock(cin, w, 2 if i > 0 and j == 0 else 1, rngs))
                cin = w
        self.layers = nnx.List(blocks)
        self.fc = nnx.Linear(cin, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        for block in self.layers:
            x = block(x)
        return self.fc(x.mean(axis=(1, 2)))


class NInvertedResidual(nnx.Module):
    def __init__(self, cin, out, stride, expand, rngs):
        hidden = cin * expand
        self.expand = (
            nnx.Sequential(
                nnx.Conv(cin, hidden, (1, 1), use_bias=False, rngs=rngs),
                nnx.BatchNorm(hidden, rngs=rngs),
                nnx.relu6,
            )
            if expand != 1
            else None
        )
        self.depthwise = nnx.Conv(
            hidden,
            hidden,
            (3, 3),
            strides=stride,
            padding=1,
            feature_group_count=hidden,
            use_bias=False,
            rngs=rngs,
        )
        self.bn = nnx.BatchNorm(hidden, rngs=rngs)
        self.project = nnx.Conv(hidden, out, (1, 1), use_bias=False, rngs=rngs)
        self.project_bn = nnx.BatchNorm(out, rngs=rngs)
        self.residual = stride == 1 and cin == out

    def __call__(self, x):
        y = x if self.expand is None else self.expand(x)
        y = nnx.relu6(self.bn(self.depthwise(y)))
        y = self.project_bn(self.project(y))
        return x + y if self.residual else y


class NMobileNetV2(nnx.Module):
    def __init__(self, rngs, num_classes=10):
        self.stem = nnx.Conv(3, 8, (3, 3), strides=2, padding=1, use_bias=False, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(8, rngs=rngs)
        blocks, cin = [], 8
        for expand, out, n, stride in ((1, 8, 1, 1), (4, 12, 2, 2), (4, 16, 2, 2)):
            for i in range(n):
                blocks.append(NInvertedResidual(cin, out, stride if i == 0 else 1, expand, rngs))
                cin = out
        self.blocks = nnx.List(blocks)
        self.head = nnx.Conv(cin, 32, (1, 1), use_bias=False, rngs=rngs)
        self.head_bn = nnx.BatchNorm(32, rngs=rngs)
        self.classifier = nnx.Linear(32, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu6(self.stem_bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        x = nnx.relu6(self.head_bn(self.head(x)))
        return self.classifier(x.mean(axis=(1, 2)))


class NConvBN(nnx.Module):
    def __init__(self, cin, out, k, rngs):
        self.conv = nnx.Conv(cin, out, (k, k), padding="SAME", use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(out, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.bn(self.conv(x)))


class NInception(nnx.Module):
    def __init__(self, rngs, num_classes=10):
        self.stem = NConvBN(3, 8, 3, rngs)
        self.branch1x1 = NConvBN(8, 4, 1, rngs)
        self.branch3x3_reduce = NConvBN(8, 4, 1, rngs)
        self.branch3x3 = NConvBN(4, 6, 3, rngs)
        self.branch_pool = NConvBN(8, 3, 1, rngs)
        self.mix = NConvBN(13, 10, 3, rngs)
        self.head = nnx.Linear(10, num_classes, rngs=rngs)

    def __call__(self, x):
        x = self.stem(x)
        pooled = nnx.max_pool(x, (3, 3), (1, 1), "SAME")
        x = jnp.concatenate(
            [self.branch1x1(x), self.branch3x3(self.branch3x3_reduce(x)), self.branch_pool(pooled)],
            axis=-1,
        )
        return self.head(self.mix(x).mean(axis=(1, 2)))


class NFlattenNet(nnx.Module):
    def __init__(self, rngs, num_classes=10):
        self.conv1 = nnx.Conv(3, 6, (5, 5), rngs=rngs)
        self.bn1 = nnx.BatchNorm(6, rngs=rngs)
        self.conv2 = nnx.Conv(6, 12, (3, 3), padding="VALID", rngs=rngs)
        self.fc1 = nnx.Linear(12 * 7 * 7, 24, rngs=rngs)
        self.fc2 = nnx.Linear(24, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.avg_pool(nnx.relu(self.bn1(self.conv1(x))), (2, 2), (2, 2))
        x = nnx.max_pool(nnx.relu(self.conv2(x)), (2, 2), (2, 2))
        x = x.reshape((x.shape[0], -1))
        return self.fc2(nnx.relu(self.fc1(x)))


class NMixerBlock(nnx.Module):
    def __init__(self, tokens, dim, tokens_hidden, channels_hidden, rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.token_fc1 = nnx.Linear(tokens, tokens_hidden, rngs=rngs)
        self.token_fc2 = nnx.Linear(tokens_hidden, tokens, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.channel_fc1 = nnx.Linear(dim, channels_hidden, rngs=rngs)
        self.channel_fc2 = nnx.Linear(channels_hidden, dim, rngs=rngs)

    def __call__(self, x):
        y = self.norm1(x).transpose(0, 2, 1)
        x = x + self.token_fc2(nnx.gelu(self.token_fc1(y))).transpose(0, 2, 1)
        return x + self.channel_fc2(nnx.gelu(self.channel_fc1(self.norm2(x))))


class NMixer(nnx.Module):
    def __init__(self, rngs, num_classes=10, patch=8, dim=16, size=32):
        self.stem = nnx.Conv(3, dim, (patch, patch), strides=patch, rngs=rngs)
        tokens = (size // patch) ** 2
        self.blocks = nnx.List([NMixerBlock(tokens, dim, 12, 24, rngs) for _ in range(2)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, num_classes, rngs=rngs)
        self.dim = dim

    def __call__(self, x):
        x = self.stem(x)
        x = x.reshape(x.shape[0], -1, self.dim)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(axis=1))


NNX = {
    "resnet18": NResNet18,
    "mobilenetv2": NMobileNetV2,
    "inception": NInception,
    "flatten": NFlattenNet,
    "mixer": NMixer,
}

# Expected prunable groups: (count, sorted sizes) per model, the same in linen and NNX.
# ResNet-18: conv1 of each of 8 blocks + 4 residual streams; MobileNetV2: the expansion of each
# expanding block (4) + the stem's stream (8, it feeds the first block's residual) + the 12- and
# 16-wide streams + the head conv; Inception: 6 convs; FlattenNet: 2 convs + fc1; Mixer: the token
# and channel MLP hidden layers of 2 blocks (the LayerNorm'd stream is not prunable).
EXPECTED = {
    "resnet18": [8, 8, 8, 16, 16, 16, 32, 32, 32, 64, 64, 64],
    "mobilenetv2": [8, 12, 16, 32, 32, 48, 48, 64],
    "inception": [3, 4, 4, 6, 8, 10],
    "flatten": [6, 12, 24],
    "mixer": [12, 12, 24, 24],
}


def random_variables(tree, seed=0):
    """Every array perturbed on the host (non-trivial BatchNorm statistics: var in [0.5, 1.5])."""
    import numpy as np

    from jaxprune.trace.program import path_names

    rng = np.random.default_rng(seed)
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out = []
    for path, a in flat:
        a = np.asarray(a)
        if path_names(path)[-1] == "var":
            out.append(0.5 + rng.uniform(size=a.shape).astype(a.dtype))
        else:
            out.append(a + 0.2 * rng.normal(size=a.shape).astype(a.dtype))
    return jax.tree.unflatten(treedef, [jnp.asarray(a) for a in out])
