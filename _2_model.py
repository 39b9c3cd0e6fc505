"""`BERTClassifier`: a transformers encoder plus one head chosen by name (the heads are in
heads.py), checkpoints, and running a model on batches.

A checkpoint folder is a standard Hugging Face model folder: config.json with id2label,
model.safetensors with the library's key names, the tokenizer files, and classifier.json with
the training flags. The `cls` and `pooler` heads on BERT, RoBERTa and ELECTRA backbones are saved
as the library's own *ForSequenceClassification classes; other heads ship heads.py and
modeling_classifier.py for `trust_remote_code=True`. Loading reads safetensors and JSON only.
"""
import collections
import functools
import importlib.util
import itertools
import json
import math
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from _1_data import TRUNCATIONS, BERTSPTokenizer, sha256_of, write_atomic
from heads import HEADS

PRESETS = {  # --model name -> Hugging Face hub id
    "kobert": "skt/kobert-base-v1",
    "kcbert": "beomi/kcbert-base",
    "klue-roberta": "klue/roberta-base",
    "bert-kor-base": "kykim/bert-kor-base",
    "roberta-base": "FacebookAI/roberta-base",
    "kcelectra": "beomi/KcELECTRA-base-v2022",
    "koelectra": "monologg/koelectra-base-v3-discriminator",
    "tiny": None,  # trained from scratch, tokenizer learned from the training texts
}
# A model trained from scratch wants a larger learning rate than fine-tuning, and pretraining
# first (README: 4 + 2 epochs beat 3 of fine-tuning alone on NSMC), hiding 30% of the tokens
# (bench/pretrain_pilots.py: above 15% with both seeds; Wettig et al. 2022), without dropout (as
# accurate, and faster) for 6 epochs (what fits in the hour: 0.877 on NSMC with two seeds, where
# 5 fell short), then the weight_avg head, which pools every token where [CLS] learnt nothing of
# its own from masked LM (README: +0.0034); flags still win.
PRESET_DEFAULTS = {
    "tiny": {"lr": 3e-4, "warmup_rate": 0.06, "dr_rate": 0.1, "total_epochs": 2,
             "train_batch_size": 64, "mlm_epochs": 6, "mlm_lr": 5e-4, "mlm_probability": 0.3,
             "pretrain_dropout": 0.0, "head_name": "weight_avg"},
}
# ...and where a --problem wants other ones: 28 labels of short comments need more epochs of
# fine-tuning than two sentiments, and their pretraining covers NSMC's reviews as well, so fewer
# of its epochs fit in the hour (README: GoEmotions-Korean, pretrained with dropout as measured
# there; its dev macro-F1 peaked by epoch 3 of 6, and 5 of 10 with the cls head)
PROBLEM_DEFAULTS = {
    ("tiny", "multi_label"): {"mlm_epochs": 3, "total_epochs": 6, "pretrain_dropout": None},
}


def preset_defaults(model, problem):
    """The defaults --model (a preset) brings for --problem; flags given still win."""
    return {**PRESET_DEFAULTS.get(model, {}), **PROBLEM_DEFAULTS.get((model, problem), {})}


TINY = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
        "intermediate_size": 1024, "vocab_size": 16000}
SPIECE = "spiece.model"
KOBERT_TOKENIZERS = ("XLNetTokenizer", "KoBERTTokenizer", "KoBertTokenizer")  # tokenizer_class
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# backbone model_type -> (the transformers class that holds our cls/pooler head exactly,
# where our head's dense layer and output layer go in its state dict)
STANDARD_HEADS = {
    "bert": ("BertForSequenceClassification", "bert.pooler.dense.", "classifier."),
    "roberta": ("RobertaForSequenceClassification", "classifier.dense.", "classifier.out_proj."),
    "xlm-roberta": ("XLMRobertaForSequenceClassification", "classifier.dense.",
                    "classifier.out_proj."),
    "electra": ("ElectraForSequenceClassification", "classifier.dense.", "classifier.out_proj."),
}
CUSTOM_CLASS = "BERTClassifierForSequenceClassification"
SHIPPED_CODE = ("heads.py", "modeling_classifier.py")  # copied into folders of custom heads


class ModelError(ValueError):
    """A model that cannot be built or loaded; the message is one line."""


class BERTClassifier(nn.Module):
    def __init__(self, backbone, num_classes, head_name="cls", dr_rate=0.1):
        super().__init__()
        if head_name not in HEADS:
            raise ModelError(f"--head_name {head_name!r} is not one of {', '.join(HEADS)}")
        config = backbone.config
        activation = "gelu" if config.model_type == "electra" else "tanh"  # as each family's own
        self.head = HEADS[head_name](config.hidden_size, num_classes, dr_rate, activation)
        if getattr(backbone, "pooler", None) is not None:
            backbone.pooler = None  # the heads have their own dense layer: no unused weights
        self.backbone, self.head_name = backbone, head_name

    def forward(self, input_ids, attention_mask):
        hidden_states = self.backbone(input_ids=input_ids,
                                      attention_mask=attention_mask).last_hidden_state
        return self.head(hidden_states, attention_mask)

    def freeze_backbone(self):
        for p in self.backbone.parameters():
            p.requires_grad_(False)


def new_classifier(backbone, num_classes, head_name, dr_rate):
    """A classifier to fine-tune; the pooler head starts from the backbone's pretrained pooler."""
    pooler = getattr(backbone, "pooler", None)
    if head_name == "pooler" and getattr(pooler, "dense", None) is None:
        raise ModelError(f"the {backbone.config.model_type} backbone has no pooler; "
                         f"use --head_name cls, weight_avg or lstm")
    pooler_weights = pooler.dense.state_dict() if head_name == "pooler" else None
    model = BERTClassifier(backbone, num_classes, head_name, dr_rate)
    if pooler_weights:
        model.head.dense.load_state_dict(pooler_weights)
    return model


# ----------------------------------------------------------------------------- backbones

def train_wordpiece(texts, vocab_size, cache_dir=None):
    """A cased WordPiece tokenizer learned from texts (no accent stripping: NFD would split Hangul).

    tokenizers' trainer breaks ties in hash-map order (huggingface/tokenizers#1794), so two
    trainings on the same texts can differ; the result is cached under a key of the texts, which
    makes runs with the same data and seed repeatable."""
    import hashlib

    from tokenizers import (Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                            trainers)
    from transformers import PreTrainedTokenizerFast

    key = hashlib.sha256(f"wordpiece|{vocab_size}|".encode())
    for text in texts:
        key.update(text.encode("utf-8", "surrogatepass") + b"\0")
    path = cache_dir and os.path.join(cache_dir, f"wordpiece-{key.hexdigest()[:32]}.json")
    tok = None
    if path and os.path.exists(path):
        try:
            tok = Tokenizer.from_file(path)
        except Exception:  # tokenizers raises its own error types for a damaged file
            print(f"note: {path} is damaged; learning the vocabulary again", flush=True)
    if tok is None:
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size,
                                                                 special_tokens=SPECIALS))
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
        if path:
            os.makedirs(cache_dir, exist_ok=True)
            write_atomic(path, tok.save)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def tiny_backbone(vocab_size, objective=None):
    """tiny, new: a BERT, with BERT's masked-LM head for --objective mlm. For --objective rtd it is
    an ELECTRA discriminator of the same size (ElectraForPreTraining: its detection head), so the
    model fine-tuned after it is an ELECTRA: no pooler, GELU in the cls head."""
    from transformers import (BertConfig, BertForMaskedLM, BertModel, ElectraConfig,
                              ElectraForPreTraining)

    size = {**TINY, "vocab_size": vocab_size, "max_position_embeddings": 512}
    if objective == "rtd":
        return ElectraForPreTraining(ElectraConfig(**size, embedding_size=TINY["hidden_size"]))
    return (BertForMaskedLM if objective == "mlm" else BertModel)(BertConfig(**size))


