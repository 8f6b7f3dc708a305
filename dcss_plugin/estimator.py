"""DCSS: the end-to-end method (pretrain -> k-means init -> Phase 1 -> Phase 2), scikit-learn style.

The estimator is a client of :mod:`~dcss_plugin.functional`, :class:`~dcss_plugin.centers.ClusterCenters`,
:mod:`~dcss_plugin.losses` and :class:`~dcss_plugin.heads.DCSSHead`, exactly as a user's own training loop
would be. Labels are never read by :meth:`DCSS.fit`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from . import __version__
from .augment import default_augmentation
from .autoencoders import ConvAutoencoder, MLPAutoencoder
from .centers import ClusterCenters
from .config import DCSSConfig
from .data import DataError, InputNormalizer, as_tensor, data_fingerprint, shuffled_batches, validate_features
from .distributed import broadcast_buffers, gather, is_distributed, mean_over_ranks, rank, shard_bounds, world_size
from .functional import (balance_penalty, known_positive_loss, neighbor_embedding_loss, phase1_size_prior,
                         view_contrastive_loss)
from .heads import DCSSHead
from .io import atomic_torch_save, load_checkpoint
from .losses import CenteringLoss, PairwiseSimilarityLoss

__all__ = ["DCSS"]

log = logging.getLogger("dcss_plugin")

CHECKPOINT_FORMAT = "dcss-plugin/checkpoint-v1"
PROGRESS_FORMAT = "dcss-plugin/progress-v1"


def _cpu_state(sd: Dict[str, Tensor]) -> Dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in sd.items()}


def _history_to_state(history: Dict[str, Any]) -> Dict[str, Any]:
    """History with numpy arrays as tensors, so that ``torch.load(weights_only=True)`` reads it back."""
    return {k: (torch.as_tensor(v) if isinstance(v, np.ndarray) else v) for k, v in history.items()}


def _history_from_state(state: Dict[str, Any], fresh: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(fresh)
    for k, v in state.items():
        if k in ("device", "n_samples", "epochs"):
            continue
        out[k] = v.numpy() if isinstance(v, Tensor) else v
    return out


def _load_progress(path: str | os.PathLike, cfg: DCSSConfig, data: Dict[str, Any]) -> Dict[str, Any]:
    """The progress file of an interrupted run, after checking it belongs to this config, version and data."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Nothing to resume: {path!r} does not exist (the run finished, or never started).")
    state = load_checkpoint(path, PROGRESS_FORMAT)
    if state.get("version") != __version__:
        raise ValueError(f"{path!r} was written by dcss-plugin {state.get('version')}, this is {__version__}; "
                         "start a new run (without --resume) or use that version.")
    if state.get("config") != cfg.to_dict():
        theirs = state.get("config") or {}
        diff = sorted(k for k in set(theirs) | set(cfg.to_dict()) if theirs.get(k) != cfg.to_dict().get(k))
        raise ValueError(f"{path!r} is from a run with a different config (differs in: {', '.join(diff)}); resume "
                         "with the same settings, or start a new run in another directory.")
    if state.get("data") != data:
        raise ValueError(f"{path!r} is from a run on different data; resume with the same input.")
    if state.get("phase") not in ("pretrain", "phase1", "phase2"):
        raise ValueError(f"{path!r} has an unknown phase {state.get('phase')!r}.")
    return state


def _param_groups(module: nn.Module, lr: float) -> List[Dict[str, Any]]:
    """Optimizer parameter groups of an autoencoder at base learning rate ``lr``.

    A module with a ``param_groups(lr)`` method (e.g. a timm backbone trained at a lower, layer-wise decayed lr)
    gives its own torch param-group dicts, each with its ``lr``; any other module is one group at ``lr``.
    """
    fn = getattr(module, "param_groups", None)
    if callable(fn):
        return list(fn(lr))
    return [{"params": list(module.parameters()), "lr": lr}]


def _adam(groups: List[Dict[str, Any]], lr: float) -> torch.optim.Adam:
    """Adam over parameter groups, with torch's fused kernel when every parameter is a CPU or CUDA float tensor.

    The fused step is one kernel per step instead of a Python loop over the parameters: 1.1 ms instead of 6.0 ms
    on the digits conv autoencoder with three heads (2 CPU threads); the update is Adam's, equal up to rounding.
    """
    groups = [{**g, "params": list(g["params"])} for g in groups]
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.Adam(groups, lr=lr, fused=True if fused else None)


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but CUDA is not available here; use device='cpu' or 'auto'.")
    if dev.type == "cuda" and dev.index is None and is_distributed():
        dev = torch.device("cuda", rank() % torch.cuda.device_count())  # one GPU per rank
    return dev


