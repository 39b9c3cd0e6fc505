"""Checkpoint folders: saving a classifier (or a pretrained model) as a standard Hugging Face
folder, loading one back, and starting a fine-tuning run from one.

A checkpoint folder is config.json (with id2label), model.safetensors with the library's key
names, the tokenizer files, and classifier.json with the training flags. The cls and pooler
heads on BERT, RoBERTa and ELECTRA are saved as the library's own *ForSequenceClassification
classes; other heads ship heads.py and modeling_classifier.py for `trust_remote_code=True`.
Loading reads safetensors and JSON only, after folders.py has checked them.
"""
import hmac
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

from _1_data import BERTSPTokenizer
from _2_model import SPIECE, BERTClassifier, MaskedLM, load_backbone, new_classifier
from common import ModelError, read_json, sha256_of, write_atomic
from folders import (CUSTOM_CLASS, check_checkpoint, head_guard, hub_layout, read_info,
                     rename_keys)
from inference import (ONNX_FILES, OnnxClassifier, PlainEncoder, check_onnx_file, onnx_seal,
                       read_export_record)

SHIPPED_CODE = ("heads.py", "modeling_classifier.py")  # copied into folders of custom heads

# ------------------------------------------------------------------------------------------- saving

def save_tokenizer(folder, tokenizer, max_len):
    """The tokenizer files; model_max_length makes pipeline(truncation=True) cut where we do."""
    if isinstance(tokenizer, BERTSPTokenizer):
        write_atomic(os.path.join(folder, SPIECE), lambda p: shutil.copyfile(tokenizer.path, p))
        return
    tokenizer.model_max_length = max_len
    # save_pretrained writes several files in place; staged apart and copied one by one through
    # write_atomic, a kill never leaves a folder whose tokenizer files disagree
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
    # a copy: the live model's config keeps what transformers expects of a bare encoder
    config = backbone_config.__class__.from_dict(backbone_config.to_dict())  # a copy
    names = info["label_names"]
    config.architectures = [architecture]
    # pipeline() and the Hub's widget then print "긍정", not "LABEL_1"
    config.id2label, config.label2id = dict(enumerate(names)), {n: i for i, n in enumerate(names)}
    config.classifier_dropout = model.head.dropout.p
    if info["args"].get("problem") == "multi_label":  # pipelines then apply a sigmoid
        config.problem_type = "multi_label_classification"
    custom = architecture == CUSTOM_CLASS
    if custom:
        # heads without a transformers class: auto_map tells AutoModelForSequenceClassification
        # (with trust_remote_code=True) to build modeling_classifier.py's class, shipped below
        config.auto_map = {"AutoModelForSequenceClassification":
                           f"modeling_classifier.{CUSTOM_CLASS}"}
        config.classifier_head = model.head_name
        config.classifier_activation = getattr(model.head, "activation", "tanh")
    write_atomic(os.path.join(folder, "config.json"),
                 lambda p: config.to_json_file(p, use_diff=False))
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}  # XLA/GPU
    # the library's key names (bert.encoder..., classifier.weight), so its classes load them
    weights = rename_keys(weights, renames, folder)
    guard = head_guard(backbone_config.model_type, architecture)
    if guard:  # transformers' own class must not load this head as a random one of its own
        weights[guard] = torch.zeros(0)
    write_atomic(os.path.join(folder, "model.safetensors"),
                 lambda p: save_file(weights, p, metadata={"format": "pt"}))
    here = os.path.dirname(os.path.abspath(__file__))
    for name in SHIPPED_CODE:
        if custom:
            write_atomic(os.path.join(folder, name),
                         lambda p: shutil.copyfile(os.path.join(here, name), p))
        elif os.path.exists(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))  # left by an earlier run with another head
    # classifier.json last: a folder without it is not a checkpoint (read_info says so), so a kill
    # while saving never leaves a folder that loads with a part missing
    info = {**info, "head_name": model.head_name, "base_model_prefix": prefix,
            "pad_token_id": tokenizer.pad_token_id,
            "tokenizer": "kobert-sentencepiece" if isinstance(tokenizer, BERTSPTokenizer)
            else "transformers"}
    write_atomic(os.path.join(folder, "classifier.json"), lambda p: Path(p).write_text(
        json.dumps(info, ensure_ascii=False, indent=1), encoding="utf-8"))


