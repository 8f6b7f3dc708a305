"""How many CPU threads a fit uses: one for small work, every core this process may run on for large work.

On a CPU, torch splits each operation across its intra-op threads, which wait for each other at the end of every
operation. When another process holds one of the cores, the thread that shares that core runs only in the slices
the scheduler leaves it, and every small operation waits for it: measured on a 2-core machine with one other busy
process, a digits fit with two threads took 24 times as long as with one. Operations large enough to amortise that
wait still lose to one thread under load, but win on an idle machine. So the count is chosen from the work: the
forward FLOPs of one training step (counted once, on the real model and batch size). Below
:data:`SMALL_STEP_FLOPS` a fit uses one thread; above it, every available core. The ``dcss`` command also sets
``OMP_WAIT_POLICY=PASSIVE`` (unless set) before torch loads, so that waiting threads sleep instead of spinning:
a large fit on a shared 2-core machine then runs at one thread's speed instead of a third of it.

The choice is a function of the model, the batch size and the cores, never of timings, so runs stay reproducible
(results differ in the last bits between thread counts). Pass ``threads=N`` to :class:`~dcss_plugin.DCSS` (or
``dcss fit --threads N``) to fix it.

Example:
    >>> n = choose_threads(AutoencoderForward(enc, dec), xn[:256])
    >>> with intra_op_threads(n):
    ...     train()
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

__all__ = ["SMALL_STEP_FLOPS", "available_cores", "step_flops", "choose_threads", "intra_op_threads"]

# Forward FLOPs per step below which one thread is faster than two on a loaded machine and within ~25 % on an idle
# one (measured: docs/decisions.md, "Threads").
SMALL_STEP_FLOPS = 6e8


def available_cores() -> int:
    """The number of cores this process may run on (its CPU affinity, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@torch.no_grad()
def step_flops(module: nn.Module, batch: Tensor) -> float:
    """Forward FLOPs of ``module(batch)`` (matrix products and convolutions), counted by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = module.training
    module.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            module(batch)
    finally:
        module.train(was_training)
    return float(counter.get_total_flops())


def choose_threads(module: nn.Module, batch: Tensor, world_size: int = 1, cores: Optional[int] = None) -> int:
    """1 when one training step of ``module`` on ``batch`` (B, ...) is small (< :data:`SMALL_STEP_FLOPS` forward
    FLOPs), else the available cores shared among ``world_size`` processes on this machine."""
    cores = available_cores() if cores is None else int(cores)
    if step_flops(module, batch) < SMALL_STEP_FLOPS:
        return 1
    return max(1, cores // max(1, world_size))


@contextlib.contextmanager
def intra_op_threads(n: Optional[int]) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads (``None``: leave torch's setting), then restore the old count."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)
