"""Classify texts with a checkpoint folder written by _3_main.py.

    python predict.py "이 영화 정말 재밌다" "최악"    # label and probability per sentence
    python predict.py --json "이 영화 정말 재밌다"    # one JSON object per sentence
    python predict.py --file reviews.tsv --output out.jsonl  # a file; scored when it has labels
    cat reviews.txt | python predict.py -                    # one text per input line
    python predict.py                                        # on a terminal: asks for sentences
    python predict.py --serve                                # a web page at http://127.0.0.1:8000
    python predict.py --quantize int8 --serve                # int8 (export.py checks it first)
    python predict.py --onnx "최악"                           # model.onnx, which export.py wrote
"""
import argparse
import gc
import itertools
import json
import os
import sys

import numpy as np
import torch

from tqdm import tqdm

from _1_data import (BERTDataset, column_names, decoded_lines, encode_texts, file_examples,
                     label_ids, length_sorted_batches, make_loader, nonblank_lines, pad_multiple,
                     text_encoding, trained_label_rules)
from checkpoint import load_checkpoint, load_onnx
from common import ArgumentParser, DataError, printable, run_script, write_atomic
from folders import read_info
from inference import (PRECISIONS, auto_precision, check_int8, choose_device, predict_logits,
                       quantize_int8)
from metrics import save_figure, score_logits

