"""Mean and variance of the similarity of two embeddings under the posterior, in closed form.

A query and a gallery item go through *one* encoder, so under the posterior their raw outputs
``x = g_q`` and ``y = g_g`` are jointly Gaussian (exactly for a last-layer posterior,
linearised otherwise) with cross-covariance ``C_xy`` (:mod:`~.similarity_stats`).

Cosine (default ``approximation='ratio'``): ``cos = X / sqrt(Y Z)`` with the quadratic forms
``X = x^T y``, ``Y = |x|^2``, ``Z = |y|^2``, whose means, variances and covariances are exact
Gaussian moments (``Cov(w^T A w, w^T B w) = 2 tr(A S B S) + 4 m^T A S B m``). A second-order
expansion of ``f(X, Y, Z)`` around the means gives the mean (``E[f] ~ f(m) + 1/2 tr(H Cov)``)
and the variance (``grad^T Cov grad``). The expansion is in the fluctuations of the quadratic
forms, which stay small relative to their means even when the posterior spread of ``g`` is not
(the norms concentrate in ``D`` dimensions); ``approximation='delta'`` expands in ``g`` itself
(second-order mean, first-order variance), accurate only for tight posteriors.

Squared Euclidean distance: ``2 - 2 cos`` for normalised embeddings; for raw embeddings
``d = x - y`` is Gaussian, ``E = |d|^2 + tr C_d`` and ``Var = 4 d^T C_d d + 2 tr(C_d^2)``,
exact. See ``docs/mathematics.rst`` for the derivation and the measured errors.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import torch
from laplace.utils.enums import HessianStructure

from laplace_metric.enums import parse_enum
from laplace_metric.memory import check_fits, chunk_size, dtype_bytes, split
from laplace_metric.predictive.glm import linear_head
from laplace_metric.predictive.similarity_stats import (
    Bilinear,
    DenseFactors,
    Items,
    Pairing,
    RotatedDiagonal,
    Traces,
)

#: A fitted laplace-metric estimator (not imported: predictive code sits below the estimators).
MetricLaplaceMixin = Any


class SimilarityMetric(str, Enum):
    """Similarities whose posterior moments :func:`predictive_similarity` computes."""

    COSINE = "cosine"
    """Cosine similarity of the embeddings (higher = more similar)."""

    SQEUCLIDEAN = "sqeuclidean"
    """Squared Euclidean distance of the embeddings (lower = more similar)."""

    BREGMAN = "bregman"
    """A learned Bregman divergence: not available in closed form (raises)."""


class Approximation(str, Enum):
    """How :func:`predictive_similarity` approximates the moments of the cosine."""

    RATIO = "ratio"
    """Second order in the Gaussian quadratic forms ``x^T y``, ``|x|^2``, ``|y|^2`` (default)."""

    DELTA = "delta"
    """Second-order mean and first-order variance in the raw outputs (tight posteriors)."""


def cosine_delta(s, nq, ng, blocks, correction=True, variance=True):
    """Delta-method moments of the cosine (see ``approximation='delta'``)."""
    qq, gg, qg = blocks
    mean = s
    if correction:
        cross = qg.tr - qg.aa - qg.bb + s * qg.ab
        mean = (
            s
            + cross / (nq * ng)
            - 0.5 * s * ((qq.tr - qq.aa) / nq**2 + (gg.tr - gg.bb) / ng**2)
            - (qq.ab - s * qq.aa) / nq**2
            - (gg.ba - s * gg.bb) / ng**2
        )
    if not variance:
        return mean, None
    u_qq = qq.bb - 2 * s * qq.ab + s.square() * qq.aa
    v_gg = gg.aa - 2 * s * gg.ab + s.square() * gg.bb
    u_qg_v = qg.ba - s * (qg.bb + qg.aa) + s.square() * qg.ab
    var = u_qq / nq**2 + v_gg / ng**2 + 2 * u_qg_v / (nq * ng)
    return mean, var.clamp_min(0)


def quadratic_form_moments(s, nq, ng, blocks, traces: Traces):
    """Means, variances and covariances of ``X = x^T y``, ``Y = |x|^2``, ``Z = |y|^2``."""
    qq, gg, qg = blocks
    t = traces
    means = (nq * ng * s + qg.tr, nq**2 + qq.tr, ng**2 + gg.tr)
    var_x = nq**2 * gg.aa + ng**2 * qq.bb + 2 * nq * ng * qg.ba + t.xx_yy + t.xy_xy
    var_y = 2 * t.xx2 + 4 * nq**2 * qq.aa
    var_z = 2 * t.yy2 + 4 * ng**2 * gg.bb
    cov_xy = 2 * t.xx_xy + 2 * nq**2 * qg.aa + 2 * nq * ng * qq.ab
    cov_xz = 2 * t.yy_yx + 2 * ng**2 * qg.bb + 2 * nq * ng * gg.ab
    cov_yz = 2 * t.xy_yx + 4 * nq * ng * qg.ab
    return means, (var_x, var_y, var_z, cov_xy, cov_xz, cov_yz)


def cosine_ratio(s, nq, ng, blocks, traces: Traces, variance=True):
    """Moments of ``X / sqrt(Y Z)``, second order in the quadratic forms."""
    (mx, my, mz), (vx, vy, vz, cxy, cxz, cyz) = quadratic_form_moments(s, nq, ng, blocks, traces)
    root = (my * mz).sqrt()
    f = mx / root
    fx, fy, fz = 1 / root, -f / (2 * my), -f / (2 * mz)
    curvature = (
        0.75 * f * (vy / my**2 + vz / mz**2)
        - (cxy / my + cxz / mz) / root
        + 0.5 * f * cyz / (my * mz)
    )
    mean = f + 0.5 * curvature
    if not variance:
        return mean, None
    var = fx**2 * vx + fy**2 * vy + fz**2 * vz + 2 * (fx * fy * cxy + fx * fz * cxz + fy * fz * cyz)
    return mean, var.clamp_min(0)


def sqeuclidean_raw_moments(s, nq, ng, blocks, traces: Traces | None, variance=True):
    """Exact mean and variance of ``|x - y|^2`` for Gaussian raw outputs."""
    qq, gg, qg = blocks
    mean = nq**2 + ng**2 - 2 * nq * ng * s + qq.tr + gg.tr - 2 * qg.tr
    if not variance:
        return mean, None

    def quad(block: Bilinear) -> torch.Tensor:  # d^T C d, d = nq a - ng b
        return nq**2 * block.aa - nq * ng * (block.ab + block.ba) + ng**2 * block.bb

    t = traces
    tr_cd2 = t.xx2 + t.yy2 + 2 * t.xy_xy + 2 * t.xx_yy - 4 * t.xx_xy - 4 * t.yy_yx + 2 * t.xy_yx
    var = 4 * (quad(qq) + quad(gg) - 2 * quad(qg)) + 2 * tr_cd2
    return mean, var.clamp_min(0)


def pair_moments(
    provider,
    q: Items,
    g: Items,
    pairs: Pairing,
    metric: SimilarityMetric,
    normalized: bool,
    correction: bool = True,
    variance: bool = True,
    approximation: Approximation = Approximation.RATIO,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Moments of ``metric`` for the pairs of ``q`` and ``g`` (see :class:`Pairing`)."""
    s = pairs.mm(q.z, g.z)
    if not correction and not variance and metric == SimilarityMetric.COSINE:
        return s, None
    ratio = approximation == Approximation.RATIO
    raw = metric == SimilarityMetric.SQEUCLIDEAN and not normalized
    *blocks, traces = provider.blocks(q, g, pairs, variance=variance or ratio or raw)
    nq, ng = pairs.que(q.n), pairs.gal(g.n)
    if raw:
        return sqeuclidean_raw_moments(s, nq, ng, blocks, traces, variance)
    if ratio:
        mean, var = cosine_ratio(s, nq, ng, blocks, traces, variance)
        mean = mean if correction else s
    else:
        mean, var = cosine_delta(s, nq, ng, blocks, correction, variance)
    mean = mean.clamp(-1, 1)
    if metric == SimilarityMetric.SQEUCLIDEAN:
        return 2 - 2 * mean, None if var is None else 4 * var
    return mean, var


