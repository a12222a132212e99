"""Tests of laplace_metric.metrics on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_metric_learning.distances import CosineSimilarity
from torchmetrics.functional.classification import binary_calibration_error

from laplace_metric import metrics as M

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DEVICE_PARAMS = [pytest.param(d, marks=pytest.mark.gpu) if d == "cuda" else d for d in DEVICES]


@pytest.fixture(params=DEVICE_PARAMS)
def device(request) -> str:
    return request.param


def line(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Points on a line: 0, 1, 3 (class 0) and 10, 12 (class 1), plus 4.5 (class 1)."""
    x = torch.tensor([[0.0], [1.0], [3.0], [10.0], [12.0], [4.5]], device=device)
    y = torch.tensor([0, 0, 0, 1, 1, 1], device=device)
    return x, y


# ---------------------------------------------------------------------------- retrieval
def test_recall_at_k_leave_one_out(device: str) -> None:
    x, y = line(device)
    # nearest neighbours (self excluded): 0->1 ok, 1->0 ok, 3->4.5 wrong, 10->12 ok, 12->10 ok,
    # 4.5->3 wrong: recall@1 = 4/6. Second neighbours: 3->1 ok, 4.5->1 wrong: recall@2 = 5/6.
    assert M.recall_at_k(x, y, x, y, k=1, exclude_self=True) == pytest.approx(4 / 6)
    assert M.recall_at_k(x, y, x, y, k=2, exclude_self=True) == pytest.approx(5 / 6)
    # 4.5's 3 nearest: 3, 1, 0 (all class 0), then 10 at distance 5.5.
    assert M.recall_at_k(x, y, x, y, k=3, exclude_self=True) == pytest.approx(5 / 6)
    assert M.recall_at_k(x, y, x, y, k=4, exclude_self=True) == pytest.approx(1.0)


def test_recall_without_exclude_self_finds_itself(device: str) -> None:
    x, y = line(device)
    assert M.recall_at_k(x, y, x, y, k=1) == 1.0


def test_recall_separate_database(device: str) -> None:
    db = torch.tensor([[0.0, 0.0], [5.0, 0.0]], device=device)
    db_y = torch.tensor([0, 1], device=device)
    q = torch.tensor([[1.0, 0.0], [4.0, 1.0], [2.0, 0.0]], device=device)
    q_y = torch.tensor([0, 1, 1], device=device)
    assert M.recall_at_k(q, q_y, db, db_y, k=1) == pytest.approx(2 / 3)


def test_recall_at_1_matches_pml_precision_at_1(device: str) -> None:
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 4, generator=g).to(device)
    y = torch.randint(0, 3, (60,), generator=g).to(device)
    calc = AccuracyCalculator(
        include=("precision_at_1",),
        knn_func=CustomKNN(LpDistance(normalize_embeddings=False)),
        device=torch.device(device),
    )
    expected = calc.get_accuracy(x, y, x, y, ref_includes_query=True)["precision_at_1"]
    assert M.recall_at_k(x, y, x, y, 1, exclude_self=True) == pytest.approx(expected)


def test_custom_distance_callable_changes_neighbours(device: str) -> None:
    # Under the Euclidean distance the query (1, 0) is closest to (2, 0); under a distance that
    # only looks at the second coordinate it is closest to (5, 0.1)... both have y = 0, so use
    # a "reverse" distance: -|a - b| makes the farthest point the nearest.
    db = torch.tensor([[2.0, 0.0], [9.0, 0.0]], device=device)
    db_y = torch.tensor([0, 1], device=device)
    q = torch.tensor([[1.0, 0.0]], device=device)
    q_y = torch.tensor([0], device=device)

    def reverse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return -torch.cdist(a, b)

    assert M.recall_at_k(q, q_y, db, db_y, 1) == 1.0
    assert M.recall_at_k(q, q_y, db, db_y, 1, distance=reverse) == 0.0


def test_pml_similarity_is_accepted(device: str) -> None:
    db = torch.tensor([[1.0, 0.0], [0.0, 1.0]], device=device)
    db_y = torch.tensor([0, 1], device=device)
    q = torch.tensor([[10.0, 1.0], [0.1, 3.0]], device=device)  # cosine ignores the norm
    q_y = torch.tensor([0, 1], device=device)
    assert M.recall_at_k(q, q_y, db, db_y, 1, distance=CosineSimilarity()) == 1.0


