"""The presets as users have them: offline copies of each hub repository (tests/hub_copies.py),
as downloaded folders and inside a Hugging Face cache; every head trains, predicts, and the ids
fed to the model are the model's own tokenizer's."""

import json
import os

import pytest
import torch
from conftest import SAMPLE
from helpers import preset_args
from hub_copies import LAYOUTS

from _1_data import (
    BERTSentenceTransform,
    BERTSPTokenizer,
    labels_and_names,
    load_corpus,
    read_table,
    tokenized_splits,
)
from _2_model import load_backbone
from checkpoint import classifier_to_finetune, load_checkpoint
from common import ModelError
from _3_main import main, parse_args
from heads import HEADS
from predict import Predictor

ELECTRA = ("kcelectra", "koelectra")


@pytest.fixture
def offline_cache(hub, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", hub[1])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def own_ids(folder, preset, texts, max_len):
    """Token ids from the model's own tokenizer (KoBERT: the gluonnlp-equivalent transform)."""
    from tokenizers import BertWordPieceTokenizer, ByteLevelBPETokenizer, processors

    if preset == "kobert":
        transform = BERTSentenceTransform(
            BERTSPTokenizer(os.path.join(folder, "spiece.model")), max_len, pad=False
        )
        return [transform([text])[0].tolist() for text in texts]
    if preset == "roberta-base":
        tokenizer = ByteLevelBPETokenizer(
            os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
        )
        tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    else:
        tokenizer = BertWordPieceTokenizer(os.path.join(folder, "vocab.txt"), lowercase=False)
    tokenizer.enable_truncation(max_len)
    return [e.ids for e in tokenizer.encode_batch(texts)]


@pytest.mark.parametrize("preset", LAYOUTS)
def test_preset_resolves_offline_from_the_cache_with_its_own_ids(
    hub, offline_cache, preset, tmp_path
):
    args = parse_args(preset_args(preset, tmp_path))
    splits = load_corpus(args)
    texts = [text for text, _ in splits["train"]]
    labels, _ = labels_and_names(args, splits["train"])
    model, tokenizer = classifier_to_finetune(
        args.model, len(labels), args.head_name, args.dr_rate, texts, args.cache_dir
    )
    datasets = tokenized_splits(splits, tokenizer, labels, args)
    fed = [ids.tolist() for ids in datasets["train"].token_ids]
    assert fed == own_ids(hub[0][preset], preset, texts, args.max_len)
    cls, sep = (0, 2) if preset in ("klue-roberta", "roberta-base") else (2, 3)
    assert all(ids[0] == cls and ids[-1] == sep for ids in fed)  # [CLS] first, never a text piece
    assert isinstance(tokenizer, BERTSPTokenizer) == (preset == "kobert")


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("preset", LAYOUTS)
def test_every_head_trains_and_predicts_from_a_downloaded_folder(
    hub, preset, head, tmp_path, capsys
):
    folder = hub[0][preset]
    if head == "pooler" and preset in ELECTRA:
        with pytest.raises(ModelError, match="electra backbone has no pooler; use --head_name cls"):
            main(preset_args(folder, tmp_path, "--head_name", head))
        return
    main(preset_args(folder, tmp_path, "--head_name", head))
    out = capsys.readouterr()
    assert "LOAD REPORT" not in out.err + out.out and "loss_type" not in out.err + out.out
    no_pooler = preset in ("klue-roberta", "roberta-base") and head == "pooler"
    assert ("has no pretrained pooler weights" in out.out) == no_pooler
    info = json.loads((tmp_path / "classifier.json").read_text())
    assert info["tokenizer"] == ("kobert-sentencepiece" if preset == "kobert" else "transformers")
    predictor = Predictor(str(tmp_path), "cpu")
    texts = ["이 영화 정말 재밌다", "최악의 영화", "Good movie!"]
    loader = predictor.loader(texts)
    assert [ids.tolist() for ids in loader.dataset.token_ids] == own_ids(folder, preset, texts, 128)
    rows = predictor.predict(texts)
    assert [r["text"] for r in rows] == texts and all(0.5 <= r["probability"] <= 1 for r in rows)


def write_long_reviews(path, n=40):
    """Reviews far longer than 300 tokens (NSMC reviews joined), labels alternating."""
    texts = [t for t, _ in read_table(os.path.join(SAMPLE, "ratings_train.txt"))]
    with open(path, "w", encoding="utf-8") as f:
        f.write("document\tlabel\n")
        for i in range(n):
            f.write(" ".join(texts[i * 60 : (i + 1) * 60]) + f"\t{i % 2}\n")
    return path


@pytest.mark.parametrize("preset,limit", [("kcbert", 300), ("klue-roberta", 512)])
def test_max_len_is_capped_at_the_positions_the_backbone_has(hub, preset, limit, tmp_path, capsys):
    data = write_long_reviews(tmp_path / "long.tsv")
    out = tmp_path / "checkpoint"
    main(
        [
            "--model",
            hub[0][preset],
            "--train_file",
            str(data),
            "--max_len",
            "600",
            "--total_epochs",
            "1",
            "--train_batch_size",
            "8",
            "--cache_dir",
            "",
            "--output_dir",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert f"--max_len 600 is more than {hub[0][preset]} takes; using {limit}" in printed
    assert f"max_len {limit}, device" in printed
    info = json.loads((out / "classifier.json").read_text())
    assert info["args"]["max_len"] == limit
    main(
        [
            "--model",
            hub[0][preset],
            "--train_file",
            str(data),
            "--max_len",
            "600",
            "--total_epochs",
            "1",
            "--train_batch_size",
            "8",
            "--cache_dir",
            "",
            "--output_dir",
            str(out),
            "--resume",
        ]
    )  # the same command again, as after a crash: accepted
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    predictor = Predictor(str(out), "cpu")
    long_text = read_table(data)[0][0]
    assert len(predictor.loader([long_text]).dataset.token_ids[0]) == limit
    assert predictor.predict([long_text])[0]["label"] in ("0", "1")


def test_tiny_max_len_is_capped_at_512(tmp_path, capsys):
    data = write_long_reviews(tmp_path / "long.tsv", n=16)
    main(
        [
            "--model",
            "tiny",
            "--mlm_epochs",
            "0",
            "--train_file",
            str(data),
            "--max_len",
            "513",
            "--total_epochs",
            "1",
            "--cache_dir",
            "",
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    assert "--max_len 513 is more than tiny takes; using 512" in capsys.readouterr().out


def test_tiny_defaults_follow_the_problem_and_given_flags_win():
    single = parse_args(["--model", "tiny"])
    multi = parse_args(["--model", "tiny", "--problem", "multi_label", "--train_file", "t.tsv"])
    given = parse_args(
        [
            "--model",
            "tiny",
            "--problem",
            "multi_label",
            "--train_file",
            "t.tsv",
            "--pretrain_epochs",
            "1",
            "--total_epochs",
            "4",
            "--mask_rate",
            "0.15",
        ]
    )
    other = parse_args(["--model", "kcbert", "--problem", "multi_label", "--train_file", "t.tsv"])
    assert (single.pretrain_epochs, single.total_epochs, single.mask_rate) == (6, 2, 0.3)
    assert (single.pretrain_dropout, single.head_name) == (0.0, "weight_avg")
    assert (multi.pretrain_dropout, multi.head_name) == (None, "weight_avg")  # as README measured
    assert (multi.pretrain_epochs, multi.total_epochs, multi.mask_rate, multi.lr) == (
        3,
        6,
        0.3,
        3e-4,
    )
    assert (given.pretrain_epochs, given.total_epochs, given.mask_rate) == (1, 4, 0.15)
    assert (other.pretrain_epochs, other.total_epochs, other.mask_rate) == (0, 3, 0.15)
    assert (other.pretrain_dropout, other.head_name) == (None, "cls")


def test_fine_tuning_continues_from_a_checkpoint_folder(hub, tmp_path, capsys):
    first = tmp_path / "first"
    main(preset_args(hub[0]["kcbert"], first, "--head_name", "weight_avg"))
    old, _, _ = load_checkpoint(str(first))
    model, tokenizer = classifier_to_finetune(str(first), 2, "weight_avg", 0.1)
    ids = torch.tensor([[2, 100, 200, 3]])
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval()(ids, torch.ones_like(ids)), old(ids, torch.ones_like(ids))
        )
    assert tokenizer.model_max_length > 10**6  # not the first run's --max_len
    capsys.readouterr()
    three = tmp_path / "three.tsv"
    three.write_text(
        "text\tlabel\n" + "".join(f"리뷰 {i}\t{'abc'[i % 3]}\n" for i in range(12)),
        encoding="utf-8",
    )
    main(
        [
            "--model",
            str(first),
            "--train_file",
            str(three),
            "--head_name",
            "weight_avg",
            "--total_epochs",
            "1",
            "--cache_dir",
            "",
            "--output_dir",
            str(tmp_path / "second"),
        ]
    )
    assert (
        f"note: {first} has a weight_avg head for 2 classes; a new weight_avg head for 3 "
        f"classes starts from random weights"
    ) in capsys.readouterr().out
    model, _, info = load_checkpoint(str(tmp_path / "second"))
    assert info["labels"] == ["a", "b", "c"] and model.head.out.out_features == 3


def broken_copy(hub, tmp_path, preset, damage):
    folder = tmp_path / "broken"
    os.makedirs(folder)
    for name in os.listdir(hub[0][preset]):
        (folder / name).write_bytes((open(os.path.join(hub[0][preset], name), "rb")).read())
    damage(folder)
    return str(folder)


@pytest.mark.parametrize(
    "preset,damage,message",
    [
        ("kcbert", lambda f: (f / "pytorch_model.bin").write_bytes(b"not a zip"), "cannot load it"),
        ("kcbert", lambda f: (f / "config.json").write_text("{"), "cannot load this folder"),
        ("kcbert", lambda f: os.remove(f / "vocab.txt"), "its tokenizer has 5 tokens for"),
        ("kobert", lambda f: os.remove(f / "spiece.model"), "its tokenizer has"),
    ],
)
def test_a_broken_model_folder_is_one_line(hub, tmp_path, preset, damage, message):
    folder = broken_copy(hub, tmp_path, preset, damage)
    with pytest.raises(ModelError, match=f"^--model {folder}: {message}") as e:
        load_backbone(folder)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("preset", ["kobert", "kcbert", "roberta-base"])
def test_truncation_keeps_the_head_the_tail_or_both(hub, preset, tmp_path):
    """--truncation cuts the same tokens in training (transformers or KoBERT tokenizer) and in
    predict.py (the tokenizers library), and keeps [CLS] and [SEP] at the ends."""
    from _1_data import encode_texts

    folder = hub[0][preset]
    text = " ".join(t for t, _ in read_table(os.path.join(SAMPLE, "ratings_test.txt"))[:40])
    whole = own_ids(folder, preset, [text], 10**6)[0]
    assert len(whole) > 200
    _, tokenizer, _ = load_backbone(folder)
    keep = {"head": whole[1:63], "tail": whole[-63:-1], "head_tail": whole[1:16] + whole[-48:-1]}
    for truncation, body in keep.items():
        ids = encode_texts(tokenizer, [text], 64, truncation)[0].tolist()
        assert ids == [whole[0], *body, whole[-1]], truncation
    out = tmp_path / "checkpoint"
    main(preset_args(folder, out, "--truncation", "head_tail", "--max_len", "64"))
    predictor = Predictor(str(out), "cpu")
    fed = predictor.loader([text]).dataset.token_ids[0].tolist()
    assert fed == [whole[0], *keep["head_tail"], whole[-1]]
