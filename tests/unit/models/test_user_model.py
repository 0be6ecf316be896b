"""Users' own models (``--model path/to/file.py:function`` or ``module:function``): found, built with the
dataset's classes and channels, split into units by their hook or their top-level children, and trained
bit-exact on 2 ranks against plain PyTorch; a model with GroupNorm and LayerNorm and no residual block
included. Bad names fail with an error that names them."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from jobspec import make_job
from tests.unit.zero3.fixtures import assert_bit_identical, run_ranks
from tests.unit.zero3.reference import plain_reference
from worker.models import build_model, units
from worker.trainer import Trainer

pytestmark = pytest.mark.timeout(120)

USER_MODEL = textwrap.dedent(
    """
    from torch import nn

    class Plain(nn.Module):
        # No residual block, no BatchNorm: GroupNorm and LayerNorm, a chain of top-level children.
        def __init__(self, num_classes, in_channels):
            super().__init__()
            conv = nn.Conv2d(in_channels, 16, 3, padding=1)
            self.conv = nn.Sequential(conv, nn.GroupNorm(4, 16), nn.ReLU())
            self.pool = nn.AdaptiveAvgPool2d(2)
            self.flat = nn.Flatten()
            self.mlp = nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32), nn.GELU())
            self.head = nn.Linear(32, num_classes)

        def forward(self, x):
            return self.head(self.mlp(self.flat(self.pool(self.conv(x)))))

    def make(num_classes, in_channels):
        return Plain(num_classes, in_channels)

    class Declared(Plain):
        def zerowire_units(self):
            return [self.head, self.conv]

    def declared(num_classes, in_channels):
        return Declared(num_classes, in_channels)

    def not_a_module(num_classes, in_channels):
        return 42
    """
)


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_model.py"
    path.write_text(USER_MODEL)
    return path


def test_a_users_model_is_built_and_cut_into_units(model_file: Path) -> None:
    model = build_model(f"{model_file}:make", num_classes=7, in_channels=1)
    assert type(model).__name__ == "Plain" and model.head.out_features == 7 and model.conv[0].in_channels == 1
    assert units(model) == [model.conv, model.mlp, model.head]  # top-level children holding parameters
    declared = build_model(f"{model_file}:declared", 10, 3)
    assert units(declared) == [declared.head, declared.conv]  # its hook wins


def test_an_importable_module_names_its_factory(model_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(model_file.parent))
    model = build_model("my_model:make", num_classes=3, in_channels=2)
    assert type(model).__name__ == "Plain" and model.head.out_features == 3


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no/such/file.py:make", "no file"),
        ("{file}:missing", "has no function missing"),
        ("{file}:not_a_module", "returned int, not a torch.nn.Module"),
        ("no_such_package_zw:make", "cannot import no_such_package_zw"),
        ("{file}:", "expected module:function"),
        ("resnet9000", "unknown model 'resnet9000'"),
    ],
)
def test_a_bad_model_name_is_named_in_the_error(model_file: Path, name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as refused:
        build_model(name.format(file=model_file), 10, 1)
    assert name.format(file=model_file) in str(refused.value)


def test_a_norm_model_without_residuals_trains_bit_exact_on_two_ranks(model_file: Path) -> None:
    job = make_job(
        dict(job_id="user", model=f"{model_file}:make", steps=6, global_batch=32, lr=0.05, momentum=0.9)
    )
    assert job.warmup_steps == 0

    def body(rank: int, hub: object, group: object) -> dict[str, torch.Tensor]:
        trainer = Trainer(job, group, hub.backend(rank), device=torch.device("cpu"))  # type: ignore[arg-type, attr-defined]
        assert [u.module for u in trainer.engine.plan.units][:3] == ["conv", "mlp", "head"]
        trainer.run()
        from worker.zero3 import state as zstate

        return zstate.full_state_dict(trainer.engine, trainer.steps_done)

    results = run_ranks(2, body)
    names = [n for n, _ in build_model(job.model, 10, 1).named_parameters()]
    params = {n: results[0][n] for n in names}
    assert_bit_identical(params, plain_reference(job, lambda s: 2))
    assert_bit_identical(params, {n: results[1][n] for n in names})
