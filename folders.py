"""A folder is data: the checks every model and checkpoint folder passes before it is used, and
the layout of a checkpoint folder (which transformers class holds our head, under which names).

A folder may come from anyone (the Hub, a colleague). It is read as data and checked against
itself before anything large is allocated: config.json field by field, then against the tensors
its weights file holds, read from the file's header without loading them, then classifier.json.
Nothing in a folder is ever executed or unpickled.
"""
import collections
import json
import math
import os
import re
import warnings

import torch

from _1_data import TRUNCATIONS
from common import ModelError, read_json
from heads import HEADS

# backbone model_type -> (the transformers class that holds our cls/pooler head exactly,
# where our head's dense layer and output layer go in its state dict)
STANDARD_HEADS = {
    "bert": ("BertForSequenceClassification", "bert.pooler.dense.", "classifier."),
    "roberta": ("RobertaForSequenceClassification", "classifier.dense.", "classifier.out_proj."),
    "xlm-roberta": ("XLMRobertaForSequenceClassification", "classifier.dense.",
                    "classifier.out_proj."),
    "electra": ("ElectraForSequenceClassification", "classifier.dense.", "classifier.out_proj."),
}
CUSTOM_CLASS = "BERTClassifierForSequenceClassification"  # modeling_classifier.py, other heads
# the config fields that size the model, and those every BERT-family encoder needs
SIZE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "intermediate_size", "max_position_embeddings", "type_vocab_size", "embedding_size")
NEEDED_FIELDS = SIZE_FIELDS[:-1] + ("layer_norm_eps", "hidden_act")  # BERT, RoBERTa, ELECTRA
DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
          "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
# weights a pretrained folder may hold beside its encoder (pretraining and classifier heads)
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
            # safetensors' header lists every tensor's shape and dtype: read without loading a byte
            # of them
            with safe_open(path, "pt") as f:
                slices = {k: f.get_slice(k) for k in f.keys()}
                header = {k: (tuple(t.get_shape()), DTYPES.get(t.get_dtype(), t.get_dtype()))
                          for k, t in slices.items()}
        else:
            with warnings.catch_warnings():  # the unpickler warns about what it then refuses
                warnings.simplefilter("ignore")
                try:
                    # weights_only: the unpickler builds tensors and plain containers only, never
                    # objects that run code; mmap: a large file is mapped, not read into memory
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
    # Early BERT checkpoints name LayerNorm's parameters gamma and beta; transformers renames them
    return name, {re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k)): v
                  for k, v in header.items()}


def check_config(where, config):
    """The fields of config.json that loading reads: types, ranges, and how they fit together."""
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelError(f"{where}: expected a JSON object with a 'model_type' string")
    # Other families' configs are transformers' to check; these three we load ourselves too
    needed = NEEDED_FIELDS if config["model_type"] in STANDARD_HEADS else ()
    for field in needed:
        if field not in config:
            raise ModelError(f"{where}: no {field!r}")
    for field in SIZE_FIELDS:
        value = config.get(field)
        # type(...) is int: JSON's true would pass isinstance(value, int) and size a layer 1 wide
        if value is not None and (type(value) is not int or value < 1):
            raise ModelError(f"{where}: {field} must be a positive integer, got "
                             f"{json.dumps(value)[:40]}")
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    # Each attention head takes hidden / heads dimensions: anything else fails deep inside the model
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
    # The embedding of the padding token must exist, or every padded batch is an index error
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
        # A hub config.json may leave fields at the class's defaults; transformers fills them in too
        config = {**defaults, **config}
    check_config(path, config)
    return config


def encoder_shapes(config):
    """{name: shape} of the tensors of a BERT, RoBERTa or ELECTRA encoder of this config, named
    as transformers names them (no pooler; tests/test_folders.py checks it against transformers)."""
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    # ELECTRA may embed tokens narrower than its encoder and project them up
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
    # The tensor's first dimension (its rows), or None when the file does not hold it
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
    # Counted before anything is allocated: the one-line error says how large the config claims to
    # be
    implied = sum(math.prod(shape) for shape in expected.values())
    held = sum(math.prod(shape) for shape, _ in header.values())
    missing = [k for k in expected if k not in header]
    if missing:
        raise ModelError(f"{where}: implies {implied / 1e6:.2f}M parameters; {file} lacks "
                         f"{len(missing)} of its tensors ({missing[0]}, ...)")
    for name, shape in expected.items():
        found, dtype = header[name]
        # An integer tensor in place of a weight loads without complaint and computes nonsense
        if found != shape or dtype not in ("float32", "float16", "bfloat16"):
            raise ModelError(f"{where}: implies {name} of shape {list(shape)} (float), {file} "
                             f"holds {list(found)} ({dtype})")
    # One dtype for the whole encoder: a float16 tensor in a float32 model fails in its matmul
    dtypes = collections.Counter(header[name][1] for name in expected)
    if len(dtypes) > 1:
        odd = next(name for name in expected if header[name][1] != dtypes.most_common(1)[0][0])
        raise ModelError(f"{where}: {file} mixes {' and '.join(sorted(dtypes))} tensors ({odd} is "
                         f"{header[odd][1]}); a model's tensors share one dtype")
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
    # Only local folders are checked here: transformers reads a hub id's files from its cache
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
    # Not exact: a pretrained folder may hold its pretraining heads and a pooler beside the encoder
    left = check_weights(config_path, file, config, header, prefix, exact=False)
    unused = [k for k in left if not k.startswith((prefix + "pooler.", *HEAD_PREFIXES))
              and not k.endswith("_ids")]  # pretraining heads, a pooler, old index buffers
    if unused:
        print(f"note: {path}/{file} holds {len(unused)} tensors the {config['model_type']} "
              f"encoder of its config.json does not use ({', '.join(unused[:3])}"
              f"{', ...' if len(unused) > 3 else ''})")


