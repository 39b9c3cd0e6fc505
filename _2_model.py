"""`BERTClassifier`: a transformers encoder plus one head chosen by name.

Every head takes (last_hidden_state, attention_mask) and looks only at real tokens, so a text's
logits do not depend on how long its batch-mates are. Checkpoints are self-describing folders:
safetensors weights, JSON configuration and the tokenizer files (loading them unpickles nothing),
plus a TorchScript copy that lets predict.py start without importing transformers.
"""
import copy
import hashlib
import io
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from _1_data import BERTSPTokenizer, encode_texts, pad_to_longest

PRESETS = {  # --model name -> Hugging Face hub id
    "kobert": "skt/kobert-base-v1",
    "kcbert": "beomi/kcbert-base",
    "klue-roberta": "klue/roberta-base",
    "bert-kor-base": "kykim/bert-kor-base",
    "roberta-base": "FacebookAI/roberta-base",
    "tiny": None,  # trained from scratch, tokenizer learned from the training texts
}
# A model trained from scratch wants a larger learning rate than fine-tuning; flags still win.
PRESET_DEFAULTS = {
    "tiny": {"lr": 3e-4, "warmup_rate": 0.06, "dr_rate": 0.1, "total_epochs": 3, "train_batch_size": 64},
}
TINY = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
        "intermediate_size": 1024, "vocab_size": 16000}
HEADS = ("cls", "pooler", "weight_avg", "lstm")
SPIECE = "spiece.model"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TRACED = "model.traced.pt"  # TorchScript copy in a checkpoint folder: predict.py starts without transformers


class ModelError(ValueError):
    """A model that cannot be built or loaded; the message is one line."""


# ----------------------------------------------------------------------------- heads

class FastDropout(nn.Dropout):
    """nn.Dropout whose mask comes from numpy's PCG64 on CPU. torch draws CPU random numbers one
    at a time: its dropout masks took a fifth of a MiniLM training step (bench/step_ablation.py).
    The seed is drawn from torch's generator, so torch.manual_seed and --resume still fix every mask."""

    def forward(self, x):
        if not self.training or not self.p or x.device.type != "cpu":
            return super().forward(x)
        seed = int(torch.randint(2**63 - 1, ()))
        keep = np.random.Generator(np.random.PCG64(seed)).random(x.shape, dtype=np.float32) >= self.p
        return x * torch.from_numpy(keep).to(x.dtype).mul_(1 / (1 - self.p))


def use_fast_dropout(model):
    """Swap every nn.Dropout for FastDropout (attention dropout inside SDPA only reads its .p)."""
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is nn.Dropout:
                setattr(module, name, FastDropout(child.p))


class ClsHead(nn.Module):
    """The [CLS] vector through dropout, dense, tanh, dropout, linear (the RoBERTa classifier)."""

    def __init__(self, hidden, num_classes, dr_rate):
        super().__init__()
        self.dense, self.out, self.dropout = nn.Linear(hidden, hidden), nn.Linear(hidden, num_classes), nn.Dropout(dr_rate)

    def forward(self, hidden_states, attention_mask):
        x = torch.tanh(self.dense(self.dropout(hidden_states[:, 0])))
        return self.out(self.dropout(x))


class PoolerHead(nn.Module):
    """The backbone's own pretrained pooler (dense + tanh on [CLS]), dropout, linear (KoBERT)."""

    def __init__(self, pooler, hidden, num_classes, dr_rate):
        super().__init__()
        self.pooler, self.out, self.dropout = pooler, nn.Linear(hidden, num_classes), nn.Dropout(dr_rate)

    def forward(self, hidden_states, attention_mask):
        return self.out(self.dropout(self.pooler(hidden_states)))


