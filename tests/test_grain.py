"""The grain input pipeline: JPEG tfds data decoded, sharded, deterministic, the same for any
number of workers, and a resumed run fed exactly like an uninterrupted one."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import PIL.Image
import pytest

from jaxprune import cli, data, pipeline, train

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"


def _bench_script():
    spec = importlib.util.spec_from_file_location("bench_data", EXPERIMENTS / "bench_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory) -> Path:
    """A prepared tfds ``imagenet2012`` of 13 train and 5 validation JPEGs of ~60x50."""
    data_dir = tmp_path_factory.mktemp("jpeg_tfds")
    _bench_script().build_jpeg_imagenet(data_dir, 13, 5, (60, 50))
    return data_dir


@pytest.fixture(scope="module")
def jpeg(jpeg_dir) -> data.Dataset:
    """The JPEG set with 32x32 crops (the 224 default only costs time here)."""
    dataset = data.load_dataset("imagenet2012", data_dir=jpeg_dir)
    small = data.InceptionCropFlip(image_size=32, resize_size=36)
    return dataclasses.replace(dataset, augmentation=small, input_shape=(32, 32, 3))


def _assert_same(first, second) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------- decoding and batches


def test_jpeg_records_decode_to_their_images(jpeg_dir):
    dataset = data.load_dataset("imagenet2012", data_dir=jpeg_dir)
    train_split = dataset.splits[data.Split.TRAIN]
    assert isinstance(train_split, data.SourceExamples) and len(train_split) == 13
    images, labels = train_split.read(np.arange(13))
    assert all(image.dtype == np.uint8 and image.shape[2] == 3 for image in images)
    heights, widths = zip(*(image.shape[:2] for image in images), strict=True)
    assert 54 <= min(heights) and max(heights) <= 66 and 45 <= min(widths) and max(widths) <= 55
    # Label i % 1000 was written with example i; tfds shuffles the order on write.
    assert sorted(labels.tolist()) == list(range(13))
    # What the pipeline reads are the stored JPEGs decoded (by PIL, as tfds does without OpenCV).
    import tensorflow_datasets as tfds

    encoded = tfds.data_source(
        "imagenet2012",
        data_dir=jpeg_dir,
        split="train",
        decoders={"image": tfds.decode.SkipDecoding()},
    )
    for image, example in zip(images, encoded.__getitems__(range(13)), strict=True):
        decoded = np.asarray(PIL.Image.open(io.BytesIO(example["image"])).convert("RGB"))
        np.testing.assert_array_equal(image, decoded)


def test_augmented_batches_have_model_shapes(jpeg):
    images, labels = next(data.train_batches(jpeg, global_batch_size=4, seed=0))
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (4,) and labels.dtype == np.int32
    # The same step without augmentation differs (random crops and flips).
    plain, _ = next(data.train_batches(jpeg, global_batch_size=4, seed=0, augment=False))
    assert np.any(images != plain)
    evals = list(data.eval_batches(jpeg, global_batch_size=4))
    assert [e[0].shape for e in evals] == [(4, 32, 32, 3)] * 2
    np.testing.assert_array_equal(np.concatenate([e[2] for e in evals]), [1] * 5 + [0] * 3)


def test_grain_batches_are_the_pure_function_of_the_step(jpeg):
    batches = list(data.train_batches(jpeg, global_batch_size=4, seed=7, start_step=2, num_steps=4))
    by_step = [data.train_batch(jpeg, step, global_batch_size=4, seed=7) for step in range(2, 6)]
    _assert_same(batches, by_step)  # 3 steps per epoch: crosses an epoch boundary
    other_seed = next(data.train_batches(jpeg, global_batch_size=4, seed=8, start_step=2))
    assert not np.array_equal(other_seed[0], batches[0][0])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_of_jpeg_batches_make_the_global_batch(jpeg, process_count):
    common = dict(global_batch_size=4, seed=1, start_step=2, num_steps=2)
    global_batches = list(data.train_batches(jpeg, **common))
    shards = [
        list(data.train_batches(jpeg, process_index=p, process_count=process_count, **common))
        for p in range(process_count)
    ]
    for step, batch in enumerate(global_batches):
        for field in range(2):
            merged = np.concatenate([shard[step][field] for shard in shards])
            np.testing.assert_array_equal(merged, batch[field])


@pytest.mark.slow
def test_two_workers_equal_zero_workers_batch_for_batch(jpeg):
    """Worker processes (spawned, reading the array_record files themselves) change nothing."""
    common = dict(global_batch_size=4, seed=3, start_step=1, num_steps=7)
    _assert_same(
        list(data.train_batches(jpeg, **common, num_workers=2)),
        list(data.train_batches(jpeg, **common, num_workers=0)),
    )
    _assert_same(
        list(data.eval_batches(jpeg, global_batch_size=2, num_workers=2)),
        list(data.eval_batches(jpeg, global_batch_size=2, num_workers=0)),
    )


@pytest.mark.slow
@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="shared memory is not under /dev/shm")
def test_worker_segments_are_unlinked_as_their_batches_are_read(jpeg):
    """No shared-memory segment of a worker's batch is left once the batches are read (grain's
    own unlinking runs later, from a thread a process can exit before)."""
    before = set(os.listdir("/dev/shm"))
    batches = list(
        data.train_batches(jpeg, global_batch_size=4, seed=0, num_steps=5, num_workers=2)
    )
    assert len(batches) == 5
    left = {name for name in set(os.listdir("/dev/shm")) - before if name.startswith("psm_")}
    assert not left, left


# ---------------------------------------------------------------- workers: defaults and errors


def test_default_workers_by_where_the_data_lives(jpeg):
    assert data.default_num_workers(data.synthetic_dataset(data.SyntheticOptions())) == 0
    assert data.default_num_workers(jpeg) == min(len(os.sched_getaffinity(0)), 8)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_worker_count_is_refused_before_any_batch(jpeg, bad):
    with pytest.raises(ValueError, match="data workers must be an integer >= 0"):
        data.train_batches(jpeg, global_batch_size=4, seed=0, num_workers=bad)
    with pytest.raises(ValueError, match="data workers must be an integer >= 0"):
        data.eval_batches(jpeg, global_batch_size=4, num_workers=bad)


def _cli_error(argv, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        cli.main([str(a) for a in argv])
    assert exited.value.code == cli.USER_ERROR
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_cli_errors_are_one_line(tmp_path, capsys):
    train_args = ["train", "--model", "lenet5", "--steps", "1", "--workdir", tmp_path / "run"]
    err = _cli_error([*train_args, "--data", "synthetic", "--data-workers", "-2"], capsys)
    assert "--data-workers must be 0 or more, got -2" in err
    err = _cli_error([*train_args, "--data", "imagenet_21k"], capsys)
    assert "Unknown dataset 'imagenet_21k'" in err and "imagenet2012" in err
    err = _cli_error([*train_args, "--data", "imagenet2012", "--data-dir", tmp_path], capsys)
    assert f"{tmp_path}/imagenet2012" in err and "array_record" in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- exact resume with workers

RESUME = pipeline.TrainConfig(
    model="lenet5",
    data="synthetic",
    synthetic=data.SyntheticOptions((16, 16, 1), 10, num_train=100, num_test=20),
    num_steps=7,  # 6 steps per epoch: the resumed half crosses an epoch and evaluates at 6 and 7.
    batch_size=16,
    checkpoint_every=3,
    optimizer=train.OptimizerConfig(learning_rate=0.02),
)


def _final_state(workdir: Path):
    from jaxprune.pipeline import loading

    step, meta, _ = loading.open_checkpoint(workdir, None)
    return loading.restore(workdir, step, meta, train.make_mesh())[1]


@pytest.mark.slow
def test_a_run_split_in_two_with_workers_equals_an_uninterrupted_one(tmp_path):
    whole = pipeline.train(RESUME, tmp_path / "whole", progress=False, verbose=False)
    with_workers = dataclasses.replace(RESUME, data_workers=2)
    pipeline.train(with_workers, tmp_path / "split", stop_at=3, progress=False, verbose=False)
    second = pipeline.train(with_workers, tmp_path / "split", progress=False, verbose=False)
    assert whole == second
    rows = [train.MetricsLog(tmp_path / n / "metrics.jsonl").read() for n in ("whole", "split")]
    assert rows[0] == rows[1]  # every step's loss and accuracy, every evaluation
    leaves = [jax.tree.leaves(_final_state(tmp_path / n)) for n in ("whole", "split")]
    for a, b in zip(*leaves, strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- shared memory

_KEEP_BATCHES_TO_EXIT = """
import sys
from pathlib import Path

