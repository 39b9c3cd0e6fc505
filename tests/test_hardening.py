"""Hostile input: nothing lost, no traceback, nothing trusted. One test per case of the second
hardening round; the training runs are in-process and tiny."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, run
from helpers import one_line_error, reviews

import _3_main
import _3_run
import predict
import serve
from _1_data import encode_texts, read_table, tokenize
from common import DataError, SaveError, write_atomic
from _2_model import train_wordpiece
from checkpoint import load_checkpoint, save_checkpoint
from common import ModelError
from _3_main import parse_args
from _3_run import load_state, lock_output_dir, save_state

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def write(folder, name, data):
    path = folder / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small labelled JSONL train/test pair."""
    folder = tmp_path_factory.mktemp("data")
    for name, texts in (("train.jsonl", reviews(96)), ("test.jsonl", reviews(32, 96))):
        with open(folder / name, "w", encoding="utf-8") as f:
            for i, text in enumerate(texts):
                f.write(json.dumps({"text": text, "label": i % 2}, ensure_ascii=False) + "\n")
    return folder


def train(data, out, *extra):
    _3_main.main(
        [
            "--model",
            "tiny",
            "--mlm_epochs",
            "0",
            "--train_file",
            str(data / "train.jsonl"),
            "--test_file",
            str(data / "test.jsonl"),
            "--total_epochs",
            "1",
            "--max_len",
            "32",
            "--train_batch_size",
            "16",
            "--cache_dir",
            str(data / "cache"),
            "--output_dir",
            str(out),
            *map(str, extra),
        ]
    )


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "checkpoint"
    train(data, out)
    return out


def state_of(out):
    return (out / "states" / "latest").read_text()


# ----------------------------------------------------------------------------- data loss


def test_an_epoch_end_never_rewrites_the_state_latest_names(trained, tmp_path):
    folder, state = load_state(str(trained))
    model, tokenizer, info = load_checkpoint(folder)
    write = lambda f: save_checkpoint(f, model, tokenizer, info)  # noqa: E731
    out = tmp_path / "run"
    save_state(str(out), write, state)
    first = state_of(out)
    save_state(str(out), write, state)  # the same optimizer step again
    second = state_of(out)
    assert second != first and sorted(os.listdir(out / "states")) == ["latest", second]


@pytest.mark.parametrize("failure", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left")])
def test_a_save_cut_short_keeps_the_state_latest_names(trained, tmp_path, monkeypatch, failure):
    """A second Ctrl-C or a full disk in the middle of writing a state."""
    folder, state = load_state(str(trained))
    model, tokenizer, info = load_checkpoint(folder)
    write = lambda f: save_checkpoint(f, model, tokenizer, info)  # noqa: E731
    out = tmp_path / "run"
    save_state(str(out), write, state)
    before = state_of(out)

    def cut(state, f):
        raise failure

    monkeypatch.setattr(_3_run.torch, "save", cut)  # training_state.pt, written last
    with pytest.raises((KeyboardInterrupt, SaveError)) as e:
        save_state(str(out), write, state)
    if isinstance(failure, OSError):
        assert "training_state.pt: cannot write (No space left)" in str(e.value)
    monkeypatch.undo()
    assert state_of(out) == before
    assert load_state(str(out))[1]["global_step"] == state["global_step"]


def test_only_our_state_folders_are_removed(data, tmp_path):
    out = tmp_path / "run"
    (out / "states" / "notes").mkdir(parents=True)
    (out / "states" / "notes" / "mine.txt").write_text("keep me")
    (out / "states" / "step-notes.txt").write_text("keep me too")
    train(data, out)
    assert (out / "states" / "notes" / "mine.txt").read_text() == "keep me"
    assert (out / "states" / "step-notes.txt").exists()


def test_a_second_run_into_the_same_folder_refuses_to_start(data, tmp_path):
    out = tmp_path / "run"
    lock = lock_output_dir(str(out))
    result = run(
        "_3_main.py",
        "--model",
        "tiny",
        "--train_file",
        data / "train.jsonl",
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


def test_stray_quotes_in_a_tsv_lose_no_rows(tmp_path):
    rows = "".join(('"' if i == 10 else "") + f"review {i}\t{i % 2}\n" for i in range(100))
    examples = read_table(write(tmp_path, "d.tsv", "text\tlabel\n" + rows))
    assert len(examples) == 100 and examples[10] == ('"review 10', "0")


# ----------------------------------------------------------------------------- predict.py files


def test_predict_never_writes_over_its_input(trained, tmp_path):
    path = write(tmp_path, "in.tsv", "text\tlabel\n좋다\t1\n")
    one_line_error(
        run("predict.py", "--model_dir", trained, "--file", path, "--output", path, check=False),
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


def test_predict_reads_a_pipe_once(trained):
    texts = reviews(300)
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "predict.py"),
            "--model_dir",
            str(trained),
            "--file",
            "/dev/stdin",
        ],
        input="\n".join(texts),
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert [line.split("\t")[2] for line in result.stdout.splitlines()] == texts


def test_predict_streams_in_chunks_and_scores_like_one_pass(trained, tmp_path, monkeypatch, capsys):
    path = write(
        tmp_path,
        "in.tsv",
        "text\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(reviews(45))),
    )
    predict.main(
        ["--model_dir", str(trained), "--file", path, "--output", str(tmp_path / "one.jsonl")]
    )
    whole = capsys.readouterr().err.splitlines()[0]
    monkeypatch.setattr(predict, "CHUNK", 7)
    predict.main(
        ["--model_dir", str(trained), "--file", path, "--output", str(tmp_path / "chunks.jsonl")]
    )
    assert capsys.readouterr().err.splitlines()[0] == whole
    one, chunks = ((tmp_path / n).read_text().splitlines() for n in ("one.jsonl", "chunks.jsonl"))
    assert len(chunks) == 45 and [json.loads(r)["label"] for r in chunks] == [
        json.loads(r)["label"] for r in one
    ]


def test_predict_names_input_that_is_not_utf8(trained, tmp_path):
    one_line_error(
        run(
            "predict.py",
            "--model_dir",
            trained,
            "--file",
            write(tmp_path, "excel.txt", "text\tlabel\n좋다\t1\n".encode("utf-16")),
            check=False,
        ),
        "UTF-16 text",
    )
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "predict.py"), "--model_dir", str(trained)],
        input=b"good\n\xff\xfe bad\n",
        capture_output=True,
        env=ENV,
        cwd=ROOT,
        timeout=300,
    )
    one_line_error(argparse_like(result), "standard input:2: not UTF-8 text")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "predict.py"), "--model_dir", str(trained), b"caf\xe9"],
        capture_output=True,
        env=ENV,
        cwd=ROOT,
        timeout=300,
    )
    one_line_error(argparse_like(result), "sentence 1 on the command line is not UTF-8 text")


