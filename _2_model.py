"""The model: `BERTClassifier`, a transformers encoder plus one head chosen by name (the heads are
in heads.py); the backbones it starts from (presets, `tiny` trained from scratch, a hub id or a
local folder); and the pretraining models that continue a backbone's pretraining on your texts
(masked language modelling, ELECTRA's replaced-token detection).

Saving and loading checkpoint folders is checkpoint.py; the checks that a folder is data,
folders.py; running a trained model fast (int8, ONNX), inference.py.
"""
import collections
import itertools
import os

import torch
from torch import nn

from _1_data import BERTSPTokenizer
from common import ModelError, read_json, write_atomic
from folders import check_backbone_folder, weights_header
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


# tiny's size: 4 layers of 256 (BERT-mini's shape) train an NSMC epoch in minutes on 2 cores;
# 16k pieces learned on Korean reviews cut one into about 18 tokens, where MiniLM's English
# vocabulary spends 46 on jamo
TINY = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
        "intermediate_size": 1024, "vocab_size": 16000}
SPIECE = "spiece.model"
KOBERT_TOKENIZERS = ("XLNetTokenizer", "KoBERTTokenizer", "KoBertTokenizer")  # tokenizer_class
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class BERTClassifier(nn.Module):
    def __init__(self, backbone, num_classes, head_name="cls", dr_rate=0.1):
        super().__init__()
        if head_name not in HEADS:
            raise ModelError(f"--head_name {head_name!r} is not one of {', '.join(HEADS)}")
        config = backbone.config
        # The head uses the activation of the family's own classifier: BERT's pooler is tanh,
        # ELECTRA's classification head GELU
        activation = "gelu" if config.model_type == "electra" else "tanh"  # as each family's own
        self.head = HEADS[head_name](config.hidden_size, num_classes, dr_rate, activation)
        if getattr(backbone, "pooler", None) is not None:
            backbone.pooler = None  # the heads have their own dense layer: no unused weights
        self.backbone, self.head_name = backbone, head_name

    # The attention mask goes to the encoder (padding is never attended to) and to the head
    # (padding is never pooled): a text's logits do not depend on its batch-mates' lengths
    def forward(self, input_ids, attention_mask):
        hidden_states = self.backbone(input_ids=input_ids,
                                      attention_mask=attention_mask).last_hidden_state
        return self.head(hidden_states, attention_mask)

    def freeze_backbone(self):
        # requires_grad off: no gradients are computed for the backbone, and AdamW's groups skip it
        for p in self.backbone.parameters():
            p.requires_grad_(False)


def new_classifier(backbone, num_classes, head_name, dr_rate):
    """A classifier to fine-tune; the pooler head starts from the backbone's pretrained pooler."""
    pooler = getattr(backbone, "pooler", None)
    if head_name == "pooler" and getattr(pooler, "dense", None) is None:
        raise ModelError(f"the {backbone.config.model_type} backbone has no pooler; "
                         f"use --head_name cls, weight_avg or lstm")
    # Taken before BERTClassifier drops the backbone's pooler: the pooler head is that very layer
    pooler_weights = pooler.dense.state_dict() if head_name == "pooler" else None
    model = BERTClassifier(backbone, num_classes, head_name, dr_rate)
    if pooler_weights:
        model.head.dense.load_state_dict(pooler_weights)
    return model


# ---------------------------------------------------------------------------------------- backbones

def train_wordpiece(texts, vocab_size, cache_dir=None):
    """A cased WordPiece tokenizer learned from texts (no accent stripping: NFD would split Hangul).

    tokenizers' trainer breaks ties in hash-map order (huggingface/tokenizers#1794), so two
    trainings on the same texts can differ; the result is cached under a key of the texts, which
    makes runs with the same data and seed repeatable."""
    import hashlib

    from tokenizers import (Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                            trainers)
    from transformers import PreTrainedTokenizerFast

    # The cache key covers every text and the vocabulary size, so other data never reuses it
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
        # Cased and without accent stripping: stripping decomposes Hangul syllables into jamo
        tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size,
                                                                 special_tokens=SPECIALS))
        # [CLS] text [SEP], as every BERT-family tokenizer frames a text
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

    # The embedding table as large as the learned vocabulary (often a little under 16,000)
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
    # A path that does not exist is a typo, not a hub id: hub ids are "name" or "owner/name"
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        raise ModelError(f"--model {name}: no such folder")
    return name


def from_hub_or_cache(load, name):
    """Use the local cache first, then the hub; one line naming the model whatever goes wrong."""
    try:
        try:
            # The local cache first: offline (Colab without network, CI) a cached model still loads
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
    # transformers prints a progress bar and a warning per unused weight while loading
    logging.set_verbosity_error()  # warnings users cannot act on; what matters is said below
    if name == "tiny":
        tokenizer = train_wordpiece(train_texts, TINY["vocab_size"], cache_dir)
        return tiny_backbone(len(tokenizer), objective), tokenizer, []
    path = resolve_model(name)
    # A folder from anyone is checked as data first (folders.py): a config that claims billions
    # of parameters must not make transformers allocate them
    check_backbone_folder(path)  # before transformers allocates what config.json says
    auto = {None: AutoModel, "mlm": AutoModelForMaskedLM, "rtd": AutoModelForPreTraining}
    backbone, loading = from_hub_or_cache(
        lambda p, **kw: auto[objective].from_pretrained(p, output_loading_info=True, **kw), path)
    in_fresh_memory(backbone)
    # KoBERT's files read as an XLNet tokenizer to AutoTokenizer, which gives wrong ids: its
    # SentencePiece transform is rebuilt here instead (_1_data.BERTSPTokenizer)
    spiece = kobert_spiece(path) if backbone.config.model_type == "bert" else None
    if name == "kobert" and spiece is None:
        raise ModelError(f"--model kobert: {path} has no {SPIECE} with a KoBERT tokenizer config")
    if spiece:
        tokenizer = BERTSPTokenizer(spiece)
    else:
        tokenizer = from_hub_or_cache(AutoTokenizer.from_pretrained, path)
    # A tokenizer far smaller than the embedding table: its vocabulary files were not found
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
    # A position beyond the table is an index error inside the model: the longest --max_len it takes
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

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelError(f"--generator {path}: not a model folder (no config.json)")
    check_backbone_folder(path)
    kind = read_json(os.path.join(path, "config.json")).get("model_type")
    # A discriminator (or a BERT) has no generator head: one would start random without a word
    _, header = weights_header(path, f"--generator {path}: cannot load")
    if kind != "electra" or not any(k.startswith("generator_lm_head.") for k in header):
        raise ModelError(f"--generator {path}: not an ELECTRA generator (ElectraForMaskedLM); "
                         f"it is a {kind} {'discriminator' if kind == 'electra' else 'model'}")
    try:
        generator = ElectraForMaskedLM.from_pretrained(path)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"--generator {path}: cannot load ({str(e).splitlines()[0]})") from None
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


def set_dropout(model, rate):
    """Every dropout of model (attention weights included) at rate (None: left as they are);
    config.json keeps its own rates, so a folder saved from model fine-tunes with those."""
    for module in model.modules() if rate is not None else ():
        if isinstance(module, nn.Dropout):
            module.p = rate
