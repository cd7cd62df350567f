"""Tests of jaxprune.data on real Fashion-MNIST and on small datasets made here."""

from __future__ import annotations

import gzip
import importlib.util
import io
import itertools
import json
import shutil
import struct

import numpy as np
import PIL.Image
import pytest

from jaxprune import data
from jaxprune.data import augment, datasets
from jaxprune.data.normalize import normalize_on_host

HAS_TENSORFLOW = importlib.util.find_spec("tensorflow") is not None


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fashion_mnist() -> data.Dataset:
    return data.load_dataset("fashion_mnist")


@pytest.fixture(scope="module")
def synthetic() -> data.Dataset:
    return data.synthetic_dataset(data.SyntheticOptions(num_train=100, num_test=37))


def _encode(image: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(image).save(buffer, format=image_format)
    return buffer.getvalue()


def _fake_images(seed: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (32, 32, 3), np.uint8) for _ in range(count)]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> str:
    """A tfds data_dir with tiny cifar10 and imagenet2012 in array_record format.

    The builders carry the real names, versions and features, so reading goes
    through tfds's registered builders exactly as for a real prepared dataset.
    """
    import tensorflow_datasets as tfds

    data_dir = str(tmp_path_factory.mktemp("tfds"))

    class TinyCifar10(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = "cifar10"
        VERSION = tfds.core.Version("3.0.2")

        def _info(self):
            features = {
                "id": tfds.features.Text(),
                "image": tfds.features.Image(shape=(32, 32, 3)),
                "label": tfds.features.ClassLabel(num_classes=10),
            }
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(features)
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0, 24), "test": self._generate_examples(1, 7)}

        def _generate_examples(self, seed, count):
            for i, image in enumerate(_fake_images(seed, count)):
                yield i, {"id": str(i), "image": _encode(image, "png"), "label": i % 10}

    class TinyImagenet(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = "imagenet2012"
        VERSION = tfds.core.Version("5.1.0")

        def _info(self):
            features = {
                "image": tfds.features.Image(encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=1000),
                "file_name": tfds.features.Text(),
            }
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(features)
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(6), "validation": self._generate_examples(3)}

        def _generate_examples(self, count):
            rng = np.random.default_rng(count)
            for i in range(count):
                height, width = rng.integers(40, 100, 2)
                image = rng.integers(0, 256, (height, width, 3), np.uint8)
                yield i, {"file_name": f"{i}.JPEG", "image": _encode(image, "jpeg"), "label": 7 * i}

    for builder_class in (TinyCifar10, TinyImagenet):
        builder_class(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


# ---------------------------------------------------------------- sources


def test_real_fashion_mnist(fashion_mnist):
    assert fashion_mnist.name is data.DatasetName.FASHION_MNIST
    assert fashion_mnist.num_examples == {data.Split.TRAIN: 60000, data.Split.TEST: 10000}
    assert fashion_mnist.input_shape == (28, 28, 1)
    assert fashion_mnist.num_classes == 10
    train, test = fashion_mnist.splits[data.Split.TRAIN], fashion_mnist.splits[data.Split.TEST]
    assert train.images.dtype == np.uint8 and train.images.shape == (60000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(train.labels, minlength=11), [6000] * 10 + [0])
    np.testing.assert_array_equal(np.bincount(test.labels, minlength=11), [1000] * 10 + [0])
    assert train.labels[0] == 9  # The first training image is an ankle boot.


def test_normalization_is_standard_on_real_data(fashion_mnist):
    batches = data.eval_batches(fashion_mnist, global_batch_size=4096, split=data.Split.TRAIN)
    pixels = np.concatenate([images for images, _, _ in itertools.islice(batches, 3)])
    assert pixels.dtype == np.uint8
    images = np.asarray(data.normalize(pixels, fashion_mnist.mean, fashion_mnist.std))
    assert images.dtype == np.float32
    assert abs(images.mean()) < 0.05
    assert abs(images.std() - 1) < 0.05


@pytest.mark.parametrize(
    "name", [*(name.value for name in datasets._SPECS), data.DatasetName.SYNTHETIC.value]
)
def test_device_normalization_is_the_host_float32_one(name):
    """Every pixel value of every channel, with each dataset's constants: what the model sees from
    `data.normalize` on the device equals the old host-side float32 values up to rounding."""
    if name == data.DatasetName.SYNTHETIC:
        dataset = data.synthetic_dataset(data.SyntheticOptions())
        mean, std = dataset.mean, dataset.std
    else:
        spec = datasets._SPECS[data.DatasetName(name)]
        mean, std = spec.mean, spec.std
    channels = len(mean)
    values = (np.arange(256)[:, None] + 37 * np.arange(channels)) % 256  # each value per channel
    images = values.astype(np.uint8).reshape(2, 8, 16, channels)
    got = data.normalize(images, mean, std)
    assert got.dtype == np.float32 and got.shape == images.shape
    got = np.asarray(got, np.float64)
    host = np.asarray(normalize_on_host(images, mean, std), np.float64)
    exact = (images / 255.0 - np.asarray(mean)) / np.asarray(std)
    # Rounding to float32 costs at most 2**-24 relative each time (`unit`). Either side rounds the
    # constants scale = 1 / (255 std) and shift = -mean / std, the product p = x * scale
    # (|p| <= 1 / std) and the sum r = p + shift; a device that fuses the last two (FMA) rounds
    # once. Both sides use the same float32 constants, so they differ only by the last roundings.
    unit = np.finfo(np.float32).eps / 2
    p_max, r_max = 1.0 / min(std), np.abs(exact).max()
    shift_max = max(m / s for m, s in zip(mean, std, strict=True))
    to_exact = unit * (2 * p_max + shift_max + r_max)
    assert np.abs(host - exact).max() <= to_exact
    assert np.abs(got - exact).max() <= to_exact
    assert np.abs(got - host).max() <= unit * (p_max + 2 * r_max)


def test_idx_directory(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, count in (("train", 9), ("t10k", 4)):
        arrays[prefix] = rng.integers(0, 256, (count, 6, 5)), rng.integers(0, 10, count)
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", arrays[prefix][0])
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", arrays[prefix][1])

    dataset = data.load_dataset("mnist", data_dir=tmp_path)

    assert dataset.input_shape == (6, 5, 1)
    assert dataset.num_examples == {data.Split.TRAIN: 9, data.Split.TEST: 4}
    for split, prefix in ((data.Split.TRAIN, "train"), (data.Split.TEST, "t10k")):
        examples = dataset.splits[split]
        np.testing.assert_array_equal(examples.images[..., 0], arrays[prefix][0])
        np.testing.assert_array_equal(examples.labels, arrays[prefix][1])
        assert examples.labels.dtype == np.int32


def test_read_idx_rejects_truncated_file(tmp_path):
    path = tmp_path / "x-idx1-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 5) + b"\1\2")
    with pytest.raises(ValueError, match="holds 10 bytes but its header \\(5,\\) needs 13"):
        data.read_idx(path)


def test_tfds_array_record_in_memory(tfds_dir):
    dataset = data.load_dataset("cifar10", data_dir=tfds_dir)

    assert dataset.num_examples == {data.Split.TRAIN: 24, data.Split.TEST: 7}
    assert dataset.input_shape == (32, 32, 3) and dataset.num_classes == 10
    train = dataset.splits[data.Split.TRAIN]
    assert isinstance(train, data.ArrayExamples)
    # tfds shuffles on write, so compare as multisets of (label, pixels).
    expected = sorted((i % 10, image.tobytes()) for i, image in enumerate(_fake_images(0, 24)))
    got = sorted(
        (int(label), image.tobytes())
        for image, label in zip(train.images, train.labels, strict=True)
    )
    assert got == expected


def test_tfds_imagenet_random_access(tfds_dir):
    dataset = data.load_dataset("imagenet2012", data_dir=tfds_dir)

    assert isinstance(dataset.splits[data.Split.TEST], data.SourceExamples)
    assert dataset.num_examples == {data.Split.TRAIN: 6, data.Split.TEST: 3}
    assert dataset.input_shape == (224, 224, 3) and dataset.num_classes == 1000
    images, labels = data.train_batch(dataset, 0, global_batch_size=4, seed=0)
    assert images.shape == (4, 224, 224, 3) and images.dtype == np.uint8
    assert set(labels.tolist()) <= {0, 7, 14, 21, 28, 35}
    batches = list(data.eval_batches(dataset, global_batch_size=2))
    assert len(batches) == 2
    np.testing.assert_array_equal(np.concatenate([m for _, _, m in batches]), [1, 1, 1, 0])
    assert sorted(np.concatenate([y for _, y, m in batches])[:3].tolist()) == [0, 7, 14]


@pytest.mark.skipif(HAS_TENSORFLOW, reason="with TensorFlow, tfrecord is readable")
def test_tfrecord_dataset_gives_clear_error(tfds_dir, tmp_path):
    shutil.copytree(f"{tfds_dir}/cifar10", tmp_path / "cifar10")
    info_path = tmp_path / "cifar10" / "3.0.2" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "fileFormat": "tfrecord"}))

    with pytest.raises(RuntimeError, match="tensorflow-cpu.*file_format='array_record'"):
        data.load_dataset("cifar10", data_dir=tmp_path)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="svhn") as error:
        data.load_dataset("svhn")
    for name in ("fashion_mnist", "mnist", "cifar10", "cifar100", "imagenet2012", "synthetic"):
        assert name in str(error.value)