def save_pretraining(folder, model, tokenizer, info):
    """A Hugging Face folder that --model can name: config.json, model.safetensors (the masked
    LM, or the ELECTRA discriminator with its generator in generator/), the tokenizer, and
    pretraining.json (info) written last."""
    os.makedirs(folder, exist_ok=True)
    save_tokenizer(folder, tokenizer, info["args"]["max_len"])
    if isinstance(tokenizer, BERTSPTokenizer):  # what kobert_spiece looks for
        # so that --model on this folder finds the KoBERT transform again (_2_model.kobert_spiece)
        write_atomic(os.path.join(folder, "tokenizer_config.json"), lambda p: Path(p).write_text(
            json.dumps({"tokenizer_class": "KoBERTTokenizer"})))
    if isinstance(model, MaskedLM):
        model.lm.save_pretrained(folder)
    else:
        model.discriminator.save_pretrained(folder)
        model.generator.save_pretrained(os.path.join(folder, "generator"))
    write_atomic(os.path.join(folder, "pretraining.json"), lambda p: Path(p).write_text(
        json.dumps(info, ensure_ascii=False, indent=1), encoding="utf-8"))


# ------------------------------------------------------------------------------------------ loading

def under(weights, prefix):
    """The tensors whose names start with prefix, the prefix taken off."""
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def checked_folder(folder):
    """(classifier.json, config.json, whether the tokenizer is KoBERT's) of a checkpoint folder,
    each checked against the others and the weights' header before anything is loaded."""
    info = read_info(folder)
    return info, check_checkpoint(folder, info), info["tokenizer"] == "kobert-sentencepiece"


