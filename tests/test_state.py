"""Tests of ``_state``: module modes and random states come back exactly."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from panoviz_callback._state import _check_grads_unchanged, _grad_snapshot, preserved_modes, preserved_rng


def _net() -> nn.Module:
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Sequential(nn.Dropout(0.5), nn.Linear(4, 2)))
    net.train()
    net[1].eval()  # a frozen BatchNorm inside a training model
    return net


def _modes(module: nn.Module) -> list[bool]:
    return [m.training for m in module.modules()]


def test_smoke_preserved_modes():
    net = _net()
    before = _modes(net)
    with preserved_modes(net):
        net.eval()
        assert not any(_modes(net))
    assert _modes(net) == before
    assert net.training and not net[1].training


def test_preserved_modes_restores_on_exception():
    net = _net()
    before = _modes(net)
    with pytest.raises(RuntimeError, match="boom"), preserved_modes(net):
        net.train()  # wakes up the frozen BatchNorm
        raise RuntimeError("boom")
    assert _modes(net) == before


def test_preserved_modes_several_modules_and_callables():
    a, b = _net(), _net().eval()
    with preserved_modes(a, b, None, lambda x: x):
        a.eval()
        b.train()
    assert a.training and not a[1].training
    assert not any(_modes(b))


def _draw() -> tuple[float, float, float]:
    return torch.rand(1).item(), float(np.random.rand()), random.random()


def test_preserved_rng_back_and_forth():
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    with preserved_rng():
        _draw()
        torch.manual_seed(123)  # even reseeding inside is undone
    after = _draw()
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    assert after == _draw()


def test_preserved_rng_restores_on_exception():
    torch.manual_seed(2)
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match="x"), preserved_rng():
        torch.rand(10)
        raise ValueError("x")
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_preserved_rng_cuda():
    torch.cuda.init()
    state = torch.cuda.get_rng_state_all()
    with preserved_rng():
        torch.rand(10, device="cuda")
    assert all(torch.equal(a, b) for a, b in zip(state, torch.cuda.get_rng_state_all()))


def test_grad_snapshot_detects_changes():
    net = _net()
    net(torch.randn(3, 4)).sum().backward()
    snap = _grad_snapshot(net)
    _check_grads_unchanged(net, snap)
    with torch.no_grad():
        net[0].weight.grad.add_(1)
    with pytest.raises(AssertionError, match=r"`0.weight.grad` changed"):
        _check_grads_unchanged(net, snap)
    net = _net()
    snap = _grad_snapshot(net)
    net[0].bias.requires_grad_(False)
    with pytest.raises(AssertionError, match=r"`0.bias.requires_grad` changed"):
        _check_grads_unchanged(net, snap)
