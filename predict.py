"""Classify texts with a checkpoint folder written by _3_main.py.

    python predict.py "이 영화 정말 재밌다" "최악"             # label and probability per sentence
    python predict.py --json "이 영화 정말 재밌다"             # one JSON object per sentence
    python predict.py --file reviews.tsv --output out.jsonl  # a file; scored when it has labels
    cat reviews.txt | python predict.py -                    # one text per input line
"""
import argparse
import json
import os
import sys

import torch

from _1_data import (TEXT_COLUMNS, BERTDataset, DataError, encode_texts, label_ids, length_sorted_batches,
                     open_text, read_table, table_format)
from _2_model import ModelError, load_checkpoint, predict_logits
from _3_main import ArgumentParser, choose_device, evaluate, make_loader


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sentences", nargs="*", help="texts to classify; '-' or none reads standard input")
    p.add_argument("--model_dir", default="checkpoint", help="checkpoint folder written by _3_main.py")
    p.add_argument("--file", help="TSV/CSV/JSONL with a text column (scored when it has labels), or plain text, one per line")
    p.add_argument("--text_column", help="text column of --file (default: document, text, sentence, ...)")
    p.add_argument("--label_column", help="label column of --file (default: label, labels, ...)")
    p.add_argument("--output", help="write one JSON object per text to this .jsonl file")
    p.add_argument("--json", action="store_true", help="print JSON lines: text label probability probs")
    p.add_argument("--batch_size", type=int, default=0, help="texts per batch (default: the checkpoint's test_batch_size)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    args = p.parse_args(argv)
    if args.batch_size < 0:
        p.error("--batch_size must be positive")
    if args.file and args.sentences:
        p.error("give sentences or --file, not both")
    return args


def is_plain_text(path):
    """A .txt (or extension-less) file whose first line names no text column is one text per line."""
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


def read_inputs(args):
    """(text, label or None) pairs from --file, the arguments, or standard input."""
    if args.file:
        if is_plain_text(args.file):
            return read_plain_text(args.file)
        return read_table(args.file, args.text_column, args.label_column, need_label=False)
    if args.sentences and args.sentences != ["-"]:
        return [(s, None) for s in args.sentences]
    return [(line.rstrip("\r\n"), None) for line in sys.stdin if line.strip()]


def main(argv=None):
    args = parse_args(argv)
    examples = read_inputs(args)  # read before the model loads, so bad input fails fast
    device = choose_device(args.device)
    model, tokenizer, info = load_checkpoint(args.model_dir, device)
    names = info["label_names"]
    labelled = bool(examples) and all(label is not None for _, label in examples)
    ids = encode_texts(tokenizer, [text for text, _ in examples], info["args"]["max_len"])
    dataset = BERTDataset(ids, label_ids(examples, info["labels"], args.file) if labelled else None)
    batches = length_sorted_batches(dataset.lengths, args.batch_size or info["args"]["test_batch_size"])
    loader = make_loader(dataset, batches, tokenizer.pad_token_id)
    if labelled:
        result = evaluate(model, loader, device, None)
        probs = result["probs"]
    else:
        probs = torch.from_numpy(predict_logits(model, loader, device)).softmax(-1).numpy()

    rows = [{"text": text, "label": names[p.argmax()], "probability": float(p.max()),
             "probs": {name: float(q) for name, q in zip(names, p)}} for (text, _), p in zip(examples, probs)]
    if args.output:
        tmp = args.output + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        os.replace(tmp, args.output)
    elif args.json:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    else:
        for row in rows:
            print(f"{row['label']}\t{row['probability']:.4f}\t{row['text']}")
    if labelled:
        print(f"{args.file}: {len(rows)} texts, accuracy {result['accuracy']:.4f}, "
              f"macro_f1 {result['macro_f1']:.4f}, loss {result['loss']:.4f}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except (DataError, ModelError) as e:
        sys.exit(print(f"error: {e}", file=sys.stderr) or 2)