class _AutoencoderStep(nn.Module):
    """One training forward of the autoencoder (``u`` and ``x_hat``) as a module, so that DDP can wrap it."""

    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        u = self.autoencoder.encode(x)
        return u, self.autoencoder.decode(u)


class _Phase2Step(nn.Module):
    """One Phase-2 forward (``u`` and every head's ``q``) as a module, so that DDP can wrap it."""

    def __init__(self, autoencoder: nn.Module, heads: nn.ModuleList) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.heads = heads

    def forward(self, x: Tensor) -> Tuple[Tensor, List[Tensor]]:
        u = self.autoencoder.encode(x)
        return u, [head(u) for head in self.heads]


def _distribute(module: nn.Module, dev: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """``module`` wrapped in DistributedDataParallel when a process group runs (gradients averaged over ranks)."""
    if not is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda" else None,
                                   find_unused_parameters=find_unused_parameters)


def _epochs(requested: Optional[int], target_steps: int, steps_per_epoch: int, minimum: int, maximum: int) -> int:
    if requested is not None:
        if requested < 0:
            raise ValueError(f"Epoch counts must be >= 0, got {requested}.")
        return int(requested)
    return int(min(max(math.ceil(target_steps / steps_per_epoch), minimum), maximum))


class DCSS:
    """Deep Clustering with Self-Supervision using Pairwise Similarities (Sadeghi & Armanfard).

    Args:
        n_clusters: K.
        preset: ``"default"`` (robust recipe) or ``"paper"`` (published recipe); see :mod:`dcss_plugin.config`.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        verbose: show progress bars.
        **kwargs: any other :class:`~dcss_plugin.config.DCSSConfig` field (``m``, ``lam``, ``zeta``, ``gamma``,
            ``T1``, ``T2``, epochs per phase, ``batch_size``, ``lr``, ``seed``, ...).

    Attributes (after ``fit``):
        labels_: (N,) int64 predicted clusters of the training data, in input order.
        history_: per-phase timings, losses and label-free diagnostics.

    Example:
        >>> from sklearn.datasets import load_digits
        >>> x = load_digits().images                    # (1797, 8, 8)
        >>> model = DCSS(n_clusters=10, seed=0).fit(x)
        >>> model.labels_[:5], model.predict_proba(x[:5]).shape
    """

    def __init__(self, n_clusters: int = 10, preset: str = "default", device: str = "auto", verbose: bool = True,
                 autoencoder_module: Optional[nn.Module] = None, **kwargs: Any) -> None:
        self.config = DCSSConfig(n_clusters=n_clusters, preset=preset, **kwargs)
        self.autoencoder_module = autoencoder_module
        self.device = device
        self.verbose = verbose
        self.autoencoder: Optional[nn.Module] = None
        self.centers: Optional[ClusterCenters] = None
        self.head: Optional[DCSSHead] = None
        self.normalizer: Optional[InputNormalizer] = None
        self.input_shape: Optional[tuple] = None
        self.labels_: Optional[np.ndarray] = None
        self.history_: Dict[str, Any] = {}
        self._ae_spec: Dict[str, Any] = {}

    # ------------------------------------------------------------------ input handling
    def _prepare(self, data: Any, fitting: bool) -> Tensor:
        x, _ = as_tensor(data)
        if x.dim() == 3:  # grayscale images (N, H, W)
            x = x.unsqueeze(1)
        if fitting:
            validate_features(x, self.config.n_clusters)
        else:
            if self.input_shape is None:
                raise RuntimeError("This DCSS model is not fitted yet; call fit() or DCSS.load() first.")
            if tuple(x.shape[1:]) != tuple(self.input_shape):
                raise DataError(
                    f"Expected samples of shape {tuple(self.input_shape)} (as in training), got {tuple(x.shape[1:])}."
                )
            if not torch.isfinite(x).all():
                raise DataError("Input contains NaN or inf; drop or impute those rows first.")
        return x

    def _build_autoencoder(self, cfg: DCSSConfig, sample_shape: tuple) -> nn.Module:
        if self.autoencoder_module is not None:
            module = self.autoencoder_module
            for attr in ("encode", "decode"):
                if not callable(getattr(module, attr, None)):
                    raise TypeError(f"autoencoder_module must have an `{attr}` method (see dcss_plugin.autoencoders).")
            self._ae_spec = {"kind": "custom", "class": type(module).__qualname__, "latent_dim": cfg.latent_dim}
            return module
        kind = cfg.autoencoder
        if kind == "auto":
            kind = "conv" if (len(sample_shape) == 3 and cfg.preset != "paper") else "mlp"
        if kind == "conv":
            if len(sample_shape) != 3:
                raise DataError(f"autoencoder='conv' needs images (N, C, H, W); got samples of shape {sample_shape}.")
            self._ae_spec = {"kind": "conv", "image_shape": list(sample_shape), "latent_dim": cfg.latent_dim,
                             "channels": list(cfg.conv_channels)}
            return ConvAutoencoder(sample_shape, latent_dim=cfg.latent_dim, channels=cfg.conv_channels)
        feats = int(np.prod(sample_shape))
        linear = bool(cfg.mlp_linear_path)
        self._ae_spec = {"kind": "mlp", "in_features": feats, "latent_dim": cfg.latent_dim,
                         "hidden_dims": list(cfg.mlp_hidden_dims), "linear_path": linear}
        return MLPAutoencoder(feats, latent_dim=cfg.latent_dim, hidden_dims=cfg.mlp_hidden_dims, linear_path=linear)

    @staticmethod
    def _autoencoder_from_spec(spec: Dict[str, Any]) -> nn.Module:
        if spec["kind"] == "conv":
            return ConvAutoencoder(tuple(spec["image_shape"]), latent_dim=int(spec["latent_dim"]),
                                   channels=tuple(spec.get("channels", (32, 64, 128))))
        return MLPAutoencoder(int(spec["in_features"]), latent_dim=int(spec["latent_dim"]),
                              hidden_dims=tuple(spec["hidden_dims"]), linear_path=bool(spec.get("linear_path", False)))

    # ------------------------------------------------------------------ helpers
    @torch.no_grad()
    def _encode_all(self, xn: Tensor, dev: torch.device, chunk: int = 4096) -> Tensor:
        assert self.autoencoder is not None
        self.autoencoder.eval()
        return torch.cat([self.autoencoder.encode(xn[i:i + chunk].to(dev)) for i in range(0, len(xn), chunk)])

    def _progress(self, total: int, desc: str, enabled: bool = True):
        from tqdm.auto import tqdm

        return tqdm(range(total), desc=desc, disable=not (self.verbose and enabled), leave=False,
                    dynamic_ncols=True)

    # ------------------------------------------------------------------ fit
    def fit(self, X: Any, y: Any = None, callback: Optional[Callable[[str, int, Dict[str, float]], None]] = None,
            checkpoint_path: Optional[str | os.PathLike] = None, resume: bool = False,
            checkpoint_every_s: float = 10.0) -> "DCSS":
        """Run pretraining, k-means initialisation, Phase 1 and Phase 2 on ``X``. ``y`` is ignored.

        Args:
            X: (N, F) vectors, (N, H, W) or (N, C, H, W) images, as an array, tensor, Dataset or DataLoader.
            y: ignored (accepted for scikit-learn compatibility); labels never steer training.
            callback: ``callback(phase, epoch, stats)`` after every epoch (for logging).
            checkpoint_path: when given, the full training state (modules, optimizer, centers, phase, epoch,
                RNG states) is written there atomically: after the first epoch, at the start of Phase 1 and
                Phase 2, and after any epoch that ends at least ``checkpoint_every_s`` seconds after the last save.
            checkpoint_every_s: least time between two end-of-epoch saves (0: every epoch). A save costs ~50 ms
                on the digits conv net (fsync included); every epoch would add 8 % to that fit.
            resume: continue from ``checkpoint_path``; the run ends with the same result as an uninterrupted one
                (on CPU, same seed). The file must come from the same config, version and data.

        Several processes: call ``fit`` on every rank of a running ``torch.distributed`` process group (e.g. under
        ``torchrun``, or ``dcss fit --devices N``) with the same ``X``. Every global batch is drawn and augmented
        as in a single-process run and cut into one contiguous shard per rank; the networks are wrapped in
        ``DistributedDataParallel``; ``q``, ``p`` and the views' ``u`` are gathered with gradients so that the
        pairwise, balance and contrastive terms see the whole global batch; center updates all-reduce their
        numerator and denominator; k-means runs on rank 0 and is broadcast. Only rank 0 shows progress, calls
        ``callback`` and writes ``checkpoint_path``. BatchNorm statistics are per rank (CPU has no SyncBatchNorm)
        and are copied from rank 0 before every full pass over the data.
        """
        x = self._prepare(X, fitting=True)
        cfg = self.config.resolved(images=x.dim() == 4)
        if len(x) < 2:
            raise DataError("Need at least 2 samples to train.")
        dev = _resolve_device(self.device)
        n_ranks, my_rank = world_size(), rank()
        lead = my_rank == 0
        resumed: Optional[Dict[str, Any]] = None
        fingerprint = data_fingerprint(x) if checkpoint_path is not None else None  # once, not per epoch
        if not checkpoint_every_s >= 0:
            raise ValueError(f"checkpoint_every_s must be >= 0 seconds, got {checkpoint_every_s}.")
        if resume:
            if checkpoint_path is None:
                raise ValueError("resume=True needs checkpoint_path (the progress file of the interrupted run).")
            resumed = _load_progress(checkpoint_path, cfg, fingerprint)
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        self.input_shape = tuple(x.shape[1:])
        self.normalizer = InputNormalizer.fit(x)
        xn = self.normalizer(x).contiguous()
        n = len(xn)
        steps = max(1, math.ceil(n / cfg.batch_size))
        epochs = {
            "pretrain": _epochs(cfg.pretrain_epochs, 960, steps, 10, 500),
            "phase1": _epochs(cfg.phase1_epochs, 80, steps, 2 * cfg.T1, 200),
            "phase2": _epochs(cfg.phase2_epochs, 1600, steps, cfg.T2 + 10, 500),
        }
        # epochs of u-space targets in Phase 2: T2, or more so that they last at least T2_min_steps steps
        u_stage = max(cfg.T2, min(math.ceil(cfg.T2_min_steps / steps), epochs["phase2"] // 2))
        ae = self._build_autoencoder(cfg, self.input_shape).to(dev)
        if self.autoencoder_module is None and getattr(ae, "linear_path", False) and resumed is None:
            ae.init_linear_path(xn)  # PCA of the normalised input (the data every rank holds in full)
        self.autoencoder = ae
        self.centers = ClusterCenters(cfg.n_clusters, cfg.latent_dim, m=cfg.m).to(dev)
        feature_std = xn.flatten(1).std(0) if xn.dim() == 2 else None
        aug = default_augmentation(xn[0], feature_std).to(dev) if cfg.augment else None
        target_of = getattr(ae, "reconstruction_target", None)
        history: Dict[str, Any] = {"epochs": epochs, "loss": {"pretrain": [], "phase1": [], "phase2": []},
                                   "time_s": {"pretrain": 0.0, "kmeans_init": 0.0, "phase1": 0.0, "phase2": 0.0},
                                   "time_per_epoch_s": {}, "device": str(dev), "n_samples": n,
                                   "world_size": n_ranks, "u_stage_epochs": u_stage,
                                   "min_center_distance": [], "positive_pair_share": []}
        phase_order = ["pretrain", "phase1", "phase2"]
        start_phase, start_epoch = "pretrain", 0
        heads: Optional[nn.ModuleList] = None
        knn: Optional[Tensor] = None
        if resumed is not None:
            start_phase, start_epoch = str(resumed["phase"]), int(resumed["epoch"])
            ae.load_state_dict(resumed["autoencoder"])
            self.centers.load_state_dict(resumed["centers"])
            history = _history_from_state(resumed["history"], history)
            gen.set_state(resumed["generator"])
            torch.set_rng_state(resumed["torch_rng"])
            if resumed.get("knn") is not None:
                knn = resumed["knn"]
            log.info("resuming at %s epoch %d", start_phase, start_epoch)

        def view(batch: Tensor) -> Tensor:
            return aug(batch, gen) if aug is not None else batch

        def target(batch: Tensor) -> Tensor:
            return target_of(batch) if target_of is not None else batch

        def shard(batch: Tensor) -> Tensor:
            """This rank's contiguous share of a global batch (all of it in a single process)."""
            lo, hi = shard_bounds(len(batch), n_ranks, my_rank)
            return batch[lo:hi]

        def encode_all(rows: Tensor) -> Tensor:
            """``u`` of ``rows`` in eval mode, with rank 0's BatchNorm statistics on every rank."""
            broadcast_buffers(ae)
            return self._encode_all(rows, dev)

        last_save = -math.inf  # perf_counter() of the last save

        def save_progress(phase: str, epoch: int, opt: Optional[torch.optim.Optimizer], force: bool = True) -> None:
            nonlocal last_save
            if checkpoint_path is None or not lead:
                return
            if not force and time.perf_counter() - last_save < checkpoint_every_s:
                return
            state = {
                "format": PROGRESS_FORMAT, "version": __version__, "config": cfg.to_dict(),
                "data": fingerprint, "phase": phase, "epoch": epoch,
                "autoencoder": _cpu_state(ae.state_dict()), "centers": _cpu_state(self.centers.state_dict()),
                "heads": _cpu_state(heads.state_dict()) if heads is not None and phase == "phase2" else None,
                "optimizer": opt.state_dict() if opt is not None else None,
                "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                "knn": knn if phase == "phase2" else None, "history": _history_to_state(history),
            }
            atomic_torch_save(state, checkpoint_path)
            last_save = time.perf_counter()

        def mine_neighbors(feats: Tensor, k: Optional[int] = None) -> Tensor:
            """(N, k) indices of each row's k nearest other rows in ``feats`` (N, D), Euclidean."""
            from sklearn.neighbors import NearestNeighbors

            k = min(cfg.neighbors if k is None else k, n - 1)
            f_np = feats.cpu().numpy()
            _, ind = NearestNeighbors(n_neighbors=k + 1).fit(f_np).kneighbors(f_np)
            return torch.as_tensor(ind[:, 1:], dtype=torch.long)

        def end_epoch(phase: str, epoch: int, bar: Any, opt: torch.optim.Optimizer, t0: float,
                      stats: Dict[str, float], **postfix: str) -> None:
            """Record an epoch's loss and time, show it, report it, and save the progress file."""
            stats = {k: mean_over_ranks(v) for k, v in stats.items()}  # the global-batch figures
            history["loss"][phase].append(stats["loss"])
            history["time_s"][phase] += time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.4f}", **postfix)
            if callback and lead:
                callback(phase, epoch, stats)
            save_progress(phase, epoch + 1, opt, force=False)

        def begin_phase(phase: str, opt: torch.optim.Optimizer, label: str) -> Tuple[int, Any]:
            """First epoch to run in ``phase`` (loading the optimizer state when resuming inside it) and its bar."""
            first = 0
            if resumed is not None and phase == start_phase and start_epoch > 0:
                opt.load_state_dict(resumed["optimizer"])
                first = start_epoch
            bar = self._progress(epochs[phase], label, enabled=lead)
            bar.update(first)
            return first, bar

        # ---- pretraining: (denoising) reconstruction, plus agreement of two views' u when augmenting
        if phase_order.index(start_phase) <= 0:
            opt = _adam(_param_groups(ae, cfg.lr), lr=cfg.lr)
            step = _distribute(_AutoencoderStep(ae), dev)
            embed_knn: Optional[Tensor] = None
            if cfg.neighbor_embedding_weight > 0:  # deterministic: found again on resume
                embed_knn = mine_neighbors(xn.flatten(1), cfg.neighbor_embedding_k)
            first, bar = begin_phase("pretrain", opt, "pretrain")
            for epoch in range(first, epochs["pretrain"]):
                t0 = time.perf_counter()
                ae.train()
                total = 0.0
                for idx in shuffled_batches(n, cfg.batch_size, gen):
                    xb = xn[idx].to(dev)
                    share = n_ranks * len(shard(idx)) / len(idx)  # local mean * share, averaged by DDP = global mean
                    if embed_knn is not None:  # neighbour embedding: each row with one input-space neighbour
                        pick = torch.randint(embed_knn.shape[1], (len(idx),), generator=gen)
                        xnb = xn[embed_knn[idx, pick]].to(dev)
                        va, vb = shard(view(xb)), shard(view(xnb))
                        bl = len(va)
                        u, x_hat = step(torch.cat([va, vb]))
                        tb = torch.cat([target(shard(xb)), target(shard(xnb))])
                        x_hat = x_hat.view_as(tb)
                        loss = (x_hat - tb).pow(2).flatten(1).mean(1).mean() * share  # per-feature mean: F-free
                        loss = loss + cfg.neighbor_embedding_weight * neighbor_embedding_loss(gather(u[:bl]),
                                                                                              gather(u[bl:]))
                    elif cfg.contrastive_weight > 0 and aug is not None:
                        va, vb = shard(view(xb)), shard(view(xb))
                        bl = len(va)
                        u, x_hat = step(torch.cat([va, vb]))
                        tb = target(shard(xb))
                        x_hat = x_hat.view(2 * bl, *tb.shape[1:])
                        loss = (x_hat - tb.repeat(2, *([1] * (tb.dim() - 1)))).pow(2).flatten(1).sum(1).mean() * share
                        loss = loss + cfg.contrastive_weight * view_contrastive_loss(gather(u[:bl]), gather(u[bl:]))
                    else:
                        tb = target(shard(xb))
                        x_hat = step(shard(view(xb)))[1].view_as(tb)
                        loss = (x_hat - tb).pow(2).flatten(1).sum(1).mean() * share
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += loss.item() * len(idx)
                end_epoch("pretrain", epoch, bar, opt, t0, {"loss": total / n})
            bar.close()
            log.info("pretrain: %d epochs, %.1f s", epochs["pretrain"], history["time_s"]["pretrain"])

            # ---- k-means initialisation of the centers
            t0 = time.perf_counter()
            u_all = encode_all(xn)
            self.centers.init_kmeans(u_all, seed=cfg.seed, metric=cfg.kmeans_init)  # rank 0 computes, all receive
            history["labels_after_pretrain"] = self.centers(u_all).argmax(1).cpu().numpy()
            history["time_s"]["kmeans_init"] = time.perf_counter() - t0
            start_phase, start_epoch = "phase1", 0
            save_progress("phase1", 0, None)

        # ---- Phase 1: the K cluster-specific losses in one pass; centers re-estimated every T1 epochs
        if phase_order.index(start_phase) <= 1:
            criterion1 = CenteringLoss(m=cfg.m, lam=cfg.lam, reduction="mean")
            opt = _adam(_param_groups(ae, cfg.lr * cfg.phase1_lr_factor), lr=cfg.lr * cfg.phase1_lr_factor)
            step = _distribute(_AutoencoderStep(ae), dev)
            first, bar = begin_phase("phase1", opt, "phase 1")
            for epoch in range(first, epochs["phase1"]):
                t0 = time.perf_counter()
                ae.train()
                total = 0.0
                for idx in shuffled_batches(n, cfg.batch_size, gen):
                    xb = shard(xn[idx]).to(dev)
                    share = n_ranks * len(xb) / len(idx)
                    u, x_hat = step(xb)
                    tb = target(xb)
                    x_hat = x_hat.view_as(tb)
                    loss = criterion1(tb, x_hat, u, self.centers.centers, self.centers(u.detach())) * share
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += loss.item() * len(idx)
                if (epoch + 1) % cfg.T1 == 0:  # each rank adds its shard of the data; update() all-reduces
                    self.centers.accumulate(encode_all(shard(xn)))
                    self.centers.update()
                cd = torch.pdist(self.centers.centers).min().item()
                history["min_center_distance"].append(cd)
                end_epoch("phase1", epoch, bar, opt, t0, {"loss": total / n, "min_center_distance": cd},
                          min_center_dist=f"{cd:.3f}")
            bar.close()
            u_all = encode_all(xn)
            history["labels_after_phase1"] = self.centers(u_all).argmax(1).cpu().numpy()
            if cfg.neighbors > 0:  # known positives for Phase 2
                knn = mine_neighbors(u_all if cfg.neighbor_space == "u" else xn.flatten(1))
            log.info("phase 1: %d epochs, %.1f s", epochs["phase1"], history["time_s"]["phase1"])
            start_phase, start_epoch = "phase2", 0
            save_progress("phase2", 0, None)

        # ---- Phase 2: MNet (several heads; the lowest-loss one is kept) + encoder on pairs
        heads = nn.ModuleList(
            DCSSHead(cfg.latent_dim, cfg.n_clusters, cfg.head_hidden_dims) for _ in range(cfg.num_heads)
        ).to(dev)
        if resumed is not None and resumed.get("heads") is not None and start_phase == "phase2":
            heads.load_state_dict(resumed["heads"])
        # label-free tolerance of the balance guard: the Phase-1 partition's KL to uniform (balance_penalty of its
        # proportions); the "phase1" size prior is taken from the head itself at the switch to q q^T (below)
        labels1 = torch.as_tensor(np.asarray(history.get("labels_after_phase1", np.zeros(0, dtype=np.int64))))
        tolerance = 0.0 if cfg.balance_tolerance == "phase1" else float(cfg.balance_tolerance)
        if labels1.numel() > 0 and cfg.balance_tolerance == "phase1":
            # max(0, .): exactly even Phase-1 sizes give a KL of -1e-9 in floating point
            sizes1 = phase1_size_prior(labels1, cfg.n_clusters, floor=0.0)[None].double()
            tolerance = max(0.0, balance_penalty(sizes1).item())
        history["balance_tolerance"] = tolerance
        size_prior: Optional[Tensor] = None  # (num_heads, K); None: uniform
        if cfg.balance_prior == "phase1" and "balance_prior" in history:  # resumed after the switch to q q^T
            size_prior = torch.as_tensor(np.asarray(history["balance_prior"])).float().to(dev)

        @torch.no_grad()
        def head_size_prior() -> Tensor:
            """Each head's cluster proportions on all of ``X`` (eval mode), at least 0.3/K each: (num_heads, K).

            Taken when the targets switch to ``q q^T``: the head has then learned the Phase-1 memberships, so these
            are the Phase-1 partition's sizes with the head's own cluster indices (a head's cluster k is not center
            k: the pairwise targets do not fix the order)."""
            u_now = encode_all(xn)
            broadcast_buffers(heads)
            heads.eval()
            return torch.stack([phase1_size_prior(head(u_now).argmax(1).cpu(), cfg.n_clusters)
                                for head in heads]).to(dev)

        criterion2 = PairwiseSimilarityLoss(cfg.zeta, cfg.gamma, reduction=cfg.pair_reduction,
                                            exclude_self=cfg.exclude_self)
        opt = _adam([*_param_groups(ae, cfg.lr * cfg.phase2_encoder_lr_factor),
                     {"params": heads.parameters(), "lr": cfg.lr}], lr=cfg.lr)
        step2 = _distribute(_Phase2Step(ae, heads), dev, find_unused_parameters=True)  # decoder idle
        first, bar = begin_phase("phase2", opt, "phase 2")
        two_views = cfg.augment or knn is not None
        for epoch in range(first, epochs["phase2"]):
            t0 = time.perf_counter()
            q_space = epoch >= u_stage
            if cfg.balance_prior == "phase1" and q_space and size_prior is None:
                size_prior = head_size_prior()  # the q-space stage keeps the sizes reached on the u-space targets
                history["balance_prior"] = size_prior.cpu().numpy()
            refresh = cfg.neighbor_space == "u" and cfg.neighbor_refresh > 0  # input-space neighbours never change
            if knn is not None and refresh and epoch > 0 and epoch % cfg.neighbor_refresh == 0:
                knn = mine_neighbors(encode_all(xn))
            ae.train()
            heads.train()
            total, pos_total = 0.0, 0.0
            head_losses = torch.zeros(cfg.num_heads)
            for idx in shuffled_batches(n, cfg.batch_size, gen):
                xa = xn[idx]
                b = len(idx)
                bl = len(shard(idx))
                share = n_ranks * bl / b
                if two_views:
                    if knn is not None:
                        pick = torch.randint(knn.shape[1], (b,), generator=gen)
                        xb = xn[knn[idx, pick]]
                    else:
                        xb = xa
                    inputs = torch.cat([shard(view(xa.to(dev))), shard(view(xb.to(dev)))])
                else:
                    inputs = shard(xa).to(dev)
                u, qs = step2(inputs)
                # pairs span the global batch: gather p and q from all ranks (gradients flow back to each rank)
                p_all = None if q_space else gather(self.centers(u.detach()))
                loss = u.new_zeros(())
                pos = 0.0
                for h, q in enumerate(qs):
                    q_all = gather(q)
                    with torch.no_grad():
                        s = q_all @ q_all.t() if q_space else p_all @ p_all.t()  # type: ignore[union-attr]
                        if h == 0:
                            pos = (s > cfg.zeta).float().mean().item()
                    loss_h = criterion2(q_all, s)
                    if two_views:  # known positives: two views of a sample, or a sample and a u-space neighbour
                        loss_h = loss_h + known_positive_loss(q[:bl], q[bl:], cfg.positive_loss) * share
                    if cfg.balance_weight > 0:
                        prior_h = size_prior[h] if size_prior is not None else None
                        loss_h = loss_h + cfg.balance_weight * balance_penalty(q_all, tolerance, prior_h)
                    head_losses[h] += loss_h.item() * b
                    loss = loss + loss_h
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() / cfg.num_heads * b
                pos_total += pos * b
            history["positive_pair_share"].append(pos_total / n)
            history["head_losses_last_epoch"] = [mean_over_ranks(v) for v in (head_losses / n).tolist()]
            end_epoch("phase2", epoch, bar, opt, t0, {"loss": total / n, "positive_pair_share": pos_total / n},
                      targets="q" if q_space else "p", pos=f"{pos_total / n:.3f}")
        bar.close()
        # label-free model choice: the head with the lowest Phase-2 loss over the last epoch
        last = history.get("head_losses_last_epoch", [0.0] * cfg.num_heads)
        best = int(np.argmin(last)) if epochs["phase2"] > 0 else 0
        history["selected_head"] = best
        if knn is not None:
            history["knn"] = knn.numpy()
        self.head = heads[best]
        log.info("phase 2: %d epochs, %.1f s, head %d of %d kept", epochs["phase2"], history["time_s"]["phase2"],
                 best, cfg.num_heads)
        for phase, e in epochs.items():
            history["time_per_epoch_s"][phase] = history["time_s"][phase] / max(e, 1)

        broadcast_buffers(ae)
        broadcast_buffers(self.head)
        self.config = cfg
        self.history_ = history
        self.labels_ = self.predict(x)
        return self

    # ------------------------------------------------------------------ inference
    def _check_fitted(self) -> None:
        if self.head is None or self.autoencoder is None or self.normalizer is None:
            raise RuntimeError("This DCSS model is not fitted yet; call fit() or DCSS.load() first.")

    @torch.no_grad()
    def predict_proba(self, X: Any, batch_size: int = 4096) -> np.ndarray:
        """Soft assignments ``q`` (N, K) float32 (the head in eval mode)."""
        self._check_fitted()
        assert self.head is not None and self.autoencoder is not None and self.normalizer is not None
        x = self._prepare(X, fitting=False)
        dev = next(self.head.parameters()).device
        self.autoencoder.eval()
        self.head.eval()
        out = [self.head(self.autoencoder.encode(self.normalizer(x[i:i + batch_size].to(dev)))).cpu()
               for i in range(0, len(x), batch_size)]
        return torch.cat(out).numpy().astype(np.float32)

    def predict(self, X: Any) -> np.ndarray:
        """Cluster of each row, ``argmax q`` (N,) int64."""
        return self.predict_proba(X).argmax(1).astype(np.int64)

    @torch.no_grad()
    def transform(self, X: Any, batch_size: int = 4096) -> np.ndarray:
        """Latent embeddings ``u`` (N, d) float32."""
        self._check_fitted()
        assert self.normalizer is not None
        x = self._prepare(X, fitting=False)
        dev = next(self.head.parameters()).device  # type: ignore[union-attr]
        return self._encode_all(self.normalizer(x), dev, batch_size).cpu().numpy().astype(np.float32)

    def fit_predict(self, X: Any, y: Any = None) -> np.ndarray:
        return self.fit(X).labels_  # type: ignore[return-value]

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> Dict[str, Any]:
        self._check_fitted()
        assert self.autoencoder is not None and self.centers is not None and self.head is not None
        assert self.normalizer is not None and self.input_shape is not None
        cpu = lambda sd: {k: v.detach().cpu() for k, v in sd.items()}  # noqa: E731
        return {
            "format": CHECKPOINT_FORMAT,
            "version": __version__,
            "config": self.config.to_dict(),
            "autoencoder_spec": self._ae_spec,
            "input_shape": list(self.input_shape),
            "normalizer": self.normalizer.state_dict(),
            "autoencoder": cpu(self.autoencoder.state_dict()),
            "centers": cpu(self.centers.state_dict()),
            "head": cpu(self.head.state_dict()),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write a checkpoint (tensors and plain config only) atomically to ``path``."""
        atomic_torch_save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu", autoencoder_module: Optional[nn.Module] = None
             ) -> "DCSS":
        """Load a checkpoint written by :meth:`save` (``torch.load(weights_only=True)``: no code is unpickled).

        A model trained with a custom ``autoencoder_module`` needs a module of the same architecture passed
        again; its weights are loaded from the file.
        """
        state = load_checkpoint(path, CHECKPOINT_FORMAT)
        spec = state.get("autoencoder_spec") or {}
        if spec.get("kind") == "custom" and autoencoder_module is None:
            raise ValueError(f"{os.fspath(path)!r} was trained with a custom autoencoder ({spec.get('class')}); pass "
                             "an instance of the same architecture as autoencoder_module=.")
        try:
            cfg = DCSSConfig.from_dict(dict(state["config"]))
            model = cls(device=device, verbose=False, **{k: v for k, v in cfg.to_dict().items()
                                                          if k not in ("n_clusters", "preset")},
                        n_clusters=cfg.n_clusters, preset=cfg.preset)
            model.config = cfg
            model._ae_spec = dict(state["autoencoder_spec"])
            model.input_shape = tuple(int(s) for s in state["input_shape"])
            model.normalizer = InputNormalizer.from_state_dict(state["normalizer"])
            dev = _resolve_device(device)
            model.autoencoder = (autoencoder_module if model._ae_spec.get("kind") == "custom"
                                 else cls._autoencoder_from_spec(model._ae_spec))
            model.autoencoder.load_state_dict(state["autoencoder"])
            model.centers = ClusterCenters(cfg.n_clusters, cfg.latent_dim, m=cfg.m or 1.5)
            model.centers.load_state_dict(state["centers"])
            model.head = DCSSHead(cfg.latent_dim, cfg.n_clusters, cfg.head_hidden_dims)
            model.head.load_state_dict(state["head"])
        except (KeyError, RuntimeError, TypeError, ValueError) as exc:
            raise ValueError(f"{os.fspath(path)!r} is not a usable DCSS checkpoint: {exc}") from exc
        for module in (model.autoencoder, model.centers, model.head):
            module.to(dev).eval()
        return model
