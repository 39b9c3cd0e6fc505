"""Real classification data: several labels per text, headerless files with a label file,
skewed classes (weights, per-class report, the metric that picks the checkpoint, early stopping)."""

import argparse
import json
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import EMOTIONS, SAMPLE, emotion_ids, multi_label_args, run, shared_file
from helpers import one_line_error, write

from _1_data import check_problem, label_ids, load_corpus, read_label_file, read_table
from _3_main import make_loss, parse_args
from _3_run import early_stop, selection_score
from common import DataError
from heads import HEADS
from metrics import score_logits

# ----------------------------------------------------------------------------- reading labels


def test_headerless_tsv_with_label_ids(multi_label_data):
    examples = read_table(multi_label_data / "train.tsv", columns=["text", "labels"], label_sep=",")
    first_line = (multi_label_data / "train.tsv").read_text(encoding="utf-8").splitlines()[0]
    text, ids = first_line.split("\t")
    assert examples[0] == (text, tuple(ids.split(",")))  # the first row is data, not a header
    names = read_label_file(multi_label_data / "label.txt")
    assert names == EMOTIONS
    hot = label_ids(examples, names, "train", by_id="auto")
    assert hot.shape == (len(examples), 4) and hot.dtype == np.float32
    for (text, ids), row in zip(examples, hot):
        assert np.flatnonzero(row).tolist() == sorted(map(int, ids))
        assert ids == tuple(emotion_ids(text, ids[0]))


def test_jsonl_lists_names_and_ids_mix(tmp_path):
    path = write(
        tmp_path,
        "d.jsonl",
        '{"text": "a", "labels": ["joy", 1]}\n{"text": "b", "labels": "anger"}\n'
        '{"text": "c", "labels": [2, 2, "joy"]}\n',
    )
    examples = read_table(path, label_sep=",")
    assert examples == [("a", ("joy", "1")), ("b", ("anger",)), ("c", ("2", "joy"))]
    hot = label_ids(examples, ["joy", "sad", "anger"], "d", by_id="auto")
    assert hot.tolist() == [[1, 1, 0], [0, 0, 1], [1, 0, 1]]


@pytest.mark.parametrize(
    "content, kwargs, pattern",
    [
        (
            '{"text": "a", "label": ["x", "y"]}\n',
            {},
            r"d.jsonl:1: the label is a list .* --problem multi_label",
        ),
        ('{"text": "a", "label": []}\n', {"label_sep": ","}, r"d.jsonl:1: empty label list"),
        (
            '{"text": "a", "label": [1.5]}\n',
            {"label_sep": ","},
            r"d.jsonl:1: label 1.5 is not a class name",
        ),
        ('{"text": "a", "label": ""}\n', {"label_sep": ","}, r"d.jsonl:1: empty label list"),
    ],
)
def test_bad_label_lists_are_one_line(tmp_path, content, kwargs, pattern):
    with pytest.raises(DataError, match=pattern):
        read_table(write(tmp_path, "d.jsonl", content), **kwargs)


def test_empty_label_field_in_a_headerless_tsv_names_its_line(tmp_path):
    path = write(tmp_path, "d.tsv", "좋다\t1\n싫다\t,\n")
    with pytest.raises(DataError, match=r"d.tsv:2: empty label list"):
        read_table(path, columns=["text", "labels"], label_sep=",")


def test_headerless_file_without_columns_says_how(tmp_path):
    path = write(tmp_path, "d.tsv", "좋은 영화\t1\n나쁜 영화\t0\n")
    with pytest.raises(DataError, match=r"no text column .* --columns text,label"):
        read_table(path)


def test_unknown_label_ids_and_names(tmp_path):
    with pytest.raises(
        DataError,
        match=r"dev: labels \['7'\] are not names or line numbers of --label_file .*ids 0 to 2",
    ):
        label_ids([("a", ("1", "7"))], ["x", "y", "z"], "dev", by_id="auto")
    with pytest.raises(DataError, match=r"dev: labels \['w'\]"):
        label_ids([("a", ("x", "w"))], ["x", "y"], "dev")


LABELS = ["1", "2", "3"]  # a label file whose class names are digits