def test_missing_data_says_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        data.load_dataset("fashion_mnist", data_dir=tmp_path)
    message = str(error.value)
    assert f"IDX files in {tmp_path}" in message
    assert f"{tmp_path}/fashion_mnist" in message
    assert "apt-get install dataset-fashion-mnist" in message and "--data-dir" in message

    with pytest.raises(FileNotFoundError, match="array_record") as error:
        data.load_dataset("cifar100", data_dir=tmp_path)
    assert f"{tmp_path}/cifar100" in str(error.value)


def test_synthetic_is_configurable_and_deterministic():
    options = data.SyntheticOptions(image_shape=(8, 6, 2), num_classes=3, num_train=20, num_test=5)
    first, second = (
        data.load_dataset("synthetic", synthetic=options),
        data.synthetic_dataset(options),
    )

    assert first.input_shape == (8, 6, 2) and first.num_classes == 3
    assert first.num_examples == {data.Split.TRAIN: 20, data.Split.TEST: 5}
    for split in data.Split:
        np.testing.assert_array_equal(first.splits[split].images, second.splits[split].images)
        np.testing.assert_array_equal(first.splits[split].labels, second.splits[split].labels)
    assert set(first.splits[data.Split.TRAIN].labels.tolist()) == {0, 1, 2}


