"""select_posterior: fits every candidate, reports each beside its curvature-off control and
keeps the one with the best validation criterion."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import labelled_data, loader, make_mlp

from laplace_metric import UncertaintyScorer
from laplace_metric.controls import curvature_off
from laplace_metric.estimators import MetricDiagLaplace, MetricKronLLLaplace
from laplace_metric.metrics import retrieval_ece
from laplace_metric.selection import CANDIDATES, PosteriorConfig, select_posterior

PRIOR_1 = PosteriorConfig("all", "diag", "dataset", 1.0)


def _problem(device):
    """Separable 3-class data, an MLP encoder and a validation split."""
    x, y = labelled_data(90, (5,), n_classes=3, seed=3)
    x = x + 2.0 * torch.nn.functional.one_hot(y, 5).double()  # classes apart
    model = make_mlp(5, 7, 3).to(device)
    x, y = x.to(device), y.to(device)
    return model, loader(x[:60], y[:60], 20), x[60:], y[60:], x[:60], y[:60]


def test_chooses_the_best_validation_ece_and_reports_controls(device):
    model, train, x_val, y_val, db, db_y = _problem(device)
    before = [p.detach().clone() for p in model.parameters()]
    selection = select_posterior(
        model, train, x_val, y_val, db, db_y, candidates=(*CANDIDATES, PRIOR_1), n_samples=8
    )
    assert [r.config for r in selection.results] == [*CANDIDATES, PRIOR_1]
    fitted = [r.fitted for r in selection.results]
    best = min(range(3), key=lambda i: (fitted[i], i))
    assert selection.config == selection.results[best].config
    assert isinstance(selection.la, (MetricDiagLaplace, MetricKronLLLaplace))
    assert selection.curvature_helps == (
        selection.results[best].fitted < selection.results[best].curvature_off
    )
    # the model the candidates share is unchanged
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    table = selection.to_markdown()
    assert table.count("(chosen)") == 1 and selection.config.name + " (chosen)" in table


def test_reported_figures_are_the_scorers(device):
    """The chosen estimator's validation ECE, fitted and curvature off, recomputed by hand."""
    model, train, x_val, y_val, db, db_y = _problem(device)
    selection = select_posterior(
        model, train, x_val, y_val, db, db_y, candidates=(PRIOR_1,), n_samples=6, seed=4
    )
    la, result = selection.la, selection.results[0]
    assert la.prior_precision.mean().item() == pytest.approx(1.0)

    def ece() -> float:
        gen = torch.Generator(device=device).manual_seed(4)
        scorer = UncertaintyScorer(la, db, db_y, n_samples=6, generator=gen)
        retrieval = scorer.retrieval(x_val)
        return retrieval_ece(retrieval.confidence.cpu(), (retrieval.predicted == y_val).cpu())

    assert result.ece == pytest.approx(ece())
    with curvature_off(la):
        assert result.ece_curvature_off == pytest.approx(ece())
    assert math.isnan(result.auroc) and result.fitted == result.ece


def test_auroc_criterion_with_an_ood_proxy(device):
    model, train, x_val, y_val, db, db_y = _problem(device)
    noise = 6 * torch.rand(30, 5, dtype=torch.float64, device=device) - 3
    selection = select_posterior(
        model,
        train,
        x_val,
        y_val,
        db,
        db_y,
        candidates=(PRIOR_1, CANDIDATES[1]),
        criterion="auroc",
        x_ood_val=noise,
        n_samples=6,
    )
    aurocs = [r.auroc for r in selection.results]
    assert all(0.0 <= a <= 1.0 for a in aurocs)
    assert [r.fitted for r in selection.results] == aurocs
    assert selection.config == selection.results[max(range(2), key=lambda i: aurocs[i])].config


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"y_val": "short"}, "y_val has"),
        ({"database_labels": "short"}, "database_labels has"),
        ({"x_val": "nan"}, "x_val contains NaN"),
        ({"criterion": "auroc"}, "needs x_ood_val"),
        ({"criterion": "accuracy"}, "criterion"),
        ({"candidates": ()}, "at least one candidate"),
        ({"likelihood_scale": "batch"}, "belong to each candidate"),
    ],
)
def test_bad_input_is_named(change, message):
    model, train, x_val, y_val, db, db_y = _problem("cpu")
    args = {"x_val": x_val, "y_val": y_val, "database": db, "database_labels": db_y}
    kwargs = {}
    for key, value in change.items():
        if value == "short":
            args[key] = args[key][:-1]
        elif value == "nan":
            args[key] = args[key].clone()
            args[key][0, 0] = float("nan")
        else:
            kwargs[key] = value
    with pytest.raises(ValueError, match=message):
        select_posterior(model, train, **args, **kwargs, n_samples=2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prior_precision": "tuned"}, "'marglik' or a number"),
        ({"prior_precision": -1.0}, "positive and finite"),
        ({"likelihood_scale": "everything"}, "likelihood_scale"),
    ],
)
def test_bad_config_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PosteriorConfig(**kwargs)


def test_config_names():
    assert CANDIDATES[0].name == "all-layer diag, dataset scale, marglik"
    assert CANDIDATES[1].name == "last-layer kron, composite scale, marglik"
    assert PosteriorConfig(likelihood_scale=1e6, prior_precision=1).name == (
        "all-layer diag, 1e+06 pairs, prior 1"
    )
