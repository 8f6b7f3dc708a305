"""SimCLR (Lightly) + DCSS in a plain PyTorch loop on scikit-learn's digits; prints ACC/NMI beside k-means.

    backbone ──SimCLRProjectionHead──▶ z ──NTXentLoss(z0, z1)
       u     └─DCSSClusterHead──────▶ q ──DCSSClusterLoss(q0, q1[, p0, p1])     cluster = argmax q

Run:  OMP_NUM_THREADS=1 python examples/lightly_plain_loop.py   (about a minute on one CPU thread)
"""

import time

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits
from torch import nn

from dcss_plugin import ClusterCenters
from dcss_plugin.adapters.lightly import BatchSimCLRViews, DCSSClusterHead, DCSSClusterLoss
from dcss_plugin.metrics import evaluate

torch.set_num_threads(1)
torch.manual_seed(0)
gen = torch.Generator().manual_seed(0)
K, D, WARMUP_EPOCHS, JOINT_EPOCHS, T2, BATCH = 10, 32, 50, 30, 5, 256

digits = load_digits()
x = torch.as_tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8) in [0, 1]

backbone = nn.Sequential(  # x -> u (B, D)
    nn.Conv2d(1, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
    nn.Conv2d(32, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.ReLU(),
    nn.Flatten(), nn.Linear(64 * 2 * 2, D),
)
projection_head = SimCLRProjectionHead(input_dim=D, hidden_dim=128, output_dim=64)
cluster_head = DCSSClusterHead(input_dim=D, num_clusters=K)
ssl_loss, cluster_loss = NTXentLoss(temperature=0.5), DCSSClusterLoss(zeta=0.8, gamma=0.2)
views = BatchSimCLRViews()  # SimCLR's crop/rotation/jitter, one draw per image, whole batch at once
params = [*backbone.parameters(), *projection_head.parameters(), *cluster_head.parameters()]
optimizer = torch.optim.Adam(params, lr=1e-3)


def batches():
    perm = torch.randperm(len(x), generator=gen)
    return [perm[i:i + BATCH] for i in range(0, len(x) - BATCH + 1, BATCH)]  # drop the short last batch


@torch.no_grad()
def embed():
    backbone.eval()
    return backbone(x)


t0 = time.perf_counter()
centers = ClusterCenters(K, D, m=1.2)
for epoch in range(WARMUP_EPOCHS + JOINT_EPOCHS):
    joint = epoch >= WARMUP_EPOCHS
    if epoch == WARMUP_EPOCHS:  # k-means on u gives the centers for the u-space targets p
        centers.init_kmeans(embed(), seed=0)
    backbone.train(), projection_head.train(), cluster_head.train()
    total = 0.0
    for idx in batches():
        b = len(idx)
        u = backbone(torch.cat([views(x[idx], gen), views(x[idx], gen)]))  # two views, one pass
        z = projection_head(u)
        loss = ssl_loss(z[:b], z[b:])
        if joint:
            q = cluster_head(u)
            p = centers(u.detach()) if epoch - WARMUP_EPOCHS < T2 else None  # first T2 epochs: s = p pᵀ
            loss = loss + cluster_loss(q[:b], q[b:], *((p[:b], p[b:]) if p is not None else ()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item() * b
    if epoch % 10 == 9:
        stage = "SimCLR + DCSS" if joint else "SimCLR"
        print(f"epoch {epoch + 1:3d} ({stage}): loss {total / (len(x) // BATCH * BATCH):.3f}")

cluster_head.eval()
with torch.no_grad():
    labels = cluster_head(embed()).argmax(1).numpy()
ours = evaluate(digits.target, labels)
raw = evaluate(digits.target, KMeans(K, n_init=10, random_state=0).fit_predict(digits.data))
print(f"trained in {time.perf_counter() - t0:.0f} s")
print(f"SimCLR + DCSS (argmax q):  ACC {ours['acc']:.3f}  NMI {ours['nmi']:.3f}")
print(f"k-means on raw pixels:     ACC {raw['acc']:.3f}  NMI {raw['nmi']:.3f}")