def similarity_provider(la: MetricLaplaceMixin) -> RotatedDiagonal | DenseFactors:
    """:class:`RotatedDiagonal` for a last-layer diag/kron ``nn.Linear`` head, else
    :class:`DenseFactors`."""
    if linear_head(la) is not None and la._structure in (
        HessianStructure.DIAG,
        HessianStructure.KRON,
    ):
        return RotatedDiagonal.from_laplace(la)
    return DenseFactors(la)


def parse_metric(la: MetricLaplaceMixin, metric: SimilarityMetric | str) -> SimilarityMetric:
    metric = parse_enum(SimilarityMetric, metric, "metric")
    if metric == SimilarityMetric.BREGMAN:
        raise NotImplementedError(
            "The Bregman divergence of a learned convex potential has no closed-form posterior "
            "moments here (they need its third derivatives); use metric='cosine' or "
            "'sqeuclidean', or the sampled path (la.predictive_samples(..., pred_type='nn'))."
        )
    return metric


def gallery_items(provider, la: MetricLaplaceMixin, x: torch.Tensor, batch: int = 256) -> Items:
    """Statistics of a whole gallery (last-layer diag/kron: the backbone runs once)."""
    parts = []
    with torch.no_grad():
        for chunk in split(x, batch):
            parts.append(provider.items(la.model.forward_with_features(chunk)[1].detach()))
    return Items(**{k: torch.cat([getattr(p, k) for p in parts]) for k in ("z", "n", "psi", "c")})


