"""DCSS as a PyTorch Lightning module: the recipe of examples/own_loop.py, one phase after another in one ``fit``.

The LightningModule owns a :class:`~dcss_plugin.DCSSModel` (the conv autoencoder of ``own_loop.py``) and the
public losses; ``training_step`` runs one batch of the current phase (by epoch: pretraining, Phase 1, Phase 2)
with that phase's optimizer (manual optimization: three Adams from ``phase_optimizer``), and the epoch hooks
do the eval-mode passes: k-means when Phase 1 starts, the T1 center updates, mining the neighbours, choosing
the head. Prints ACC/NMI, writes ``OUT/labels.npy`` and ``OUT/assigner.onnx`` (raw x -> q, label, confidence).

Run:  python examples/own_lightning.py --seed 0 --out runs/own_lightning     (about 1.5 minutes on two CPU cores)
"""

import argparse
import os
import time
import warnings

import numpy as np
import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader

from dcss_plugin import CenteringLoss, DCSSLoss, DCSSModel, Normalize, PretrainLoss, evaluate
from dcss_plugin.export.onnx import export_assigner
from dcss_plugin.export.runtime import OnnxClusterAssigner
from dcss_plugin.nets import RandomAffineBatch
from dcss_plugin.training import (AutoencoderForward, Batches, HeadSelector, NeighborPositives, Phase2Forward,
                                  Schedule, encode_all, init_centers, phase1_step, phase2_step, phase_optimizer,
                                  pretrain_step, update_centers)

K, D, M, LAM, T1, T2, BATCH, LR = 10, 10, 1.2, 0.1, 2, 5, 256, 1e-3
PHASES = ("pretrain", "phase1", "phase2")


def conv_block(c_in, c_out, transpose=False):  # the networks of own_loop.py
    conv = (nn.ConvTranspose2d(c_in, c_out, 3, 2, 1, output_padding=1) if transpose  # doubles H and W
            else nn.Conv2d(c_in, c_out, 3, 2, 1))                                     # halves H and W
    return [conv, nn.BatchNorm2d(c_out), nn.ReLU()]


def encoder():  # x (B, 1, 8, 8) -> 4x4 -> 2x2 -> 1x1 -> u (B, D)
    return nn.Sequential(*conv_block(1, 32), *conv_block(32, 64), *conv_block(64, 128), nn.Flatten(),
                         nn.Linear(128, D))


def decoder():  # u (B, D) -> 1x1 -> 2x2 -> 4x4 -> x_hat (B, 1, 8, 8)
    return nn.Sequential(nn.Linear(D, 128), nn.ReLU(), nn.Unflatten(1, (128, 1, 1)), *conv_block(128, 64, True),
                         *conv_block(64, 32, True), nn.ConvTranspose2d(32, 1, 3, 2, 1, output_padding=1))