PROMPT = "문장을 입력해 주세요: "
CHUNK = 10_000  # texts read, predicted and written at a time: memory stays bounded


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("sentences", nargs="*", help="texts to classify; '-' or none reads standard input")
    a("--model_dir", default="checkpoint", help="checkpoint folder written by _3_main.py")
    a("--file", help="TSV/CSV/JSONL with a text column (scored when it has labels), or plain "
      "text, one per line")
    a("--text_column", help="text column of --file (default: document, text, sentence, ...)")
    a("--label_column", help="label column of --file (default: label, labels, ...)")
    a("--columns", type=column_names, help="column names of a --file without a header, e.g. "
      "text,labels (its first row is then data)")
    a("--encoding", default="utf-8", type=text_encoding,
      help="of --file and standard input (Korean Excel: cp949)")
    a("--data_labels", choices=["auto", "names", "line_numbers"], help="checkpoints trained with "
      "--label_file: the --file's labels are class names or line numbers of it (default: as in "
      "training)")
    a("--threshold", type=float, default=0.0, help="multi-label checkpoints: probability above "
      "which a label is predicted (default: the checkpoint's)")
    a("--output", help="write one JSON object per text to this .jsonl file")
    a("--json", action="store_true", help="print JSON lines: text label probability probs")
    a("--confusion", help="with a labelled --file: save the confusion matrix as this PNG")
    a("--batch_size", type=int, default=0,
      help="texts per batch (default: the checkpoint's test_batch_size)")
    a("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    a("--quantize", choices=["int8"], help="run the dense layers in int8 on the CPU (faster; "
      "export.py must have checked this model's accuracy in int8 first)")
    a("--onnx", action="store_true", help="run the model.onnx that export.py wrote "
      "(model-int8.onnx with --quantize int8) with onnxruntime, on the CPU")
    a("--serve", action="store_true", help="serve a web page and a JSON API (POST /api)")
    a("--host", default="127.0.0.1",
      help="address to serve on (0.0.0.0 exposes it to the network)")
    a("--port", type=int, default=8000, help="port to serve on (0: any free port)")
    args = p.parse_args(argv)
    if args.batch_size < 0:
        p.error("--batch_size must be positive")
    if not 0 <= args.threshold < 1:
        p.error(f"--threshold {args.threshold} is out of range (between 0 and 1)")
    if not 0 <= args.port <= 65535:
        p.error(f"--port {args.port} is not a port number (0 to 65535; 0: any free port)")
    if args.file and args.sentences:
        p.error("give sentences or --file, not both")
    if (args.quantize or args.onnx) and args.device == "cuda":
        p.error("--quantize and --onnx run on the CPU; leave out --device cuda")
    if args.confusion and not args.file:
        p.error("--confusion needs a labelled --file")
    if args.confusion and args.output and os.path.realpath(args.confusion) == os.path.realpath(
            args.output):
        p.error("--output and --confusion name the same file: the picture would replace the rows")
    # --serve answers requests until stopped: flags that score or print texts would be ignored
    given = [f for f, on in (("sentences", args.sentences), ("--file", args.file), ("--output",
             args.output), ("--json", args.json)) if on]
    if args.serve and given:
        p.error(f"--serve answers requests; leave out {', '.join(given)}")
    return args


class Predictor:
    """A checkpoint loaded once; texts in, rows of `text label probability probs` out (multi-label:
    `text labels probs`, labels listing those above the threshold with their probabilities)."""

    def __init__(self, model_dir, device="auto", batch_size=0, threshold=0.0, quantize=None,
                 onnx=False):
        # int8 and ONNX are CPU paths: a GPU runs float32 or half precision faster
        self.device = choose_device("cpu" if quantize or onnx else device)
        if quantize:
            # Before loading: export.py's record of int8 on held-out texts must show it costs at
            # most half a point, and is not slower on this CPU; without a record int8 is refused
            check_int8(model_dir, onnx)
        if onnx:
            self.model, self.tokenizer, self.info = load_onnx(model_dir, quantize or "float32")
        else:  # plain: no transformers import for BERT, RoBERTa and ELECTRA (seconds of start)
            self.model, self.tokenizer, self.info = load_checkpoint(model_dir, self.device,
                                                                    plain=True)
        if quantize and not onnx:
            quantize_int8(self.model)
        self.pad_id, self.names = self.info["pad_token_id"], self.info["label_names"]
        self.batch_size = batch_size or self.info["args"].get("test_batch_size", 64)
        self.multi_label = self.info["args"].get("problem") == "multi_label"
        self.threshold = threshold or self.info.get("threshold", 0.5)
        # on a GPU the precision training picks there (fp16 on a T4, bf16 from the A100 on);
        # float32 on the CPU
        self.dtype = PRECISIONS[auto_precision(self.device)[0]]

    def loader(self, texts, labels=None):
        args = self.info["args"]
        # Cut as training cut them (--max_len, --truncation): the model sees texts as it learned
        # them
        ids = encode_texts(self.tokenizer, texts, args["max_len"], args.get("truncation", "head"))
        dataset = BERTDataset(ids, labels)
        # Longest first and sorted: the least padding, and memory peaks in the first batch
        batches = length_sorted_batches(dataset.lengths, self.batch_size)
        return make_loader(dataset, batches, self.pad_id, pad_multiple=pad_multiple(self.device))

    def rows(self, texts, logits):
        # One label: softmax over the classes; several: a sigmoid per label, each against the
        # threshold
        logits = torch.from_numpy(logits)
        if not self.multi_label:
            return [{"text": text, "label": self.names[p.argmax()], "probability": float(p.max()),
                     "probs": {name: float(q) for name, q in zip(self.names, p)}}
                    for text, p in zip(texts, logits.softmax(-1).numpy())]
        return [{"text": text, "labels": [{"label": self.names[i], "probability": float(p[i])}
                                          for i in np.argsort(-p) if p[i] > self.threshold],
                 "probs": {name: float(q) for name, q in zip(self.names, p)}}
                for text, p in zip(texts, logits.sigmoid().numpy())]

    def logits(self, texts):
        return predict_logits(self.model, self.loader(texts), self.device, self.dtype)

    def predict(self, texts):
        # No texts, no model call: an empty batch has no shape to pad to
        return self.rows(texts, self.logits(texts)) if texts else []


def format_row(row, as_json):
    if as_json:
        # ensure_ascii=False: Korean as Korean, not \uXXXX escapes
        return json.dumps(row, ensure_ascii=False)
    # label names and texts came from input: printed so that they cannot move the cursor
    if "labels" in row:  # multi-label: "joy 0.9120, love 0.6312" ("-" when none is above)
        found = ", ".join(f"{printable(x['label'])} {x['probability']:.4f}" for x in row["labels"])
        return f"{found or '-'}\t{printable(row['text'])}"
    return f"{printable(row['label'])}\t{row['probability']:.4f}\t{printable(row['text'])}"


def print_confusion(matrix, names):
    names = [printable(name) for name in names]
    width = max(6, *(len(n) * 2 for n in names))  # Hangul is two columns wide on a terminal
    header = "true \\ predicted".ljust(width) + "".join(n.rjust(width) for n in names)
    print(header, file=sys.stderr)
    for name, row in zip(names, matrix):
        print(name.ljust(width) + "".join(str(v).rjust(width) for v in row), file=sys.stderr)


def save_confusion_png(matrix, names, path):
    def draw(fig):
        ax = fig.add_subplot()
        ax.imshow(matrix, cmap="Blues")
        ax.set(xticks=range(len(names)), yticks=range(len(names)), xticklabels=names,
               yticklabels=names, xlabel="predicted", ylabel="true", title="confusion matrix")
        for (i, j), v in np.ndenumerate(matrix):
            # White on the dark cells, black on the light ones
            ax.text(j, i, str(v), ha="center", va="center",
                    color="white" if v > matrix.max() / 2 else "black")
    save_figure(path, draw, size=(1.2 * len(names) + 2.5, 1.2 * len(names) + 2))


def ask_loop(predictor, as_json):
    """The notebook's prompt: one sentence at a time until an empty line or end of input."""
    while True:
        try:
            # As the notebooks asked: one sentence at a time, until an empty line or Ctrl-D
            text = input(PROMPT)
        except EOFError:
            print()
            return
        if not text.strip():
            return
        print(format_row(predictor.predict([text])[0], as_json), flush=True)


def check_outputs(args):
    """Before any work: --output and --confusion go into existing folders and never over the
    input file."""
    for flag in ("output", "confusion"):
        path = getattr(args, flag)
        if not path:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise DataError(f"--{flag} {path}: cannot write in {folder} (missing or read-only)")
        # Writing over the file being read would lose it
        if args.file and os.path.exists(path) and os.path.samefile(path, args.file):
            raise DataError(f"--{flag} {path} is the input --file; write somewhere else")


def not_empty(examples, where):
    """examples as they come, or one line when there are none: no output at all would look like
    a model that said nothing."""
    first = next(examples, None)
    if first is None:
        raise DataError(f"{where}: no texts")
    return itertools.chain([first], examples)


def sentences_given(args):
    """The texts of the command line, or of standard input when there are none or '-'."""
    if args.sentences not in ([], ["-"]):
        for i, text in enumerate(args.sentences, 1):
            # A command-line argument that is not UTF-8 reaches Python as these surrogates
            if any("\udc80" <= ch <= "\udcff" for ch in text):  # how Python keeps stray bytes
                raise DataError(f"sentence {i} on the command line is not UTF-8 text")
        return args.sentences
    return nonblank_lines("standard input", decoded_lines("standard input", sys.stdin.buffer,
                                                          args.encoding))


def classify_stream(predictor, examples, out, as_json, where, by_id=None):
    """Predict CHUNK texts at a time, writing rows to out as they come; (logits, label ids or
    multi-hot rows) of all the texts when they are labelled, for scoring (by_id: label_ids')."""
    all_logits, labels = [], []
    with tqdm(unit=" texts", disable=None, file=sys.stderr, mininterval=1) as bar:
        while chunk := list(itertools.islice(examples, CHUNK)):
            texts = [text for text, _ in chunk]
            logits = predictor.logits(texts)
            out.writelines(format_row(row, as_json) + "\n"
                           for row in predictor.rows(texts, logits))
            # Rows appear as each chunk is done: a pipe downstream starts at once
            out.flush()
            # Labels are gathered only for scoring; an unlabelled file keeps no more than one chunk
            if chunk[0][1] is not None:  # a labelled file: every row has a label
                labels.append(np.asarray(label_ids(chunk, predictor.info["labels"], where,
                                                   by_id)))
                all_logits.append(logits)
            bar.update(len(chunk))
    if not all_logits:
        return None, None
    return np.concatenate(all_logits), np.concatenate(labels)


def classify_to_file(path, predictor, examples, where, by_id):
    """classify_stream into a JSONL file that takes path's name only once it is complete."""
    result = []

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as out:
            result.extend(classify_stream(predictor, examples, out, True, where, by_id))
    # --output takes its name only when every row is written: a kill leaves the old file
    write_atomic(path, write)
    return result


def report_score(args, predictor, logits, labels):
    """Accuracy, F1, loss, per-class report and (single-label) the confusion matrix, computed as
    _3_main.py computes them."""
    result = score_logits(logits, labels, predictor.names, predictor.threshold)
    print(f"{args.file}: {len(labels)} texts, " + ", ".join(
        f"{k} {result[k]:.4f}" for k in ("accuracy", "macro_f1", "micro_f1", "threshold", "loss")
        if k in result), file=sys.stderr)
    print_per_class(result["per_class"])
    if predictor.multi_label:
        return
    n = len(predictor.names)
    # Row i, column j: the texts of class i predicted as class j (each pair counted by its index)
    matrix = np.bincount(labels * n + result["probs"].argmax(-1), minlength=n * n).reshape(n, n)
    print_confusion(matrix, predictor.names)
    if args.confusion:
        save_confusion_png(matrix, predictor.names, args.confusion)


def print_per_class(report):
    report = {printable(name): r for name, r in report.items()}
    # A column as wide as the longest name on a terminal
    width = max(8, *(len(name) * 2 for name in report))  # Hangul is two columns wide
    print("".ljust(width) + "precision    recall        f1   support", file=sys.stderr)
    for name, r in report.items():
        print(name.ljust(width) + "".join(f"{r[k]:10.4f}" for k in ("precision", "recall", "f1"))
              + f"{r['support']:10d}", file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    check_outputs(args)
    examples = None
    # A wrong column name is said in a second, before the model takes several to load
    if args.file:  # the header and first row before the model: bad input fails fast
        label_sep = trained_label_rules(read_info(args.model_dir)["args"])[0]
        if args.confusion and label_sep:
            raise DataError(f"--confusion: {args.model_dir} is multi-label; it gets a report per "
                            f"label instead")
        examples = not_empty(file_examples(args, label_sep), args.file)
    predictor = Predictor(args.model_dir, args.device, args.batch_size, args.threshold,
                          args.quantize, args.onnx)
    if args.serve:
        # Imported only for --serve: flask and waitress cost start-up time otherwise
        from serve import serve

        return serve(predictor, args.host, args.port)
    if examples is None:
        # On a terminal with no sentences: ask for them; from a pipe: read its lines
        if not args.sentences and sys.stdin.isatty():
            return ask_loop(predictor, args.json)
        examples = not_empty(((text, None) for text in sentences_given(args)), "standard input")
    where = args.file or "standard input"
    # labels of a scored file are read as training read its own (trained_label_rules)
    by_id = trained_label_rules(predictor.info["args"], args.data_labels)[1]
    if args.output:
        logits, labels = classify_to_file(args.output, predictor, examples, where, by_id)
    else:
        logits, labels = classify_stream(predictor, examples, sys.stdout, args.json, where,
                                         by_id)
    if logits is not None:
        report_score(args, predictor, logits, labels)
    elif args.confusion:
        raise DataError(f"{args.file}: --confusion needs a label column")


if __name__ == "__main__":
    run_script(main)
    gc.freeze()  # the final collection would walk all of torch's objects: 0.5 s of exit
