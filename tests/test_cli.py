"""The scripts as users run them: training beats chance, predict's formats, one-line errors."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, SAMPLE, run, shared_file
from helpers import ENV, one_line_error, reviews, train_args, write

import _3_run
import predict
from _3_main import main, parse_args
from _3_run import lock_output_dir
from common import DataError, SaveError, write_atomic

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
    ],
)
def test_training_errors_are_one_line(args, pattern):
    """As users run it: a flag's error (argparse's path) and errors found after the flags."""
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
        (
            "cp949.tsv",
            "text\tlabel\n좋다\t1\n".encode("cp949"),
            "cp949.tsv:2: not UTF-8 text (bad byte at offset 0); it reads as CP949",
        ),
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
        cwd=ROOT,  # imports predict from the repository; writes nothing
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split() in (["긍정", "False"], ["부정", "False"])


# ---------------------------------------- flags, the lock, stop requests and predict.py's files


def test_a_second_run_into_the_same_folder_refuses_to_start(small_data, tmp_path):
    out = tmp_path / "run"
    lock = lock_output_dir(str(out))
    result = run(
        "_3_main.py",
        "--model",
        "tiny",
        "--train_file",
        small_data / "train.jsonl",
        "--output_dir",
        out,
        check=False,
    )
    one_line_error(result, "another run is writing to it")
    lock.release()  # as the system does when the first run ends or is killed
    lock_output_dir(str(out)).release()


def test_write_atomic_on_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("old")

    def full(tmp):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(SaveError, match="metrics.jsonl: cannot write .No space left on device"):
        write_atomic(str(path), full)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["metrics.jsonl"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--train_batch_size", "0"], "--train_batch_size 0 is out of range"),
        (["--lr", "-1"], "--lr -1.0 is out of range"),
        (["--max_len", "0"], "--max_len 0 is out of range"),
        (["--warmup_rate", "1.5"], "--warmup_rate 1.5 is out of range"),
        (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
        (["--save_steps", "-1"], "--save_steps -1 is out of range"),
        (["--test_batch_size", "0"], "--test_batch_size 0 is out of range"),
        (["--max_train_samples", "-1"], "--max_train_samples -1 is out of range"),
        (["--max_eval_samples", "-3"], "--max_eval_samples -3 is out of range"),
        (["--seed", "-1"], "--seed -1 is out of range"),
        (["--seed", "4294967296"], "--seed 4294967296 is out of range"),
        (["--lr", "inf"], "--lr inf is not a finite number"),
        (["--weight_decay", "inf"], "--weight_decay inf is not a finite number"),
        (["--output_dir", ""], "--output_dir '' must name a folder"),
        (["--label_names", "a,a"], "--label_names a,a names a class twice"),
        # flags given where nothing would read them
        (["--mask_rate", "0.2"], "--mask_rate is for pretraining: give --pretrain_epochs too"),
        (["--objective", "rtd"], "--objective is for pretraining: give --pretrain_epochs too"),
        (["--threshold", "0.3"], "--threshold is for --problem multi_label"),
        (["--metric_for_best", "loss"], "--metric_for_best needs a validation split"),
        (["--encoding", "klingon"], "'klingon' is not an encoding Python knows"),
    ],
)
def test_bad_flags_are_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("columns", ["text", "text,text", "text,", ",label"])
def test_bad_columns_are_one_line_in_every_script(columns, capsys):
    # training, predicting and exporting read --file with the same column rule
    import export

    for parse in (parse_args, predict.parse_args, export.parse_args):
        with pytest.raises(SystemExit) as e:
            parse(["--columns", columns])
        err = capsys.readouterr().err
        message = f"argument --columns: {columns!r} must name two or more columns, each once"
        assert e.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert parse_args(["--columns", "text,label"]).columns == "text,label"  # kept as given


def test_output_and_cache_dirs_that_are_files(tmp_path, capsys):
    path = write(tmp_path, "file", "x")
    for flag, message in (("--output_dir", "must name a folder"), ("--cache_dir", "is a file")):
        with pytest.raises(SystemExit):
            parse_args([flag, path])
        assert message in capsys.readouterr().err
    with pytest.raises(DataError, match="--output_dir .*/file/run: cannot write there"):
        lock_output_dir(os.path.join(path, "run"))


def test_an_unwritable_output_dir_fails_before_any_work(tmp_path, monkeypatch):
    def read_only(path, exist_ok=False):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(_3_run.os, "makedirs", read_only)
    with pytest.raises(DataError, match="cannot write there .Read-only file system"):
        lock_output_dir(str(tmp_path / "out"))


def test_sigterm_before_training_is_one_line_and_130(tmp_path):
    train_file = write(
        tmp_path,
        "train.tsv",
        "text\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(reviews(5000))),
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, "_3_main.py"),
            "--model",
            "tiny",
            "--mlm_epochs",
            "0",
            "--train_file",
            train_file,
            "--cache_dir",
            "",
            "--output_dir",
            tmp_path / "out",
        ],
        env=ENV,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 60
    while not (tmp_path / "out" / "states" / ".lock").exists() and time.time() < deadline:
        time.sleep(0.05)  # main() has begun: the lock is its first act
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().count("\n") == 0 and "interrupted" in err, err


def test_a_stop_a_library_swallowed_while_preparing_still_stops_training():
    stop = _3_run.StopRequest()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler runs here, in the main thread
    except KeyboardInterrupt:
        pass  # what a library's broad except would do with it
    with pytest.raises(KeyboardInterrupt):
        stop.begin_training()


def test_during_training_the_first_stop_asks_and_the_second_stops_at_once():
    stop = _3_run.StopRequest()
    stop.begin_training()
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)
    assert stop.requested
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)


def test_predict_never_writes_over_its_input(tiny_checkpoint, tmp_path):
    path = write(tmp_path, "in.tsv", "text\tlabel\n좋다\t1\n")
    one_line_error(
        run(
            "predict.py",
            "--model_dir",
            tiny_checkpoint[0],
            "--file",
            path,
            "--output",
            path,
            check=False,
        ),
        "is the input --file",
    )
    assert open(path, encoding="utf-8").read() == "text\tlabel\n좋다\t1\n"


def test_predict_checks_output_folders_before_any_work(tmp_path):
    path = write(tmp_path, "in.txt", "좋다\n")
    for flag in ("--output", "--confusion"):  # the model folder does not exist: checked later
        one_line_error(
            run(
                "predict.py",
                "--model_dir",
                tmp_path / "none",
                "--file",
                path,
                flag,
                tmp_path / "missing" / "out",
                check=False,
            ),
            "cannot write in",
        )


def test_predict_reads_a_pipe_once(tiny_checkpoint):
    texts = reviews(300)
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "predict.py"),
            "--model_dir",
            str(tiny_checkpoint[0]),
            "--file",
            "/dev/stdin",
        ],
        input="\n".join(texts),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert [line.split("\t")[2] for line in result.stdout.splitlines()] == texts


def test_predict_streams_in_chunks_and_scores_like_one_pass(
    tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    path = write(
        tmp_path,
        "in.tsv",
        "text\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(reviews(45))),
    )
    predict.main(
        [
            "--model_dir",
            str(tiny_checkpoint[0]),
            "--file",
            path,
            "--output",
            str(tmp_path / "one.jsonl"),
        ]
    )
    whole = capsys.readouterr().err.splitlines()[0]
    monkeypatch.setattr(predict, "CHUNK", 7)
    predict.main(
        [
            "--model_dir",
            str(tiny_checkpoint[0]),
            "--file",
            path,
            "--output",
            str(tmp_path / "chunks.jsonl"),
        ]
    )
    assert capsys.readouterr().err.splitlines()[0] == whole
    one, chunks = ((tmp_path / n).read_text().splitlines() for n in ("one.jsonl", "chunks.jsonl"))
    assert len(chunks) == 45 and [json.loads(r)["label"] for r in chunks] == [
        json.loads(r)["label"] for r in one
    ]


def test_predict_names_input_that_is_not_utf8(tiny_checkpoint, tmp_path):
    one_line_error(
        run(
            "predict.py",
            "--model_dir",
            tiny_checkpoint[0],
            "--file",
            write(tmp_path, "excel.txt", "text\tlabel\n좋다\t1\n".encode("utf-16")),
            check=False,
        ),
        "UTF-16 text",
    )
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "predict.py"), "--model_dir", str(tiny_checkpoint[0])],
        input=b"good\n\xff\xfe bad\n",
        capture_output=True,
        env=ENV,
        timeout=300,
    )
    one_line_error(argparse_like(result), "standard input:2: not UTF-8 text")
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "predict.py"),
            "--model_dir",
            str(tiny_checkpoint[0]),
            b"caf\xe9",
        ],
        capture_output=True,
        env=ENV,
        timeout=300,
    )
    one_line_error(argparse_like(result), "sentence 1 on the command line is not UTF-8 text")


def argparse_like(result):
    result.stderr = result.stderr.decode()
    return result


def test_flags_a_preset_sets_are_not_refused_as_given():
    """tiny's preset sets --mask_rate and --pretrain_dropout; the quick start runs it with
    --mlm_epochs 0: nothing given is ignored, so nothing is refused."""
    args = parse_args(["--model", "tiny", "--mlm_epochs", "0"])
    assert args.pretrain_epochs == 0 and args.mask_rate == 0.3


def test_a_new_run_never_replaces_a_trained_model_or_a_run_to_resume(small_data, tmp_path):
    out = tmp_path / "run"
    main(train_args(small_data, out, "--total_epochs", 1))
    weights = (out / "model.safetensors").read_bytes()
    with pytest.raises(
        DataError,
        match=r"holds a trained model \(classifier.json\): --resume "
        "continues that run, --overwrite_output_dir starts a new one over it",
    ):
        main(train_args(small_data, out, "--total_epochs", 1, "--lr", "1e-3"))
    assert (out / "model.safetensors").read_bytes() == weights
    os.remove(out / "classifier.json")  # as a run killed before its first kept epoch leaves it
    with pytest.raises(DataError, match=r"holds a run to resume \(states/latest\)"):
        main(train_args(small_data, out, "--total_epochs", 1))
    main(train_args(small_data, out, "--total_epochs", 1, "--overwrite_output_dir"))
    assert (out / "classifier.json").exists()
    empty = tmp_path / "failed_start"  # an empty states/ of a run that failed to start
    (empty / "states").mkdir(parents=True)
    main(train_args(small_data, empty, "--total_epochs", 1))


def test_the_tests_never_write_in_the_repository(tmp_path):
    """The scripts' default --output_dir checkpoint and --cache_dir .cache land in the tests'
    scratch folder, not in the repository's (a user may be training there)."""

    def stamp(name):
        path = os.path.join(ROOT, name)
        return os.path.exists(path) and os.stat(path).st_mtime_ns

    before = {name: stamp(name) for name in ("checkpoint", ".cache")}
    one_class = write(tmp_path, "t.tsv", "text\tlabel\n좋다\t1\n")  # fails after the lock
    one_line_error(run("_3_main.py", "--model", "tiny", "--train_file", one_class, check=False), "")
    assert os.path.isdir(os.path.join(os.getcwd(), "checkpoint", "states"))  # its scratch folder
    assert {name: stamp(name) for name in before} == before


def test_predict_and_training_say_what_they_cannot_do(tiny_checkpoint, tmp_path):
    folder = tiny_checkpoint[0]
    one_line_error(
        run("predict.py", "--model_dir", folder, "-", input="", check=False),
        "standard input: no texts",
    )
    path = write(tmp_path, "in.tsv", "text\tlabel\n좋다\t1\n")
    same = tmp_path / "out.png"
    one_line_error(
        run(
            "predict.py",
            "--model_dir",
            folder,
            "--file",
            path,
            "--output",
            same,
            "--confusion",
            same,
            check=False,
        ),
        "name the same file",
    )
    short = write(tmp_path, "valid.tsv", "text\tlabel\n좋다\t1\n싫다\t0\n")
    train = write(
        tmp_path,
        "train.tsv",
        "text\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(reviews(40))),
    )
    one_line_error(
        run(
            "_3_main.py",
            "--model",
            "tiny",
            "--mlm_epochs",
            0,
            "--train_file",
            train,
            "--valid_file",
            short,
            "--min_chars",
            5,
            "--early_stopping",
            1,
            "--output_dir",
            tmp_path / "out",
            check=False,
        ),
        "no validation texts left after --min_chars 5; --early_stopping needs them",
    )
