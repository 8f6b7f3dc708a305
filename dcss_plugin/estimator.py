"""DCSS: the end-to-end method (pretrain -> k-means init -> Phase 1 -> Phase 2) as a scikit-learn estimator.

The estimator is a thin client of :class:`~dcss_plugin.DCSSModel`, :mod:`dcss_plugin.losses` and
:mod:`dcss_plugin.training`, exactly as a user's own loop would be. Labels are never read by :meth:`DCSS.fit`.
"""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import fields
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClusterMixin
from torch import Tensor, nn

from .config import DCSSConfig
from .data import DataError, as_tensor, data_fingerprint, validate_features
from .distributed import broadcast_buffers, rank, resolve_device, world_size
from .losses import CenteringLoss, DCSSLoss, PretrainLoss
from .model import DCSSModel, Normalize
from .nets import conv_autoencoder, default_augmentation, mlp_autoencoder
from .training import (AutoencoderForward, Batches, HeadSelector, NeighborPositives, Phase2Forward, Schedule,
                       init_centers, mine_neighbors, phase1_epoch, phase2_epoch, phase_optimizer, pretrain_epoch)
from .training.passes import encode_all
from .training.run import TrainingRun
from .training.threads import choose_threads, intra_op_threads

__all__ = ["DCSS"]

_OPTIONS = tuple(f for f in fields(DCSSConfig) if f.name not in ("n_clusters", "preset"))
_OPTION_NAMES = tuple(f.name for f in _OPTIONS)


def _distribute(module: nn.Module, dev: torch.device) -> nn.Module:
    """``module`` wrapped in DistributedDataParallel when a process group runs (gradients averaged over ranks)."""
    if world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda" else None,
                                   find_unused_parameters=True)