def resolve_model(name):
    """Hub id or local folder for --model; a clear error for a folder that does not exist."""
    if name in PRESETS:
        return PRESETS[name]
    if os.path.isdir(name):
        return name
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        raise ModelError(f"--model {name}: no such folder")
    return name


def from_hub_or_cache(load, name):
    """Use the local cache first, then the hub; one line naming the model whatever goes wrong."""
    try:
        try:
            return load(name, local_files_only=True)
        except OSError:
            if os.path.isdir(name):
                raise
            return load(name)
    except OSError as e:
        if os.path.isdir(name):
            raise ModelError(f"--model {name}: cannot load this folder "
                             f"({str(e).splitlines()[0]})") from None
        known = "" if "/" in name else f"not a preset ({', '.join(PRESETS)}), and "
        raise ModelError(f"--model {name}: {known}not in the local Hugging Face cache and the hub "
                         f"cannot be reached; use --model tiny or a local model folder") from None
    except Exception as e:  # a broken config, weights or tokenizer files, a missing package
        cause = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"--model {name}: cannot load it ({cause})") from None


def model_file(path, name):
    """Local path of one file of a model folder or hub repository; None when it has no such file."""
    if os.path.isdir(path):
        return os.path.join(path, name) if os.path.isfile(os.path.join(path, name)) else None
    from huggingface_hub import hf_hub_download

    try:
        return from_hub_or_cache(lambda repo, **kw: hf_hub_download(repo, name, **kw), path)
    except ModelError:
        return None


def kobert_spiece(path):
    """The SentencePiece file of a model laid out like skt/kobert-base-v1 (spiece.model and an
    XLNet-style tokenizer config), whatever its folder is called; None for other models.
    AutoTokenizer reads that config as an XLNet tokenizer: wrong ids, [CLS] at the end."""
    config = model_file(path, "tokenizer_config.json")
    if config is None or read_json(config).get("tokenizer_class") not in KOBERT_TOKENIZERS:
        return None
    return model_file(path, SPIECE)


def load_backbone(name, train_texts=(), cache_dir=None, objective=None):
    """(backbone, tokenizer, names of backbone weights its checkpoint lacked) for --model: a
    preset, a hub id or a local folder; for pretraining (--objective mlm or rtd) the backbone with
    its masked-language-model head or its replaced-token-detection head."""
    from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForPreTraining, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()  # warnings users cannot act on; what matters is said below
    if name == "tiny":
        tokenizer = train_wordpiece(train_texts, TINY["vocab_size"], cache_dir)
        return tiny_backbone(len(tokenizer), objective), tokenizer, []
    path = resolve_model(name)
    check_backbone_folder(path)  # before transformers allocates what config.json says
    auto = {None: AutoModel, "mlm": AutoModelForMaskedLM, "rtd": AutoModelForPreTraining}
    backbone, loading = from_hub_or_cache(
        lambda p, **kw: auto[objective].from_pretrained(p, output_loading_info=True, **kw), path)
    in_fresh_memory(backbone)
    spiece = kobert_spiece(path) if backbone.config.model_type == "bert" else None
    if name == "kobert" and spiece is None:
        raise ModelError(f"--model kobert: {path} has no {SPIECE} with a KoBERT tokenizer config")
    if spiece:
        tokenizer = BERTSPTokenizer(spiece)
    else:
        tokenizer = from_hub_or_cache(AutoTokenizer.from_pretrained, path)
    if len(tokenizer) < backbone.config.vocab_size // 2:  # transformers 5 builds an empty one
        raise ModelError(f"--model {name}: its tokenizer has {len(tokenizer)} tokens for "
                         f"{backbone.config.vocab_size} embeddings; the vocabulary files "
                         f"(vocab.txt, tokenizer.json, {SPIECE}, ...) are missing or broken")
    return backbone, tokenizer, sorted(loading["missing_keys"])


def in_fresh_memory(model):
    # from_pretrained leaves the weights on the file's memory map, aligned as the file happens
    # to be (8 bytes); CPU kernels may round differently there than on fresh, 64-byte aligned
    # memory, and a --resume loads into fresh memory: the two runs would drift in the last bits
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        tensor.data = tensor.data.clone()


def length_limit(backbone, tokenizer):
    """The most tokens the backbone takes: its position embeddings (RoBERTa's start after the
    padding index) and the tokenizer's own model_max_length (tokenizer None: positions only)."""
    limit = getattr(backbone.config, "max_position_embeddings", None) or 10**9
    padding_idx = getattr(getattr(backbone, "embeddings", None), "padding_idx", None)
    if padding_idx is not None:
        limit -= padding_idx + 1
    return min(limit, getattr(tokenizer, "model_max_length", limit))


def cap_max_len(args, encoder, tokenizer):
    # a model has position embeddings for so many tokens; a longer text would index past them
    limit = length_limit(encoder, tokenizer)
    if args.max_len > limit:
        print(f"note: --max_len {args.max_len} is more than {args.model} takes; using {limit}")
        args.max_len = limit


def classifier_to_finetune(name, num_classes, head_name, dr_rate, train_texts=(), cache_dir=None):
    """(BERTClassifier, tokenizer) to fine-tune: a pretrained backbone with a new head, or one of
    this repository's checkpoint folders with its weights, head and tokenizer."""
    if os.path.isfile(os.path.join(name, "classifier.json")):
        return continue_checkpoint(name, num_classes, head_name, dr_rate)
    backbone, tokenizer, missing = load_backbone(name, train_texts, cache_dir)
    if missing and name != "tiny":
        pooler = [k for k in missing if k.startswith("pooler.")]
        if head_name == "pooler" and pooler:
            print(f"note: {name} has no pretrained pooler weights, so the pooler head starts from "
                  f"random ones: the same as --head_name cls")
        others = [k for k in missing if k not in pooler]
        if others:
            print(f"note: {len(others)} weights of {name} are not in its checkpoint and start "
                  f"random ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''})")
    return new_classifier(backbone, num_classes, head_name, dr_rate), tokenizer


def continue_checkpoint(folder, num_classes, head_name, dr_rate):
    """Fine-tune one of our checkpoints further: its backbone and tokenizer, and its head when
    the head and the number of classes are the same."""
    old, tokenizer, info = load_checkpoint(folder)
    model = BERTClassifier(old.backbone, num_classes, head_name, dr_rate)
    old_classes = len(info["labels"])
    if (info["head_name"], old_classes) == (head_name, num_classes):
        model.head.load_state_dict(old.head.state_dict())
    else:
        print(f"note: {folder} has a {info['head_name']} head for {old_classes} classes; a new "
              f"{head_name} head for {num_classes} classes starts from random weights")
    if hasattr(tokenizer, "model_max_length"):  # it holds the old run's --max_len: no limit
        tokenizer.model_max_length = int(1e30)  # (transformers' value for none)
    return model.train(), tokenizer


class MaskedLM(nn.Module):
    """A transformers *ForMaskedLM model (`lm`) whose head runs only at the positions to predict:
    on all of them it would cost more than the encoder (the head maps to the whole vocabulary)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        heads = [m for name, m in lm.named_children() if name != lm.base_model_prefix]
        self.head = heads[0] if len(heads) == 1 else nn.Sequential(*heads)  # ELECTRA has two

    def forward(self, input_ids, attention_mask, positions):
        hidden_states = self.lm.base_model(input_ids=input_ids,
                                           attention_mask=attention_mask).last_hidden_state
        return self.head(hidden_states[positions])


class Detection(collections.namedtuple("Detection", "generated detected replaced")):
    """What ReplacedTokenDetection returns: the generator's logits at the hidden positions, the
    discriminator's logit for every real token, and which of those the generator replaced (1.0).
    .float() as a tensor's, so the training loop takes it as it takes logits."""

    def float(self):
        return Detection(*(t.float() for t in self))


