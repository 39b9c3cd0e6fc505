"""--resume continues the run it claims to continue: every state records what the run read (a
fingerprint of each data source, pipes included, and the label list), and a resume on changed data
is one line naming the file and what changed. Label order never depends on Python's hash seed."""

import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run
from helpers import ROWS, flags, kill_at_state, latest_state, write_tsv

from _3_main import main
from common import DataError


@pytest.fixture
def trained(tmp_path):
    train, out = write_tsv(tmp_path / "train.tsv", ROWS), tmp_path / "out"
    main(flags(train, out))
    state = torch.load(out / "states" / latest_state(out) / "training_state.pt", weights_only=True)
    assert state["data"]["train"]["rows"] == 64 and state["data"]["label_list"] == ["0", "1"]
    return train, out


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda rows: [(t, 1 - y) for t, y in rows],
            "train.tsv has changed since the saved run read it (its labels differ)",
        ),
        (lambda rows: [(t + "!", y) for t, y in rows], "(its texts differ)"),
        (lambda rows: rows + rows[:3], "(67 rows where the saved run read 64)"),
        (
            lambda rows: rows[:-1] + [(rows[-1][0], 2)],
            "the training data's labels are now ['0', '1', '2'], the saved run's were ['0', '1']",
        ),
    ],
    ids=["labels_flipped", "texts_replaced", "rows_added", "new_label"],
)
def test_resume_on_changed_data_is_refused(trained, change, message):
    train, out = trained
    write_tsv(train, change(ROWS))
    with pytest.raises(
        DataError,
        match="--resume: .*"
        + message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]"),
    ):
        main(flags(train, out, "--resume"))


def test_resume_on_the_same_data_goes_on(trained):
    train, out = trained
    main(flags(train, out, "--resume"))  # nothing changed: no error


def test_changed_data_is_one_line_and_exit_2(trained):
    train, out = trained
    write_tsv(train, [(t, 1 - y) for t, y in ROWS])
    result = run("_3_main.py", *flags(train, out, "--resume"), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        f"error: --resume: {train} has changed since the saved run read it (its labels differ); "
        f"resume with the "
        f"same data, or start anew in another --output_dir"
    ]


def test_a_piped_training_file_is_fingerprinted_as_read(tmp_path):
    data = write_tsv(tmp_path / "train.tsv", ROWS).read_text(encoding="utf-8")
    out = tmp_path / "out"
    run("_3_main.py", *flags("/dev/stdin", out), input=data)
    run(
        "_3_main.py", *flags("/dev/stdin", out, "--resume"), input=data
    )  # the same bytes through the pipe
    result = run(
        "_3_main.py",
        *flags("/dev/stdin", out, "--resume"),
        input=data.replace("\t0\n", "\t1\n", 5),
        check=False,
    )
    assert (
        result.returncode == 2
        and "/dev/stdin has changed since the saved run read it (its labels differ)"
        in result.stderr
    )


def test_a_changed_unlabeled_file_stops_a_resumed_pretraining(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", ROWS * 3)
    more = tmp_path / "more.txt"
    more.write_text("".join(f"추가 리뷰 {i}\n" for i in range(100)), encoding="utf-8")
    out = tmp_path / "out"
    args = flags(train, out, "--unlabeled_file", more, "--save_steps", 2, "--train_batch_size", 8)
    args[args.index("--mlm_epochs") + 1] = "2"
    assert kill_at_state(args, out, 2) == -signal.SIGKILL
    assert (
        torch.load(out / "states" / latest_state(out) / "training_state.pt", weights_only=True)[
            "phase"
        ]
        == "pretrain"
    )
    more.write_text("".join(f"바뀐 리뷰 {i}\n" for i in range(100)), encoding="utf-8")
    result = run("_3_main.py", *args, "--resume", check=False)
    assert (
        result.returncode == 2
        and f"{more} has changed since the saved run read it (its texts differ)" in result.stderr
    )


def test_label_order_does_not_depend_on_the_hash_seed():
    code = (
        "from _1_data import label_list; "
        "print(label_list([('a', '1'), ('b', '01'), ('c', '2'), ('d', '001'), ('e', '-1')]))"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,  # imports the repository's modules; writes nothing
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
        ).stdout
        for seed in ("0", "1", "2", "3")
    }
    assert outputs == {"['-1', '001', '01', '1', '2']\n"}
