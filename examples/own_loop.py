"""DCSS in your own PyTorch loop: your own conv autoencoder, the recipe from dcss_plugin's public pieces.

Trains on scikit-learn's digits (1797 images 8x8, pixels 0..16), prints ACC/NMI against the true digits, writes
``OUT/labels.npy`` and ``OUT/assigner.onnx`` (a full export: raw x -> q, label, confidence) and checks that
onnxruntime gives the loop's labels. The settings are those of the ``DCSS`` estimator's default preset for images;
what each is for:

* pretraining: a denoising autoencoder on random affine views plus NT-Xent between two views of each image
  (``PretrainLoss(contrastive_weight=1)``); NT-Xent shapes only the directions of u, hence k-means on u / ||u||.
* Phase 1: reconstruction + centering at a tenth of the rate (it moves u gently); every T1 epochs the centers
  are re-estimated in an eval-mode pass (BatchNorm's running statistics, no augmentation: the u inference sees).
* Phase 2: three MNet heads side by side, the encoder at a tenth of the heads' rate (it refines u instead of
  re-drawing it); targets p p^T for T2 epochs, then q q^T; each image paired with one of its 5 nearest
  neighbours in u (re-mined every 50 epochs); the balance guard keeps q q^T from collapsing into one cluster.
  The head with the lowest loss over the last epoch is kept.

Run:  python examples/own_loop.py --seed 0 --out runs/own_loop     (about a minute on two idle CPU cores)
"""

import argparse
import os
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from dcss_plugin import CenteringLoss, DCSSLoss, DCSSModel, Normalize, PretrainLoss, evaluate
from dcss_plugin.export.onnx import export_assigner
from dcss_plugin.export.runtime import OnnxClusterAssigner
from dcss_plugin.nets import RandomAffineBatch
from dcss_plugin.training import (AutoencoderForward, Batches, HeadSelector, NeighborPositives, Phase2Forward,
                                  Schedule, encode_all, init_centers, mine_neighbors, phase1_epoch, phase2_epoch,
                                  phase_optimizer, pretrain_epoch)

K, D, M, LAM, T1, T2, BATCH, LR = 10, 10, 1.2, 0.1, 2, 5, 256, 1e-3


def conv_block(c_in, c_out, transpose=False):
    conv = (nn.ConvTranspose2d(c_in, c_out, 3, 2, 1, output_padding=1) if transpose  # doubles H and W
            else nn.Conv2d(c_in, c_out, 3, 2, 1))                                     # halves H and W
    return [conv, nn.BatchNorm2d(c_out), nn.ReLU()]


def encoder():  # x (B, 1, 8, 8) -> 4x4 -> 2x2 -> 1x1 -> u (B, D)
    return nn.Sequential(*conv_block(1, 32), *conv_block(32, 64), *conv_block(64, 128), nn.Flatten(),
                         nn.Linear(128, D))


def decoder():  # u (B, D) -> 1x1 -> 2x2 -> 4x4 -> x_hat (B, 1, 8, 8)
    return nn.Sequential(nn.Linear(D, 128), nn.ReLU(), nn.Unflatten(1, (128, 1, 1)), *conv_block(128, 64, True),
                         *conv_block(64, 32, True), nn.ConvTranspose2d(32, 1, 3, 2, 1, output_padding=1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/own_loop")
    parser.add_argument("--epochs-scale", type=float, default=1.0, help="shorten every phase (tests)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)  # shuffling, views, neighbour draws

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8), raw 0..16
    model = DCSSModel(encoder(), K, D, decoder=decoder(), normalize=Normalize.fit(x), m=M, num_heads=3)
    xn = model.normalize(x)  # the training pieces take normalised batches; model(x) takes raw x
    batches = Batches(xn, BATCH, generator, augment=RandomAffineBatch())
    schedule = Schedule.for_data(len(x), BATCH, T1=T1, T2=T2)  # 960 / 80 / 1600 optimizer steps
    least = {"pretrain": 1, "phase1": T1, "phase2": schedule.u_stage + 1}  # a shortened run keeps every step
    epochs = {phase: max(least[phase], round(n * args.epochs_scale)) for phase, n in schedule.epochs().items()}
    autoencoder = AutoencoderForward(model.encoder, model.decoder)

    # 1. Pretraining: denoising reconstruction of two random views + NT-Xent between them.
    opt = phase_optimizer(model, "pretrain", LR)
    pretrain_loss = PretrainLoss(contrastive_weight=1.0)
    for _ in range(epochs["pretrain"]):
        pretrain_epoch(model, autoencoder, pretrain_loss, opt, batches)

    # 2. k-means on the directions of u (eval-mode pass) gives the initial centers.
    init_centers(model, xn, seed=args.seed, metric="cosine")

    # 3. Phase 1: reconstruction + lam * ||u - mu_k||^2 on the images themselves (no views); the centers are
    #    re-estimated every T1 epochs in an eval-mode pass.
    opt = phase_optimizer(model, "phase1", LR, phase1_lr_factor=0.1)
    centering_loss = CenteringLoss(m=M, lam=LAM, reduction="mean")
    for epoch in range(epochs["phase1"]):
        phase1_epoch(model, autoencoder, centering_loss, opt, batches, update=(epoch + 1) % T1 == 0)

    # 4. Phase 2: fresh heads, the encoder at 0.1 x lr, neighbour positives, balance guard, lowest-loss head.
    model.reset_heads(3)
    positives = NeighborPositives(k=5, refresh_every=50, knn=mine_neighbors(encode_all(model, xn), k=5))
    dcss_loss = DCSSLoss(zeta=0.8, gamma=0.2, u_stage_epochs=schedule.u_stage, reduction="balanced",
                         exclude_self=True, balance_weight=5.0, balance_tolerance=0.0)
    selector = HeadSelector(num_heads=3)
    opt = phase_optimizer(model, "phase2", LR, encoder_lr_factor=0.1)
    forward = Phase2Forward(model.encoder, model.heads)
    for epoch in range(epochs["phase2"]):
        dcss_loss.set_epoch(epoch)  # p p^T targets for the first T2 epochs, then q q^T
        if positives.due(epoch):
            positives.mine(encode_all(model, xn))
        phase2_epoch(model, forward, dcss_loss, opt, batches, positives, selector)
    model.select_head(selector.best())
    model.keep_selected_head()

    # 5. Labels, quality, export, and the exported assigner's labels against the model's.
    labels = model.predict(x).numpy().astype(np.int64)
    os.makedirs(args.out, exist_ok=True)
    np.save(os.path.join(args.out, "labels.npy"), labels)
    onnx_path = export_assigner(model, os.path.join(args.out, "assigner.onnx"), full=True, input_shape=(1, 8, 8),
                                check_data=x)
    same = bool(np.array_equal(OnnxClusterAssigner(onnx_path, provider="cpu")(x.numpy()).label, labels))
    scores = evaluate(digits.target, labels)  # ACC (Hungarian matching), NMI, ARI
    print(f"seed {args.seed}: ACC {scores['acc']:.4f}  NMI {scores['nmi']:.4f}  "
          f"({time.perf_counter() - t0:.0f} s, epochs {epochs})")
    print(f"ONNX labels equal the loop's labels: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
