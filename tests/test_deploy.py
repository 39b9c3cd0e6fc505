"""Deployment: int8 (`--quantize int8`), ONNX (`export.py --onnx`, `predict.py --onnx`), and the
export records predict.py trusts only for the weights they were written for."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import SAMPLE, run
from helpers import CHECK_TEXTS, family_backbone, info_for, reviews

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

from _1_data import read_table  # noqa: E402
from common import ModelError, sha256_of  # noqa: E402
from _2_model import new_classifier, tiny_backbone  # noqa: E402
from checkpoint import save_checkpoint  # noqa: E402
import inference  # noqa: E402
from inference import (  # noqa: E402
    INT8_MAX_LOSS,
    INT8_TOLERANCE,
    OnnxClassifier,
    cpu_kind,
    cpu_name,
    onnx_seal,
    predict_logits,
    quantize_int8,
)
from export import export_onnx  # noqa: E402
from predict import Predictor  # noqa: E402

# texts of every length: one character, sentences, and beyond max_len (cut as predict.py cuts)
TEXTS = [t for t in CHECK_TEXTS if t] + reviews(120)[::3] + ["정말 " * n for n in (1, 30, 90)]


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    """A copy of the tiny checkpoint, exported with --onnx against 300 held-out sample reviews:
    (folder, held-out file)."""
    folder = tmp_path_factory.mktemp("deploy") / "checkpoint"
    shutil.copytree(tiny_checkpoint[0], folder, ignore=shutil.ignore_patterns("states"))
    held_out = folder.parent / "held_out.txt"
    with open(os.path.join(SAMPLE, "ratings_test.txt"), encoding="utf-8") as f:
        held_out.write_text("".join(f.readlines()[:301]), encoding="utf-8")
    # --int8 always: int8 scored and kept on any CPU, also where it is slower than float32 (tiny,
    # 256 wide, even with VNNI), so that the int8 tests below run everywhere
    run("export.py", "--model_dir", folder, "--file", held_out, "--onnx", "--int8", "always")
    return folder, held_out


def accuracy(folder, held_out, *flags):
    out = held_out.parent / "out.jsonl"
    run("predict.py", "--model_dir", folder, "--file", held_out, "--output", out, *flags)
    predicted = [json.loads(line)["label"] for line in out.read_text(encoding="utf-8").splitlines()]
    truth = [["부정", "긍정"][int(label)] for _, label in read_table(str(held_out))]
    return np.mean(np.array(predicted) == np.array(truth))


def test_int8_accuracy_stays_within_its_bound(exported):
    """export.py's record and predict.py --quantize int8 on the held-out texts: int8 costs at
    most INT8_MAX_LOSS points, measured the way users measure it."""
    folder, held_out = exported
    record = json.loads((folder / "export.json").read_text())
    assert record["weights_sha256"] == sha256_of(folder / "model.safetensors")
    assert record["int8"]["texts"] == 300 and record["int8"]["metric"] == "accuracy"
    float32, int8 = accuracy(folder, held_out), accuracy(folder, held_out, "--quantize", "int8")
    assert float32 > 0.6  # a trained model, so that the bound means something
    assert (float32, int8) == pytest.approx((record["int8"]["float32"], record["int8"]["int8"]))
    assert 100 * abs(float32 - int8) <= INT8_MAX_LOSS


def test_the_int8_onnx_file_computes_the_same_on_every_cpu(exported):
    """Without VNNI, onnxruntime multiplies uint8 x int8 pairs into a 16-bit sum that saturates
    past 32,767 (AVX2 machines refused their own int8 export). Weights within 63 of 0 keep every
    pair within it (2 x 255 x 63), so the file gives the same numbers on every CPU."""
    model = onnx.load(str(exported[0] / "model-int8.onnx"))
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    products = [node for node in model.graph.node if node.op_type == "MatMulInteger"]
    assert products and all(node.input[1] in weights for node in products)
    for node in products:
        weight = weights[node.input[1]].astype(np.int32)
        assert weights[node.input[1]].dtype == np.int8
        assert 2 * 255 * np.abs(weight).max() <= 32767


def test_an_int8_text_does_not_depend_on_its_batch_mates(exported):
    """Per-row scales: most texts get the very same int8 logits alone and in a padded batch; the
    rest move by float32 noise crossing a rounding boundary, within INT8_TOLERANCE (one scale
    per batch would move every text)."""
    predictor = Predictor(str(exported[0]), "cpu", quantize="int8")
    batched = predictor.logits(TEXTS)
    alone = np.concatenate([predictor.logits([text]) for text in TEXTS])
    moved = np.abs(batched - alone).max(1)
    assert moved.max() <= INT8_TOLERANCE
    assert np.mean(moved == 0) >= 0.5
    float32 = Predictor(str(exported[0]), "cpu").logits(TEXTS)
    assert 0 < np.abs(batched - float32).max() < 1  # int8 indeed, and close to float32


def test_onnxruntime_alone_matches_predict_py(exported):
    """model.onnx loads with onnxruntime and the tokenizers library, no code from here, and its
    probabilities equal predict.py's within 1e-4, for one padded batch of texts of every length."""
    from tokenizers import Tokenizer

    folder = exported[0]
    expected = [
        json.loads(line)["probs"]
        for line in run("predict.py", "--model_dir", folder, "--json", *TEXTS).stdout.splitlines()
    ]
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    max_len = json.loads((folder / "classifier.json").read_text())["args"]["max_len"]
    tokenizer.enable_truncation(max_len)
    tokenizer.enable_padding(
        pad_id=json.loads((folder / "classifier.json").read_text())["pad_token_id"]
    )
    encoded = tokenizer.encode_batch(TEXTS)
    assert (
        len({len(e.ids) for e in encoded}) == 1
        and max(sum(e.attention_mask) for e in encoded) == max_len
    )
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"))
    (logits,) = session.run(
        None,
        {
            "input_ids": np.array([e.ids for e in encoded]),
            "attention_mask": np.array([e.attention_mask for e in encoded]),
        },
    )
    probs = torch.from_numpy(logits).softmax(-1).numpy()
    np.testing.assert_allclose(probs, [[p["부정"], p["긍정"]] for p in expected], atol=1e-4)


