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
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from torch import Tensor, nn

from . import __version__
from .augment import default_augmentation
from .autoencoders import ConvAutoencoder, MLPAutoencoder
from .centers import ClusterCenters
from .config import DCSSConfig
from .data import DataError, InputNormalizer, as_tensor, validate_features
from .functional import view_contrastive_loss
from .heads import DCSSHead
from .io import atomic_torch_save, load_checkpoint
from .losses import CenteringLoss, PairwiseSimilarityLoss

__all__ = ["DCSS", "balance_penalty", "known_positive_loss"]

log = logging.getLogger("dcss_plugin")

CHECKPOINT_FORMAT = "dcss-plugin/checkpoint-v1"


def balance_penalty(q: Tensor) -> Tensor:
    """``KL(mean q || uniform) = sum_k qbar_k log qbar_k + log K`` (>= 0, 0 iff clusters are used evenly)."""
    qbar = q.mean(0).clamp_min(1e-12)
    return (qbar * qbar.log()).sum() + math.log(q.shape[1])


def known_positive_loss(q_a: Tensor, q_b: Tensor, kind: str = "log") -> Tensor:
    """Pull term on pairs known to be similar (row i of ``q_a`` with row i of ``q_b``), both (B, K).

    ``"linear"``: mean ``1 - q_a_i . q_b_i`` (the paper's pull term); ``"log"``: mean ``-log(q_a_i . q_b_i)``, whose
    gradient does not vanish when the two assignments disagree completely.
    """
    dot = (q_a * q_b).sum(1)
    if kind == "log":
        return -dot.clamp_min(1e-8).log().mean()
    return (1.0 - dot).mean()


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but CUDA is not available here; use device='cpu' or 'auto'.")
    return dev


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
                 **kwargs: Any) -> None:
        self.config = DCSSConfig(n_clusters=n_clusters, preset=preset, **kwargs)
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
        self._ae_spec = {"kind": "mlp", "in_features": feats, "latent_dim": cfg.latent_dim,
                         "hidden_dims": list(cfg.mlp_hidden_dims)}
        return MLPAutoencoder(feats, latent_dim=cfg.latent_dim, hidden_dims=cfg.mlp_hidden_dims)

    @staticmethod
    def _autoencoder_from_spec(spec: Dict[str, Any]) -> nn.Module:
        if spec["kind"] == "conv":
            return ConvAutoencoder(tuple(spec["image_shape"]), latent_dim=int(spec["latent_dim"]),
                                   channels=tuple(spec["channels"]))
        return MLPAutoencoder(int(spec["in_features"]), latent_dim=int(spec["latent_dim"]),
                              hidden_dims=tuple(spec["hidden_dims"]))

    # ------------------------------------------------------------------ helpers
    def _batches(self, n: int, gen: torch.Generator) -> List[Tensor]:
        perm = torch.randperm(n, generator=gen)
        bs = self.config.batch_size
        out = [perm[i:i + bs] for i in range(0, n, bs)]
        if len(out) > 1 and len(out[-1]) < 2:  # BatchNorm needs two samples
            out[-2] = torch.cat([out[-2], out[-1]])
            out.pop()
        return out

    @torch.no_grad()
    def _encode_all(self, xn: Tensor, dev: torch.device, chunk: int = 4096) -> Tensor:
        assert self.autoencoder is not None
        self.autoencoder.eval()
        return torch.cat([self.autoencoder.encode(xn[i:i + chunk].to(dev)) for i in range(0, len(xn), chunk)])

    def _progress(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(range(total), desc=desc, disable=not self.verbose, leave=False, dynamic_ncols=True)

    # ------------------------------------------------------------------ fit
    def fit(self, X: Any, y: Any = None, callback: Optional[Callable[[str, int, Dict[str, float]], None]] = None
            ) -> "DCSS":
        """Run pretraining, k-means initialisation, Phase 1 and Phase 2 on ``X``. ``y`` is ignored.

        ``callback(phase, epoch, stats)``, when given, is called after every epoch (for logging).
        """
        cfg = self.config.resolved()
        x = self._prepare(X, fitting=True)
        if len(x) < 2:
            raise DataError("Need at least 2 samples to train.")
        dev = _resolve_device(self.device)
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        self.input_shape = tuple(x.shape[1:])
        self.normalizer = InputNormalizer.fit(x)
        xn = self.normalizer(x).contiguous()
        n = len(xn)
        steps = max(1, math.ceil(n / cfg.batch_size))
        e0 = _epochs(cfg.pretrain_epochs, 2000, steps, 10, 500)
        e1 = _epochs(cfg.phase1_epochs, 400, steps, 2 * cfg.T1, 200)
        e2 = _epochs(cfg.phase2_epochs, 1600, steps, cfg.T2 + 10, 500)
        self.autoencoder = self._build_autoencoder(cfg, self.input_shape).to(dev)
        feature_std = xn.flatten(1).std(0) if xn.dim() == 2 else None
        aug = default_augmentation(xn[0], feature_std).to(dev) if cfg.augment else None
        history: Dict[str, Any] = {"epochs": {"pretrain": e0, "phase1": e1, "phase2": e2}, "loss": {}, "time_s": {},
                                   "time_per_epoch_s": {}, "device": str(dev), "n_samples": n}

        def view(batch: Tensor) -> Tensor:
            return aug(batch, gen) if aug is not None else batch

        # ---- pretraining: (denoising) reconstruction
        t0 = time.perf_counter()
        ae = self.autoencoder
        opt = torch.optim.Adam(ae.parameters(), lr=cfg.lr)
        losses: List[float] = []
        bar = self._progress(e0, "pretrain")
        for epoch in bar:
            ae.train()
            total = 0.0
            for idx in self._batches(n, gen):
                xb = xn[idx].to(dev)
                if cfg.contrastive_weight > 0 and aug is not None:
                    b = len(idx)
                    u = ae.encode(torch.cat([view(xb), view(xb)]))
                    x_hat = ae.decode(u).view(2 * b, *xb.shape[1:])
                    loss = (x_hat - xb.repeat(2, *([1] * (xb.dim() - 1)))).pow(2).flatten(1).sum(1).mean()
                    loss = loss + cfg.contrastive_weight * view_contrastive_loss(u[:b], u[b:])
                else:
                    x_hat = ae.decode(ae.encode(view(xb))).view_as(xb)
                    loss = (x_hat - xb).pow(2).flatten(1).sum(1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            losses.append(total / n)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if callback:
                callback("pretrain", epoch, {"loss": losses[-1]})
        history["loss"]["pretrain"] = losses
        history["time_s"]["pretrain"] = time.perf_counter() - t0
        log.info("pretrain: %d epochs, %.1f s, final loss %.4f", e0, history["time_s"]["pretrain"],
                 losses[-1] if losses else float("nan"))

        # ---- k-means initialisation of the centers
        t0 = time.perf_counter()
        self.centers = ClusterCenters(cfg.n_clusters, cfg.latent_dim, m=cfg.m).to(dev)
        u_all = self._encode_all(xn, dev)
        self.centers.init_kmeans(u_all, seed=cfg.seed)
        history["labels_after_pretrain"] = self.centers(u_all).argmax(1).cpu().numpy()
        history["time_s"]["kmeans_init"] = time.perf_counter() - t0

        # ---- Phase 1: the K cluster-specific losses in one pass; centers re-estimated every T1 epochs
        t0 = time.perf_counter()
        criterion1 = CenteringLoss(m=cfg.m, lam=cfg.lam, reduction="mean")
        opt = torch.optim.Adam(ae.parameters(), lr=cfg.lr * cfg.phase1_lr_factor)
        losses = []
        min_center_dist: List[float] = []
        bar = self._progress(e1, "phase 1")
        for epoch in bar:
            ae.train()
            total = 0.0
            for idx in self._batches(n, gen):
                xb = xn[idx].to(dev)
                u = ae.encode(xb)
                x_hat = ae.decode(u).view_as(xb)
                loss = criterion1(xb, x_hat, u, self.centers.centers, self.centers(u.detach()))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            if (epoch + 1) % cfg.T1 == 0:
                u_all = self._encode_all(xn, dev)
                self.centers.accumulate(u_all)
                self.centers.update()
            losses.append(total / n)
            cd = torch.pdist(self.centers.centers).min().item()
            min_center_dist.append(cd)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", min_center_dist=f"{cd:.3f}")
            if callback:
                callback("phase1", epoch, {"loss": losses[-1], "min_center_distance": cd})
        history["loss"]["phase1"] = losses
        history["min_center_distance"] = min_center_dist
        u_all = self._encode_all(xn, dev)
        history["labels_after_phase1"] = self.centers(u_all).argmax(1).cpu().numpy()
        history["time_s"]["phase1"] = time.perf_counter() - t0
        log.info("phase 1: %d epochs, %.1f s, smallest center distance %.3f", e1, history["time_s"]["phase1"],
                 min_center_dist[-1] if min_center_dist else float("nan"))

        # ---- Phase 2: MNet + encoder on pairs
        t0 = time.perf_counter()
        knn: Optional[Tensor] = None

        def mine_neighbors(u_now: Tensor) -> Tensor:
            from sklearn.neighbors import NearestNeighbors

            k = min(cfg.neighbors, n - 1)
            u_np = u_now.cpu().numpy()
            _, ind = NearestNeighbors(n_neighbors=k + 1).fit(u_np).kneighbors(u_np)
            return torch.as_tensor(ind[:, 1:], dtype=torch.long)

        if cfg.neighbors > 0:
            knn = mine_neighbors(u_all)
            history["knn"] = knn.numpy()
        heads = nn.ModuleList(
            DCSSHead(cfg.latent_dim, cfg.n_clusters, cfg.head_hidden_dims) for _ in range(cfg.num_heads)
        ).to(dev)
        criterion2 = PairwiseSimilarityLoss(cfg.zeta, cfg.gamma, reduction=cfg.pair_reduction,
                                            exclude_self=cfg.exclude_self)
        opt = torch.optim.Adam([{"params": ae.parameters(), "lr": cfg.lr * cfg.phase2_encoder_lr_factor},
                                {"params": heads.parameters(), "lr": cfg.lr}])
        two_views = cfg.augment or knn is not None
        losses, pos_share = [], []
        head_losses = torch.zeros(cfg.num_heads)
        bar = self._progress(e2, "phase 2")
        for epoch in bar:
            ae.train()
            heads.train()
            q_space = epoch >= cfg.T2
            if knn is not None and cfg.neighbor_refresh > 0 and epoch > 0 and epoch % cfg.neighbor_refresh == 0:
                knn = mine_neighbors(self._encode_all(xn, dev))
                ae.train()
                history["knn"] = knn.numpy()
            total, pos_total, pair_total = 0.0, 0.0, 0.0
            head_losses.zero_()
            for idx in self._batches(n, gen):
                xa = xn[idx]
                b = len(idx)
                if two_views:
                    if knn is not None:
                        pick = torch.randint(knn.shape[1], (b,), generator=gen)
                        xb = xn[knn[idx, pick]]
                    else:
                        xb = xa
                    inputs = torch.cat([view(xa.to(dev)), view(xb.to(dev))])
                else:
                    inputs = xa.to(dev)
                u = ae.encode(inputs)
                p = None if q_space else self.centers(u.detach())
                loss = u.new_zeros(())
                for h, head in enumerate(heads):
                    q = head(u)
                    with torch.no_grad():
                        s = q @ q.t() if q_space else p @ p.t()  # type: ignore[union-attr]
                        if h == 0:
                            pos = (s > cfg.zeta).float().mean().item()
                    loss_h = criterion2(q, s)
                    if two_views:  # known positives: two views of a sample, or a sample and a u-space neighbour
                        loss_h = loss_h + known_positive_loss(q[:b], q[b:], cfg.positive_loss)
                    if cfg.balance_weight > 0:
                        loss_h = loss_h + cfg.balance_weight * balance_penalty(q)
                    head_losses[h] += loss_h.item() * b
                    loss = loss + loss_h
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() / cfg.num_heads * b
                pos_total += pos * b
                pair_total += b
            losses.append(total / n)
            pos_share.append(pos_total / pair_total)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", targets="q" if q_space else "p", pos=f"{pos_share[-1]:.3f}")
            if callback:
                callback("phase2", epoch, {"loss": losses[-1], "positive_pair_share": pos_share[-1]})
        # label-free model choice: the head with the lowest Phase-2 loss over the last epoch
        best = int(torch.argmin(head_losses)) if e2 > 0 else 0
        history["head_losses_last_epoch"] = (head_losses / n).tolist()
        history["selected_head"] = best
        self.head = heads[best]
        history["loss"]["phase2"] = losses
        history["positive_pair_share"] = pos_share
        history["time_s"]["phase2"] = time.perf_counter() - t0
        log.info("phase 2: %d epochs, %.1f s, final loss %.4f", e2, history["time_s"]["phase2"],
                 losses[-1] if losses else float("nan"))
        for phase, e in (("pretrain", e0), ("phase1", e1), ("phase2", e2)):
            history["time_per_epoch_s"][phase] = history["time_s"][phase] / max(e, 1)

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
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> "DCSS":
        """Load a checkpoint written by :meth:`save` (``torch.load(weights_only=True)``: no code is unpickled)."""
        state = load_checkpoint(path, CHECKPOINT_FORMAT)
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
            model.autoencoder = cls._autoencoder_from_spec(model._ae_spec)
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