def hub_layout(model_type, head_name, prefix):
    """(transformers class, renames): the class that loads a checkpoint of this backbone and
    head, and (our name, its name) prefixes from our state-dict keys to that class's keys."""
    # At inference both heads are dense + activation on [CLS] + linear: transformers' own classes
    if head_name in ("cls", "pooler") and model_type in STANDARD_HEADS:
        architecture, dense, out = STANDARD_HEADS[model_type]
        return architecture, [("head.dense.", dense), ("head.out.", out), ("backbone.", prefix)]
    return CUSTOM_CLASS, [("head.", "head."), ("backbone.", prefix)]


def head_guard(model_type, architecture):
    """For a head with no transformers class (weight_avg, lstm) on a family that has one: the
    name of that class's output weight, which such a checkpoint holds empty (shape [0]).
    transformers' own class then refuses the folder (a size mismatch) instead of loading it with a
    random classifier and a warning; with trust_remote_code, modeling_classifier.py ignores it,
    and AutoModel takes the encoder alone. Older folders lack it and still load here."""
    if architecture != CUSTOM_CLASS or model_type not in STANDARD_HEADS:
        return None
    return STANDARD_HEADS[model_type][2] + "weight"


def rename_keys(weights, renames, where):
    renamed = {}
    for key, tensor in weights.items():
        # The first rename whose prefix fits: head.dense. before head., so the order of renames
        # matters
        new = next((b + key[len(a):] for a, b in renames if key.startswith(a)), None)
        if new is None:
            raise ModelError(f"{where}: unexpected weight {key}")
        renamed[new] = tensor
    return renamed


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
    # Folders written before checkpoints became Hugging Face folders: refused, not guessed at
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
    # Every field a loader branches on holds one of the values it knows
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
    # max_len 3 is [CLS], one token and [SEP]; a batch size of 0 cannot cut texts into batches
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


def check_checkpoint(folder, info):
    """config.json of one of our checkpoints, checked with classifier.json against the header of
    model.safetensors: exactly the tensors the config's encoder and the head imply, before any
    is loaded. Returns the config."""
    where = f"{folder}/config.json"
    config = read_config(where, f"{folder}: cannot load checkpoint")
    file, header = weights_header(folder, f"{folder}: cannot load checkpoint")
    architecture, renames = hub_layout(config["model_type"], info["head_name"],
                                       info["base_model_prefix"])
    header.pop(head_guard(config["model_type"], architecture), None)  # not a weight of ours
    out = rename_keys({"head.out.weight": None}, renames, folder)
    # The head's output layer has one row per label: classifier.json and the weights must agree
    out_rows = header.get(next(iter(out)), ((None,),))[0][0]  # None: no such tensor
    if out_rows is not None and out_rows != len(info["labels"]):
        raise ModelError(f"{folder}/classifier.json: {len(info['labels'])} labels, but the head in "
                         f"{file} has {out_rows} outputs")
    # classifier.json's pad_token_id pads every batch: an id past the vocabulary is an IndexError
    if info["pad_token_id"] >= config["vocab_size"]:
        raise ModelError(f"{folder}/classifier.json: pad_token_id {info['pad_token_id']} is not a "
                         f"token id of the model's {config['vocab_size']}")
    if config["model_type"] in STANDARD_HEADS:
        if info["base_model_prefix"] != config["model_type"].split("-")[-1] + ".":
            raise ModelError(f"{folder}/classifier.json: base_model_prefix "
                             f"{info['base_model_prefix']!r} does not fit a {config['model_type']}")
        # The head's tensor names and shapes come from heads.py itself, so a new head needs no table
        with torch.device("meta"):  # shapes only: nothing is allocated
            head = HEADS[info["head_name"]](config["hidden_size"], len(info["labels"]), 0.0)
        head_shapes = rename_keys({"head." + k: tuple(v.shape)
                                   for k, v in head.state_dict().items()}, renames, folder)
        check_weights(where, file, config, header, info["base_model_prefix"], exact=True,
                      extra=head_shapes)
        # RoBERTa's positions start after its padding index: 514 rows hold 512 tokens
        limit = config["max_position_embeddings"] - (
            config.get("pad_token_id", 0) + 1 if "roberta" in config["model_type"] else 0)
        if info["args"]["max_len"] > limit:
            raise ModelError(f"{folder}/classifier.json: args.max_len {info['args']['max_len']} "
                             f"is more than the {limit} positions of the model")
    return config
