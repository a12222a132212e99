"""
Quickstart: post-hoc LAM on digits
==================================

Train a small encoder with the contrastive likelihood on digits 0-5, fit a Laplace posterior
over its weights with ``laplace.Laplace(..., likelihood="contrastive")``, and use the posterior
to flag out-of-distribution inputs (digits 6-9 and uniform noise) with
:class:`laplace_metric.UncertaintyScorer`. Runs in well under a minute on a laptop CPU.
"""

# %%
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits

# Import laplace_metric before laplace: it registers the likelihoods and silences a
# FutureWarning (torch.jit.script) that laplace-torch's ASDL import raises on torch >= 2.10.
# isort: off
import laplace_metric  # noqa: F401
from laplace import Laplace

# isort: on
from laplace_metric import ContrastiveLikelihood, UncertaintyScorer
from laplace_metric.metrics import ood_auroc, recall_at_k

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
# Post-hoc Laplace over all weights, diagonal GGN from positive pairs.
la = Laplace(
    encoder,
    "contrastive",
    subset_of_weights="all",
    hessian_structure="diag",
    margin=1.0,
    hessian_method="positives",
)
la.fit(train_loader)
la.optimize_prior_precision(method="marglik")

# %%
# The uncertainty entry point: ``UncertaintyScorer`` draws 30 weight samples once; its default
# score, ``'posterior_knn'``, is the posterior-averaged distance to the nearest training
# embedding (queries and training set re-embedded under each sample; the training set's
# embeddings are cached). It is the score that wins in ``laplace-metric demo``. For
# comparison, the classic Laplace score: the trace of the linearised predictive covariance.
sets = {"test 0-5": x_test, "digits 6-9": x_ood, "noise": x_noise}
scorer = UncertaintyScorer(la, database=x_train, n_samples=30)
posterior_knn = {name: scorer(x) for name, x in sets.items()}
trace = {name: scorer(x, "trace") for name, x in sets.items()}

with torch.no_grad():  # the model holds the posterior mean
    emb_train = torch.nn.functional.normalize(la.model(x_train), dim=-1)
    emb_test = torch.nn.functional.normalize(la.model(x_test), dim=-1)
print(f"prior precision  {float(la.prior_precision):.3g}")
print(f"recall@1         {recall_at_k(emb_test, y_test, emb_train, y_train, k=1):.3f}")
print(f"{'OOD AUROC':<16} {'digits 6-9':>10} {'noise':>6}")
for name, scores in (("posterior kNN", posterior_knn), ("trace", trace)):
    digits_auroc = ood_auroc(scores["test 0-5"], scores["digits 6-9"])
    noise_auroc = ood_auroc(scores["test 0-5"], scores["noise"])
    print(f"{name:<16} {digits_auroc:>10.3f} {noise_auroc:>6.3f}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
for ax, (title, scores) in zip(axes, (("posterior kNN", posterior_knn), ("trace (log10)", trace))):
    for name, s in scores.items():
        values = s.log10() if title.startswith("trace") else s
        ax.hist(values.numpy(), bins=40, alpha=0.5, label=name, density=True)
    ax.set_xlabel(title)
axes[0].legend()
fig.tight_layout()
fig.savefig("quickstart_uncertainty.png")
print("wrote quickstart_uncertainty.png")
