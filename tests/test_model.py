import json
import os
import shutil

import numpy as np
import pytest
import torch
from helpers import CHECK_TEXTS, family_backbone, info_for, reviews

from _1_data import BERTDataset, BERTSPTokenizer, encode_texts, length_sorted_batches, make_loader
from _2_model import BERTClassifier, load_backbone, new_classifier, resolve_model, tiny_backbone
from checkpoint import load_checkpoint, save_checkpoint
from common import ModelError
from inference import predict_logits
import _3_run
from _3_run import FastDropout, Threads, cpu_times, other_busy_cores, use_fast_dropout
from heads import HEADS

SHORT, LONG = "이 영화 정말 재밌다", "아주 길고 지루한 리뷰 문장입니다 " * 40


@pytest.fixture(scope="module")
def tiny_parts():
    torch.manual_seed(0)
    _, tokenizer, _ = load_backbone("tiny", reviews())
    return tokenizer


def logits_alone_and_beside_long(model, tokenizer):
    short, long = encode_texts(tokenizer, [SHORT, LONG], 256)
    assert len(long) >= 200
    ids = torch.full((2, len(long)), tokenizer.pad_token_id)
    ids[0, : len(short)], ids[1] = torch.tensor(short), torch.tensor(long)
    mask = (torch.arange(len(long)) < torch.tensor([[len(short)], [len(long)]])).long()
    with torch.no_grad():
        alone = model(
            torch.from_numpy(short)[None].long(), torch.ones(1, len(short), dtype=torch.long)
        )
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
    backbone, tokenizer, _ = load_backbone(minilm)
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

    backbone = DistilBertModel(
        DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    )
    with pytest.raises(ModelError, match="distilbert backbone has no pooler; use --head_name cls"):
        new_classifier(backbone, 2, "pooler", 0.1)
    assert new_classifier(backbone, 2, "cls", 0.1)  # the other heads work without one


def test_unknown_head():
    with pytest.raises(
        ModelError, match="--head_name 'mean' is not one of cls, pooler, weight_avg, lstm"
    ):
        BERTClassifier(tiny_backbone(100), 2, "mean")


def test_pooler_head_uses_pretrained_pooler(minilm):
    from transformers import AutoModel

    reference = AutoModel.from_pretrained(minilm).pooler.dense.weight
    model = new_classifier(load_backbone(minilm)[0], 2, "pooler", 0.1)
    assert torch.equal(model.head.dense.weight, reference) and model.backbone.pooler is None


def classify(model, tokenizer, texts, max_len=64, pad_id=None):
    dataset = BERTDataset(encode_texts(tokenizer, texts, max_len))
    pad_id = tokenizer.pad_token_id if pad_id is None else pad_id
    loader = make_loader(dataset, length_sorted_batches(dataset.lengths, 3), pad_id)
    return predict_logits(model, loader, torch.device("cpu"))


@pytest.mark.parametrize("head", ["pooler", "lstm"])
def test_checkpoint_round_trip_gives_identical_logits(tmp_path, tiny_parts, head):
    torch.manual_seed(0)
    model = BERTClassifier(tiny_backbone(len(tiny_parts)), 3, head).eval()
    texts = reviews(10)
    before = classify(model, tiny_parts, texts)
    # predictions come back in input order although batches ran longest first
    one_by_one = np.concatenate([classify(model, tiny_parts, [t]) for t in texts])
    np.testing.assert_allclose(before, one_by_one, atol=1e-5)
    save_checkpoint(str(tmp_path), model, tiny_parts, info_for(["a", "b", "c"], ["A", "B", "C"]))
    assert {"model.safetensors", "config.json", "classifier.json", "tokenizer.json"} <= set(
        os.listdir(tmp_path)
    )
    loaded, tokenizer, info = load_checkpoint(str(tmp_path))
    assert info["head_name"] == head and info["label_names"] == ["A", "B", "C"]
    assert np.array_equal(classify(loaded, tokenizer, texts), before)


