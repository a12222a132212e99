"""
Learned Bregman divergence with a Laplace posterior
===================================================

Train a small encoder on the handwritten digits 0-5 together with a learned Bregman divergence
``D_phi(x, y) = phi(x) - phi(y) - <grad phi(y), x - y>``, where ``phi`` is an input-convex
neural network plus ``alpha/2 ||x||^2``. Then fit a last-layer Laplace posterior with the
matching ``'bregman'`` likelihood (``phi`` held fixed) and use the default score of
:class:`laplace_metric.UncertaintyScorer` (the posterior-averaged distance to the nearest
training embedding) to tell the unseen digits 6-9 from held-out digits 0-5; the trace of the
linearised predictive covariance is printed beside it.
"""

# %%
# Data: digits 0-5 are in-distribution, 6-9 are out-of-distribution
import laplace
import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.classification import binary_auroc

import laplace_metric  # noqa: F401  (adds likelihood='bregman' to laplace.Laplace)
from laplace_metric import UncertaintyScorer
from laplace_metric.bregman import BregmanDivergence, ICNNPotential, bregman_knn
from laplace_metric.bregman.losses import fit_bregman

torch.manual_seed(0)
torch.set_num_threads(1)  # tiny models: one thread avoids oversubscription on shared CPUs
x, y = load_digits(return_X_y=True)
x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
ind = y < 6
x_train, x_test, y_train, y_test = train_test_split(
    x[ind], y[ind], test_size=0.3, stratify=y[ind], random_state=0
)
x_ood = x[~ind]
loader = DataLoader(TensorDataset(x_train, y_train), batch_size=64, shuffle=True)

# %%
# Train the encoder and the convex potential jointly
# ---------------------------------------------------
# The contrastive loss on ``D_phi`` is exactly the negative log-likelihood the Laplace step uses.
encoder = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 16))
divergence = BregmanDivergence(ICNNPotential(16, hidden=(64, 64), alpha=0.5))
history = fit_bregman(
    encoder, divergence, loader, epochs=20, lr=1e-3, margin=1.0, progress_bar=False
)


def embed(inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return nn.functional.normalize(encoder(inputs), dim=1)


z_train, z_test, z_ood = embed(x_train), embed(x_test), embed(x_ood)
# Retrieval ranks training items y for a query x by D(x, y).
_, neighbours = bregman_knn(z_test, z_train, 1, divergence)
recall_at_1 = float((y_train[neighbours[:, 0]] == y_test).float().mean())
print(f"recall@1 (Bregman kNN): {recall_at_1:.3f}")

# %%
# Last-layer Laplace posterior with the Bregman likelihood
# --------------------------------------------------------
la = laplace.Laplace(
    encoder,
    likelihood="bregman",
    divergence=divergence,
    subset_of_weights="last_layer",
    hessian_structure="kron",
    margin=1.0,
)
la.fit(loader)
la.optimize_prior_precision(method="marglik")
scorer = UncertaintyScorer(la, database=x_train)
u_test, u_ood = scorer(x_test), scorer(x_ood)
scores = torch.cat([u_test, u_ood])
target = torch.cat([torch.zeros(len(u_test)), torch.ones(len(u_ood))]).long()
trace = torch.cat([scorer(x_test, "trace"), scorer(x_ood, "trace")])
print(f"OOD AUROC (posterior kNN, the default): {float(binary_auroc(scores, target)):.3f}")
print(f"OOD AUROC (trace of predictive covariance): {float(binary_auroc(trace, target)):.3f}")

# %%
# Plot: embeddings (first two principal components) and the uncertainty scores
z_all = torch.cat([z_test, z_ood])
z_centred = z_all - z_all.mean(0)
_, _, v = torch.linalg.svd(z_centred, full_matrices=False)
pcs = z_centred @ v[:2].T

fig, (ax_emb, ax_hist, ax_loss) = plt.subplots(1, 3, figsize=(14, 4))
n_test = len(z_test)
ax_emb.scatter(pcs[:n_test, 0], pcs[:n_test, 1], c=y_test, cmap="tab10", s=10, vmin=0, vmax=9)
ax_emb.scatter(pcs[n_test:, 0], pcs[n_test:, 1], c="k", marker="x", s=8, alpha=0.4)
ax_emb.set_title("test embeddings (colour: digit 0-5, x: OOD 6-9)")
bins = torch.linspace(float(scores.min()), float(scores.max()), 40)
ax_hist.hist(u_test, bins=bins, alpha=0.6, density=True, label="digits 0-5 (test)")
ax_hist.hist(u_ood, bins=bins, alpha=0.6, density=True, label="digits 6-9 (OOD)")
ax_hist.set_xlabel("posterior kNN distance")
ax_hist.legend()
ax_loss.plot(history)
ax_loss.set_xlabel("epoch")
ax_loss.set_ylabel("mean contrastive Bregman loss")
fig.tight_layout()
plt.show()
