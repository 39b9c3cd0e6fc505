"""The scripts as users run them: training beats chance, predict's formats, one-line errors."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, SAMPLE, run, shared_file
from helpers import one_line_error

METRIC_KEYS = {
    "epoch",
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "test_macro_f1",
    "n_train",
    "n_valid",
    "n_test",
    "train_samples_per_s",
    "train_tokens_per_s",
    "seconds",
}


def test_tiny_training_beats_chance_and_logs_metrics(tiny_checkpoint):
    folder, rows = tiny_checkpoint
    assert [row["epoch"] for row in rows] == [1, 2]
    assert METRIC_KEYS <= set(rows[-1])
    assert rows[-1]["n_train"] == 5000 and rows[-1]["n_test"] == 500 and rows[-1]["n_valid"] == 0
    assert rows[-1]["test_accuracy"] > 0.6  # balanced binary labels: chance is 0.5
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    info = json.loads((folder / "classifier.json").read_text())
    assert (
        info["label_names"] == ["부정", "긍정"] and info["args"]["lr"] == 3e-4
    )  # tiny preset default
    assert info["epoch"] == 2  # without a validation split the last epoch is kept


def test_predict_plain_and_json(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    out = run(
        "predict.py", "--model_dir", folder, "이 영화 정말 재밌다", "최악의 영화"
    ).stdout.splitlines()
    assert len(out) == 2
    label, probability, text = out[0].split("\t")
    assert (
        label in ("부정", "긍정")
        and 0.5 <= float(probability) <= 1
        and text == "이 영화 정말 재밌다"
    )
    rows = [
        json.loads(line)
        for line in run(
            "predict.py", "--model_dir", folder, "--json", "좋아요", "별로"
        ).stdout.splitlines()
    ]
    assert [r["text"] for r in rows] == ["좋아요", "별로"]
    for row in rows:
        assert set(row) == {"text", "label", "probability", "probs"} and set(row["probs"]) == {
            "부정",
            "긍정",
        }
        assert row["probability"] == max(row["probs"].values()) and row["label"] == max(
            row["probs"], key=row["probs"].get
        )
        assert sum(row["probs"].values()) == pytest.approx(1, abs=1e-5)


def test_predict_stdin(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    out = run(
        "predict.py", "--model_dir", folder, "-", input="좋아요\n\n별로예요\n"
    ).stdout.splitlines()
    assert [line.split("\t")[2] for line in out] == ["좋아요", "별로예요"]


def test_predict_file_scores_like_training(tiny_checkpoint, tmp_path):
    folder, rows = tiny_checkpoint
    # the same 500 test rows the training run evaluated (seeded subset)
    from _1_data import read_table, take_subset

    test = take_subset(read_table(os.path.join(SAMPLE, "ratings_test.txt")), 500, 42)
    path = tmp_path / "test.jsonl"
    path.write_text(
        "".join(
            json.dumps({"document": t, "label": int(y)}, ensure_ascii=False) + "\n" for t, y in test
        )
    )
    result = run(
        "predict.py", "--model_dir", folder, "--file", path, "--output", tmp_path / "p.jsonl"
    )
    assert (
        f"accuracy {rows[-1]['test_accuracy']:.4f}, macro_f1 {rows[-1]['test_macro_f1']:.4f}"
        in result.stderr
    )
    out = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["text"] for r in out] == [t for t, _ in test]  # file order


def test_predict_plain_text_file(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint
    path = tmp_path / "reviews.txt"
    path.write_text("정말 좋다\n\n다시는 안 본다\r\n")
    out = run("predict.py", "--model_dir", folder, "--file", path, "--json").stdout.splitlines()
    assert [json.loads(line)["text"] for line in out] == ["정말 좋다", "다시는 안 본다"]


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--head_name", "mean"], "--head_name 'mean' is not one of cls, pooler, weight_avg, lstm"),
        (["--train_batch_size", "0"], "--train_batch_size 0 is out of range"),
        (["--lr", "-1"], "--lr -1.0 is out of range"),
        (["--max_len", "0"], "--max_len 0 is out of range"),
        (["--warmup_rate", "1.5"], "--warmup_rate 1.5 is out of range"),
        (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
        (["--train_file", "missing.tsv"], "missing.tsv: no such file"),
        (
            ["--model", "./no_such_model_dir", "--data_dir", SAMPLE],
            "--model ./no_such_model_dir: no such folder",
        ),
        (["--model", "klue-roberta", "--data_dir", SAMPLE], "not in the local Hugging Face cache"),
        (
            ["--model", "kobertt", "--data_dir", SAMPLE],
            "--model kobertt: not a preset (kobert, kcbert,",
        ),
        (
            ["--device", "xla"],
            "--device xla needs torch-xla: pip install torch==2.9.0 torch-xla==2.9.0",
        ),
        (["--save_steps", "-1"], "--save_steps -1 is out of range"),
        (["--test_batch_size", "0"], "--test_batch_size 0 is out of range"),
    ],
)
def test_training_errors_are_one_line(args, pattern):
    one_line_error(run("_3_main.py", *args, check=False), pattern)


def test_unseen_test_label_is_an_error(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,x\nb,y\n")
    (tmp_path / "test.csv").write_text("text,label\nc,z\n")
    result = run(
        "_3_main.py",
        "--model",
        "tiny",
        "--train_file",
        tmp_path / "train.csv",
        "--test_file",
        tmp_path / "test.csv",
        check=False,
    )
    one_line_error(result, "test.csv: labels ['z'] never appear in training")


def test_predict_errors_are_one_line(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint
    one_line_error(
        run("predict.py", "--model_dir", tmp_path / "none", "hi", check=False),
        "no such checkpoint folder",
    )
    (tmp_path / "bin.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    one_line_error(
        run("predict.py", "--model_dir", folder, "--file", tmp_path / "bin.txt", check=False),
        "contains NUL bytes",
    )
    one_line_error(
        run("predict.py", "--model_dir", folder, "--file", tmp_path / "no.tsv", check=False),
        "no.tsv: no such file",
    )


def test_minilm_on_sst2(minilm, tmp_path):
    """A real pretrained encoder fine-tuned briefly on real SST-2 sentences learns the task."""
    train = shared_file("sst2", "train.tsv")
    run(
        "_3_main.py",
        "--model",
        minilm,
        "--train_file",
        train,
        "--max_train_samples",
        1500,
        "--valid_ratio",
        0.2,
        "--max_eval_samples",
        300,
        "--total_epochs",
        1,
        "--lr",
        1e-4,
        "--head_name",
        "weight_avg",
        "--output_dir",
        tmp_path / "ck",
        "--cache_dir",
        "",
    )
    row = json.loads((tmp_path / "ck" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["n_valid"] == 300 and row["valid_accuracy"] > 0.7


def test_training_draws_curves(tiny_checkpoint):
    from matplotlib.image import imread

    folder, _ = tiny_checkpoint
    image = imread(folder / "curves.png")
    assert (
        image.shape[0] > 200 and image.shape[1] > 500 and image.std() > 0.05
    )  # a real picture, not blank


def test_confusion_matrix(tiny_checkpoint, tmp_path):
    from matplotlib.image import imread

    folder, rows = tiny_checkpoint
    result = run(
        "predict.py",
        "--model_dir",
        folder,
        "--file",
        os.path.join(SAMPLE, "ratings_test.txt"),
        "--output",
        tmp_path / "p.jsonl",
        "--confusion",
        tmp_path / "cm.png",
    )
    lines = result.stderr.splitlines()  # found by its header: a library's warning may come after it
    start = next(i for i, line in enumerate(lines) if line.startswith("true \\ predicted"))
    table = lines[start : start + 3]
    assert table[0].split()[-2:] == ["부정", "긍정"] and table[1].split()[0] == "부정"
    counts = [int(v) for line in table[1:] for v in line.split()[1:]]
    assert sum(counts) == 2000
    assert imread(tmp_path / "cm.png").shape[0] > 100


@pytest.mark.parametrize(
    "name, data, pattern",
    [
        ("binary.tsv", b"\x89PNG\r\n\x1a\n\x00\x00\x00", "binary.tsv: contains NUL bytes"),
        ("cp949.tsv", "text\tlabel\n좋다\t1\n".encode("cp949"), "cp949.tsv: not UTF-8 text"),
        ("fields.tsv", "text\tlabel\na\t1\nb\t0\textra\n", "fields.tsv:3: expected 2 fields"),
        (
            "columns.csv",
            "body,stars\na,1\n",
            "columns.csv: no text column among ['body', 'stars']; name it with --text_column",
        ),
        ("empty.jsonl", "", "empty.jsonl: the file has no rows"),
        (
            "broken.jsonl",
            '{"text": "a", "label": 1}\n{"text": \n',
            "broken.jsonl:2: not valid JSON",
        ),
        ("folder", None, "folder: cannot read"),
    ],
)
def test_bad_training_files_are_one_line(tmp_path, name, data, pattern):
    path = tmp_path / name
    if data is None:
        path.mkdir()
    else:
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    one_line_error(run("_3_main.py", "--model", "tiny", "--train_file", path, check=False), pattern)


def test_broken_checkpoint_folders_are_one_line(tiny_checkpoint, tmp_path):
    import shutil

    folder, _ = tiny_checkpoint
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    one_line_error(
        run("predict.py", "--model_dir", broken, "hi", check=False), "cannot load checkpoint"
    )
    weights.unlink()
    one_line_error(
        run("predict.py", "--model_dir", broken, "hi", check=False), "missing model.safetensors"
    )


def test_predict_starts_without_transformers(tiny_checkpoint):
    """predict.py runs BERT-family encoders as PlainEncoder and skips importing transformers (most
    of a cold start); the time itself is measured by bench/predict_speed.py."""
    folder, _ = tiny_checkpoint
    code = (
        "import sys, predict; p = predict.Predictor(sys.argv[1]); "
        "print(p.predict(['이 영화 정말 재밌다'])[0]['label'], "
        "'transformers' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(folder)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split() in (["긍정", "False"], ["부정", "False"])