def test_kobert_tokenizer_checkpoint_round_trip(tmp_path):
    import sentencepiece

    prefix = str(tmp_path / "sp")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(reviews(3000)),
        model_prefix=prefix,
        vocab_size=2000,
        unk_piece="[UNK]",
        pad_id=1,
        pad_piece="[PAD]",
        bos_id=-1,
        eos_id=-1,
        user_defined_symbols=["[CLS]", "[SEP]"],
        minloglevel=2,
    )
    tokenizer = BERTSPTokenizer(prefix + ".model")
    model = BERTClassifier(tiny_backbone(len(tokenizer)), 2, "cls").eval()
    before = classify(model, tokenizer, [SHORT, LONG])
    save_checkpoint(str(tmp_path / "ck"), model, tokenizer, info_for(["0", "1"], ["부정", "긍정"]))
    loaded, loaded_tokenizer, info = load_checkpoint(str(tmp_path / "ck"))
    assert (
        isinstance(loaded_tokenizer, BERTSPTokenizer)
        and info["tokenizer"] == "kobert-sentencepiece"
    )
    assert np.array_equal(classify(loaded, loaded_tokenizer, [SHORT, LONG]), before)


def test_broken_checkpoints_give_one_line_errors(tmp_path, tiny_parts):
    with pytest.raises(ModelError, match="no such checkpoint folder"):
        load_checkpoint(str(tmp_path / "none"))
    model = BERTClassifier(tiny_backbone(len(tiny_parts)), 2, "cls")
    save_checkpoint(str(tmp_path), model, tiny_parts, info_for(["0", "1"], ["0", "1"]))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(
        ModelError,
        match=r"cannot load checkpoint \(model.safetensors: Error while deserializing header",
    ):
        load_checkpoint(str(tmp_path))
    weights.unlink()
    with pytest.raises(ModelError, match="missing model.safetensors"):
        load_checkpoint(str(tmp_path))
    save_checkpoint(str(tmp_path), model, tiny_parts, info_for(["0", "1"], ["0", "1"]))
    info = json.loads((tmp_path / "classifier.json").read_text())
    del info["base_model_prefix"]  # as checkpoints of the TorchScript era had it
    (tmp_path / "classifier.json").write_text(json.dumps(info))
    with pytest.raises(ModelError, match="^[^(]*written by an older version of this repository"):
        load_checkpoint(str(tmp_path))


def test_model_names():
    # a hub model missing offline is checked end to end in test_cli (HF_HUB_OFFLINE is read at
    # import)
    assert (
        resolve_model("kcbert") == "beomi/kcbert-base" and resolve_model("org/name") == "org/name"
    )
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


def test_fast_dropout_replaces_every_dropout(tiny_parts):
    model = BERTClassifier(tiny_backbone(len(tiny_parts)), 2, "cls")
    use_fast_dropout(model, [model.backbone])
    kinds = {type(m) for m in model.modules()}
    assert FastDropout in kinds and torch.nn.Dropout not in kinds


def test_fast_attention_drops_weights_keeps_masks_and_follows_the_seed(tiny_parts):
    torch.manual_seed(0)
    reference = BERTClassifier(tiny_backbone(len(tiny_parts)), 2, "cls")
    reference.backbone.set_attn_implementation("eager")  # transformers' own, mask added as -inf
    model = BERTClassifier(tiny_backbone(len(tiny_parts)), 2, "cls")
    model.load_state_dict(reference.state_dict())
    use_fast_dropout(model, [model.backbone])
    assert model.backbone.config._attn_implementation == "fast_dropout"
    ids = torch.randint(5, len(tiny_parts), (3, 12))
    mask = (torch.arange(12) < torch.tensor([[12], [7], [2]])).long()
    for m in list(model.modules()) + list(reference.modules()):
        if isinstance(m, torch.nn.Dropout):
            m.p = 1e-9  # training, with every weight kept: the masking alone
    for mode in (True, False):  # training: our path; evaluation: SDPA
        model.train(mode), reference.train(mode)
        assert torch.allclose(model(ids, mask), reference(ids, mask), atol=1e-5)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.1
    model.train()
    torch.manual_seed(1)
    dropped = model(ids, mask)
    torch.manual_seed(1)
    assert torch.equal(model(ids, mask), dropped)  # masks follow torch's seed (exact --resume)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and m.p:
            m.forward = lambda x: x  # only the attention weights are dropped now
    torch.manual_seed(1)
    assert not torch.allclose(model(ids, mask), reference.train()(ids, mask), atol=1e-4)


