"""Image augmentation in numpy (uint8 in, uint8 out), keyed per example.

Every random draw comes from a counter-based hash of (seed, epoch, example
index, stream), not from a stateful generator. An example therefore gets the
same augmentation whichever process or device reads it and in whatever batch
it lands, and a batch can be rebuilt from its step number alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import PIL.Image
from numpy.lib.stride_tricks import sliding_window_view

_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX_MUL_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_MUL_2 = np.uint64(0x94D049BB133111EB)
_UINT64_MOD = 2**64
# Attempts at drawing a random-resized-crop box before falling back to a center crop.
_CROP_ATTEMPTS = 10


@dataclasses.dataclass(frozen=True)
class PadCropFlip:
    """CIFAR-style augmentation for fixed-size images.

    Training: zero-pad by `padding_px` on every side, take a random crop of the
    original size, and mirror left-right with probability 1/2 if `flip`.
    Evaluation: the image unchanged.
    """

    padding_px: int
    flip: bool


@dataclasses.dataclass(frozen=True)
class InceptionCropFlip:
    """ImageNet-style augmentation for images of any size.

    Training: random-resized crop (area fraction in `area_range`, aspect ratio
    in `aspect_ratio_range`, log-uniform) resized to `image_size`, then a
    left-right flip with probability 1/2. Evaluation: resize the shorter side
    to `resize_size`, then take the central `image_size` square.

    References: Szegedy et al. 2015, "Going deeper with convolutions".
    """

    image_size: int = 224
    resize_size: int = 256
    area_range: tuple[float, float] = (0.08, 1.0)
    aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3)


Augmentation = PadCropFlip | InceptionCropFlip


def _mix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer: a bijective avalanche hash on uint64 (wraps on overflow)."""
    with np.errstate(over="ignore"):
        values = (values ^ (values >> np.uint64(30))) * _MIX_MUL_1
        values = (values ^ (values >> np.uint64(27))) * _MIX_MUL_2
    return values ^ (values >> np.uint64(31))


def example_keys(seed: int, epoch: int, example_indices: np.ndarray) -> np.ndarray:
    """Per-example random keys, a pure function of (seed, epoch, example index).

    Args:
      seed: Run seed (any Python int).
      epoch: Epoch number.
      example_indices: int[n], index of each example in its split.

    Returns:
      uint64[n] keys for `uniform`.
    """
    with np.errstate(over="ignore"):
        key = _mix64(np.array([seed % _UINT64_MOD], np.uint64) + _GOLDEN_GAMMA)
        key = _mix64(key ^ (np.uint64(epoch % _UINT64_MOD) * _GOLDEN_GAMMA))
        return _mix64(key ^ np.asarray(example_indices).astype(np.uint64))


def uniform(keys: np.ndarray, stream: int) -> np.ndarray:
    """Uniform draws in [0, 1), one per key, independent across streams.

    Args:
      keys: uint64[...] from `example_keys`.
      stream: Which independent draw (0, 1, 2, ...).

    Returns:
      f64[...] with the shape of `keys`.
    """
    with np.errstate(over="ignore"):
        bits = _mix64(keys + np.uint64(stream + 1) * _GOLDEN_GAMMA)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def pad_crop_flip(images: np.ndarray, keys: np.ndarray, options: PadCropFlip) -> np.ndarray:
    """Random crop with zero padding and optional horizontal flip, vectorised.

    Args:
      images: uint8[B, H, W, C].
      keys: uint64[B] per-example keys.
      options: Padding and flip settings.

    Returns:
      uint8[B, H, W, C], a new array.
    """
    batch, height, width, _ = images.shape
    pad = options.padding_px
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offset_y = (uniform(keys, 0) * (2 * pad + 1)).astype(np.intp)
    offset_x = (uniform(keys, 1) * (2 * pad + 1)).astype(np.intp)
    # All crops as a strided view [B, 2p+1, 2p+1, C, H, W]: picking one per image copies
    # whole blocks, several times faster than an element-wise gather.
    windows = sliding_window_view(padded, (height, width), axis=(1, 2))
    crops = windows[np.arange(batch), offset_y, offset_x].transpose(0, 2, 3, 1)
    crops = np.ascontiguousarray(crops)
    if options.flip:
        flipped = uniform(keys, 2) < 0.5
        crops[flipped] = crops[flipped, :, ::-1]
    return crops