class ReplacedTokenDetection(nn.Module):
    """ELECTRA's pretraining (Clark et al., 2020). A small generator, a masked language model
    sharing the discriminator's token embeddings, fills the hidden positions with tokens it
    samples; the discriminator (an ElectraForPreTraining, the model fine-tuning starts from) then
    tells for every real token whether it is the original or a replacement. So it learns from
    every token, where a masked language model learns from the hidden 15%."""

    def __init__(self, generator, discriminator):
        super().__init__()
        self.generator, self.discriminator = generator, discriminator
        # one table of token (and position) embeddings for both, and the generator's output
        # layer is that table too; where the widths differ ELECTRA's embeddings_project maps it
        generator.electra.embeddings = discriminator.electra.embeddings
        generator.generator_lm_head.weight = discriminator.electra.embeddings.word_embeddings.weight

    def forward(self, input_ids, attention_mask, positions, original_ids):
        hidden = self.generator.electra(input_ids=input_ids,
                                        attention_mask=attention_mask).last_hidden_state
        generated = self.generator.generator_lm_head(
            self.generator.generator_predictions(hidden[positions]))
        # replacements are sampled from the generator (its best guess would too often be the
        # original); the sampling passes no gradient: the generator learns from its own loss
        with torch.no_grad():
            sampled = torch.multinomial(generated.float().softmax(-1), 1).squeeze(-1)
            corrupted = original_ids.masked_scatter(positions, sampled)
        real = attention_mask.bool()
        detected = self.discriminator(input_ids=corrupted, attention_mask=attention_mask).logits
        # a sampled token that is the original counts as original
        return Detection(generated, detected[real], corrupted.ne(original_ids)[real].float())


def new_generator(config, size):
    """ELECTRA's generator for a discriminator's config: `size` of its attention heads (so of its
    width) and of its feed-forward width, the same depth, vocabulary and embedding width."""
    from transformers import ElectraConfig, ElectraForMaskedLM

    heads = max(1, round(config.num_attention_heads * size))
    width = heads * (config.hidden_size // config.num_attention_heads)  # heads keep their width
    generator = ElectraConfig(**{**config.to_dict(), "hidden_size": width,
                                 "num_attention_heads": heads, "architectures": None,
                                 "intermediate_size": max(1, round(config.intermediate_size
                                                                   * size))})
    return ElectraForMaskedLM(generator)


def load_generator(path, config):
    """A local ElectraForMaskedLM folder (--generator, or <pretrained>/generator on --resume),
    checked as data and against the discriminator's vocabulary and embedding width."""
    from transformers import ElectraForMaskedLM

    check_backbone_folder(path)
    generator = ElectraForMaskedLM.from_pretrained(path)
    in_fresh_memory(generator)
    mine = (generator.config.vocab_size, generator.config.embedding_size)
    if mine != (config.vocab_size, config.embedding_size):
        raise ModelError(f"--generator {path}: vocabulary and embedding width {mine}, the model's "
                         f"are {(config.vocab_size, config.embedding_size)}")
    return generator


def model_to_pretrain(name, train_texts, cache_dir, objective, generator_size=0.25,
                      generator=None):
    """(MaskedLM or ReplacedTokenDetection, tokenizer) to continue pretraining --model on texts
    (tiny: a new one). ELECTRA models continue detection with their published head; their
    generator starts new unless --generator names one (published ones are on the hub only)."""
    if os.path.isfile(os.path.join(name, "classifier.json")):
        raise ModelError(f"--pretrain_epochs: {name} is a fine-tuned checkpoint; pretrain from a "
                         f"pretrained model or tiny (a pretraining run saves one in "
                         f"<output_dir>/pretrained)")
    model, tokenizer, missing = load_backbone(name, train_texts, cache_dir, objective)
    if objective == "rtd" and model.config.model_type != "electra":
        raise ModelError(f"--objective rtd: {name} is a {model.config.model_type} model; "
                         f"replaced-token detection continues ELECTRA models (tiny, kcelectra, "
                         f"koelectra, an ELECTRA folder); use --objective mlm")
    if missing and name != "tiny":
        what = "masked-language-model" if objective == "mlm" else "replaced-token-detection"
        print(f"note: {len(missing)} weights of the {what} head of {name} are not in its "
              f"checkpoint and start random ({', '.join(missing[:3])}"
              f"{', ...' if len(missing) > 3 else ''})")
    if objective == "mlm":
        return MaskedLM(model), tokenizer
    generator = (load_generator(generator, model.config) if generator
                 else new_generator(model.config, generator_size))
    return ReplacedTokenDetection(generator, model), tokenizer


def pretraining_to_resume(folder, objective):
    """The model of a pretraining state's folder (save_pretraining wrote it) and its tokenizer."""
    model, tokenizer, _ = load_backbone(folder, objective=objective)
    if objective == "mlm":
        return MaskedLM(model), tokenizer
    generator = load_generator(os.path.join(folder, "generator"), model.config)
    return ReplacedTokenDetection(generator, model), tokenizer


def special_ids(tokenizer):
    """(the ids pretraining never masks: the special tokens such as [CLS] [SEP] [PAD], the id of
    [MASK]) of a tokenizer."""
    if isinstance(tokenizer, BERTSPTokenizer):
        ids = [tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id]
        return torch.tensor(ids), tokenizer.token_id("[MASK]")
    if tokenizer.mask_token_id is None:
        raise ModelError("--pretrain_epochs: the model's tokenizer has no mask token")
    return torch.tensor(tokenizer.all_special_ids), tokenizer.mask_token_id


def word_starts(tokenizer):
    """Which vocabulary ids begin a word, for --mask_whole_words: WordPiece marks the pieces
    that continue a word with ##, SentencePiece (KoBERT) and byte-level BPE (RoBERTa) mark the
    pieces that start one with ▁ or Ġ."""
    if isinstance(tokenizer, BERTSPTokenizer):
        pieces = [tokenizer.sp.id_to_piece(i) for i in range(len(tokenizer))]
    else:
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    if any(piece.startswith("##") for piece in pieces):
        return torch.tensor([not piece.startswith("##") for piece in pieces])
    if any(piece.startswith(("▁", "Ġ")) for piece in pieces):
        return torch.tensor([piece.startswith(("▁", "Ġ")) for piece in pieces])
    raise ModelError("--mask_whole_words: this tokenizer marks neither where words start nor "
                     "where they continue")


def set_dropout(model, rate):
    """Every dropout of model (attention weights included) at rate (None: left as they are);
    config.json keeps its own rates, so a folder saved from model fine-tunes with those."""
    for module in model.modules() if rate is not None else ():
        if isinstance(module, nn.Dropout):
            module.p = rate


def save_pretraining(folder, model, tokenizer, info):
    """A Hugging Face folder that --model can name: config.json, model.safetensors (the masked
    LM, or the ELECTRA discriminator with its generator in generator/), the tokenizer, and
    pretraining.json (info) written last."""
    os.makedirs(folder, exist_ok=True)
    save_tokenizer(folder, tokenizer, info["args"]["max_len"])
    if isinstance(tokenizer, BERTSPTokenizer):  # what kobert_spiece looks for
        write_atomic(os.path.join(folder, "tokenizer_config.json"), lambda p: Path(p).write_text(
            json.dumps({"tokenizer_class": "KoBERTTokenizer"})))
    if isinstance(model, MaskedLM):
        model.lm.save_pretrained(folder)
    else:
        model.discriminator.save_pretrained(folder)
        model.generator.save_pretrained(os.path.join(folder, "generator"))
    write_atomic(os.path.join(folder, "pretraining.json"), lambda p: Path(p).write_text(
        json.dumps(info, ensure_ascii=False, indent=1), encoding="utf-8"))


# ----------------------------------------------------------------------------- a folder is data
# A model or checkpoint folder may come from anyone (the Hub, a colleague). It is read as data and
# checked against itself before anything large is allocated: config.json field by field, then
# against the tensors its weights file holds, read from the file's header without loading them.

SIZE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "intermediate_size", "max_position_embeddings", "type_vocab_size", "embedding_size")
NEEDED_FIELDS = SIZE_FIELDS[:-1] + ("layer_norm_eps", "hidden_act")  # BERT, RoBERTa, ELECTRA
DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
          "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