def test_predict_onnx_gives_predict_py_answers(exported):
    folder = exported[0]
    for flags in ([], ["--quantize", "int8"]):
        torch_rows = run("predict.py", "--model_dir", folder, "--json", *flags, *TEXTS[:8]).stdout
        onnx_rows = run(
            "predict.py", "--model_dir", folder, "--json", "--onnx", *flags, *TEXTS[:8]
        ).stdout
        for a, b in zip(torch_rows.splitlines(), onnx_rows.splitlines(), strict=True):
            a, b = json.loads(a), json.loads(b)
            assert a["text"] == b["text"]
            assert a["probs"] == pytest.approx(b["probs"], abs=1e-4 if not flags else 0.05)


@pytest.mark.parametrize(
    "family,head",
    [
        ("bert", "cls"),
        ("bert", "pooler"),
        ("bert", "weight_avg"),
        ("roberta", "cls"),
        ("electra", "weight_avg"),
    ],
)
def test_every_head_exports_with_predict_py_logits(family, head, tmp_path):
    """Random small classifiers of each family and head: model.onnx (any batch size, any length)
    within 1e-4 of predict.py's logits on texts of every length, batched otherwise than at
    export; int8 within INT8_TOLERANCE of int8 in PyTorch."""
    from _2_model import load_backbone

    torch.manual_seed(0)
    _, tokenizer, _ = load_backbone("tiny", reviews(300))
    backbone = (
        tiny_backbone(len(tokenizer)) if family == "bert" else family_backbone(family, tokenizer)
    )
    save_checkpoint(
        str(tmp_path),
        new_classifier(backbone, 3, head, 0.1),
        tokenizer,
        info_for(list("abc"), ["가", "나", "다"], max_len=64),
    )
    for int8 in (False, True) if (family, head) == ("bert", "cls") else (False,):
        predictor = Predictor(str(tmp_path), "cpu", batch_size=5)
        if int8:
            quantize_int8(predictor.model)
        export_onnx(predictor.model, str(tmp_path / "model.onnx"))
        expected = predictor.logits(TEXTS)
        got = predict_logits(
            OnnxClassifier(str(tmp_path / "model.onnx")),
            predictor.loader(TEXTS),
            torch.device("cpu"),
        )
        assert np.abs(got - expected).max() <= (INT8_TOLERANCE if int8 else 1e-4)


