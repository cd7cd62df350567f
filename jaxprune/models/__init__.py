"""Architectures as data: ``create(name)`` gives a frozen dataclass with explicit widths.

    arch = create("resnet56", num_classes=10)
    model = arch.module()                       # a flax.linen.Module
    variables = model.init(rng, x, train=False) # {'params': ..., 'batch_stats': ...}
    logits = model.apply(variables, x, train=False, gates=None)

A pruned network is the same dataclass with other widths, so ``to_dict``/``from_dict`` (JSON) is all
a checkpoint needs to rebuild it.
"""

import functools
from collections.abc import Callable, Mapping
from typing import Any

from jaxprune.models.common import arch_from_fields
from jaxprune.models.lenet import LeNet, LeNetArch
from jaxprune.models.resnet import (
    CIFAR_BLOCKS_PER_STAGE,
    IMAGENET_DEPTHS,
    ResNet,
    ResNetArch,
    cifar_resnet,
    imagenet_resnet,
)
from jaxprune.models.vgg import VGG, VGG_STAGES, VGGArch

Arch = LeNetArch | VGGArch | ResNetArch

MNIST_SHAPE = (28, 28, 1)
CIFAR_SHAPE = (32, 32, 3)
IMAGENET_SHAPE = (224, 224, 3)


def _lenet(num_classes: int, input_shape: tuple[int, int, int]) -> LeNetArch:
    return LeNetArch(num_classes=num_classes, input_shape=input_shape)


def _vgg(depth: int, num_classes: int, input_shape: tuple[int, int, int]) -> VGGArch:
    return VGGArch(VGG_STAGES[depth], 512, num_classes, input_shape, f"vgg{depth}")


# name -> (factory(num_classes, input_shape), default input shape)
_PRESETS: dict[str, tuple[Callable[[int, tuple[int, int, int]], Arch], tuple[int, int, int]]] = {
    "lenet5": (_lenet, MNIST_SHAPE),
    **{f"vgg{d}": (functools.partial(_vgg, d), CIFAR_SHAPE) for d in VGG_STAGES},
    **{
        f"resnet{d}": (functools.partial(cifar_resnet, d), CIFAR_SHAPE)
        for d in CIFAR_BLOCKS_PER_STAGE
    },
    **{
        f"resnet{d}": (functools.partial(imagenet_resnet, d), IMAGENET_SHAPE)
        for d in IMAGENET_DEPTHS
    },
}

_FAMILIES: dict[str, type] = {"lenet": LeNetArch, "vgg": VGGArch, "resnet": ResNetArch}


def names() -> list[str]:
    """The valid model names, in a stable order."""
    return list(_PRESETS)


def create(
    name: str, num_classes: int = 10, input_shape: tuple[int, int, int] | None = None
) -> Arch:
    """The architecture of preset ``name``.

    Args:
      name: one of `names()`.
      num_classes: outputs of the classifier.
      input_shape: (H, W, C) of one image; default per family: 28x28x1 for LeNet, 32x32x3 for VGG
        and the CIFAR ResNets (20/32/56/110), 224x224x3 for the ImageNet ResNets (18/34/50/101).
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(names())}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    factory, default_shape = _PRESETS[name]
    shape = tuple(int(v) for v in (input_shape or default_shape))
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be (H, W, C) with positive sizes, got {input_shape}")
    return factory(num_classes, shape)


def from_dict(fields: Mapping[str, Any]) -> Arch:
    """Inverse of ``arch.to_dict()`` (e.g. read back from a checkpoint's JSON)."""
    fields = dict(fields)
    family = fields.pop("family", None)
    if family not in _FAMILIES:
        raise ValueError(f"unknown architecture family {family!r}; valid: {sorted(_FAMILIES)}")
    return arch_from_fields(_FAMILIES[family], fields)


__all__ = [
    "Arch",
    "LeNet",
    "LeNetArch",
    "ResNet",
    "ResNetArch",
    "VGG",
    "VGGArch",
    "create",
    "from_dict",
    "names",
]
