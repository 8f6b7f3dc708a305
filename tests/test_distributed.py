"""Two CPU processes (gloo, spawned): the distributed pieces equal the single-process run on the same global batch.

Each worker saves what it computed to ``tmp_path``; the assertions run here, in the parent, against the
single-process computation on the whole batch.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from dcss_plugin import CenteringLoss, ClusterCenters, PairwiseSimilarityLoss, balance_penalty
from dcss_plugin.distributed import gather, is_distributed, launch, rank, shard_bounds, world_size

WORLD = 2
B, K, D = 11, 4, 6  # an odd global batch: shards of 6 and 5 rows


def _global_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, D, generator=g, dtype=torch.float64), torch.randn(B, K, generator=g, dtype=torch.float64)


class _SoftmaxHead(nn.Module):
    """A BatchNorm-free head (BatchNorm statistics are per rank under DDP on CPU, so they would differ)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.linear = nn.Linear(D, K).double()

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.linear(u), dim=1)


def _pair_terms(head: nn.Module, u: torch.Tensor, p: torch.Tensor, ids: torch.Tensor, reduction: str,
                gathered: bool) -> torch.Tensor:
    q = head(u)
    criterion = PairwiseSimilarityLoss(0.6, 0.3, reduction=reduction, exclude_self=True, gather_distributed=gathered)
    loss = criterion(q, target=p) + criterion(q) + criterion(q, sample_ids=ids)
    return loss + balance_penalty(gather(q) if gathered else q)


def _loss_worker(out_dir: str, reduction: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    u, logits = _global_batch()
    p = torch.softmax(logits, 1)
    ids = torch.arange(B) % 5  # rows 0, 5, 10 share an id, and so on, across the two shards
    lo, hi = shard_bounds(B, world_size(), rank())
    head = DistributedDataParallel(_SoftmaxHead())
    loss = _pair_terms(head, u[lo:hi], p[lo:hi], ids[lo:hi], reduction, gathered=True)
    loss.backward()
    torch.save({"loss": loss.detach(), "grad": [q.grad for q in head.parameters()], "rank": rank(),
                "world": world_size(), "distributed": is_distributed()},
               os.path.join(out_dir, f"loss-{reduction}-{rank()}.pt"))


REDUCTIONS = ("mean", "balanced", "sum")


def _module_worker(out_dir: str) -> None:
    for reduction in REDUCTIONS:
        _loss_worker(out_dir, reduction)
    _gather_worker(out_dir)
    _centers_worker(out_dir)


def _launch(worker, out_dir: str) -> None:
    """Two gloo ranks running ``worker(out_dir)``; relaunched once if a rank dies of SIGABRT before any Python
    error: gloo's TCP transport has aborted a process on a connection race ("terminate called without an active
    exception", seen once in a CI run while the machine was loaded). A Python exception in a rank, or a second
    abort, fails the test."""
    try:
        launch(worker, WORLD, args=(out_dir,), threads_per_process=1)
    except torch.multiprocessing.ProcessExitedException as exc:
        if exc.signal_name != "SIGABRT":
            raise
        launch(worker, WORLD, args=(out_dir,), threads_per_process=1)


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    """One 2-process launch (spawning costs ~15 s) for all the module-level checks; the folder of their outputs."""
    out = tmp_path_factory.mktemp("two-ranks")
    _launch(_module_worker, str(out))
    return out


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gathered_pairwise_loss_and_gradients_equal_single_process(two_rank_results, reduction):
    tmp_path = two_rank_results
    u, logits = _global_batch()
    head = _SoftmaxHead()
    ref = _pair_terms(head, u, torch.softmax(logits, 1), torch.arange(B) % 5, reduction, gathered=False)
    ref.backward()
    for r in range(WORLD):
        got = torch.load(tmp_path / f"loss-{reduction}-{r}.pt", weights_only=True)
        assert got["distributed"] and got["world"] == WORLD and got["rank"] == r
        torch.testing.assert_close(got["loss"], ref.detach(), rtol=1e-10, atol=1e-12)
        for g, p in zip(got["grad"], head.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-9, atol=1e-12)


def _gather_worker(out_dir: str) -> None:
    r = rank()
    x = (torch.arange(3 + r, dtype=torch.float64) + 10 * r).requires_grad_()  # ranks hold 3 and 4 rows
    g = gather(x)
    (g.pow(2) * torch.arange(len(g), dtype=torch.float64)).sum().backward()
    torch.save({"gathered": g.detach(), "grad": x.grad}, os.path.join(out_dir, f"gather-{r}.pt"))


def test_gather_concatenates_unequal_shards_and_sums_gradients(two_rank_results):
    tmp_path = two_rank_results
    full = torch.cat([torch.arange(3.0, dtype=torch.float64), torch.arange(4.0, dtype=torch.float64) + 10])
    weight = torch.arange(7, dtype=torch.float64)
    for r, (lo, hi) in enumerate([(0, 3), (3, 7)]):
        got = torch.load(tmp_path / f"gather-{r}.pt", weights_only=True)
        torch.testing.assert_close(got["gathered"], full)
        # every rank computed the same loss, so each shard receives WORLD times its share of the gradient
        torch.testing.assert_close(got["grad"], WORLD * 2 * weight[lo:hi] * full[lo:hi])
    assert gather(full) is full  # no process group: the identity


def _centers_worker(out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    u, _ = _global_batch()
    lo, hi = shard_bounds(B, world_size(), rank())
    centers = ClusterCenters(K, D, m=1.3).double()
    # k-means: rank 0 computes from its u, the others receive it (rank 1 passes different data on purpose)
    centers.init_kmeans(u if rank() == 0 else u.flip(0) * 3, seed=0)
    init = centers.centers.clone()
    centers.accumulate(u[lo:hi])
    centers.update()
    # Phase-1 loss: local mean times the shard share, averaged by DDP, is the global mean
    torch.manual_seed(2)
    enc = DistributedDataParallel(nn.Linear(D, D).double())
    z = enc(u[lo:hi])
    share = world_size() * (hi - lo) / B
    loss = CenteringLoss(m=1.3, lam=0.1)(u[lo:hi], z, z, centers.centers, centers(z.detach())) * share
    loss.backward()
    torch.save({"init": init, "updated": centers.centers.clone(), "grad": [p.grad for p in enc.parameters()]},
               os.path.join(out_dir, f"centers-{rank()}.pt"))


def test_centers_and_centering_loss_equal_single_process(two_rank_results):
    tmp_path = two_rank_results
    u, _ = _global_batch()
    centers = ClusterCenters(K, D, m=1.3).double()
    centers.init_kmeans(u, seed=0)
    init = centers.centers.clone()
    centers.accumulate(u)
    centers.update()
    torch.manual_seed(2)
    enc = nn.Linear(D, D).double()
    z = enc(u)
    CenteringLoss(m=1.3, lam=0.1)(u, z, z, centers.centers, centers(z.detach())).backward()
    for r in range(WORLD):
        got = torch.load(tmp_path / f"centers-{r}.pt", weights_only=True)
        torch.testing.assert_close(got["init"], init)
        torch.testing.assert_close(got["updated"], centers.centers, rtol=1e-10, atol=1e-12)
        for g, p in zip(got["grad"], enc.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-9, atol=1e-12)


def _plain_networks():
    """BatchNorm-free MLP encoder and decoder, so that a DDP run can be compared with a single-process run exactly."""
    torch.manual_seed(3)
    return (nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3)),
            nn.Sequential(nn.Linear(3, 32), nn.ReLU(), nn.Linear(32, 16)))


