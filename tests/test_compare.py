"""compare.py: runs side by side on their very same test texts, the statistics against known
cases, the refusals, and TensorBoard's event files read back."""

import json
import shutil

import numpy as np
import pytest
from conftest import run
from helpers import one_line_error, train_args

from _3_main import main
from metrics import mcnemar_p, paired_bootstrap


def test_mcnemar_exact_against_a_known_case():
    # b = 10 texts only A gets right, c = 2 only B: 2 * P(X <= 2), X ~ Binomial(12, 1/2)
    assert mcnemar_p(10, 2) == pytest.approx(0.0386, abs=5e-5)
    assert mcnemar_p(2, 10) == mcnemar_p(10, 2) and mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(5, 5) == 1.0


def test_the_paired_bootstrap_agrees_with_the_normal_paired_interval():
    """10,000 synthetic texts, A right on 85% and B on 86% of them, independently: the seeded
    bootstrap's 95% interval of the accuracy difference within 0.002 of the normal one."""
    rng = np.random.default_rng(1)
    n, eye = 10_000, np.eye(2, dtype=bool)
    truth = rng.integers(0, 2, n)
    a = np.where(rng.random(n) < 0.85, truth, 1 - truth)
    b = np.where(rng.random(n) < 0.86, truth, 1 - truth)
    diff, low, high = paired_bootstrap(eye[truth], eye[a], eye[b])["accuracy"]
    d = (b == truth).astype(float) - (a == truth).astype(float)
    half = 1.96 * d.std(ddof=1) / np.sqrt(n)
    assert diff == pytest.approx(d.mean())
    assert low == pytest.approx(d.mean() - half, abs=0.002)
    assert high == pytest.approx(d.mean() + half, abs=0.002)


@pytest.fixture(scope="module")
def runs(small_data, tmp_path_factory):
    """Four tiny runs on the same 100 test texts: seeds 1 and 2, at the default --lr and at a
    learning rate too small to learn anything (1e-7)."""
    root = tmp_path_factory.mktemp("runs")
    for name, extra in (
        ("a1", ["--seed", 1]),
        ("a2", ["--seed", 2]),
        ("b1", ["--seed", 1, "--lr", 1e-7]),
        ("b2", ["--seed", 2, "--lr", 1e-7]),
    ):
        main(
            train_args(
                small_data,
                root / name,
                "--total_epochs",
                1,
                "--tensorboard",
                "--log_interval",
                5,
                *extra,
            )
        )
    return root


def test_compare_prints_the_table_the_verdicts_and_the_groups(runs, tmp_path):
    result = run(
        "compare.py",
        *(runs / n for n in ("a1", "a2", "b1", "b2")),
        "--output",
        tmp_path / "c.png",
        "--resamples",
        500,
    )
    lines = result.stdout.splitlines()
    header = lines[0].split()
    # only the flags that differ, not where the runs were written or how
    assert header[:3] == ["run", "lr", "seed"] and "output_dir" not in header, lines[0]
    for other in ("a2", "b1", "b2"):
        verdict = next(line for line in lines if line.startswith(f"{other} vs a1 on 100 test"))
        assert "95% interval" in verdict and ("no difference" in verdict or "than a1" in verdict)
    assert any(line.strip().startswith("a1, a2: accuracy") for line in lines)
    assert any("seed-to-seed sd" in line for line in lines)
    assert (tmp_path / "c.png").stat().st_size > 10_000


def test_a_run_keeps_its_predictions_beside_its_checkpoint(runs):
    kept = json.loads((runs / "a1" / "predictions.json").read_text(encoding="utf-8"))
    test = kept["splits"]["test"]
    info = json.loads((runs / "a1" / "classifier.json").read_text(encoding="utf-8"))
    assert kept["epoch"] == info["epoch"] and kept["problem"] == "single_label"
    assert len(test["label"]) == len(test["predicted"]) == len(test["probs"]) == 100
    assert test["fingerprint"]["rows"] == 100
    right = np.mean(np.array(test["label"]) == np.array(test["predicted"]))
    assert right == pytest.approx(info["metrics"]["test_accuracy"])


def test_tensorboard_event_files_hold_the_scalars(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(runs / "a1" / "tensorboard" / "finetune"))
    board.Reload()
    tags = set(board.Tags()["scalars"])
    assert {"step/loss", "step/lr", "step/samples_per_s", "epoch/test_accuracy"} <= tags
    info = json.loads((runs / "a1" / "classifier.json").read_text(encoding="utf-8"))
    (event,) = board.Scalars("epoch/test_accuracy")
    assert event.value == pytest.approx(info["metrics"]["test_accuracy"], abs=1e-6)


def test_compare_refuses_what_does_not_compare(runs, small_data, multi_label_checkpoint, tmp_path):
    other = tmp_path / "subset"  # 50 of the 100 test texts
    main(train_args(small_data, other, "--total_epochs", 1, "--max_eval_samples", 50))
    bare = tmp_path / "bare"
    shutil.copytree(runs / "a1", bare)
    (bare / "predictions.json").unlink()
    for folders, message in (
        ([runs / "a1", other], "was tested on other texts than"),
        ([runs / "a1", multi_label_checkpoint[0]], "is a multi_label run"),
        ([runs / "a1", bare], "no predictions.json"),
    ):
        one_line_error(run("compare.py", *folders, check=False), message)
