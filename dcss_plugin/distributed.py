"""Multi-process helpers: rank, world size, and a gather that passes gradients back.

The pairwise loss of Phase 2 compares every pair of the batch. Under DistributedDataParallel each process holds a
shard of the global batch, so the assignments ``q`` (and the targets) of all ranks are gathered first. A plain
``all_gather`` cuts the graph; an all-reduce used as a gather gives each rank a gradient 1/world_size too small.
:func:`gather` uses ``torch.distributed.nn.functional.all_gather``, whose backward sums the gradients of every
rank's rows from all ranks (reduce-scatter on NCCL, all-to-all on gloo) and hands each rank its own share.

When every rank computes the same loss on the gathered tensor, each rank's shard receives ``world_size`` times
its share of the gradient, and DDP's gradient averaging divides it back: the parameters get exactly the gradient of
the single-process loss on the global batch (the tests check this with two gloo processes).

Example:
    >>> q_all = gather(q)          # (B_global, K), rows in rank order; q itself when no process group runs
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["broadcast_buffers", "gather", "init_from_environment", "is_distributed", "launch", "mean_over_ranks", "rank",
           "resolve_device", "shard_bounds", "shard_sizes", "world_size"]


def is_distributed() -> bool:
    """True when a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def shard_sizes(n_local: int, device: torch.device | str = "cpu") -> List[int]:
    """The first-dimension sizes of every rank's shard (one small all-gather)."""
    if not is_distributed():
        return [int(n_local)]
    mine = torch.tensor([int(n_local)], dtype=torch.long, device=device)
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [int(t.item()) for t in out]


def gather(t: Tensor) -> Tensor:
    """Concatenate ``t`` (B_r, ...) of every rank along dim 0, in rank order, keeping gradients.

    Ranks may hold different numbers of rows (the last batch of an epoch): shards are padded to the largest for
    the collective and trimmed afterwards. Without a process group this returns ``t`` itself.

    Args:
        t: (B_r, ...) this rank's rows; the trailing shape and dtype must agree across ranks.

    Returns:
        (sum_r B_r, ...) rows of rank 0, then rank 1, ...; gradients flow back to each rank's own rows.
    """
    if not is_distributed():
        return t
    sizes = shard_sizes(t.shape[0], t.device)  # on t's device: NCCL only moves CUDA tensors
    largest = max(sizes)
    padded = t
    if t.shape[0] < largest:
        padded = torch.cat([t, t.new_zeros((largest - t.shape[0], *t.shape[1:]))])
    padded = padded.contiguous()
    if t.requires_grad:
        from torch.distributed.nn.functional import all_gather

        with warnings.catch_warnings():  # deprecated in favour of a private API; still the public, tested one
            warnings.simplefilter("ignore", FutureWarning)
            parts = list(all_gather(padded))
    else:  # targets, ids: no graph to keep
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy ``module``'s buffers (BatchNorm running statistics, ...) from rank ``src`` to every rank.

    Under DDP each rank updates its BatchNorm statistics on its own shard (``SyncBatchNorm`` needs GPUs); call this
    before evaluating the model on every rank so that all ranks compute the same ``u``.
    """
    if not is_distributed():
        return
    for buf in module.buffers():
        dist.broadcast(buf, src=src)


def mean_over_ranks(value: float) -> float:
    """The mean of a Python number over ranks (for logging losses)."""
    if not is_distributed():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def shard_bounds(n: int, num_shards: int, index: int) -> Tuple[int, int]:
    """``[lo, hi)`` of shard ``index`` when ``n`` rows are cut into ``num_shards`` contiguous, near-equal shards."""
    base, extra = divmod(int(n), int(num_shards))
    lo = index * base + min(index, extra)
    return lo, lo + base + (1 if index < extra else 0)


def _default_backend(nprocs: int) -> str:
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= nprocs else "gloo"


def _run_rank(local_rank: int, fn: Callable[..., Any], nprocs: int, init_file: str, backend: str, threads: int,
              args: Tuple[Any, ...]) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=local_rank, world_size=nprocs)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def launch(fn: Callable[..., Any], nprocs: int, args: Tuple[Any, ...] = (), backend: Optional[str] = None,
           threads_per_process: Optional[int] = None) -> None:
    """Run ``fn(*args)`` on ``nprocs`` local processes joined in one process group (``torch.multiprocessing``).

    ``backend`` defaults to NCCL when there is a GPU per process and gloo otherwise (CPU). Each process gets
    ``threads_per_process`` torch threads (default: the cores divided evenly). ``fn`` must be importable (a
    module-level function). An exception in any process is re-raised here, with its traceback.

    Example:
        >>> launch(train_one_rank, nprocs=2, args=(config,))   # like ``torchrun --nproc-per-node 2``
    """
    import tempfile

    import torch.multiprocessing as mp

    if int(nprocs) < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}.")
    backend = backend or _default_backend(nprocs)
    threads = threads_per_process or max(1, (os.cpu_count() or 1) // int(nprocs))
    with tempfile.TemporaryDirectory(prefix="dcss-pg-") as tmp:
        mp.spawn(_run_rank, args=(fn, int(nprocs), os.path.join(tmp, "rendezvous"), backend, threads, args),
                 nprocs=int(nprocs), join=True)


def init_from_environment() -> bool:
    """Join the process group described by ``torchrun``'s environment (``WORLD_SIZE`` > 1), if not joined yet.

    Returns True when this process now runs in a process group of more than one process.
    """
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group(_default_backend(size), init_method="env://")
    return is_distributed()


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a device; one GPU per rank under
    DDP. Raises ``RuntimeError`` when CUDA is asked for and not available."""
    if str(device) == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}.") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but CUDA is not available here; use device='cpu' or 'auto'.")
    if dev.type == "cuda" and dev.index is None and is_distributed():
        dev = torch.device("cuda", rank() % torch.cuda.device_count())  # one GPU per rank
    return dev
