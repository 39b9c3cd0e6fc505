"""A folder is data: a checkpoint or model folder someone sends is checked against itself before
anything large is allocated, and any mismatch is one line naming the file and the field (exit 2).

The fields the loaders read, each tested wrong below in type, range and consistency:
- config.json: model_type, vocab_size, hidden_size, num_hidden_layers, num_attention_heads,
  intermediate_size, max_position_embeddings, type_vocab_size, layer_norm_eps, hidden_act,
  pad_token_id (and the parameter count they imply, against the weights file's header)
- classifier.json: labels, label_names, head_name, base_model_prefix, tokenizer, pad_token_id,
  threshold, args.max_len, args.test_batch_size, args.truncation, args.problem, args.label_sep,
  args.model, args.dr_rate; JSON nested too deep
- model.safetensors / pytorch_model.bin: each tensor's name, shape and dtype; none missing, none
  extra (our checkpoints), extra counted in a note (--model folders)
- tokenizer.json: the file itself (JSON, the tokenizers library's loader, its regexes), its
  vocabulary against vocab_size
- training_state.pt (--resume): epoch, step, global_step, best_valid, history, n_tokens, sums,
  phase, rng, optimizer, scheduler, scaler
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run
from helpers import ROWS, flags, write_tsv
from safetensors.torch import load_file, save_file

from _2_model import load_backbone
from _3_main import main
from _3_run import load_state
from checkpoint import load_checkpoint
from common import ModelError, printable
from folders import encoder_shapes


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny checkpoint (4 layers, 256 wide) and the pretrained folder of a second run."""
    root = tmp_path_factory.mktemp("folders")
    train = write_tsv(root / "train.tsv", ROWS)
    main(flags(train, root / "checkpoint", "--head_name", "cls"))  # the standard classifier.*
    main(flags(train, root / "pretraining", "--mlm_epochs", "1"))
    return root


@pytest.fixture
def folder(trained, tmp_path):
    copy = tmp_path / "checkpoint"
    shutil.copytree(trained / "checkpoint", copy, ignore=shutil.ignore_patterns("states"))
    return copy


def edit_json(path, change):
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def setter(dotted, value):
    def change(data):
        *parents, key = dotted.split(".")
        for parent in parents:
            data = data[parent]
        if value is DELETE:
            del data[key]
        else:
            data[key] = value(data[key]) if callable(value) else value

    return change


DELETE = object()

CONFIG_CASES = [
    ("model_type", 5, "expected a JSON object with a 'model_type' string"),
    ("vocab_size", "16000", "vocab_size must be a positive integer"),
    ("vocab_size", 0, "vocab_size must be a positive integer"),
    ("vocab_size", lambda v: v + 1, r"vocab_size is \d+, but model.safetensors holds \d+ \(rows\)"),
    ("hidden_size", 40000, "hidden_size is 40000, but model.safetensors holds 256"),
    ("hidden_size", 250, "hidden_size 250 is not divisible by num_attention_heads 4"),
    ("hidden_size", DELETE, "no 'hidden_size'"),
    ("num_hidden_layers", 2, r"num_hidden_layers is 2, but model.safetensors holds 4 \(layers\)"),
    ("num_hidden_layers", 6, "num_hidden_layers is 6, but model.safetensors holds 4"),
    ("num_hidden_layers", True, "num_hidden_layers must be a positive integer"),
    ("num_attention_heads", 3, "hidden_size 256 is not divisible by num_attention_heads 3"),
    ("num_attention_heads", -4, "num_attention_heads must be a positive integer"),
    ("intermediate_size", 512, "intermediate_size is 512, but model.safetensors holds 1024"),
    ("max_position_embeddings", 64, "max_position_embeddings is 64, but model.safetensors holds"),
    ("type_vocab_size", 3, "type_vocab_size is 3, but model.safetensors holds 2"),
    ("layer_norm_eps", "1e-12", "layer_norm_eps must be a number between 0 and 1"),
    ("layer_norm_eps", 5, "layer_norm_eps must be a number between 0 and 1"),
    ("hidden_act", 5, "hidden_act must be the name of an activation"),
    ("pad_token_id", 10**6, "pad_token_id 1000000 is not a token id of the vocabulary"),
    ("pad_token_id", "0", "pad_token_id .* is not a token id"),
]