def test_map_at_r_hand_computed(device: str) -> None:
    # Leave-one-out on the line: class 0 has R = 2 other items, class 1 too.
    # 0: neighbours 1(+), 3(+) -> AP = (1 + 1) / 2 = 1
    # 1: neighbours 0(+), 3(+) -> 1
    # 3: neighbours 4.5(-), 1(+) -> (0 + 1/2) / 2 = 1/4
    # 10: 12(+), 4.5(+) -> 1
    # 12: 10(+), 4.5(+) -> 1
    # 4.5: 3(-), 1(-) -> 0
    x, y = line(device)
    assert M.map_at_r(x, y, x, y, exclude_self=True) == pytest.approx((4 + 0.25) / 6)


def test_map_at_k_hand_computed(device: str) -> None:
    # k = 3, pml divides by R = 2:
    # 0: 1(+), 3(+), 4.5(-) -> (1 + 1) / 2 = 1;  1: 0(+), 3(+) -> 1
    # 3: 4.5(-), 1(+), 0(+) -> (1/2 + 2/3) / 2 = 7/12
    # 10: 12(+), 4.5(+) -> 1;  12: 10(+), 4.5(+) -> 1
    # 4.5: 3(-), 1(-), 0(-) -> 0
    x, y = line(device)
    expected = (4 + 7 / 12) / 6
    assert M.map_at_k(x, y, x, y, k=3, exclude_self=True) == pytest.approx(expected)


def test_knn_distance_score(device: str) -> None:
    train = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 5.0]], device=device)
    q = torch.tensor([[0.0, 1.0]], device=device)
    assert M.knn_distance_score(q, train, k=1).item() == pytest.approx(1.0)
    assert M.knn_distance_score(q, train, k=2).item() == pytest.approx(math.sqrt(10.0))
    assert M.knn_distance_score(q, train, k=3).item() == pytest.approx(4.0)
    loo = M.knn_distance_score(train, train, k=1, exclude_self=True)
    assert loo.cpu().tolist() == pytest.approx([3.0, 3.0, 5.0])


def test_top1_labels(device: str) -> None:
    db = torch.tensor([[0.0], [5.0]], device=device)
    assert M.top1_labels(
        torch.tensor([[1.0], [4.0]], device=device), db, torch.tensor([7, 8], device=device)
    ).cpu().tolist() == [7, 8]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k must be in"),
        ({"k": 7}, "k must be in"),
        ({"k": 6, "exclude_self": True}, "k must be in"),
    ],
)
def test_recall_bad_k(kwargs: dict, match: str) -> None:
    x, y = line("cpu")
    with pytest.raises(ValueError, match=match):
        M.recall_at_k(x, y, x, y, **kwargs)


def test_retrieval_input_errors() -> None:
    x, y = line("cpu")
    with pytest.raises(ValueError, match="dimension"):
        M.recall_at_k(x, y, torch.zeros(6, 2), y)
    with pytest.raises(ValueError, match="entries"):
        M.recall_at_k(x, y[:3], x, y)
    with pytest.raises(TypeError, match="integer"):
        M.recall_at_k(x, y.float(), x, y)
    with pytest.raises(ValueError, match="NaN"):
        M.recall_at_k(x.clone().fill_(math.nan), y, x, y)
    with pytest.raises(ValueError, match="empty"):
        M.recall_at_k(x[:0], y[:0], x, y)
    with pytest.raises(ValueError, match="exclude_self"):
        M.recall_at_k(x[:3], y[:3], x, y, exclude_self=True)
    with pytest.raises(ValueError, match="same-class"):
        M.map_at_r(x[:2], torch.tensor([5, 5]), x, y)
    with pytest.raises(ValueError, match="must return"):
        M.recall_at_k(x, y, x, y, distance=lambda a, b: torch.zeros(2, 2))


# ---------------------------------------------------------------------------- OOD
def test_ood_auroc_hand_computed(device: str) -> None:
    s_in = torch.tensor([0.0, 1.0, 2.0], device=device)
    s_out = torch.tensor([1.5, 3.0, 100.0], device=device)
    # 8 of the 9 (out, in) pairs are ordered correctly.
    assert M.ood_auroc(s_in, s_out) == pytest.approx(8 / 9, abs=1e-6)
    assert M.ood_auroc(s_out, s_in) == pytest.approx(1 / 9, abs=1e-6)


def test_ood_auroc_ties_and_large_scores() -> None:
    # Huge scores would saturate a sigmoid; the rescaling keeps them apart.
    s_in = torch.tensor([1e4, 2e4])
    s_out = torch.tensor([3e4, 4e4])
    assert M.ood_auroc(s_in, s_out) == pytest.approx(1.0)
    assert M.ood_auroc(torch.ones(4), torch.ones(3)) == pytest.approx(0.5)