def _blobs():
    g = torch.Generator().manual_seed(4)
    means = torch.randn(3, 16, generator=g) * 4
    y = torch.arange(90) % 3
    return means[y] + torch.randn(90, 16, generator=g), y


def _fit_tiny(x: torch.Tensor):
    from dcss_plugin import DCSS

    enc, dec = _plain_networks()
    model = DCSS(3, seed=0, verbose=False, device="cpu", latent_dim=3, batch_size=32, pretrain_epochs=3,
                 phase1_epochs=4, phase2_epochs=0, neighbors=0, encoder=enc, decoder=dec)
    return model.fit(x)


def _estimator_worker(out_dir: str) -> None:
    x, _ = _blobs()
    model = _fit_tiny(x)
    h = model.history_
    torch.save({"centers": model.model_.centers.centers.clone(), "pretrain": torch.tensor(h["loss"]["pretrain"]),
                "phase1": torch.tensor(h["loss"]["phase1"]), "world": h["world_size"]},
               os.path.join(out_dir, f"fit-{rank()}.pt"))


def test_estimator_pretraining_and_phase1_equal_single_process(tmp_path, torch_float32_one_thread):
    """Batches of 32 cut 16/16 over two ranks: gathered NT-Xent, shard-weighted reconstruction and centering losses,
    k-means broadcast and all-reduced center updates give the single-process losses and centers (float32)."""
    _launch(_estimator_worker, str(tmp_path))
    x, _ = _blobs()
    ref = _fit_tiny(x)
    for r in range(WORLD):
        got = torch.load(tmp_path / f"fit-{r}.pt", weights_only=True)
        assert got["world"] == WORLD
        torch.testing.assert_close(got["pretrain"], torch.tensor(ref.history_["loss"]["pretrain"]), rtol=1e-4,
                                   atol=1e-5)
        torch.testing.assert_close(got["phase1"], torch.tensor(ref.history_["loss"]["phase1"]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got["centers"], ref.model_.centers.centers, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_cli_fit_devices_2_writes_the_same_artefacts(tmp_path):
    """``dcss fit --devices 2`` (two gloo processes) finishes and writes what a one-process run writes."""
    args = ["fit", "--dataset", "digits", "--clusters", "10", "--pretrain-epochs", "2", "--phase1-epochs", "4",
            "--phase2-epochs", "11", "--quiet", "--no-html"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for devices in (1, 2):
        out = tmp_path / f"d{devices}"
        res = subprocess.run([sys.executable, "-m", "dcss_plugin.app.cli", *args, "--out", str(out), "--devices",
                              str(devices)], capture_output=True, text=True, env=env, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[devices] = out
    one, two = runs[1], runs[2]
    assert sorted(os.listdir(one)) == sorted(os.listdir(two))
    assert not (two / "progress.pt").exists()
    la, lb = np.load(one / "labels.npy"), np.load(two / "labels.npy")
    assert la.shape == lb.shape == (1797,) and la.dtype == lb.dtype == np.int64
    import json

    rep = json.loads((two / "report.json").read_text())
    assert rep["processes"] == 2 and rep["metrics"]["acc"] > 0.5
    assert json.loads((one / "report.json").read_text())["processes"] == 1
    from sklearn.datasets import load_digits

    from dcss_plugin import DCSS

    np.testing.assert_array_equal(DCSS.load(two / "checkpoint.pt").predict(load_digits().images), lb)
