"""``imagefolder:DIR``: the index (classes, splits, channels), batches bit-identical whatever the number of
loader processes and of workers, a new epoch's plan that loses and repeats nothing, bad files that fail with
their name or are skipped and counted, and a job trained on it bit-exact on 2 ranks against plain PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from jobspec import make_job
from tests.unit.data.image_tree import CLASSES, make_tree
from tests.unit.zero3.fixtures import assert_bit_identical, run_ranks
from tests.unit.zero3.reference import plain_reference
from worker.data import GlobalBatchSampler, load_dataset, rank_slice
from worker.data.decode import BadImage
from worker.data.imagefolder import ImageOptions
from worker.data.stream import StreamingImages
from worker.models import build_model
from worker.trainer import Trainer

pytestmark = pytest.mark.timeout(120)

SIZE = 16


def dataset(root: Path, loaders: int = 0, **options: object) -> StreamingImages:
    data = load_dataset(f"imagefolder:{root}", None, 7, ImageOptions(size=SIZE, loaders=loaders, **options))  # type: ignore[arg-type]
    assert isinstance(data, StreamingImages)
    return data


def test_the_index_sorts_classes_holds_out_a_stratified_split_and_reads_channels(tmp_path: Path) -> None:
    make_tree(tmp_path / "t", per_class=10)
    (tmp_path / "t" / "train" / "cat" / "notes.txt").write_text("not an image, not an image extension")
    data = dataset(tmp_path / "t", val_fraction=0.2)
    info = data.describe()
    assert info["classes"] == list(CLASSES) and data.num_classes == 3 and data.in_channels == 3
    assert (data.train_size, data.test_size) == (24, 6)  # 2 of each class's 10 held out
    assert info["test_split"] == "held out of train/" and info["bad_images_skipped"] == 0
    assert sorted(label for _, label in data.index.test) == [0, 0, 1, 1, 2, 2]
    assert len(info["normalisation"]["mean"]) == 3 and all(s > 0 for s in info["normalisation"]["std"])
    make_tree(tmp_path / "v", per_class=4, val=2, grey=True)
    grey = dataset(tmp_path / "v")
    assert grey.in_channels == 1 and (grey.train_size, grey.test_size) == (12, 6)
    assert grey.describe()["test_split"] == "val/"
    x, y = grey.test_batch(torch.arange(6))
    assert x.shape == (6, 1, SIZE, SIZE) and x.dtype == torch.float32 and y.tolist() == [0, 0, 1, 1, 2, 2]
    forced = dataset(tmp_path / "v", channels=3)
    assert forced.train_batch(torch.arange(2), 0)[0].shape == (2, 3, SIZE, SIZE)


def test_a_missing_or_empty_tree_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dataset(tmp_path / "nowhere")
    (tmp_path / "e" / "train" / "only").mkdir(parents=True)
    with pytest.raises(ValueError, match="at least two class folders"):
        dataset(tmp_path / "e")


@pytest.mark.parametrize("augment", ["rrc-flip", "crop-flip", "flip", "none"])
def test_a_batch_is_the_same_whatever_the_loader_processes_and_workers(tmp_path: Path, augment: str) -> None:
    root = make_tree(tmp_path / "t", per_class=8)
    one, three = dataset(root, augment=augment), dataset(root, loaders=3, augment=augment)
    try:
        sampler = GlobalBatchSampler(one.train_size, 12, 7)
        for step in (0, 1, 5):
            whole = one.train_batch(sampler.indices(step), step, 0)
            assert whole[0].shape == (12, 3, SIZE, SIZE)
            halves = []
            for rank in range(2):  # two workers, each its slice, decoded by three processes
                start, _ = rank_slice(12, 2, rank)
                halves.append(three.train_batch(sampler.local_indices(step, 2, rank), step, start))
            assert torch.equal(torch.cat([h[0] for h in halves]), whole[0])
            assert torch.equal(torch.cat([h[1] for h in halves]), whole[1])
        if augment != "none":  # the draws are keyed by step: another step, other crops and flips
            assert not torch.equal(
                one.train_batch(torch.arange(4), 2)[0], one.train_batch(torch.arange(4), 3)[0]
            )
        every = torch.arange(one.test_size)
        assert torch.equal(one.test_batch(every)[0], three.test_batch(every)[0])
    finally:
        three.close()


def test_a_new_plan_reads_ahead_from_the_first_uncommitted_step(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t", per_class=8)
    data, fresh = dataset(root, loaders=2), dataset(root)
    try:
        sampler = GlobalBatchSampler(data.train_size, 8, 7)
        world = {"n": 2}

        def plan(step: int) -> tuple[torch.Tensor, int]:  # rank 0's slice at the current world size
            return sampler.local_indices(step, world["n"], 0), 0

        data.follow(plan)
        for step in range(3):
            data.train_batch(*plan(step)[:1], step, 0)
        assert set(data._queued) == {(3, 0), (4, 0)}  # two steps ahead, at the old world size
        world["n"] = 1  # a failover: the same rank now holds the whole batch from step 3 on
        data.follow(plan)
        for step in (3, 4, 5):
            got = data.train_batch(sampler.indices(step), step, 0)
            want = fresh.train_batch(sampler.indices(step), step, 0)
            assert torch.equal(got[0], want[0]) and torch.equal(
                got[1], want[1]
            )  # nothing stale, lost or repeated
        assert data.take_wait() >= 0.0 and data.take_wait() == 0.0
    finally:
        data.close()


def _bad_files(root: Path) -> tuple[Path, Path]:
    jpeg = next((root / "train" / "dog").glob("*.jpg"))
    truncated = jpeg.with_name("truncated.jpg")
    truncated.write_bytes(jpeg.read_bytes()[:60])
    text = root / "train" / "eel" / "readme.jpg"
    text.write_text("this is text, not a JPEG")
    return truncated, text


@pytest.mark.parametrize("loaders", [0, 2])
def test_bad_files_fail_with_their_name_or_are_skipped_and_counted(tmp_path: Path, loaders: int) -> None:
    root = make_tree(tmp_path / "t", per_class=6, val=1)  # every train/ file in the train split
    truncated, text = _bad_files(root)
    failing = dataset(root, loaders=loaders)
    skipping = dataset(root, loaders=loaders, bad_images="skip")
    try:
        paths = [p for p, _ in failing.index.train]
        bad = [paths.index(str(truncated)), paths.index(str(text))]
        batch = torch.tensor([0, *bad, 1])
        with pytest.raises(BadImage, match=r"truncated\.jpg|readme\.jpg"):
            failing.train_batch(batch, 0)
        x, y = skipping.train_batch(batch, 0)
        assert x.shape[0] == y.shape[0] == 2 and skipping.describe()["bad_images_skipped"] == 2
        # the others keep their positions in the global batch (0 and 3), and so their draws
        first, last = (
            skipping.train_batch(torch.tensor([0]), 0, 0),
            skipping.train_batch(torch.tensor([1]), 0, 3),
        )
        assert torch.equal(x, torch.cat([first[0], last[0]])) and torch.equal(
            y, torch.cat([first[1], last[1]])
        )
    finally:
        failing.close()
        skipping.close()


def test_a_job_on_an_image_folder_trains_bit_exact_on_two_ranks(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t", per_class=8)
    job = make_job(
        dict(
            job_id="img", model="resnet8", dataset=f"imagefolder:{root}", steps=3, global_batch=8, lr=0.05,
            image_size=SIZE, augment="rrc-flip",
        )
    )  # fmt: skip

    def body(rank: int, hub: object, group: object) -> Trainer:
        trainer = Trainer(job, group, hub.backend(rank), device=torch.device("cpu"))  # type: ignore[arg-type, attr-defined]
        trainer.run()
        trainer.save_model(tmp_path / "model.safetensors")
        return trainer

    trainers = run_ranks(2, body)
    from worker.zero3 import state as zstate

    names = [n for n, _ in build_model("resnet8", 3, 3).named_parameters()]
    got = zstate.full_state_dict(trainers[0].engine, job.steps, sync=False)
    assert_bit_identical({n: got[n] for n in names}, plain_reference(job, lambda s: 2))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["classes"]) == list(CLASSES)