def test_threads_follow_the_flag(monkeypatch):
    before = torch.get_num_threads()
    try:
        threads = Threads(1, torch.device("cpu"))
        assert torch.get_num_threads() == 1 and not threads.adaptive  # --threads N stays N
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert not Threads(0, torch.device("cpu")).adaptive  # so does OMP_NUM_THREADS
    finally:
        torch.set_num_threads(before)


def test_threads_follow_other_work_as_it_comes_and_goes(monkeypatch, capsys):
    """A simulated load on 2 cores, looked at every 5 s: a 1-second burst at start decides
    nothing; a core kept busy lowers the threads to 1; when it is free again they rise to 2; as
    training starts the first look comes after 2 s."""
    hz, clock, load = os.sysconf("SC_CLK_TCK"), [0.0], []
    busy_ticks, own_ticks = [0.0], [0.0]

    def cpu_times(cpus):  # /proc/stat and os.times as the simulated machine has them
        return busy_ticks[0], own_ticks[0]

    def advance(seconds, other_cores):  # this run keeps its threads busy; others add theirs
        clock[0] += seconds
        own_ticks[0] += seconds * hz * torch.get_num_threads()
        busy_ticks[0] += seconds * hz * (torch.get_num_threads() + other_cores)

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(_3_run, "cpu_times", cpu_times)
    monkeypatch.setattr(_3_run.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        threads = Threads(0, torch.device("cpu"))
        for seconds, other, expected in (
            (1, 1, 2),
            (4, 0, 2),  # a burst at start: still 2
            (5, 1, 1),
            (5, 1, 1),  # a core kept busy: 1 thread
            (5, 0, 2),
            (2, 1, 2),
        ):  # free again: 2; a look too
            advance(seconds, other)  # soon changes nothing
            threads.look()
            load.append(torch.get_num_threads())
            assert load[-1] == expected, load
        lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("note:")]
        assert lines == [
            f"note: other work keeps {busy} of 2 cores busy; training on {n} "
            f"thread{'s' * (n > 1)} (--threads N fixes the count)"
            for busy, n in ((1, 1), (0, 2))
        ]
        threads.restart()  # an epoch starts: a core busy all along is seen after 2 s, not 5
        advance(2, 1)
        threads.look()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_other_busy_cores_sees_a_spinning_program():
    import subprocess
    import sys
    import time

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one core: a spinner would share it with this test")
    cpus = {f"cpu{i}" for i in os.sched_getaffinity(0)}
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        first, start = cpu_times(cpus), time.monotonic()
        end = start + 0.5
        while time.monotonic() < end:  # this process is busy too: its own time is taken off
            pass
        busy = other_busy_cores(first, cpu_times(cpus), time.monotonic() - start)
        assert 0.6 <= busy <= 1.6, busy
    finally:
        spinner.kill()
        spinner.wait()


FAMILY_HEADS = [
    (family, head)
    for family in ("bert", "roberta", "electra")
    for head in HEADS
    if (family, head) != ("electra", "pooler")
]  # ELECTRA has no pooler


@pytest.fixture(scope="module")
def family_checkpoints(minilm, tmp_path_factory):
    """{(family, head): folder}: MiniLM (BERT) and small RoBERTa / ELECTRA encoders, every head."""
    folders = {}
    for family, head in FAMILY_HEADS:
        torch.manual_seed(0)
        backbone, tokenizer, _ = load_backbone(minilm)
        if family != "bert":
            backbone = family_backbone(family, tokenizer)
        folder = tmp_path_factory.mktemp(f"{family}-{head}")
        model = new_classifier(backbone, 3, head, 0.1)
        save_checkpoint(str(folder), model, tokenizer, info_for(list("abc"), ["가", "나", "다"]))
        folders[family, head] = str(folder)
    return folders


