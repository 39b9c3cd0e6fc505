"""Check a trained classifier in int8 and write it as ONNX, for serving on CPUs.

    python export.py --model_dir checkpoint --file held_out.tsv         # then --quantize int8
    python export.py --model_dir checkpoint --file held_out.tsv --onnx  # then --onnx

--file holds labelled texts the model did not train on (its validation or test split). The model
scores them in float32 and in int8; `predict.py --quantize int8` is allowed only when int8 costs
at most 0.5 points (of accuracy; of macro-F1 when multi-label). With --onnx, model.onnx (and
model-int8.onnx when int8 is allowed) are written for batches of any size and length, run with
onnxruntime on the same texts, and kept only when their logits equal PyTorch's within 1e-4.
export.json records this run with the hash of model.safetensors: predict.py trusts nothing in it
for other weights. Any ONNX runtime can load the files; they need none of this repository's code.
"""
import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from _1_data import label_ids, stream_texts, trained_label_rules
from common import ArgumentParser, DataError, ModelError, run_script, sha256_of, write_atomic
from folders import read_info
from inference import (EXPORT_RECORD, INT8_MAX_LOSS, INT8_TOLERANCE, ONNX_FILES, OnnxClassifier,
                       predict_logits, quantize_int8)
from metrics import score_logits
from predict import Predictor

# largest difference of a logit between onnxruntime and PyTorch. In int8 a difference of 1e-6
# in a float32 part (a LayerNorm, a softmax) may move a value across a rounding boundary, so int8
# is held to INT8_TOLERANCE, as a text alone and in a batch are.
ONNX_TOLERANCE = {"float32": 1e-4, "int8": INT8_TOLERANCE}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", default="checkpoint",
                   help="checkpoint folder written by _3_main.py")
    p.add_argument("--file", required=True,
                   help="labelled TSV/CSV/JSONL the model did not train on")
    p.add_argument("--text_column", help="text column of --file (default: document, text, ...)")
    p.add_argument("--label_column", help="label column of --file (default: label, labels, ...)")
    p.add_argument("--columns", help="column names of a --file without a header, e.g. text,labels")
    p.add_argument("--onnx", action="store_true",
                   help="also write model.onnx and, when int8 is allowed, model-int8.onnx")
    p.add_argument("--batch_size", type=int, default=0,
                   help="texts per batch (default: the checkpoint's test_batch_size)")
    args = p.parse_args(argv)
    if args.batch_size < 0:
        p.error("--batch_size must be positive")
    return args


def labelled_texts(args, info):
    """(texts, label ids or multi-hot rows) of --file; one line when it has no labels."""
    # the --file's labels are read the way the training data's were (trained_label_rules)
    label_sep, by_id = trained_label_rules(info["args"])
    columns = args.columns.split(",") if args.columns else None
    examples = list(stream_texts(args.file, args.text_column, args.label_column, columns,
                                 label_sep))
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
    """The largest logit difference between onnxruntime and PyTorch on texts; the file is removed
    and one line raised when it passes tolerance."""
    logits = predict_logits(OnnxClassifier(path), predictor.loader(texts), torch.device("cpu"))
    diff = float(np.abs(logits - expected).max())
    if not diff <= tolerance:
        # A file that computes other numbers than the checkpoint is not kept: predict.py would trust
        # it
        os.remove(path)
        raise ModelError(f"{path}: onnxruntime's logits differ from PyTorch's by {diff:.2e} "
                         f"(more than {tolerance}); not kept")
    return diff


def main(argv=None):
    args = parse_args(argv)
    info = read_info(args.model_dir)
    # Refused before any work: the export would run for minutes and then fail the check
    if args.onnx and info["head_name"] == "lstm":
        raise ModelError("--onnx: the lstm head runs packed sequences, which ONNX does not export "
                         "with equal outputs; serve it with predict.py")
    texts, labels = labelled_texts(args, info)
    weights = os.path.join(args.model_dir, "model.safetensors")
    # The record is bound to these weights: a later epoch's model.safetensors is not covered by it
    record = {"weights_sha256": sha256_of(weights), "onnx": {}}
    float32 = Predictor(args.model_dir, "cpu", args.batch_size)
    int8 = Predictor(args.model_dir, "cpu", args.batch_size)
    quantize_int8(int8.model)
    metric = "macro_f1" if float32.multi_label else "accuracy"
    logits = {"float32": float32.logits(texts), "int8": int8.logits(texts)}
    scores = {precision: float(score_logits(x, labels, float32.names, float32.threshold)[metric])
              for precision, x in logits.items()}
    record["int8"] = {"file": args.file, "texts": len(texts), "metric": metric, **scores}
    # Points of the metric: int8 may cost at most INT8_MAX_LOSS of them on texts the model did not
    # train on
    allowed = 100 * (scores["float32"] - scores["int8"]) <= INT8_MAX_LOSS
    print(f"{args.file}: {len(texts)} texts, {metric} float32 {scores['float32']:.4f}, int8 "
          f"{scores['int8']:.4f}: --quantize int8 " + ("allowed" if allowed else
                                                       f"refused (costs more than "
                                                       f"{INT8_MAX_LOSS} points)"), file=sys.stderr)
    if args.onnx:
        for precision, predictor in (("float32", float32), ("int8", int8))[:1 + allowed]:
            path = os.path.join(args.model_dir, ONNX_FILES[precision])
            export_onnx(predictor.model, path)
            diff = check_onnx(path, predictor, texts, logits[precision],
                              ONNX_TOLERANCE[precision])
            record["onnx"][ONNX_FILES[precision]] = {"sha256": sha256_of(path),
                                                     "max_abs_diff": diff}
            print(f"wrote {path} (onnxruntime within {diff:.1e} of PyTorch on {len(texts)} "
                  f"texts)", file=sys.stderr)
    write_atomic(os.path.join(args.model_dir, EXPORT_RECORD), lambda p: Path(p).write_text(
        json.dumps(record, ensure_ascii=False, indent=1), encoding="utf-8"))


if __name__ == "__main__":
    run_script(main)