class DCSSModule(pl.LightningModule):
    """Pretraining, Phase 1 and Phase 2 of DCSS on the normalised data ``xn`` (N, ...), by epoch."""

    def __init__(self, model: DCSSModel, xn: torch.Tensor, epochs: dict, u_stage: int, seed: int) -> None:
        super().__init__()
        self.automatic_optimization = False  # one optimizer per phase, stepped by hand
        self.model = model
        self.register_buffer("xn", xn, persistent=False)
        self.starts = {"phase1": epochs["pretrain"], "phase2": epochs["pretrain"] + epochs["phase1"]}
        self.seed = seed
        # the steps draw views and neighbours with this generator; the DataLoader gives the index batches
        self.batches = Batches(xn, BATCH, torch.Generator().manual_seed(seed), augment=RandomAffineBatch())
        self.autoencoder = AutoencoderForward(model.encoder, model.decoder)
        self.phase2_forward = Phase2Forward(model.encoder, model.heads)
        self.pretrain_loss = PretrainLoss(contrastive_weight=1.0)  # reconstruction of two views + NT-Xent
        self.centering_loss = CenteringLoss(m=M, lam=LAM, reduction="mean")
        self.dcss_loss = DCSSLoss(zeta=0.8, gamma=0.2, u_stage_epochs=u_stage, reduction="balanced",
                                  exclude_self=True, balance_weight=5.0, balance_tolerance=0.0)
        self.positives = NeighborPositives(k=5, refresh_every=50)
        self.selector = HeadSelector(len(model.heads))

    def phase(self) -> str:
        e = self.current_epoch
        return "pretrain" if e < self.starts["phase1"] else "phase1" if e < self.starts["phase2"] else "phase2"

    def configure_optimizers(self):
        return [phase_optimizer(self.model, "pretrain", LR),
                phase_optimizer(self.model, "phase1", LR, phase1_lr_factor=0.1),
                phase_optimizer(self.model, "phase2", LR, encoder_lr_factor=0.1)]  # encoder at 0.1 x lr

    def on_train_epoch_start(self) -> None:
        epoch2 = self.current_epoch - self.starts["phase2"]
        if self.current_epoch == self.starts["phase1"]:  # k-means on the directions of u (eval mode)
            init_centers(self.model, self.xn, seed=self.seed, metric="cosine")
        if epoch2 == 0 or (epoch2 > 0 and self.positives.due(epoch2)):  # neighbours in u (eval mode)
            self.positives.mine(encode_all(self.model, self.xn))
        if epoch2 >= 0:
            self.dcss_loss.set_epoch(epoch2)  # p p^T targets for the first T2 epochs, then q q^T
            self.selector.start_epoch()

    def training_step(self, idx: torch.Tensor, batch_idx: int) -> torch.Tensor:
        phase, model, batches = self.phase(), self.model, self.batches
        if phase == "pretrain":  # reconstruction of two random views + NT-Xent between them
            loss = pretrain_step(model, self.autoencoder, self.pretrain_loss, batches, idx)
        elif phase == "phase1":  # reconstruction + centering on the images themselves
            loss = phase1_step(model, self.autoencoder, self.centering_loss, batches, idx)
        else:  # each sample and one of its neighbours, both as random views: known positives; every head
            loss, per_head, _ = phase2_step(model, self.phase2_forward, self.dcss_loss, batches, idx, self.positives)
            for h, loss_h in enumerate(per_head):
                self.selector.add(h, loss_h.item(), len(idx))
        opt = self.optimizers()[PHASES.index(phase)]
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        self.log(f"{phase}_loss", loss, prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        epoch1 = self.current_epoch - self.starts["phase1"]
        if self.phase() == "phase1" and (epoch1 + 1) % T1 == 0:  # the paper's center update (eval mode)
            update_centers(self.model, self.xn)
        if self.phase() == "phase2":
            self.selector.end_epoch(len(self.xn))

    def on_train_end(self) -> None:
        self.model.select_head(self.selector.best())  # the head with the lowest loss over the last epoch
        self.model.keep_selected_head()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/own_lightning")
    parser.add_argument("--epochs-scale", type=float, default=1.0, help="shorten every phase (tests)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    pl.seed_everything(args.seed, verbose=False)

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8), raw 0..16
    model = DCSSModel(encoder(), K, D, decoder=decoder(), normalize=Normalize.fit(x), m=M, num_heads=3)
    schedule = Schedule.for_data(len(x), BATCH, T1=T1, T2=T2)  # 960 / 80 / 1600 optimizer steps
    least = {"pretrain": 1, "phase1": T1, "phase2": schedule.u_stage + 1}  # a shortened run keeps every step
    epochs = {phase: max(least[phase], round(n * args.epochs_scale)) for phase, n in schedule.epochs().items()}
    module = DCSSModule(model, model.normalize(x), epochs, schedule.u_stage, args.seed)
    loader = DataLoader(torch.arange(len(x)), batch_size=BATCH, shuffle=True,
                        generator=torch.Generator().manual_seed(args.seed))
    trainer = pl.Trainer(max_epochs=sum(epochs.values()), accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)

    labels = model.predict(x).numpy().astype(np.int64)
    os.makedirs(args.out, exist_ok=True)
    np.save(os.path.join(args.out, "labels.npy"), labels)
    onnx_path = export_assigner(model, os.path.join(args.out, "assigner.onnx"), full=True, input_shape=(1, 8, 8),
                                check_data=x)
    same = bool(np.array_equal(OnnxClusterAssigner(onnx_path, provider="cpu")(x.numpy()).label, labels))
    scores = evaluate(digits.target, labels)
    print(f"seed {args.seed}: ACC {scores['acc']:.4f}  NMI {scores['nmi']:.4f}  "
          f"({time.perf_counter() - t0:.0f} s, epochs {epochs})")
    print(f"ONNX labels equal the Lightning module's labels: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
