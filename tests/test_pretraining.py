"""--pretrain_epochs: BERT's masking, --unlabeled_file, pretraining then fine-tuning from what it
learnt, exact resume after a kill during pretraining, every preset's layout; --objective rtd
(ELECTRA's replaced-token detection) likewise."""

import json
import random
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run
from helpers import (
    finish,
    kill_after_next_state,
    kill_at_state,
    latest_state,
    metrics,
    preset_args,
    train_args,
    weights,
)
from hub_copies import LAYOUTS
from safetensors.torch import load_file

from _1_data import mask_tokens, read_unlabeled
from _2_model import load_backbone, model_to_pretrain, pretraining_to_resume, set_dropout
from _3_main import main
from common import DataError, ModelError

CLS, SEP, PAD, MASK = 2, 3, 0, 4


def batch(lengths, width, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (len(lengths), width), generator=g)
    mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    ids[:, 0] = CLS
    ids[torch.arange(len(lengths)), torch.tensor(lengths) - 1] = SEP
    return ids.masked_fill(mask == 0, PAD), mask


def test_masking_is_berts_15_percent_80_10_10_and_never_special():
    ids, mask = batch([random.Random(i).randint(3, 100) for i in range(400)], 100)
    torch.manual_seed(0)
    masked, picked, targets = mask_tokens(ids, mask, torch.tensor([CLS, SEP, PAD]), MASK, 1000)
    candidates = mask.bool() & (ids != CLS) & (ids != SEP)
    assert not (picked & ~candidates).any()  # never [CLS], [SEP] or padding
    assert picked.sum() / candidates.sum() == pytest.approx(0.15, abs=0.01)  # ~18,000 tokens
    assert torch.equal(targets, ids[picked]) and torch.equal(masked[~picked], ids[~picked])
    became = masked[picked]
    assert (became == MASK).float().mean() == pytest.approx(0.8, abs=0.02)
    assert (became == targets).float().mean() == pytest.approx(0.1, abs=0.015)  # left as they are
    assert ((became != MASK) & (became != targets)).float().mean() == pytest.approx(0.1, abs=0.015)
    torch.manual_seed(0)
    again = mask_tokens(ids, mask, torch.tensor([CLS, SEP, PAD]), MASK, 1000)
    assert all(torch.equal(a, b) for a, b in zip(again, (masked, picked, targets)))  # --resume


def test_whole_word_masking_hides_every_piece_of_a_picked_word_and_nothing_else():
    ids, mask = batch([random.Random(i).randint(3, 100) for i in range(400)], 100)
    starts = torch.arange(1000) < 600  # ids 600-999 continue the word before them
    masked, picked, targets = mask_tokens(
        ids, mask, torch.tensor([CLS, SEP, PAD]), MASK, 1000, 0.15, starts
    )
    real = mask.bool() & ~torch.isin(ids, torch.tensor([CLS, SEP, PAD]))
    word = (starts[ids] | ~real).long().cumsum(1)
    n_words = n_picked = 0
    for row in range(len(ids)):
        for w in word[row][real[row]].unique():
            pieces = picked[row][real[row] & (word[row] == w)]
            assert pieces.all() or not pieces.any()  # a word is hidden whole or not at all
            n_words, n_picked = n_words + 1, n_picked + int(pieces.all())
    assert abs(n_picked / n_words - 0.15) < 0.01 and torch.equal(targets, ids[picked])
    assert picked[starts[ids] == 0].any()  # continuation pieces are hidden with their word