def argparse_like(result):
    result.stderr = result.stderr.decode()
    return result


# ----------------------------------------------------------------------------- one line owed


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max_train_samples", "-1"], "--max_train_samples -1 is out of range"),
        (["--max_eval_samples", "-3"], "--max_eval_samples -3 is out of range"),
        (["--seed", "-1"], "--seed -1 is out of range"),
        (["--seed", "4294967296"], "--seed 4294967296 is out of range"),
        (["--lr", "inf"], "--lr inf is not a finite number"),
        (["--weight_decay", "inf"], "--weight_decay inf is not a finite number"),
        (["--output_dir", ""], "--output_dir '' must name a folder"),
        (["--label_names", "a,a"], "--label_names a,a names a class twice"),
    ],
)
def test_bad_flags_are_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err, err


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


def test_damaged_cache_entries_are_rebuilt(data, tmp_path, capsys):
    texts = reviews(200)
    tokenizer = train_wordpiece(texts, 1000, str(tmp_path))
    tokenize(tokenizer, texts, 32, str(tmp_path))
    for name in os.listdir(tmp_path):
        open(tmp_path / name, "w").close()  # truncated to zero bytes
    assert len(train_wordpiece(texts, 1000, str(tmp_path))) > 500
    assert (
        tokenize(tokenizer, texts, 32, str(tmp_path))[5].tolist()
        == encode_texts(tokenizer, texts, 32)[5].tolist()
    )
    printed = capsys.readouterr().out
    assert "is damaged; learning the vocabulary again" in printed
    assert "is damaged; tokenizing again" in printed


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "\\ud800", "label": 1}', ":1: a lone surrogate"),
        ('{"text": ' + "[" * 100000 + "]" * 100000 + ', "label": 1}', ":1: JSON nested too deeply"),
        ('{"text": "a", "label": NaN}', ":1: label NaN is not a class name"),
        ('{"text": "a", "label": 1.0}', ":1: label 1.0 is not a class name"),
        ('{"text": "a", "label": true}', ":1: label true is not a class name"),
    ],
)
def test_bad_jsonl_lines_are_one_line(tmp_path, line, message):
    with pytest.raises(DataError, match=message):
        read_table(write(tmp_path, "d.jsonl", line + "\n"))