def test_a_label_that_is_a_name_of_one_class_and_the_line_of_another_is_refused():
    examples = [(f"t{i}", str(i % 3)) for i in range(300)]  # data labels 0, 1, 2: line numbers
    with pytest.raises(
        DataError,
        match=r"train: label '1' could be class '1' \(its name\) or class '2' "
        r"\(line number 1, from 0\); say which .* --data_labels names or "
        r"--data_labels line_numbers",
    ):
        label_ids(examples, LABELS, "train", by_id="auto")
    ids = label_ids(examples, LABELS, "train", by_id="line_numbers")
    assert np.bincount(ids).tolist() == [100, 100, 100]  # three classes, none merged
    with pytest.raises(
        DataError, match=r"labels \['0'\] are not names of --label_file .*names \['1', '2', '3'\]"
    ):
        label_ids(examples, LABELS, "train", by_id="names")
    named = [(f"t{i}", str(i % 3 + 1)) for i in range(300)]  # the names themselves
    assert np.bincount(label_ids(named, LABELS, "train", by_id="names")).tolist() == [100, 100, 100]
    assert label_ids([("a", "0"), ("b", "2")], ["0", "1", "2"], "t", by_id="auto") == [
        0,
        2,
    ]  # names = lines


def test_ambiguous_labels_stop_training_in_one_line_and_the_flag_settles_it(tmp_path):
    train = write(
        tmp_path,
        "train.tsv",
        "text\tlabel\n"
        + "".join(  # a header, though --columns is given
            f"리뷰 {i}번 {'좋다' if i % 3 else '별로'}\t{i % 3}\n" for i in range(90)
        ),
    )
    labels = write(tmp_path, "label.txt", "1\n2\n3\n")
    common = [
        "--model",
        "tiny",
        "--mlm_epochs",
        0,
        "--train_file",
        train,
        "--columns",
        "text,label",
        "--label_file",
        labels,
        "--total_epochs",
        1,
        "--max_len",
        16,
        "--cache_dir",
        "",
        "--output_dir",
        tmp_path / "out",
    ]
    result = run("_3_main.py", *common, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "could be class '1' (its name) or class '2'" in result.stderr.strip().splitlines()[-1]
    trained = run("_3_main.py", *common, "--data_labels", "line_numbers")
    scored = run(
        "predict.py", "--model_dir", tmp_path / "out", "--file", train, "--columns", "text,label"
    )
    assert (
        "90 texts" in scored.stderr
    )  # predict.py reads the labels as training did, and skips the header
    note = (
        f"note: {train}: the first row names the --columns (text,label); read as a header, "
        f"not as data"
    )
    assert note in trained.stderr.splitlines() and note in scored.stderr.splitlines()


def test_a_header_row_given_columns_is_skipped_with_a_note(tmp_path, capsys):
    path = write(tmp_path, "d.tsv", "Text\tLabel\n좋다\t1\n싫다\t0\n")
    assert read_table(path, columns=["text", "label"]) == [("좋다", "1"), ("싫다", "0")]
    assert capsys.readouterr().err == (
        f"note: {path}: the first row names the --columns (text,label); read as a "
        f"header, not as data\n"
    )
    headerless = write(tmp_path, "h.tsv", "좋다\t1\n싫다\t0\n")
    assert read_table(headerless, columns=["text", "label"]) == [("좋다", "1"), ("싫다", "0")]
    csv_file = write(tmp_path, "d.csv", "text,label\n좋다,1\n")
    assert read_table(csv_file, columns=["text", "label"]) == [("좋다", "1")]


def test_label_file_errors(tmp_path):
    with pytest.raises(DataError, match="each once .*'a'"):
        read_label_file(write(tmp_path, "l.txt", "a\nb\na\n"))
    with pytest.raises(DataError, match="found 1"):
        read_label_file(write(tmp_path, "l.txt", "a\n\n"))
    with pytest.raises(DataError, match=r"l.txt:2: empty line"):
        read_label_file(write(tmp_path, "l.txt", "a\n\nb\n"))
    assert read_label_file(write(tmp_path, "l.txt", "a\r\nb\n\n")) == ["a", "b"]


def test_problem_and_data_must_agree():
    with pytest.raises(
        DataError, match=r"label '4,27' joins several labels .* --problem multi_label"
    ):
        check_problem([("a", "4,27"), ("b", "3")], False, ",", "train.tsv")
    check_problem(
        [("a", "Sci/Tech, Science"), ("b", "Sports")], False, ",", "t"
    )  # a name with a comma
    with pytest.raises(DataError, match="every text has exactly one label"):
        check_problem([("a", ("1",)), ("b", ("0",))], True, ",", "train.tsv")


def test_goemotions_korean_as_published():
    train = shared_file("goemotions_ko", "train.tsv")
    folder = os.path.dirname(train)
    args = parse_args(
        [
            "--train_file",
            train,
            "--valid_file",
            os.path.join(folder, "dev.tsv"),
            "--columns",
            "text,labels",
            "--label_file",
            os.path.join(folder, "label.txt"),
            "--problem",
            "multi_label",
        ]
    )
    splits = load_corpus(args)
    assert (len(splits["train"]), len(splits["valid"])) == (43410, 5426)
    names = read_label_file(args.label_file)
    assert len(names) == 28 and names[27] == "neutral"
    hot = label_ids(splits["valid"], names, "dev", by_id="auto")
    assert hot.sum(1).min() >= 1 and (hot.sum(1) > 1).any()
    assert [names[i] for i in np.flatnonzero(hot[1])] == [
        names[4],
        names[27],
    ]  # dev.tsv line 2: "4,27"


# ----------------------------------------------------------------------------- metrics


def counted_f1(truth, predicted):
    """Per-class F1 by counting, one text at a time."""
    f1 = []
    for c in range(truth.shape[1]):
        tp = sum(1 for t, p in zip(truth[:, c], predicted[:, c]) if t and p)
        fp = sum(1 for t, p in zip(truth[:, c], predicted[:, c]) if p and not t)
        fn = sum(1 for t, p in zip(truth[:, c], predicted[:, c]) if t and not p)
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None)
    return f1


