"""Launcher allocations poisoned: while a launcher runs, torch.empty / empty_like return NaN (floats;
float8_e4m3fn's NaN byte 0x7f too) or -1 (integers), so an output element or an intermediate that a
kernel forgets to write fails the comparison."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def poisoned_allocations():
    empty, empty_like = torch.empty, torch.empty_like

    def poison(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.fill_(float("nan") if tensor.is_floating_point() else -1)

    torch.empty = lambda *a, **kw: poison(empty(*a, **kw))
    torch.empty_like = lambda *a, **kw: poison(empty_like(*a, **kw))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like
