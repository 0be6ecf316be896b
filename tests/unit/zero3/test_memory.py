"""Memory figures from the plan, and the engine's measured peak of full parameters against the bound."""

from __future__ import annotations

import pytest

from worker.models import build_model
from worker.zero3.memory import memory_figures, optimizer_slots
from worker.zero3.plan import build_plan, plan_model


def test_figures_from_a_hand_made_plan() -> None:
    plan = build_plan([("a", [("a.w", (10,))]), ("b", [("b.w", (3, 2))])], 4)  # 10 -> 12, 6 -> 8
    fig = memory_figures(plan, "sgd", 0.9, buffer_bytes=40)
    assert fig.zero3_param_bytes == (3 + 2) * 4
    assert fig.zero3_persistent_bytes == 5 * 4 * 3 + 40
    assert fig.ddp_persistent_bytes == 16 * 4 * 3 + 40
    assert fig.full_param_bound_bytes == (12 + 8 + 12) * 4
    adam = memory_figures(plan, "adamw", 0.0, buffer_bytes=0)
    assert adam.zero3_optim_bytes == 2 * adam.zero3_param_bytes
    assert optimizer_slots("sgd", 0.0) == 0
    with pytest.raises(ValueError):
        optimizer_slots("lamb", 0.0)


@pytest.mark.parametrize("world", [2, 4])
def test_resnet18_is_about_one_nth_of_ddp(world: int) -> None:
    plan = plan_model(build_model("resnet18", 10, 3), world)
    fig = memory_figures(plan, "sgd", 0.9, buffer_bytes=0)
    assert fig.ratio_vs_ddp == pytest.approx(1 / world, rel=1e-5)
    assert fig.ratio_vs_ddp >= 1 / world