HEAD_PREFIXES = ("cls.", "lm_head.", "generator", "discriminator_predictions.", "classifier.")


def weights_header(folder, failure):
    """(file name, {tensor name: (shape, dtype)}) of the folder's weights without loading them:
    the safetensors header, or a pytorch_model.bin read with weights_only (memory-mapped where
    its format allows). Old LayerNorm names (gamma, beta) read as transformers reads them.
    failure: how an error's one line starts."""
    from safetensors import safe_open

    name = next((n for n in ("model.safetensors", "pytorch_model.bin")
                 if os.path.isfile(os.path.join(folder, n))), None)
    if name is None:
        raise ModelError(f"{failure} (no model.safetensors or pytorch_model.bin)")
    path = os.path.join(folder, name)
    try:
        if name == "model.safetensors":
            with safe_open(path, "pt") as f:
                slices = {k: f.get_slice(k) for k in f.keys()}
                header = {k: (tuple(t.get_shape()), DTYPES.get(t.get_dtype(), t.get_dtype()))
                          for k, t in slices.items()}
        else:
            with warnings.catch_warnings():  # the unpickler warns about what it then refuses
                warnings.simplefilter("ignore")
                try:
                    weights = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:  # the legacy format cannot be memory-mapped
                    if "mmap" not in str(e):
                        raise
                    weights = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(weights, dict) or not all(
                    isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
                raise ModelError(f"{failure} ({name}: not a dictionary of named tensors)")
            header = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
                      for k, v in weights.items()}
    except ModelError:
        raise
    except Exception as e:  # safetensors' and the unpickler's own errors: one line
        raise ModelError(f"{failure} ({name}: {str(e).splitlines()[0][:200]})") from None
    return name, {re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k)): v
                  for k, v in header.items()}


def check_config(where, config):
    """The fields of config.json that loading reads: types, ranges, and how they fit together."""
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelError(f"{where}: expected a JSON object with a 'model_type' string")
    needed = NEEDED_FIELDS if config["model_type"] in STANDARD_HEADS else ()
    for field in needed:
        if field not in config:
            raise ModelError(f"{where}: no {field!r}")
    for field in SIZE_FIELDS:
        value = config.get(field)
        if value is not None and (type(value) is not int or value < 1):
            raise ModelError(f"{where}: {field} must be a positive integer, got "
                             f"{json.dumps(value)[:40]}")
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if hidden and heads and hidden % heads:
        raise ModelError(f"{where}: hidden_size {hidden} is not divisible by "
                         f"num_attention_heads {heads}")
    eps = config.get("layer_norm_eps", 1e-12)
    if type(eps) not in (int, float) or not 0 < eps < 1:
        raise ModelError(f"{where}: layer_norm_eps must be a number between 0 and 1, got "
                         f"{json.dumps(eps)[:40]}")
    if not isinstance(config.get("hidden_act", "gelu"), str):
        raise ModelError(f"{where}: hidden_act must be the name of an activation, got "
                         f"{json.dumps(config['hidden_act'])[:40]}")
    pad, vocab = config.get("pad_token_id"), config.get("vocab_size")
    if pad is not None and (type(pad) is not int or vocab and not 0 <= pad < vocab):
        raise ModelError(f"{where}: pad_token_id {json.dumps(pad)[:40]} is not a token id of "
                         f"the vocabulary (0 to {(vocab or 1) - 1})")


def read_config(path, failure, defaults=None):
    """config.json read as data (over defaults) and checked; failure: how the line of an
    unreadable one starts."""
    try:
        config = read_json(path)
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested too deep
        raise ModelError(f"{failure} (config.json: {str(e).splitlines()[0][:120]})") from None
    if defaults and isinstance(config, dict):
        config = {**defaults, **config}
    check_config(path, config)
    return config


def encoder_shapes(config):
    """{name: shape} of the tensors of a BERT, RoBERTa or ELECTRA encoder of this config, named
    as transformers names them (no pooler; tests/test_folders.py checks it against transformers)."""
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    width = config.get("embedding_size", hidden) if config["model_type"] == "electra" else hidden
    shapes = {"embeddings.word_embeddings.weight": (config["vocab_size"], width),
              "embeddings.position_embeddings.weight": (config["max_position_embeddings"], width),
              "embeddings.token_type_embeddings.weight": (config["type_vocab_size"], width),
              "embeddings.LayerNorm.weight": (width,), "embeddings.LayerNorm.bias": (width,)}
    if width != hidden:  # ELECTRA's small embeddings, projected to the encoder's width
        shapes.update({"embeddings_project.weight": (hidden, width),
                       "embeddings_project.bias": (hidden,)})
    for i in range(config["num_hidden_layers"]):
        layer = f"encoder.layer.{i}."
        for name, (rows, cols) in (("attention.self.query", (hidden, hidden)),
                                   ("attention.self.key", (hidden, hidden)),
                                   ("attention.self.value", (hidden, hidden)),
                                   ("attention.output.dense", (hidden, hidden)),
                                   ("intermediate.dense", (inner, hidden)),
                                   ("output.dense", (hidden, inner))):
            shapes.update({layer + name + ".weight": (rows, cols), layer + name + ".bias": (rows,)})
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes.update({layer + norm + ".weight": (hidden,), layer + norm + ".bias": (hidden,)})
    return shapes


def sizes_in_weights(header, prefix):
    """config.json's size fields as the weights under prefix show them (None: not shown)."""
    def rows(name, dim=0):
        shape = header.get(prefix + name, ((None, None),))[0]
        return shape[dim] if len(shape) > dim else None
    layers = {int(m.group(1)) for k in header
              if (m := re.match(re.escape(prefix) + r"encoder\.layer\.(\d+)\.", k))}
    return {"vocab_size": rows("embeddings.word_embeddings.weight"),
            "max_position_embeddings": rows("embeddings.position_embeddings.weight"),
            "type_vocab_size": rows("embeddings.token_type_embeddings.weight"),
            "num_hidden_layers": len(layers),
            "hidden_size": rows("encoder.layer.0.attention.self.query.weight"),
            "intermediate_size": rows("encoder.layer.0.intermediate.dense.weight")}


def check_weights(where, file, config, header, prefix, exact, extra=()):
    """The config's encoder (and `extra`: more expected {name: shape}) against the weights file:
    each size field, the implied parameter count, then every tensor's shape and dtype. exact:
    nothing else may be in the file; else returns the names of the tensors left over."""
    for field, value in sizes_in_weights(header, prefix).items():
        if value is not None and config.get(field) != value:
            raise ModelError(f"{where}: {field} is {config.get(field)}, but {file} holds "
                             f"{value} ({'layers' if field == 'num_hidden_layers' else 'rows'})")
    expected = {prefix + k: v for k, v in encoder_shapes(config).items()} | dict(extra)
    implied = sum(math.prod(shape) for shape in expected.values())
    held = sum(math.prod(shape) for shape, _ in header.values())
    missing = [k for k in expected if k not in header]
    if missing:
        raise ModelError(f"{where}: implies {implied / 1e6:.2f}M parameters; {file} lacks "
                         f"{len(missing)} of its tensors ({missing[0]}, ...)")
    for name, shape in expected.items():
        found, dtype = header[name]
        if found != shape or dtype not in ("float32", "float16", "bfloat16"):
            raise ModelError(f"{where}: implies {name} of shape {list(shape)} (float), {file} "
                             f"holds {list(found)} ({dtype})")
    left = [k for k in header if k not in expected]
    if exact and left:
        raise ModelError(f"{where}: implies {implied / 1e6:.2f}M parameters, {file} holds "
                         f"{held / 1e6:.2f}M: {len(left)} tensors more ({left[0]}, ...)")
    return left


