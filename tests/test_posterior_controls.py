"""The controls benchmark runs (quick mode) and reports each LAM row beside its control."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_quick_controls_table_has_each_control(tmp_path):
    bench = _load(ROOT / "benchmarks" / "posterior_controls.py", "posterior_controls")
    saved = tmp_path / "rows.json"
    table = bench.main(["--quick", "--candidates", "4", "--save", str(saved)])
    lines = table.splitlines()
    assert lines[0].startswith("| method | AUROC held-out |")
    assert lines[0].rstrip().endswith("| Spearman vs per-sample | score s |")
    names = [line.split(" | ")[0].lstrip("| ") for line in lines[2:]]
    fitted = [n for n in names if n.endswith(": fitted")]
    assert fitted and all(n.replace(": fitted", ": curvature off") in names for n in fitted)
    assert "isotropic noise (all), tuned on validation" in names
    assert "kNN distance, penultimate features" in names
    # each LAM row also with 4 candidates per query, with its rank agreement
    (seed_rows,) = json.loads(saved.read_text())
    for name in fitted:
        for suffix in ("fitted", "curvature off"):
            row = seed_rows[name.replace("fitted", f"{suffix}, 4 candidates")]
            assert -1.0 <= row["Spearman vs per-sample"] <= 1.0
            assert row["score s"] > 0
    assert not any("scores" in row for row in seed_rows.values())  # raw scores are not saved


def test_reference_preset_temperature_counts_n_squared_pairs():
    preset = _load(ROOT / "examples" / "lam_reference.py", "lam_reference")
    # an epoch of 128-sample batches over 60k images offers 60000/128 * 128*127/2 pairs
    offered = 60000 / 128 * 128 * 127 / 2
    assert preset.reference_temperature(60000, 128) == pytest.approx(offered / 60000**2)
    assert preset.REFERENCE_MARGIN**2 == pytest.approx(0.49)


def test_merge_joins_runs_of_a_seed_and_selects_on_validation_ece(tmp_path):
    bench = _load(ROOT / "benchmarks" / "posterior_controls.py", "posterior_controls")
    columns = dict.fromkeys(bench.COLUMNS, 0.5)

    def rows(name, val_ece, auroc):
        return {
            f"{name}: fitted": {**columns, "val ECE": val_ece, "AUROC held-out": auroc},
            f"{name}: curvature off": {**columns, "val ECE": 0.3, "AUROC held-out": 0.4},
        }

    # seed 0: A has the lower validation ECE; seed 1: B
    runs = {"a0": rows("A", 0.1, 0.91), "b0": rows("B", 0.2, 0.81)}
    runs |= {"a1": rows("A", 0.3, 0.92), "b1": rows("B", 0.05, 0.82)}
    for name, seed_rows in runs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps([seed_rows]))
    groups = [f"{tmp_path / 'a0.json'}+{tmp_path / 'b0.json'}"]
    groups.append(f"{tmp_path / 'a1.json'}+{tmp_path / 'b1.json'}")
    results = bench.load_merged(groups)
    assert len(results) == 2 and all(len(r) == 4 for r in results)
    assert bench.add_selected_rows(results, ["A", "B"]) == ["A", "B"]
    selected = [r["selected on validation ECE: fitted"]["AUROC held-out"] for r in results]
    assert selected == [0.91, 0.82]
    with pytest.raises(ValueError, match="no rows for"):
        bench.add_selected_rows(results, ["A", "C"])


def test_quick_prior_choices_each_beside_its_control():
    bench = _load(ROOT / "benchmarks" / "posterior_controls.py", "posterior_controls")
    # --quick keeps the first and the last configuration: a per-layer marglik and a
    # validation grid search
    wanted = ("marglik per layer", "diag, dataset scale, validation pair NLL")
    chosen = [n for n in bench.PRIOR_CONFIGS if n.endswith(wanted)]
    assert len(chosen) == 2
    bench.PRIOR_CONFIGS = {n: bench.PRIOR_CONFIGS[n] for n in chosen}
    table = bench.main(["--priors", "--quick"])
    names = [line.split(" | ")[0].lstrip("| ") for line in table.splitlines()[2:]]
    for name in chosen:
        assert f"{name}: fitted" in names and f"{name}: curvature off" in names


def test_quick_scores_table_reports_every_score_beside_its_control():
    bench = _load(ROOT / "benchmarks" / "posterior_controls.py", "posterior_controls")
    table = bench.main(["--quick", "--scores", "--only", "last-layer kron"])
    names = [line.split(" | ")[0].lstrip("| ") for line in table.splitlines()[2:]]
    scores = ("sampled_std", "trace", "variance_ratio", "knn_variance_ratio")
    for score in (*scores, "expected kNN distance (closed form)"):
        for suffix in ("fitted", "curvature off"):
            assert f"LAM last-layer kron, dataset scale, marglik, {score}: {suffix}" in names
    # the variance ratio's control is 1 for every input: no ranking (AUROC 0.5)
    off = next(line for line in table.splitlines() if "variance_ratio: curvature off" in line)
    assert off.count(" 0.500 ± 0.000 ") == 3  # held-out, noise, validation noise

    # knn_variance_ratio's control is the default score's: the same row of figures
    def figures(label):
        line = next(line for line in table.splitlines() if f"| {label} " in line)
        return line.split(" | ")[1:4]

    name = "LAM last-layer kron, dataset scale, marglik"
    assert figures(f"{name}, knn_variance_ratio: curvature off") == figures(
        f"{name}: curvature off"
    )


def test_scores_flag_chooses_names_and_refuses_unknown_ones():
    _load(ROOT / "benchmarks" / "posterior_controls.py", "posterior_controls")  # sets sys.path
    from posterior_controls_scores import ALL_OTHER, IMAGE_SCORES, chosen_scores

    assert chosen_scores(None, image=False) == ()
    assert chosen_scores([], image=False) == ALL_OTHER
    assert chosen_scores([], image=True) == IMAGE_SCORES
    assert chosen_scores(["knn_variance_ratio"], image=True) == ("knn_variance_ratio",)
    with pytest.raises(SystemExit, match="unknown"):
        chosen_scores(["knn"], image=False)
    with pytest.raises(SystemExit, match="digits only"):
        chosen_scores(["expected_knn"], image=True)