def test_ood_aupr_hand_computed(device: str) -> None:
    s_in = torch.tensor([0.0, 2.0], device=device)
    s_out = torch.tensor([1.0, 3.0], device=device)
    # Ranking: 3 (out), 2 (in), 1 (out), 0 (in): AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    assert M.ood_aupr(s_in, s_out) == pytest.approx(5 / 6, abs=1e-6)
    assert M.ood_aupr(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == pytest.approx(1.0)


def test_ood_input_errors() -> None:
    with pytest.raises(ValueError, match="NaN"):
        M.ood_auroc(torch.tensor([0.0, math.nan]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="empty"):
        M.ood_aupr(torch.tensor([]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="shape"):
        M.ood_auroc(torch.zeros(2, 2), torch.ones(3))


# ---------------------------------------------------------------------------- calibration
def test_retrieval_confidence_from_samples(device: str) -> None:
    db = torch.tensor([[1.0, 0.0], [0.0, 1.0]], device=device)
    db_y = torch.tensor([0, 1], device=device)
    # Query 0: 3 of 4 samples near class 0, mean near class 0 -> confidence 0.75.
    # Query 1: all 4 samples near class 1 -> confidence 1.
    samples = torch.tensor(
        [
            [[1.0, 0.1], [0.1, 1.0]],
            [[1.0, 0.2], [0.2, 1.0]],
            [[0.9, 0.0], [0.0, 1.0]],
            [[0.0, 1.0], [0.1, 0.9]],
        ],
        device=device,
    )
    conf, pred = M.retrieval_confidence_from_samples(samples, db, db_y)
    assert conf.cpu().tolist() == pytest.approx([0.75, 1.0])
    assert pred.cpu().tolist() == [0, 1]
    # An explicit mean embedding that points to class 1 flips query 0's reference label.
    mean = torch.tensor([[0.0, 1.0], [0.0, 1.0]], device=device)
    conf, pred = M.retrieval_confidence_from_samples(samples, db, db_y, mean_emb=mean)
    assert conf.cpu().tolist() == pytest.approx([0.25, 1.0])
    assert pred.cpu().tolist() == [1, 1]


def test_retrieval_confidence_errors() -> None:
    db = torch.eye(2)
    with pytest.raises(ValueError, match=r"\(S, B, D\)"):
        M.retrieval_confidence_from_samples(torch.zeros(3, 2), db, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="samples_query contains NaN"):
        M.retrieval_confidence_from_samples(
            torch.full((3, 2, 2), math.nan), db, torch.tensor([0, 1])
        )
    with pytest.raises(ValueError, match="mean_emb"):
        M.retrieval_confidence_from_samples(
            torch.zeros(3, 2, 2), db, torch.tensor([0, 1]), mean_emb=torch.zeros(3, 2)
        )


def test_reliability_bins_hand_computed(device: str) -> None:
    conf = torch.tensor([0.05, 0.15, 0.45, 0.55, 0.95, 1.0], device=device)
    correct = torch.tensor([False, True, False, True, True, True], device=device)
    bins = M.reliability_diagram_data(conf, correct, n_bins=2)
    assert bins.count.cpu().tolist() == [3, 3]
    assert bins.confidence.cpu().tolist() == pytest.approx([0.65 / 3, 2.5 / 3])
    assert bins.accuracy.cpu().tolist() == pytest.approx([1 / 3, 1.0])
    # ECE = 1/2 |1/3 - 0.65/3| + 1/2 |1 - 2.5/3|
    expected = 0.5 * abs(1 / 3 - 0.65 / 3) + 0.5 * abs(1 - 2.5 / 3)
    assert M.retrieval_ece(conf, correct, n_bins=2) == pytest.approx(expected)


def test_reliability_empty_bins_are_nan() -> None:
    bins = M.reliability_diagram_data(torch.tensor([0.9, 0.95]), torch.tensor([1, 0]), 5)
    assert bins.count.tolist() == [0, 0, 0, 0, 2]
    assert torch.isnan(bins.accuracy[:4]).all() and torch.isnan(bins.confidence[:4]).all()
    assert M.retrieval_ece(torch.tensor([0.9, 0.95]), torch.tensor([1, 0]), 5) == pytest.approx(
        abs(0.5 - 0.925)
    )


def test_ece_matches_torchmetrics_inside_bins() -> None:
    g = torch.Generator().manual_seed(1)
    conf = torch.rand(500, generator=g, dtype=torch.float64) * 0.999
    correct = torch.rand(500, generator=g, dtype=torch.float64) < conf
    expected = binary_calibration_error(conf, correct.long(), n_bins=10, norm="l1").item()
    assert M.retrieval_ece(conf, correct, 10) == pytest.approx(expected, abs=1e-6)


def test_perfect_calibration_has_zero_ece() -> None:
    conf = torch.tensor([0.25] * 4 + [0.75] * 4)
    correct = torch.tensor([1, 0, 0, 0, 1, 1, 1, 0])
    assert M.retrieval_ece(conf, correct, 4) == pytest.approx(0.0, abs=1e-12)


def test_calibration_input_errors() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.retrieval_ece(torch.tensor([1.5]), torch.tensor([1]))
    with pytest.raises(ValueError, match="shape"):
        M.retrieval_ece(torch.tensor([0.5, 0.5]), torch.tensor([1]))
    with pytest.raises(ValueError, match="0/1"):
        M.retrieval_ece(torch.tensor([0.5]), torch.tensor([2]))
    with pytest.raises(ValueError, match="n_bins"):
        M.retrieval_ece(torch.tensor([0.5]), torch.tensor([1]), n_bins=0)


# ---------------------------------------------------------------------------- sparsification
def test_sparsification_hand_computed(device: str) -> None:
    unc = torch.tensor([3.0, 2.0, 1.0, 0.0], device=device)
    err = torch.tensor([1.0, 0.0, 1.0, 0.0], device=device)
    curve = M.sparsification_curve(unc, err, n_steps=4)
    assert curve.fractions.tolist() == pytest.approx([0.0, 0.25, 0.5, 0.75])
    # by uncertainty: keep all (1/2), drop q0 (1/3), drop q0,q1 (1/2), keep q3 only (0)
    assert curve.error.tolist() == pytest.approx([0.5, 1 / 3, 0.5, 0.0])
    # oracle drops the two errors first: 1/2, 1/3, 0, 0
    assert curve.oracle.tolist() == pytest.approx([0.5, 1 / 3, 0.0, 0.0])
    area = 0.25 * ((0.5 + 1 / 3) / 2 + (1 / 3 + 0.5) / 2 + (0.5 + 0.0) / 2)
    oracle_area = 0.25 * ((0.5 + 1 / 3) / 2 + (1 / 3) / 2)
    assert curve.area == pytest.approx(area)
    assert curve.error_area == pytest.approx(area - oracle_area)
    assert M.sparsification_error_area(unc, err, 4) == pytest.approx(area - oracle_area)


def test_sparsification_oracle_uncertainty_has_zero_area() -> None:
    g = torch.Generator().manual_seed(0)
    err = (torch.rand(200, generator=g) < 0.3).float()
    curve = M.sparsification_curve(err + 0.01 * torch.rand(200, generator=g), err, 10)
    assert curve.error_area == pytest.approx(0.0, abs=1e-12)
    # the reversed ordering is worse than the oracle
    assert M.sparsification_error_area(-err, err, 10) > 0.1


def test_sparsification_errors() -> None:
    with pytest.raises(ValueError, match="must match"):
        M.sparsification_curve(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="non-negative"):
        M.sparsification_curve(torch.zeros(3), -torch.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        M.sparsification_curve(torch.tensor([math.nan]), torch.zeros(1))
    with pytest.raises(ValueError, match="n_steps"):
        M.sparsification_curve(torch.zeros(3), torch.zeros(3), n_steps=0)


# ---------------------------------------------------------------------------- properties
floats = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None)
@given(st.lists(floats, min_size=1, max_size=30), st.lists(floats, min_size=1, max_size=30))
def test_auroc_is_antisymmetric(a: list[float], b: list[float]) -> None:
    s_in, s_out = torch.tensor(a), torch.tensor(b)
    assert M.ood_auroc(s_in, s_out) + M.ood_auroc(s_out, s_in) == pytest.approx(1.0, abs=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(floats, st.booleans()), min_size=1, max_size=60),
    st.integers(1, 30),
)
def test_oracle_bounds_the_sparsification_curve(rows: list, n_steps: int) -> None:
    unc = torch.tensor([r[0] for r in rows])
    err = torch.tensor([float(r[1]) for r in rows])
    curve = M.sparsification_curve(unc, err, n_steps)
    assert (curve.oracle <= curve.error + 1e-12).all()
    assert curve.error[0].item() == pytest.approx(err.mean().item())
    assert curve.error_area >= -1e-12


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000))
def test_recall_is_monotone_in_k(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(20, 3, generator=g)
    y = torch.randint(0, 4, (20,), generator=g)
    recalls = [M.recall_at_k(x, y, x, y, k, exclude_self=True) for k in (1, 2, 5, 19)]
    assert recalls == sorted(recalls)
