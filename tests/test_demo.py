"""The main job, ``laplace-metric demo``, end to end on tiny settings, and its command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from laplace_metric import demo
from laplace_metric_cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "1", "--members", "2", "--samples", "3", "--no-progress"]


def test_demo_end_to_end(tmp_path, monkeypatch, capsys):
    stages: list[str] = []
    run_seed = demo.run_seed

    def recording_run_seed(config, seed, on_stage=None):
        def record(name: str) -> None:
            stages.append(name)
            if on_stage is not None:
                on_stage(name)

        return run_seed(config, seed, record)

    monkeypatch.setattr(demo.runner, "run_seed", recording_run_seed)
    argv = ["demo", *TINY, "--seeds", "3", "--id-classes", "1", "2", "3", "7"]
    argv += ["--output-dir", str(tmp_path)]
    assert main(argv) == 0

    assert stages == list(demo.STAGES)
    out = capsys.readouterr().out
    assert out.startswith("| method | " + " | ".join(demo.COLUMNS) + " |")
    assert "in-distribution classes [1, 2, 3, 7]" in out
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [s["seed"] for s in saved] == [3]
    rows = saved[0]["rows"]
    for name, *_ in demo.POSTHOC_CONFIGS:
        assert f"{name}, posterior kNN" in rows
        assert f"{name}, sampled std" in rows
        assert f"{name}, kNN x variance ratio" in rows
        control = rows[f"{name} (curvature off), posterior kNN"]  # the control of each posterior
        assert 0.0 <= control["AUROC held-out"] <= 1.0 and 0.0 <= control["ECE"] <= 1.0
    for name in (
        "isotropic weight noise, tuned on validation",
        "kNN distance (penultimate features)",
        "kNN distance (deterministic)",
        "Mahalanobis (penultimate)",
        "MC dropout p=0.1",
        "ensemble of 2, mean kNN",
        "online LAM all-layer diag, posterior kNN",
    ):
        assert name in rows
        assert 0.0 <= rows[name]["AUROC held-out"] <= 1.0
    assert (tmp_path / "results.md").read_text().startswith("| method |")
    assert (tmp_path / "sparsification_seed3.png").stat().st_size > 0
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(pngs) >= 5 and all(name.endswith("_seed3.png") for name in pngs)


def test_partial_results_are_written_after_each_seed(tmp_path, monkeypatch):
    """An interruption during the second seed keeps the first seed's table and plots."""
    calls = []

    def interrupted(config, seed, on_stage=None):
        calls.append(seed)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return demo.SeedResult(seed=seed, rows={"method": {"AUROC noise": 0.5}})

    def plots(result, output_dir, config):
        path = output_dir / f"sparsification_seed{result.seed}.png"
        path.write_bytes(b"png")
        return [path]

    monkeypatch.setattr(demo.runner, "run_seed", interrupted)
    monkeypatch.setattr(demo.runner, "write_plots", plots)
    argv = ["demo", *TINY, "--seeds", "0", "1", "--output-dir", str(tmp_path)]
    assert main(argv) == 130
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [s["seed"] for s in saved] == [0]
    assert "partial: 1 of 2 seeds" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "sparsification_seed0.png").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["--samples", "1"], "--samples must be >= 2, got 1"),
        (["--members", "1"], "--members must be >= 2"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--seeds", "0", "0"], "--seeds has duplicates"),
        (["--seeds", "-1"], "--seeds must be non-negative"),
        (["--id-classes", "0", "11"], "--id-classes must be in 0..9"),
        (["--id-classes", "0"], "at least 2 classes"),
        (["--id-classes", *map(str, range(10))], "leaves at least one held out"),
        (["--device", "gpu"], "--device must be cpu, cuda"),
        (["--dataset", "cifar"], "invalid choice: 'cifar'"),
        (["--epochs", "ten"], "invalid int value: 'ten'"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) if "invalid" in message else _no_raise() as raised:
        status = main(["demo", *argv, "--output-dir", str(tmp_path / "out")])
    if raised is not None and raised.value is not None:
        status = raised.value.code
    assert status == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


class _no_raise:
    value = None

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_output_dir_that_is_a_file_fails_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo.runner, "run_seed", lambda *a, **k: pytest.fail("work started"))
    existing = tmp_path / "a_file"
    existing.write_text("x")
    assert main(["demo", "--output-dir", str(existing)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # root can write anywhere
            assert main(["demo", "--output-dir", str(locked / "sub")]) == 2
            assert "is not writable" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def test_flags_have_help_and_defaults():
    parser = build_parser()
    args = parser.parse_args(["demo"])
    assert (args.dataset, args.epochs, args.seeds) == ("digits", 30, [0, 1, 2])
    assert args.id_classes == [0, 1, 2, 3, 4, 5]
    demo_parser = parser._subparsers._group_actions[0].choices["demo"]
    for action in demo_parser._actions:
        if action.dest != "help":
            assert action.help, action.dest
    text = demo_parser.format_help()
    assert "(default: 30)" in text and "(default: digits)" in text


def test_help_and_version_answer_fast_without_torch():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = (
        "import sys, laplace_metric_cli as c\n"
        "try:\n    c.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    for argv in (["--help"], ["demo", "--help"], ["--version"], ["demo", "--epochs", "0"]):
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True
        )
        elapsed = time.perf_counter() - start
        assert done.returncode == 0, done.stderr
        assert elapsed < 5.0  # typically 0.1-0.3 s; torch alone takes several seconds
    version = subprocess.run(
        [sys.executable, "-m", "laplace_metric_cli", "--version"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert version.returncode == 0 and version.stdout.startswith("laplace-metric ")


def test_quickstart_example_runs_without_warnings(tmp_path):
    """``examples/quickstart.py`` runs as a plain script in a fresh interpreter, warning-free."""
    script = ROOT / "examples" / "quickstart.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "default"}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "posterior kNN" in done.stdout and "recall@1" in done.stdout
    assert "Warning" not in done.stderr, done.stderr
    assert (tmp_path / "quickstart_uncertainty.png").stat().st_size > 0


@pytest.mark.parametrize(
    "module, names",
    [
        ("laplace_metric.cli", ("build_parser", "main", "UsageError", "validate_demo_args")),
        ("laplace_metric.demo_report", ("format_table", "write_plots", "write_results")),
    ],
)
def test_moved_modules_warn_and_keep_their_names(module, names):
    import importlib

    sys.modules.pop(module, None)
    with pytest.warns(DeprecationWarning, match=module.replace(".", r"\.")):
        mod = importlib.import_module(module)
    for name in names:
        assert callable(getattr(mod, name))


def test_validation_module_is_a_deprecated_alias():
    import importlib

    from laplace_metric.metrics import PositivePairGaussianNLL

    sys.modules.pop("laplace_metric.validation", None)
    with pytest.warns(DeprecationWarning, match="laplace_metric.validation"):
        validation = importlib.import_module("laplace_metric.validation")
    assert validation.PositivePairGaussianNLL is PositivePairGaussianNLL