def load_checkpoint(folder, device="cpu", plain=False):
    """(model in eval mode, tokenizer, info) from a folder written by save_checkpoint.

    With plain=True (predict.py) a BERT, RoBERTa or ELECTRA encoder runs as PlainEncoder and the
    tokenizer through the tokenizers library, so transformers is never imported."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    info, config, kobert = checked_folder(folder)
    try:
        architecture, renames = hub_layout(config["model_type"], info["head_name"],
                                           info["base_model_prefix"])
        # safetensors holds tensors only: loading it can run nothing (a pickle could)
        weights = load_file(os.path.join(folder, "model.safetensors"), device=str(device))
        weights.pop(head_guard(config["model_type"], architecture), None)
        # A NaN or an infinity in a weight makes every answer NaN, which is not even JSON
        bad = next((k for k, w in weights.items() if not torch.isfinite(w).all()), None)
        if bad:
            raise ModelError(f"{folder}/model.safetensors: {bad} holds NaN or infinite values")
        weights = rename_keys(weights, [(b, a) for a, b in renames], folder)
        # PlainEncoder needs the tokenizers library's tokenizer.json (or KoBERT's transform)
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
            # a tokenizer.json from anyone may hold a regex that fails only when it first runs
            tokenizer.encode("이 영화 정말 재밌다 The movie 123!")
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # the library's errors, and its panics (pyo3 PanicException)
        raise ModelError(f"{folder}/{name}: cannot load the tokenizer "
                         f"({(str(e).splitlines() or [type(e).__name__])[0][:200]})") from None
    # an id past the embedding table would be an index error inside the model, mid-request
    if top >= vocab_size:
        raise ModelError(f"{folder}/{name}: token ids go up to {top}, the model's vocabulary has "
                         f"{vocab_size}")
    return tokenizer


def load_onnx(folder, precision):
    """(OnnxClassifier, tokenizer, info) for an ONNX file export.py wrote for these weights."""
    if not all(importlib.util.find_spec(name) for name in ("onnx", "onnxruntime")):
        raise ModelError("--onnx needs onnxruntime and onnx: pip install onnxruntime onnx")
    info, config, kobert = checked_folder(folder)
    name = ONNX_FILES[precision]
    path, written = os.path.join(folder, name), read_export_record(folder, "--onnx").get("onnx")
    if not isinstance(written, dict) or not isinstance(written.get(name), dict):
        raise ModelError(f"--onnx: export.py wrote no {name} for {folder}; run: python export.py "
                         f"--model_dir {folder} --file LABELLED_FILE --onnx")
    if not os.path.isfile(path) or sha256_of(path) != written[name].get("sha256"):
        raise ModelError(f"--onnx: {path} is not the file export.py wrote for these weights "
                         f"(missing, or its hash differs); run export.py again")
    # An ONNX file is a program for onnxruntime: only one this machine's export.py wrote for
    # these very weights runs (the seal, under a key that never leaves the machine), with ONNX's
    # own operators and nothing outside the folder
    weights = sha256_of(os.path.join(folder, "model.safetensors"))
    if not hmac.compare_digest(str(written[name].get("seal")),
                               onnx_seal(written[name]["sha256"], weights)):
        raise ModelError(f"--onnx: {path} was not exported on this machine (ONNX files run only "
                         f"where export.py wrote them); run: python export.py --model_dir "
                         f"{folder} --file LABELLED_FILE --onnx")
    check_onnx_file(path, len(info["labels"]))
    plain = kobert or os.path.isfile(os.path.join(folder, "tokenizer.json"))
    tokenizer = load_tokenizer(folder, kobert, plain, config["vocab_size"])
    return OnnxClassifier(path), tokenizer, info


# -------------------------------------------------------------------------------- starting from one

def classifier_to_finetune(name, num_classes, head_name, dr_rate, train_texts=(), cache_dir=None):
    """(BERTClassifier, tokenizer) to fine-tune: a pretrained backbone with a new head, or one of
    this repository's checkpoint folders with its weights, head and tokenizer."""
    if os.path.isfile(os.path.join(name, "classifier.json")):
        return continue_checkpoint(name, num_classes, head_name, dr_rate)
    backbone, tokenizer, missing = load_backbone(name, train_texts, cache_dir)
    # weights a checkpoint lacks start random: said once here, not as transformers' wall of text
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


def trained_head(folder):
    """The head_name of one of our checkpoint folders (None for anything else: a hub id, a
    backbone folder, a folder whose classifier.json loading will name as broken)."""
    try:
        head = read_json(os.path.join(folder, "classifier.json")).get("head_name")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    return head if isinstance(head, str) else None


def continue_checkpoint(folder, num_classes, head_name, dr_rate):
    """Fine-tune one of our checkpoints further: its backbone and tokenizer, and its head when
    the head and the number of classes are the same."""
    old, tokenizer, info = load_checkpoint(folder)
    # A new classifier around the old backbone: the head is kept only where it fits below
    model = BERTClassifier(old.backbone, num_classes, head_name, dr_rate)
    old_classes = len(info["labels"])
    if (info["head_name"], old_classes) == (head_name, num_classes):
        model.head.load_state_dict(old.head.state_dict())
        print(f"note: {folder}'s {head_name} head goes on training (--head_name starts another)")
    else:
        print(f"note: {folder} has a {info['head_name']} head for {old_classes} classes; a new "
              f"{head_name} head for {num_classes} classes starts from random weights")
    if hasattr(tokenizer, "model_max_length"):  # it holds the old run's --max_len: no limit
        tokenizer.model_max_length = int(1e30)  # (transformers' value for none)
    return model.train(), tokenizer
