"""Mean and variance of the similarity of two embeddings under the posterior, in closed form.

A query and a gallery item go through *one* encoder, so under the posterior their raw outputs
``g_q``, ``g_g`` are jointly Gaussian (exactly for a last-layer posterior, linearised
otherwise) with cross-covariance ``C_qg`` (:mod:`~laplace_metric.predictive.similarity_stats`).
With ``a = g_q / n_q``, ``b = g_g / n_g`` and ``s = a^T b``:

* cosine mean (second-order delta method, exact in ``C`` and ``1/n`` to second order)::

    E[cos] = s + tr(P_a C_qg P_b) / (n_q n_g)
               - s/2 (tr(P_a C_qq) / n_q^2 + tr(P_b C_gg) / n_g^2)
               - a^T C_qq P_a b / n_q^2 - b^T C_gg P_b a / n_g^2,   P_x = I - x x^T;

* cosine variance (first order), with ``u = P_a b / n_q`` and ``v = P_b a / n_g``::

    Var[cos] = u^T C_qq u + v^T C_gg v + 2 u^T C_qg v;

  ``second_order=True`` adds ``tr(S_aa S_bb) + tr(S_ab S_ab)`` (``S`` the covariances of the
  linearised unit embeddings), the fourth-order terms of a Gaussian bilinear form;
* squared Euclidean distance: ``2 - 2 cos`` for normalised embeddings; for raw embeddings
  ``d = g_q - g_g`` is Gaussian and ``E = |d|^2 + tr C_d``, ``Var = 4 d^T C_d d`` (+ the
  dropped ``2 tr(C_d^2)`` with ``second_order=True``), ``C_d = C_qq + C_gg - C_qg - C_qg^T``.

See ``docs/mathematics.rst`` for the derivation and the measured size of the dropped terms.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

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
)

if TYPE_CHECKING:
    from laplace_metric.estimators import MetricLaplaceMixin


class SimilarityMetric(str, Enum):
    """Similarities whose posterior moments :func:`predictive_similarity` computes."""

    COSINE = "cosine"
    """Cosine similarity of the embeddings (higher = more similar)."""

    SQEUCLIDEAN = "sqeuclidean"
    """Squared Euclidean distance of the embeddings (lower = more similar)."""

    BREGMAN = "bregman"
    """A learned Bregman divergence: not available in closed form (raises)."""


def cosine_moments(
    s: torch.Tensor,
    nq: torch.Tensor,
    ng: torch.Tensor,
    blocks: tuple[Bilinear, Bilinear, Bilinear],
    correction: bool = True,
    variance: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean and first-order variance of the cosine similarity from the pair statistics.

    ``nq`` and ``ng`` are the norms broadcast to pairs; see the module docstring.
    """
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


def sqeuclidean_raw_moments(
    s: torch.Tensor,
    nq: torch.Tensor,
    ng: torch.Tensor,
    blocks: tuple[Bilinear, Bilinear, Bilinear],
    variance: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact mean and first-order variance of ``|g_q - g_g|^2`` (Gaussian ``g``)."""
    qq, gg, qg = blocks
    mean = nq**2 + ng**2 - 2 * nq * ng * s + qq.tr + gg.tr - 2 * qg.tr
    if not variance:
        return mean, None

    def quad(block: Bilinear) -> torch.Tensor:  # d^T C d, d = nq a - ng b
        return nq**2 * block.aa - nq * ng * (block.ab + block.ba) + ng**2 * block.bb

    var = 4 * (quad(qq) + quad(gg) - 2 * quad(qg))
    return mean, var.clamp_min(0)


def _projector(z: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(z.shape[-1], dtype=z.dtype, device=z.device)
    return (eye - z[..., :, None] * z[..., None, :]) / n[..., None, None]


def second_order_variance(
    provider, q: Items, g: Items, metric: SimilarityMetric, normalized: bool
) -> torch.Tensor:
    """The fourth-order (``O(Sigma^2)``) variance terms of all pairs ``(Q, G)`` (dense)."""
    c_qq, c_gg, c_qg = provider.dense(q, g)
    if metric == SimilarityMetric.SQEUCLIDEAN and not normalized:
        c_d = c_qq[:, None] + c_gg[None] - c_qg - c_qg.transpose(-1, -2)
        return 2 * (c_d * c_d.transpose(-1, -2)).sum((-2, -1))
    pq, pg = _projector(q.z, q.n), _projector(g.z, g.n)
    s_aa, s_bb = pq @ c_qq @ pq, pg @ c_gg @ pg
    s_ab = torch.einsum("qde,qgef,gfh->qgdh", pq, c_qg, pg)
    extra = s_aa.flatten(1) @ s_bb.flatten(1).T + (s_ab * s_ab.transpose(-1, -2)).sum((-2, -1))
    return extra if metric == SimilarityMetric.COSINE else 4 * extra


def pair_moments(
    provider,
    q: Items,
    g: Items,
    pairs: Pairing,
    metric: SimilarityMetric,
    normalized: bool,
    correction: bool = True,
    variance: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """First-order moments of ``metric`` for the pairs of ``q`` and ``g`` (see :class:`Pairing`)."""
    s = pairs.mm(q.z, g.z)
    if not correction and not variance and metric == SimilarityMetric.COSINE:
        return s, None
    blocks = provider.blocks(q, g, pairs, variance=variance)
    nq, ng = pairs.que(q.n), pairs.gal(g.n)
    if metric == SimilarityMetric.SQEUCLIDEAN and not normalized:
        return sqeuclidean_raw_moments(s, nq, ng, blocks, variance)
    mean, var = cosine_moments(s, nq, ng, blocks, correction, variance)
    mean = mean.clamp(-1, 1)  # the second-order mean can overshoot for wide posteriors
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


def _plan(la, provider, n_q, n_g, second_order, batch_size, gallery_batch_size):
    itemsize = dtype_bytes(la._dtype)
    per_item = provider.bytes_per_item() * itemsize
    D = int(la.n_outputs)
    per_pair = (provider.per_pair + (6 * D * D if second_order else 0)) * itemsize
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
    second_order: bool = False,
    batch_size: int | None = None,
    gallery_batch_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Posterior mean and variance ``(Q, G)`` of the similarity of every query-gallery pair.

    See :meth:`laplace_metric.estimators.MetricLaplaceMixin.predictive_similarity`.
    """
    metric = parse_metric(la, metric)
    provider = similarity_provider(la)
    structured = isinstance(provider, RotatedDiagonal)
    normalized = la.pair_likelihood.normalize
    n_que, n_gal = _plan(
        la, provider, len(x_query), len(x_gallery), second_order, batch_size, gallery_batch_size
    )
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
                provider, q, g, pairs, metric, normalized, correction, return_variance
            )
            rows, cols = slice(q0, q0 + len(xq)), slice(g0, g0 + len(g.n))
            mean[rows, cols] = m
            if var is not None:
                if second_order:
                    v = v + second_order_variance(provider, q, g, metric, normalized)
                var[rows, cols] = v
    return mean, var


__all__ = [
    "SimilarityMetric",
    "cosine_moments",
    "gallery_items",
    "pair_moments",
    "predictive_similarity",
    "second_order_variance",
    "similarity_provider",
    "sqeuclidean_raw_moments",
]
