import os

import numpy as np
import pytest
import torch
from conftest import SAMPLE

from _1_data import BERTDataset, BERTSPTokenizer, encode_texts, length_sorted_batches, read_table
from _2_model import (HEADS, TRACED, BERTClassifier, FastDropout, ModelError, load_backbone, load_checkpoint,
                      load_traced, predict_logits, resolve_model, save_checkpoint, tiny_backbone)
from _3_main import make_loader

SHORT, LONG = "이 영화 정말 재밌다", "아주 길고 지루한 리뷰 문장입니다 " * 40


def sample_texts(n=2000):
    return [t for t, _ in read_table(os.path.join(SAMPLE, "ratings_train.txt"))][:n]


@pytest.fixture(scope="module")
def tiny_parts():
    torch.manual_seed(0)
    _, tokenizer = load_backbone("tiny", sample_texts())
    return tokenizer


def logits_alone_and_beside_long(model, tokenizer):
    short, long = encode_texts(tokenizer, [SHORT, LONG], 256)
    assert len(long) >= 200
    ids = torch.full((2, len(long)), tokenizer.pad_token_id)
    ids[0, :len(short)], ids[1] = torch.tensor(short), torch.tensor(long)
    mask = (torch.arange(len(long)) < torch.tensor([[len(short)], [len(long)]])).long()
    with torch.no_grad():
        alone = model(torch.from_numpy(short)[None].long(), torch.ones(1, len(short), dtype=torch.long))
        beside = model(ids, mask)
    return alone[0], beside[0]


@pytest.mark.parametrize("head", HEADS)
def test_every_head_ignores_padding_tiny(tiny_parts, head):
    torch.manual_seed(0)
    model = BERTClassifier(tiny_backbone(len(tiny_parts)), 3, head).eval()
    alone, beside = logits_alone_and_beside_long(model, tiny_parts)
    torch.testing.assert_close(alone, beside, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("head", HEADS)
def test_every_head_ignores_padding_minilm(minilm, head):
    torch.manual_seed(0)
    backbone, tokenizer = load_backbone(minilm)
    model = BERTClassifier(backbone, 2, head).eval()
    alone, beside = logits_alone_and_beside_long(model, tokenizer)
    torch.testing.assert_close(alone, beside, atol=1e-5, rtol=1e-4)


def test_lstm_head_is_deterministic(tiny_parts):
    torch.manual_seed(0)
    model = BERTClassifier(tiny_backbone(len(tiny_parts)), 2, "lstm").eval()
    first, _ = logits_alone_and_beside_long(model, tiny_parts)
    second, _ = logits_alone_and_beside_long(model, tiny_parts)
    assert torch.equal(first, second)


def test_pooler_head_needs_a_pooler():
    from transformers import DistilBertConfig, DistilBertModel

    backbone = DistilBertModel(DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=64))
    with pytest.raises(ModelError, match="distilbert backbone has no pooler; use --head_name cls"):
        BERTClassifier(backbone, 2, "pooler")
    assert BERTClassifier(backbone, 2, "cls")  # the other heads work without one


def test_unknown_head():
    with pytest.raises(ModelError, match="--head_name 'mean' is not one of cls, pooler, weight_avg, lstm"):
        BERTClassifier(tiny_backbone(100), 2, "mean")


def test_pooler_head_uses_pretrained_pooler(minilm):
    from transformers import AutoModel

    reference = AutoModel.from_pretrained(minilm).pooler.dense.weight
    model = BERTClassifier(load_backbone(minilm)[0], 2, "pooler")
    assert torch.equal(model.head.pooler.dense.weight, reference) and model.backbone.pooler is None


def classify(model, tokenizer, texts):
    dataset = BERTDataset(encode_texts(tokenizer, texts, 64))
    loader = make_loader(dataset, length_sorted_batches(dataset.lengths, 3), tokenizer.pad_token_id)
    return predict_logits(model, loader, torch.device("cpu"))


@pytest.mark.parametrize("head", ["pooler", "lstm"])
def test_checkpoint_round_trip_gives_identical_logits(tmp_path, tiny_parts, head):
    torch.manual_seed(0)
    model = BERTClassifier(tiny_backbone(len(tiny_parts)), 3, head).eval()
    texts = sample_texts(10)
    before = classify(model, tiny_parts, texts)
    # predictions come back in input order although batches ran longest first
    one_by_one = np.concatenate([classify(model, tiny_parts, [t]) for t in texts])
    np.testing.assert_allclose(before, one_by_one, atol=1e-5)
    save_checkpoint(str(tmp_path), model, tiny_parts, {"labels": ["a", "b", "c"], "label_names": ["A", "B", "C"]})
    assert {"model.safetensors", "config.json", "classifier.json", "tokenizer.json"} <= set(os.listdir(tmp_path))
    loaded, tokenizer, info = load_checkpoint(str(tmp_path))
    assert info["head_name"] == head and info["label_names"] == ["A", "B", "C"]
    assert np.array_equal(classify(loaded, tokenizer, texts), before)