def our_probs(folder, plain):
    model, tokenizer, info = load_checkpoint(folder, plain=plain)
    logits = classify(
        model, tokenizer, CHECK_TEXTS + reviews(40), info["args"]["max_len"], info["pad_token_id"]
    )
    return torch.from_numpy(logits).softmax(-1).numpy()


@pytest.mark.parametrize("family, head", FAMILY_HEADS)
def test_transformers_loads_the_folder_with_our_probabilities(family_checkpoints, family, head):
    """AutoModelForSequenceClassification and pipeline() read a checkpoint folder as it is: the
    standard class for cls/pooler heads, the shipped code (trust_remote_code) for the others."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer, pipeline

    folder = family_checkpoints[family, head]
    expected = our_probs(folder, plain=False)
    texts = CHECK_TEXTS + reviews(40)
    custom = head in ("weight_avg", "lstm")
    if custom:  # not as transformers' own class with a random classifier: loudly refused
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            AutoModelForSequenceClassification.from_pretrained(folder)
    assert type(AutoModel.from_pretrained(folder)).__name__.endswith("Model")  # the encoder
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=custom)
    assert (type(model).__name__ == "BERTClassifierForSequenceClassification") == custom
    assert model.config.id2label == {0: "가", 1: "나", 2: "다"}
    encoded = AutoTokenizer.from_pretrained(folder)(
        texts, padding=True, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        probs = model.eval()(**encoded).logits.softmax(-1).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    classify_text = pipeline(
        "text-classification", model=folder, trust_remote_code=custom, device="cpu"
    )
    rows = classify_text(texts, top_k=None, truncation=True)
    got = np.array(
        [[{r["label"]: r["score"] for r in row}[n] for n in ("가", "나", "다")] for row in rows]
    )
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_a_custom_head_folder_of_before_the_guard_still_loads(family_checkpoints, tmp_path):
    """Folders written before custom heads held transformers' output weight empty load as
    before, in predict.py's way and transformers'."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "old"
    shutil.copytree(family_checkpoints["bert", "weight_avg"], folder)
    weights = load_file(str(folder / "model.safetensors"))
    assert weights.pop("classifier.weight").numel() == 0
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for plain in (True, False):
        np.testing.assert_allclose(
            our_probs(str(folder), plain),
            our_probs(family_checkpoints["bert", "weight_avg"], plain),
        )


@pytest.mark.parametrize("family, head", FAMILY_HEADS)
def test_plain_encoder_predicts_like_transformers(family_checkpoints, family, head):
    """predict.py's encoder (no transformers import) against the transformers backbone."""
    folder = family_checkpoints[family, head]
    model, _, _ = load_checkpoint(folder, plain=True)
    assert type(model.backbone).__name__ == "PlainEncoder"
    np.testing.assert_allclose(
        our_probs(folder, plain=True), our_probs(folder, plain=False), atol=1e-5
    )


def test_plain_tokenizer_gives_the_training_ids(tmp_path, tiny_parts):
    from tokenizers import Tokenizer

    save_checkpoint(
        str(tmp_path),
        BERTClassifier(tiny_backbone(len(tiny_parts)), 2, "cls"),
        tiny_parts,
        info_for(["0", "1"], ["0", "1"], max_len=64),
    )
    texts = CHECK_TEXTS + reviews(300)
    plain = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert [x.tolist() for x in encode_texts(plain, texts, 64)] == [
        x.tolist() for x in encode_texts(tiny_parts, texts, 64)
    ]


def test_folder_holds_no_code_for_standard_heads_and_safetensors_only(family_checkpoints):
    for (family, head), folder in family_checkpoints.items():
        names = set(os.listdir(folder))
        shipped = {"heads.py", "modeling_classifier.py"}
        assert (shipped <= names) == (head in ("weight_avg", "lstm")), (family, head, names)
        assert not any(n.endswith((".pt", ".pth", ".bin", ".pkl")) for n in names)
