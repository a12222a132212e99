"""Isotropic weight noise: the posterior-kNN score with no curvature and no marginal likelihood.

The control that every Laplace uncertainty figure needs beside it: weights
``theta + sigma * eps`` with one noise scale ``sigma`` for every weight (a Gaussian "posterior"
equal to a prior of precision ``1 / sigma^2``), the scale picked on validation data, and the
score of :class:`~laplace_metric.scores.UncertaintyScorer`'s default, the mean over weight
samples of the distance to the nearest training embedding (queries and training set
re-embedded under each sample).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from laplace_metric.baselines.base import OODBaseline, _check_k, register_baseline
from laplace_metric.memory import default_budget
from laplace_metric.predictive.samples import knn_and_top1
from laplace_metric.scores.support import PosteriorRetrieval

__all__ = ["IsotropicNoiseBaseline"]

#: Default grid of noise scales: prior precisions 10^-1 ... 10^4, as standard deviations.
DEFAULT_SIGMAS = tuple(float(10.0 ** (-e / 2)) for e in torch.linspace(-1, 4, 11).tolist())


@register_baseline("isotropic_noise")
class IsotropicNoiseBaseline(OODBaseline):
    """Posterior-kNN score under isotropic weight noise, its scale tuned on validation data.

    ``s(x) = 1/S sum_s d_k(z(x; theta + sigma eps_s), {z(x_train; theta + sigma eps_s)})``
    with ``eps_s ~ N(0, I)`` over the chosen parameters and ``z`` the (normalised) embedding.

    Parameters
    ----------
    encoder : nn.Module
        Trained encoder ``(B, ...) -> (B, D)``.
    sigmas : float or sequence of float, optional
        Noise scale, or a grid to choose from in :meth:`fit` (default: prior precisions
        ``10^-1 ... 10^4``, i.e. ``sigma = 3.16 ... 0.01``).
    parameters : {'all', 'last_layer'}, default='all'
        Perturb every parameter, or only those of the last ``nn.Linear`` module.
    n_samples : int, default=30
    k : int, default=1
    normalize : bool, default=True
    seed : int, default=0
        Seed of the noise draws (the same draws for every call).
    batch_size : int, default=1024
    """

    def __init__(
        self,
        encoder: nn.Module,
        sigmas: float | Sequence[float] | None = None,
        parameters: str = "all",
        n_samples: int = 30,
        k: int = 1,
        normalize: bool = True,
        seed: int = 0,
        batch_size: int = 1024,
    ) -> None:
        grid = DEFAULT_SIGMAS if sigmas is None else sigmas
        grid = (float(grid),) if isinstance(grid, (int, float)) else tuple(map(float, grid))
        if not grid or any(not s > 0 for s in grid):
            raise ValueError(f"sigmas must be positive noise scales, got {sigmas!r}.")
        if parameters not in ("all", "last_layer"):
            raise ValueError(f"parameters must be 'all' or 'last_layer', got {parameters!r}.")
        if n_samples < 1:
            raise ValueError(f"n_samples must be positive, got {n_samples}.")
        self.encoder = encoder
        self.sigmas = grid
        self.sigma: float | None = grid[0] if len(grid) == 1 else None
        self.parameters = parameters
        self.n_samples = int(n_samples)
        self.k = _check_k(k)
        self.normalize = normalize
        self.seed = seed
        self.batch_size = batch_size
        self.validation: dict[float, float] = {}
        self._x_train: Tensor | None = None
        self._y_train: Tensor | None = None
        self._train_samples: dict[float, Tensor] = {}
        self._features: dict[tuple, Tensor] = {}
        self._last_queries: tuple[tuple, Tensor] | None = None

    # ------------------------------------------------------------------ internals
    def _noised(self) -> list[str]:
        named = dict(self.encoder.named_parameters())
        if self.parameters == "all":
            return [n for n, p in named.items() if p.requires_grad]
        linear = [m for m in self.encoder.modules() if isinstance(m, nn.Linear)]
        if not linear:
            raise ValueError("parameters='last_layer' needs an nn.Linear module in the encoder.")
        last = {id(p) for p in linear[-1].parameters()}
        return [n for n, p in named.items() if id(p) in last]

    def _sampled(self, x: Tensor, sigma: float, n_samples: int | None = None) -> Tensor:
        """Embeddings ``(S, n, D)`` under the ``S`` (default :attr:`n_samples`) noise draws of
        scale ``sigma`` (eval mode; every submodule's mode is restored afterwards)."""
        modes = {m: m.training for m in self.encoder.modules()}
        self.encoder.eval()
        try:
            with torch.no_grad():
                return self._draw(x, sigma, n_samples or self.n_samples)
        finally:
            for module, training in modes.items():
                module.train(training)

    def _split(self) -> tuple[nn.Module, nn.Module] | None:
        """``(backbone, head)`` when only the final ``nn.Linear`` of a Sequential is noised, so
        the backbone runs once per input and each draw re-runs only the head."""
        enc = self.encoder
        if self.parameters == "last_layer" and isinstance(enc, nn.Sequential):
            if isinstance(enc[-1], nn.Linear):
                return enc[:-1], enc[-1]
        return None

    def _draw(self, x: Tensor, sigma: float, n_samples: int) -> Tensor:
        split = self._split()
        if split is not None:
            backbone, head = split
            key = (x.data_ptr(), tuple(x.shape), x._version)
            if key not in self._features:  # one backbone pass per input set, for every sigma
                if len(self._features) >= 4:  # train, validation, validation OOD, one query set
                    self._features.pop(next(iter(self._features)))
                self._features[key] = torch.cat([backbone(c) for c in x.split(self.batch_size)])
            features = self._features[key]
            noised = list(dict(head.named_parameters()))
            return self._draw_from(head, features, sigma, noised, n_samples)
        return self._draw_from(self.encoder, x, sigma, self._noised(), n_samples)

    def _draw_from(
        self, module: nn.Module, x: Tensor, sigma: float, noised: list[str], n_samples: int
    ) -> Tensor:
        params = dict(module.named_parameters())
        device = next(iter(params.values())).device
        gen = torch.Generator(device=device).manual_seed(self.seed)
        out = []
        for _ in range(n_samples):
            sample = dict(params)
            for name in noised:
                p = params[name]
                eps = torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype)
                sample[name] = p + sigma * eps
            z = torch.cat([functional_call(module, sample, (c,)) for c in x.split(self.batch_size)])
            out.append(torch.nn.functional.normalize(z, dim=-1) if self.normalize else z)
        return torch.stack(out)

    def _train(self, sigma: float) -> Tensor:
        if sigma not in self._train_samples:
            self._train_samples[sigma] = self._sampled(self._x_train, sigma)
        return self._train_samples[sigma]

    def _queries(self, x: Tensor, sigma: float) -> Tensor:
        """:meth:`_sampled` of the query set ``x``, cached for the last ``(x, sigma)`` so that
        :meth:`score` and :meth:`retrieval` of the same queries draw them once."""
        key = (x.data_ptr(), tuple(x.shape), x._version, sigma)
        if self._last_queries is None or self._last_queries[0] != key:
            self._last_queries = (key, self._sampled(x, sigma))
        return self._last_queries[1]

    def _neighbours(
        self, x: Tensor, sigma: float, labels: Tensor | None
    ) -> list[tuple[Tensor, Tensor | None]]:
        """Per draw, the k-th neighbour distance and (with ``labels``) the top-1 training
        label, computed as the posterior-kNN score computes them (query chunks within the
        default memory budget)."""
        queries, train = self._queries(x, sigma), self._train(sigma)
        budget = default_budget(queries.device)
        return [knn_and_top1(q, t, self.k, labels, budget) for q, t in zip(queries, train)]

    def _score(self, x: Tensor, sigma: float) -> Tensor:
        """Mean over draws of the k-th neighbour distance."""
        return torch.stack([d for d, _ in self._neighbours(x, sigma, None)]).mean(0)

    # ------------------------------------------------------------------ public
    def fit(
        self,
        x_train: Tensor,
        y_train: Tensor | None = None,
        x_val: Tensor | None = None,
        x_val_ood: Tensor | None = None,
    ) -> IsotropicNoiseBaseline:
        """Store the training inputs; with a grid of scales, pick the one whose score best
        separates ``x_val`` (in distribution) from ``x_val_ood`` (validation OOD data, e.g.
        the split's ``ood_noise_val``), by AUROC. ``y_train`` (optional) enables
        :meth:`retrieval`."""
        from laplace_metric.metrics import ood_auroc

        if len(x_train) < self.k:
            raise ValueError(f"k={self.k} exceeds the {len(x_train)} training inputs.")
        if y_train is not None and y_train.shape != (len(x_train),):
            raise ValueError(
                f"y_train must have shape ({len(x_train)},), got {tuple(y_train.shape)}."
            )
        self._x_train, self._y_train, self._train_samples = x_train, y_train, {}
        self._last_queries = None
        if len(self.sigmas) == 1:
            return self
        if x_val is None or x_val_ood is None:
            raise ValueError(
                "Choosing sigma from a grid needs validation data: fit(x_train, x_val=..., "
                "x_val_ood=...), or pass a single sigma."
            )
        self.validation = {
            s: ood_auroc(self._score(x_val, s).cpu(), self._score(x_val_ood, s).cpu())
            for s in self.sigmas
        }
        best = max(self.validation.values())
        # ties (saturated validation AUROC): the smallest noise that reaches the best value
        self.sigma = min(s for s, v in self.validation.items() if v >= best - 1e-12)
        self._train_samples = {self.sigma: self._train(self.sigma)}
        return self

    def score(self, x: Tensor) -> Tensor:
        """Mean over noise draws of the k-th neighbour distance, ``(n,)``."""
        self._require_fit("_x_train")
        return self._score(x, self.sigma)

    def retrieval(self, x: Tensor) -> PosteriorRetrieval:
        """Top-1 retrieval with its confidence under the chosen noise: the fraction of noise
        draws whose top-1 training label equals the top-1 label of the noise-free encoder,
        computed as :meth:`UncertaintyScorer.retrieval
        <laplace_metric.scores.UncertaintyScorer.retrieval>` computes it (needs ``y_train``
        in :meth:`fit`)."""
        self._require_fit("_x_train")
        if self._y_train is None:
            raise ValueError("retrieval() needs training labels: fit(x_train, y_train, ...).")
        labels = self._y_train.to(x.device)
        means = [self._sampled(t, 0.0, n_samples=1)[0] for t in (x, self._x_train)]
        predicted = knn_and_top1(means[0], means[1], self.k, labels, default_budget(x.device))[1]
        results = self._neighbours(x, self.sigma, labels)
        knn = torch.stack([r[0] for r in results]).mean(0)
        agree = torch.stack([r[1] == predicted for r in results]).double().mean(0)
        return PosteriorRetrieval(knn_distance=knn, confidence=agree, predicted=predicted)

    def samples(self, x: Tensor) -> Tensor:
        """Embeddings ``(S, n, D)`` under the chosen noise scale."""
        self._require_fit("_x_train")
        return self._sampled(x, self.sigma)
