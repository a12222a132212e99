"""Uncertainty baselines for metric learning (BRIEF section 6) and a small training helper.

Every baseline follows the same two-step use: ``fit(x_train, y_train)`` once, then
``score(x)`` gives one OOD score per input (higher = more OOD). Baselines that also retrieve
have ``embed(x)``, the point embedding to use for recall@k.

* :class:`KNNDistanceBaseline`: distance to the k-th nearest training embedding of one
  deterministic encoder.
* :class:`MahalanobisBaseline`: class-conditional Gaussians with a shared covariance on
  penultimate features; score = smallest Mahalanobis distance to a class mean.
* :class:`MCDropoutBaseline`: dropout kept active at test time; score from the spread of the
  normalised embedding samples.
* :class:`DeepEnsembleBaseline`: encoders trained from different seeds; score = mean over
  members of the kNN distance (rotation-invariant).
* :class:`PFEBaseline`: probabilistic face embeddings, a variance head on a frozen encoder
  trained with the mutual likelihood score; score = harmonic mean of the variances.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from laplace_metric.enums import UncertaintyScore, parse_enum
from laplace_metric.likelihoods import ContrastiveLikelihood
from laplace_metric.metrics import knn_distance_score

__all__ = [
    "DeepEnsembleBaseline",
    "EnsembleScore",
    "KNNDistanceBaseline",
    "MCDropoutBaseline",
    "MahalanobisBaseline",
    "OODBaseline",
    "PFEBaseline",
    "embed",
    "penultimate",
    "train_encoder",
]

LossFn = Callable[[Tensor, Tensor], Tensor]

_DROPOUT_TYPES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


# ---------------------------------------------------------------------------- training
def _contrastive_loss(g: Tensor, labels: Tensor, margin: float = 1.0) -> Tensor:
    """Mean contrastive loss over all in-batch pairs (the package's :class:`ContrastiveLikelihood`)."""
    return ContrastiveLikelihood(margin=margin).loss(g, labels, reduction="mean")


def _module_device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def train_encoder(
    encoder: nn.Module,
    loader: DataLoader,
    loss_fn: LossFn | None = None,
    epochs: int = 30,
    lr: float = 1e-3,
    seed: int = 0,
    progress_bar: bool = True,
) -> list[float]:
    """Train an encoder in place with Adam on a metric-learning loss.

    Parameters
    ----------
    encoder : nn.Module
        Maps inputs ``(B, ...)`` to raw embeddings ``(B, D)``.
    loader : DataLoader
        Yields ``(x, labels)`` batches.
    loss_fn : callable, optional
        ``loss_fn(embeddings, labels) -> scalar``; default: contrastive loss with margin 1 on
        the squared distance of L2-normalised embeddings, averaged over all in-batch pairs.
    epochs : int, default=30
    lr : float, default=1e-3
    seed : int, default=0
        Seeds the global torch RNG (data order, dropout) before training.
    progress_bar : bool, default=True
        Show a tqdm bar over epochs with the running loss.

    Returns
    -------
    losses : list of float
        Mean batch loss of every epoch. The encoder is left in ``eval`` mode.
    """
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}.")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}.")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}.")
    if len(loader) == 0:
        raise ValueError("The loader yields no batches.")
    loss_fn = _contrastive_loss if loss_fn is None else loss_fn
    torch.manual_seed(seed)
    device = _module_device(encoder)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=lr)
    encoder.train()
    history: list[float] = []
    bar = tqdm(range(epochs), desc="train", disable=not progress_bar, leave=False)
    for _ in bar:
        total, batches = 0.0, 0
        for x, labels in loader:
            x, labels = x.to(device), labels.to(device)
            loss = loss_fn(encoder(x), labels)
            if not torch.isfinite(loss):
                raise ValueError(
                    "The training loss became NaN or inf; check the inputs, loss_fn and lr."
                )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        history.append(total / batches)
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    encoder.eval()
    return history


