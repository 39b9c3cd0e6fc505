"""Never lose a run: exact resume after SIGKILL, Ctrl-C, a diverging loss, several processes."""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import time

import pytest
import torch
from conftest import ROOT, run, write_data
from helpers import (
    ENV,
    command,
    finish,
    kill_after_next_state,
    latest_state,
    metrics,
    train_args,
    weights,
)
from safetensors.torch import load_file

import _3_run
from _3_main import main
from _3_run import load_state, save_state
from checkpoint import load_checkpoint, save_checkpoint
from common import DataError, ModelError, SaveError


@pytest.fixture(scope="module")
def uninterrupted(small_data, tmp_path_factory):
    """The reference: the same run, never interrupted."""
    reference = tmp_path_factory.mktemp("uninterrupted") / "out"
    finish(train_args(small_data, reference, "--save_steps", 4))
    return reference


def test_killed_twice_and_resumed_equals_uninterrupted(small_data, uninterrupted, tmp_path):
    reference = uninterrupted
    killed = tmp_path / "killed"
    rng = random.Random(0)
    assert (
        kill_after_next_state(train_args(small_data, killed, "--save_steps", 4), killed, rng)
        == -signal.SIGKILL
    )
    kill_after_next_state(
        train_args(small_data, killed, "--save_steps", 4, "--resume"), killed, rng
    )
    run(
        "predict.py", "--model_dir", killed / "states" / latest_state(killed), "좋아요"
    )  # a state is a checkpoint
    finish(train_args(small_data, killed, "--save_steps", 4, "--resume"))
    assert metrics(killed) == metrics(reference)
    ref, got = weights(reference), weights(killed)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_ctrl_c_saves_and_exits_130(small_data, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        command(train_args(small_data, out, "--total_epochs", 50)),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(3)  # inside the first epoch, after the tokenizer and model are built
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    state = torch.load(out / "states" / latest_state(out) / "training_state.pt", weights_only=True)
    assert (
        state["global_step"] > 0 and state["epoch"] < 50
    )  # saved where it stopped, long before the end


def test_diverging_loss_stops_with_the_step(small_data, tmp_path):
    out = tmp_path / "out"
    result = run(
        "_3_main.py",
        *train_args(small_data, out, "--lr", 1e30, "--max_grad_norm", 0, "--save_steps", 1),
        check=False
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "became NaN or infinite at optimizer step" in lines[0], result.stderr
    bad_step = int(lines[0].split("optimizer step ")[1].split()[0])
    state = torch.load(out / "states" / latest_state(out) / "training_state.pt", weights_only=True)
    assert state["global_step"] < bad_step
    assert all(
        torch.isfinite(t).all()
        for t in load_file(str(out / "states" / latest_state(out) / "model.safetensors")).values()
    )


def test_resume_without_state_is_an_error(small_data, tmp_path):
    result = run("_3_main.py", *train_args(small_data, tmp_path / "empty", "--resume"), check=False)
    assert result.returncode == 2 and result.stderr.strip().startswith(
        "error: --resume: no saved state in"
    )


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    if not shutil.which("torchrun"):
        pytest.skip("torchrun is not on PATH")
    small_data = write_data(tmp_path, 1200, 400)
    # Each review starts with a word that gives its label away, so both runs learn it in two short
    # epochs: accuracy near 1 tells a working run from one whose ranks mix up texts and labels,
    # where on the reviews alone both stay near chance and their accuracies differ by noise.
    for name in ("train.jsonl", "test.jsonl"):
        rows = [json.loads(line) for line in (small_data / name).read_text().splitlines()]
        small_data.joinpath(name).write_text(
            "".join(
                json.dumps(
                    {
                        **row,
                        "text": ("추천 " if str(row["label"]) == "1" else "비추 ") + row["text"],
                    },
                    ensure_ascii=False,
                )
                + "\n"
                for row in rows
            )
        )
    env = {**ENV, "PYTHONFAULTHANDLER": "1"}  # a crash shows each process's Python stack
    one = tmp_path / "one"
    subprocess.run(
        command(train_args(small_data, one, "--train_batch_size", 32)),
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    two = tmp_path / "two"
    result = subprocess.run(
        [
            "torchrun",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(29500 + os.getpid() % 1000),
            os.path.join(ROOT, "_3_main.py"),
            *map(str, train_args(small_data, two, "--train_batch_size", 16)),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-8000:]
    one_rows, two_rows = metrics(one), metrics(two)
    assert one_rows[-1]["test_accuracy"] > 0.9 and two_rows[-1]["test_accuracy"] > 0.9, (
        one_rows,
        two_rows,
    )
    # the same pace: the first epoch's loss, within 2-10% in six draws of the vocabulary, where a
    # doubled or a halved learning rate moves it by 28% or 54% (by epoch 2 both losses are near 0)
    assert two_rows[0]["train_loss"] == pytest.approx(one_rows[0]["train_loss"], rel=0.2)
    assert json.loads((two / "metrics.jsonl").read_text().splitlines()[-1])["n_train"] == 1200


# training_state.pt as the trainer wrote it before _3_run.py existed (phase since --mlm_epochs)
OLD_STATE_KEYS = {
    "epoch",
    "step",
    "global_step",
    "best_valid",
    "history",
    "n_tokens",
    "sums",
    "phase",
    "rng",
    "optimizer",
    "scheduler",
    "scaler",
}


@pytest.mark.parametrize(
    "keys", [OLD_STATE_KEYS, OLD_STATE_KEYS - {"phase"}], ids=["with_phase", "before_phase"]
)
def test_a_state_in_the_old_layout_resumes_exactly(small_data, uninterrupted, tmp_path, keys):
    reference = uninterrupted
    old = tmp_path / "old"
    assert (
        kill_after_next_state(train_args(small_data, old, "--save_steps", 4), old, random.Random(2))
        == -signal.SIGKILL
    )
    path = old / "states" / latest_state(old) / "training_state.pt"
    state = torch.load(path, weights_only=True)
    # since then: what the run read, its precision, its batch order (the order is checked apart,
    # in test_gpu: an old state ends its epoch in the old order, which this reference did not use)
    assert set(state) == OLD_STATE_KEYS | {"data", "precision", "batch_order"}
    torch.save({k: state[k] for k in keys | {"batch_order"}}, path)  # the old keys, no more
    run("predict.py", "--model_dir", path.parent, "좋아요")  # the state's checkpoint loads
    resumed = subprocess.run(
        command(train_args(small_data, old, "--save_steps", 4, "--resume")),
        env=ENV,
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    notes = [line for line in resumed.stdout.splitlines() if "recorded the data" in line]
    assert notes == [
        "note: this state was saved before states recorded the data they were trained on: --resume "
        "cannot check that the data files are unchanged"
    ]
    assert metrics(old) == metrics(reference)
    ref, got = weights(reference), weights(old)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_runs_saved_under_the_old_flag_names_resume_with_them(tmp_path):
    """Runs saved before the code's names became the flags' (--pretrain_epochs, --pretrain_lr,
    --mask_rate) hold mlm_epochs, mlm_lr, mlm_probability: --resume reads them as the new ones."""
    from _3_main import parse_args
    from _3_run import saved_args

    old = {"mlm_epochs": 4, "mlm_lr": 1e-3, "mlm_probability": 0.2, "lr": 2e-5}
    (tmp_path / "pretraining.json").write_text(json.dumps({"args": old}))
    args = parse_args(["--resume", "--output_dir", str(tmp_path)])
    saved = saved_args(args, str(tmp_path), {"phase": "pretrain"}, defaults=vars(parse_args([])))
    assert (saved.pretrain_epochs, saved.pretrain_lr, saved.mask_rate) == (4, 1e-3, 0.2)
    assert saved.lr == 2e-5 and not hasattr(saved, "mlm_epochs")


# ------------------------------------------------ states: nothing lost when a save is cut short


def state_of(out):
    return (out / "states" / "latest").read_text()


def test_an_epoch_end_never_rewrites_the_state_latest_names(tiny_checkpoint, tmp_path):
    folder, state = load_state(str(tiny_checkpoint[0]))
    model, tokenizer, info = load_checkpoint(folder)
    write = lambda f: save_checkpoint(f, model, tokenizer, info)  # noqa: E731
    out = tmp_path / "run"
    save_state(str(out), write, state)
    first = state_of(out)
    save_state(str(out), write, state)  # the same optimizer step again
    second = state_of(out)
    assert second != first and sorted(os.listdir(out / "states")) == ["latest", second]


@pytest.mark.parametrize("failure", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left")])
def test_a_save_cut_short_keeps_the_state_latest_names(
    tiny_checkpoint, tmp_path, monkeypatch, failure
):
    """A second Ctrl-C or a full disk in the middle of writing a state."""
    folder, state = load_state(str(tiny_checkpoint[0]))
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


def test_only_our_state_folders_are_removed(small_data, tmp_path):
    out = tmp_path / "run"
    (out / "states" / "notes").mkdir(parents=True)
    (out / "states" / "notes" / "mine.txt").write_text("keep me")
    (out / "states" / "step-notes.txt").write_text("keep me too")
    main(train_args(small_data, out, "--total_epochs", 1))
    assert (out / "states" / "notes" / "mine.txt").read_text() == "keep me"
    assert (out / "states" / "step-notes.txt").exists()


def test_latest_must_name_a_state_folder(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    (out / "states").mkdir(parents=True)
    (out / "states" / "latest").write_text("../../elsewhere")
    with pytest.raises(ModelError, match="not a state folder of this run"):
        load_state(str(out))


def test_resume_refuses_changed_flags(small_data, tmp_path, capsys):
    out = tmp_path / "run"
    main(train_args(small_data, out, "--total_epochs", 1))
    with pytest.raises(DataError, match="--head_name --lr differ from it"):
        main(
            train_args(
                small_data,
                out,
                "--total_epochs",
                1,
                "--resume",
                "--lr",
                "1e-3",
                "--head_name",
                "lstm",
            )
        )
    capsys.readouterr()
    main(
        train_args(small_data, out, "--total_epochs", 1, "--resume", "--num_workers", "0")
    )  # how to run may change
    # and it says where it goes on from: after the state of the last epoch's end
    assert "resuming fine-tuning at epoch 2, batch 0 of it (optimizer step 19)" in (
        capsys.readouterr().out
    )