class DCSS(ClusterMixin, BaseEstimator):
    """Deep Clustering with Self-Supervision using Pairwise Similarities (Sadeghi & Armanfard).

    Args:
        n_clusters: K.
        preset: ``"default"`` (the robust recipe) or ``"paper"`` (the published one); see ``docs/decisions.md``.
        encoder: your own ``nn.Module`` mapping a normalised batch to ``u`` (B, latent_dim); None: the reference
            conv net for images, MLP for vectors.
        decoder: with ``encoder``, the module ``u -> x_hat`` (same shape as the input).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        verbose: show progress bars.
        threads: CPU threads while fitting; None chooses from the work (one for small steps, all cores for large
            ones: :mod:`dcss_plugin.training.threads`). Ignored on CUDA.
        **options: any :class:`~dcss_plugin.config.DCSSConfig` option (``m``, ``lam``, ``zeta``, ``gamma``, ``T1``,
            ``T2``, epochs per phase, ``batch_size``, ``lr``, ``seed``, ...): each is a parameter of its own
            (``get_params``/``set_params``/``clone`` see them); None takes the preset's value.

    Attributes (after ``fit``):
        model_: the trained :class:`~dcss_plugin.DCSSModel` (one head).
        labels_: (N,) int64 clusters of the training data, in input order.
        config_: the resolved :class:`~dcss_plugin.config.DCSSConfig`.
        input_shape_: shape of one sample.
        history_: per-phase timings, losses and label-free diagnostics.

    Example:
        >>> from sklearn.datasets import load_digits
        >>> x = load_digits().images                    # (1797, 8, 8)
        >>> est = DCSS(n_clusters=10, seed=0).fit(x)
        >>> est.labels_[:5], est.predict_proba(x[:5]).shape
    """

    def __init__(self, n_clusters: int = 10, preset: str = "default", *, encoder: Optional[nn.Module] = None,
                 decoder: Optional[nn.Module] = None, device: str = "auto", verbose: bool = True,
                 threads: Optional[int] = None, **options: Any) -> None:
        unknown = sorted(set(options) - set(_OPTION_NAMES))
        if unknown:
            raise TypeError(f"DCSS got unknown option(s) {unknown}; the options are: {', '.join(_OPTION_NAMES)}.")
        self.n_clusters = n_clusters
        self.preset = preset
        self.encoder = encoder
        self.decoder = decoder
        self.device = device
        self.verbose = verbose
        self.threads = threads
        for f in _OPTIONS:
            setattr(self, f.name, options.get(f.name, DCSSConfig.__dataclass_fields__[f.name].default))

    # ------------------------------------------------------------------ parameters and input
    def _config(self) -> DCSSConfig:
        """The parameters as a validated config (TypeError / ValueError before any work)."""
        if self.encoder is not None and not isinstance(self.encoder, nn.Module):
            raise TypeError(f"encoder must be an nn.Module mapping x to u, got {type(self.encoder).__name__}.")
        if self.encoder is not None and not isinstance(self.decoder, nn.Module):
            raise TypeError("With your own encoder, pass decoder= too: an nn.Module mapping u back to x (pretraining "
                            "and Phase 1 reconstruct the input).")
        if not isinstance(self.verbose, (bool, np.bool_)):
            raise TypeError(f"verbose must be True or False, got {self.verbose!r}.")
        return DCSSConfig(n_clusters=self.n_clusters, preset=self.preset,
                          **{name: getattr(self, name) for name in _OPTION_NAMES})

    def _samples(self, data: Any) -> Tensor:
        x, _ = as_tensor(data)
        return x.unsqueeze(1) if x.dim() == 3 else x  # grayscale images (N, H, W)

    def _check_fitted(self) -> DCSSModel:
        model = getattr(self, "model_", None)
        if model is None:
            raise RuntimeError("This DCSS model is not fitted yet; call fit() or DCSS.load() first.")
        return model

    def _prepare(self, data: Any) -> Tensor:
        self._check_fitted()
        x = self._samples(data)
        if tuple(x.shape[1:]) != tuple(self.input_shape_):
            raise DataError(f"Expected samples of shape {tuple(self.input_shape_)} (as in training), "
                            f"got {tuple(x.shape[1:])}.")
        if not torch.isfinite(x).all():
            raise DataError("Input contains NaN or inf; drop or impute those rows first.")
        return x

    # ------------------------------------------------------------------ the recipe
    def fit(self, X: Any, y: Any = None, callback: Optional[Callable[[str, int, Dict[str, float]], None]] = None,
            checkpoint_path: Optional[str | os.PathLike] = None, resume: bool = False,
            checkpoint_every_s: float = 10.0) -> "DCSS":
        """Run pretraining, k-means initialisation, Phase 1 and Phase 2 on ``X``. ``y`` is ignored.

        Args:
            X: (N, F) vectors, (N, H, W) or (N, C, H, W) images, as an array, tensor, Dataset or DataLoader.
            y: ignored (scikit-learn compatibility); labels never steer training.
            callback: ``callback(phase, epoch, stats)`` after every epoch (for logging).
            checkpoint_path: where the full training state is written (atomically): after the first epoch, at the
                start of Phase 1 and Phase 2, and after any epoch ending ``checkpoint_every_s`` after the last save.
            resume: continue from ``checkpoint_path``; ends with the same result as an uninterrupted run (on CPU,
                same seed). The file must come from the same settings, version and data.

        Several processes: call ``fit`` on every rank of a running ``torch.distributed`` group (``torchrun``, or
        ``dcss fit --devices N``) with the same ``X``; each global batch is cut into one shard per rank, the pair,
        balance and contrastive terms see the whole global batch, and rank 0 reports and writes ``checkpoint_path``.
        """
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise TypeError(f"threads must be None (chosen from the work) or an int >= 1, got {self.threads!r}.")
        cfg = self._config()
        dev = resolve_device(self.device)
        x = self._samples(X)
        validate_features(x, cfg.n_clusters)
        # the large-image recipe is for the reference networks; a user's encoder keeps the small-image values
        cfg = cfg.resolved(images=x.dim() == 4, n_samples=len(x) if self.encoder is None else None)
        schedule = Schedule.for_data(len(x), cfg.batch_size, cfg.T1, cfg.T2, cfg.T2_min_steps,
                                     cfg.pretrain_epochs, cfg.phase1_epochs, cfg.phase2_epochs,
                                     cfg.pretrain_min_epochs)
        run = TrainingRun(cfg.to_dict(), data_fingerprint(x) if checkpoint_path is not None else None,
                          schedule.epochs(), cfg.seed, checkpoint_path, resume, checkpoint_every_s, callback,
                          bool(self.verbose), lead=rank() == 0,
                          history={"device": str(dev), "n_samples": len(x), "world_size": world_size(),
                                   "u_stage_epochs": schedule.u_stage, "min_center_distance": [],
                                   "positive_pair_share": []})
        torch.manual_seed(cfg.seed)
        model = self._build_model(cfg, x)
        xn = model.normalize(x).contiguous()
        model.to(dev)
        augment = default_augmentation(xn[0], xn.flatten(1).std(0) if xn.dim() == 2 else None).to(dev) \
            if cfg.augment else None
        batches = Batches(xn, cfg.batch_size, run.generator, dev, augment, world_size(), rank())
        threads = self._threads(model, batches, cfg)
        run.history["threads"] = threads or torch.get_num_threads()
        run.restore(model)
        with intra_op_threads(threads):
            if run.todo("pretrain"):
                self._pretrain(model, batches, cfg, run)
                self._init_centers(model, batches, cfg, run)
            if run.todo("phase1"):
                self._phase1(model, batches, cfg, run)
            self._phase2(model, batches, cfg, run, schedule.u_stage)
        broadcast_buffers(model)
        self.model_, self.config_, self.input_shape_ = model, cfg, tuple(x.shape[1:])
        self.history_ = run.finish()
        self.labels_ = self.predict(x)
        return self

    def _threads(self, model: DCSSModel, batches: Batches, cfg: DCSSConfig) -> Optional[int]:
        """The intra-op thread count of this fit (None on CUDA: torch's setting stays)."""
        if batches.device.type != "cpu":
            return None
        if self.threads is not None:
            return int(self.threads)
        paired = cfg.contrastive_weight > 0 or cfg.neighbor_embedding_weight > 0
        rows = batches.xn[: cfg.batch_size]
        rows = torch.cat([rows, rows]) if paired else rows
        return choose_threads(AutoencoderForward(model.encoder, model.decoder), rows, world_size())

    def _build_model(self, cfg: DCSSConfig, x: Tensor) -> DCSSModel:
        """The reference autoencoder for the data (or the user's encoder/decoder), centers and heads."""
        shape = tuple(x.shape[1:])
        if self.encoder is not None:
            enc, dec = self.encoder, self.decoder
            spec: Dict[str, Any] = dict(getattr(enc, "model_spec", None)  # an adapter's networks name their kind
                                        or DCSSModel.default_spec(enc, dec))
        elif cfg.autoencoder == "conv":
            if len(shape) != 3:
                raise DataError(f"autoencoder='conv' needs images (N, C, H, W); got samples of shape {shape}.")
            enc, dec = conv_autoencoder(shape, cfg.latent_dim, cfg.conv_channels)
            spec = {"kind": "conv", "image_shape": list(shape), "latent_dim": cfg.latent_dim,
                    "channels": list(cfg.conv_channels)}
        else:
            feats = int(np.prod(shape))
            enc, dec = mlp_autoencoder(feats, cfg.latent_dim, cfg.mlp_hidden_dims)
            spec = {"kind": "mlp", "in_features": feats, "latent_dim": cfg.latent_dim,
                    "hidden_dims": list(cfg.mlp_hidden_dims)}
        spec["input_shape"] = list(shape)
        with torch.random.fork_rng(devices=[]):  # heads are drawn afresh at the start of Phase 2
            return DCSSModel(enc, cfg.n_clusters, cfg.latent_dim, decoder=dec, normalize=Normalize.fit(x), m=cfg.m,
                             num_heads=cfg.num_heads, head_hidden_dims=cfg.head_hidden_dims, spec=spec)

    def _pretrain(self, model: DCSSModel, batches: Batches, cfg: DCSSConfig, run: TrainingRun) -> None:
        """Reconstruction (denoising with augmentation), plus NT-Xent on two views or neighbour embedding."""
        opt = phase_optimizer(model, "pretrain", cfg.lr)
        forward = _distribute(AutoencoderForward(model.encoder, model.decoder), batches.device)
        loss_fn = PretrainLoss(cfg.contrastive_weight if batches.augment is not None else 0.0,
                               cfg.neighbor_embedding_weight, gather_distributed=True)
        knn = mine_neighbors(batches.xn, cfg.neighbor_embedding_k) if cfg.neighbor_embedding_weight > 0 else None
        for epoch in range(run.begin_phase("pretrain", opt, "pretrain"), run.epochs["pretrain"]):
            t0 = time.perf_counter()
            loss = pretrain_epoch(model, forward, loss_fn, opt, batches, knn)
            run.end_epoch("pretrain", epoch, t0, {"loss": loss}, model, opt)
        run.end_phase("pretrain")

    def _init_centers(self, model: DCSSModel, batches: Batches, cfg: DCSSConfig, run: TrainingRun) -> None:
        """k-means on ``u`` (or on its directions after NT-Xent pretraining) gives the initial centers."""
        t0 = time.perf_counter()
        u = init_centers(model, batches.xn, seed=cfg.seed, metric=cfg.kmeans_init)
        run.history["labels_after_pretrain"] = model.centers(u).argmax(1).cpu().numpy()
        run.history["time_s"]["kmeans_init"] = time.perf_counter() - t0
        run.phase, run.epoch = "phase1", 0
        run.save("phase1", 0, model, None)

    def _phase1(self, model: DCSSModel, batches: Batches, cfg: DCSSConfig, run: TrainingRun) -> None:
        """The K centering losses in one pass; centers re-estimated every T1 epochs; then neighbours on ``u``."""
        opt = phase_optimizer(model, "phase1", cfg.lr, phase1_lr_factor=cfg.phase1_lr_factor)
        forward = _distribute(AutoencoderForward(model.encoder, model.decoder), batches.device)
        loss_fn = CenteringLoss(m=cfg.m, lam=cfg.lam, reduction="mean")
        for epoch in range(run.begin_phase("phase1", opt, "phase 1"), run.epochs["phase1"]):
            t0 = time.perf_counter()
            loss = phase1_epoch(model, forward, loss_fn, opt, batches, update=(epoch + 1) % cfg.T1 == 0)
            gap = torch.pdist(model.centers.centers).min().item()
            run.history["min_center_distance"].append(gap)
            run.end_epoch("phase1", epoch, t0, {"loss": loss, "min_center_distance": gap}, model, opt,
                          min_center_dist=f"{gap:.3f}")
        run.end_phase("phase1")
        u = encode_all(model, batches.xn)
        run.history["labels_after_phase1"] = model.centers(u).argmax(1).cpu().numpy()
        run.knn = mine_neighbors(u, cfg.neighbors) if cfg.neighbors > 0 else None
        run.phase, run.epoch = "phase2", 0
        run.save("phase2", 0, model, None)

    def _phase2(self, model: DCSSModel, batches: Batches, cfg: DCSSConfig, run: TrainingRun, u_stage: int) -> None:
        """MNet heads + encoder on pairs (``p p^T`` targets, then ``q q^T``); the lowest-loss head is kept."""
        if not run.resuming_inside("phase2"):
            model.reset_heads(cfg.num_heads)
        loss_fn = DCSSLoss(cfg.zeta, cfg.gamma, u_stage, cfg.pair_reduction, cfg.exclude_self, cfg.balance_weight,
                           float(cfg.balance_tolerance) if cfg.balance_tolerance != "phase1" else 0.0,
                           gather_distributed=True)
        labels1 = run.history.get("labels_after_phase1")
        if cfg.balance_tolerance == "phase1" and labels1 is not None and len(labels1) > 0:
            loss_fn.set_tolerance_from_labels(torch.as_tensor(np.asarray(labels1)), cfg.n_clusters)
        run.history["balance_tolerance"] = float(loss_fn.balance_tolerance)
        positives = (NeighborPositives(cfg.neighbors, cfg.neighbor_refresh, run.knn) if run.knn is not None
                     else None)
        selector = HeadSelector(cfg.num_heads)
        opt = phase_optimizer(model, "phase2", cfg.lr, encoder_lr_factor=cfg.phase2_encoder_lr_factor)
        forward = _distribute(Phase2Forward(model.encoder, model.heads), batches.device)
        for epoch in range(run.begin_phase("phase2", opt, "phase 2"), run.epochs["phase2"]):
            t0 = time.perf_counter()
            loss_fn.set_epoch(epoch)
            if positives is not None and positives.due(epoch):
                run.knn = positives.mine(encode_all(model, batches.xn))
            stats = phase2_epoch(model, forward, loss_fn, opt, batches, positives, selector)
            run.history["positive_pair_share"].append(stats["positive_pair_share"])
            run.history["head_losses_last_epoch"] = selector.last_epoch
            run.end_epoch("phase2", epoch, t0, stats, model, opt, targets="q" if loss_fn.q_space else "p",
                          pos=f"{stats['positive_pair_share']:.3f}")
        run.end_phase("phase2")
        best = HeadSelector.best_of(run.history.get("head_losses_last_epoch") or []) if run.epochs["phase2"] else 0
        run.history["selected_head"] = best
        if run.knn is not None:
            run.history["knn"] = run.knn.numpy()
        model.select_head(best)
        model.keep_selected_head()

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict_proba(self, X: Any, batch_size: int = 4096) -> np.ndarray:
        """Soft assignments ``q`` (N, K) float32 (eval mode); (0, K) for no rows."""
        model, x = self._check_fitted(), self._prepare(X)
        if len(x) == 0:
            return np.zeros((0, model.n_clusters), dtype=np.float32)
        dev = model.head_index.device
        model.eval()
        out = [model(x[i:i + batch_size].to(dev)).cpu() for i in range(0, len(x), batch_size)]
        return torch.cat(out).numpy().astype(np.float32)

    def predict(self, X: Any) -> np.ndarray:
        """Cluster of each row, ``argmax q`` (N,) int64; an empty (0,) array for no rows."""
        return self.predict_proba(X).argmax(1).astype(np.int64).reshape(-1)

    @torch.no_grad()
    def transform(self, X: Any, batch_size: int = 4096) -> np.ndarray:
        """Latent embeddings ``u`` (N, d) float32; (0, d) for no rows."""
        model, x = self._check_fitted(), self._prepare(X)
        if len(x) == 0:
            return np.zeros((0, model.latent_dim), dtype=np.float32)
        dev = model.head_index.device
        model.eval()  # no collective here: after a DDP fit rank 0 alone may call this
        out = [model.encode(x[i:i + batch_size].to(dev)).cpu() for i in range(0, len(x), batch_size)]
        return torch.cat(out).numpy().astype(np.float32)

    def fit_predict(self, X: Any, y: Any = None, **kwargs: Any) -> np.ndarray:
        return self.fit(X, **kwargs).labels_

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write a checkpoint (tensors and plain config only) atomically to ``path``."""
        model = self._check_fitted()
        model.save(path, extra={"config": self.config_.to_dict(), "input_shape": list(self.input_shape_)})

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu", encoder: Optional[nn.Module] = None,
             decoder: Optional[nn.Module] = None) -> "DCSS":
        """A fitted estimator from :meth:`save` (any checkpoint kind: reference nets, timm, Lightly, custom).

        A model trained with your own ``encoder`` needs an instance of the same architecture passed again; its
        weights are loaded from the file. No code is unpickled (``torch.load(weights_only=True)``).
        """
        from .io import load_checkpoint_any
        from .model import READABLE_FORMATS

        state = load_checkpoint_any(path, READABLE_FORMATS)
        model = DCSSModel.from_checkpoint(state, encoder=encoder, decoder=decoder, source=os.fspath(path))
        if "config" in state:
            cfg = DCSSConfig.from_dict(dict(state["config"]))
        else:  # a model saved by a user's loop: the settings it records
            cfg = DCSSConfig(n_clusters=model.n_clusters, latent_dim=model.latent_dim, m=model.centers.m)
        est = cls(n_clusters=cfg.n_clusters, preset=cfg.preset, encoder=encoder, decoder=decoder, device=device,
                  verbose=False, **{k: v for k, v in cfg.to_dict().items() if k not in ("n_clusters", "preset")})
        shape = state.get("input_shape") or model.spec.get("input_shape")
        if shape is None:
            raise ValueError(f"{os.fspath(path)!r} does not record the input shape; save it with DCSS.save or put "
                             "'input_shape' into the model's spec.")
        est.model_, est.config_ = model.to(resolve_device(device)).eval(), cfg
        est.input_shape_ = tuple(int(s) for s in shape)
        est.history_ = {}
        return est


def _signature() -> inspect.Signature:
    """``DCSS.__init__``'s signature with every config option as a keyword (what ``get_params`` reads)."""
    base = inspect.signature(DCSS.__init__)
    params = [p for p in base.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default) for f in _OPTIONS]
    return base.replace(parameters=params)


DCSS.__init__.__signature__ = _signature()  # type: ignore[attr-defined]
