"""The main job, ``laplace-metric demo``, end to end on tiny settings."""

from __future__ import annotations

import json

import pytest

from laplace_metric import demo
from laplace_metric.cli import build_parser, main


def test_demo_end_to_end(tmp_path, monkeypatch, capsys):
    stages: list[str] = []
    run_seed = demo.run_seed

    def recording_run_seed(config, seed, on_stage=None):
        def record(name: str) -> None:
            stages.append(name)
            if on_stage is not None:
                on_stage(name)

        return run_seed(config, seed, record)

    monkeypatch.setattr(demo, "run_seed", recording_run_seed)
    argv = ["demo", "--epochs", "1", "--seeds", "0", "--members", "2", "--samples", "3"]
    argv += ["--output-dir", str(tmp_path), "--no-progress"]
    assert main(argv) == 0

    assert stages == list(demo.STAGES)
    out = capsys.readouterr().out
    assert out.startswith("| method | " + " | ".join(demo.COLUMNS) + " |")
    rows = json.loads((tmp_path / "results.json").read_text())[0]
    for name, *_ in demo.POSTHOC_CONFIGS:
        assert f"{name}, sampled kNN" in rows
    for name in (
        "kNN distance (deterministic)",
        "Mahalanobis (penultimate)",
        "MC dropout p=0.1",
        "ensemble of 2, mean kNN",
        "online LAM all-layer diag, sampled kNN",
    ):
        assert name in rows
        assert 0.0 <= rows[name]["AUROC held-out"] <= 1.0
    assert (tmp_path / "results.md").read_text().startswith("| method |")
    assert (tmp_path / "sparsification.png").stat().st_size > 0
    assert len(list(tmp_path.glob("*.png"))) >= 5


def test_demo_flags_are_validated():
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--dataset", "cifar"])
    args = parser.parse_args(["demo"])
    assert (args.dataset, args.epochs, args.seeds) == ("digits", 30, [0, 1, 2])


def test_quickstart_example_runs(tmp_path, monkeypatch, capsys):
    """``examples/quickstart.py`` (not part of the docs gallery) runs as a plain script."""
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "sampled kNN" in out and "recall@1" in out
    assert (tmp_path / "quickstart_uncertainty.png").stat().st_size > 0
