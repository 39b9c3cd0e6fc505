"""Check a trained classifier in int8 and write it as ONNX, for serving on CPUs.

    python export.py --model_dir checkpoint --file held_out.tsv         # then --quantize int8
    python export.py --model_dir checkpoint --file held_out.tsv --onnx  # then --onnx

--file holds labelled texts the model did not train on (its validation or test split). First
int8 and float32 are timed on 64 of them: where int8 is slower on this CPU (PyTorch's int8 product
without VNNI: tens of times), it stops there and int8 is refused (--int8 always goes on). Else
the model scores them in float32 and in int8; `predict.py --quantize int8` is allowed only when
int8 costs at most 0.5 points (of accuracy; of macro-F1 when multi-label). With --onnx,
model.onnx (and model-int8.onnx unless int8 costs more) are written for batches of any size and
length, run with onnxruntime on the same texts, kept only when their logits equal PyTorch's (1e-4
in float32), and the int8 file is scored and timed on its own. export.json records this run with
the hash of model.safetensors (predict.py trusts nothing in it for other weights) and the CPU it
timed: on another kind of CPU predict.py times int8 again. Any ONNX runtime can load the files;
they need none of this repository's code.
"""
import argparse
import json
import logging
import os
import sys
import time
import warnings
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch

from _1_data import column_names, file_examples, label_ids, text_encoding, trained_label_rules
from common import (ArgumentParser, DataError, ModelError, read_json, run_script, sha256_of,
                    write_atomic)
from folders import read_info
from inference import (EXPORT_RECORD, INT8_MAX_LOSS, INT8_TOLERANCE, ONNX_FILES, OnnxClassifier,
                       cpu_kind, onnx_seal, predict_logits, quantize_int8, slower_line)
from metrics import score_logits
from predict import Predictor

# largest difference of a logit between onnxruntime and PyTorch. In int8 a difference of 1e-6
# in a float32 part (a LayerNorm, a softmax) may move a value across a rounding boundary, so int8
# is held to INT8_TOLERANCE, as a text alone and in a batch are.
ONNX_TOLERANCE = {"float32": 1e-4, "int8": INT8_TOLERANCE}
SPEED_TEXTS = 64  # texts int8 and float32 are timed on before int8 runs over the whole --file


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model_dir", default="checkpoint", help="checkpoint folder written by _3_main.py")
    a("--file", required=True, help="labelled TSV/CSV/JSONL the model did not train on")
    a("--text_column", help="text column of --file (default: document, text, ...)")
    a("--label_column", help="label column of --file (default: label, labels, ...)")
    a("--columns", type=column_names,
      help="column names of a --file without a header, e.g. text,labels")
    a("--encoding", default="utf-8", type=text_encoding, help="of --file (Korean Excel: cp949)")
    a("--onnx", action="store_true",
      help="also write model.onnx and, when int8 is allowed, model-int8.onnx")
    a("--int8", choices=["auto", "always"], default="auto", help="auto: int8 is scored (and "
      "allowed) only where it is faster than float32 on this CPU; always: also where it is "
      "slower (to serve on another CPU)")
    a("--batch_size", type=int, default=0,
      help="texts per batch (default: the checkpoint's test_batch_size)")
    args = p.parse_args(argv)
    if args.batch_size < 0:
        p.error("--batch_size must be positive")
    return args


def labelled_texts(args, info):
    """(texts, label ids or multi-hot rows) of --file; one line when it has no labels."""
    # the --file's labels are read the way the training data's were (trained_label_rules)
    label_sep, by_id = trained_label_rules(info["args"])
    examples = list(file_examples(args, label_sep))
    if not examples or examples[0][1] is None:
        raise DataError(f"{args.file}: no labelled texts (export.py scores the model on them)")
    return [text for text, _ in examples], np.asarray(label_ids(examples, info["labels"],
                                                                args.file, by_id))