@pytest.mark.parametrize(
    "field, value, pattern", CONFIG_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CONFIG_CASES)]
)
def test_config_fields(folder, field, value, pattern):
    edit_json(folder / "config.json", setter(field, value))
    with pytest.raises(ModelError, match="config.json: " + pattern):
        load_checkpoint(str(folder), plain=True)
    with pytest.raises(ModelError, match="config.json: " + pattern):
        load_checkpoint(str(folder), plain=False)  # the transformers path too


INFO_CASES = [
    ("labels", [0, 1], "'labels' and 'label_names' must be lists of strings"),
    ("labels", "01", "'labels' must be a list"),
    ("label_names", ["부정", "부정"], "2 distinct label names needed for 2 labels"),
    ("labels", [str(i) for i in range(2_000_000)], "2000000 distinct label names needed"),
    ("head_name", "nope", "head_name .nope. is not one of"),
    ("head_name", "lstm", "lacks .* tensors"),
    ("base_model_prefix", "roberta.", "base_model_prefix 'roberta.' does not fit a bert"),
    ("tokenizer", "bpe", "tokenizer .bpe. is not one of"),
    ("pad_token_id", -1, "pad_token_id must be an integer of at least 0"),
    ("threshold", 2, "'threshold' must be a number between 0 and 1"),
    ("args.max_len", 10**6, "args.max_len 1000000 is more than the 512 positions of the model"),
    ("args.max_len", "16", "args.max_len must be an integer of at least 3"),
    ("args.test_batch_size", 0, "args.test_batch_size must be an integer of at least 1"),
    ("args.truncation", "middle", "args.truncation .middle. is not one of head, tail, head_tail"),
    ("args.problem", "regression", "args.problem .regression. is not one of"),
    ("args.model", 5, "args.model must be a string"),
    ("args.dr_rate", 2, "args.dr_rate in"),
    ("pad_token_id", 10**6, "pad_token_id 1000000 is not a token id of the model's"),
]


@pytest.mark.parametrize(
    "field, value, pattern", INFO_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(INFO_CASES)]
)
def test_classifier_json_fields(folder, field, value, pattern):
    edit_json(folder / "classifier.json", setter(field, value))
    with pytest.raises(ModelError, match=pattern):
        load_checkpoint(str(folder), plain=True)


def test_millions_of_labels_stop_before_the_head_is_built(folder):
    names = [f"c{i}" for i in range(2_000_000)]
    edit_json(folder / "classifier.json", lambda d: d.update(labels=names, label_names=names))
    with pytest.raises(
        ModelError,
        match="classifier.json: 2000000 labels, but the head in model.safetensors has 2 outputs",
    ):
        load_checkpoint(str(folder), plain=True)


def test_an_empty_label_sep_of_a_multi_label_checkpoint(folder):
    edit_json(
        folder / "classifier.json", lambda d: d["args"].update(problem="multi_label", label_sep="")
    )
    with pytest.raises(ModelError, match="args.label_sep must be a non-empty string"):
        load_checkpoint(str(folder), plain=True)


@pytest.mark.parametrize("name", ["classifier.json", "config.json"])
def test_json_nested_too_deep(folder, name):
    (folder / name).write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ModelError, match=rf"cannot load checkpoint \({name}: "):
        load_checkpoint(str(folder), plain=True)


def rewrite_weights(folder, change):
    weights = load_file(str(folder / "model.safetensors"))
    change(weights)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "change, pattern",
    [
        (
            lambda w: w.update(
                {"bert.encoder.layer.1.output.dense.weight": torch.zeros(256, 1000)}
            ),
            r"implies bert.encoder.layer.1.output.dense.weight of shape \[256, 1024\] \(float\), "
            r"model.safetensors holds \[256, 1000\]",
        ),
        (
            lambda w: w.update(
                {"bert.encoder.layer.0.output.dense.bias": torch.zeros(256, dtype=torch.int64)}
            ),
            r"holds \[256\] \(int64\)",
        ),
        (
            lambda w: w.pop("bert.encoder.layer.3.attention.self.key.bias"),
            r"lacks 1 of its tensors \(bert.encoder.layer.3",
        ),
        (
            lambda w: w.update({"bert.something_else": torch.zeros(4)}),
            r"tensors more \(bert.something_else",
        ),
        (lambda w: w.pop("classifier.weight"), r"lacks 1 of its tensors \(classifier.weight"),
        (
            lambda w: w.update({"bert.pooler.dense.bias": torch.zeros(256, dtype=torch.float16)}),
            r"mixes float16 and float32 tensors \(bert.pooler.dense.bias is float16\)",
        ),
        (
            lambda w: w["bert.encoder.layer.2.output.dense.bias"].__setitem__(3, float("nan")),
            r"bert.encoder.layer.2.output.dense.bias holds NaN or infinite values",
        ),
    ],
    ids=["shape", "dtype", "missing", "extra", "no_head", "float16_among_float32", "nan"],
)
def test_weights_against_the_config(folder, change, pattern):
    rewrite_weights(folder, change)
    with pytest.raises(ModelError, match=pattern):
        load_checkpoint(str(folder), plain=True)