def check_backbone_folder(path):
    """--model FOLDER (a hub layout, this repository's pretrained folder): config.json checked,
    then every tensor the encoder needs present with its shape; tensors left over (other than
    pretraining heads and a pooler) counted in one note."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        return  # a hub id: its files come from the hub's cache, where transformers reads them
    try:
        model_type = read_json(config_path).get("model_type")
    except (OSError, ValueError, RecursionError, AttributeError):
        model_type = None  # read_config says below what is wrong
    defaults = None
    if model_type in STANDARD_HEADS:  # a hub config.json may leave out fields at their defaults
        from transformers import AutoConfig

        defaults = AutoConfig.for_model(model_type).to_dict()
    config = read_config(config_path, f"--model {path}: cannot load this folder", defaults)
    if config["model_type"] not in STANDARD_HEADS:
        return  # another family: transformers checks its weights as it loads them
    file, header = weights_header(path, f"--model {path}: cannot load it")
    prefix = next((p for p in ("", config["model_type"].split("-")[-1] + ".")
                   if p + "embeddings.word_embeddings.weight" in header), None)
    if prefix is None:
        raise ModelError(f"{path}/{file}: no embeddings.word_embeddings.weight; not a "
                         f"{config['model_type']} model")
    left = check_weights(config_path, file, config, header, prefix, exact=False)
    unused = [k for k in left if not k.startswith((prefix + "pooler.", *HEAD_PREFIXES))
              and not k.endswith("_ids")]  # pretraining heads, a pooler, old index buffers
    if unused:
        print(f"note: {path}/{file} holds {len(unused)} tensors the {config['model_type']} "
              f"encoder of its config.json does not use ({', '.join(unused[:3])}"
              f"{', ...' if len(unused) > 3 else ''})")


# ----------------------------------------------------------------------------- checkpoints

def hub_layout(model_type, head_name, prefix):
    """(transformers class, renames): the class that loads a checkpoint of this backbone and
    head, and (our name, its name) prefixes from our state-dict keys to that class's keys."""
    if head_name in ("cls", "pooler") and model_type in STANDARD_HEADS:
        architecture, dense, out = STANDARD_HEADS[model_type]
        return architecture, [("head.dense.", dense), ("head.out.", out), ("backbone.", prefix)]
    return CUSTOM_CLASS, [("head.", "head."), ("backbone.", prefix)]


def rename_keys(weights, renames, where):
    renamed = {}
    for key, tensor in weights.items():
        new = next((b + key[len(a):] for a, b in renames if key.startswith(a)), None)
        if new is None:
            raise ModelError(f"{where}: unexpected weight {key}")
        renamed[new] = tensor
    return renamed


def save_tokenizer(folder, tokenizer, max_len):
    """The tokenizer files; model_max_length makes pipeline(truncation=True) cut where we do."""
    if isinstance(tokenizer, BERTSPTokenizer):
        write_atomic(os.path.join(folder, SPIECE), lambda p: shutil.copyfile(tokenizer.path, p))
        return
    tokenizer.model_max_length = max_len
    staging = os.path.join(folder, ".tokenizer")
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer.save_pretrained(staging)
    for name in os.listdir(staging):
        source = os.path.join(staging, name)
        write_atomic(os.path.join(folder, name), lambda p: shutil.copyfile(source, p))
    shutil.rmtree(staging)