def _crop_resize(
    image: np.ndarray, box: tuple[float, float, float, float], size: int
) -> np.ndarray:
    """Crops `box` (x0, y0, x1, y1) out of uint8[h, w, C] and resizes it to [size, size, C]."""
    gray = image.shape[-1] == 1
    pil_image = PIL.Image.fromarray(image[..., 0] if gray else image)
    resized = np.asarray(pil_image.resize((size, size), PIL.Image.Resampling.BILINEAR, box=box))
    return resized[..., None] if gray else resized


def _random_crop_boxes(
    heights: np.ndarray, widths: np.ndarray, keys: np.ndarray, options: InceptionCropFlip
) -> np.ndarray:
    """Samples one random-resized-crop box per image, vectorised over batch and attempts.

    Returns:
      f64[B, 4] boxes (x0, y0, x1, y1) in pixel coordinates.
    """
    attempts = np.arange(_CROP_ATTEMPTS)
    draws = [uniform(keys[:, None], 4 * attempts + k) for k in range(4)]
    area_lo, area_hi = options.area_range
    log_lo, log_hi = np.log(options.aspect_ratio_range)
    area = heights[:, None] * widths[:, None] * (area_lo + (area_hi - area_lo) * draws[0])
    ratio = np.exp(log_lo + (log_hi - log_lo) * draws[1])
    crop_w = np.round(np.sqrt(area * ratio))
    crop_h = np.round(np.sqrt(area / ratio))
    fits = (
        (crop_w >= 1) & (crop_h >= 1) & (crop_w <= widths[:, None]) & (crop_h <= heights[:, None])
    )
    first = np.argmax(fits, axis=1)
    pick = np.arange(len(keys))
    found = fits[pick, first]
    crop_w, crop_h = crop_w[pick, first], crop_h[pick, first]
    x0 = np.floor(draws[2][pick, first] * (widths - crop_w + 1))
    y0 = np.floor(draws[3][pick, first] * (heights - crop_h + 1))
    # Fallback (no attempt fit): the largest central crop within the aspect-ratio range.
    side_ratio = widths / heights
    lo_ratio, hi_ratio = options.aspect_ratio_range
    fb_w = np.where(side_ratio > hi_ratio, np.round(heights * hi_ratio), widths)
    fb_h = np.where(side_ratio < lo_ratio, np.round(widths / lo_ratio), heights)
    crop_w, crop_h = np.where(found, crop_w, fb_w), np.where(found, crop_h, fb_h)
    x0 = np.where(found, x0, (widths - crop_w) // 2)
    y0 = np.where(found, y0, (heights - crop_h) // 2)
    return np.stack([x0, y0, x0 + crop_w, y0 + crop_h], axis=1)


def inception_crop_flip(
    images: Sequence[np.ndarray], keys: np.ndarray, options: InceptionCropFlip
) -> np.ndarray:
    """Random-resized crop and horizontal flip of images of varying size.

    Args:
      images: B arrays uint8[h_i, w_i, C].
      keys: uint64[B] per-example keys.
      options: Crop settings.

    Returns:
      uint8[B, image_size, image_size, C].
    """
    heights = np.array([image.shape[0] for image in images], np.float64)
    widths = np.array([image.shape[1] for image in images], np.float64)
    boxes = _random_crop_boxes(heights, widths, keys, options)
    flipped = uniform(keys, 4 * _CROP_ATTEMPTS) < 0.5
    crops = np.stack(
        [
            _crop_resize(image, tuple(box), options.image_size)
            for image, box in zip(images, boxes, strict=True)
        ]
    )
    crops[flipped] = crops[flipped, :, ::-1]
    return crops


def resize_center_crop(images: Sequence[np.ndarray], options: InceptionCropFlip) -> np.ndarray:
    """Evaluation transform: shorter side to `resize_size`, central `image_size` square.

    Both steps run as one resize of the matching box of the original image.

    Args:
      images: B arrays uint8[h_i, w_i, C].
      options: Sizes.

    Returns:
      uint8[B, image_size, image_size, C].
    """
    crops = []
    for image in images:
        height, width = image.shape[:2]
        side = min(height, width) * options.image_size / options.resize_size
        x0, y0 = (width - side) / 2, (height - side) / 2
        crops.append(_crop_resize(image, (x0, y0, x0 + side, y0 + side), options.image_size))
    return np.stack(crops)
