"""The Python API (zerowire/api.py): a job from a model factory and a data object, named so that workers in
other processes find them; invalid jobs refused in one line; a job file a coordinator takes back unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobspec import InvalidJob, load_job_file
from jobspec import make_job as job_from_values
from tests.unit.data.image_tree import make_tree
from worker.models import build_model
from zerowire.api import ImageFolder, make_job, model_name, write_job

pytestmark = pytest.mark.timeout(60)


def test_a_factory_is_named_where_workers_find_it(tmp_path: Path) -> None:
    assert model_name("resnet18") == "resnet18"
    assert model_name(build_model) == "worker.models.registry:build_model"
    with pytest.raises(InvalidJob, match="module-level function"):
        model_name(lambda num_classes, in_channels: None)
    script = tmp_path / "script.py"
    script.write_text("def net(num_classes, in_channels):\n    return None\n")
    namespace: dict[str, object] = {"__name__": "__main__"}
    exec(compile(script.read_text(), str(script), "exec"), namespace)  # a function of the script being run
    assert model_name(namespace["net"]) == f"{script.resolve()}:net"  # type: ignore[arg-type]


def test_a_job_from_objects_and_its_file(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "images", per_class=2)
    job = make_job(model="resnet8", data=ImageFolder(root), steps=20, image_size=32, augment="flip")
    assert job.dataset == f"imagefolder:{root.resolve()}" and job.warmup_steps == 2
    path = write_job(job, tmp_path / "job.toml")
    assert job_from_values(load_job_file(path)).hash == job.hash  # a coordinator serves the same job
    with pytest.raises(InvalidJob, match=r"^invalid job: --image-size must be an integer >= 8"):
        make_job(data=ImageFolder(root), image_size=4)