def test_multi_label_metrics_against_counting():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(300, 5)).astype(np.float32)
    labels = (rng.random((300, 5)) < 0.3).astype(np.float32)
    labels[:, 4] = 0  # a class nobody has
    logits[:, 4] = -9  # and nobody predicts: left out of macro-F1
    names = list("abcde")
    result = score_logits(logits, labels, names, threshold=0.4)
    predicted = 1 / (1 + np.exp(-logits)) > 0.4
    f1 = counted_f1(labels.astype(bool), predicted)
    assert result["macro_f1"] == pytest.approx(np.mean([x for x in f1 if x is not None]))
    assert [result["per_class"][n]["f1"] for n in names[:4]] == pytest.approx(f1[:4])
    assert result["per_class"]["e"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    tp = (labels.astype(bool) & predicted).sum()
    assert result["micro_f1"] == pytest.approx(2 * tp / (labels.sum() + predicted.sum()))
    assert result["accuracy"] == pytest.approx(
        np.mean([(row == p).all() for row, p in zip(labels.astype(bool), predicted)])
    )
    assert result["loss"] == pytest.approx(
        F.binary_cross_entropy_with_logits(torch.tensor(logits), torch.tensor(labels)).item()
    )


def test_single_label_per_class_report():
    logits = torch.tensor([[2.0, 0, 0], [0, 2, 0], [0, 2, 0], [2, 0, 0], [0, 0, 2]])
    result = score_logits(logits, [0, 1, 0, 0, 1], ["a", "b", "c"])
    assert result["per_class"]["a"] == pytest.approx(
        {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3}
    )
    assert result["per_class"]["b"] == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    )
    assert result["accuracy"] == pytest.approx(0.6)
    assert result["macro_f1"] == pytest.approx(
        (0.8 + 0.5 + 0.0) / 3
    )  # c is predicted once, never true


def test_balanced_class_weights():
    args = argparse.Namespace(problem="single_label", class_weights="balanced")
    labels = [0] * 90 + [1] * 10
    loss = make_loss(args, labels, 2, torch.device("cpu"))
    logits, y = torch.randn(6, 2), torch.tensor([0, 1, 1, 0, 0, 1])
    weight = torch.tensor([100 / (2 * 90), 100 / (2 * 10)])
    assert loss(logits, y).item() == pytest.approx(F.cross_entropy(logits, y, weight=weight).item())
    args.problem = "multi_label"
    hot = np.zeros((100, 3), dtype=np.float32)
    hot[:20, 0], hot[:50, 1], hot[:, 2] = 1, 1, 1
    loss = make_loss(args, hot, 3, torch.device("cpu"))
    logits, y = torch.randn(4, 3), torch.tensor(hot[[0, 30, 60, 99]])
    pos_weight = torch.tensor([80 / 20, 50 / 50, 0 / 100])
    assert loss(logits, y).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight).item()
    )
    args.class_weights = "none"
    assert make_loss(args, hot, 3, torch.device("cpu"))(logits, y).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, y).item()
    )