def peak_rss_of_predict(folder, *args):
    """predict.py in a child that reports its own peak memory (MB) on stdout's last line."""
    code = (
        "import resource, runpy, sys; sys.argv = ['predict.py', *sys.argv[1:]]\n"
        "try:\n    runpy.run_path('predict.py', run_name='__main__')\n"
        "finally:\n    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "--model_dir", str(folder), *args],
        cwd=ROOT,  # runs predict.py from the repository; writes nothing
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return result, int(result.stdout.strip().splitlines()[-1])


def test_one_edited_number_does_not_exhaust_the_machine(folder):
    edit_json(folder / "config.json", setter("hidden_size", 40000))
    result, peak_mb = peak_rss_of_predict(folder, "좋아요")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "config.json: hidden_size is 40000, but model.safetensors holds 256" in result.stderr
    assert peak_mb < 1500  # the 40000 x 40000 head alone would be 6 GB


def test_every_surface_checks_the_same(folder, trained, tmp_path):
    edit_json(folder / "config.json", setter("num_hidden_layers", 2))
    expected = "config.json: num_hidden_layers is 2, but model.safetensors holds 4 (layers)"
    for script, args in (
        ("predict.py", ["--model_dir", folder, "좋아요"]),
        ("predict.py", ["--model_dir", folder, "--serve", "--port", "0"]),
        ("_3_main.py", flags(trained / "train.tsv", tmp_path / "again", "--model", folder)),
    ):
        result = run(script, *args, check=False)
        assert (
            result.returncode == 2
            and expected in result.stderr
            and "Traceback" not in result.stderr
        ), result.stderr


def test_a_pretrained_folder_whose_config_drops_layers_is_noted(trained, tmp_path, capsys):
    pretrained = tmp_path / "pretrained"
    shutil.copytree(trained / "pretraining" / "pretrained", pretrained)
    edit_json(pretrained / "config.json", setter("num_hidden_layers", 1))
    with pytest.raises(ModelError, match="num_hidden_layers is 1, but model.safetensors holds 4"):
        load_backbone(str(pretrained))
    edit_json(pretrained / "config.json", setter("num_hidden_layers", 4))
    rewrite_weights(
        pretrained, lambda w: w.update({"bert.encoder.layer.9.output.dense.bias": torch.zeros(256)})
    )
    with pytest.raises(ModelError, match="num_hidden_layers is 4, but model.safetensors holds 5"):
        load_backbone(str(pretrained))
    rewrite_weights(
        pretrained,
        lambda w: w.update({"bert.unused": torch.zeros(2)})
        or w.pop("bert.encoder.layer.9.output.dense.bias"),
    )
    load_backbone(str(pretrained))
    assert (
        "holds 1 tensors the bert encoder of its config.json does not use (bert.unused)"
        in capsys.readouterr().out
    )


def test_a_pytorch_model_bin_is_checked_after_a_weights_only_load(trained, tmp_path):
    folder = tmp_path / "hub"
    shutil.copytree(trained / "pretraining" / "pretrained", folder)
    weights = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    weights["bert.embeddings.word_embeddings.weight"] = weights[
        "bert.embeddings.word_embeddings.weight"
    ][:-1]
    torch.save(weights, folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"vocab_size is \d+, but pytorch_model.bin holds \d+"):
        load_backbone(str(folder), objective="mlm")
    (folder / "pytorch_model.bin").write_bytes(
        b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR."
    )  # a pickle that runs code
    with pytest.raises(ModelError, match=r"cannot load it \(pytorch_model.bin: "):
        load_backbone(str(folder), objective="mlm")


def test_the_hand_written_encoder_table_is_transformers(tmp_path):
    from transformers import AutoConfig, AutoModel

    for kind, extra in (("bert", {}), ("roberta", {}), ("electra", {"embedding_size": 16})):
        config = AutoConfig.for_model(
            kind,
            vocab_size=50,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=40,
            type_vocab_size=2,
            **extra,
        )
        with torch.device("meta"):
            model = AutoModel.from_config(config)
        theirs = {
            k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("pooler.")
        }
        assert encoder_shapes(config.to_dict()) == theirs, kind


@pytest.mark.parametrize(
    "content, pattern",
    [
        (lambda text: text[: len(text) // 2], "tokenizer.json: cannot load the tokenizer"),
        (
            lambda text: json.dumps(
                {
                    **json.loads(text),
                    "pre_tokenizer": {
                        "type": "Split",
                        "pattern": {"Regex": "a{1000000}"},
                        "behavior": "Isolated",
                        "invert": False,
                    },
                }
            ),
            "tokenizer.json: cannot load the tokenizer .* too big number for repeat range",
        ),
        (
            lambda text: json.dumps(
                {
                    **json.loads(text),
                    "model": {
                        **json.loads(text)["model"],
                        "vocab": {**json.loads(text)["model"]["vocab"], "extra_piece": 10**6},
                    },
                }
            ),
            r"tokenizer.json: token ids go up to 1000000, the model's vocabulary has \d+",
        ),
    ],
    ids=["truncated", "regex", "ids_beyond_the_vocabulary"],
)
def test_tokenizer_files(folder, content, pattern):
    path = folder / "tokenizer.json"
    path.write_text(content(path.read_text(encoding="utf-8")), encoding="utf-8")
    for plain in (True, False):
        with pytest.raises(ModelError, match=pattern):
            load_checkpoint(str(folder), plain=plain)


STATE_CASES = [
    ("epoch", -1),
    ("step", "3"),
    ("global_step", 1.5),
    ("best_valid", "high"),
    ("history", {"a": 1}),
    ("n_tokens", None),
    ("sums", torch.zeros(5)),
    ("phase", "finish"),
    ("rng", [1, 2]),
    ("optimizer", 3),
    ("scheduler", []),
    ("scaler", "x"),
]


@pytest.mark.parametrize("key, value", STATE_CASES, ids=[c[0] for c in STATE_CASES])
def test_training_state_fields(trained, tmp_path, key, value):
    out = tmp_path / "run"
    shutil.copytree(trained / "checkpoint", out)
    state_path = out / "states" / (out / "states" / "latest").read_text() / "training_state.pt"
    state = torch.load(state_path, weights_only=True)
    state[key] = value
    torch.save(state, state_path)
    with pytest.raises(ModelError, match=f"training_state.pt: {key} "):
        load_state(str(out))


def test_a_damaged_state_stops_resume_in_one_line(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained / "checkpoint", out)
    state_path = out / "states" / (out / "states" / "latest").read_text() / "training_state.pt"
    state = torch.load(state_path, weights_only=True)
    state["optimizer"] = {"state": {}, "param_groups": []}
    torch.save(state, state_path)
    result = run("_3_main.py", *flags(trained / "train.tsv", out, "--resume"), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        "training_state.pt: optimizer does not fit this model"
        in result.stderr.strip().splitlines()[-1]
    )


def test_names_from_input_cannot_move_the_cursor_or_add_lines(folder):
    names = ["부정\x1b[2J\x1b[H", "긍정\nfake line"]
    edit_json(folder / "classifier.json", lambda d: d.update(label_names=names))
    edit_json(folder / "config.json", lambda d: d.update(id2label=dict(enumerate(names))))
    result = run("predict.py", "--model_dir", folder, "좋아요\x1b[31m", "별로예요")
    assert "\x1b" not in result.stdout and len(result.stdout.splitlines()) == 2, result.stdout
    assert printable("a\x1b[2Jb\nc\td\u2028") == "a\\x1b[2Jb\\nc\\td\\u2028"


def test_serve_takes_a_classifier_json_without_args_model(folder):
    from predict import Predictor
    from serve import create_app

    edit_json(folder / "classifier.json", lambda d: d["args"].pop("model"))
    client = create_app(Predictor(str(folder))).test_client()
    assert client.get("/").status_code == 200
    assert client.post("/api", json={"sentence": "좋아요"}).get_json()["label"] in ("0", "1")


def test_a_hub_config_that_leaves_fields_at_their_defaults_loads(trained, tmp_path, capsys):
    folder = tmp_path / "pretrained"
    shutil.copytree(trained / "pretraining" / "pretrained", folder)
    edit_json(
        folder / "config.json",
        lambda d: [d.pop(k) for k in ("type_vocab_size", "layer_norm_eps", "hidden_act")],
    )
    lm, _, _ = load_backbone(str(folder), objective="mlm")  # BERT's defaults: 2, 1e-12, gelu
    assert lm.config.type_vocab_size == 2 and "note:" not in capsys.readouterr().out
