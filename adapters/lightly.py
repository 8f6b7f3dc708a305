"""DCSS inside Lightly self-supervised pipelines: a cluster head and a cluster loss beside the SSL head and loss.

Imported as ``dcss_plugin.adapters.lightly``; Lightly (and, for :func:`fit_lightly`, nothing else heavy) is
imported here and nowhere in ``dcss_plugin`` itself.

A Lightly model is ``backbone -> h -> projection head -> z -> SSL loss`` (e.g. SimCLR: ``SimCLRProjectionHead`` and
``NTXentLoss`` on two augmented views). DCSS adds a second branch on the same backbone features ``u = h``::

    u ──SimCLRProjectionHead──▶ z ──NTXentLoss(z0, z1)
      └─DCSSClusterHead──────▶ q ──DCSSClusterLoss(q0, q1)        labels = argmax q

* :class:`DCSSClusterHead`: the paper's MNet (``u -> q``, Linear-BN-ReLU x2, Linear, softmax). It *is* a
  :class:`dcss_plugin.DCSSHead`, so the estimator, ``DCSS.load`` and the ONNX export take it as it is.
* :class:`DCSSClusterLoss`: the DCSS pairwise loss on the 2B soft assignments of the two views, with the two views
  of one image as a known similar pair, plus a guard against a single cluster (see the class doc for why it is
  needed). ``gather_distributed=True`` forms pairs across all ranks, as Lightly's ``NTXentLoss`` does.
* :class:`BatchSimCLRViews`: SimCLR's augmentations (random resized crop, rotation, brightness/contrast jitter) for
  a whole batch of image tensors at once, each image with its own parameters. Lightly's ``SimCLRTransform``
  works per image (PIL or tensor, ~0.8 ms per 8x8 view on one CPU core, i.e. ~3 s per epoch of digits);
  :func:`simclr_transform` configures that Lightly transform for small grayscale images for ``Dataset`` pipelines.
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

import logging
import math
import os
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from dcss_plugin import __version__
from dcss_plugin import distributed as dist
from dcss_plugin.autoencoders import ConvAutoencoder
from dcss_plugin.centers import ClusterCenters
from dcss_plugin.config import DCSSConfig
from dcss_plugin.data import (DataError, InputNormalizer, as_tensor, data_fingerprint, shuffled_batches,
                              validate_features)
from dcss_plugin.estimator import DCSS, _resolve_device
from dcss_plugin.functional import balance_penalty
from dcss_plugin.heads import DCSSHead
from dcss_plugin.io import atomic_torch_save, load_checkpoint
from dcss_plugin.losses import PairwiseSimilarityLoss

__all__ = [
    "DCSSClusterHead",
    "DCSSClusterLoss",
    "BatchSimCLRViews",
    "simclr_transform",
    "SimCLRClusterModel",
    "fit_lightly",
    "fit_from_cli_args",
    "SSL_METHODS",
]

log = logging.getLogger("dcss_plugin")

SSL_METHODS = ("simclr",)
PROGRESS_FORMAT = "dcss-plugin/lightly-progress-v1"


# ---------------------------------------------------------------------------------------------------- head
class DCSSClusterHead(DCSSHead):
    """Cluster head of DCSS (the paper's MNet) for a Lightly model: backbone features ``u`` -> soft assignments ``q``.

    ``(Linear-BN-ReLU) x len(hidden_dims), Linear, softmax over K``. It sits beside the SSL projection head on the
    same backbone output. It is a :class:`dcss_plugin.DCSSHead` (same layers and ``state_dict`` keys), so a trained
    head can be placed into a :class:`dcss_plugin.DCSS` model, saved and exported to ONNX unchanged.

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
    """DCSS pairwise-similarity loss for two augmented views, in the style of Lightly's losses.

    The 2B assignments ``q = [q0; q1]`` of the two views are compared pair by pair, as in Phase 2 of DCSS
    (Sadeghi & Armanfard, arXiv 2405.03590)::

        L_pair = [s_ij > zeta] (1 - q_i . q_j)  +  [s_ij < gamma] q_i . q_j        (pairs i != j of the 2B rows)

    The target similarity ``s`` is ``p pᵀ`` when memberships ``p0, p1`` are given (the paper's u-space stage,
    first T2 epochs, ``p`` from :class:`dcss_plugin.ClusterCenters`) and ``(q qᵀ).detach()`` otherwise (q-space
    stage). **Known positives:** the two views of one image are set to ``s_ij = 1`` whatever ``p``/``q`` say, so they
    are always pulled; the thresholded pairs of the paper are kept as they are. (This uses
    ``PairwiseSimilarityLoss(sample_ids=...)`` with view ``i`` of both halves sharing an id.) With
    ``reduction="balanced"`` the pulled and the pushed pairs each contribute their mean, so the few similar pairs of
    a batch with many clusters are not drowned by the dissimilar ones. Two optional terms follow:

    * ``positive_weight * mean_i -log(q0_i . q1_i)``: a pull on the view pairs whose gradient does not vanish
      when the two views disagree completely (the linear ``1 - q0_i . q1_i`` is flat there).
    * ``balance_weight * KL(mean q || uniform)``: the guard against collapse. A hard partition has zero pairwise
      loss under ``q qᵀ`` targets whatever the partition, a single cluster included (every pair then has
      ``s_ij = 1`` and ``q_i . q_j = 1``), and the view positives only ever pull; this term, which is 0 when the
      clusters are used evenly over the batch, makes one cluster costly.

    Args:
        zeta: similar-pair threshold (paper: 0.8).
        gamma: dissimilar-pair threshold (paper: 0.2).
        reduction: ``"balanced"`` (default), ``"mean"`` (paper: over all selected pairs) or ``"sum"``.
        exclude_self: drop the ``i == j`` pairs (their ``q_i . q_i`` says nothing about clusters).
        positive_weight: weight of the ``-log(q0 . q1)`` view-pair term (0: off).
        balance_weight: weight of the ``KL(mean q || uniform)`` guard (0: off; then expect collapse).
        gather_distributed: if True and a process group is running, the assignments of all ranks are gathered
            (with gradients, :func:`dcss_plugin.distributed.gather`) before pairs are formed: pairs across ranks
            count, the balance term sees the global batch, and every rank computes the same loss, the one a
            single process would compute on the global batch. DDP's gradient averaging then gives exactly the
            single-process gradient.

    Shapes:
        ``q0``, ``q1``: (B, K) soft assignments of view 0 and view 1 (row ``i`` of both is the same image);
        ``p0``, ``p1``: optional (B, K) memberships used as targets. Returns a scalar.

    Raises:
        ValueError: mismatched shapes, K < 2, NaN/inf, rows that are not probabilities (logits passed), bad
            hyperparameters.

    Examples:
        >>> loss_fn = DCSSClusterLoss()
        >>> x0, x1 = transform(x), transform(x)                  # two augmented views of the batch
        >>> q0, q1 = head(backbone(x0)), head(backbone(x1))      # (B, K) each
        >>> loss = loss_fn(q0, q1)                               # q-space targets
        >>> loss = loss_fn(q0, q1, centers(u0.detach()), centers(u1.detach()))   # u-space targets (first T2 epochs)
    """

    def __init__(
        self,
        zeta: float = 0.8,
        gamma: float = 0.2,
        reduction: str = "balanced",
        exclude_self: bool = True,
        positive_weight: float = 1.0,
        balance_weight: float = 5.0,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        if reduction not in ("balanced", "mean", "sum"):
            raise ValueError(f"reduction must be 'balanced', 'mean' or 'sum' (a scalar loss), got {reduction!r}.")
        if positive_weight < 0 or balance_weight < 0:
            raise ValueError(f"positive_weight and balance_weight must be >= 0, got {positive_weight} and "
                             f"{balance_weight}.")
        self.pairwise = PairwiseSimilarityLoss(zeta=zeta, gamma=gamma, reduction=reduction,
                                               exclude_self=exclude_self, gather_distributed=gather_distributed)
        self.zeta = zeta
        self.gamma = gamma
        self.reduction = reduction
        self.exclude_self = exclude_self
        self.positive_weight = float(positive_weight)
        self.balance_weight = float(balance_weight)
        self.gather_distributed = gather_distributed

    def forward(self, q0: Tensor, q1: Tensor, p0: Optional[Tensor] = None, p1: Optional[Tensor] = None) -> Tensor:
        """Loss of the assignments ``q0``, ``q1`` (B, K) of two views; targets ``p0 p0ᵀ``-style if ``p`` given.

        Returns:
            Scalar loss (identical on every rank under ``gather_distributed``).
        """
        _check_assignments("q0", q0)
        _check_assignments("q1", q1)
        if q0.shape != q1.shape:
            raise ValueError(f"q0 and q1 must have the same shape (B, K): row i of both is one image's two views; "
                             f"got {tuple(q0.shape)} and {tuple(q1.shape)}.")
        if (p0 is None) != (p1 is None):
            raise ValueError("Give memberships for both views (p0 and p1) or for neither.")
        target = None
        if p0 is not None and p1 is not None:
            for name, p in (("p0", p0), ("p1", p1)):
                if p.shape != q0.shape:
                    raise ValueError(f"{name} must have q0's shape {tuple(q0.shape)}, got {tuple(p.shape)}.")
                _check_assignments(name, p)
            target = torch.cat([p0, p1]).detach().to(q0.dtype)
        b = q0.shape[0]
        q = torch.cat([q0, q1])
        # view i of both halves share an id; ids are made unique across ranks for the gathered pair matrix
        ids = torch.arange(b, device=q.device, dtype=torch.long)
        if self.gather_distributed:
            ids = ids + (dist.rank() << 32)
        loss = self.pairwise(q, target=target, sample_ids=ids.repeat(2))
        gather = dist.gather if self.gather_distributed else (lambda t: t)
        if self.positive_weight > 0:
            dot = (q0 * q1).sum(1)
            loss = loss + self.positive_weight * (-gather(dot).clamp_min(1e-8).log().mean())
        if self.balance_weight > 0:
            loss = loss + self.balance_weight * balance_penalty(gather(q))
        return loss

    def extra_repr(self) -> str:
        return (f"zeta={self.zeta}, gamma={self.gamma}, reduction={self.reduction!r}, "
                f"exclude_self={self.exclude_self}, positive_weight={self.positive_weight}, "
                f"balance_weight={self.balance_weight}, gather_distributed={self.gather_distributed}")


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
    """Backbone + Lightly ``SimCLRProjectionHead`` (SSL branch) + :class:`DCSSClusterHead` (clustering branch).

    The backbone is the encoder of a :class:`dcss_plugin.ConvAutoencoder` (its decoder is not trained), so the
    fitted model is stored as a plain DCSS checkpoint that ``DCSS.load`` and ``dcss export`` read.

    Args:
        image_shape: (C, H, W).
        num_clusters: K.
        latent_dim: width of the backbone features ``u``.
        channels: conv stage widths of the backbone.
        projection_dims: (hidden, output) widths of the SimCLR projection head.
        head_hidden_dims: hidden widths of the cluster head.

    Example:
        >>> model = SimCLRClusterModel((1, 8, 8), num_clusters=10)
        >>> u, z, q = model(x)                   # (B, d), (B, 64), (B, 10)
    """

    def __init__(self, image_shape: Sequence[int], num_clusters: int, latent_dim: int = 32,
                 channels: Sequence[int] = (32, 64, 128), projection_dims: Tuple[int, int] = (128, 64),
                 head_hidden_dims: Sequence[int] = (128, 128)) -> None:
        super().__init__()
        from lightly.models.modules import SimCLRProjectionHead

        self.autoencoder = ConvAutoencoder(image_shape, latent_dim=latent_dim, channels=channels)
        self.projection_head = SimCLRProjectionHead(latent_dim, projection_dims[0], projection_dims[1])
        self.cluster_head = DCSSClusterHead(latent_dim, num_clusters, head_hidden_dims)

    def backbone(self, x: Tensor) -> Tensor:
        return self.autoencoder.encode(x)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        u = self.backbone(x)
        return u, self.projection_head(u), self.cluster_head(u)


# ---------------------------------------------------------------------------------------------------- fitting
def _epochs_or(value: Optional[int], default: int) -> int:
    if value is None:
        return default
    if int(value) < 0:
        raise ValueError(f"Epoch counts must be >= 0, got {value}.")
    return int(value)


def fit_lightly(x: Any, n_clusters: int, ssl: str = "simclr", *, temperature: float = 0.5,
                positive_weight: float = 1.0, balance_weight: float = 5.0, views: Optional[nn.Module] = None,
                preset: str = "default", device: str = "auto", verbose: bool = False,
                callback: Optional[Callable[[str, int, Dict[str, float]], None]] = None,
                checkpoint_path: Optional[Union[str, os.PathLike]] = None, resume: bool = False,
                **dcss_kwargs: Any) -> DCSS:
    """Cluster images with SimCLR (Lightly) + DCSS in one model; returns a fitted :class:`dcss_plugin.DCSS`.

    Recipe (labels are never read):

    1. ``pretrain``: SimCLR alone — backbone + ``SimCLRProjectionHead`` + ``NTXentLoss`` on two views from
       :class:`BatchSimCLRViews` (``pretrain_epochs``, default 100).
    2. k-means on ``u`` initialises :class:`~dcss_plugin.ClusterCenters` (``labels_after_pretrain``). There is no
       Phase 1 (it needs a decoder): ``phase1`` has 0 epochs and ``labels_after_phase1`` equals
       ``labels_after_pretrain``.
    3. ``phase2``: SimCLR + DCSS jointly, ``NTXentLoss(z0, z1) + DCSSClusterLoss(q0, q1[, p0, p1])``, with u-space
       targets ``p`` for the first ``T2`` epochs and q-space targets afterwards (``phase2_epochs``, default 100).

    Args:
        x: images (N, H, W) or (N, C, H, W) (array, tensor, Dataset or DataLoader); scaled to [0, 1] by one scalar.
        n_clusters: K.
        ssl: the self-supervised method; ``"simclr"`` (the only one for now).
        temperature: NT-Xent temperature.
        positive_weight, balance_weight: see :class:`DCSSClusterLoss`.
        views: a batch augmentation ``views(x, generator)``; default :class:`BatchSimCLRViews`.
        preset, device, verbose: as :class:`dcss_plugin.DCSS`.
        callback: ``callback(phase, epoch, stats)`` after every epoch.
        checkpoint_path: the full training state is written there atomically after every epoch.
        resume: continue from ``checkpoint_path`` (same data and settings); ends with the labels of an
            uninterrupted run on CPU.
        **dcss_kwargs: DCSS config fields: ``latent_dim`` (default 32 here), ``pretrain_epochs``,
            ``phase2_epochs``, ``batch_size``, ``lr``, ``zeta``, ``gamma``, ``T2``, ``m``, ``conv_channels``,
            ``head_hidden_dims``, ``exclude_self``, ``pair_reduction``, ``seed``.

    Returns:
        A fitted DCSS whose encoder is the SimCLR backbone and whose head is the trained cluster head:
        ``labels_``, ``history_``, ``predict``, ``predict_proba``, ``transform``, ``save`` (loadable with
        ``DCSS.load``), ONNX export.
    """
    if ssl not in SSL_METHODS:
        raise ValueError(f"ssl={ssl!r} is not supported; choose one of {SSL_METHODS}.")
    from lightly.loss import NTXentLoss

    dcss_kwargs.setdefault("latent_dim", 32)
    if dcss_kwargs.get("phase1_epochs") not in (None, 0):
        raise ValueError("The SimCLR recipe has no Phase 1 (no decoder); leave phase1_epochs unset.")
    dcss_kwargs["phase1_epochs"] = 0
    if dcss_kwargs.get("num_heads") not in (None, 1):
        raise ValueError("The SimCLR recipe trains one cluster head; leave num_heads unset (or 1).")
    dcss_kwargs["num_heads"] = 1  # recorded in the saved config as what was trained (the image default is 3)
    cfg = DCSSConfig(n_clusters=n_clusters, preset=preset, **dcss_kwargs).resolved()
    xt, _ = as_tensor(x)
    if xt.dim() == 3:
        xt = xt.unsqueeze(1)
    if xt.dim() != 4:
        raise DataError(f"--ssl {ssl} needs images (N, H, W) or (N, C, H, W); got shape {tuple(xt.shape)}. For "
                        "vectors use the plain DCSS estimator.")
    validate_features(xt, cfg.n_clusters, "images")
    dev = _resolve_device(device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    normalizer = InputNormalizer.fit(xt)
    xn = normalizer(xt).contiguous()
    n = len(xn)
    epochs = {"pretrain": _epochs_or(cfg.pretrain_epochs, 100), "phase1": 0,
              "phase2": _epochs_or(cfg.phase2_epochs, 100)}
    model = SimCLRClusterModel(tuple(xn.shape[1:]), cfg.n_clusters, cfg.latent_dim, cfg.conv_channels,
                               head_hidden_dims=cfg.head_hidden_dims).to(dev)
    centers = ClusterCenters(cfg.n_clusters, cfg.latent_dim, m=cfg.m).to(dev)
    aug = (views if views is not None else BatchSimCLRViews()).to(dev)
    ntxent = NTXentLoss(temperature=temperature)
    criterion = DCSSClusterLoss(cfg.zeta, cfg.gamma, reduction=cfg.pair_reduction, exclude_self=cfg.exclude_self,
                                positive_weight=positive_weight, balance_weight=balance_weight)
    ssl_settings = {"ssl": ssl, "temperature": temperature, "positive_weight": positive_weight,
                    "balance_weight": balance_weight, "views": repr(aug)}
    history: Dict[str, Any] = {"epochs": epochs, "loss": {"pretrain": [], "phase1": [], "phase2": []},
                               "time_s": {"pretrain": 0.0, "kmeans_init": 0.0, "phase1": 0.0, "phase2": 0.0},
                               "time_per_epoch_s": {}, "device": str(dev), "n_samples": n, "ssl": ssl_settings,
                               "ssl_loss": [], "cluster_loss": []}
    ssl_params = [*model.autoencoder.encoder.parameters(), *model.projection_head.parameters()]
    opt_pre = torch.optim.Adam(ssl_params, lr=cfg.lr)
    opt_joint = torch.optim.Adam([{"params": ssl_params, "lr": cfg.lr},
                                  {"params": model.cluster_head.parameters(), "lr": cfg.lr}])
    phase, first = "pretrain", 0
    fingerprint = data_fingerprint(xn)

    def save_progress(next_phase: str, next_epoch: int) -> None:
        if checkpoint_path is None:
            return
        state = {"format": PROGRESS_FORMAT, "version": __version__, "config": cfg.to_dict(), "ssl": ssl_settings,
                 "data": fingerprint, "phase": next_phase, "epoch": next_epoch,
                 "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                 "centers": {k: v.detach().cpu().clone() for k, v in centers.state_dict().items()},
                 "opt_pre": opt_pre.state_dict(), "opt_joint": opt_joint.state_dict(),
                 "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                 "history": {k: (torch.as_tensor(v) if isinstance(v, np.ndarray) else v) for k, v in history.items()}}
        atomic_torch_save(state, checkpoint_path)

    if resume:
        if checkpoint_path is None:
            raise ValueError("resume=True needs checkpoint_path (the progress file of the interrupted run).")
        if not os.path.exists(checkpoint_path):
            raise FileNotFoundError(f"Nothing to resume: {os.fspath(checkpoint_path)!r} does not exist.")
        state = load_checkpoint(checkpoint_path, PROGRESS_FORMAT)
        if (state.get("version") != __version__ or state.get("config") != cfg.to_dict()
                or state.get("ssl") != ssl_settings):
            raise ValueError(f"{os.fspath(checkpoint_path)!r} is from a run with other settings or another "
                             "dcss-plugin version; resume with the same arguments, or start a new run.")
        if state.get("data") != fingerprint:
            raise ValueError(f"{os.fspath(checkpoint_path)!r} is from a run on different data; resume with the "
                             "same input.")
        model.load_state_dict(state["model"])
        centers.load_state_dict(state["centers"])
        opt_pre.load_state_dict(state["opt_pre"])
        opt_joint.load_state_dict(state["opt_joint"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        for k, v in state["history"].items():
            if k not in ("device", "epochs", "n_samples", "ssl"):
                history[k] = v.numpy() if isinstance(v, Tensor) else v
        phase, first = str(state["phase"]), int(state["epoch"])

    @torch.no_grad()
    def encode_all() -> Tensor:
        model.eval()
        return torch.cat([model.backbone(xn[i:i + 4096].to(dev)) for i in range(0, n, 4096)])

    def end_epoch(name: str, epoch: int, t0: float, stats: Dict[str, float]) -> None:
        history["loss"][name].append(stats["loss"])
        history["time_s"][name] += time.perf_counter() - t0
        bars[name].update(1)
        bars[name].set_postfix(loss=f"{stats['loss']:.4f}")
        if callback:
            callback(name, epoch, stats)
        save_progress(name, epoch + 1)

    from tqdm.auto import tqdm

    bars = {name: tqdm(total=epochs[name], initial=first if name == phase else 0, desc=f"{ssl} {name}",
                       disable=not verbose, leave=False, dynamic_ncols=True) for name in ("pretrain", "phase2")}

    # ---- SimCLR warm-up
    if phase == "pretrain":
        for epoch in range(first, epochs["pretrain"]):
            t0 = time.perf_counter()
            model.train()
            total = 0.0
            for idx in shuffled_batches(n, cfg.batch_size, gen):
                xb = xn[idx].to(dev)
                x0, x1 = aug(xb, gen), aug(xb, gen)
                z = model.projection_head(model.backbone(torch.cat([x0, x1])))
                loss = ntxent(z[:len(idx)], z[len(idx):])
                opt_pre.zero_grad(set_to_none=True)
                loss.backward()
                opt_pre.step()
                total += loss.item() * len(idx)
            end_epoch("pretrain", epoch, t0, {"loss": total / n})
        t0 = time.perf_counter()
        u_all = encode_all()
        centers.init_kmeans(u_all, seed=cfg.seed)
        history["labels_after_pretrain"] = centers(u_all).argmax(1).cpu().numpy().astype(np.int64)
        history["labels_after_phase1"] = history["labels_after_pretrain"]
        history["time_s"]["kmeans_init"] = time.perf_counter() - t0
        phase, first = "phase2", 0
        save_progress("phase2", 0)

    # ---- SimCLR + DCSS jointly
    for epoch in range(first, epochs["phase2"]):
        t0 = time.perf_counter()
        u_space = epoch < cfg.T2
        model.train()
        total = ssl_total = clu_total = 0.0
        for idx in shuffled_batches(n, cfg.batch_size, gen):
            b = len(idx)
            xb = xn[idx].to(dev)
            u = model.backbone(torch.cat([aug(xb, gen), aug(xb, gen)]))
            z, q = model.projection_head(u), model.cluster_head(u)
            p = centers(u.detach()) if u_space else None
            loss_ssl = ntxent(z[:b], z[b:])
            loss_clu = criterion(q[:b], q[b:], *((p[:b], p[b:]) if p is not None else ()))
            loss = loss_ssl + loss_clu
            opt_joint.zero_grad(set_to_none=True)
            loss.backward()
            opt_joint.step()
            total += loss.item() * b
            ssl_total += loss_ssl.item() * b
            clu_total += loss_clu.item() * b
        history["ssl_loss"].append(ssl_total / n)
        history["cluster_loss"].append(clu_total / n)
        end_epoch("phase2", epoch, t0, {"loss": total / n, "ssl_loss": ssl_total / n,
                                        "cluster_loss": clu_total / n})
    for bar in bars.values():
        bar.close()
    for name, e in epochs.items():
        history["time_per_epoch_s"][name] = history["time_s"][name] / max(e, 1)

    # ---- a plain DCSS model around the trained backbone and head
    out = DCSS(n_clusters=cfg.n_clusters, preset=cfg.preset, device=str(dev), verbose=verbose,
               **{k: v for k, v in cfg.to_dict().items() if k not in ("n_clusters", "preset")})
    out.config = cfg
    out.autoencoder = model.autoencoder.eval()
    out.centers = centers
    out.head = model.cluster_head.eval()
    out.normalizer = normalizer
    out.input_shape = tuple(xt.shape[1:])
    out._ae_spec = {"kind": "conv", "image_shape": list(xt.shape[1:]), "latent_dim": cfg.latent_dim,
                    "channels": list(cfg.conv_channels), "lightly": dict(ssl_settings)}
    out.history_ = history
    out.labels_ = out.predict(xt)
    return out


def fit_from_cli_args(args: Any, x: Any, overrides: Optional[Dict[str, Any]] = None,
                      callback: Optional[Callable[[str, int, Dict[str, float]], None]] = None,
                      checkpoint_path: Optional[Union[str, os.PathLike]] = None, resume: bool = False) -> DCSS:
    """``dcss fit ... --ssl simclr``: the fitted model (see :func:`fit_lightly`).

    Reads ``args.ssl``, ``args.clusters``, ``args.seed``, ``args.preset``, ``args.device``, ``args.quiet``;
    ``overrides`` are the DCSS config fields ``cmd_fit`` collected (``pretrain_epochs`` = SimCLR warm-up epochs,
    ``phase2_epochs`` = joint epochs, ``batch_size``, ``lr``, ``zeta``, ``gamma``, ``T2``, ``latent_dim``, ``m``).
    """
    ssl = str(getattr(args, "ssl", None) or "simclr").lower()
    kwargs = dict(overrides or {})
    if kwargs.get("phase1_epochs"):
        raise ValueError("--phase1-epochs does not apply to --ssl (the SimCLR recipe has no Phase 1); drop it.")
    kwargs.pop("phase1_epochs", None)
    kwargs.setdefault("seed", getattr(args, "seed", 0))
    return fit_lightly(x, int(args.clusters), ssl, preset=getattr(args, "preset", "default"),
                       device=getattr(args, "device", "auto"), verbose=not bool(getattr(args, "quiet", False)),
                       callback=callback, checkpoint_path=checkpoint_path, resume=resume, **kwargs)
