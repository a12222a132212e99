"""The evaluation layer: rows, seeds, aggregation and the Markdown table."""

from __future__ import annotations

import math

import pytest
import torch

from laplace_metric.evaluation import (
    Column,
    ResultTable,
    SeedResult,
    aggregate,
    mean_std,
    ood_metrics,
    retrieval_metrics,
)


def _seeds() -> list[SeedResult]:
    results = []
    for seed, auroc in ((0, 0.6), (1, 0.8)):
        result = SeedResult(seed=seed)
        result.add_row("LAM", {"AUROC": auroc, "ECE": 0.01 * (seed + 1)})
        result.add_row("kNN", {"AUROC": 0.5})
        results.append(result)
    return results


def test_table_renders_mean_and_sample_std_in_row_order():
    table = ResultTable.from_seeds(_seeds(), ["AUROC", Column("ECE", digits=4)])
    lines = table.to_markdown().splitlines()
    assert lines[0] == "| method | AUROC | ECE |"
    assert lines[2] == "| LAM | 0.700 ± 0.141 | 0.0150 ± 0.0071 |"
    assert lines[3] == "| kNN | 0.500 ± 0.000 | - |"


def test_a_new_row_is_one_call():
    table = ResultTable.from_seeds(_seeds(), ["AUROC"])
    table.add_row("isotropic weight noise", {"AUROC": [0.55, 0.65]})
    cells = table.aggregate()["isotropic weight noise"]["AUROC"]
    assert cells == pytest.approx((0.6, math.sqrt(0.005)))
    assert table.to_markdown().splitlines()[-1].startswith("| isotropic weight noise | 0.600")


def test_nan_values_are_dropped_and_cost_columns_hide_the_std():
    assert mean_std([math.nan, math.nan]) is None
    assert mean_std([1.0, math.nan, 3.0]) == pytest.approx((2.0, math.sqrt(2.0)))
    assert mean_std([2.0]) == (2.0, 0.0)
    assert Column("time s", digits=0, std=False).format(12.4, 3.0) == "12"
    assert aggregate(_seeds(), ["AUROC"])["kNN"] == {"AUROC": (0.5, 0.0)}


def test_seed_result_keeps_plot_data_and_rejects_unknown_keys():
    result = SeedResult(seed=3)
    scores = {"test": torch.zeros(2)}
    result.add_row("m", {"AUROC": 0.5}, scores=scores, curve="c")
    assert result.scores["m"] is scores and result.curves["m"] == "c"
    assert "m" not in result.reliability
    with pytest.raises(TypeError, match="unknown plot data"):
        result.add_row("m", {}, histogram=1)


def test_measures_match_the_metrics():
    torch.manual_seed(0)
    emb, labels = torch.randn(20, 3), torch.arange(20) % 4
    row = retrieval_metrics(emb, labels, emb, labels, recall_ks=(1, 5), map_ks=(5,))
    assert list(row) == ["recall@1", "recall@5", "mAP@5", "MAP@R"]
    assert row["recall@1"] == 1.0  # every query finds itself
    ood = ood_metrics(torch.zeros(5), torch.ones(5), suffix=" noise")
    assert ood == {"AUROC noise": 1.0, "AUPR noise": 1.0}