@torch.no_grad()
def embed(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    normalize: bool = True,
    batch_size: int = 1024,
) -> Tensor:
    """Apply an encoder (or feature function) in batches without gradients.

    Parameters
    ----------
    fn : nn.Module or callable
        Maps ``(B, ...)`` to ``(B, D)``. An ``nn.Module`` is run in its *current* mode; its
        device is used for the batches.
    x : Tensor
        Inputs ``(N, ...)``.
    normalize : bool, default=True
        L2-normalise the outputs.
    batch_size : int, default=1024

    Returns
    -------
    out : Tensor
        ``(N, D)`` on the device of ``x``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}.")
    if x.shape[0] == 0:
        raise ValueError("x is empty.")
    device = _module_device(fn) if isinstance(fn, nn.Module) else x.device
    outs = []
    for start in range(0, x.shape[0], batch_size):
        out = fn(x[start : start + batch_size].to(device))
        if not isinstance(out, Tensor) or out.ndim != 2:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"The encoder must return (batch, D) tensors, got {got}.")
        outs.append(F.normalize(out, dim=-1) if normalize else out)
    out = torch.cat(outs).to(x.device)
    if not bool(torch.isfinite(out).all()):
        raise ValueError("The encoder returned NaN or inf values.")
    return out


def _eval_embed(module: nn.Module, x: Tensor, normalize: bool, batch_size: int) -> Tensor:
    was_training = module.training
    module.eval()
    try:
        return embed(module, x, normalize, batch_size)
    finally:
        module.train(was_training)


def penultimate(encoder: nn.Sequential) -> nn.Sequential:
    """The encoder minus its last layer (penultimate features of an ``nn.Sequential``).

    Parameters
    ----------
    encoder : nn.Sequential

    Returns
    -------
    features : nn.Sequential
        Shares its modules (and weights) with ``encoder``.
    """
    if not isinstance(encoder, nn.Sequential) or len(encoder) < 2:
        raise TypeError(
            "penultimate() needs an nn.Sequential with at least two layers; "
            "pass an explicit feature_fn for other architectures."
        )
    return encoder[:-1]


# ---------------------------------------------------------------------------- interface
class OODBaseline(ABC):
    """An OOD scorer: ``fit`` on training data once, then ``score`` (higher = more OOD)."""

    @abstractmethod
    def fit(self, x_train: Tensor, y_train: Tensor | None = None) -> OODBaseline:
        """Fit on training inputs ``(N, ...)`` and labels ``(N,)``; returns ``self``."""

    @abstractmethod
    def score(self, x: Tensor) -> Tensor:
        """OOD score ``(n,)`` of inputs ``x``; higher = more OOD."""

    def _require_fit(self, attr: str) -> None:
        if getattr(self, attr, None) is None:
            raise RuntimeError(f"Call {type(self).__name__}.fit(x_train, y_train) first.")


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}.")
    return k


class KNNDistanceBaseline(OODBaseline):
    """Deterministic encoder; score = distance to the k-th nearest training embedding.

    ``s(x) = ||z(x) - z_train_(k)||`` on (by default L2-normalised) embeddings.

    Parameters
    ----------
    encoder : nn.Module
        Trained encoder ``(B, ...) -> (B, D)``.
    k : int, default=1
    normalize : bool, default=True
    batch_size : int, default=1024
    """

    def __init__(
        self, encoder: nn.Module, k: int = 1, normalize: bool = True, batch_size: int = 1024
    ) -> None:
        self.encoder = encoder
        self.k = _check_k(k)
        self.normalize = normalize
        self.batch_size = batch_size
        self.train_emb: Tensor | None = None

    def embed(self, x: Tensor) -> Tensor:
        """Point embeddings ``(n, D)`` for retrieval."""
        return _eval_embed(self.encoder, x, self.normalize, self.batch_size)

    def fit(self, x_train: Tensor, y_train: Tensor | None = None) -> KNNDistanceBaseline:
        """Store the training embeddings; ``y_train`` is not used."""
        self.train_emb = self.embed(x_train)
        if self.train_emb.shape[0] < self.k:
            raise ValueError(f"k={self.k} exceeds the {self.train_emb.shape[0]} training inputs.")
        return self

    def score(self, x: Tensor) -> Tensor:
        """Distance to the k-th nearest training embedding, ``(n,)``."""
        self._require_fit("train_emb")
        return knn_distance_score(self.embed(x), self.train_emb, self.k)


class MahalanobisBaseline(OODBaseline):
    """Class-conditional Gaussians with a shared covariance on features (Lee et al., 2018).

    ``mu_c = mean of class c``, ``Sigma = 1/N sum_i (f_i - mu_{y_i})(f_i - mu_{y_i})^T + eps I``
    with ``eps = ridge * tr(Sigma) / P``; score ``s(x) = min_c (f(x) - mu_c)^T Sigma^{-1}
    (f(x) - mu_c)`` (the squared distance; the square root ranks identically).

    Parameters
    ----------
    feature_fn : nn.Module or callable
        Feature map ``(B, ...) -> (B, P)``, e.g. ``penultimate(encoder)``.
    ridge : float, default=1e-6
        Relative ridge added to the covariance for invertibility.
    batch_size : int, default=1024
    """

    def __init__(
        self,
        feature_fn: nn.Module | Callable[[Tensor], Tensor],
        ridge: float = 1e-6,
        batch_size: int = 1024,
    ) -> None:
        if not callable(feature_fn):
            raise TypeError(f"feature_fn must be callable, got {type(feature_fn).__name__}.")
        if not ridge >= 0:
            raise ValueError(f"ridge must be non-negative, got {ridge}.")
        self.feature_fn = feature_fn
        self.ridge = float(ridge)
        self.batch_size = batch_size
        self.classes: Tensor | None = None
        self.means: Tensor | None = None
        self.precision: Tensor | None = None

    def features(self, x: Tensor) -> Tensor:
        """Features ``(n, P)`` in float64."""
        if isinstance(self.feature_fn, nn.Module):
            out = _eval_embed(self.feature_fn, x, False, self.batch_size)
        else:
            out = embed(self.feature_fn, x, False, self.batch_size)
        return out.double()

    def fit(self, x_train: Tensor, y_train: Tensor | None = None) -> MahalanobisBaseline:
        """Estimate the class means and the shared covariance."""
        if y_train is None:
            raise ValueError("MahalanobisBaseline.fit needs the class labels y_train.")
        feats = self.features(x_train)
        y_train = y_train.to(feats.device)
        if y_train.shape != (feats.shape[0],):
            raise ValueError(
                f"y_train must have shape ({feats.shape[0]},), got {tuple(y_train.shape)}."
            )
        self.classes = torch.unique(y_train)
        if len(self.classes) < 1:
            raise ValueError("y_train is empty.")
        self.means = torch.stack([feats[y_train == c].mean(0) for c in self.classes])
        centred = feats - self.means[torch.searchsorted(self.classes, y_train)]
        cov = centred.T @ centred / feats.shape[0]
        eps = self.ridge * cov.diagonal().mean().clamp(min=torch.finfo(cov.dtype).tiny)
        cov = cov + eps * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        self.precision = torch.linalg.inv(cov)
        return self

    def distances(self, x: Tensor) -> Tensor:
        """Squared Mahalanobis distances to every class mean, ``(n, C)``."""
        self._require_fit("precision")
        diff = self.features(x)[:, None, :] - self.means[None, :, :]
        return torch.einsum("ncp,pq,ncq->nc", diff, self.precision, diff)

    def score(self, x: Tensor) -> Tensor:
        """Smallest squared Mahalanobis distance to a class mean, ``(n,)``."""
        return self.distances(x).min(dim=1).values.float()

    def predict(self, x: Tensor) -> Tensor:
        """Class of the nearest mean, ``(n,)``."""
        return self.classes[self.distances(x).argmin(dim=1)]


def _covariance_score(samples: Tensor, kind: UncertaintyScore) -> Tensor:
    """Scalar spread of samples ``(S, n, D)`` per input: trace, sum of stds or log-det."""
    if kind == UncertaintyScore.TRACE:
        return samples.var(dim=0).sum(-1)
    if kind == UncertaintyScore.STD_SUM:
        return samples.std(dim=0).sum(-1)
    centred = samples - samples.mean(0, keepdim=True)
    cov = torch.einsum("snd,sne->nde", centred, centred) / (samples.shape[0] - 1)
    jitter = 1e-6 * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    return torch.logdet(cov + jitter)


class MCDropoutBaseline(OODBaseline):
    """Monte Carlo dropout (Gal & Ghahramani, 2016): dropout stays active at test time.

    With ``S`` stochastic forward passes ``z^s(x)`` (L2-normalised), the score is the trace of
    their sample covariance ``sum_d Var_s[z_d^s]`` (default), the sum of per-dimension standard
    deviations, or the log-determinant. The retrieval embedding is the normalised sample mean.

    Parameters
    ----------
    encoder : nn.Module
        Trained encoder containing dropout layers.
    n_samples : int, default=30
    score : {'trace', 'std_sum', 'logdet'}, default='trace'
    normalize : bool, default=True
    seed : int, optional
        Seed for the dropout masks (the global RNG state is restored afterwards).
    batch_size : int, default=1024
    """

    def __init__(
        self,
        encoder: nn.Module,
        n_samples: int = 30,
        score: UncertaintyScore | str = UncertaintyScore.TRACE,
        normalize: bool = True,
        seed: int | None = 0,
        batch_size: int = 1024,
    ) -> None:
        if not any(isinstance(m, _DROPOUT_TYPES) for m in encoder.modules()):
            raise ValueError("MCDropoutBaseline needs an encoder with at least one dropout layer.")
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 2:
            raise ValueError(f"n_samples must be an int >= 2, got {n_samples!r}.")
        self.encoder = encoder
        self.n_samples = n_samples
        self.score_kind = parse_enum(UncertaintyScore, score, "score")
        self.normalize = normalize
        self.seed = seed
        self.batch_size = batch_size

    def fit(self, x_train: Tensor, y_train: Tensor | None = None) -> MCDropoutBaseline:
        """Nothing to fit (kept for a uniform interface); returns ``self``."""
        return self

    def samples(self, x: Tensor) -> Tensor:
        """Embedding samples ``(S, n, D)`` with dropout active and everything else in eval."""
        was_training = self.encoder.training
        self.encoder.eval()
        for module in self.encoder.modules():
            if isinstance(module, _DROPOUT_TYPES):
                module.train()
        devices = (
            [] if _module_device(self.encoder).type == "cpu" else [_module_device(self.encoder)]
        )
        try:
            with torch.random.fork_rng(devices=devices, enabled=self.seed is not None):
                if self.seed is not None:
                    torch.manual_seed(self.seed)
                draws = [
                    embed(self.encoder, x, self.normalize, self.batch_size)
                    for _ in range(self.n_samples)
                ]
        finally:
            self.encoder.train(was_training)
        return torch.stack(draws)

    def embed(self, x: Tensor) -> Tensor:
        """Mean of the samples (normalised if ``normalize``), ``(n, D)``."""
        mean = self.samples(x).mean(0)
        return F.normalize(mean, dim=-1) if self.normalize else mean

    def score(self, x: Tensor) -> Tensor:
        """Spread of the embedding samples, ``(n,)``."""
        return _covariance_score(self.samples(x), self.score_kind)


class EnsembleScore(str, Enum):
    """OOD scores of :class:`DeepEnsembleBaseline`."""

    MEAN_KNN = "mean_knn"
    """Mean over members of the distance to the k-th nearest training embedding."""

    EMBEDDING_STD = "embedding_std"
    """Sum over dimensions of the across-member std of the embeddings. Not rotation-invariant,
    hence not meaningful: kept only to reproduce the naive baseline."""


class DeepEnsembleBaseline(OODBaseline):
    """Deep ensemble of encoders trained from different seeds (Lakshminarayanan et al., 2017).

    The embedding of a metric-learning loss is only defined up to an isometry: every rotation of
    a member's embedding space has the same loss. Two members therefore disagree on the raw
    coordinates even for training inputs, and the spread of raw embeddings across members
    measures arbitrary rotations, not uncertainty (BRIEF section 6: AUROC 0.54 / 0.33). The
    default score is rotation-invariant: the mean over members ``m`` of the distance from
    ``z_m(x)`` to its k-th nearest training embedding *of the same member*. Retrieval uses the
    concatenation ``[z_1, ..., z_M] / sqrt(M)``, whose squared distances are the members' mean
    squared distances (also rotation-invariant).

    Parameters
    ----------
    members : sequence of nn.Module
        Trained encoders.
    k : int, default=1
    score : {'mean_knn', 'embedding_std'}, default='mean_knn'
    normalize : bool, default=True
    batch_size : int, default=1024
    """

    def __init__(
        self,
        members: Sequence[nn.Module],
        k: int = 1,
        score: EnsembleScore | str = EnsembleScore.MEAN_KNN,
        normalize: bool = True,
        batch_size: int = 1024,
    ) -> None:
        members = list(members)
        if len(members) < 2:
            raise ValueError(f"An ensemble needs at least two members, got {len(members)}.")
        self.members = members
        self.k = _check_k(k)
        self.score_kind = parse_enum(EnsembleScore, score, "score")
        self.normalize = normalize
        self.batch_size = batch_size
        self.train_emb: list[Tensor] | None = None

    @classmethod
    def train(
        cls,
        factory: Callable[[], nn.Module],
        trainer: Callable[[nn.Module, int], Any],
        seeds: Sequence[int] = (0, 1, 2, 3, 4),
        **kwargs: Any,
    ) -> DeepEnsembleBaseline:
        """Build and train one member per seed.

        Parameters
        ----------
        factory : callable
            ``factory() -> nn.Module``, called after ``torch.manual_seed(seed)``.
        trainer : callable
            ``trainer(encoder, seed)``, e.g.
            ``lambda enc, s: train_encoder(enc, loader, seed=s, progress_bar=False)``.
        seeds : sequence of int, default=(0, 1, 2, 3, 4)
        **kwargs
            Passed to the constructor.

        Returns
        -------
        DeepEnsembleBaseline
        """
        members = []
        for seed in seeds:
            torch.manual_seed(seed)
            member = factory()
            trainer(member, seed)
            members.append(member)
        return cls(members, **kwargs)

    def member_embeddings(self, x: Tensor) -> list[Tensor]:
        """Each member's embeddings ``(n, D)``."""
        return [_eval_embed(m, x, self.normalize, self.batch_size) for m in self.members]

    def embed(self, x: Tensor) -> Tensor:
        """Concatenated member embeddings scaled by ``1/sqrt(M)``, ``(n, M D)``."""
        return torch.cat(self.member_embeddings(x), dim=1) / math.sqrt(len(self.members))

    def fit(self, x_train: Tensor, y_train: Tensor | None = None) -> DeepEnsembleBaseline:
        """Store every member's training embeddings; ``y_train`` is not used."""
        self.train_emb = self.member_embeddings(x_train)
        if self.train_emb[0].shape[0] < self.k:
            raise ValueError(
                f"k={self.k} exceeds the {self.train_emb[0].shape[0]} training inputs."
            )
        return self

    def score(self, x: Tensor) -> Tensor:
        """Mean kNN distance over members (or the naive embedding std), ``(n,)``."""
        embs = self.member_embeddings(x)
        if self.score_kind == EnsembleScore.EMBEDDING_STD:
            return torch.stack(embs).std(dim=0).sum(-1)
        self._require_fit("train_emb")
        dists = [knn_distance_score(e, t, self.k) for e, t in zip(embs, self.train_emb)]
        return torch.stack(dists).mean(0)