def save_checkpoint(folder, model, tokenizer, info):
    """A Hugging Face model folder: tokenizer, config.json, model.safetensors, for custom heads
    their code, and classifier.json (info + head) written last."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    save_tokenizer(folder, tokenizer, info["args"]["max_len"])
    backbone_config = model.backbone.config
    prefix = model.backbone.base_model_prefix + "."
    architecture, renames = hub_layout(backbone_config.model_type, model.head_name, prefix)
    config = backbone_config.__class__.from_dict(backbone_config.to_dict())  # a copy
    names = info["label_names"]
    config.architectures = [architecture]
    config.id2label, config.label2id = dict(enumerate(names)), {n: i for i, n in enumerate(names)}
    config.classifier_dropout = model.head.dropout.p
    if info["args"].get("problem") == "multi_label":  # pipelines then apply a sigmoid
        config.problem_type = "multi_label_classification"
    custom = architecture == CUSTOM_CLASS
    if custom:
        config.auto_map = {"AutoModelForSequenceClassification":
                           f"modeling_classifier.{CUSTOM_CLASS}"}
        config.classifier_head = model.head_name
        config.classifier_activation = getattr(model.head, "activation", "tanh")
    write_atomic(os.path.join(folder, "config.json"),
                 lambda p: config.to_json_file(p, use_diff=False))
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}  # XLA/GPU
    weights = rename_keys(weights, renames, folder)
    write_atomic(os.path.join(folder, "model.safetensors"),
                 lambda p: save_file(weights, p, metadata={"format": "pt"}))
    here = os.path.dirname(os.path.abspath(__file__))
    for name in SHIPPED_CODE:
        if custom:
            write_atomic(os.path.join(folder, name),
                         lambda p: shutil.copyfile(os.path.join(here, name), p))
        elif os.path.exists(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))  # left by an earlier run with another head
    info = {**info, "head_name": model.head_name, "base_model_prefix": prefix,
            "pad_token_id": tokenizer.pad_token_id,
            "tokenizer": "kobert-sentencepiece" if isinstance(tokenizer, BERTSPTokenizer)
            else "transformers"}
    write_atomic(os.path.join(folder, "classifier.json"), lambda p: Path(p).write_text(
        json.dumps(info, ensure_ascii=False, indent=1), encoding="utf-8"))


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def under(weights, prefix):
    """The tensors whose names start with prefix, the prefix taken off."""
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def load_checkpoint(folder, device="cpu", plain=False):
    """(model in eval mode, tokenizer, info) from a folder written by save_checkpoint.

    With plain=True (predict.py) a BERT, RoBERTa or ELECTRA encoder runs as PlainEncoder and the
    tokenizer through the tokenizers library, so transformers is never imported."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    info = read_info(folder)
    config = check_checkpoint(folder, info)
    try:
        _, renames = hub_layout(config["model_type"], info["head_name"], info["base_model_prefix"])
        weights = load_file(os.path.join(folder, "model.safetensors"), device=str(device))
        weights = rename_keys(weights, [(b, a) for a, b in renames], folder)
        kobert = info["tokenizer"] == "kobert-sentencepiece"
        plain = plain and PlainEncoder.supports(config) and (
            kobert or os.path.isfile(os.path.join(folder, "tokenizer.json")))
        if plain:
            backbone = PlainEncoder(config, under(weights, "backbone."))
        else:
            from transformers import AutoConfig, AutoModel

            backbone = AutoModel.from_config(AutoConfig.from_pretrained(folder))
        model = BERTClassifier(backbone, len(info["labels"]), info["head_name"],
                               info["args"].get("dr_rate", 0.1))
        if plain:
            model.head.load_state_dict(under(weights, "head."))
        else:
            model.load_state_dict(weights)
        tokenizer = load_tokenizer(folder, kobert, plain, config["vocab_size"])
    except ModelError:
        raise
    except (OSError, ValueError, KeyError, TypeError, SafetensorError, RuntimeError) as e:
        raise ModelError(f"{folder}: cannot load checkpoint ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), tokenizer, info


def check_checkpoint(folder, info):
    """config.json of one of our checkpoints, checked with classifier.json against the header of
    model.safetensors: exactly the tensors the config's encoder and the head imply, before any
    is loaded. Returns the config."""
    where = f"{folder}/config.json"
    config = read_config(where, f"{folder}: cannot load checkpoint")
    file, header = weights_header(folder, f"{folder}: cannot load checkpoint")
    _, renames = hub_layout(config["model_type"], info["head_name"], info["base_model_prefix"])
    out = rename_keys({"head.out.weight": None}, renames, folder)
    out_rows = header.get(next(iter(out)), ((None,),))[0][0]  # None: no such tensor
    if out_rows is not None and out_rows != len(info["labels"]):
        raise ModelError(f"{folder}/classifier.json: {len(info['labels'])} labels, but the head in "
                         f"{file} has {out_rows} outputs")
    if config["model_type"] in STANDARD_HEADS:
        if info["base_model_prefix"] != config["model_type"].split("-")[-1] + ".":
            raise ModelError(f"{folder}/classifier.json: base_model_prefix "
                             f"{info['base_model_prefix']!r} does not fit a {config['model_type']}")
        with torch.device("meta"):  # shapes only: nothing is allocated
            head = HEADS[info["head_name"]](config["hidden_size"], len(info["labels"]), 0.0)
        head_shapes = rename_keys({"head." + k: tuple(v.shape)
                                   for k, v in head.state_dict().items()}, renames, folder)
        check_weights(where, file, config, header, info["base_model_prefix"], exact=True,
                      extra=head_shapes)
        limit = config["max_position_embeddings"] - (
            config.get("pad_token_id", 0) + 1 if "roberta" in config["model_type"] else 0)
        if info["args"]["max_len"] > limit:
            raise ModelError(f"{folder}/classifier.json: args.max_len {info['args']['max_len']} "
                             f"is more than the {limit} positions of the model")
    return config


def read_info(folder):
    """classifier.json of a checkpoint folder, checked: labels, head, arguments."""
    if not os.path.isdir(folder):
        raise ModelError(f"{folder}: no such checkpoint folder (train one with _3_main.py)")
    for name in ("classifier.json", "config.json", "model.safetensors"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise ModelError(f"{folder}: missing {name}; not a complete checkpoint folder")
    try:
        info = read_json(os.path.join(folder, "classifier.json"))
    except (OSError, ValueError, RecursionError) as e:
        raise ModelError(f"{folder}: cannot load checkpoint (classifier.json: "
                         f"{str(e).splitlines()[0][:120]})") from None
    if isinstance(info, dict) and "base_model_prefix" not in info:
        raise ModelError(f"{folder}: written by an older version of this repository (before "
                         f"checkpoints became Hugging Face folders); train it again")
    check_info(folder, info)
    return info


INFO_TYPES = {"labels": list, "label_names": list, "head_name": str, "base_model_prefix": str,
              "tokenizer": str, "pad_token_id": int, "args": dict}


def check_info(folder, info):
    """classifier.json as save_checkpoint writes it, or one line saying what is wrong."""
    where = f"{folder}/classifier.json"
    if not isinstance(info, dict):
        raise ModelError(f"{where}: expected a JSON object")
    for key, kind in INFO_TYPES.items():
        if not isinstance(info.get(key), kind):
            raise ModelError(f"{where}: {key!r} must be a {kind.__name__}, "
                             f"got {json.dumps(info.get(key))[:40]}")
    labels, names = info["labels"], info["label_names"]
    if not all(isinstance(x, str) for x in labels + names):
        raise ModelError(f"{where}: 'labels' and 'label_names' must be lists of strings")
    if len(names) != len(labels) or len(set(names)) != len(names) or not labels:
        raise ModelError(f"{where}: {len(labels)} distinct label names needed for "
                         f"{len(labels)} labels, got {len(names)}")
    args = info["args"]
    choices = {"head_name": (info["head_name"], HEADS), "tokenizer": (info["tokenizer"], (
        "transformers", "kobert-sentencepiece")), "args.truncation": (args.get(
            "truncation", "head"), TRUNCATIONS), "args.problem": (args.get(
                "problem", "single_label"), ("single_label", "multi_label"))}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ModelError(f"{where}: {key} {json.dumps(value)[:40]} is not one of "
                             f"{', '.join(allowed)}")
    if args.get("problem") == "multi_label" and not (
            isinstance(args.get("label_sep"), str) and args["label_sep"]):
        raise ModelError(f"{where}: args.label_sep must be a non-empty string")
    if not isinstance(args.get("model", ""), str) or type(args.get("dr_rate", 0.1)) not in (
            int, float) or not 0 <= args.get("dr_rate", 0.1) < 1:
        raise ModelError(f"{where}: args.model must be a string and args.dr_rate in [0, 1)")
    for key, least, default in (("max_len", 3, None), ("test_batch_size", 1, 64),
                                ("pad_token_id", 0, 0)):
        value = (info if key == "pad_token_id" else args).get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ModelError(f"{where}: {'' if key == 'pad_token_id' else 'args.'}{key} must be "
                             f"an integer of at least {least}")
    threshold = info.get("threshold", 0.5)
    if isinstance(threshold, bool) or not isinstance(threshold, float | int) \
            or not 0 < threshold < 1:
        raise ModelError(f"{where}: 'threshold' must be a number between 0 and 1")


def load_tokenizer(folder, kobert, plain, vocab_size):
    """The checkpoint's tokenizer, tried on a text (the tokenizers library raises, and can panic,
    only when a broken regex first runs), with every token id inside the model's vocabulary."""
    name = SPIECE if kobert else "tokenizer.json"
    try:
        if kobert:
            tokenizer = BERTSPTokenizer(os.path.join(folder, SPIECE))
            top = len(tokenizer) - 1
        else:
            if plain:
                from tokenizers import Tokenizer

                tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
            else:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(folder)
            top = max(tokenizer.get_vocab().values(), default=0)
            tokenizer.encode("이 영화 정말 재밌다 The movie 123!")
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # the library's errors, and its panics (pyo3 PanicException)
        raise ModelError(f"{folder}/{name}: cannot load the tokenizer "
                         f"({(str(e).splitlines() or [type(e).__name__])[0][:200]})") from None
    if top >= vocab_size:
        raise ModelError(f"{folder}/{name}: token ids go up to {top}, the model's vocabulary has "
                         f"{vocab_size}")
    return tokenizer


# ----------------------------------------------------------------------------- prediction

def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


PLAIN_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": gelu_tanh,
                     "gelu_pytorch_tanh": gelu_tanh}


class PlainEncoder(nn.Module):
    """The BERT / RoBERTa / ELECTRA encoder as a few torch calls on the checkpoint's tensors.
    predict.py runs it because importing transformers' modeling code costs 3.6 s on a 2-core CPU,
    more than a whole answer should take; tests/test_model.py checks it against transformers."""

    def __init__(self, config, weights):
        super().__init__()
        self.config, self.w = SimpleNamespace(**config), weights
        self.act = PLAIN_ACTIVATIONS[self.config.hidden_act]
        # every dense layer by name, as a callable that quantize_int8 may swap for Int8Linear
        self.linears = {name[:-len(".weight")]: functools.partial(
            F.linear, weight=w, bias=weights[name[:-len("weight")] + "bias"])
            for name, w in weights.items() if w.dim() == 2 and "embeddings." not in name}

    @staticmethod
    def supports(config):
        return (config.get("model_type") in STANDARD_HEADS
                and config.get("position_embedding_type", "absolute") == "absolute"
                and config.get("hidden_act") in PLAIN_ACTIVATIONS)

    def linear(self, x, name):
        return self.linears[name](x)

    def layer_norm(self, x, name):
        return F.layer_norm(x, x.shape[-1:], self.w[name + ".weight"], self.w[name + ".bias"],
                            self.config.layer_norm_eps)

    def embed(self, input_ids):
        c, w = self.config, self.w
        if c.model_type in ("roberta", "xlm-roberta"):  # positions count from pad_token_id + 1
            real = input_ids.ne(c.pad_token_id).long()
            positions = real.cumsum(1) * real + c.pad_token_id
        else:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = (w["embeddings.word_embeddings.weight"][input_ids]
             + w["embeddings.position_embeddings.weight"][positions]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = self.layer_norm(x, "embeddings.LayerNorm")
        return self.linear(x, "embeddings_project") if "embeddings_project.weight" in w else x

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids)
        batch, length, heads = *input_ids.shape, self.config.num_attention_heads
        keep = attention_mask.bool()[:, None, None, :]  # every query looks at real tokens only
        for i in range(self.config.num_hidden_layers):
            layer = f"encoder.layer.{i}."
            q, k, v = (self.linear(x, layer + "attention.self." + name)
                       .view(batch, length, heads, -1).transpose(1, 2)
                       for name in ("query", "key", "value"))
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
            a = self.linear(a.transpose(1, 2).reshape(batch, length, -1),
                            layer + "attention.output.dense")
            x = self.layer_norm(x + a, layer + "attention.output.LayerNorm")
            h = self.linear(self.act(self.linear(x, layer + "intermediate.dense")),
                            layer + "output.dense")
            x = self.layer_norm(x + h, layer + "output.LayerNorm")
        return SimpleNamespace(last_hidden_state=x)


WEIGHT_LEVELS = 63  # an int8 weight's largest magnitude (Int8Linear says why not 127)


class Int8Linear(nn.Module):
    """A dense layer in int8 (dynamic quantization): the weight rounded once to 7 bits with one
    scale per output row, each input row (a token) rounded to int8 with its own scale as it
    comes, an int8 x int8 -> int32 matrix product (4x the float32 rate on CPUs with VNNI), then
    back to float. Per-row input scales keep the promise of the heads: a text's numbers never
    depend on its batch-mates (one scale for the whole batch would let a loud batch-mate coarsen
    every other text's rounding; torch.ao's quantize_dynamic does that, and is deprecated).
    What can still move is float32's own noise (1e-6: attention over a padded batch sums in
    another order) pushing a value across a rounding boundary, one step of an int8 scale, which
    later layers carry on: 92% of texts get the very same logits alone and in a batch, the rest
    move by less than INT8_TOLERANCE (with one scale per tensor every text moves)."""

    def __init__(self, weight, bias):
        super().__init__()
        weight = weight.detach().float()
        # 7-bit weights (-63..63), as onnxruntime's reduce_range: CPUs without VNNI multiply
        # uint8 x int8 pairs into a 16-bit sum that saturates past 32,767, and 2 x 255 x 63 stays
        # below it, so the exported graph computes the same numbers on every CPU
        self.register_buffer("scale", weight.abs().amax(1).clamp_min(1e-8) / WEIGHT_LEVELS)
        # stored (in, out), as torch._int_mm wants its second operand
        self.register_buffer("weight", (weight / self.scale[:, None]).round().to(torch.int8)
                             .t().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x):
        rows = x.reshape(-1, x.shape[-1]).float()
        scale = rows.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127
        y = torch._int_mm((rows / scale).round().to(torch.int8), self.weight).float()
        y = y * scale * self.scale
        return (y if self.bias is None else y + self.bias).view(*x.shape[:-1], -1)


def quantize_int8(model):
    """The model with every dense layer of its encoder and head in int8 (Int8Linear); in place."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child.weight, child.bias))
    if isinstance(model.backbone, PlainEncoder):
        w = model.backbone.w
        model.backbone.linears = {name: Int8Linear(w[name + ".weight"], w[name + ".bias"])
                                  for name in model.backbone.linears}
    return model


# ----------------------------------------------------------------------------- int8 and ONNX
# export.py checks a checkpoint in int8 on labelled texts and may write it as ONNX; it records
# what it did in export.json beside the weights. predict.py's --quantize int8 and --onnx read that
# record: int8 only for a model it did not cost more than INT8_MAX_LOSS points, ONNX files only as
# export.py wrote them for these very weights (an ONNX file is a program for onnxruntime to run).

EXPORT_RECORD = "export.json"
ONNX_FILES = {"float32": "model.onnx", "int8": "model-int8.onnx"}
INT8_MAX_LOSS = 0.5  # points of accuracy (macro-F1 when multi-label) that int8 may cost
# how far a text's int8 logits may move with its batch-mates or under onnxruntime (Int8Linear
# says why; measured on MiniLM, 5,000 SST-2 texts: 0.05 and 0.12 at most, most texts not at all)
INT8_TOLERANCE = 0.25
STANDARD_DOMAINS = ("", "ai.onnx")  # ONNX's own operators; anything else is a custom operator


def read_export_record(folder, flag):
    """export.json of folder, written for the model.safetensors that is there now."""
    read_info(folder)  # a folder that is not a checkpoint says so first
    path = os.path.join(folder, EXPORT_RECORD)
    if not os.path.isfile(path):
        onnx = " --onnx" if flag == "--onnx" else ""
        raise ModelError(f"{flag}: {folder} has not been exported; run: python export.py "
                         f"--model_dir {folder} --file LABELLED_FILE{onnx}")
    try:
        record = read_json(path)
    except (ValueError, RecursionError) as e:
        raise ModelError(f"{path}: not JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(record, dict) or not isinstance(record.get("int8"), dict):
        raise ModelError(f"{path}: not a record written by export.py")
    if record.get("weights_sha256") != sha256_of(os.path.join(folder, "model.safetensors")):
        raise ModelError(f"{flag}: {path} was written for other weights than "
                         f"{folder}/model.safetensors; run export.py again")
    return record


def check_int8(folder):
    """One line unless export.py found int8 within INT8_MAX_LOSS points of float32 here."""
    path = os.path.join(folder, EXPORT_RECORD)
    check = read_export_record(folder, "--quantize int8")["int8"]
    if not all(isinstance(check.get(k), (int, float)) for k in ("float32", "int8")):
        raise ModelError(f"{path}: int8 holds no float32 and int8 scores")
    loss = 100 * (check["float32"] - check["int8"])
    if not loss <= INT8_MAX_LOSS:
        raise ModelError(f"--quantize int8: int8 costs this model {loss:.2f} points of "
                         f"{check.get('metric')} on {check.get('file')} (more than "
                         f"{INT8_MAX_LOSS}); it stays float32")


def subgraphs(node):
    for attribute in node.attribute:
        yield from ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs)


def tensors_of(graph):
    """Every tensor an ONNX graph holds: initializers and attribute values, subgraphs included."""
    yield from graph.initializer
    yield from (sparse.values for sparse in graph.sparse_initializer)
    for node in graph.node:
        for attribute in node.attribute:
            yield from ([attribute.t] if attribute.HasField("t") else []) + list(attribute.tensors)
        for subgraph in subgraphs(node):
            yield from tensors_of(subgraph)


def domains_of(graph):
    for node in graph.node:
        yield node.domain
        for subgraph in subgraphs(node):
            yield from domains_of(subgraph)


def check_onnx_file(path, num_labels):
    """An ONNX file as data: standard operators only, any external data in its own folder, the
    inputs and output predict.py gives and reads. Returns nothing; one line when it fails."""
    import onnx

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and others: the file is not an ONNX model
        raise ModelError(f"{path}: not an ONNX model ({str(e).splitlines()[0]})") from None
    domains = {o.domain for o in model.opset_import} | set(domains_of(model.graph))
    custom = sorted(domains - set(STANDARD_DOMAINS)) or (["local functions"] if model.functions
                                                          else [])
    if custom:
        raise ModelError(f"{path}: uses operators outside ONNX's own ({', '.join(custom)})")
    folder = os.path.realpath(os.path.dirname(path))
    for tensor in tensors_of(model.graph):
        for entry in tensor.external_data:
            if entry.key == "location" and os.path.dirname(os.path.realpath(
                    os.path.join(folder, entry.value))) != folder:
                raise ModelError(f"{path}: tensor {tensor.name} has its data outside the folder "
                                 f"({entry.value})")
    inputs = [(i.name, i.type.tensor_type.elem_type) for i in model.graph.input]
    outputs = [(o.name, [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim])
               for o in model.graph.output]
    if (inputs != [("input_ids", onnx.TensorProto.INT64),
                   ("attention_mask", onnx.TensorProto.INT64)]
            or len(outputs) != 1 or outputs[0][0] != "logits" or len(outputs[0][1]) != 2
            or outputs[0][1][1] != num_labels):
        raise ModelError(f"{path}: takes {inputs} and gives {outputs}, not int64 input_ids and "
                         f"attention_mask to logits for {num_labels} labels")


class OnnxClassifier:
    """An exported classifier run by onnxruntime, called as BERTClassifier is."""

    def __init__(self, path, threads=0):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = onnxruntime.InferenceSession(path, options,
                                                    providers=["CPUExecutionProvider"])

    def __call__(self, input_ids, attention_mask):
        logits, = self.session.run(["logits"], {"input_ids": input_ids.numpy(),
                                                "attention_mask": attention_mask.numpy()})
        return torch.from_numpy(logits)


def load_onnx(folder, precision):
    """(OnnxClassifier, tokenizer, info) for an ONNX file export.py wrote for these weights."""
    if not all(importlib.util.find_spec(name) for name in ("onnx", "onnxruntime")):
        raise ModelError("--onnx needs onnxruntime and onnx: pip install onnxruntime onnx")
    info = read_info(folder)
    config = check_checkpoint(folder, info)
    name = ONNX_FILES[precision]
    path, written = os.path.join(folder, name), read_export_record(folder, "--onnx").get("onnx")
    if not isinstance(written, dict) or not isinstance(written.get(name), dict):
        raise ModelError(f"--onnx: export.py wrote no {name} for {folder}; run: python export.py "
                         f"--model_dir {folder} --file LABELLED_FILE --onnx")
    if not os.path.isfile(path) or sha256_of(path) != written[name].get("sha256"):
        raise ModelError(f"--onnx: {path} is not the file export.py wrote for these weights "
                         f"(missing, or its hash differs); run export.py again")
    check_onnx_file(path, len(info["labels"]))
    kobert = info["tokenizer"] == "kobert-sentencepiece"
    plain = kobert or os.path.isfile(os.path.join(folder, "tokenizer.json"))
    tokenizer = load_tokenizer(folder, kobert, plain, config["vocab_size"])
    return OnnxClassifier(path), tokenizer, info


def choose_device(name):
    """torch.device for --device (auto: cuda when torch sees a GPU); one line when unavailable."""
    if name == "xla":
        try:
            import torch_xla.core.xla_model as xm
        except ImportError:
            raise ModelError("--device xla needs torch-xla: pip install torch==2.9.0 "
                             "torch-xla==2.9.0 (in its own environment; see README)") from None
        return xm.xla_device()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda: no CUDA GPU is visible to torch")
    if name == "cuda":
        # float32 matmuls in TF32 (10-bit mantissa, float32's range) on GPUs that have it (A100
        # and later): several times faster, and what autocast leaves in float32 is rarely
        # sensitive to it; older GPUs ignore the setting
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    return torch.device(name)


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtypes


def auto_precision(device):
    """(--precision, why) for --precision auto on device: bf16 where the GPU has bfloat16 units
    (compute capability 8.0 and up: A100, H100), fp16 with loss scaling on 7.x (V100, Colab's
    T4: fp16 tensor cores, no bfloat16 units), float32 elsewhere."""
    if device.type != "cuda":
        return "fp32", f"{device.type} (autocast is for GPUs here)"
    # torch.cuda.is_bf16_supported() also says True on 7.x, where bf16 is emulated: slower than
    # float32, and without SDPA's memory-efficient kernel (attention then stores length^2)
    major, minor = torch.cuda.get_device_capability(device)
    gpu = f"{torch.cuda.get_device_name(device)}, compute capability {major}.{minor}"
    if major >= 8:
        return "bf16", f"{gpu}: bfloat16 units"
    if major == 7:
        return "fp16", f"{gpu}: fp16 tensor cores, no bfloat16 units; loss scaling on"
    return "fp32", f"{gpu}: no tensor cores"


def predict_logits(model, loader, device, autocast_dtype=None):
    """Logits for every item of loader's dataset, in dataset order, whatever the batch order."""
    logits = None
    # inference_mode is a little faster than no_grad, but XLA tensors do not support it
    autocast = torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                              enabled=autocast_dtype is not None)
    with torch.inference_mode(device.type != "xla"), torch.no_grad(), autocast:
        for batch in loader:
            out = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            out = out.float().cpu().numpy()
            if logits is None:
                logits = np.zeros((len(loader.dataset), out.shape[1]), dtype="float32")
            logits[batch["index"].numpy()] = out
    return logits


