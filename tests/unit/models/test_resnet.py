"""ResNet family: published parameter counts, shapes, unit structure, determinism, BatchNorm modes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from worker.models import MODEL_NAMES, ResNet, build_model, units
from worker.models.blocks import PadShortcut
from worker.models.resnet import he_cifar_resnet


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def he_resnet_count(n: int, in_channels: int = 3, num_classes: int = 10) -> int:
    """Hand count of ResNet-(6n+2) with option A shortcuts: convs (no bias) + BN (weight, bias) + fc."""

    def block(cin: int, cout: int) -> int:
        return 9 * cin * cout + 9 * cout * cout + 4 * cout

    total = 9 * in_channels * 16 + 2 * 16
    cin = 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += block(cin, width)
            cin = width
    return total + 64 * num_classes + num_classes


@pytest.mark.parametrize(
    ("name", "num_classes", "expected"),
    [
        ("resnet18", 10, 11_173_962),  # CIFAR ResNet-18 as commonly published (projection shortcuts)
        ("resnet34", 10, 21_282_122),
        ("resnet50", 1000, 25_557_032),  # ImageNet ResNet-50 (torchvision / He et al.)
        ("resnet20", 10, 269_722),  # He et al. 2016 Table 6: "0.27M", option A
        ("resnet56", 10, 853_018),  # He et al. 2016 Table 6: "0.85M", option A
        ("resnet8", 10, he_resnet_count(1)),
    ],
)
def test_published_parameter_counts(name: str, num_classes: int, expected: int) -> None:
    assert n_params(build_model(name, num_classes)) == expected


def test_option_a_counts_match_hand_count_and_projection_variant_adds_2752() -> None:
    for n, published_m in ((1, None), (3, 0.27), (9, 0.85)):
        model = he_cifar_resnet(n)
        assert n_params(model) == he_resnet_count(n)
        if published_m is not None:
            assert round(n_params(model) / 1e6, 2) == published_m
    # 1x1-conv + BN projections at the two downsampling blocks: (16*32 + 2*32) + (32*64 + 2*64) = 2752.
    assert n_params(he_cifar_resnet(3, shortcut="projection")) == 269_722 + 2752 == 272_474
    assert n_params(he_cifar_resnet(9, shortcut="projection")) == 853_018 + 2752 == 855_770


@pytest.mark.parametrize(
    ("name", "n_blocks", "shape"),
    [
        ("resnet8", 3, (2, 3, 8, 8)),
        ("resnet20", 9, (2, 3, 16, 16)),
        ("resnet56", 27, (2, 3, 16, 16)),
        ("resnet18", 8, (2, 3, 32, 32)),
        ("resnet34", 16, (2, 3, 16, 16)),
        ("resnet50", 16, (2, 3, 64, 64)),
    ],
)
def test_units_structure_and_bit_exact_forward(name: str, n_blocks: int, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=7)
    assert isinstance(model, ResNet)
    assert [n for n, _ in model.named_children()] == ["stem", "blocks", "head"]
    us = units(model)
    assert us == [model.stem, *model.blocks, model.head]
    assert len(model.blocks) == n_blocks
    # Every parameter and buffer belongs to exactly one unit.
    owned = [id(p) for u in us for p in u.parameters()]
    assert len(owned) == len(set(owned)) and set(owned) == {id(p) for p in model.parameters()}
    assert sum(len(list(u.buffers())) for u in us) == len(list(model.buffers()))

    x = torch.randn(*shape)
    for train in (True, False):
        a, b = copy.deepcopy(model).train(train), copy.deepcopy(model).train(train)
        with torch.no_grad():
            out = a(x)
            h = x
            for unit in units(b):
                h = unit(h)
        assert out.shape == (shape[0], 7)
        assert torch.equal(out, h)
        for ba, bb in zip(a.buffers(), b.buffers(), strict=True):
            assert torch.equal(ba, bb)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_one_input_channel(name: str) -> None:
    model = build_model(name, num_classes=10, in_channels=1).eval()
    size = 64 if name == "resnet50" else 8
    with torch.no_grad():
        out = model(torch.randn(3, 1, size, size))
    assert out.shape == (3, 10) and torch.isfinite(out).all()


def test_seeded_build_is_deterministic() -> None:
    def state(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return build_model("resnet20").state_dict()

    a, b, c = state(3), state(3), state(4)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_training_step_is_deterministic() -> None:
    def run() -> list[torch.Tensor]:
        torch.manual_seed(11)
        model = build_model("resnet8", 10, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return [t.detach().clone() for t in model.state_dict().values()]

    assert all(torch.equal(a, b) for a, b in zip(run(), run(), strict=True))


def test_batchnorm_train_and_eval_modes() -> None:
    torch.manual_seed(0)
    model = build_model("resnet8", 10, 1)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert bn.running_mean is not None and bn.num_batches_tracked is not None
    x = torch.randn(8, 1, 8, 8) * 3 + 2
    # Train mode: batch statistics, so a sample's output depends on its batch; running stats move.
    model.train()
    with torch.no_grad():
        full = model(x)
        half = model(x[:4])
    assert not torch.allclose(full[:4], half, atol=1e-5)
    assert int(bn.num_batches_tracked) == 2
    assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    # Eval mode: running statistics, so outputs are per-sample and buffers stay put.
    model.eval()
    before = [b.clone() for b in model.buffers()]
    with torch.no_grad():
        full = model(x)
        half = model(x[:4])
    torch.testing.assert_close(full[:4], half, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers(), strict=True))


def test_pad_shortcut_subsamples_and_zero_pads() -> None:
    sc = PadShortcut(16, 32, 2)
    assert not list(sc.parameters())
    x = torch.randn(2, 16, 8, 8)
    out = sc(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()
    with pytest.raises(ValueError, match="cannot reduce"):
        PadShortcut(32, 16, 2)


def test_unknown_model_and_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet99'; known models: resnet18, resnet20"):
        build_model("resnet99")
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet8", num_classes=0)
    with pytest.raises(ValueError, match="in_channels"):
        build_model("resnet8", in_channels=0)


def test_units_of_other_modules() -> None:
    seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert units(seq) == [seq[0], seq[2]]  # the children that hold parameters
    assert units(nn.Linear(2, 2)) == []  # its own parameters: the engine's root unit
    with pytest.raises(ValueError, match="no parameters"):
        units(nn.Sequential(nn.ReLU()))