class PFEBaseline(OODBaseline):
    """Probabilistic face embeddings (Shi & Jain, 2019) on top of a frozen encoder.

    The frozen encoder gives the mean ``mu(x)`` (L2-normalised if ``normalize``); a small head on
    the features predicts ``log sigma^2(x)`` per embedding dimension. The head is trained on the
    positive pairs of each training mini-batch by maximising the mutual likelihood score

    ``MLS(i, j) = -1/2 sum_d [(mu_id - mu_jd)^2 / (s_id + s_jd) + log(s_id + s_jd)]``,
    ``s = sigma^2``. The OOD score is the harmonic mean of ``sigma^2`` over dimensions (the
    paper's uncertainty; higher = more OOD).

    Parameters
    ----------
    encoder : nn.Module
        Trained encoder (kept frozen), ``(B, ...) -> (B, D)``.
    feature_fn : nn.Module or callable, optional
        Input of the head, ``(B, ...) -> (B, P)``; default ``penultimate(encoder)``.
    hidden : int, default=64
        Width of the head ``Linear(P, hidden) - ReLU - Linear(hidden, D)``.
    normalize : bool, default=True
    batch_size : int, default=1024
        Batch size for computing features (not for training the head).
    """

    def __init__(
        self,
        encoder: nn.Module,
        feature_fn: nn.Module | Callable[[Tensor], Tensor] | None = None,
        hidden: int = 64,
        normalize: bool = True,
        batch_size: int = 1024,
    ) -> None:
        self.encoder = encoder
        self.feature_fn = penultimate(encoder) if feature_fn is None else feature_fn
        self.hidden = hidden
        self.normalize = normalize
        self.batch_size = batch_size
        self.head: nn.Module | None = None

    def _features(self, x: Tensor) -> Tensor:
        if isinstance(self.feature_fn, nn.Module):
            return _eval_embed(self.feature_fn, x, False, self.batch_size)
        return embed(self.feature_fn, x, False, self.batch_size)

    def embed(self, x: Tensor) -> Tensor:
        """The frozen encoder's embeddings ``mu(x)``, ``(n, D)``."""
        return _eval_embed(self.encoder, x, self.normalize, self.batch_size)

    @staticmethod
    def mls_loss(mu: Tensor, log_var: Tensor, labels: Tensor) -> Tensor:
        """Negative mean MLS over the positive pairs ``i < j`` of a batch (0 without any)."""
        first, second = torch.triu_indices(len(mu), len(mu), offset=1, device=mu.device)
        keep = labels[first] == labels[second]
        first, second = first[keep], second[keep]
        if first.numel() == 0:
            return log_var.sum() * 0.0
        var = log_var[first].exp() + log_var[second].exp()
        mls = -0.5 * ((mu[first] - mu[second]).square() / var + var.log()).sum(-1)
        return -mls.mean()

    def fit(
        self,
        x_train: Tensor,
        y_train: Tensor | None = None,
        epochs: int = 200,
        lr: float = 1e-2,
        train_batch_size: int = 64,
        seed: int = 0,
        progress_bar: bool = False,
    ) -> PFEBaseline:
        """Train the uncertainty head on the positive pairs of shuffled mini-batches.

        Parameters
        ----------
        x_train : Tensor
            Training inputs ``(N, ...)``.
        y_train : Tensor
            Class labels ``(N,)``.
        epochs : int, default=200
            The head is cheap (features are computed once); on the digits split the MLS loss
            was still falling after 30 epochs at ``lr=1e-3``.
        lr : float, default=1e-2
        train_batch_size : int, default=64
        seed : int, default=0
        progress_bar : bool, default=False

        Returns
        -------
        self : PFEBaseline
        """
        if y_train is None:
            raise ValueError("PFEBaseline.fit needs the class labels y_train.")
        feats = self._features(x_train)
        mu = self.embed(x_train)
        if y_train.shape != (feats.shape[0],):
            raise ValueError(
                f"y_train must have shape ({feats.shape[0]},), got {tuple(y_train.shape)}."
            )
        torch.manual_seed(seed)
        head = nn.Sequential(
            nn.Linear(feats.shape[1], self.hidden), nn.ReLU(), nn.Linear(self.hidden, mu.shape[1])
        ).to(device=feats.device, dtype=feats.dtype)
        labels = y_train.to(feats.device)
        optimizer = torch.optim.Adam(head.parameters(), lr=lr)
        head.train()
        for _ in tqdm(range(epochs), desc="PFE head", disable=not progress_bar, leave=False):
            for idx in torch.randperm(len(feats), device=feats.device).split(train_batch_size):
                loss = self.mls_loss(mu[idx], head(feats[idx]), labels[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        head.eval()
        self.head = head
        return self

    @torch.no_grad()
    def log_variance(self, x: Tensor) -> Tensor:
        """Predicted ``log sigma^2``, ``(n, D)``."""
        self._require_fit("head")
        self.head.eval()
        return self.head(self._features(x).to(_module_device(self.head)))

    def score(self, x: Tensor) -> Tensor:
        """Harmonic mean over dimensions of ``sigma^2``, ``(n,)``."""
        log_var = self.log_variance(x)
        return (1.0 / (-log_var).exp().mean(-1)).to(x.device)