import numpy as np

from jaxprune import data, pipeline, train

if __name__ == "__main__":
    synthetic = data.SyntheticOptions((16, 16, 1), 10, num_train=64, num_test=20)
    dataset = data.synthetic_dataset(synthetic)
    kept = [*data.train_batches(dataset, global_batch_size=8, seed=0, num_steps=4, num_workers=2)]
    kept += data.eval_batches(dataset, global_batch_size=8, num_workers=2)
    assert all(type(array) is np.ndarray for batch in kept for array in batch)
    config = pipeline.TrainConfig(
        model="lenet5", data="synthetic", synthetic=synthetic, num_steps=5, batch_size=16,
        data_workers=2, optimizer=train.OptimizerConfig(learning_rate=0.02),
    )
    pipeline.train(config, Path(sys.argv[1]) / "run", progress=False, verbose=False)
    print("done")
"""


@pytest.mark.slow
def test_batches_from_workers_leak_no_shared_memory(tmp_path):
    """Batches from workers kept to interpreter exit, and a training run with workers: Python's
    resource tracker finds no shared-memory segment left to unlink at exit."""
    script = tmp_path / "keep_batches.py"
    script.write_text(_KEEP_BATCHES_TO_EXIT)
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        env=dict(os.environ, PYTHONPATH=path),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("done"), done.stderr[-3000:]
    assert "leaked shared_memory" not in done.stderr, done.stderr[-3000:]
    assert "Exception ignored" not in done.stderr, done.stderr[-3000:]


# ---------------------------------------------------------------- the benchmark


@pytest.mark.slow
def test_bench_data_tiny_json(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench_data.py"])  # argparse's prog only
    capsys.readouterr()
    _bench_script().main(["--tiny", "--json"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(printed) == {"workers", "baseline_loop", "baseline_loop_uint8"}
    cores = len(os.sched_getaffinity(0))
    assert set(printed["workers"]) == {str(n) for n in {0, 1, 2, cores}}
    rates = [*printed["workers"].values(), printed["baseline_loop"], printed["baseline_loop_uint8"]]
    assert all(isinstance(rate, float) and rate > 0 for rate in rates)
