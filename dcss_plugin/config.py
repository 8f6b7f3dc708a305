"""DCSS hyperparameters and the two presets.

``preset="paper"`` is the published recipe: m 1.5, lambda 0.1, zeta 0.8, gamma 0.2, T1 2, T2 5, an MLP
autoencoder F-500-500-2000-d, MNet 128-128, pairs only within the batch, self-pairs counted. The optimizer
settings (Adam, lr 1e-3 for pretraining and Phase 2, 1e-4 for Phase 1, mean-reduced losses) are ours: the
official code's SGD at lr 1e-6 on a summed loss makes the step size depend on the dataset size.

``preset="default"`` keeps the method and its loss functions and changes what the paper leaves fragile, each
choice made without labels:

* ``m = 1.2``: with m 1.5 the fuzzy c-means updates drag the centers together on small data; 1.2 keeps them apart.
* A convolutional autoencoder for images, pretrained as a denoising autoencoder (reconstruct ``x`` from an
  augmented view), so that ``u`` is already invariant to small warps.
* Known positive pairs in Phase 2: two augmented views of one sample, and a sample with one of its
  ``neighbors`` nearest neighbours in u-space (found once, after Phase 1). Their target ``s_ij`` is set to 1;
  all other pairs keep the paper's thresholded ``p p^T`` / ``q q^T`` targets. Self-pairs are excluded.
* A balance guard: ``balance_weight * max(0, KL(mean q || uniform) - tolerance)`` (weight 5) added to the
  Phase-2 loss, so that a single cluster (which has zero pairwise loss once targets are ``q q^T``) is not a
  minimum. For vectors the tolerance is the KL of the Phase-1 partition's own sizes, so uneven clusters found in
  Phase 1 are not forced to equal sizes (penguins 146/119/68: ACC 0.97 instead of 0.86 with the plain uniform
  guard). For images it is 0 (the plain uniform guard): there Phase 1 more often merges two classes, and the
  uniform guard splits them again (MNIST-5000 with a 400-step u-space stage: 0.658 with it, 0.609 with the
  Phase-1 tolerance). A prior, not a measurement on the data at hand: uneven image classes are better served by
  ``balance_tolerance="phase1"``.
* For vectors the u-space stage of Phase 2 (targets ``p p^T``) lasts at least 400 optimizer steps
  (``T2_min_steps``), not 5 epochs: on a 300-row table 5 epochs are 10 steps, too few for the head to learn the
  Phase-1 partition before its own ``q q^T`` targets take over, and the self-training then drifted to other
  members. Images keep T2 = 5 epochs: a long u-space stage entrenches a Phase-1 merge (MNIST-5000 0.658 vs 0.765,
  digits 0.956 / 0.958 / 0.844 vs 0.964 / 0.947 / 0.944).
* The pull on known positives is ``-log(q_a . q_b)`` (its gradient does not vanish on total disagreement);
  thresholded pairs keep the paper's terms, with pulled and pushed pairs weighted equally (``"balanced"``).
* For images, pretraining adds an NT-Xent term between the ``u`` of two augmented views (label-free), so that
  k-means on ``u`` starts Phase 1 from a better partition; neighbours are re-mined every 50 Phase-2 epochs. That
  term shapes only the directions of ``u`` (cosine similarities), so k-means then runs on ``u / ||u||``
  (``kmeans_init="cosine"``): on digits Euclidean k-means merged two digits after 2 pretrainings of 6 (ACC 0.78 /
  0.82, smallest cluster 90 / 88 rows), spherical k-means on the same ``u`` did not (0.89 / 0.93); final ACC
  over 6 seeds: median 0.944 -> 0.952. On MNIST-5000 (one seed) the two inits were level and the final ACC fell
  0.765 -> 0.729. The NT-Xent term is off for vectors: between two feature-noise views of a small table it
  wrecked the latent space (k-means on ``u`` after pretraining: wine 0.45 with it, 0.95 without; iris 0.47 vs
  0.81).
* Option, off by default: ``mlp_linear_path=True`` gives the MLP autoencoder a linear map beside each MLP,
  started at PCA of the standardised input with both MLPs' last layers zeroed: pretraining starts from the top-d
  principal axes (the optimum of a linear autoencoder) and learns a non-linear correction. On small, wide
  development tables the deep MLP's ``u`` kept less cluster structure than the input (k-means on ``u`` after
  pretraining, seed 0: ACSF1 0.26 vs 0.42 on the top-10 PCA, tissue 0.77 vs 0.83), and paired full fits with
  F > 10 (wine, BasicMotions, tissue, ArrowHead, ACSF1; seeds 0-2; a prototype of the same module) put it ahead of
  the plain MLP on 11 of 15, mean +1.6 points of ACC. On a fresh batch chosen beforehand (bdims, ad_data,
  steroid, hepatic, NCI60; seeds 0-2) it was ahead of the plain MLP on 7 runs and behind on 8: it lifted the
  wide sets where the plain MLP trails k-means (hepatic, NCI60) but pinned the result to k-means level where the
  plain MLP's non-linear ``u`` beat k-means (body dimensions by sex: 0.86 against 0.89-0.94). Not a default.
* For vectors, pretraining adds a neighbour-embedding term (``neighbor_embedding_weight=1``, k 10): each row's
  ``u`` is pulled toward the ``u`` of one of its 10 nearest rows in the standardised input and pushed from the
  rest of the batch, with a Cauchy kernel (the t-SNE / UMAP family's heavy tail), and the reconstruction term is
  averaged per feature so the two terms share a scale. Why: on the fresh vector sets DCSS lost to k-means where
  the autoencoder's ``u`` kept less cluster structure than the input, and t-SNE + k-means beat k-means on ~17 of
  37 of those sets (behind on ~10). Development sets (k-means on ``u`` after pretraining, seed 0, plain / with
  the term / k-means on the input): possums 0.68 / 1.00 / 0.58, ACSF1 0.26 / 0.62 / 0.43, olive 0.58 / 0.94 /
  0.77, ArrowHead 0.53 / 0.70 / 0.58, but hawks 0.91 / 0.67 / 0.92 and oils 0.90 / 0.72 / 0.90 (of 19 sets, 9
  ahead of k-means by 2 points or more, 8 behind; plain: 4 / 8). Made the default by a rule written before the run: on a fifth batch of fresh
  tables (cats, leafshape, hpc, spam7, rootstock, painters, two_class; seeds 0-2, median ACC, +-0.02 counts as
  level) it was ahead of k-means on 3, level on 3, behind on 1 (hpc, 0.35 against 0.54), against 2 / 3 / 2 for
  the previous default. On a sixth fresh batch (auto, college, salaries, parenting, bluejays, rohwer, cars93,
  stroke) both were ahead on 3, level on 5, behind on none: within noise of each other, so this is the rule's
  outcome, not a proven gain. Off for images (they have the NT-Xent term) and in the paper preset.
* In Phase 2 the encoder learns at a tenth of the head's learning rate, so the pairwise self-supervision refines
  the representation instead of re-drawing it (with the full rate, one seed in three lost 5 points of ACC).

* For images, three MNet heads train side by side in Phase 2 on the shared encoder, and the one with the lowest
  Phase-2 loss over the last epoch is kept (``num_heads=3``; label-free). Digits, 2 threads, seeds 0 / 1 / 2:
  0.963 / 0.955 / 0.952 ACC with three heads against 0.967 / 0.949 / 0.948 with one (median 0.955 vs 0.949): the
  heads start from different random weights and follow different self-training paths from the same Phase-1
  targets; the loss picks one that fits its own targets best. The extra heads cost ~15 % of the fit (the pairwise
  loss is a (B, B) x (B, K) product per head). Vectors keep one head (not measured there).

Epoch counts default to a step budget (pretraining 960 optimizer steps, Phase 1 80, Phase 2 1600, with floors),
so small data gets more epochs and large data fewer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Optional, Tuple, Union

__all__ = ["DCSSConfig", "PRESETS"]

PRESETS = ("default", "paper")


@dataclass
class DCSSConfig:
    """All DCSS settings. ``None`` means "from the preset" and is resolved by :meth:`resolved`.

    Attributes:
        n_clusters: K.
        preset: ``"default"`` (robust) or ``"paper"`` (published recipe).
        latent_dim: d, the width of ``u``.
        m: fuzzifier (paper 1.5; default preset 1.2).
        lam: weight of the centering term in Phase 1 (0.1).
        zeta, gamma: similar / dissimilar thresholds of the pairwise loss (0.8, 0.2).
        T1: epochs between center updates in Phase 1 (2).
        T2: Phase-2 epochs with u-space targets ``p p^T`` before switching to ``q q^T`` (5).
        T2_min_steps: the u-space stage lasts at least this many optimizer steps (more epochs than ``T2`` on small
            data; capped at half of Phase 2). The paper's 5 epochs on MNIST are ~1400 steps; 5 epochs of a
            300-row table are 10, too few for the head to learn the Phase-1 partition before its own ``q q^T``
            targets take over. ``None``: 400 for vectors under the default preset; 0 (``T2`` epochs exactly) for
            images (MNIST-5000: 0.765 with 0, 0.658 with 400) and under ``"paper"``.
        pretrain_epochs, phase1_epochs, phase2_epochs: epochs per phase; ``None`` picks them from a step budget.
        batch_size: samples per batch (256).
        lr: Adam learning rate for pretraining and Phase 2; Phase 1 uses ``lr * phase1_lr_factor``.
        autoencoder: ``"auto"`` (conv for images under the default preset, MLP otherwise), ``"mlp"`` or ``"conv"``.
        mlp_hidden_dims: encoder widths of the MLP autoencoder.
        mlp_linear_path: give the MLP autoencoder a linear map beside each MLP, started at PCA of the input
            (:class:`~dcss_plugin.autoencoders.MLPAutoencoder`), so that pretraining starts from the top-d
            principal axes and learns a non-linear correction. ``None``: off (an option, not a default: ahead
            of the plain MLP on wide development tables, level overall on fresh ones; see the module docstring).
        head_hidden_dims: MNet hidden widths (128, 128).
        augment: make augmented views (pretraining and Phase 2).
        neighbors: k of the nearest-neighbour positives in Phase 2 (0 turns them off).
        neighbor_space: where the neighbours are found: ``"u"`` (the latent space after Phase 1, re-mined every
            ``neighbor_refresh`` epochs) or ``"input"`` (the normalised input, found once: for vectors the
            standardised features; pixel distances are a poor similarity for images). Default ``"u"``. On
            development vectors ``"input"`` gained on 9 runs of 12 and lost on 3 (median +1.4 points of ACC, mean
            +0.2: one loss of 16 points on BasicMotions, where the raw series are a poor metric); README,
            "Held-out data".
        balance_weight: weight of the KL(mean q || uniform) guard in Phase 2 (0 turns it off).
        balance_prior: the sizes the guard pulls toward: ``"uniform"`` (equal) or ``"phase1"``: uniform during
            the u-space stage, then the head's own cluster proportions at the switch to ``q q^T`` (it has then
            learned the Phase-1 memberships; each at least 0.3/K; label-free).
        balance_tolerance: divergence from even sizes (nats) the guard lets pass: a number >= 0, or ``"phase1"``
            for the divergence of the Phase-1 partition's own cluster sizes (label-free). Default preset:
            ``"phase1"`` for vectors, 0 for images; paper: 0.
        exclude_self: drop i == j pairs from the pairwise loss.
        pair_reduction: reduction of the pairwise loss: ``"mean"`` (paper) or ``"balanced"`` (default preset).
        positive_loss: pull term on known positive pairs: ``"log"`` (``-log q_a.q_b``) or ``"linear"``.
        phase2_encoder_lr_factor: encoder learning rate in Phase 2, relative to ``lr``.
        neighbor_refresh: re-mine the u-space neighbours every this many Phase-2 epochs (0: mine once).
        num_heads: MNet heads trained side by side in Phase 2 on the shared encoder; the one with the lowest loss
            over the last epoch is kept (label-free). Default preset: 3 for images, 1 for vectors; paper: 1.
        contrastive_weight: weight of an NT-Xent term between two views' ``u`` in pretraining (0: off; default
            preset: 1 for images, 0 for vectors).
        neighbor_embedding_weight: weight of a neighbour-embedding term in pretraining
            (:func:`~dcss_plugin.functional.neighbor_embedding_loss`: each sample's ``u`` is pulled toward the
            ``u`` of one of its ``neighbor_embedding_k`` nearest neighbours in the normalised input and pushed
            from the rest of the batch, Cauchy kernel); when on, the reconstruction term is averaged over the
            features instead of summed, so the two terms are of one scale whatever F is. 0: off. Default preset:
            1 for vectors, 0 for images; paper: 0.
        neighbor_embedding_k: k of the input-space neighbour graph of that term.
        kmeans_init: ``"euclidean"`` (k-means on ``u``) or ``"cosine"`` (k-means on ``u / ||u||``, centers = the
            clusters' means of ``u``). ``None``: ``"cosine"`` when ``contrastive_weight > 0`` (the NT-Xent term
            shapes only directions), else ``"euclidean"`` (the paper).
        conv_channels: widths of the conv autoencoder's stages.
        seed: seeds every random choice (runs on CPU are reproducible).
    """

    n_clusters: int = 10
    preset: str = "default"
    latent_dim: int = 10
    m: Optional[float] = None
    lam: float = 0.1
    zeta: float = 0.8
    gamma: float = 0.2
    T1: int = 2
    T2: int = 5
    T2_min_steps: Optional[int] = None
    pretrain_epochs: Optional[int] = None
    phase1_epochs: Optional[int] = None
    phase2_epochs: Optional[int] = None
    batch_size: int = 256
    lr: float = 1e-3
    phase1_lr_factor: float = 0.1
    autoencoder: str = "auto"
    mlp_hidden_dims: Tuple[int, ...] = (500, 500, 2000)
    mlp_linear_path: Optional[bool] = None
    head_hidden_dims: Tuple[int, ...] = (128, 128)
    augment: Optional[bool] = None
    neighbors: Optional[int] = None
    balance_weight: Optional[float] = None
    balance_prior: Optional[str] = None
    balance_tolerance: Optional[Union[str, float]] = None
    exclude_self: Optional[bool] = None
    pair_reduction: Optional[str] = None
    positive_loss: str = "log"
    neighbor_refresh: Optional[int] = None
    neighbor_space: str = "u"
    num_heads: Optional[int] = None
    contrastive_weight: Optional[float] = None
    neighbor_embedding_weight: Optional[float] = None
    neighbor_embedding_k: int = 10
    kmeans_init: Optional[str] = None
    conv_channels: Tuple[int, ...] = (32, 64, 128)
    phase2_encoder_lr_factor: Optional[float] = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {self.preset!r}.")
        if int(self.n_clusters) < 2:
            raise ValueError(f"n_clusters (K) must be at least 2, got {self.n_clusters}.")
        if self.autoencoder not in ("auto", "mlp", "conv"):
            raise ValueError(f"autoencoder must be 'auto', 'mlp' or 'conv', got {self.autoencoder!r}.")
        if self.m is not None and not self.m > 1:
            raise ValueError(f"The fuzzifier m must be > 1, got {self.m}.")
        if not 0 <= self.gamma <= self.zeta <= 1:
            raise ValueError(f"Need 0 <= gamma <= zeta <= 1, got gamma={self.gamma}, zeta={self.zeta}.")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be at least 2 (pairs are formed within a batch), got {self.batch_size}.")
        if self.balance_prior not in (None, "uniform", "phase1"):
            raise ValueError(f"balance_prior must be 'uniform' or 'phase1', got {self.balance_prior!r}.")
        if self.num_heads is not None and int(self.num_heads) < 1:
            raise ValueError(f"num_heads must be at least 1, got {self.num_heads}.")
        if self.neighbor_space not in ("u", "input"):
            raise ValueError(f"neighbor_space must be 'u' or 'input', got {self.neighbor_space!r}.")
        if self.kmeans_init not in (None, "euclidean", "cosine"):
            raise ValueError(f"kmeans_init must be 'euclidean' or 'cosine', got {self.kmeans_init!r}.")
        tol = self.balance_tolerance
        if tol is not None and tol != "phase1" and (isinstance(tol, str) or not float(tol) >= 0):
            raise ValueError(f"balance_tolerance must be a number >= 0 or 'phase1', got {tol!r}.")
        if self.neighbor_embedding_weight is not None and not float(self.neighbor_embedding_weight) >= 0:
            raise ValueError(f"neighbor_embedding_weight must be >= 0, got {self.neighbor_embedding_weight}.")
        if int(self.neighbor_embedding_k) < 1:
            raise ValueError(f"neighbor_embedding_k must be at least 1, got {self.neighbor_embedding_k}.")
        if self.T2_min_steps is not None and self.T2_min_steps < 0:
            raise ValueError(f"T2_min_steps must be >= 0, got {self.T2_min_steps}.")
        if self.T1 < 1 or self.T2 < 0:
            raise ValueError(f"Need T1 >= 1 and T2 >= 0, got T1={self.T1}, T2={self.T2}.")
        self.mlp_hidden_dims = tuple(int(h) for h in self.mlp_hidden_dims)
        self.head_hidden_dims = tuple(int(h) for h in self.head_hidden_dims)
        self.conv_channels = tuple(int(h) for h in self.conv_channels)

    def resolved(self, images: bool = True) -> "DCSSConfig":
        """A copy with every preset-dependent ``None`` filled in.

        ``images``: whether the samples are images (N, C, H, W); the default preset's NT-Xent pretraining term is
        on for images and off for vectors, and its balance tolerance is 0 for images, the Phase-1 sizes' KL for
        vectors.
        """
        paper = self.preset == "paper"
        defaults: Dict[str, Any] = {
            "m": 1.5 if paper else 1.2,
            "augment": not paper,
            "neighbors": 0 if paper else 5,
            "T2_min_steps": 0 if (paper or images) else 400,
            "balance_weight": 0.0 if paper else 5.0,
            "balance_prior": "uniform",
            "balance_tolerance": 0.0 if (paper or images) else "phase1",
            "exclude_self": not paper,
            "pair_reduction": "mean" if paper else "balanced",
            "contrastive_weight": 0.0 if (paper or not images) else 1.0,
            "neighbor_refresh": 0 if paper else 50,
            "phase2_encoder_lr_factor": 1.0 if paper else 0.1,
            "num_heads": 1 if (paper or not images) else 3,
            "mlp_linear_path": False,
            "neighbor_embedding_weight": 0.0 if (paper or images) else 1.0,
        }
        values = asdict(self)
        for key, value in defaults.items():
            if values[key] is None:
                values[key] = value
        if values["kmeans_init"] is None:  # after contrastive_weight is known
            values["kmeans_init"] = "cosine" if values["contrastive_weight"] > 0 else "euclidean"
        return DCSSConfig(**values)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["mlp_hidden_dims"] = list(self.mlp_hidden_dims)
        d["head_hidden_dims"] = list(self.head_hidden_dims)
        d["conv_channels"] = list(self.conv_channels)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DCSSConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"Unknown DCSS config keys {sorted(unknown)}; the file was written by another version.")
        return cls(**d)
