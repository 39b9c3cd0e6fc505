"""Small offline copies of the presets' hub repositories: the real file names, config fields,
tokenizer kinds and special-token ids, with a few tiny layers of random weights and a vocabulary
learned from the shipped NSMC sample.

Facts, as published on each model card / repository (checked 2026-11):
- skt/kobert-base-v1: BertModel, vocab 8,002, pad_token_id 1; spiece.model + tokenizer_config.json
  with tokenizer_class XLNetTokenizer; pytorch_model.bin only. [UNK] 0, [PAD] 1, [CLS] 2, [SEP] 3.
- beomi/kcbert-base: BERT pretraining weights, max_position_embeddings 300, model_max_length 300,
  cased WordPiece vocab.txt; pytorch_model.bin.
- klue/roberta-base: model_type roberta with a BertTokenizer (WordPiece vocab.txt, [CLS] 0,
  [PAD] 1, [SEP] 2, [UNK] 3), type_vocab_size 1, max_position_embeddings 514, no pooler weights.
- kykim/bert-kor-base: BERT pretraining weights, cased WordPiece vocab.txt; pytorch_model.bin.
- FacebookAI/roberta-base: byte-level BPE (vocab.json + merges.txt), <s> 0, <pad> 1, </s> 2,
  max_position_embeddings 514, type_vocab_size 1, no pooler weights.
- beomi/KcELECTRA-base-v2022, monologg/koelectra-base-v3-discriminator: ELECTRA discriminators
  (no pooler), cased WordPiece vocab.txt with [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4;
  pytorch_model.bin.
"""

import hashlib
import json
import os

import torch

WORDPIECE = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
KLUE = ["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"]
SMALL = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}

# preset -> (repo, transformers class of the published weights, weights file, tokenizer kind,
#            config fields, tokenizer_config.json)
LAYOUTS = {
    "kobert": (
        "skt/kobert-base-v1",
        "BertModel",
        "pytorch_model.bin",
        "spiece",
        {"pad_token_id": 1, "max_position_embeddings": 512, "type_vocab_size": 2},
        {
            "tokenizer_class": "XLNetTokenizer",
            "do_lower_case": False,
            "remove_space": True,
            "keep_accents": False,
            "bos_token": "[CLS]",
            "eos_token": "[SEP]",
            "unk_token": "[UNK]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "cls_token": "[CLS]",
            "mask_token": "[MASK]",
        },
    ),
    "kcbert": (
        "beomi/kcbert-base",
        "BertForPreTraining",
        "pytorch_model.bin",
        WORDPIECE,
        {"pad_token_id": 0, "max_position_embeddings": 300, "type_vocab_size": 2},
        {"do_lower_case": False, "model_max_length": 300},
    ),
    "klue-roberta": (
        "klue/roberta-base",
        "RobertaForMaskedLM",
        "pytorch_model.bin",
        KLUE,
        {
            "pad_token_id": 1,
            "bos_token_id": 0,
            "eos_token_id": 2,
            "max_position_embeddings": 514,
            "type_vocab_size": 1,
            "tokenizer_class": "BertTokenizer",
        },
        {
            "do_lower_case": False,
            "model_max_length": 512,
            "bos_token": "[CLS]",
            "eos_token": "[SEP]",
            "unk_token": "[UNK]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "cls_token": "[CLS]",
            "mask_token": "[MASK]",
            "tokenizer_class": "BertTokenizer",
        },
    ),
    "bert-kor-base": (
        "kykim/bert-kor-base",
        "BertForPreTraining",
        "pytorch_model.bin",
        WORDPIECE,
        {"pad_token_id": 0, "max_position_embeddings": 512, "type_vocab_size": 2},
        {"do_lower_case": False},
    ),
    "roberta-base": (
        "FacebookAI/roberta-base",
        "RobertaForMaskedLM",
        "model.safetensors",
        "bpe",
        {
            "pad_token_id": 1,
            "bos_token_id": 0,
            "eos_token_id": 2,
            "max_position_embeddings": 514,
            "type_vocab_size": 1,
        },
        {"model_max_length": 512},
    ),
    "kcelectra": (
        "beomi/KcELECTRA-base-v2022",
        "ElectraForPreTraining",
        "pytorch_model.bin",
        WORDPIECE,
        {
            "pad_token_id": 0,
            "max_position_embeddings": 512,
            "type_vocab_size": 2,
            "embedding_size": 32,
        },
        {"do_lower_case": False, "model_max_length": 512},
    ),
    "koelectra": (
        "monologg/koelectra-base-v3-discriminator",
        "ElectraForPreTraining",
        "pytorch_model.bin",
        WORDPIECE,
        {
            "pad_token_id": 0,
            "max_position_embeddings": 512,
            "type_vocab_size": 2,
            "embedding_size": 32,
        },
        {"do_lower_case": False, "model_max_length": 512},
    ),
}