# ---------------------------------------------------------------- batching


def _take(dataset, count, **kwargs):
    return list(itertools.islice(data.train_batches(dataset, **kwargs), count))


def test_same_seed_same_batches_other_seed_other_batches(synthetic):
    first = _take(synthetic, 4, global_batch_size=16, seed=3)
    again = _take(synthetic, 4, global_batch_size=16, seed=3)
    other = _take(synthetic, 4, global_batch_size=16, seed=4)

    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(first[0][0], other[0][0])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_concatenate_to_global_batch(synthetic, process_count):
    common = dict(global_batch_size=16, seed=1, start_step=5, num_steps=2)  # Crosses an epoch.
    global_batches = list(data.train_batches(synthetic, **common))
    slices = [
        list(data.train_batches(synthetic, process_index=p, process_count=process_count, **common))
        for p in range(process_count)
    ]
    for step, (images, labels) in enumerate(global_batches):
        np.testing.assert_array_equal(np.concatenate([s[step][0] for s in slices]), images)
        np.testing.assert_array_equal(np.concatenate([s[step][1] for s in slices]), labels)

    evals = [
        list(data.eval_batches(synthetic, global_batch_size=8, process_index=p, process_count=4))
        for p in range(4)
    ]
    for batch, parts in zip(
        data.eval_batches(synthetic, global_batch_size=8), zip(*evals, strict=True), strict=True
    ):
        for field in range(3):
            np.testing.assert_array_equal(np.concatenate([p[field] for p in parts]), batch[field])


def test_batch_not_divisible_by_processes_is_an_error(synthetic):
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        next(data.train_batches(synthetic, global_batch_size=16, seed=0, process_count=3))


def test_start_step_equals_skipping(synthetic):
    steps = data.steps_per_epoch(100, 16)
    assert steps == 6
    from_zero = _take(synthetic, 10, global_batch_size=16, seed=2)
    resumed = _take(synthetic, 3, global_batch_size=16, seed=2, start_step=7)
    for (x1, y1), (x2, y2) in zip(from_zero[7:], resumed, strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)


