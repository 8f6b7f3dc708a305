"""SimCLR (Lightly) + DCSS in a plain PyTorch loop on scikit-learn's digits; prints ACC/NMI beside k-means.

    backbone ──SimCLRProjectionHead──▶ z ──NTXentLoss(z0, z1)
       u     └─MNet head─────────────▶ q ──DCSSClusterLoss(q0, q1[, p0, p1])     cluster = argmax q

The backbone, the cluster centers and the MNet head live in one ``DCSSModel`` (which also holds the input scaling),
so the trained model is saved and exported like any other; the projection head serves training only.
``DCSSClusterLoss`` is the estimator's Phase-2 objective (``dcss_plugin.DCSSLoss``) with the two views of each
image as its known positive pair.

Run:  OMP_NUM_THREADS=1 python examples/lightly_plain_loop.py [--out DIR]   (about a minute on one CPU thread)
"""

import argparse
import os
import time

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits
from torch import nn

from dcss_plugin import DCSSModel, Normalize
from dcss_plugin.adapters.lightly import BatchSimCLRViews, DCSSClusterLoss
from dcss_plugin.metrics import evaluate
from dcss_plugin.training import init_centers

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", help="also save the trained model to DIR/model.pt (read by DCSSModel.load)")
args = parser.parse_args()

torch.set_num_threads(1)
torch.manual_seed(0)
gen = torch.Generator().manual_seed(0)
K, D, WARMUP_EPOCHS, JOINT_EPOCHS, T2, BATCH = 10, 32, 50, 30, 5, 256

digits = load_digits()
x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8), raw pixels 0..16

backbone = nn.Sequential(  # x -> u (B, D)
    nn.Conv2d(1, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
    nn.Conv2d(32, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.ReLU(),
    nn.Flatten(), nn.Linear(64 * 2 * 2, D),
)
model = DCSSModel(backbone, n_clusters=K, latent_dim=D, m=1.2,  # pixels / 16 -> [0, 1] inside the model
                  normalize=Normalize(torch.zeros(1, 1, 1), torch.full((1, 1, 1), 16.0)))
projection_head = SimCLRProjectionHead(input_dim=D, hidden_dim=128, output_dim=64)
ssl_loss, cluster_loss = NTXentLoss(temperature=0.5), DCSSClusterLoss(zeta=0.8, gamma=0.2)
views = BatchSimCLRViews()  # SimCLR's crop/rotation/jitter, one draw per image, whole batch at once
optimizer = torch.optim.Adam([*model.parameters(), *projection_head.parameters()], lr=1e-3)
xn = model.normalize(x)  # (1797, 1, 8, 8) in [0, 1]: what the views and the backbone take


def batches():
    perm = torch.randperm(len(xn), generator=gen)
    return [perm[i:i + BATCH] for i in range(0, len(xn) - BATCH + 1, BATCH)]  # drop the short last batch


t0 = time.perf_counter()
for epoch in range(WARMUP_EPOCHS + JOINT_EPOCHS):
    joint = epoch >= WARMUP_EPOCHS
    if epoch == WARMUP_EPOCHS:  # k-means on u (eval mode) gives the centers for the u-space targets p
        init_centers(model, xn, seed=0)
    model.train(), projection_head.train()
    total = 0.0
    for idx in batches():
        b = len(idx)
        u = model.encoder(torch.cat([views(xn[idx], gen), views(xn[idx], gen)]))  # two views, one pass
        z = projection_head(u)
        loss = ssl_loss(z[:b], z[b:])
        if joint:
            q = model.head(u)
            p = model.centers(u.detach()) if epoch - WARMUP_EPOCHS < T2 else None  # first T2 epochs: s = p pᵀ
            loss = loss + cluster_loss(q[:b], q[b:], *((p[:b], p[b:]) if p is not None else ()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item() * b
    if epoch % 10 == 9:
        stage = "SimCLR + DCSS" if joint else "SimCLR"
        print(f"epoch {epoch + 1:3d} ({stage}): loss {total / (len(x) // BATCH * BATCH):.3f}")

labels = model.predict(x).numpy()  # raw pixels in, argmax q out (eval mode)
ours = evaluate(digits.target, labels)
raw = evaluate(digits.target, KMeans(K, n_init=10, random_state=0).fit_predict(digits.data))
print(f"trained in {time.perf_counter() - t0:.0f} s")
print(f"SimCLR + DCSS (argmax q):  ACC {ours['acc']:.3f}  NMI {ours['nmi']:.3f}")
print(f"k-means on raw pixels:     ACC {raw['acc']:.3f}  NMI {raw['nmi']:.3f}")
if args.out:
    os.makedirs(args.out, exist_ok=True)
    model.save(os.path.join(args.out, "model.pt"))  # DCSSModel.load(path, encoder=<same backbone>) reads it back
    print(f"saved {args.out}/model.pt")