def test_word_starts_of_the_tokenizers():
    from _1_data import word_starts
    from _2_model import load_backbone

    _, tokenizer, _ = load_backbone(
        "tiny", ["영화가 정말 재미있었다 재미있었다"] * 50 + ["최고의 영화"] * 50
    )
    starts = word_starts(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert len(starts) == len(pieces) and all(
        s == (not p.startswith("##")) for s, p in zip(starts, pieces)
    )
    assert not starts.all()


def test_masking_predicts_a_token_even_in_a_batch_of_one_word_texts():
    ids, mask = batch([3, 3], 4)
    for seed in range(20):
        torch.manual_seed(seed)
        _, picked, targets = mask_tokens(ids, mask, torch.tensor([CLS, SEP, PAD]), MASK, 1000)
        assert picked.sum() >= 1 and len(targets) == picked.sum()
        assert not picked[:, [0, 2, 3]].any()


def test_unlabeled_file_is_lines_or_a_table(tmp_path):
    plain = tmp_path / "reviews.txt"
    plain.write_text("첫 리뷰\n\n두 번째\tTAB 포함\n", encoding="utf-8")
    assert read_unlabeled(str(plain)) == ["첫 리뷰", "두 번째\tTAB 포함"]
    table = tmp_path / "more.tsv"
    table.write_text("id\tdocument\n1\t좋다\n2\t별로\n", encoding="utf-8")
    assert read_unlabeled(str(table)) == ["좋다", "별로"]
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text('{"text": "하나"}\n{"text": "둘"}\n', encoding="utf-8")
    assert read_unlabeled(str(jsonl)) == ["하나", "둘"]
    for content, message in (
        (b"\n\n", "no texts"),
        (b"\xff\xfe\x00a", "UTF-16"),
        (b"ok\n\xc3(\n", "not UTF-8"),
    ):
        bad = tmp_path / "bad.txt"
        bad.write_bytes(content)
        with pytest.raises(DataError, match=message):
            read_unlabeled(str(bad))


def test_unlabeled_file_needs_pretrain_epochs(small_data, tmp_path):
    result = run(
        "_3_main.py", *train_args(small_data, tmp_path, "--unlabeled_file", "x.txt"), check=False
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --unlabeled_file is for pretraining: give " "--pretrain_epochs too (see --help)"
    )


def backbone_of(folder, prefix):
    return {
        k[len(prefix) :]: v
        for k, v in load_file(str(folder / "model.safetensors")).items()
        if k.startswith(prefix)
    }


def test_fine_tuning_starts_from_the_pretrained_backbone(small_data, tmp_path):
    unlabeled = tmp_path / "more.txt"
    unlabeled.write_text("".join(f"추가 리뷰 {i}번 정말 재밌다\n" for i in range(50)), "utf-8")
    out = tmp_path / "out"
    # a learning rate so small that fine-tuning leaves the backbone as pretraining left it
    result = run(
        "_3_main.py",
        *train_args(
            small_data,
            out,
            "--mlm_epochs",
            3,
            "--mlm_lr",
            1e-3,
            "--unlabeled_file",
            unlabeled,
            "--lr",
            1e-12,
            "--total_epochs",
            1,
        ),
    )
    assert "pretraining tiny (mlm) on 350 texts" in result.stdout
    history = json.loads((out / "pretrained" / "pretraining.json").read_text())["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert history[2]["mlm_loss"] < history[0]["mlm_loss"] - 0.5  # it learns
    pretrained, tuned = backbone_of(out / "pretrained", "bert."), backbone_of(out, "bert.")
    shared = [k for k in tuned if not k.startswith("pooler.")]
    assert shared and all(torch.allclose(tuned[k], pretrained[k], atol=1e-6) for k in shared)
    plain = tmp_path / "plain"  # no pretraining: the backbone stays near its random start
    run("_3_main.py", *train_args(small_data, plain, "--lr", 1e-12, "--total_epochs", 1))
    layer = "encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(backbone_of(plain, "bert.")[layer], tuned[layer], atol=1e-3)
    key = "embeddings.word_embeddings.weight"
    again = tmp_path / "again"  # a later run starts from the saved pretrained model
    result = run(
        "_3_main.py",
        *train_args(
            small_data, again, "--model", out / "pretrained", "--lr", 1e-12, "--total_epochs", 1
        ),
    )
    assert torch.allclose(backbone_of(again, "bert.")[key], pretrained[key], atol=1e-6)


PRETRAIN_FLAGS = ("--mlm_epochs", 2, "--mlm_lr", 1e-3, "--save_steps", 4, "--total_epochs", 1)


def finished_run(small_data, tmp_path_factory, flags):
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    finish(train_args(small_data, out, *flags))
    return out


@pytest.fixture(scope="module")
def uninterrupted(small_data, tmp_path_factory):
    return finished_run(small_data, tmp_path_factory, PRETRAIN_FLAGS)


def assert_same_run(reference, got):
    for folder in ("pretrained", "."):
        ref, new = weights(reference / folder), weights(got / folder)
        assert ref.keys() == new.keys() and all(torch.equal(ref[k], new[k]) for k in ref), folder
    assert metrics(got) == metrics(reference)


@pytest.mark.parametrize("step", [4, 20])  # the first state, the second epoch (mid-epoch: below)
def test_killed_during_pretraining_and_resumed_equals_uninterrupted(
    small_data, uninterrupted, tmp_path, step
):
    killed = tmp_path / "killed"
    assert (
        kill_at_state(train_args(small_data, killed, *PRETRAIN_FLAGS), killed, step)
        == -signal.SIGKILL
    )
    state = torch.load(
        killed / "states" / latest_state(killed) / "training_state.pt", weights_only=True
    )
    assert state["phase"] == "pretrain" and state["global_step"] >= step
    finish(train_args(small_data, killed, *PRETRAIN_FLAGS, "--resume"))
    assert_same_run(uninterrupted, killed)


def test_killed_twice_at_random_during_pretraining_equals_uninterrupted(
    small_data, uninterrupted, tmp_path
):
    killed = tmp_path / "killed"
    rng = random.Random(1)
    assert (
        kill_after_next_state(train_args(small_data, killed, *PRETRAIN_FLAGS), killed, rng)
        == -signal.SIGKILL
    )
    kill_after_next_state(train_args(small_data, killed, *PRETRAIN_FLAGS, "--resume"), killed, rng)
    finish(train_args(small_data, killed, *PRETRAIN_FLAGS, "--resume"))
    assert_same_run(uninterrupted, killed)


def test_loaded_weights_live_in_fresh_aligned_memory(uninterrupted):
    """Why a resumed pretraining could drift by 2e-7 on some CPUs while this machine's kill tests
    passed: from_pretrained left the weights on the safetensors memory map (8-byte aligned), where
    MKL/oneDNN may take other code paths than on the fresh memory a resumed run loads into."""
    lm, _, _ = load_backbone(str(uninterrupted / "pretrained"), objective="mlm")
    tensors = [*lm.parameters(), *lm.buffers()]
    assert tensors and all(t.data_ptr() % 64 == 0 for t in tensors)
    embeddings, decoder = lm.get_input_embeddings(), lm.get_output_embeddings()
    assert decoder.weight is embeddings.weight  # still tied


@pytest.mark.parametrize("preset", LAYOUTS)
def test_every_preset_layout_pretrains_and_fine_tunes(hub, preset, tmp_path, capsys):
    out = tmp_path / "out"
    main(preset_args(hub[0][preset], out, "--mlm_epochs", 1))
    info = json.loads((out / "classifier.json").read_text())
    assert info["tokenizer"] == ("kobert-sentencepiece" if preset == "kobert" else "transformers")
    again = tmp_path / "again"  # the saved pretrained model is a --model of its own
    main(preset_args(str(out / "pretrained"), again))
    assert json.loads((again / "classifier.json").read_text())["tokenizer"] == info["tokenizer"]
    printed = capsys.readouterr().out
    assert "saved the pretrained model" in printed and "LOAD REPORT" not in printed
    # the published masked-LM head is used where the weights have one; else a note says it is new
    has_head = LAYOUTS[preset][1] in ("BertForPreTraining", "RobertaForMaskedLM")
    assert ("weights of the masked-language-model head of" in printed) != has_head


def test_pretraining_a_fine_tuned_checkpoint_is_one_line(tiny_checkpoint):
    with pytest.raises(ModelError, match="is a fine-tuned checkpoint; pretrain from a pretrained"):
        model_to_pretrain(str(tiny_checkpoint[0]), [], None, "mlm")


@pytest.mark.parametrize("n", [1, 3, 2000])
def test_piped_unlabeled_texts_are_read_once_and_whole(n):
    texts = "".join(f"파이프로 온 리뷰 {i}\n" for i in range(n))
    code = "from _1_data import read_unlabeled; print(len(read_unlabeled('/dev/stdin')))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,  # imports the repository's modules; writes nothing
        input=texts,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout.strip() == str(n), result.stderr


# ----------------------------------------------------------------------------- --objective rtd


def test_replaced_token_detection_labels_every_real_token():
    """The generator shares the discriminator's embeddings (its output layer too), is a quarter of
    its width, and fills only the hidden positions; the discriminator scores every real token, and
    a token counts as replaced exactly where the generator's sample differs from the original."""
    from _2_model import ReplacedTokenDetection, new_generator, tiny_backbone

    torch.manual_seed(0)
    discriminator = tiny_backbone(1000, "rtd")
    model = ReplacedTokenDetection(new_generator(discriminator.config, 0.25), discriminator)
    words = discriminator.electra.embeddings.word_embeddings.weight
    assert model.generator.electra.embeddings is discriminator.electra.embeddings
    assert model.generator.generator_lm_head.weight is words
    assert model.generator.config.hidden_size == 64 and "embeddings_project" in dict(
        model.generator.electra.named_children()
    )  # 256-wide embeddings projected to 64
    assert sum(p is words for p in model.parameters()) == 1  # one table, one optimizer entry
    ids, mask = batch([5, 40, 100], 100)
    masked, positions, targets = mask_tokens(
        ids, mask, torch.tensor([CLS, SEP, PAD]), MASK, 1000, 0.15
    )
    out = model(masked, mask, positions, ids)
    assert out.detected.shape == out.replaced.shape == (145,)  # every real token, no padding
    assert out.generated.shape == (int(positions.sum()), 1000)
    # the replaced tokens lie at hidden positions only (row-major order of the real tokens)
    assert set(torch.nonzero(out.replaced).flatten().tolist()) <= set(
        torch.nonzero(positions[mask.bool()]).flatten().tolist()
    )
    assert 0 < out.replaced.sum() <= positions.sum()  # an untrained generator rarely guesses right
    loss = torch.nn.functional.binary_cross_entropy_with_logits(out.detected, out.replaced)
    loss.backward()
    assert (
        words.grad is not None
        and model.generator.electra.encoder.layer[0].attention.self.query.weight.grad is None
    )  # sampling passes no gradient into the generator


RTD_FLAGS = (
    "--pretrain_epochs",
    2,
    "--objective",
    "rtd",
    "--pretrain_lr",
    1e-3,
    "--save_steps",
    4,
    "--total_epochs",
    1,
)


@pytest.fixture(scope="module")
def uninterrupted_rtd(small_data, tmp_path_factory):
    return finished_run(small_data, tmp_path_factory, RTD_FLAGS)


def test_rtd_killed_mid_epoch_and_resumed_equals_uninterrupted(
    small_data, uninterrupted_rtd, tmp_path
):
    killed = tmp_path / "killed"
    assert kill_at_state(train_args(small_data, killed, *RTD_FLAGS), killed, 12) == -signal.SIGKILL
    state = torch.load(
        killed / "states" / latest_state(killed) / "training_state.pt", weights_only=True
    )
    assert state["phase"] == "pretrain" and state["global_step"] >= 12
    finish(train_args(small_data, killed, *RTD_FLAGS, "--resume"))
    assert_same_run(uninterrupted_rtd, killed)
    ref, new = weights(uninterrupted_rtd / "pretrained" / "generator"), weights(
        killed / "pretrained" / "generator"
    )
    assert ref.keys() == new.keys() and all(torch.equal(ref[k], new[k]) for k in ref)


def test_rtd_saves_a_standard_electra_that_fine_tuning_and_transformers_load(uninterrupted_rtd):
    from transformers import AutoModel, ElectraForMaskedLM, ElectraForPreTraining

    folder = uninterrupted_rtd / "pretrained"
    history = json.loads((folder / "pretraining.json").read_text())["history"]
    assert all(
        {"rtd_loss", "rtd_accuracy"} <= row.keys() and "mlm_loss" not in row for row in history
    )
    assert len(history) == 2 and history[1]["rtd_loss"] < history[0]["rtd_loss"]
    discriminator, info = ElectraForPreTraining.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(AutoModel.from_pretrained(folder)).__name__ == "ElectraModel"
    generator = ElectraForMaskedLM.from_pretrained(folder / "generator")
    assert torch.equal(
        generator.electra.embeddings.word_embeddings.weight,
        discriminator.electra.embeddings.word_embeddings.weight,
    )
    # fine-tuning started from the discriminator: tiny became an ELECTRA, GELU in its cls head
    config = json.loads((uninterrupted_rtd / "config.json").read_text())
    assert config["model_type"] == "electra"
    tuned = backbone_of(uninterrupted_rtd, "electra.")
    assert tuned.keys() == backbone_of(folder, "electra.").keys()
    run("predict.py", "--model_dir", uninterrupted_rtd, "재밌다")


def test_a_generator_that_is_not_one_is_one_line(uninterrupted_rtd, hub, tmp_path):
    """--generator a missing folder, a file, a BERT, an ELECTRA discriminator (which would start
    a random generator head without a word), and a resumable state whose generator/ is gone."""
    folder = uninterrupted_rtd / "pretrained"
    config = json.loads((folder / "config.json").read_text())
    model = model_to_pretrain(str(folder), [], None, "rtd", generator=str(folder / "generator"))[0]
    assert model.generator.config.hidden_size < config["hidden_size"]  # the saved generator
    for path, message in (
        (tmp_path / "none", "not a model folder"),
        (folder / "config.json", "not a model folder"),
        (hub[0]["kcbert"], "not an ELECTRA generator (ElectraForMaskedLM); it is a bert model"),
        (folder, "not an ELECTRA generator (ElectraForMaskedLM); it is a electra discriminator"),
    ):
        with pytest.raises(ModelError, match=re.escape(f"--generator {path}: {message}")):
            model_to_pretrain(str(folder), [], None, "rtd", generator=str(path))
    state = tmp_path / "state"
    shutil.copytree(folder, state, ignore=shutil.ignore_patterns("generator"))
    with pytest.raises(ModelError, match="generator: not a model folder"):
        pretraining_to_resume(str(state), "rtd")


def test_electra_presets_continue_detection_with_their_published_head(hub):
    from transformers import ElectraForPreTraining

    folder = hub[0]["koelectra"]
    model, _ = model_to_pretrain(folder, [], None, "rtd", 0.5)
    published = ElectraForPreTraining.from_pretrained(folder).state_dict()
    head = {
        k: v
        for k, v in model.discriminator.state_dict().items()
        if k.startswith("discriminator_predictions.")
    }
    assert head and all(torch.equal(v, published[k]) for k, v in head.items())
    assert model.generator.config.hidden_size == model.discriminator.config.hidden_size // 2


def test_rtd_on_a_bert_or_with_the_pooler_head_is_one_line(hub, small_data, tmp_path):
    with pytest.raises(ModelError, match="--objective rtd: .* is a bert model; replaced-token"):
        model_to_pretrain(hub[0]["kcbert"], [], None, "rtd")
    result = run(
        "_3_main.py",
        *train_args(
            small_data,
            tmp_path / "out",
            "--pretrain_epochs",
            1,
            "--objective",
            "rtd",
            "--head_name",
            "pooler",
        ),
        check=False,
    )
    assert result.returncode == 2 and "ELECTRA model, which has no pooler" in result.stderr


def test_pretrain_dropout_turns_dropout_off_while_pretraining_and_fine_tuning_keeps_its_own(
    small_data, tmp_path
):
    lm, _ = model_to_pretrain("tiny", ["한 리뷰 정말 재밌다", "두 리뷰 별로다"] * 20, None, "mlm")
    ids = torch.tensor([[2, 7, 8, 9, 3]])
    mask = torch.ones_like(ids)
    positions = torch.ones_like(ids, dtype=torch.bool)
    lm.train()
    set_dropout(lm, None)  # as it was: two passes differ by their dropout masks
    assert not torch.equal(lm(ids, mask, positions), lm(ids, mask, positions))
    set_dropout(lm, 0.0)  # no dropout anywhere, attention weights included: the passes agree
    assert torch.equal(lm(ids, mask, positions), lm(ids, mask, positions))
    assert lm.lm.config.hidden_dropout_prob == lm.lm.config.attention_probs_dropout_prob == 0.1
    out = tmp_path / "out"
    finish(train_args(small_data, out, "--pretrain_epochs", 1, "--pretrain_dropout", 0))
    config = json.loads((out / "pretrained" / "config.json").read_text())
    assert config["hidden_dropout_prob"] == config["attention_probs_dropout_prob"] == 0.1
    assert (
        json.loads((out / "pretrained" / "pretraining.json").read_text())["args"][
            "pretrain_dropout"
        ]
        == 0.0
    )
    bad = run(
        "_3_main.py",
        *train_args(small_data, tmp_path / "bad", "--pretrain_epochs", 1, "--pretrain_dropout", 1),
        check=False,
    )
    assert bad.returncode == 2 and "--pretrain_dropout 1.0 is out of range" in bad.stderr