@pytest.mark.parametrize(
    "content, columns, message",
    [
        ("text\tlabel\na\tNaN\n", {}, ':2: label "NaN" is not a class name'),
        ("text\ttext\tlabel\na\tb\t1\n", {}, ":1: the header names ['text'] more than once"),
        (
            "text\tlabel\na\t1\n",
            {"text_column": "label", "label_column": "label"},
            "'label' cannot be both the text and the label column",
        ),
    ],
)
def test_ambiguous_tables_are_one_line(tmp_path, content, columns, message):
    with pytest.raises(DataError) as e:
        read_table(write(tmp_path, "d.tsv", content), **columns)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda i: i.update(labels="01"), "'labels' must be a list"),
        (
            lambda i: i.update(label_names=["only one"]),
            "2 distinct label names needed for 2 labels",
        ),
        (lambda i: i["args"].update(max_len="64"), "args.max_len must be an integer"),
    ],
)
def test_a_tampered_classifier_json_is_one_line(trained, tmp_path, change, message):
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in os.listdir(trained):
        if os.path.isfile(trained / name):
            (folder / name).write_bytes((trained / name).read_bytes())
    info = json.loads((folder / "classifier.json").read_text())
    change(info)
    (folder / "classifier.json").write_text(json.dumps(info))
    with pytest.raises(ModelError, match=message):
        load_checkpoint(str(folder))


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
        cwd=ROOT,
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


@pytest.fixture
def signal_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_a_stop_a_library_swallowed_while_preparing_still_stops_training(signal_handlers):
    stop = _3_run.StopRequest()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler runs here, in the main thread
    except KeyboardInterrupt:
        pass  # what a library's broad except would do with it
    with pytest.raises(KeyboardInterrupt):
        stop.begin_training()


def test_during_training_the_first_stop_asks_and_the_second_stops_at_once(signal_handlers):
    stop = _3_run.StopRequest()
    stop.begin_training()
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)
    assert stop.requested
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)


def test_latest_must_name_a_state_folder(trained, tmp_path):
    out = tmp_path / "run"
    (out / "states").mkdir(parents=True)
    (out / "states" / "latest").write_text("../../elsewhere")
    with pytest.raises(ModelError, match="not a state folder of this run"):
        load_state(str(out))


def test_resume_refuses_changed_flags(data, tmp_path):
    out = tmp_path / "run"
    train(data, out)
    with pytest.raises(DataError, match="--head_name --lr differ from it"):
        train(data, out, "--resume", "--lr", "1e-3", "--head_name", "lstm")
    train(data, out, "--resume", "--num_workers", "0")  # how to run may change


def test_a_huge_unbroken_text_costs_what_is_kept(data):
    tokenizer = train_wordpiece(reviews(200), 1000, str(data / "cache"))
    huge = "가" * 4_000_000
    ids = encode_texts(tokenizer, [huge], 128)[0]
    assert np.array_equal(ids, encode_texts(tokenizer, [huge[: 128 * 50]], 128)[0])


# ----------------------------------------------------------------------------- the web server


class EchoPredictor:
    info = {"args": {"model": "echo"}, "head_name": "cls"}
    names = ["a", "b"]

    def predict(self, texts):
        return [
            {"text": t, "label": "a", "probability": 1.0, "probs": {"a": 1.0, "b": 0.0}}
            for t in texts
        ]


@pytest.mark.parametrize(
    "body, status, message",
    [
        (
            json.dumps({"sentences": ["x"] * (serve.MAX_SENTENCES + 1)}),
            413,
            f"at most {serve.MAX_SENTENCES} sentences per request",
        ),
        ('{"sentence": ' + "[" * 100000 + "]" * 100000 + "}", 400, "not valid JSON"),
        ('{"sentence": "\\ud800"}', 400, "lone surrogate"),
    ],
)
def test_the_api_turns_away_what_it_cannot_serve(body, status, message):
    client = serve.create_app(EchoPredictor()).test_client()
    response = client.post("/api", data=body, content_type="application/json")
    assert response.status_code == status and message in response.get_json()["error"]
    assert client.post("/api", json={"sentences": ["x"] * serve.MAX_SENTENCES}).status_code == 200


@pytest.mark.parametrize("port", ["99999", "-5"])
def test_bad_ports_are_one_line(port, capsys):
    with pytest.raises(SystemExit) as e:
        predict.parse_args(["--serve", "--port", port])
    assert e.value.code == 2 and f"--port {port} is not a port number" in capsys.readouterr().err


def test_serving_to_the_network_warns(trained):
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, "predict.py"),
            "--serve",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--model_dir",
            str(trained),
        ],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().startswith("warning: --host 0.0.0.0 serves this page")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