def matmul_integer(a, b):
    """Int8Linear's torch._int_mm(a, b) (int8 x int8 -> int32) in ONNX: MatMulInteger, with the
    rows shifted to uint8 around a zero point of 128 (the very same products), because
    onnxruntime's fast int8 kernels take uint8 x int8 (int8 x int8 ran 4.5x slower here; uint8 x
    uint8, exact on every CPU too, 7.5x slower on a VNNI CPU than uint8 x int8 with Int8Linear's
    7-bit weights, which cannot saturate)."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    def constant(value, dtype):
        return op.Constant(value=ir.tensor(np.array(value, dtype=dtype)))
    # a + 128 in int32 first: in int8 it would wrap around
    shifted = op.Add(op.Cast(a, to=ir.DataType.INT32), constant(128, np.int32))
    return op.MatMulInteger(op.Cast(shifted, to=ir.DataType.UINT8), b, constant(128, np.uint8))


def export_onnx(model, path):
    """model (float32 or int8) as one ONNX file for batches of any size and length."""
    # torch.onnx lists the torchvision operators it skips: nothing a classifier uses
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

    ids = torch.ones(2, 16, dtype=torch.long)  # an example batch: the second text is shorter
    mask = torch.ones_like(ids)
    # Padding in the example, so the exported graph keeps the masking path of the heads
    mask[1, 9:] = 0
    # Batch size and length stay symbolic: one file for batches of any shape
    any_size = {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC}
    int_mm = {torch.ops.aten._int_mm.default: matmul_integer}
    with warnings.catch_warnings():  # torch.onnx's own deprecation notes, not the user's
        warnings.simplefilter("ignore", FutureWarning)
        write_atomic(path, lambda tmp: torch.onnx.export(
            model, (ids, mask), tmp, input_names=["input_ids", "attention_mask"],
            output_names=["logits"], dynamo=True, dynamic_shapes=(any_size, any_size),
            external_data=False, custom_translation_table=int_mm, verbose=False))


def check_onnx(path, predictor, texts, expected, tolerance):
    """onnxruntime's logits of texts, and their largest difference from PyTorch's (expected holds
    the logits of the first texts); the file is removed and one line raised past tolerance."""
    logits = predict_logits(OnnxClassifier(path), predictor.loader(texts), torch.device("cpu"))
    diff = float(np.abs(logits[:len(expected)] - expected).max())
    if not diff <= tolerance:
        # A file that computes other numbers than the checkpoint is not kept: predict.py would
        # trust it
        os.remove(path)
        raise ModelError(f"{path}: onnxruntime's logits differ from PyTorch's by {diff:.2e} "
                         f"(more than {tolerance}); not kept")
    return logits, diff


def seconds(model, loader):
    """The best of 3 passes of the model over the loader's batches (after a warm-up pass)."""
    times = []
    for _ in range(4):
        start = time.perf_counter()
        predict_logits(model, loader, torch.device("cpu"))
        times.append(time.perf_counter() - start)
    return min(times[1:])


