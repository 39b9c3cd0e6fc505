"""Classify texts with a checkpoint folder written by _3_main.py.

    python predict.py "이 영화 정말 재밌다" "최악"    # label and probability per sentence
    python predict.py --json "이 영화 정말 재밌다"    # one JSON object per sentence
    python predict.py --file reviews.tsv --output out.jsonl  # a file; scored when it has labels
    cat reviews.txt | python predict.py -                    # one text per input line
    python predict.py                                        # on a terminal: asks for sentences
    python predict.py --serve                                # a web page at http://127.0.0.1:8000
"""
import argparse
import gc
import json
import sys

import numpy as np
import torch

from _1_data import (TEXT_COLUMNS, ArgumentParser, BERTDataset, DataError, encode_texts, label_ids,
                     length_sorted_batches, make_loader, open_text, read_table, table_format,
                     write_atomic)
from _2_model import (ModelError, choose_device, load_checkpoint, predict_logits, save_figure,
                      score_logits)

PROMPT = "문장을 입력해 주세요: "


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sentences", nargs="*",
                   help="texts to classify; '-' or none reads standard input")
    p.add_argument("--model_dir", default="checkpoint",
                   help="checkpoint folder written by _3_main.py")
    p.add_argument("--file", help="TSV/CSV/JSONL with a text column (scored when it has "
                   "labels), or plain text, one per line")
    p.add_argument("--text_column",
                   help="text column of --file (default: document, text, sentence, ...)")
    p.add_argument("--label_column", help="label column of --file (default: label, labels, ...)")
    p.add_argument("--output", help="write one JSON object per text to this .jsonl file")
    p.add_argument("--json", action="store_true",
                   help="print JSON lines: text label probability probs")
    p.add_argument("--confusion",
                   help="with a labelled --file: save the confusion matrix as this PNG")
    p.add_argument("--batch_size", type=int, default=0,
                   help="texts per batch (default: the checkpoint's test_batch_size)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda when available")
    p.add_argument("--serve", action="store_true",
                   help="serve a web page and a JSON API (POST /api)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to serve on (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000, help="port to serve on (0: any free port)")
    args = p.parse_args(argv)
    if args.batch_size < 0:
        p.error("--batch_size must be positive")
    if args.file and args.sentences:
        p.error("give sentences or --file, not both")
    if args.confusion and not args.file:
        p.error("--confusion needs a labelled --file")
    return args


class Predictor:
    """A checkpoint loaded once; texts in, rows of `text label probability probs` out."""

    def __init__(self, model_dir, device="auto", batch_size=0):
        self.device = choose_device(device)
        # plain: no transformers import for BERT, RoBERTa and ELECTRA encoders (seconds of start)
        self.model, self.tokenizer, self.info = load_checkpoint(model_dir, self.device, plain=True)
        self.pad_id, self.names = self.info["pad_token_id"], self.info["label_names"]
        self.batch_size = batch_size or self.info["args"]["test_batch_size"]

    def loader(self, texts, labels=None):
        ids = encode_texts(self.tokenizer, texts, self.info["args"]["max_len"])
        dataset = BERTDataset(ids, labels)
        batches = length_sorted_batches(dataset.lengths, self.batch_size)
        return make_loader(dataset, batches, self.pad_id)

    def rows(self, texts, probs):
        return [{"text": text, "label": self.names[p.argmax()], "probability": float(p.max()),
                 "probs": {name: float(q) for name, q in zip(self.names, p)}}
                for text, p in zip(texts, probs)]

    def predict(self, texts):
        if not texts:
            return []
        logits = predict_logits(self.model, self.loader(texts), self.device)
        return self.rows(texts, torch.from_numpy(logits).softmax(-1).numpy())

    def score(self, examples, where):
        """Rows plus accuracy, macro-F1, loss and labels, computed as _3_main.py computes them."""
        texts, labels = [t for t, _ in examples], label_ids(examples, self.info["labels"], where)
        result = score_logits(predict_logits(self.model, self.loader(texts), self.device), labels)
        return self.rows(texts, result["probs"]), {**result, "labels": labels}


def is_plain_text(path):
    """A .txt (or extension-less) file whose first line names no text column: a text a line."""
    if table_format(path) != "tsv" or path.lower().endswith(".tsv"):
        return False
    with open_text(path) as f:  # checks that it exists and is not binary
        header = f.buffer.readline().decode("utf-8", "replace").rstrip("\r\n").split("\t")
    return not any(column.lower() in TEXT_COLUMNS for column in header)


def read_plain_text(path):
    try:
        with open_text(path) as f:
            lines = [line.rstrip("\r\n") for line in f]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None
    return [(line, None) for line in lines if line.strip()]


def read_file(args):
    """(text, label or None) pairs from --file."""
    if is_plain_text(args.file):
        return read_plain_text(args.file)
    return read_table(args.file, args.text_column, args.label_column, need_label=False)


def print_rows(rows, as_json):
    for row in rows:
        line = f"{row['label']}\t{row['probability']:.4f}\t{row['text']}"
        print(json.dumps(row, ensure_ascii=False) if as_json else line, flush=True)


def write_jsonl(path, rows):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_atomic(path, write)


def confusion_matrix(labels, predictions, num_classes):
    matrix = np.zeros((num_classes, num_classes), dtype=int)
    np.add.at(matrix, (np.asarray(labels), np.asarray(predictions)), 1)
    return matrix


def print_confusion(matrix, names):
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
            ax.text(j, i, str(v), ha="center", va="center",
                    color="white" if v > matrix.max() / 2 else "black")
    save_figure(path, draw, size=(1.2 * len(names) + 2.5, 1.2 * len(names) + 2))


def ask_loop(predictor, as_json):
    """The notebook's prompt: one sentence at a time until an empty line or end of input."""
    while True:
        try:
            text = input(PROMPT)
        except EOFError:
            print()
            return
        if not text.strip():
            return
        print_rows(predictor.predict([text]), as_json)


def main(argv=None):
    args = parse_args(argv)
    examples = read_file(args) if args.file else None  # before the model: bad input fails fast
    predictor = Predictor(args.model_dir, args.device, args.batch_size)
    if args.serve:
        from serve import serve

        return serve(predictor, args.host, args.port)
    if examples is None:
        if not args.sentences and sys.stdin.isatty():
            return ask_loop(predictor, args.json)
        texts = args.sentences if args.sentences not in ([], ["-"]) else [
            line.rstrip("\r\n") for line in sys.stdin if line.strip()]
        examples = [(t, None) for t in texts]
    labelled = bool(examples) and all(label is not None for _, label in examples)
    if labelled:
        rows, result = predictor.score(examples, args.file)
    else:
        rows = predictor.predict([t for t, _ in examples])
    if args.output:
        write_jsonl(args.output, rows)
    else:
        print_rows(rows, args.json)
    if labelled:
        print(f"{args.file}: {len(rows)} texts, accuracy {result['accuracy']:.4f}, "
              f"macro_f1 {result['macro_f1']:.4f}, loss {result['loss']:.4f}", file=sys.stderr)
        matrix = confusion_matrix(result["labels"], result["probs"].argmax(-1),
                                  len(predictor.names))
        print_confusion(matrix, predictor.names)
        if args.confusion:
            save_confusion_png(matrix, predictor.names, args.confusion)
    elif args.confusion:
        raise DataError(f"{args.file}: --confusion needs a label column")


if __name__ == "__main__":
    try:
        main()
        gc.freeze()  # the final collection would walk all of torch's objects: 0.5 s of exit
    except (DataError, ModelError) as e:
        sys.exit(print(f"error: {e}", file=sys.stderr) or 2)