class WeightAvgHead(nn.Module):
    """A learned score per token, softmax over real tokens only, weighted average, linear."""

    def __init__(self, hidden, num_classes, dr_rate):
        super().__init__()
        self.score, self.out, self.dropout = nn.Linear(hidden, 1), nn.Linear(hidden, num_classes), nn.Dropout(dr_rate)

    def forward(self, hidden_states, attention_mask):
        scores = self.score(hidden_states).squeeze(-1).float()
        scores = scores.masked_fill(attention_mask == 0, float("-inf"))
        weights = scores.softmax(dim=-1).to(hidden_states.dtype)
        return self.out(self.dropout(torch.einsum("bt,bth->bh", weights, hidden_states)))


class LSTMHead(nn.Module):
    """A bidirectional LSTM over real tokens only (packed, zero initial state), final states, linear."""

    def __init__(self, hidden, num_classes, dr_rate):
        super().__init__()
        self.lstm = nn.LSTM(hidden, hidden // 2, batch_first=True, bidirectional=True)
        self.out, self.dropout = nn.Linear(2 * (hidden // 2), num_classes), nn.Dropout(dr_rate)

    def forward(self, hidden_states, attention_mask):
        lengths = attention_mask.sum(dim=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(hidden_states, lengths, batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)  # h_n: (2 directions, batch, hidden // 2)
        return self.out(self.dropout(torch.cat([h_n[0], h_n[1]], dim=-1)))


class BERTClassifier(nn.Module):
    def __init__(self, backbone, num_classes, head_name="cls", dr_rate=0.1):
        super().__init__()
        if head_name not in HEADS:
            raise ModelError(f"--head_name {head_name!r} is not one of {', '.join(HEADS)}")
        hidden = backbone.config.hidden_size
        pooler = getattr(backbone, "pooler", None)
        if head_name == "pooler":
            if pooler is None:
                raise ModelError(f"the {backbone.config.model_type} backbone has no pooler; "
                                 f"use --head_name cls, weight_avg or lstm")
            self.head = PoolerHead(pooler, hidden, num_classes, dr_rate)
        else:
            self.head = {"cls": ClsHead, "weight_avg": WeightAvgHead, "lstm": LSTMHead}[head_name](
                hidden, num_classes, dr_rate)
        if pooler is not None:
            backbone.pooler = None  # the head owns it, or nobody needs it: no unused weights
        self.backbone, self.head_name = backbone, head_name
        use_fast_dropout(self)

    def forward(self, input_ids, attention_mask):
        hidden_states = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden_states, attention_mask)

    def freeze_backbone(self):
        for p in self.backbone.parameters():
            p.requires_grad_(False)


# ----------------------------------------------------------------------------- backbones

def train_wordpiece(texts, vocab_size, cache_dir=None):
    """A cased WordPiece tokenizer learned from texts (no accent stripping: NFD would split Hangul).

    tokenizers' trainer breaks ties in hash-map order (huggingface/tokenizers#1794), so two trainings
    on the same texts can differ; the result is cached under a key of the texts, which makes runs
    with the same data and seed repeatable."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    key = hashlib.sha256(f"wordpiece|{vocab_size}|".encode())
    for text in texts:
        key.update(text.encode("utf-8", "surrogatepass") + b"\0")
    path = cache_dir and os.path.join(cache_dir, f"wordpiece-{key.hexdigest()[:32]}.json")
    if path and os.path.exists(path):
        tok = Tokenizer.from_file(path)
    else:
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS))
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
        if path:
            os.makedirs(cache_dir, exist_ok=True)
            write_atomic(path, tok.save)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def tiny_backbone(vocab_size):
    from transformers import BertConfig, BertModel

    config = BertConfig(**{**TINY, "vocab_size": vocab_size}, max_position_embeddings=512)
    return BertModel(config)


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
    """Use the local cache first, then the hub; one line when neither has the model."""
    try:
        return load(name, local_files_only=True)
    except OSError:
        pass
    try:
        return load(name)
    except OSError as e:
        if os.path.isdir(name):
            raise ModelError(f"--model {name}: cannot load this folder ({str(e).splitlines()[0]})") from None
        known = "" if "/" in name else f"not a preset ({', '.join(PRESETS)}), and "
        raise ModelError(f"--model {name}: {known}not in the local Hugging Face cache and the hub cannot be "
                         f"reached; use --model tiny or a local model folder") from None


def load_backbone(name, train_texts=(), cache_dir=None):
    """(backbone, tokenizer) for --model: a preset, a hub id or a local folder."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    if name == "tiny":
        tokenizer = train_wordpiece(train_texts, TINY["vocab_size"], cache_dir)
        return tiny_backbone(len(tokenizer)), tokenizer
    path = resolve_model(name)
    backbone = from_hub_or_cache(AutoModel.from_pretrained, path)
    if name == "kobert":
        from huggingface_hub import hf_hub_download

        tokenizer = BERTSPTokenizer(from_hub_or_cache(
            lambda repo, **kw: hf_hub_download(repo, SPIECE, **kw), path))
    else:
        tokenizer = from_hub_or_cache(AutoTokenizer.from_pretrained, path)
    return backbone, tokenizer


# ----------------------------------------------------------------------------- checkpoints

def write_atomic(path, write):
    """Call write(temporary path), fsync, then rename over path: a kill leaves old or new, never half."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; checkpoints are meant to be shared
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(folder, model, tokenizer, info, traced=False):
    """Weights, backbone config, tokenizer files, with traced=True a TorchScript copy for predict.py,
    and classifier.json (info + head) written last."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    if os.path.exists(os.path.join(folder, TRACED)):
        os.remove(os.path.join(folder, TRACED))  # it would answer with the old weights
    with tempfile.TemporaryDirectory(dir=folder, prefix=".tokenizer-") as tmp:
        if isinstance(tokenizer, BERTSPTokenizer):
            shutil.copyfile(tokenizer.path, os.path.join(tmp, SPIECE))
        else:
            tokenizer.save_pretrained(tmp)
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(folder, name))
    write_atomic(os.path.join(folder, "config.json"),
                 lambda p: model.backbone.config.to_json_file(p))
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}  # also from XLA/GPU
    write_atomic(os.path.join(folder, "model.safetensors"), lambda p: save_file(weights, p))
    if traced:
        save_traced(folder, model, tokenizer, info["args"]["max_len"])
    info = {**info, "head_name": model.head_name, "pad_token_id": tokenizer.pad_token_id,
            "tokenizer": "kobert-sentencepiece" if isinstance(tokenizer, BERTSPTokenizer) else "transformers"}
    write_atomic(os.path.join(folder, "classifier.json"),
                 lambda p: Path(p).write_text(json.dumps(info, ensure_ascii=False, indent=1), encoding="utf-8"))


def load_checkpoint(folder, device="cpu"):
    """(model in eval mode, tokenizer, info) from a folder written by save_checkpoint."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = os.path.join(folder, "classifier.json")
    if not os.path.isdir(folder):
        raise ModelError(f"{folder}: no such checkpoint folder (train one with _3_main.py)")
    for name in ("classifier.json", "config.json", "model.safetensors"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise ModelError(f"{folder}: missing {name}; not a complete checkpoint folder")
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        backbone = AutoModel.from_config(AutoConfig.from_pretrained(folder))
        model = BERTClassifier(backbone, len(info["labels"]), info["head_name"], info.get("args", {}).get("dr_rate", 0.1))
        load_model(model, os.path.join(folder, "model.safetensors"), device=str(device))
        if info["tokenizer"] == "kobert-sentencepiece":
            tokenizer = BERTSPTokenizer(os.path.join(folder, SPIECE))
        else:
            tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError, SafetensorError, RuntimeError) as e:
        raise ModelError(f"{folder}: cannot load checkpoint ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), tokenizer, info


# Texts that exercise what a trace could get wrong: padding, truncation, Hangul, emoji, unknown pieces.
TRACE_CHECK_TEXTS = ["이 영화 정말 재밌다", "최악", "Not bad at all, really!", "ㅋㅋㅋ 배우 연기 👍 " * 200, "漢字 ☃ \t x"]


def save_traced(folder, model, tokenizer, max_len):
    """model.traced.pt: the classifier traced with TorchScript, so that `python predict.py "문장"`
    answers without importing transformers (about 5 s of a cold start on a CPU). It is written only
    when the trace and the tokenizer read without transformers reproduce the model on inputs of
    other shapes; otherwise predict.py loads the checkpoint the usual way."""
    if next(model.parameters()).device.type not in ("cpu", "cuda"):
        return
    fast_tokenizer = load_fast_tokenizer(folder, isinstance(tokenizer, BERTSPTokenizer))
    ids = encode_texts(tokenizer, TRACE_CHECK_TEXTS, max_len)
    if [x.tolist() for x in encode_texts(fast_tokenizer, TRACE_CHECK_TEXTS, max_len)] != [x.tolist() for x in ids]:
        return
    cpu_model = copy.deepcopy(model).cpu().eval()
    batches = [pad_to_longest([(x, 0, i) for i, x in enumerate(part)], tokenizer.pad_token_id)
               for part in (ids, ids[:1], ids[1:3])]  # trace with padding, so the mask path is kept
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit.trace is deprecated, and warns about shape checks it freezes
        traced = torch.jit.trace(cpu_model, (batches[0]["input_ids"], batches[0]["attention_mask"]), check_trace=False)
        for b in batches:
            expected = cpu_model(b["input_ids"], b["attention_mask"])
            if not torch.allclose(traced(b["input_ids"], b["attention_mask"]), expected, atol=1e-4, rtol=1e-4):
                return
        buffer = io.BytesIO()  # torch.jit.save rejects write_atomic's temporary file name
        torch.jit.save(traced, buffer)
    write_atomic(os.path.join(folder, TRACED), lambda p: Path(p).write_bytes(buffer.getvalue()))


def load_fast_tokenizer(folder, kobert):
    """The checkpoint's tokenizer without transformers: KoBERT's SentencePiece, or tokenizer.json."""
    if kobert:
        return BERTSPTokenizer(os.path.join(folder, SPIECE))
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))


def load_traced(folder):
    """(TorchScript model, tokenizer, info) from a checkpoint folder with model.traced.pt, on CPU;
    None when it has none (older checkpoints, models that could not be traced)."""
    from safetensors import SafetensorError, safe_open

    path = os.path.join(folder, TRACED)
    try:
        with open(os.path.join(folder, "classifier.json"), encoding="utf-8") as f:
            info = json.load(f)
        if not os.path.isfile(path) or "pad_token_id" not in info or not os.path.isfile(os.path.join(folder, "config.json")):
            return None
        with safe_open(os.path.join(folder, "model.safetensors"), "pt"):
            pass  # a folder whose weights are missing or cut short is broken, whatever the copy says
        tokenizer = load_fast_tokenizer(folder, info["tokenizer"] == "kobert-sentencepiece")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torch.jit.load(path, map_location="cpu").eval()
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError):
        return None  # load_checkpoint will say what is wrong with the folder
    return model, tokenizer, info


def predict_logits(model, loader, device, autocast_dtype=None):
    """Logits for every item of loader's dataset, in dataset order, whatever the batch order."""
    logits = None
    for batch in loader:
        # inference_mode is a little faster than no_grad, but XLA tensors do not support it;
        # TorchScript's optimizing executor spends 0.1 s profiling first calls and then runs no faster
        with torch.inference_mode(device.type != "xla"), torch.no_grad(), torch.jit.optimized_execution(False), \
                torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            out = model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu().numpy()
        if logits is None:
            logits = np.zeros((len(loader.dataset), out.shape[1]), dtype="float32")
        logits[batch["index"].numpy()] = out
    return logits