def _plan(la, provider, n_q, n_g, batch_size, gallery_batch_size):
    itemsize = dtype_bytes(la._dtype)
    per_item = provider.bytes_per_item() * itemsize
    per_pair = provider.per_pair * itemsize
    budget = la.memory_budget
    check_fits(
        2 * per_item + per_pair,
        budget,
        "The similarity moments of one query-gallery pair",
        ["subset_of_weights='last_layer'", "hessian_structure='diag' or 'kron'"],
    )
    n_gal = chunk_size(n_g, per_item + per_pair, budget // 2, gallery_batch_size)
    n_que = chunk_size(n_q, per_item + n_gal * per_pair, budget - n_gal * per_item, batch_size)
    return n_que, n_gal


def predictive_similarity(
    la: MetricLaplaceMixin,
    x_query: torch.Tensor,
    x_gallery: torch.Tensor,
    metric: SimilarityMetric | str = SimilarityMetric.COSINE,
    return_variance: bool = True,
    correction: bool = True,
    approximation: Approximation | str = Approximation.RATIO,
    batch_size: int | None = None,
    gallery_batch_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Posterior mean and variance ``(Q, G)`` of the similarity of every query-gallery pair.

    See :meth:`laplace_metric.estimators.MetricLaplaceMixin.predictive_similarity`.
    """
    metric = parse_metric(la, metric)
    approximation = parse_enum(Approximation, approximation, "approximation")
    provider = similarity_provider(la)
    structured = isinstance(provider, RotatedDiagonal)
    normalized = la.pair_likelihood.normalize
    n_que, n_gal = _plan(la, provider, len(x_query), len(x_gallery), batch_size, gallery_batch_size)
    gallery = gallery_items(provider, la, x_gallery) if structured else None
    mean = x_query.new_empty((len(x_query), len(x_gallery)), dtype=la._dtype)
    var = torch.empty_like(mean) if return_variance else None
    pairs = Pairing(gathered=False)
    for q0 in range(0, len(x_query), n_que):
        xq = x_query[q0 : q0 + n_que]
        q = gallery_items(provider, la, xq) if structured else provider.items(xq)
        for g0 in range(0, len(x_gallery), n_gal):
            if structured:
                g = gallery.slice(g0, g0 + n_gal)
            else:
                g = provider.items(x_gallery[g0 : g0 + n_gal])
            m, v = pair_moments(
                provider, q, g, pairs, metric, normalized, correction, return_variance,
                approximation,
            )  # fmt: skip
            rows, cols = slice(q0, q0 + len(xq)), slice(g0, g0 + len(g.n))
            mean[rows, cols] = m
            if var is not None:
                var[rows, cols] = v
    return mean, var


__all__ = [
    "Approximation",
    "SimilarityMetric",
    "cosine_delta",
    "cosine_ratio",
    "quadratic_form_moments",
    "gallery_items",
    "pair_moments",
    "predictive_similarity",
    "similarity_provider",
    "sqeuclidean_raw_moments",
]
