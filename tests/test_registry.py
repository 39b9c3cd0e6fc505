"""Registries instead of branches: a corpus is one reader and one entry in _1_data.CORPORA; the
flags --resume may change are the --help group that says so."""

import pytest

import _1_data
from _1_data import labels_and_names, load_corpus
from _3_main import build_parser, main, parse_args
from _3_run import RUNTIME_FLAGS


def test_the_run_group_of_help_is_what_resume_may_change():
    group = next(g for g in build_parser()._action_groups if g.title.startswith("run"))
    assert {a.dest for a in group._group_actions} == set(RUNTIME_FLAGS)


def read_mine(folder):
    """A corpus of the test's own: 'good'/'bad' reviews, 40 for training and 10 for testing."""
    rows = [
        (f"{'좋아요' if i % 2 else '별로예요'} 리뷰 {i} {folder}", "good" if i % 2 else "bad")
        for i in range(50)
    ]
    return {"train": rows[:40], "test": rows[40:]}


def test_a_corpus_is_a_reader_and_one_entry(monkeypatch, tmp_path):
    monkeypatch.setitem(
        _1_data.CORPORA, "mine", _1_data.Corpus(read_mine, str(tmp_path), ["부정", "긍정"])
    )
    args = parse_args(["--data", "mine", "--model", "tiny"])  # --data offers every entry
    splits = load_corpus(args)
    assert len(splits["train"]) == 40 and splits["train"][0][0].endswith(
        str(tmp_path)
    )  # its default folder
    assert labels_and_names(args, splits["train"]) == (["bad", "good"], ["부정", "긍정"])
    out = tmp_path / "out"
    main(
        [
            "--data",
            "mine",
            "--model",
            "tiny",
            "--mlm_epochs",
            "0",
            "--total_epochs",
            "1",
            "--max_len",
            "16",
            "--cache_dir",
            "",
            "--output_dir",
            str(out),
        ]
    )
    assert (out / "model.safetensors").exists()


def test_an_unknown_corpus_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--data", "nope"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert "--data: invalid choice: 'nope'" in err and "nsmc" in err and "imdb" in err