def test_epoch_visits_each_example_once(synthetic):
    labels = synthetic.splits[data.Split.TRAIN].labels
    epoch = _take(synthetic, 6, global_batch_size=16, seed=0, augment=False)
    counts = np.bincount(np.concatenate([y for _, y in epoch]), minlength=10)
    # 96 of 100 examples; the 4 dropped ones change at most 4 counts by one each.
    assert np.abs(counts - np.bincount(labels, minlength=10)).sum() == 4


def test_eval_covers_split_in_order_with_padding(synthetic):
    test = synthetic.splits[data.Split.TEST]
    batches = list(data.eval_batches(synthetic, global_batch_size=16))
    assert len(batches) == data.num_eval_batches(37, 16) == 3
    assert all(images.shape == (16, 32, 32, 3) for images, _, _ in batches)
    images, labels, mask = (np.concatenate(field) for field in zip(*batches, strict=True))
    assert mask.sum() == 37 and not mask[37:].any()
    np.testing.assert_array_equal(labels[:37], test.labels)
    assert images.dtype == np.uint8
    np.testing.assert_array_equal(images[:37], test.images)  # the eval transform: none
    assert not images[37:].any()


def test_eval_passes_repeat_the_split_from_one_iterator(synthetic):
    one = list(data.eval_batches(synthetic, global_batch_size=16))
    endless = data.eval_batches(synthetic, global_batch_size=16, num_passes=None)
    for passes in (
        list(data.eval_batches(synthetic, global_batch_size=16, num_passes=2)),
        [batch for _ in range(3) for batch in itertools.islice(endless, len(one))],
    ):
        assert len(passes) % len(one) == 0
        for got, want in zip(passes, one * (len(passes) // len(one)), strict=True):
            for x, y in zip(got, want, strict=True):
                np.testing.assert_array_equal(x, y)
    endless.close()
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match="num_passes"):
            data.eval_batches(synthetic, global_batch_size=16, num_passes=bad)


def test_augmentation_keeps_shape_and_changes_images(fashion_mnist):
    plain_x, plain_y = data.train_batch(
        fashion_mnist, 3, global_batch_size=64, seed=0, augment=False
    )
    aug_x, aug_y = data.train_batch(fashion_mnist, 3, global_batch_size=64, seed=0)
    assert aug_x.shape == plain_x.shape == (64, 28, 28, 1) and aug_x.dtype == np.uint8
    np.testing.assert_array_equal(aug_y, plain_y)
    changed = np.any(aug_x != plain_x, axis=(1, 2, 3))
    assert changed.mean() > 0.5


@pytest.mark.parametrize("flip", [False, True])
def test_pad_crop_flip_outputs_are_crops(flip):
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, (32, 6, 5, 2), np.uint8)
    options = data.PadCropFlip(padding_px=2, flip=flip)
    out = augment.pad_crop_flip(images, augment.example_keys(0, 0, np.arange(32)), options)
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
    flips_seen = set()
    for source, crop in zip(padded, out, strict=True):
        matches = {
            (dy, dx, mirrored)
            for dy, dx, mirrored in itertools.product(range(5), range(5), (False, True))
            if np.array_equal(
                crop, (source[:, ::-1] if mirrored else source)[dy : dy + 6, dx : dx + 5]
            )
        }
        assert matches, "output is not a crop of the padded image"
        flips_seen |= {mirrored for *_, mirrored in matches}
    assert flips_seen == ({False, True} if flip else {False})


def test_inception_crops_are_deterministic_and_eval_is_centered():
    images = [np.full((50 + 9 * i, 80 - 7 * i, 3), 10 * i, np.uint8) for i in range(4)]
    images[0][:, :40] = 255  # Left half white: a flip or off-center crop shows.
    options = data.InceptionCropFlip(image_size=16, resize_size=18)
    keys = augment.example_keys(5, 1, np.arange(4))

    first = augment.inception_crop_flip(images, keys, options)
    np.testing.assert_array_equal(first, augment.inception_crop_flip(images, keys, options))
    assert first.shape == (4, 16, 16, 3) and first.dtype == np.uint8
    centered = augment.resize_center_crop(images, options)
    assert centered.shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(
        centered[1:], np.stack([np.full((16, 16, 3), 10 * i) for i in (1, 2, 3)])
    )
    # The central box of image 0 spans x in [17.8, 62.2]: white to x=40, i.e. left half.
    np.testing.assert_array_equal(centered[0, :, :7], 255)
    np.testing.assert_array_equal(centered[0, :, 9:], 0)