# ----------------------------------------------------------------------------- metrics

def per_class_report(truth, predicted, names):
    """{name: precision, recall, f1, support} from boolean (texts, classes) arrays of true and
    predicted labels; a class nobody has and nobody predicts scores 0 but has support 0."""
    tp, n_true, n_pred = ((truth & predicted).sum(0), truth.sum(0), predicted.sum(0))
    report = {}
    for name, t, s, p in zip(names, tp.tolist(), n_true.tolist(), n_pred.tolist()):
        report[name] = {"precision": t / p if p else 0.0, "recall": t / s if s else 0.0,
                        "f1": 2 * t / (s + p) if s + p else 0.0, "support": s}
    return report


def score_logits(logits, labels, names, threshold=0.5):
    """Loss, accuracy, macro-F1, a per-class report and probabilities of logits against label
    ids, or against multi-hot rows (several labels per text: sigmoid, a label is predicted above
    threshold, accuracy is exact match, micro-F1 too). Macro-F1 averages the classes that occur
    in the labels or the predictions."""
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels)
    multi_label = labels.ndim == 2
    if multi_label:
        probs, truth = logits.sigmoid(), labels.bool()
        predicted = probs > threshold
        loss = F.binary_cross_entropy_with_logits(logits, labels.float())
    else:
        probs, eye = logits.softmax(-1), torch.eye(len(names), dtype=torch.bool)
        truth, predicted = eye[labels], eye[logits.argmax(-1)]
        loss = F.cross_entropy(logits, labels)
    truth, predicted = truth.numpy(), predicted.numpy()
    report = per_class_report(truth, predicted, names)
    f1s = [r["f1"] for r, p in zip(report.values(), predicted.sum(0)) if r["support"] or p]
    result = {"loss": loss.item(), "accuracy": float((truth == predicted).all(-1).mean()),
              "macro_f1": float(np.mean(f1s))}
    if multi_label:
        tp = (truth & predicted).sum()
        result["micro_f1"] = float(2 * tp / max(1, truth.sum() + predicted.sum()))
        result["threshold"] = threshold
    return {**result, "per_class": report, "probs": probs.numpy()}


