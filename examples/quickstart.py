"""
Quickstart: post-hoc LAM on digits
==================================

Train a small encoder with the contrastive likelihood on digits 0-5, fit a Laplace posterior
over its weights with ``laplace.Laplace(..., likelihood="contrastive")``, and use the predictive
covariance of the embedding to flag out-of-distribution inputs (digits 6-9 and uniform noise).
Runs in well under a minute on a laptop CPU.
"""

# %%
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from laplace import Laplace
from sklearn.datasets import load_digits
from torchmetrics.functional.classification import binary_auroc

import laplace_metric
from laplace_metric import ContrastiveLikelihood

torch.manual_seed(0)
digits = load_digits()
x_all = torch.tensor(digits.data / 16.0, dtype=torch.float32)
y_all = torch.tensor(digits.target)
in_dist = y_all < 6
perm = torch.randperm(int(in_dist.sum()))
x_id, y_id = x_all[in_dist][perm], y_all[in_dist][perm]
x_train, y_train, x_test, y_test = x_id[:700], y_id[:700], x_id[700:], y_id[700:]
x_ood = x_all[~in_dist]
x_noise = torch.rand(300, 64)
train_loader = torch.utils.data.DataLoader(
    torch.utils.data.TensorDataset(x_train, y_train), batch_size=64, shuffle=True
)

# %%
# Train the encoder with the same likelihood the Laplace approximation uses.
encoder = torch.nn.Sequential(
    torch.nn.Linear(64, 64),
    torch.nn.Tanh(),
    torch.nn.Linear(64, 64),
    torch.nn.Tanh(),
    torch.nn.Linear(64, 8),
)
likelihood = ContrastiveLikelihood(margin=1.0)
optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-3)
for _epoch in range(20):
    for xb, yb in train_loader:
        optimizer.zero_grad()
        likelihood.loss(encoder(xb), yb, reduction="mean").backward()
        optimizer.step()

# %%
# Post-hoc Laplace: last-layer, dense GGN from positive pairs.
la = Laplace(
    encoder,
    "contrastive",
    subset_of_weights="last_layer",
    hessian_structure="full",
    margin=1.0,
    hessian_method="positives",
)
la.fit(train_loader)
la.optimize_prior_precision(method="marglik")


def score(x):
    return la.predictive_uncertainty(x, score="trace")


with torch.no_grad():
    emb_train, emb_test = la(x_train)[0], la(x_test)[0]
nearest = torch.cdist(emb_test, emb_train).argmin(1)
recall_at_1 = (y_train[nearest] == y_test).float().mean()
s_id, s_ood, s_noise = score(x_test), score(x_ood), score(x_noise)


def auroc(s_in, s_out):
    target = torch.cat([torch.zeros_like(s_in), torch.ones_like(s_out)]).long()
    return float(binary_auroc(torch.cat([s_in, s_out]), target))


print(f"prior precision      {float(la.prior_precision):.3g}")
print(f"recall@1             {float(recall_at_1):.3f}")
print(f"OOD AUROC digits 6-9 {auroc(s_id, s_ood):.3f}")
print(f"OOD AUROC noise      {auroc(s_id, s_noise):.3f}")

# %%
fig, ax = plt.subplots(figsize=(5, 3))
for name, s in [("test 0-5", s_id), ("digits 6-9", s_ood), ("noise", s_noise)]:
    ax.hist(s.log10().numpy(), bins=40, alpha=0.5, label=name, density=True)
ax.set_xlabel("log10 trace of predictive covariance")
ax.legend()
fig.tight_layout()
fig.savefig("quickstart_uncertainty.png")
print("wrote quickstart_uncertainty.png")
assert laplace_metric.__version__
