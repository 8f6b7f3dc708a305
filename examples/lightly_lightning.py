"""SimCLR (Lightly) + DCSS as a PyTorch Lightning module on scikit-learn's digits; prints ACC/NMI beside k-means.

The same model as examples/lightly_plain_loop.py, in the module style of Lightly's own examples: a backbone with
Lightly's SimCLR projection head and NT-Xent loss, and DCSS's cluster head (``DCSSClusterHead``, the paper's MNet)
and loss (``DCSSClusterLoss``: the estimator's Phase-2 objective ``dcss_plugin.DCSSLoss``, the two views of each image
being its known positive pair) beside them. Both losses gather across GPUs with ``gather_distributed=True`` (a no-op
on one process), so ``Trainer(accelerator="gpu", devices=4, strategy="ddp")`` forms pairs over the global batch.
At the end the trained backbone, centers and head are placed into one ``dcss_plugin.DCSSModel``, the object that is
saved, loaded and exported (``--out DIR`` writes ``DIR/model.pt``).

Run:  OMP_NUM_THREADS=1 python examples/lightly_lightning.py [--out DIR]   (about a minute on one CPU thread)
"""

import argparse
import os
import time

import pytorch_lightning as pl
import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dcss_plugin import ClusterCenters, DCSSModel, Normalize
from dcss_plugin.adapters.lightly import BatchSimCLRViews, DCSSClusterHead, DCSSClusterLoss
from dcss_plugin.metrics import evaluate


class SimCLRDCSS(pl.LightningModule):
    def __init__(self, x_all: torch.Tensor, num_clusters: int = 10, dim: int = 32, warmup_epochs: int = 50,
                 T2: int = 5, lr: float = 1e-3) -> None:
        super().__init__()
        self.x_all, self.warmup_epochs, self.T2, self.lr = x_all, warmup_epochs, T2, lr
        self.backbone = nn.Sequential(
            nn.Conv2d(1, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * 2 * 2, dim),
        )
        self.projection_head = SimCLRProjectionHead(input_dim=dim, hidden_dim=128, output_dim=64)
        self.cluster_head = DCSSClusterHead(input_dim=dim, num_clusters=num_clusters)
        self.ssl_loss = NTXentLoss(temperature=0.5, gather_distributed=True)
        self.cluster_loss = DCSSClusterLoss(zeta=0.8, gamma=0.2, gather_distributed=True)
        self.centers = ClusterCenters(num_clusters, dim, m=1.2)
        self.views = BatchSimCLRViews()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cluster_head(self.backbone(x))  # q

    @torch.no_grad()
    def embed(self) -> torch.Tensor:
        was_training = self.backbone.training
        self.backbone.eval()
        u = self.backbone(self.x_all.to(self.device))
        self.backbone.train(was_training)
        return u

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == self.warmup_epochs:  # k-means on u: centers for the u-space targets p
            self.centers.init_kmeans(self.embed(), seed=0)  # rank 0 computes, all ranks receive

    def training_step(self, batch, batch_idx):
        (x,) = batch
        b = len(x)
        u = self.backbone(torch.cat([self.views(x), self.views(x)]))
        z = self.projection_head(u)
        loss = ssl = self.ssl_loss(z[:b], z[b:])
        joint_epoch = self.current_epoch - self.warmup_epochs
        if joint_epoch >= 0:
            q = self.cluster_head(u)
            p = self.centers(u.detach()) if joint_epoch < self.T2 else None  # first T2 epochs: s = p pᵀ
            loss = loss + self.cluster_loss(q[:b], q[b:], *((p[:b], p[b:]) if p is not None else ()))
        self.log_dict({"loss": loss, "ssl_loss": ssl}, on_epoch=True, on_step=False, batch_size=b)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also save the trained model to DIR/model.pt (read by DCSSModel.load)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    digits = load_digits()
    x = torch.as_tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8) in [0, 1]
    loader = DataLoader(TensorDataset(x), batch_size=256, shuffle=True, drop_last=True)
    model = SimCLRDCSS(x, num_clusters=10, warmup_epochs=50)
    trainer = pl.Trainer(max_epochs=80, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    t0 = time.perf_counter()
    trainer.fit(model, loader)
    model.eval()
    with torch.no_grad():
        labels = model(x).argmax(1).numpy()
    ours = evaluate(digits.target, labels)
    raw = evaluate(digits.target, KMeans(10, n_init=10, random_state=0).fit_predict(digits.data))
    print(f"trained in {time.perf_counter() - t0:.0f} s, final loss {trainer.callback_metrics['loss']:.3f}")
    print(f"SimCLR + DCSS (argmax q):  ACC {ours['acc']:.3f}  NMI {ours['nmi']:.3f}")
    print(f"k-means on raw pixels:     ACC {raw['acc']:.3f}  NMI {raw['nmi']:.3f}")
    # the trained pieces as one DCSSModel (x / 16 -> backbone -> head): what is saved, loaded and exported
    dcss = DCSSModel(model.backbone, n_clusters=10, latent_dim=32, m=1.2,
                     normalize=Normalize(torch.zeros(1, 1, 1), torch.full((1, 1, 1), 16.0)))
    dcss.centers.load_state_dict(model.centers.state_dict())
    dcss.head.load_state_dict(model.cluster_head.state_dict())  # a DCSSClusterHead is a DCSSHead: same keys
    assert (dcss.predict(x * 16.0).numpy() == labels).all()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        dcss.save(os.path.join(args.out, "model.pt"))  # DCSSModel.load(path, encoder=<same backbone>) reads it
        print(f"saved {args.out}/model.pt")