def main(argv=None):
    args = parse_args(argv)
    info = read_info(args.model_dir)
    # Refused before any work: the export would run for minutes and then fail the check
    if args.onnx and info["head_name"] == "lstm":
        raise ModelError("--onnx: the lstm head runs packed sequences, which ONNX does not export "
                         "with equal outputs; serve it with predict.py")
    missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if not find_spec(m)]
    if args.onnx and missing:
        raise ModelError(f"--onnx needs {', '.join(missing)}: pip install {' '.join(missing)}")
    texts, labels = labelled_texts(args, info)
    weights = os.path.join(args.model_dir, "model.safetensors")
    # The record is bound to these weights (a later epoch's model.safetensors is not covered by
    # it) and names the CPU it measured speed on: on another kind predict.py times int8 again
    cpu = cpu_kind()
    record = {"weights_sha256": sha256_of(weights), "cpu": cpu, "onnx": {}}
    float32 = Predictor(args.model_dir, "cpu", args.batch_size)
    int8 = Predictor(args.model_dir, "cpu", args.batch_size)
    quantize_int8(int8.model)
    metric = "macro_f1" if float32.multi_label else "accuracy"

    def score(logits):
        return float(score_logits(logits, labels, float32.names, float32.threshold)[metric])
    # Speed first, on a few texts: where int8 is slower (CPUs without VNNI), it is not run over
    # the whole file, which would take many times float32's minutes
    sample = float32.loader(texts[:SPEED_TEXTS])
    speedup = seconds(float32.model, sample) / seconds(int8.model, sample)
    logits = {"float32": float32.logits(texts)}
    check = record["int8"] = {"file": args.file, "texts": len(texts), "metric": metric,
                              "float32": score(logits["float32"]), "speedup": speedup}
    if speedup < 1 and args.int8 == "auto":
        check["refused"] = slower_line(speedup, cpu)
        verdict = f"{check['refused']}: --quantize int8 refused (--int8 always scores it)"
        logits["int8"] = int8.logits(texts[:SPEED_TEXTS])  # the int8 ONNX file's reference
    else:
        logits["int8"] = int8.logits(texts)
        check.update(int8=score(logits["int8"]), keep_slower=args.int8 == "always")
        allowed = 100 * (check["float32"] - check["int8"]) <= INT8_MAX_LOSS
        verdict = (f"int8 {check['int8']:.4f}, {speedup:.2f}x float32's speed: --quantize int8 "
                   + ("allowed" if allowed else f"refused (costs more than {INT8_MAX_LOSS} "
                                                  "points)"))
    print(f"{args.file}: {len(texts)} texts, {metric} float32 {check['float32']:.4f}, {verdict}",
          file=sys.stderr)
    if args.onnx:
        export_both(args, texts, record, logits, (float32, int8), score)
    else:  # the ONNX files an earlier --onnx wrote for these very weights stay usable
        record["onnx"] = earlier_onnx(args.model_dir, record["weights_sha256"])
    write_atomic(os.path.join(args.model_dir, EXPORT_RECORD), lambda p: Path(p).write_text(
        json.dumps(record, ensure_ascii=False, indent=1), encoding="utf-8"))


def earlier_onnx(folder, weights_sha256):
    """The ONNX entries of the export.json already in folder, if written for these weights."""
    try:
        old = read_json(os.path.join(folder, EXPORT_RECORD))
    except (OSError, ValueError, RecursionError):
        return {}
    same = isinstance(old, dict) and old.get("weights_sha256") == weights_sha256
    return old["onnx"] if same and isinstance(old.get("onnx"), dict) else {}


def export_both(args, texts, record, logits, predictors, score):
    """model.onnx, and model-int8.onnx unless int8 costs too much accuracy, each checked against
    PyTorch's logits; the int8 file is scored and timed against model.onnx on its own (where
    PyTorch's int8 is slow, onnxruntime's kernels may not be)."""
    check, files = record["int8"], {}
    for precision, predictor in zip(ONNX_FILES, predictors):
        # int8 that costs too much in PyTorch gets no file (int8 too slow to score there does)
        if precision == "int8" and not 100 * (check["float32"] - check.get("int8", -1)) <= (
                INT8_MAX_LOSS) and "refused" not in check:
            break
        path = os.path.join(args.model_dir, ONNX_FILES[precision])
        export_onnx(predictor.model, path)
        ran, diff = check_onnx(path, predictor, texts, logits[precision],
                               ONNX_TOLERANCE[precision])
        files[precision] = OnnxClassifier(path)
        digest = sha256_of(path)
        entry = record["onnx"][ONNX_FILES[precision]] = {
            "sha256": digest, "seal": onnx_seal(digest, record["weights_sha256"]),
            "max_abs_diff": diff}
        if precision == "int8":
            sample = predictor.loader(texts[:SPEED_TEXTS])
            entry.update(int8=score(ran), speedup=seconds(files["float32"], sample)
                         / seconds(files["int8"], sample))
        print(f"wrote {path} (onnxruntime within {diff:.1e} of PyTorch on "
              f"{len(logits[precision])} texts)", file=sys.stderr)


if __name__ == "__main__":
    run_script(main)
