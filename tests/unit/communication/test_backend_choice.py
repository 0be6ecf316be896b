"""Which backend the torch.distributed lane forms an epoch's group with: NCCL only when every co-located
member has a GPU of its own; otherwise gloo, saying why when every member has a GPU (NCCL refuses two ranks
on one GPU: "Duplicate GPU detected", which would fail every epoch alike)."""

from __future__ import annotations

from communication.torchdist_group import choose_backend


def test_nccl_only_for_members_on_distinct_gpus() -> None:
    assert choose_backend(["cuda:0", "cuda:1"], True) == ("nccl", "")
    assert choose_backend(["cuda:1", "cuda:0", "cuda:2"], True) == ("nccl", "")
    assert choose_backend(["cpu", "cpu"], True) == ("gloo", "")
    assert choose_backend(["cuda:0", "cpu"], True) == ("gloo", "")  # one member on the host: all on gloo


def test_members_sharing_a_gpu_fall_back_to_gloo_and_say_which() -> None:
    backend, why = choose_backend(["cuda:0", "cuda:0", "cuda:1"], True)
    assert backend == "gloo"
    assert "cuda:0 (ranks 0, 1)" in why and "own GPU" in why and "cuda:1" not in why.split(":", 1)[0]


def test_no_nccl_in_this_torch() -> None:
    backend, why = choose_backend(["cuda:0", "cuda:1"], False)
    assert backend == "gloo" and "no NCCL" in why