def forge(folder, name, write, seal=False):
    """Replace folder/name by what write(path) writes and record its hash in export.json, as
    someone handing out a folder could: the hash alone must not make a file trusted. seal=True
    also seals it with this machine's key, as only this machine's export.py could: the checks
    behind the seal still hold."""
    write(str(folder / name))
    record = json.loads((folder / "export.json").read_text())
    digest = record["onnx"][name]["sha256"] = sha256_of(folder / name)
    if seal:
        record["onnx"][name]["seal"] = onnx_seal(digest, record["weights_sha256"])
    (folder / "export.json").write_text(json.dumps(record))


def endless_loop(path):
    """ONNX's own operators only: a Loop of 2^62 trips (a graph export.py never writes)."""
    from onnx import TensorProto, helper

    trips = helper.make_tensor("trips", TensorProto.INT64, [], [2**62])
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, [])],
    )
    node = helper.make_node("Loop", ["trips", ""], [], body=body)
    model = onnx_model(node, weight=trips)
    model.graph.node.append(
        helper.make_node(
            "Constant",
            [],
            ["logits"],
            value=helper.make_tensor("zeros", TensorProto.FLOAT, [1, 2], [0.0, 0.0]),
        )
    )
    onnx.save(model, path)


def onnx_model(node, extra_opsets=(), weight=None):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "t"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "t"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 2])],
        initializer=[weight] if weight is not None else [],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), *extra_opsets])


def custom_operator(path):
    from onnx import helper

    node = helper.make_node("ReadFiles", ["input_ids"], ["logits"], domain="evil.ops")
    onnx.save(onnx_model(node, [helper.make_opsetid("evil.ops", 1)]), path)


def data_outside(path):
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [2], [0.0, 0.0])
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value="../../../etc/passwd")
    onnx.save(onnx_model(helper.make_node("Identity", ["w"], ["logits"]), weight=weight), path)


def test_export_times_int8_first_and_stops_where_it_is_slower(exported, tmp_path):
    """--int8 auto on the CPU at hand: int8 and float32 timed on a few texts first; where int8
    is slower it is refused in one line naming the CPU and never run over the whole file."""
    folder = tmp_path / "checkpoint"
    shutil.copytree(exported[0], folder)
    result = run("export.py", "--model_dir", folder, "--file", exported[1])
    record = json.loads((folder / "export.json").read_text())
    check, here = record["int8"], cpu_kind()
    assert record["cpu"] == here and check["speedup"] > 0 and check["float32"] > 0.6
    # the ONNX files --onnx wrote for these weights stay usable after a plain export
    assert record["onnx"] == json.loads((exported[0] / "export.json").read_text())["onnx"]
    assert Predictor(str(folder), onnx=True).predict(["재밌다"])[0]["label"] in ("부정", "긍정")
    if check["speedup"] < 1:
        assert "int8" not in check and f"on this CPU ({cpu_name(here)})" in check["refused"]
        assert check["refused"] in result.stderr
        with pytest.raises(ModelError, match="--quantize int8: int8 is .*x slower than float32"):
            Predictor(str(folder), quantize="int8")
    else:
        assert "refused" not in check and 100 * abs(check["float32"] - check["int8"]) <= 0.5


def test_int8_speed_is_decided_on_the_cpu_at_hand(exported, tmp_path, monkeypatch):
    """The record's speed on the CPU kind it names; on another kind a small int8 product timed
    here decides (a CPU without VNNI simulated by its timing)."""
    folder = tmp_path / "checkpoint"
    shutil.copytree(exported[0], folder)
    here = cpu_kind()
    edit_record(lambda r: r["int8"].update(keep_slower=False, speedup=0.5))(folder)
    monkeypatch.setattr(inference, "int8_speedup", lambda: pytest.fail("timed on its own CPU"))
    with pytest.raises(
        ModelError, match=rf"2.0x slower than float32 on this CPU \({here['capability']}"
    ):
        Predictor(str(folder), quantize="int8")
    other = {"capability": "AVX2", "vnni": False, "amx": False}
    if here == other:
        other = {"capability": "AVX512", "vnni": True, "amx": True}
    edit_record(lambda r: (r.update(cpu=other), r["int8"].update(speedup=3.0)))(folder)
    monkeypatch.setattr(inference, "int8_speedup", lambda: 0.25)  # int8 4x slower here
    with pytest.raises(ModelError, match="int8 is 4.0x slower than float32 on this CPU"):
        Predictor(str(folder), quantize="int8")
    monkeypatch.setattr(inference, "int8_speedup", lambda: 1.5)
    assert Predictor(str(folder), quantize="int8").predict(["재밌다"])[0]["label"] in (
        "부정",
        "긍정",
    )
    monkeypatch.undo()
    assert 0 < inference.int8_speedup() < float("inf")  # the real timing, a few ms


