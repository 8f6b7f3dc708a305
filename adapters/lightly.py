"""DCSS inside Lightly self-supervised pipelines: a cluster head and a cluster loss beside the SSL head and loss.

Imported as ``dcss_plugin.adapters.lightly``; Lightly is imported here and nowhere in ``dcss_plugin`` itself.

A Lightly model is ``backbone -> h -> projection head -> z -> SSL loss`` (e.g. SimCLR: ``SimCLRProjectionHead`` and
``NTXentLoss`` on two augmented views). DCSS adds a second branch on the same backbone features ``u = h``::

    u ──SimCLRProjectionHead──▶ z ──NTXentLoss(z0, z1)
      └─DCSSClusterHead──────▶ q ──DCSSClusterLoss(q0, q1[, p0, p1])        labels = argmax q

* :class:`DCSSClusterHead`: the paper's MNet (``u -> q``). It *is* a :class:`dcss_plugin.DCSSHead`, so
  :class:`dcss_plugin.DCSSModel`, ``DCSS.load`` and the ONNX export take it as it is.
* :class:`DCSSClusterLoss`: the default Phase-2 objective :class:`dcss_plugin.DCSSLoss` (the one the estimator
  trains with) in Lightly's two-view calling convention: the two views of an image are its known positive pair.
  ``gather_distributed=True`` forms pairs across all ranks, as Lightly's ``NTXentLoss`` does.
* :class:`BatchSimCLRViews`: SimCLR's augmentations for a whole batch of image tensors at once;
  :func:`simclr_transform` configures Lightly's own per-image ``SimCLRTransform`` for small grayscale images.
* :class:`SimCLRClusterModel` and :func:`simclr_dcss_epoch`: a :class:`dcss_plugin.DCSSModel` with a SimCLR
  projection head beside it, and one epoch of SimCLR (+ DCSS).
* :func:`fit_lightly` / :func:`fit_from_cli_args`: the whole recipe (SimCLR warm-up, k-means on ``u``, then SimCLR +
  DCSS jointly) returning a fitted :class:`dcss_plugin.DCSS`; ``dcss fit --ssl simclr`` uses it.

Example:
    >>> import torch
    >>> from lightly.loss import NTXentLoss
    >>> from lightly.models.modules import SimCLRProjectionHead
    >>> from dcss_plugin.adapters.lightly import DCSSClusterHead, DCSSClusterLoss
    >>> backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32))
    >>> projection, head = SimCLRProjectionHead(32, 64, 32), DCSSClusterHead(32, num_clusters=10)
    >>> ssl_loss, cluster_loss = NTXentLoss(), DCSSClusterLoss()
    >>> u0, u1 = backbone(x0), backbone(x1)                         # two augmented views (B, 1, 8, 8)
    >>> loss = ssl_loss(projection(u0), projection(u1)) + cluster_loss(head(u0), head(u1))
    >>> loss.backward()
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from dcss_plugin.config import DCSSConfig
from dcss_plugin.data import DataError, as_tensor, data_fingerprint, validate_features
from dcss_plugin.distributed import gather, resolve_device
from dcss_plugin.estimator import DCSS
from dcss_plugin.heads import DCSSHead
from dcss_plugin.losses import DCSSLoss
from dcss_plugin.model import DCSSModel, Normalize
from dcss_plugin.nets import ConvEncoder
from dcss_plugin.training import Batches, init_centers
from dcss_plugin.training.optim import adam, param_groups
from dcss_plugin.training.run import TrainingRun

__all__ = [
    "DCSSClusterHead",
    "DCSSClusterLoss",
    "BatchSimCLRViews",
    "simclr_transform",
    "SimCLRClusterModel",
    "simclr_dcss_epoch",
    "fit_lightly",
    "fit_from_cli_args",
    "SSL_METHODS",
]

SSL_METHODS = ("simclr",)
Callback = Callable[[str, int, Dict[str, float]], None]


# ---------------------------------------------------------------------------------------------------- head
class DCSSClusterHead(DCSSHead):
    """Cluster head of DCSS (the paper's MNet) for a Lightly model: backbone features ``u`` -> soft assignments ``q``.

    ``(Linear-BN-ReLU) x len(hidden_dims), Linear, softmax over K``. It sits beside the SSL projection head on the
    same backbone output. It is a :class:`dcss_plugin.DCSSHead` (same layers and ``state_dict`` keys), so a trained
    head loads into a :class:`dcss_plugin.DCSSModel` (``model.head.load_state_dict(head.state_dict())``), which is
    saved, loaded and exported to ONNX.

    Args:
        input_dim: width ``d`` of the backbone features ``u``.
        num_clusters: K, at least 2.
        hidden_dims: widths of the hidden layers (paper: 128, 128).

    Shapes:
        input ``u``: (B, input_dim); output ``q``: (B, num_clusters), each row sums to 1.

    Examples:
        >>> head = DCSSClusterHead(input_dim=512, num_clusters=10)
        >>> q = head(backbone(x).flatten(1))          # (B, 10)
        >>> labels = q.argmax(1)
    """

    def __init__(self, input_dim: int, num_clusters: int, hidden_dims: Sequence[int] = (128, 128)) -> None:
        if int(input_dim) < 1:
            raise ValueError(f"input_dim must be a positive feature width, got {input_dim}.")
        super().__init__(in_dim=input_dim, num_clusters=num_clusters, hidden_dims=hidden_dims)

    @property
    def input_dim(self) -> int:
        return self.in_dim

    def _check(self, u: Tensor) -> None:
        if u.dim() != 2 or u.shape[1] != self.in_dim:
            raise ValueError(
                f"DCSSClusterHead expects backbone features (B, {self.in_dim}), got shape {tuple(u.shape)}. "
                "Flatten pooled features first (u.flatten(1)) or build the head with input_dim=u.shape[1]."
            )

    def forward_logits(self, u: Tensor) -> Tensor:
        """Pre-softmax scores (B, K)."""
        self._check(u)
        return self.net(u)

    def forward(self, u: Tensor) -> Tensor:
        """Soft assignments ``q`` (B, K)."""
        return self.forward_logits(u).softmax(dim=1)


# ---------------------------------------------------------------------------------------------------- loss
def _check_assignments(name: str, q: Tensor) -> None:
    if q.dim() != 2:
        raise ValueError(f"{name} must be soft assignments (B, K), got shape {tuple(q.shape)}.")
    if q.shape[1] < 2:
        raise ValueError(f"{name} has K={q.shape[1]} cluster(s); DCSS needs K >= 2 (build the head with "
                         "num_clusters >= 2).")
    if q.shape[0] < 1:
        raise ValueError(f"{name} is an empty batch.")
    with torch.no_grad():
        if not torch.isfinite(q).all():
            raise ValueError(f"{name} contains NaN or inf; check the inputs and the learning rate (the model "
                             "diverged or the batch holds non-finite values).")
        tol = 1e-3 if q.dtype in (torch.float16, torch.bfloat16) else 1e-4
        if (q < -tol).any() or ((q.sum(1) - 1).abs() > tol * max(1, q.shape[1])).any():
            raise ValueError(f"{name} rows must be probabilities (non-negative, summing to 1); pass the head's "
                             "softmax output q, not logits.")




class DCSSClusterLoss(nn.Module):
    """The DCSS objective for two augmented views, in the calling convention of Lightly's losses.

    A thin wrapper over :class:`dcss_plugin.DCSSLoss`, the default Phase-2 objective the estimator trains with
    (Sadeghi & Armanfard, arXiv 2405.03590): ``loss(q0, q1, p0, p1)`` is ``DCSSLoss(torch.cat([q0, q1]),
    p=torch.cat([p0, p1]), known_positives=True)``, i.e. on the 2B rows ``q = [q0; q1]``::

        L_pair(q, s)  +  mean_i -log(q0_i . q1_i)  +  balance_weight * max(0, KL(mean q || uniform) - tolerance)

    * ``L_pair``: pairs (i != j with ``exclude_self``) with ``s_ij > zeta`` are pulled (``1 - q_i . q_j``), pairs with
      ``s_ij < gamma`` pushed (``q_i . q_j``); ``reduction="balanced"`` averages the pulled and the pushed pairs
      separately. The targets are ``s = p p^T`` when memberships ``p0, p1`` are given (the paper's u-space stage,
      the first T2 epochs, ``p`` from :class:`dcss_plugin.ClusterCenters`) and ``s = (q q^T).detach()`` otherwise
      (the q-space stage).
    * Known positives: row i of ``q0`` and row i of ``q1`` are two views of one image. They are pulled by
      ``-log(q0_i . q1_i)``, whose gradient does not vanish when the views disagree completely; in ``L_pair`` they
      are pairs like any other (their ``s_ij`` is not overridden).
    * The balance guard: under ``q q^T`` targets any hard partition, a single cluster included, has zero pairwise
      loss, and the view pull only ever pulls; the guard makes one cluster costly.

    Args:
        zeta: similar-pair threshold (paper: 0.8).
        gamma: dissimilar-pair threshold (paper: 0.2).
        reduction: ``"balanced"`` (default), ``"mean"`` (paper: over all selected pairs) or ``"sum"``.
        exclude_self: drop the ``i == j`` pairs (their ``q_i . q_i`` says nothing about clusters).
        balance_weight: weight of the guard (0: off; then expect collapse).
        balance_tolerance: nats of divergence from even cluster sizes the guard lets pass.
        gather_distributed: if True and a process group is running, the assignments (and memberships) of all
            ranks are gathered first (with gradients, :func:`dcss_plugin.distributed.gather`), so every rank
            computes the loss of the global batch, the one a single process would compute on it; DDP's gradient
            averaging then gives exactly the single-process gradient.

    Attributes:
        objective: the :class:`dcss_plugin.DCSSLoss` doing the work.

    Shapes:
        ``q0``, ``q1``: (B, K) soft assignments of view 0 and view 1 (row ``i`` of both is the same image);
        ``p0``, ``p1``: optional (B, K) memberships used as targets. Returns a scalar.

    Raises:
        ValueError: mismatched shapes, K < 2, NaN/inf, rows that are not probabilities (logits passed), bad
            hyperparameters.

    Examples:
        >>> loss_fn = DCSSClusterLoss()
        >>> x0, x1 = transform(x), transform(x)                  # two augmented views of the batch
        >>> u0, u1 = backbone(x0), backbone(x1)
        >>> q0, q1 = head(u0), head(u1)                          # (B, K) each
        >>> loss = loss_fn(q0, q1, centers(u0.detach()), centers(u1.detach()))   # u-space targets (first T2 epochs)
        >>> loss = loss_fn(q0, q1)                               # q-space targets afterwards
    """

    def __init__(self, zeta: float = 0.8, gamma: float = 0.2, reduction: str = "balanced", exclude_self: bool = True,
                 balance_weight: float = 5.0, balance_tolerance: float = 0.0, gather_distributed: bool = False) -> None:
        super().__init__()
        if reduction not in ("balanced", "mean", "sum"):
            raise ValueError(f"reduction must be 'balanced', 'mean' or 'sum' (a scalar loss), got {reduction!r}.")
        if gather_distributed and not torch.distributed.is_available():
            raise ValueError("gather_distributed=True needs torch.distributed, which this torch build lacks.")
        # the stage follows from whether p is given (forward's q_space=), not from an epoch count
        self.objective = DCSSLoss(zeta, gamma, u_stage_epochs=0, reduction=reduction, exclude_self=exclude_self,
                                  balance_weight=balance_weight, balance_tolerance=balance_tolerance)
        self.gather_distributed = gather_distributed

    def forward(self, q0: Tensor, q1: Tensor, p0: Optional[Tensor] = None, p1: Optional[Tensor] = None) -> Tensor:
        """Loss of the assignments ``q0``, ``q1`` (B, K) of two views; u-space targets ``p p^T`` if ``p`` is given.

        Returns:
            Scalar loss (the same on every rank under ``gather_distributed``).
        """
        _check_assignments("q0", q0)
        _check_assignments("q1", q1)
        if q0.shape != q1.shape:
            raise ValueError(f"q0 and q1 must have the same shape (B, K): row i of both is one image's two views; "
                             f"got {tuple(q0.shape)} and {tuple(q1.shape)}.")
        if (p0 is None) != (p1 is None):
            raise ValueError("Give memberships for both views (p0 and p1) or for neither.")
        p = None
        if p0 is not None and p1 is not None:
            for name, pv in (("p0", p0), ("p1", p1)):
                if pv.shape != q0.shape:
                    raise ValueError(f"{name} must have q0's shape {tuple(q0.shape)}, got {tuple(pv.shape)}.")
                _check_assignments(name, pv)
            p = self._rows(p0.detach().to(q0.dtype), p1.detach().to(q0.dtype))
        return self.objective(self._rows(q0, q1), p, known_positives=True, q_space=p is None)

    def _rows(self, a: Tensor, b: Tensor) -> Tensor:
        """``[a; b]`` (2B, K), of the global batch under ``gather_distributed`` (row i of both halves one image)."""
        if self.gather_distributed:
            a, b = gather(torch.cat([a, b], 1)).chunk(2, dim=1)
        return torch.cat([a, b])

    def extra_repr(self) -> str:
        return f"gather_distributed={self.gather_distributed}"


# ---------------------------------------------------------------------------------------------------- views
class BatchSimCLRViews(nn.Module):
    """SimCLR augmentations for a batch of image tensors (B, C, H, W) in [0, 1], each image with its own draw.

    The pieces of Lightly's ``SimCLRViewTransform`` that make sense for small grayscale images, with Lightly's
    parameter names: random resized crop (area share in ``[min_scale, 1]``, aspect ratio in [3/4, 4/3], resized
    back to H x W), random rotation (probability ``rr_prob``, angle in ``+-rr_degrees``), horizontal flip
    (``hf_prob``; 0 by default: digits are not mirror-symmetric), and colour jitter restricted to brightness and
    contrast (probability ``cj_prob``, strengths ``cj_strength * cj_bright`` / ``cj_strength * cj_contrast``).
    Crop, rotation and flip are one affine warp per image, applied to the whole batch with one ``affine_grid`` +
    ``grid_sample`` call; Lightly's transform would take one Python call per image. Saturation, hue, grayscale
    and Gaussian blur are left out (one channel; a blur radius >= 1 pixel wipes out an 8x8 digit).

    Args:
        min_scale, cj_prob, cj_strength, cj_bright, cj_contrast, hf_prob, rr_prob, rr_degrees: as in
            ``lightly.transforms.SimCLRTransform``.

    Shapes:
        input (B, C, H, W); output the same shape, values clamped to [0, 1].

    Examples:
        >>> views = BatchSimCLRViews()
        >>> x0, x1 = views(x), views(x)          # x: (B, 1, 8, 8) in [0, 1]
    """

    def __init__(self, min_scale: float = 0.5, cj_prob: float = 0.8, cj_strength: float = 0.5,
                 cj_bright: float = 0.8, cj_contrast: float = 0.8, hf_prob: float = 0.0, rr_prob: float = 0.5,
                 rr_degrees: float = 15.0) -> None:
        super().__init__()
        if not 0 < min_scale <= 1:
            raise ValueError(f"min_scale must be in (0, 1], got {min_scale}.")
        for name, prob in (("cj_prob", cj_prob), ("hf_prob", hf_prob), ("rr_prob", rr_prob)):
            if not 0 <= prob <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {prob}.")
        self.min_scale = float(min_scale)
        self.cj_prob = float(cj_prob)
        self.brightness = float(cj_strength * cj_bright)
        self.contrast = float(cj_strength * cj_contrast)
        self.hf_prob = float(hf_prob)
        self.rr_prob = float(rr_prob)
        self.rr_degrees = float(rr_degrees)

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"BatchSimCLRViews expects images (B, C, H, W), got shape {tuple(x.shape)}.")
        b = x.shape[0]
        r = torch.rand(b, 10, generator=generator).to(x.device, x.dtype)
        # random resized crop: area share a, aspect ratio e^(uniform(log 3/4, log 4/3)); sides in [0, 1] of the image
        area = self.min_scale + (1 - self.min_scale) * r[:, 0]
        log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * r[:, 1]
        sw = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
        sh = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
        cx = (2 * r[:, 2] - 1) * (1 - sw)
        cy = (2 * r[:, 3] - 1) * (1 - sh)
        angle = torch.where(r[:, 4] < self.rr_prob, (2 * r[:, 5] - 1) * math.radians(self.rr_degrees),
                            torch.zeros_like(r[:, 5]))
        flip = torch.where(r[:, 6] < self.hf_prob, -torch.ones_like(sw), torch.ones_like(sw))
        cos, sin = angle.cos(), angle.sin()
        theta = torch.stack([torch.stack([sw * cos * flip, -sh * sin, cx], 1),
                             torch.stack([sw * sin * flip, sh * cos, cy], 1)], 1)
        grid = nnf.affine_grid(theta, list(x.shape), align_corners=False)
        out = nnf.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # brightness and contrast jitter (applied together with probability cj_prob)
        jitter = (r[:, 7] < self.cj_prob).view(b, 1, 1, 1)
        bright = (1 + (2 * r[:, 8] - 1) * self.brightness).view(b, 1, 1, 1)
        contrast = (1 + (2 * r[:, 9] - 1) * self.contrast).view(b, 1, 1, 1)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        jittered = ((out * bright - mean * bright) * contrast + mean * bright).clamp(0, 1)
        return torch.where(jitter, jittered, out.clamp(0, 1))

    def extra_repr(self) -> str:
        return (f"min_scale={self.min_scale}, cj_prob={self.cj_prob}, brightness={self.brightness}, "
                f"contrast={self.contrast}, hf_prob={self.hf_prob}, rr_prob={self.rr_prob}, "
                f"rr_degrees={self.rr_degrees}")


def simclr_transform(input_size: int = 8, **kwargs: Any):
    """Lightly's ``SimCLRTransform`` set up for small grayscale images (digits, MNIST) in a ``Dataset`` pipeline.

    Same choices as :class:`BatchSimCLRViews`: crops of at least half the area, no flips, +-15 degree rotations
    half of the time, brightness/contrast jitter at half strength, no saturation/hue/grayscale/blur and no ImageNet
    normalisation. Takes a PIL image (or a (C, H, W) tensor) and returns two views; ``kwargs`` override any
    ``SimCLRTransform`` argument.

    Example:
        >>> t = simclr_transform(8)
        >>> v0, v1 = t(PIL.Image.fromarray(img_uint8, mode="L"))     # two (1, 8, 8) tensors in [0, 1]
    """
    from lightly.transforms import SimCLRTransform

    settings: Dict[str, Any] = dict(input_size=input_size, cj_prob=0.8, cj_strength=0.5, cj_sat=0.0, cj_hue=0.0,
                                    min_scale=0.5, random_gray_scale=0.0, gaussian_blur=0.0, hf_prob=0.0,
                                    rr_prob=0.5, rr_degrees=15.0, normalize=None)
    settings.update(kwargs)
    return SimCLRTransform(**settings)




# ---------------------------------------------------------------------------------------------------- model
class SimCLRClusterModel(nn.Module):
    """A :class:`dcss_plugin.DCSSModel` (its encoder is the SimCLR backbone) with Lightly's ``SimCLRProjectionHead``
    beside it: ``xn -> u -> (z, q)``.

    The projection head only serves training (NT-Xent on ``z``); what is saved, loaded and exported is
    :attr:`dcss`, a plain DCSS model.

    Args:
        dcss: the DCSS model: normalisation, backbone (``encoder``), centers, cluster head.
        projection_dims: (hidden, output) widths of the SimCLR projection head.

    Shapes:
        ``xn`` (B, C, H, W) normalised (``dcss.normalize(x)``); returns ``u`` (B, d), ``z`` (B, projection_dims[1])
        and ``q`` (B, K).

    Example:
        >>> from dcss_plugin.nets import ConvEncoder
        >>> dcss = DCSSModel(ConvEncoder((1, 8, 8), latent_dim=32), n_clusters=10, latent_dim=32)
        >>> model = SimCLRClusterModel(dcss)
        >>> u, z, q = model(dcss.normalize(x))          # (B, 32), (B, 64), (B, 10)
    """

    def __init__(self, dcss: DCSSModel, projection_dims: Tuple[int, int] = (128, 64)) -> None:
        super().__init__()
        from lightly.models.modules import SimCLRProjectionHead

        self.dcss = dcss
        self.projection_head = SimCLRProjectionHead(dcss.latent_dim, int(projection_dims[0]), int(projection_dims[1]))

    def forward(self, xn: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        u = self.dcss.encoder(xn)
        return u, self.projection_head(u), self.dcss.head(u)


def simclr_dcss_epoch(model: SimCLRClusterModel, ssl_loss: nn.Module, opt: torch.optim.Optimizer, batches: Batches,
                      cluster_loss: Optional[DCSSLoss] = None) -> Dict[str, float]:
    """One epoch of SimCLR on two views of every batch, plus the DCSS objective when ``cluster_loss`` is given.

    Per batch of B samples: ``u = encoder([view(x); view(x)])`` (2B, d), ``loss = ssl_loss(z[:B], z[B:])`` with
    ``z = projection_head(u)``, plus ``cluster_loss(head(u), p, known_positives=True)``: the two views of a sample
    are its known positive pair, and ``p = centers(u.detach())`` are the targets in the u-space stage (call
    ``cluster_loss.set_epoch(epoch)`` before each epoch). ``batches.augment`` makes the views.

    Returns:
        The epoch's mean ``loss``, ``ssl_loss`` and ``cluster_loss`` (0 without ``cluster_loss``).

    Example:
        >>> batches = Batches(dcss.normalize(x), 256, torch.Generator().manual_seed(0), augment=BatchSimCLRViews())
        >>> simclr_dcss_epoch(model, NTXentLoss(), opt, batches)                   # SimCLR warm-up
        >>> loss_fn.set_epoch(epoch)
        >>> simclr_dcss_epoch(model, NTXentLoss(), opt, batches, loss_fn)          # SimCLR + DCSS
    """
    if batches.augment is None:
        raise ValueError("SimCLR needs two random views of each batch: give Batches an augment (BatchSimCLRViews()).")
    model.train()
    dcss = model.dcss
    totals = np.zeros(3)
    for idx in batches.epoch():
        xb, b = batches.xn[idx], len(idx)
        u = dcss.encoder(torch.cat([batches.view(xb), batches.view(xb)]))
        z = model.projection_head(u)
        ssl = ssl_loss(z[:b], z[b:])
        clu = u.new_zeros(())
        if cluster_loss is not None:
            p = None if cluster_loss.q_space else dcss.centers(u.detach())
            clu = cluster_loss(dcss.head(u), p, known_positives=True)
        loss = ssl + clu
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        totals += np.array([loss.item(), ssl.item(), clu.item()]) * b
    loss_mean, ssl_mean, clu_mean = (totals / len(batches.xn)).tolist()
    return {"loss": loss_mean, "ssl_loss": ssl_mean, "cluster_loss": clu_mean}


# ---------------------------------------------------------------------------------------------------- fitting
def fit_lightly(x: Any, n_clusters: int, ssl: str = "simclr", *, temperature: float = 0.5,
                views: Optional[nn.Module] = None, preset: str = "default", device: str = "auto",
                verbose: bool = False, callback: Optional[Callback] = None,
                checkpoint_path: Optional[Union[str, os.PathLike]] = None, resume: bool = False,
                checkpoint_every_s: float = 10.0, **options: Any) -> DCSS:
    """Cluster images with SimCLR (Lightly) + DCSS in one model; returns a fitted :class:`dcss_plugin.DCSS`.

    Recipe (labels are never read):

    1. ``pretrain``: SimCLR alone: backbone (a :class:`dcss_plugin.nets.ConvEncoder`) + ``SimCLRProjectionHead`` +
       ``NTXentLoss`` on two views from :class:`BatchSimCLRViews` (``pretrain_epochs``, default 100).
    2. k-means on ``u`` (:func:`dcss_plugin.training.init_centers`) sets the centers (``labels_after_pretrain``).
       There is no Phase 1 (it needs a decoder): ``phase1`` has 0 epochs and ``labels_after_phase1`` equals
       ``labels_after_pretrain``.
    3. ``phase2``: SimCLR + DCSS jointly, ``NTXentLoss(z0, z1) + DCSSLoss([q0; q1], p, known_positives=True)``
       (:func:`simclr_dcss_epoch`), with u-space targets ``p`` for the first ``T2`` epochs, then q-space targets
       (``phase2_epochs``, default 100).

    Args:
        x: images (N, H, W) or (N, C, H, W) (array, tensor, Dataset or DataLoader); scaled to [0, 1] by one scalar.
        n_clusters: K.
        ssl: the self-supervised method; ``"simclr"`` (the only one for now).
        temperature: NT-Xent temperature.
        views: a batch augmentation ``views(x, generator)``; default :class:`BatchSimCLRViews`.
        preset, device, verbose: as :class:`dcss_plugin.DCSS`.
        callback: ``callback(phase, epoch, stats)`` after every epoch.
        checkpoint_path: the progress file (:class:`dcss_plugin.training.run.TrainingRun`), written atomically
            after the first epoch, at the start of the joint phase and every ``checkpoint_every_s`` seconds.
        resume: continue from ``checkpoint_path`` (same data and settings); ends with the labels of an
            uninterrupted run on CPU.
        **options: DCSS config options: ``latent_dim`` (default 32 here), ``pretrain_epochs``, ``phase2_epochs``,
            ``batch_size``, ``lr``, ``zeta``, ``gamma``, ``T2``, ``m``, ``conv_channels``, ``head_hidden_dims``,
            ``exclude_self``, ``pair_reduction``, ``balance_weight``, ``balance_tolerance``, ``kmeans_init``
            (default ``"euclidean"`` here), ``seed``. One cluster head is trained (``num_heads=1``).

    Returns:
        A fitted DCSS (``model_``, ``labels_``, ``config_``, ``input_shape_``, ``history_``) whose model's encoder
        is the SimCLR backbone: ``predict``, ``predict_proba``, ``transform``, ``save`` (read by ``DCSS.load``),
        ONNX export. Its parameters record the settings; ``fit`` on it (or on a clone) runs the plain recipe.

    Example:
        >>> from sklearn.datasets import load_digits
        >>> est = fit_lightly(load_digits().images, 10, seed=0)
        >>> est.labels_[:5], est.model_.encoder
    """
    from lightly.loss import NTXentLoss

    cfg = _lightly_config(n_clusters, ssl, preset, options)
    xt = _images(x, cfg, ssl)
    dev = resolve_device(device)
    views = (views if views is not None else BatchSimCLRViews()).to(dev)
    settings = {"ssl": ssl, "temperature": float(temperature), "views": repr(views)}
    epochs = {"pretrain": 100 if cfg.pretrain_epochs is None else cfg.pretrain_epochs, "phase1": 0,
              "phase2": 100 if cfg.phase2_epochs is None else cfg.phase2_epochs}
    fingerprint = data_fingerprint(xt) if checkpoint_path is not None else None
    run = TrainingRun({**cfg.to_dict(), "lightly": settings}, fingerprint, epochs, cfg.seed, checkpoint_path, resume,
                      checkpoint_every_s, callback, verbose,
                      history={"device": str(dev), "n_samples": len(xt), "ssl": settings, "ssl_loss": [],
                               "cluster_loss": []})
    torch.manual_seed(cfg.seed)
    model = _build_model(cfg, xt, settings)
    xn = model.dcss.normalize(xt).contiguous()
    model.to(dev)
    batches = Batches(xn, cfg.batch_size, run.generator, dev, views)
    run.restore(model)
    ntxent = NTXentLoss(temperature=temperature)
    if run.todo("pretrain"):
        _warm_up(model, ntxent, batches, cfg, run)
        _init_centers(model.dcss, batches, cfg, run)
        run.save("phase2", 0, model, None)
    _joint(model, ntxent, batches, cfg, run)
    return _fitted_estimator(model.dcss, cfg, xt, run, dev, verbose)


def _lightly_config(n_clusters: int, ssl: str, preset: str, options: Dict[str, Any]) -> DCSSConfig:
    """The validated, resolved config of a SimCLR run (what is recorded is what is trained)."""
    if ssl not in SSL_METHODS:
        raise ValueError(f"ssl={ssl!r} is not supported; choose one of {SSL_METHODS}.")
    options = dict(options)
    if options.get("phase1_epochs") not in (None, 0):
        raise ValueError("The SimCLR recipe has no Phase 1 (no decoder); leave phase1_epochs unset.")
    if options.get("num_heads") not in (None, 1):
        raise ValueError(f"The SimCLR recipe trains one cluster head; leave num_heads unset (or 1), got "
                         f"{options['num_heads']!r}. Several heads side by side are an option of the DCSS estimator.")
    options.update(phase1_epochs=0, num_heads=1)  # recorded as trained (the estimator's image default is 3 heads)
    options.setdefault("latent_dim", 32)
    options.setdefault("kmeans_init", "euclidean")  # NT-Xent shapes z = projection(u), not the directions of u
    return DCSSConfig(n_clusters=n_clusters, preset=preset, **options).resolved(images=True)


def _images(x: Any, cfg: DCSSConfig, ssl: str) -> Tensor:
    """``x`` as (N, C, H, W) float32, checked (images, finite, at least K samples)."""
    xt, _ = as_tensor(x)
    if xt.dim() == 3:
        xt = xt.unsqueeze(1)
    if xt.dim() != 4:
        raise DataError(f"--ssl {ssl} needs images (N, H, W) or (N, C, H, W); got shape {tuple(xt.shape)}. For "
                        "vectors use the plain DCSS estimator.")
    validate_features(xt, cfg.n_clusters, "images")
    return xt


def _build_model(cfg: DCSSConfig, x: Tensor, settings: Dict[str, Any]) -> SimCLRClusterModel:
    """A DCSS model around a conv backbone (a reference net: ``DCSS.load`` rebuilds it), plus the projection head."""
    shape = [int(s) for s in x.shape[1:]]
    spec = {"kind": "conv", "image_shape": shape, "latent_dim": cfg.latent_dim, "channels": list(cfg.conv_channels),
            "input_shape": shape, "lightly": dict(settings)}
    encoder = ConvEncoder(shape, cfg.latent_dim, cfg.conv_channels)
    dcss = DCSSModel(encoder, cfg.n_clusters, cfg.latent_dim, normalize=Normalize.fit(x), m=cfg.m, num_heads=1,
                     head_hidden_dims=cfg.head_hidden_dims, spec=spec)
    return SimCLRClusterModel(dcss)


def _warm_up(model: SimCLRClusterModel, ntxent: nn.Module, batches: Batches, cfg: DCSSConfig,
             run: TrainingRun) -> None:
    """SimCLR alone: backbone and projection head."""
    opt = adam([*param_groups(model.dcss.encoder, cfg.lr), *param_groups(model.projection_head, cfg.lr)], cfg.lr)
    for epoch in range(run.begin_phase("pretrain", opt, "SimCLR warm-up"), run.epochs["pretrain"]):
        t0 = time.perf_counter()
        stats = simclr_dcss_epoch(model, ntxent, opt, batches)
        run.end_epoch("pretrain", epoch, t0, {"loss": stats["loss"]}, model, opt)
    run.end_phase("pretrain")


def _init_centers(dcss: DCSSModel, batches: Batches, cfg: DCSSConfig, run: TrainingRun) -> None:
    """k-means on ``u`` sets the centers; with no Phase 1, its partition is also the 'after Phase 1' one."""
    t0 = time.perf_counter()
    u = init_centers(dcss, batches.xn, seed=cfg.seed, metric=cfg.kmeans_init)
    labels = dcss.centers(u).argmax(1).cpu().numpy().astype(np.int64)
    run.history["labels_after_pretrain"] = run.history["labels_after_phase1"] = labels
    run.history["time_s"]["kmeans_init"] = time.perf_counter() - t0
    run.phase, run.epoch = "phase2", 0


def _joint(model: SimCLRClusterModel, ntxent: nn.Module, batches: Batches, cfg: DCSSConfig,
           run: TrainingRun) -> None:
    """SimCLR + the DCSS objective, all of the model at ``lr``; u-space targets for the first ``T2`` epochs."""
    dcss = model.dcss
    tolerance = cfg.balance_tolerance
    loss_fn = DCSSLoss(cfg.zeta, cfg.gamma, cfg.T2, cfg.pair_reduction, cfg.exclude_self, cfg.balance_weight,
                       0.0 if tolerance == "phase1" else float(tolerance))
    if tolerance == "phase1":
        loss_fn.set_tolerance_from_labels(torch.as_tensor(run.history["labels_after_phase1"]), cfg.n_clusters)
    run.history["balance_tolerance"] = float(loss_fn.balance_tolerance)
    opt = adam([*param_groups(dcss.encoder, cfg.lr), *param_groups(model.projection_head, cfg.lr),
                {"params": list(dcss.heads.parameters()), "lr": cfg.lr}], cfg.lr)
    for epoch in range(run.begin_phase("phase2", opt, "SimCLR + DCSS"), run.epochs["phase2"]):
        t0 = time.perf_counter()
        loss_fn.set_epoch(epoch)
        stats = simclr_dcss_epoch(model, ntxent, opt, batches, loss_fn)
        run.history["ssl_loss"].append(stats["ssl_loss"])
        run.history["cluster_loss"].append(stats["cluster_loss"])
        run.end_epoch("phase2", epoch, t0, stats, model, opt, targets="q" if loss_fn.q_space else "p")
    run.end_phase("phase2")


def _fitted_estimator(dcss: DCSSModel, cfg: DCSSConfig, x: Tensor, run: TrainingRun, dev: torch.device,
                      verbose: bool) -> DCSS:
    """A fitted :class:`dcss_plugin.DCSS` assembled from the trained model (its public fitted attributes)."""
    options = {name: getattr(cfg, name) for name in cfg.to_dict() if name not in ("n_clusters", "preset")}
    est = DCSS(n_clusters=cfg.n_clusters, preset=cfg.preset, device=str(dev), verbose=verbose, **options)
    est.model_, est.config_, est.input_shape_ = dcss.eval(), cfg, tuple(int(s) for s in x.shape[1:])
    est.history_ = run.finish()
    est.labels_ = est.predict(x)
    return est


def fit_from_cli_args(args: Any, x: Any, overrides: Optional[Dict[str, Any]] = None,
                      callback: Optional[Callback] = None, checkpoint_path: Optional[Union[str, os.PathLike]] = None,
                      resume: bool = False) -> DCSS:
    """``dcss fit ... --ssl simclr``: the fitted model (see :func:`fit_lightly`).

    Reads ``args.ssl``, ``args.clusters``, ``args.seed``, ``args.preset``, ``args.device``, ``args.quiet``;
    ``overrides`` are the DCSS config options ``cmd_fit`` collected (``pretrain_epochs`` = SimCLR warm-up epochs,
    ``phase2_epochs`` = joint epochs, ``batch_size``, ``lr``, ``zeta``, ``gamma``, ``T2``, ``latent_dim``, ``m``, ...).

    Example:
        >>> args = argparse.Namespace(ssl="simclr", clusters=10, seed=0, preset="default", device="cpu", quiet=True)
        >>> est = fit_from_cli_args(args, load_digits().images, {"pretrain_epochs": 2, "phase2_epochs": 2})
    """
    ssl = str(getattr(args, "ssl", None) or "simclr").lower()
    options = dict(overrides or {})
    if options.get("phase1_epochs"):
        raise ValueError("--phase1-epochs does not apply to --ssl (the SimCLR recipe has no Phase 1); drop it.")
    options.pop("phase1_epochs", None)
    options.setdefault("seed", getattr(args, "seed", 0))
    return fit_lightly(x, int(args.clusters), ssl, preset=getattr(args, "preset", "default"),
                       device=getattr(args, "device", "auto"), verbose=not bool(getattr(args, "quiet", False)),
                       callback=callback, checkpoint_path=checkpoint_path, resume=resume, **options)