KOREAN_FONT_FILES = re.compile(r"(?i)nanum|cjk|korean|malgun|gulim|batang|dotum|unfonts|baekmuk|"
                               r"applesdgothic|applegothic|gothic")


@functools.lru_cache(maxsize=None)
def korean_fonts():
    """Family names of the installed fonts that draw Hangul, added to matplotlib. They are looked
    for on disk: matplotlib's font cache misses a font installed after the cache was built (as
    after `apt install fonts-nanum` on Colab), and then drew Hangul as empty boxes."""
    from matplotlib import font_manager, ft2font

    paths = font_manager.findSystemFonts()
    families = []
    for path in [p for p in paths if KOREAN_FONT_FILES.search(os.path.basename(p))] or paths:
        try:
            font = ft2font.FT2Font(path)
            if ord("한") in font.get_charmap():
                font_manager.fontManager.addfont(path)
                families.append(font.family_name)
        except (OSError, RuntimeError, ValueError):
            continue  # not a font matplotlib can read
    return list(dict.fromkeys(families))


@functools.lru_cache(maxsize=None)
def note_no_korean_font():
    print("note: no font with Hangul is installed, so Korean names are drawn as boxes; install "
          "one (apt install fonts-nanum, or any Noto Sans CJK font) and run again",
          file=sys.stderr)


def save_figure(path, draw, size):
    """Draw on a fresh matplotlib figure and write it as PNG atomically (no display needed)."""
    import logging
    import warnings

    from matplotlib import rcParams
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    # matplotlib falls back glyph by glyph through this list: Latin from DejaVu, Hangul after
    rcParams["font.family"] = ["DejaVu Sans", *korean_fonts()]
    fig = Figure(figsize=size, layout="constrained")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph")  # said once below, not per glyph
        draw(fig)
        write_atomic(path, lambda p: fig.savefig(p, dpi=100, format="png"))
    if not korean_fonts() and any(re.search("[\u3131-\u318e\uac00-\ud7a3]", t.get_text())
                                  for t in fig.findobj(Text)):
        note_no_korean_font()
