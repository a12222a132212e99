"""
Pair mining with pytorch-metric-learning
========================================

By default the contrastive likelihood uses every pair of a batch. Any
`pytorch-metric-learning <https://kevinmusgrave.github.io/pytorch-metric-learning/>`_ miner can
choose the pairs instead, both in training (``ContrastiveLikelihood(miner=...)``) and in the
Laplace fit (``Laplace(..., miner=...)``). Pair miners return ``(a1, p, a2, n)``; triplet
miners return ``(a, p, n)``, which become the positive pairs ``(a, p)`` and the negative pairs
``(a, n)``.

Use the **same** miner for training and for the posterior: the curvature is then that of the
loss the encoder was trained on.
"""

# %%
# Data and a miner
# ----------------
# ``MultiSimilarityMiner`` keeps the hard pairs: positives less similar than the most similar
# negative, and negatives more similar than the least similar positive (up to ``epsilon``).
import matplotlib.pyplot as plt
import torch
from laplace import Laplace
from pytorch_metric_learning import miners
from torch.utils.data import DataLoader

from laplace_metric import ContrastiveLikelihood, UncertaintyScorer
from laplace_metric.data import digits_open_set
from laplace_metric.metrics import ood_auroc, recall_at_k

torch.manual_seed(0)
split = digits_open_set(seed=0)
x_train, y_train = split.train.tensors
x_test, y_test = split.test.tensors
x_digits = split.ood_classes.tensors[0]
x_noise = split.ood_noise.tensors[0][:300]

miner = miners.MultiSimilarityMiner(epsilon=0.1)


def make_encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 8),
    )


# %%
# Training with and without the miner
# -----------------------------------
# The likelihood mines each batch on the current (normalised) embeddings. We record how many
# pairs it keeps.
def train(likelihood: ContrastiveLikelihood, epochs: int = 15):
    encoder = make_encoder()
    optimizer = torch.optim.Adam(encoder.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    mined = []
    for _epoch in range(epochs):
        n_pos = n_neg = 0
        for xb, yb in DataLoader(split.train, batch_size=64, shuffle=True, generator=generator):
            optimizer.zero_grad()
            g = encoder(xb)
            pairs = likelihood.mine(likelihood.embed(g).detach(), yb)
            n_pos, n_neg = n_pos + pairs.n_positive, n_neg + pairs.n_negative
            likelihood.loss(g, yb, reduction="mean").backward()
            optimizer.step()
        mined.append((n_pos, n_neg))
    return encoder, mined


likelihoods = {
    "all pairs": ContrastiveLikelihood(margin=1.0),
    "MultiSimilarityMiner": ContrastiveLikelihood(margin=1.0, miner=miner),
}
encoders, mined = {}, {}
for name, lik in likelihoods.items():
    encoders[name], mined[name] = train(lik)
    pos, neg = mined[name][-1]
    print(f"{name:<22} last epoch: {pos} positive and {neg} negative pairs mined")

# %%
# Post-hoc Laplace with the same miner
# ------------------------------------
# ``miner=`` is forwarded to the likelihood the estimator builds; ``None`` (the default) means
# all pairs. A last-layer posterior with a dense covariance, prior precision by marginal
# likelihood.
print(
    f"{'training / fit pairs':<22} {'recall@1':>8} {'prior':>8} {'AUROC 6-9':>9} {'AUROC noise':>11}"
)
scores = {}
for name, encoder in encoders.items():
    la = Laplace(
        encoder,
        "contrastive",
        subset_of_weights="last_layer",
        hessian_structure="full",
        margin=1.0,
        miner=likelihoods[name].miner,
    )
    la.fit(DataLoader(split.train, batch_size=64))
    la.optimize_prior_precision(method="marglik")
    z_train, z_test = la(x_train)[0], la(x_test)[0]
    recall = recall_at_k(z_test, y_test, z_train, y_train, k=1)
    scorer = UncertaintyScorer(la, database=x_train)  # default score: posterior kNN distance
    s_in, s_dig, s_noise = scorer(x_test), scorer(x_digits), scorer(x_noise)
    scores[name] = (s_in, s_dig, s_noise)
    print(
        f"{name:<22} {recall:>8.3f} {float(la.prior_precision):>8.3g} "
        f"{ood_auroc(s_in, s_dig):>9.3f} {ood_auroc(s_in, s_noise):>11.3f}"
    )

# %%
# Mined pairs during training
# ---------------------------
# The miner keeps fewer pairs as the embedding improves, concentrating the loss (and the
# curvature) on the hard ones. pytorch-metric-learning pair miners return *ordered* pairs,
# listing a pair as both ``(i, j)`` and ``(j, i)``; laplace-metric keeps each unordered pair
# once, as the all-pairs default does, so pair counts and the likelihood's scale are comparable
# between a miner and the default.
fig, ax = plt.subplots(figsize=(6, 3))
for name, counts in mined.items():
    epochs = range(1, len(counts) + 1)
    ax.plot(epochs, [p for p, _ in counts], marker="o", label=f"{name}: positive")
    ax.plot(epochs, [n for _, n in counts], marker="x", ls="--", label=f"{name}: negative")
ax.set_yscale("log")
ax.set_xlabel("epoch")
ax.set_ylabel("pairs per epoch")
ax.legend(fontsize=7)
fig.tight_layout()

# %%
# Uncertainty of the three input sets
# -----------------------------------
fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
for ax, (name, (s_in, s_dig, s_noise)) in zip(axes, scores.items()):
    for label, values in [("test 0-5", s_in), ("digits 6-9", s_dig), ("noise", s_noise)]:
        ax.hist(values.numpy(), bins=30, alpha=0.5, density=True, label=label)
    ax.set_title(name)
    ax.set_xlabel("posterior kNN distance (UncertaintyScorer default)")
axes[0].set_ylabel("density")
axes[0].legend()
fig.tight_layout()
plt.show()