def write_wordpiece_vocab(folder, texts, specials):
    from tokenizers import BertWordPieceTokenizer

    tok = BertWordPieceTokenizer(lowercase=False, strip_accents=False)
    tok.train_from_iterator(texts, vocab_size=1500, special_tokens=specials)
    vocab = sorted(tok.get_vocab().items(), key=lambda item: item[1])
    with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
        f.writelines(token + "\n" for token, _ in vocab)
    return len(vocab)


def write_bpe_vocab(folder, texts):
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(
        texts, vocab_size=1500, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    )
    tok.save_model(folder)
    return tok.get_vocab_size()


def write_spiece(folder, texts):
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=os.path.join(folder, "spiece"),
        vocab_size=1500,
        model_type="unigram",
        unk_id=0,
        unk_piece="[UNK]",
        pad_id=1,
        pad_piece="[PAD]",
        bos_id=-1,
        eos_id=-1,
        user_defined_symbols=["[CLS]", "[SEP]", "[MASK]"],
        minloglevel=2,
    )
    os.remove(os.path.join(folder, "spiece.vocab"))
    return 1500


def make_model_folder(folder, preset, texts):
    """Write a copy of the preset's repository into folder; returns folder."""
    import transformers

    _, class_name, weights_file, tokenizer, fields, tokenizer_config = LAYOUTS[preset]
    os.makedirs(folder, exist_ok=True)
    if tokenizer == "spiece":
        vocab_size = write_spiece(folder, texts)
    elif tokenizer == "bpe":
        vocab_size = write_bpe_vocab(folder, texts)
    else:
        vocab_size = write_wordpiece_vocab(folder, texts, tokenizer)
    model_class = getattr(transformers, class_name)
    config = model_class.config_class(**SMALL, **fields, vocab_size=vocab_size)
    torch.manual_seed(0)
    model = model_class(config)
    config.architectures = [class_name]
    if weights_file.endswith(".bin"):
        torch.save(model.state_dict(), os.path.join(folder, weights_file))
    else:
        model.save_pretrained(folder)  # model.safetensors, tied weights stored once
    config.to_json_file(os.path.join(folder, "config.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config, f)
    return folder


def make_hub_cache(cache, preset, folder):
    """Lay folder out in cache as huggingface_hub does: blobs named by hash, a snapshot of
    relative symlinks, refs/main naming the snapshot."""
    repo = LAYOUTS[preset][0]
    root = os.path.join(cache, "models--" + repo.replace("/", "--"))
    commit = hashlib.sha1(repo.encode()).hexdigest()
    snapshot = os.path.join(root, "snapshots", commit)
    for sub in ("blobs", "refs", snapshot):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        blob = hashlib.sha256(data).hexdigest()
        with open(os.path.join(root, "blobs", blob), "wb") as f:
            f.write(data)
        os.symlink(os.path.join("..", "..", "blobs", blob), os.path.join(snapshot, name))
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(commit)
    return root