def test_selection_and_early_stopping_rules():
    history = [
        {"valid_loss": v, "valid_macro_f1": f}
        for v, f in ((0.9, 0.3), (0.7, 0.5), (0.8, 0.5), (0.6, 0.4))
    ]
    assert [selection_score(r, "loss") for r in history] == [-0.9, -0.7, -0.8, -0.6]
    args = argparse.Namespace(early_stopping=2, metric_for_best="macro_f1")
    assert not early_stop(
        history[:3], args
    )  # one epoch without a better macro-F1 (a tie is not better)
    assert early_stop(history, args)
    args.metric_for_best = "loss"
    assert not early_stop(history, args)  # the loss improved at the last epoch
    args.early_stopping = 0
    assert not early_stop(history, args)


# ----------------------------------------------------------------------------- end to end


def scored_line(stderr):
    line = next(line for line in stderr.splitlines() if "texts, accuracy" in line)
    return dict(
        (k, float(v)) for k, v in (part.split() for part in line.split("texts, ")[1].split(", "))
    )


def test_multi_label_training_and_predict_agree(multi_label_checkpoint, multi_label_data, tmp_path):
    folder, rows = multi_label_checkpoint
    last = rows[-1]
    for key in ("valid_micro_f1", "valid_macro_f1", "valid_accuracy", "threshold"):
        assert key in last
    assert round(last["threshold"] / 0.05) * 0.05 == pytest.approx(
        last["threshold"]
    )  # from the grid
    assert set(last["valid_per_class"]) == set(EMOTIONS)
    assert last["valid_macro_f1"] > 0.5  # sentiment, 영화 and ㅋ are learnable; chance is far lower
    info = json.loads((folder / "classifier.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    best = max(
        rows, key=lambda r: r["valid_macro_f1"]
    )  # the default metric_for_best for multi_label
    assert info["epoch"] == best["epoch"] and info["threshold"] == best["threshold"]
    # scoring the labelled headerless file reproduces training's numbers
    result = run(
        "predict.py",
        "--model_dir",
        folder,
        "--file",
        multi_label_data / "dev.tsv",
        "--columns",
        "text,labels",
        "--output",
        tmp_path / "out.jsonl",
    )
    scored = scored_line(result.stderr)
    for key in ("accuracy", "macro_f1", "micro_f1", "loss", "threshold"):
        assert scored[key] == pytest.approx(
            best[f"valid_{key}" if key != "threshold" else key], abs=1e-4
        )
    assert "precision    recall" in result.stderr and "웃음" in result.stderr
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    for row in out:
        probs = [x["probability"] for x in row["labels"]]
        assert probs == sorted(probs, reverse=True) and all(p > best["threshold"] for p in probs)
        assert {x["label"] for x in row["labels"]} == {
            k for k, p in row["probs"].items() if p > best["threshold"]
        }
    # plain output: every label above the threshold, "-" when none
    plain = run(
        "predict.py", "--model_dir", folder, "--threshold", "0.99", "ㅋㅋㅋ 영화 최고"
    ).stdout
    assert plain.split("\t")[0] == "-" or all(
        float(x.split()[1]) > 0.99 for x in plain.split("\t")[0].split(", ")
    )
    plain = run(
        "predict.py", "--model_dir", folder, "--threshold", "0.01", "ㅋㅋㅋ 영화 최고"
    ).stdout
    assert plain.split("\t")[0].count(",") == 3 and plain.rstrip("\n").endswith(
        "\tㅋㅋㅋ 영화 최고"
    )


@pytest.mark.parametrize("head", sorted(HEADS))
def test_every_head_trains_multi_label(multi_label_data, tmp_path, head):
    out = tmp_path / "out"
    run(
        "_3_main.py",
        *multi_label_args(
            multi_label_data,
            out,
            "--head_name",
            head,
            "--max_train_samples",
            300,
            "--max_eval_samples",
            100,
            "--total_epochs",
            1,
        ),
    )
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= row["valid_macro_f1"] <= 1 and row["threshold"] == 0.5
    line = json.loads(run("predict.py", "--model_dir", out, "--json", "영화 ㅋㅋ").stdout)
    assert set(line["probs"]) == set(EMOTIONS) and isinstance(line["labels"], list)


@pytest.mark.parametrize(
    "extra, content, pattern",
    [
        (
            [],
            "좋다\t0\n영화 좋다\t1,2\n",
            r"train.tsv: label '1,2' joins several labels .* --problem multi_label",
        ),
        (
            ["--problem", "multi_label"],
            "좋다\t0\n싫다\t1\n",
            r"train.tsv: every text has exactly one label",
        ),
        (
            ["--problem", "multi_label"],
            "좋다\t0\n영화 좋다\t1,9\n",
            r"labels \['9'\] are not names or line numbers of --label_file .*ids 0 to 3",
        ),
        (
            ["--problem", "multi_label"],
            "좋다\t0,1\n영화 좋다\t\n",
            r"train.tsv:2: empty label list",
        ),
        (
            ["--problem", "multi_label", "--threshold", "1.5"],
            "좋다\t0,1\n",
            r"--threshold 1.5 is out of range",
        ),
        (
            ["--problem", "multi_label", "--tune_threshold"],
            "좋다\t0,1\n",
            r"--tune_threshold needs a validation split",
        ),
        (["--early_stopping", "2"], "좋다\t0\n", r"--early_stopping needs a validation split"),
        (["--label_names", "a,b"], "좋다\t0\n", r"give --label_names or --label_file, not both"),
    ],
)
def test_bad_label_input_is_one_line(multi_label_data, tmp_path, extra, content, pattern):
    train = write(tmp_path, "train.tsv", content)
    result = run(
        "_3_main.py",
        "--model",
        "tiny",
        "--train_file",
        train,
        "--columns",
        "text,labels",
        "--label_file",
        multi_label_data / "label.txt",
        "--output_dir",
        tmp_path / "out",
        *extra,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert re.search(pattern, lines[0]), lines[0]


def test_single_label_report_and_early_stopping(tmp_path):
    out = tmp_path / "out"
    result = run(
        "_3_main.py",
        "--model",
        "tiny",
        "--mlm_epochs",
        0,
        "--data_dir",
        SAMPLE,
        "--max_train_samples",
        1500,
        "--max_eval_samples",
        300,
        "--valid_ratio",
        0.2,
        "--total_epochs",
        5,
        "--early_stopping",
        1,
        "--metric_for_best",
        "loss",
        "--class_weights",
        "balanced",
        "--max_len",
        48,
        "--lr",
        2e-3,
        "--output_dir",
        out,
        "--cache_dir",
        tmp_path / "cache",
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    args = argparse.Namespace(early_stopping=1, metric_for_best="loss")
    expected = next((k for k in range(1, 6) if early_stop(rows[:k], args)), 5)
    assert len(rows) == expected
    assert ("early stopping: valid loss has not improved for 1 epochs" in result.stdout) == (
        expected < 5
    )
    best = min(rows, key=lambda r: r["valid_loss"])
    assert json.loads((out / "classifier.json").read_text())["epoch"] == best["epoch"]
    report = rows[-1]["test_per_class"]
    assert (
        set(report) == {"부정", "긍정"}
        and sum(r["support"] for r in report.values()) == rows[-1]["n_test"]
    )
    assert "valid F1 per class" in result.stdout


def test_pipeline_applies_a_sigmoid_as_predict_does(multi_label_checkpoint):
    from transformers import pipeline

    folder, _ = multi_label_checkpoint
    text = "ㅋㅋ 영화 별로"
    scores = pipeline("text-classification", model=str(folder), top_k=None)([text])[0]
    expected = json.loads(run("predict.py", "--model_dir", folder, "--json", text).stdout)["probs"]
    assert {x["label"]: x["score"] for x in scores} == pytest.approx(expected, abs=1e-5)


def test_one_label_convention_per_run(tmp_path):
    """Training labels by name and test labels by line number of --label_file: one line, where
    the test's labels became a class with no training rows before (accuracy 0, no warning)."""
    names = write(tmp_path, "label.txt", "부정\n긍정\n")
    rows = "".join(f"리뷰 {i}\t{['부정', '긍정'][i % 2]}\n" for i in range(40))
    train = write(tmp_path, "train.tsv", "text\tlabel\n" + rows)
    test = write(
        tmp_path, "test.tsv", "text\tlabel\n" + "".join(f"리뷰 {i}\t{i % 2}\n" for i in range(10))
    )
    result = run(
        "_3_main.py",
        "--model",
        "tiny",
        "--mlm_epochs",
        0,
        "--train_file",
        train,
        "--test_file",
        test,
        "--label_file",
        names,
        "--output_dir",
        tmp_path / "out",
        "--cache_dir",
        "",
        check=False,
    )
    one_line_error(result, "test.tsv: labels ['0', '1'] are not names of --label_file")