def test_kobert_tokenizer_checkpoint_round_trip(tmp_path):
    import sentencepiece

    prefix = str(tmp_path / "sp")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sample_texts(3000)), model_prefix=prefix, vocab_size=2000, unk_piece="[UNK]",
        pad_id=1, pad_piece="[PAD]", bos_id=-1, eos_id=-1, user_defined_symbols=["[CLS]", "[SEP]"], minloglevel=2)
    tokenizer = BERTSPTokenizer(prefix + ".model")
    model = BERTClassifier(tiny_backbone(len(tokenizer)), 2, "cls").eval()
    before = classify(model, tokenizer, [SHORT, LONG])
    save_checkpoint(str(tmp_path / "ck"), model, tokenizer, {"labels": ["0", "1"], "label_names": ["부정", "긍정"]})
    loaded, loaded_tokenizer, info = load_checkpoint(str(tmp_path / "ck"))
    assert isinstance(loaded_tokenizer, BERTSPTokenizer) and info["tokenizer"] == "kobert-sentencepiece"
    assert np.array_equal(classify(loaded, loaded_tokenizer, [SHORT, LONG]), before)


def test_broken_checkpoints_give_one_line_errors(tmp_path, tiny_parts):
    with pytest.raises(ModelError, match="no such checkpoint folder"):
        load_checkpoint(str(tmp_path / "none"))
    model = BERTClassifier(tiny_backbone(len(tiny_parts)), 2, "cls")
    save_checkpoint(str(tmp_path), model, tiny_parts, {"labels": ["0", "1"], "label_names": ["0", "1"]})
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelError, match="cannot load checkpoint"):
        load_checkpoint(str(tmp_path))
    weights.unlink()
    with pytest.raises(ModelError, match="missing model.safetensors"):
        load_checkpoint(str(tmp_path))


def test_model_names():
    # a hub model missing offline is checked end to end in test_cli (HF_HUB_OFFLINE is read at import)
    assert resolve_model("kcbert") == "beomi/kcbert-base" and resolve_model("org/name") == "org/name"
    with pytest.raises(ModelError, match="--model ./no/such/folder: no such folder"):
        resolve_model("./no/such/folder")


def test_fast_dropout_keeps_the_rate_the_scale_and_the_seed():
    drop = FastDropout(0.1).train()
    x = torch.ones(200, 500, requires_grad=True)
    torch.manual_seed(0)
    a = drop(x)
    torch.manual_seed(0)
    assert torch.equal(drop(x), a)  # masks follow torch's seed (exact --resume)
    assert abs((a == 0).float().mean().item() - 0.1) < 0.005  # 100,000 draws: sd 0.001
    assert torch.allclose(a[a != 0], torch.tensor(1 / 0.9))
    a.sum().backward()
    assert torch.equal(x.grad, a.detach())  # d(x * mask / 0.9)/dx
    assert torch.equal(drop.eval()(x), x)


def test_classifier_has_only_fast_dropout(tiny_parts):
    kinds = {type(m) for m in BERTClassifier(tiny_backbone(len(tiny_parts)), 2, "cls").modules()}
    assert FastDropout in kinds and torch.nn.Dropout not in kinds


def predictions_with_and_without_trace(folder):
    texts = sample_texts(300) + [SHORT, LONG, "", "👍 ㅋㅋㅋ", "漢字\t☃"]
    results = []
    for model, tokenizer, info in (load_checkpoint(folder), load_traced(folder)):
        dataset = BERTDataset(encode_texts(tokenizer, texts, info["args"]["max_len"]))
        loader = make_loader(dataset, length_sorted_batches(dataset.lengths, 64), info["pad_token_id"])
        results.append(([ids.tolist() for ids in dataset.token_ids], predict_logits(model, loader, torch.device("cpu"))))
    (ids, logits), (traced_ids, traced_logits) = results
    assert traced_ids == ids
    np.testing.assert_allclose(traced_logits, logits, atol=1e-5)


@pytest.mark.parametrize("backbone", ["tiny", "minilm"])
def test_traced_copy_predicts_like_the_checkpoint(tmp_path, tiny_parts, backbone, request):
    if backbone == "tiny":
        model, tokenizer = BERTClassifier(tiny_backbone(len(tiny_parts)), 3, "cls"), tiny_parts
    else:
        encoder, tokenizer = load_backbone(request.getfixturevalue("minilm"))
        model = BERTClassifier(encoder, 3, "pooler")
    info = {"args": {"max_len": 128}, "labels": ["a", "b", "c"], "label_names": ["A", "B", "C"]}
    save_checkpoint(str(tmp_path), model, tokenizer, info, traced=True)
    assert (tmp_path / TRACED).exists()
    predictions_with_and_without_trace(str(tmp_path))
    save_checkpoint(str(tmp_path), model, tokenizer, info)  # new weights without a trace: the old trace goes
    assert not (tmp_path / TRACED).exists() and load_traced(str(tmp_path)) is None
