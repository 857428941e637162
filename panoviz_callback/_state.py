"""Leave training untouched: restore module modes and random states around a probe.

The callback runs the probe forward in the middle of training. These context
managers make sure that nothing the training loop can observe changes: every
submodule's ``training`` flag comes back exactly as it was (a BatchNorm frozen in
``eval`` by the user stays in ``eval``), and the global random number generators
(torch CPU, every initialised CUDA device, NumPy, Python's ``random``) are
restored, so a run with the callback draws the same random numbers as a run
without it.

The ``_grad_snapshot`` / ``_check_grads_unchanged`` pair records and compares
``requires_grad`` and ``.grad`` of every parameter; the tests use it to prove that
a firing touches neither.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["preserved_modes", "preserved_rng"]


@contextlib.contextmanager
def preserved_modes(*modules: Any) -> Iterator[None]:
    """Restore the ``training`` flag of every submodule of ``modules`` on exit.

    ``module.train()`` / ``module.eval()`` set the flag recursively, which would
    wake up submodules the user froze in ``eval`` (a frozen BatchNorm). This
    records each submodule's own flag and puts it back, whatever happens inside.

    Args:
        *modules: modules to protect; anything that is not an :class:`torch.nn.Module`
            (a plain callable) is ignored.

    Example::

        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> _ = net[1].eval()  # a frozen BatchNorm inside a training model
        >>> with preserved_modes(net):
        ...     _ = net.eval()
        >>> net.training, net[1].training
        (True, False)
    """
    saved = [(m, m.training) for root in modules if isinstance(root, nn.Module) for m in root.modules()]
    try:
        yield
    finally:
        for module, training in saved:
            module.training = training


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the global random states of torch (CPU and CUDA), NumPy and ``random`` on exit.

    CUDA states are saved only when CUDA is already initialised, so the context
    manager never initialises CUDA itself.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> with preserved_rng():
        ...     _ = torch.rand(3)
        >>> after = torch.rand(1)
        >>> _ = torch.manual_seed(0)
        >>> bool(torch.equal(after, torch.rand(1)))
        True
    """
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def _grad_snapshot(module: nn.Module) -> dict[str, tuple[bool, torch.Tensor | None]]:
    """``{name: (requires_grad, copy of .grad or None)}`` for every parameter of ``module``."""
    return {
        name: (p.requires_grad, None if p.grad is None else p.grad.detach().clone())
        for name, p in module.named_parameters()
    }


def _check_grads_unchanged(module: nn.Module, snapshot: dict[str, tuple[bool, torch.Tensor | None]]) -> None:
    """Raise ``AssertionError`` naming the first parameter whose ``requires_grad`` or ``.grad`` changed."""
    now = _grad_snapshot(module)
    if now.keys() != snapshot.keys():
        raise AssertionError("The parameters of the module changed.")
    for name, (requires_grad, grad) in snapshot.items():
        new_requires_grad, new_grad = now[name]
        if new_requires_grad != requires_grad:
            raise AssertionError(f"`{name}.requires_grad` changed from {requires_grad} to {new_requires_grad}.")
        if (grad is None) != (new_grad is None) or (grad is not None and not torch.equal(grad, new_grad)):
            raise AssertionError(f"`{name}.grad` changed.")