def edit_record(change):
    def edit(folder):
        record = json.loads((folder / "export.json").read_text())
        change(record)
        (folder / "export.json").write_text(json.dumps(record))

    return edit


REFUSED = {
    "no export record": ([], lambda f: os.remove(f / "export.json"), "has not been exported"),
    "no export record, int8": (
        ["--quantize", "int8"],
        lambda f: os.remove(f / "export.json"),
        "--quantize int8: ",
    ),
    "record of other weights": (
        [],
        edit_record(lambda r: r.update(weights_sha256="0" * 64)),
        "written for other weights",
    ),
    "another ONNX file": (
        [],
        lambda f: shutil.copyfile(f / "model-int8.onnx", f / "model.onnx"),
        "is not the file export.py wrote",
    ),
    "ONNX file removed from the record": (
        [],
        edit_record(lambda r: r["onnx"].pop("model.onnx")),
        "export.py wrote no model.onnx",
    ),
    "custom operator": (
        [],
        lambda f: forge(f, "model.onnx", custom_operator, seal=True),
        "uses operators outside ONNX's own (evil.ops)",
    ),
    "external data outside the folder": (
        [],
        lambda f: forge(f, "model.onnx", data_outside, seal=True),
        "has its data outside the folder",
    ),
    "not ONNX": (
        [],
        lambda f: forge(f, "model.onnx", lambda p: open(p, "wb").write(b"\x0fzz"), seal=True),
        "not an ONNX model",
    ),
    "a forged record, its hashes recomputed": (
        [],
        lambda f: forge(f, "model.onnx", endless_loop),
        "was not exported on this machine",
    ),
    "a record sealed on another machine": (
        [],
        edit_record(lambda r: r["onnx"]["model.onnx"].update(seal="0" * 64)),
        "was not exported on this machine",
    ),
    "int8 costs too much": (
        ["--quantize", "int8"],
        edit_record(lambda r: r["int8"].update(float32=0.9, int8=0.8)),
        "int8 costs this model 10.00 points",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_predict_refuses_what_export_py_did_not_write_for_these_weights(exported, tmp_path, case):
    flags, spoil, message = REFUSED[case]
    folder = tmp_path / "checkpoint"
    shutil.copytree(exported[0], folder)
    spoil(folder)
    onnx_flag = [] if flags == ["--quantize", "int8"] and "int8" in case else ["--onnx"]
    result = run("predict.py", "--model_dir", folder, *onnx_flag, *flags, "재밌다", check=False)
    assert result.returncode == 2 and not result.stdout
    assert message in result.stderr and "Traceback" not in result.stderr


def test_export_refuses_the_lstm_head_and_unlabelled_files(exported, tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(exported[0], folder)
    info = json.loads((folder / "classifier.json").read_text())
    (folder / "classifier.json").write_text(json.dumps({**info, "head_name": "lstm"}))
    result = run("export.py", "--model_dir", folder, "--file", exported[1], "--onnx", check=False)
    assert result.returncode == 2 and "the lstm head runs packed sequences" in result.stderr
    texts = tmp_path / "texts.txt"
    texts.write_text("재밌다\n별로\n", encoding="utf-8")
    result = run("export.py", "--model_dir", exported[0], "--file", texts, check=False)
    assert result.returncode == 2 and "no labelled texts" in result.stderr
    assert "Traceback" not in result.stderr


def test_no_warning_reaches_users(exported):
    """torch.ao.quantization warns of its removal; int8 and ONNX here print answers only."""
    for flags in (["--quantize", "int8"], ["--onnx"], ["--onnx", "--quantize", "int8"]):
        result = run("predict.py", "--model_dir", exported[0], *flags, "재밌다")
        assert "Warning" not in result.stderr and result.stdout.count("\n") == 1
