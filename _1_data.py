"""Where text comes from and how it becomes tensors.

Corpus readers (NSMC, the aclImdb layout, any TSV/CSV/JSONL), verified downloads, label maps,
tokenization with an on-disk cache, `BERTDataset`, a length-bucketing batch sampler and
`pad_to_longest`, which pads each batch only to its own longest text, and pretraining's masking
(`mask_tokens`: like transformers' collator, a step of making batches). The KoBERT transform
(`BERTSPTokenizer` + `BERTSentenceTransform`) reproduces gluonnlp 0.10 without mxnet.
"""
import argparse
import codecs
import collections
import contextlib
import csv
import functools
import itertools
import hashlib
import json
import os
import random
import re
import sys
import tarfile
import unicodedata
import zipfile

import numpy as np
import torch

from common import DataError, ModelError, sha256_of, write_atomic

NSMC_FILES = {  # file name -> (published URL, sha256)
    "ratings_train.txt": (
        "https://raw.githubusercontent.com/e9t/nsmc/master/ratings_train.txt",
        "e03b7d14e9e41be8d464a28057cd25d7396c53e67aa7fd5f7e552c59b0ee2940",
    ),
    "ratings_test.txt": (
        "https://raw.githubusercontent.com/e9t/nsmc/master/ratings_test.txt",
        "8ac9f64052f11dbf6ae0acb5e038f03d90a76f0eda7820cfb3a92d02edfcebda",
    ),
}
IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
IMDB_SHA256 = "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe"
IMDB_ARCHIVES = ("aclImdb_v1.tar.gz", "aclImdb_v1_text.tar.gz")

TEXT_COLUMNS = ("document", "text", "sentence", "review", "content", "comment")
LABEL_COLUMNS = ("label", "labels", "sentiment", "class", "target")

csv.field_size_limit(2**31 - 1)  # long reviews are single fields


# ---------------------------------------------------------------------------------------- downloads


def download(url, dest, sha256):
    """Fetch url beside dest, check its sha256, and only then give it dest's name."""
    import urllib.request  # here, not at the top: predict.py never downloads and starts faster

    def fetch(tmp):
        print(f"downloading {url} -> {dest}", flush=True)
        # In blocks of 1 MiB: the IMDB archive (84 MB) never sits in memory whole
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
        got = sha256_of(tmp)
        # A truncated or altered download never takes the real name, so the next run tries again
        if got != sha256:
            raise DataError(f"{url}: sha256 {got} does not match the published {sha256}; not saved")

    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    try:
        write_atomic(dest, fetch)
    except OSError as e:
        raise DataError(f"could not download {url} ({e}); "
                        f"put the file at {dest} yourself") from None


# -------------------------------------------------------------------------------------- table files

def table_format(path):
    """'jsonl', 'csv' or 'tsv' by extension; .txt counts as TSV (NSMC's files are .txt)."""
    # By the name, not the content: a pipe cannot be looked into and read again
    ext = os.path.splitext(path)[1].lower()
    return {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}.get(ext, "tsv")


def open_text(path, encoding="utf-8"):
    """The file's lines as text (decoded_lines); binary and UTF-16 files are named as such. A
    pipe (/dev/stdin) is opened once and not peeked at: what is read from it is gone."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    try:
        if os.path.isfile(path):
            with open(path, "rb") as f:
                head = f.read(1 << 16)
            # Excel's "Unicode text" is UTF-16: every other byte would be NUL, decoded as garbage
            if head.startswith((b"\xff\xfe", b"\xfe\xff")):
                raise DataError(f"{path}: UTF-16 text (as Excel saves 'Unicode text'); save it "
                                f"as UTF-8 (CSV UTF-8 or a UTF-8 .txt)")
            if b"\0" in head:
                raise DataError(f"{path}: contains NUL bytes; a binary file, not text")
        return decoded_lines(path, open(path, "rb"), encoding)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def text_encoding(name):
    """--encoding: a codec Python knows (utf-8, cp949, euc-kr, ...); argparse's one line if not."""
    try:
        return codecs.lookup(name).name
    except LookupError:
        raise argparse.ArgumentTypeError(f"{name!r} is not an encoding Python knows") from None


def column_names(value):
    """--columns: two or more names, each once; argparse's one line if not. Kept as the string
    given, as saved runs hold it."""
    names = value.split(",")
    # One name would read every line as a text with no label; a name twice makes one key of two
    if len(names) < 2 or len(set(names)) != len(names) or not all(n.strip() for n in names):
        raise argparse.ArgumentTypeError(f"{value!r} must name two or more columns, each once")
    return value


def decoded_lines(where, f, encoding="utf-8"):
    """The lines of a binary file, each decoded on its own: a bad byte is named on its own line
    (a text file decodes 8 KB ahead of the line it gives), with a hint when the line reads as
    CP949, as Korean Excel and older Windows programs save text."""
    name = codecs.lookup(encoding).name.upper()
    with f:
        for line_no, raw in enumerate(f, 1):
            if line_no == 1:  # a byte-order mark is not text
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                yield raw.decode(encoding)
            except UnicodeDecodeError as e:
                hint = f"; give the file's encoding with --encoding (it is not {name})"
                with contextlib.suppress(UnicodeDecodeError):
                    raw.decode("cp949")
                    hint = "; it reads as CP949 (EUC-KR), as Korean Excel saves: --encoding cp949"
                raise DataError(f"{where}:{line_no}: not {name} text (bad byte at offset "
                                f"{e.start}){hint}") from None


def tsv_fields(line):
    """One TSV line's fields. Quotes work as csv writes them (NSMC quotes 0.4% of its reviews)
    but never across lines: a quote its line does not close is text, where csv would swallow
    the following lines into this row up to the next quote."""
    line = line.rstrip("\r\n")
    try:
        return next(csv.reader([line], delimiter="\t", strict=True), [])
    except csv.Error:
        return line.split("\t")


def valid_unicode(path, line_no, value):
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{path}:{line_no}: a lone surrogate ({value[e.start]!r}) is not valid "
                        f"Unicode text") from None
    return value


def read_rows(path, lines=None, columns=None, encoding="utf-8"):
    """Yield (line number, {column: value}) per record of a TSV/CSV/JSONL file with a header,
    or of a headerless TSV/CSV whose columns are named by `columns` (its first row is data).
    lines: the file's lines when it is already open (a pipe can be read once only)."""
    fmt = table_format(path)
    try:
        # decoded_lines closes the file when its lines run out (or it is collected)
        with contextlib.nullcontext(open_text(path, encoding) if lines is None else lines) as f:
            if fmt == "jsonl":
                yield from read_jsonl(path, f)
                return
            if fmt == "csv":
                reader = csv.reader(f)
            else:  # TSV: each line is one row
                reader = map(tsv_fields, f)
            header = columns or next(reader, None)
            if header is None:
                raise DataError(f"{path}: the file is empty")
            twice = sorted({c for c in header if header.count(c) > 1})
            if twice:
                raise DataError(f"{path}:1: the header names {twice} more than once")
            for line_no, fields in enumerate(reader, 1 if columns else 2):
                if fmt == "csv":
                    # CSV's own line number: a quoted field with a newline makes rows and lines
                    # differ
                    line_no = reader.line_num  # a quoted CSV field may span lines
                if not fields:
                    continue
                # A headerless file named by --columns whose first row is the header after all: not
                # data
                if columns and line_no == 1 and [f.strip().lower() for f in fields] == [
                        c.strip().lower() for c in columns]:
                    print(f"note: {path}: the first row names the --columns "
                          f"({','.join(columns)}); read as a header, not as data", file=sys.stderr)
                    continue
                # A row with a tab inside its text would otherwise shift its label into the wrong
                # column
                if len(fields) != len(header):
                    raise DataError(f"{path}:{line_no}: expected {len(header)} fields "
                                    f"({', '.join(header)}), found {len(fields)}")
                yield line_no, dict(zip(header, fields))
    except csv.Error as e:
        raise DataError(f"{path}: {e}") from None


def read_jsonl(path, f):
    for line_no, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise DataError(f"{path}:{line_no}: JSON nested too deeply") from None
        # One JSON object per line (JSONL), not a list or a bare string
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line_no}: expected a JSON object per line")
        yield line_no, row


def find_column(path, columns, given, candidates, role, flag):
    if given:
        if given not in columns:
            raise DataError(f"{path}: no column {given!r} (given by {flag}); columns are {columns}")
        return given
    # Case-insensitive: "Text" and "TEXT" headers are found like "text"
    lowered = {c.lower(): c for c in columns}
    for name in candidates:
        if name in lowered:
            return lowered[name]
    hint = "" if table_format(path) == "jsonl" else (
        "; a file without a header needs its columns named, e.g. --columns text,label")
    raise DataError(f"{path}: no {role} column among {columns}; name it with {flag}{hint}")


def iter_table(path, text_column=None, label_column=None, need_label=True, lines=None,
               columns=None, label_sep=None, encoding="utf-8"):
    """Yield (text, label) pairs. label is a string; with label_sep (several labels per text) a
    tuple of strings; None when the file has no label column. columns: see read_rows."""
    text_key = label_key = None
    for line_no, row in read_rows(path, lines, columns, encoding):
        if text_key is None:
            columns = list(row)
            text_key = find_column(path, columns, text_column, TEXT_COLUMNS, "text",
                                   "--text_column")
            # A file of texts alone (to predict) needs no label column; one that has it gets it read
            if need_label or label_column or any(c.lower() in LABEL_COLUMNS for c in columns):
                label_key = find_column(path, columns, label_column, LABEL_COLUMNS, "label",
                                        "--label_column")
                if label_key == text_key:
                    raise DataError(f"{path}: {text_key!r} cannot be both the text and the "
                                    f"label column")
        text = row.get(text_key)
        if not isinstance(text, str):
            raise DataError(f"{path}:{line_no}: {text_key!r} must be a string, got {text!r}")
        label = (None if label_key is None else
                 read_label(path, line_no, row.get(label_key), label_key, label_sep))
        yield valid_unicode(path, line_no, text), label


def read_label(path, line_no, value, column, label_sep):
    """A text's label; with label_sep its labels, as a tuple: from a JSON list, or from a string
    of labels joined by label_sep (GoEmotions: "4,27")."""
    if label_sep is None:
        # A JSON list of labels on a single-label run would become one class named by the whole list
        if isinstance(value, list):
            raise DataError(f"{path}:{line_no}: the label is a list (several labels per text); "
                            f"train with --problem multi_label")
        return label_text(path, line_no, value, column)
    if not isinstance(value, list):
        value = value.split(label_sep) if isinstance(value, str) else [value]
    labels = [label_text(path, line_no, v.strip() if isinstance(v, str) else v, column)
              for v in value if not (isinstance(v, str) and not v.strip())]
    if not labels:
        raise DataError(f"{path}:{line_no}: empty label list in column {column!r}; every text "
                        f"needs at least one label")
    # dict.fromkeys keeps the first order and drops repeats
    return tuple(dict.fromkeys(labels))  # a label given twice counts once


def label_text(path, line_no, label, column):
    """A label as a string: JSON integers count as their digits; floats, booleans and NaN would
    each silently become classes of their own, so they are refused."""
    if label is None or isinstance(label, str) and not label.strip():
        raise DataError(f"{path}:{line_no}: missing label in column {column!r}")
    # JSON true is an int in Python: it must not become class "1"
    if isinstance(label, int) and not isinstance(label, bool):
        return str(label)
    if not isinstance(label, str) or label.strip().lower() == "nan":
        raise DataError(f"{path}:{line_no}: label {json.dumps(label)} is not a class name; "
                        f"labels are strings or integers")
    return valid_unicode(path, line_no, label)


def read_table(path, text_column=None, label_column=None, need_label=True, columns=None,
               label_sep=None, encoding="utf-8"):
    examples = list(iter_table(path, text_column, label_column, need_label, None, columns,
                               label_sep, encoding))
    if not examples:
        raise DataError(f"{path}: the file has no rows")
    return examples


def stream_texts(path, text_column=None, label_column=None, columns=None, label_sep=None,
                 encoding="utf-8"):
    """(text, label or None) pairs of a file, read once as they come, so a pipe such as
    /dev/stdin works and a huge file never sits in memory. Every script reads unlabelled and
    scored files through here, so one rule decides what a file is: a table (TSV/CSV/JSONL) when
    its name says so (.csv, .jsonl, .tsv), when --columns names its columns or when its first
    line names a text column (a known one, or --text_column); else one text per line (a .txt
    file of reviews)."""
    f = open_text(path, encoding)
    first = next(f, "")
    lines = itertools.chain([first], f)  # the first line is read only once, also from a pipe
    names = {c.strip().lower() for c in tsv_fields(first)}
    if (table_format(path) != "tsv" or path.lower().endswith(".tsv") or columns
            or names & {*TEXT_COLUMNS, (text_column or "").lower()}):
        return iter_table(path, text_column, label_column, need_label=False, lines=lines,
                          columns=columns, label_sep=label_sep)
    return ((text, None) for text in nonblank_lines(path, lines))


def file_examples(args, label_sep=None):
    """stream_texts of --file as the flags predict.py and export.py share say to read it
    (--text_column, --label_column, --columns, --encoding)."""
    columns = args.columns.split(",") if args.columns else None
    return stream_texts(args.file, args.text_column, args.label_column, columns, label_sep,
                        args.encoding)


def nonblank_lines(where, lines):
    """The non-blank lines, without their line ends, each checked for lone surrogates."""
    for line_no, line in enumerate(lines, 1):
        if line.strip():
            yield valid_unicode(where, line_no, line.rstrip("\r\n"))


def read_unlabeled(path, text_column=None, encoding="utf-8"):
    """Texts of --unlabeled_file: a table with a text column (labels are not needed), or plain
    text, one text per line (stream_texts decides which)."""
    texts = [text for text, _ in stream_texts(path, text_column, encoding=encoding)]
    if not texts:
        raise DataError(f"{path}: no texts in the file")
    return texts


# ------------------------------------------------------------------------------------------ corpora

def read_nsmc(data_dir):
    """NSMC train/test, downloaded and verified when missing; all rows kept, empty texts too."""
    splits = {}
    for split, name in (("train", "ratings_train.txt"), ("test", "ratings_test.txt")):
        path = os.path.join(data_dir, name)
        if not os.path.exists(path):
            url, sha256 = NSMC_FILES[name]
            download(url, path, sha256)
        # Columns by name: NSMC's files are id, document, label, written by pandas with csv quoting
        splits[split] = read_table(path, "document", "label")
    return splits


IMDB_MEMBER = re.compile(r"aclImdb/(train|test)/(pos|neg)/(\d+)_\d+\.txt$")


# IMDB's reviews keep the site's line breaks as HTML tags; a tokenizer would make words of them
def clean_imdb(text):
    return text.replace("<br />", " ")


def read_imdb(data_dir):
    """aclImdb/{train,test}/{pos,neg}/*.txt from a folder or the archive (downloaded if missing)."""
    found = []  # (split, label, id, text)
    folder = os.path.join(data_dir, "aclImdb")
    if os.path.isdir(folder):
        for root, _, files in os.walk(folder):
            for name in files:
                path = os.path.join(root, name)
                match = IMDB_MEMBER.search(path.replace(os.sep, "/"))
                if match:
                    with open(path, encoding="utf-8") as f:
                        found.append((*match.groups(), f.read()))
    else:
        archives = [os.path.join(data_dir, a) for a in IMDB_ARCHIVES]
        archive = next((a for a in archives if os.path.exists(a)), None)
        if archive is None:
            archive = archives[0]
            download(IMDB_URL, archive, IMDB_SHA256)
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                match = IMDB_MEMBER.search(member.name)
                if match and member.isfile():
                    found.append((*match.groups(), tar.extractfile(member).read().decode("utf-8")))
    if not found:
        raise DataError(f"{data_dir}: no aclImdb/{{train,test}}/{{pos,neg}}/*.txt files found")
    # A fixed order whatever the file system or archive lists first: seeded subsets repeat exactly
    found.sort(key=lambda r: (r[0], r[1], int(r[2])))
    return {split: [(clean_imdb(text), label) for s, label, _, text in found if s == split]
            for split in ("train", "test")}


# The built-in corpora, by --data name. To add one, write a reader that takes a folder and returns
# {"train": [(text, label), ...], "test": [...]} (download() fetches and verifies what is missing)
# and give it an entry here: --data offers every name of this table.
Corpus = collections.namedtuple("Corpus", "read folder label_names")
CORPORA = {
    "nsmc": Corpus(read_nsmc, "data/nsmc", ["부정", "긍정"]),  # display names of labels 0, 1
    "imdb": Corpus(read_imdb, "data/imdb", None),  # labels neg, pos are names already
}


def load_corpus(args):
    """{'train': [...], 'valid': [...] or None, 'test': [...] or None} of (text, label) pairs."""
    if args.train_file:
        columns = args.columns.split(",") if args.columns else None
        sep = args.label_sep if args.problem == "multi_label" else None
        # Every file of a run is read with the same column and label rules
        read = lambda path: read_table(path, args.text_column, args.label_column,  # noqa: E731
                                       columns=columns, label_sep=sep, encoding=args.encoding)
        splits = {"train": read(args.train_file),
                  "valid": read(args.valid_file) if args.valid_file else None,
                  "test": read(args.test_file) if args.test_file else None}
    else:
        corpus = CORPORA[args.data]
        splits = corpus.read(args.data_dir or corpus.folder)
    splits.setdefault("valid", None)
    if args.min_chars:
        # --min_chars as one notebook does: one-word reviews say little; dropped from every split
        splits = {k: v and [ex for ex in v if len(ex[0]) >= args.min_chars]
                  for k, v in splits.items()}
    if args.valid_ratio and splits["valid"] is None:
        # Carved before subsets are taken, so --max_train_samples never moves a text into validation
        splits["train"], splits["valid"] = split_off(splits["train"], args.valid_ratio, args.seed)
    splits["train"] = take_subset(splits["train"], args.max_train_samples, args.seed)
    for split in ("valid", "test"):
        splits[split] = splits[split] and take_subset(splits[split], args.max_eval_samples,
                                                      args.seed)
    if not splits["train"]:
        raise DataError("no training examples left (check --min_chars and --max_train_samples)")
    # said now, not after training, where the threshold or the stopping rule would need them
    needs = "--tune_threshold" if args.tune_threshold else "--early_stopping"
    if (args.tune_threshold or args.early_stopping) and not splits["valid"]:
        raise DataError(f"no validation texts left after --min_chars {args.min_chars}; {needs} "
                        f"needs them")
    return splits


def labels_and_names(args, train):
    """(labels, display names): from --label_file, else the training data's distinct labels."""
    where = args.train_file or f"{args.data} training data"
    check_problem(train, args.problem == "multi_label", args.label_sep, where)
    if args.label_file:
        labels = read_label_file(args.label_file)
        # One convention per run: the one training's labels use (names or line numbers), so that
        # a test file in the other is one line, not a class with no training rows
        if args.data_labels == "auto":
            args.data_labels = data_convention(train, labels)
        return labels, labels
    labels = label_list(train)
    # One class cannot be learned: a wrong label column usually gives this
    if len(labels) < 2:
        raise DataError(f"training data has only one label ({labels[0]!r}); "
                        f"need two or more classes")
    corpus_names = None if args.train_file else CORPORA[args.data].label_names
    names = args.label_names.split(",") if args.label_names else corpus_names or labels
    if len(names) != len(labels):
        raise DataError(f"--label_names gives {len(names)} names for {len(labels)} labels {labels}")
    return labels, names


def data_convention(examples, labels):
    """"names" when every label of examples is a name in the label file, "line_numbers" when
    every one is a line number of it, else "auto" (each as whichever it is)."""
    used = {x for _, label in examples for x in (label if isinstance(label, tuple) else (label,))}
    ids = {str(i): i for i in range(len(labels))}
    # a label that names one class and numbers another stays for label_ids to refuse
    if any(x in ids and x in labels and labels.index(x) != ids[x] for x in used):
        return "auto"
    if used <= set(labels):
        return "names"
    return "line_numbers" if used <= set(ids) else "auto"


def take_subset(examples, n, seed):
    """A seeded random subset of n examples, in their original order."""
    if not n or n >= len(examples):
        return examples
    # Sorted: the subset keeps the file's order, so its fingerprint does not depend on the draw's
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


def split_off(examples, ratio, seed):
    """Seeded (train, valid) split with a `ratio` share of the examples in valid."""
    order = list(range(len(examples)))
    # A generator of its own: the split does not move the global random state that training seeds
    random.Random(seed).shuffle(order)
    n_valid = max(1, round(len(examples) * ratio))
    valid = set(order[:n_valid])
    return ([ex for i, ex in enumerate(examples) if i not in valid],
            [ex for i, ex in enumerate(examples) if i in valid])


def label_list(examples):
    """The distinct labels of (text, label) pairs in sorted order: numerically when they are all
    integers. A label may be a tuple of labels (several per text)."""
    distinct = {x for _, label in examples
                for x in (label if isinstance(label, tuple) else (label,))}
    # Numeric labels in numeric order: "10" after "9", so id i is the class a user calls i
    if all(re.fullmatch(r"-?\d+", label) for label in distinct):
        return sorted(distinct, key=lambda label: (int(label), label))  # "01" before "1": no tie
    return sorted(distinct)


def read_label_file(path):
    """Class names, one per line; line i names label id i (GoEmotions' label.txt)."""
    names = [line.strip() for line in open_text(path)]
    while names and not names[-1]:
        names.pop()
    if "" in names:  # a blank line would shift the ids of every name after it
        raise DataError(f"{path}:{names.index('') + 1}: empty line; one class name per line")
    twice = sorted(n for n, k in collections.Counter(names).items() if k > 1)[:5]
    if len(names) < 2 or twice:
        raise DataError(f"{path}: a label file names two or more classes, one per line, each "
                        f"once" + (f" ({twice} twice)" if twice else f"; found {len(names)}"))
    return names


def label_ids(examples, labels, where, by_id=None):
    """Class ids of (text, label) pairs; for tuples of labels multi-hot rows (float32, one column
    per label). by_id, with a label file: the data's labels are its "names", its "line_numbers"
    (from 0), or ("auto") either, refused where one label names one class and numbers another."""
    # A label may be a class's name, its line number in --label_file, or (auto) either
    names = {} if by_id == "line_numbers" else {label: i for i, label in enumerate(labels)}
    ids = {str(i): i for i in range(len(labels))} if by_id in ("auto", "line_numbers") else {}
    several = any(isinstance(label, tuple) for _, label in examples)
    rows = [label if several else (label,) for _, label in examples]
    both = sorted({x for row in rows for x in row
                   if x in names and x in ids and names[x] != ids[x]})
    if both:
        x = both[0]
        raise DataError(f"{where}: label {x!r} could be class {labels[names[x]]!r} (its name) or "
                        f"class {labels[ids[x]]!r} (line number {x}, from 0); say which the data "
                        f"uses with --data_labels names or --data_labels line_numbers")
    # Names win over numbers only where both mean the same class (checked above)
    index = {**ids, **names}
    unknown = sorted({x for row in rows for x in row if x not in index})
    if unknown:
        known = (f"known: {labels}" if by_id is None else f"names {labels}" if not ids
                 else f"ids 0 to {len(labels) - 1}" if not names
                 else f"ids 0 to {len(labels) - 1} or names {labels}")
        # with a label file the labels are its names or line numbers, not what training held
        what = "never appear in training" if by_id is None else "are not {} of --label_file".format(
            {"names": "names", "line_numbers": "line numbers"}.get(by_id, "names or line numbers"))
        raise DataError(f"{where}: labels {unknown[:10]} {what} ({known})"[:500])
    if not several:
        return [index[x] for x, in rows]
    # Multi-hot rows: binary cross-entropy wants a 0 or 1 per label, as float
    hot = np.zeros((len(rows), len(labels)), dtype="float32")
    for i, row in enumerate(rows):
        hot[i, [index[x] for x in row]] = 1
    return hot


def trained_label_rules(trained, data_labels=None):
    """(label_sep, by_id) to read a labelled file for a model trained with the flags `trained`
    (classifier.json's args): labels then mean what they meant in training, names or line
    numbers of its --label_file (data_labels, predict.py's flag, may say which)."""
    label_sep = trained.get("label_sep", ",") if trained.get("problem") == "multi_label" else None
    by_id = (data_labels or trained.get("data_labels", "auto")) if trained.get("label_file") \
        else None
    return label_sep, by_id


def check_problem(examples, multi_label, label_sep, where):
    """One line when single-label data is read as multi-label, or the reverse."""
    if multi_label:
        if all(len(label) == 1 for _, label in examples):
            raise DataError(f"{where}: every text has exactly one label; that is single-label "
                            f"data: leave out --problem multi_label")
        return
    known = {label for _, label in examples}
    for label in sorted(known):
        # "4,27" made of labels that exist alone is several labels, not a class of its own
        parts = [part.strip() for part in label.split(label_sep)]
        if len(parts) > 1 and all(part in known or part.isdigit() for part in parts):
            raise DataError(f"{where}: label {label!r} joins several labels with {label_sep!r}; "
                            f"for several labels per text use --problem multi_label")


# --------------------------------------------------------------------------- KoBERT (gluonnlp 0.10)

def _is_control(ch, cat):
    return ch not in "\t\n\r" and cat in ("Cc", "Cf")


def _is_whitespace(ch, cat):
    return ch in " \t\n\r" or cat == "Zs"


def _is_punctuation(ch, cat):
    cp = ord(ch)
    return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or cat[0] == "P"


def _is_cjk(cp):
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def bert_basic_tokenize(text, lower=False):
    """gluonnlp's BasicTokenizer: drop control characters, normalise whitespace, space CJK
    characters, NFD (always, as gluonnlp does), drop combining marks, split off punctuation."""
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in "\x00\ufffd" or _is_control(ch, cat):
            continue
        # Whitespace becomes a space and a CJK character a word of its own; the split below
        # makes runs of spaces one (gluonnlp's own bookkeeping of them changes no token)
        out.append(" " if _is_whitespace(ch, cat) else f" {ch} " if _is_cjk(ord(ch)) else ch)
    text = "".join(out).strip()
    if lower:
        text = text.lower()
    out = []
    # NFD as gluonnlp does it, even for Hangul: KoBERT's SentencePiece model was trained on that
    for ch in unicodedata.normalize("NFD", text):
        cat = unicodedata.category(ch)
        if cat == "Mn":
            continue
        # Punctuation becomes a token of its own, as BERT's basic tokenizer splits it off
        out.append(" " + ch + " " if _is_punctuation(ch, cat) else ch)
    return "".join(out).split()


class BERTSPTokenizer:
    """Basic BERT tokenization, then SentencePiece on each basic token (KoBERT's tokenizer)."""

    def __init__(self, spm_model_path, lower=False):
        import sentencepiece

        self.path, self.lower = spm_model_path, lower
        self.sp = sentencepiece.SentencePieceProcessor(model_file=spm_model_path)
        self.unk_token_id = self.sp.unk_id()
        self.pad_token_id, self.cls_token_id, self.sep_token_id = (
            self.token_id(t) for t in ("[PAD]", "[CLS]", "[SEP]"))

    def __call__(self, text):
        return [piece for token in bert_basic_tokenize(text, self.lower)
                for piece in self.sp.encode(token, out_type=str)]

    def token_id(self, piece):
        i = self.sp.piece_to_id(piece)
        # A SentencePiece model without [CLS] or [SEP] would silently map them to [UNK]
        if piece.startswith("[") and i == self.sp.unk_id() and piece != self.sp.id_to_piece(i):
            raise ValueError(f"{self.path}: the SentencePiece model has no {piece} piece")
        return i

    def convert_tokens_to_ids(self, tokens):
        return [self.sp.piece_to_id(t) for t in tokens]  # unknown pieces map to [UNK]

    def __len__(self):
        return self.sp.get_piece_size()


class BERTSentenceTransform:
    """`transform([text])` or `transform([a, b])` -> (input_ids, valid_length, segment_ids),
    int32."""

    def __init__(self, tokenizer, max_seq_length, pad=True, pair=False):
        self.tokenizer, self.max_seq_length = tokenizer, max_seq_length
        self.pad, self.pair = pad, pair

    def __call__(self, line):
        tokens_a = self.tokenizer(line[0])
        tokens_b = self.tokenizer(line[1]) if self.pair else []
        if tokens_b:  # drop from the longer text until [CLS] a [SEP] b [SEP] fits
            while len(tokens_a) + len(tokens_b) > self.max_seq_length - 3:
                (tokens_a if len(tokens_a) > len(tokens_b) else tokens_b).pop()
        else:
            # Room for [CLS] and [SEP]
            tokens_a = tokens_a[: self.max_seq_length - 2]
        tok = self.tokenizer
        ids = [tok.cls_token_id, *tok.convert_tokens_to_ids(tokens_a), tok.sep_token_id]
        segments = [0] * len(ids)
        if tokens_b:
            ids += [*tok.convert_tokens_to_ids(tokens_b), tok.sep_token_id]
            segments += [1] * (len(tokens_b) + 1)
        # valid_length: the real tokens, which gluonnlp's models turn into their attention mask
        valid_length = len(ids)
        if self.pad:
            ids += [tok.pad_token_id] * (self.max_seq_length - valid_length)
            segments += [0] * (self.max_seq_length - valid_length)
        # int32, as gluonnlp's transform returns them
        return (np.array(ids, dtype="int32"), np.array(valid_length, dtype="int32"),
                np.array(segments, dtype="int32"))


# ------------------------------------------------------------------------------------- tokenization

def tokenizer_fingerprint(tokenizer):
    if isinstance(tokenizer, BERTSPTokenizer):
        return f"kobert:{tokenizer.lower}:{sha256_of(tokenizer.path)}"
    # The tokenizer's whole definition (vocabulary, normalizer, pre-tokenizer) keys the token cache
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec.pop("truncation", None), spec.pop("padding", None)  # calling the tokenizer changes these
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


CHARS_PER_TOKEN = 50  # more per token only in runs of unbroken 100-character "words"


TRUNCATIONS = ("head", "tail", "head_tail")


def encode_texts(tokenizer, texts, max_len, truncation="head"):
    """Token ids with [CLS]/[SEP] (or <s>/</s>), at most max_len, unpadded; a longer text keeps
    the part `truncation` names (see keep_part). The tokenizer is KoBERT's, a transformers one,
    or a bare tokenizers.Tokenizer (predict.py's fast start)."""
    # a text costs time in proportion to what is kept: no token spans CHARS_PER_TOKEN characters
    chars = max_len * CHARS_PER_TOKEN
    # Cutting the characters first keeps a multi-megabyte "review" from costing seconds to tokenize
    texts = [text[:chars] if truncation == "head" or len(text) <= 2 * chars
             else text[:chars] + " " + text[-chars:] for text in texts]
    limit = max_len if truncation == "head" else 2**31  # the library cuts heads itself
    try:
        ids = token_ids(tokenizer, texts, max_len, limit, truncation)
    # A tokenizer.json regex that backtracks without end on some text makes the Rust library
    # panic; pyo3 raises that as PanicException, a BaseException (Ctrl-C passes through)
    except BaseException as e:
        if type(e).__name__ != "PanicException":
            raise
        raise DataError(f"the tokenizer failed on a text ({str(e).splitlines()[0][:120]}); "
                        f"its tokenizer.json is broken for such texts") from None
    return [keep_part(x, max_len, truncation) for x in ids]


def token_ids(tokenizer, texts, max_len, limit, truncation):
    """encode_texts' ids before keep_part, from whichever kind of tokenizer this is."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, BERTSPTokenizer):
        transform = BERTSentenceTransform(tokenizer, limit, pad=False)
        return [transform([text])[0] for text in texts]
    if isinstance(tokenizer, Tokenizer):
        tokenizer.no_padding()  # a saved tokenizer.json may carry the padding of its last use
        # The library cuts the head itself; tail and head_tail are cut from the whole by keep_part
        tokenizer.enable_truncation(limit)
        return [np.array(e.ids, dtype="int32") for e in tokenizer.encode_batch(texts)]
    encoded = tokenizer(texts, truncation=truncation == "head",
                        max_length=max_len if truncation == "head" else None)["input_ids"]
    return [np.array(x, dtype="int32") for x in encoded]


def keep_part(ids, max_len, truncation):
    """ids ([CLS] text [SEP]) cut to max_len: the text's first tokens (head), its last (tail), or
    a quarter from its start and the rest from its end (head_tail; Sun et al., "How to Fine-Tune
    BERT for Text Classification?", 2019, kept 128 + 382 of 510 and did best on IMDB)."""
    if len(ids) <= max_len:
        return ids
    body, keep = ids[1:-1], max_len - 2
    head = {"head": keep, "tail": 0, "head_tail": keep // 4}[truncation]
    # [CLS] and [SEP] stay at the ends whatever part of the text is kept
    return np.concatenate([ids[:1], body[:head], body[len(body) - (keep - head):], ids[-1:]])


def tokenize(tokenizer, texts, max_len, cache_dir=None, truncation="head"):
    """encode_texts, cached on disk under a key of the texts, the tokenizer and the cut."""
    if not cache_dir:
        return encode_texts(tokenizer, texts, max_len, truncation)
    # The key covers the tokenizer, the cut and every text: a cached file is reused only when all
    # match
    cut = max_len if truncation == "head" else f"{max_len}|{truncation}"  # old keys stay valid
    key = hashlib.sha256(f"{tokenizer_fingerprint(tokenizer)}|{cut}|".encode())
    for text in texts:
        key.update(text.encode("utf-8", "surrogatepass") + b"\0")
    path = os.path.join(cache_dir, f"tokens-{key.hexdigest()[:32]}.npz")
    if os.path.exists(path):
        try:
            # allow_pickle=False: a cache file is data, whoever wrote it
            with np.load(path, allow_pickle=False) as cached:
                flat, offsets = cached["flat"], cached["offsets"]
            return [flat[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            print(f"note: {path} is damaged; tokenizing again", flush=True)
    ids = encode_texts(tokenizer, texts, max_len, truncation)
    offsets = np.cumsum([0] + [len(x) for x in ids])
    flat = np.concatenate(ids) if ids else np.zeros(0, dtype="int32")
    os.makedirs(cache_dir, exist_ok=True)

    def save(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would add .npz to a bare name
            np.savez(f, flat=flat, offsets=offsets)
    write_atomic(path, save)
    return ids


# ------------------------------------------------------------------------------ dataset and batches

class BERTDataset(torch.utils.data.Dataset):
    """Unpadded token ids and label ids (-1 when unlabelled) or multi-hot rows; items are
    (ids, label, index)."""

    def __init__(self, token_ids, labels=None):
        self.token_ids = token_ids
        self.labels = labels if labels is not None else [-1] * len(token_ids)
        # The lengths decide the batches: texts of similar length share one, so little is padding
        self.lengths = np.array([len(ids) for ids in token_ids])

    def __len__(self):
        return len(self.token_ids)

    def __getitem__(self, i):
        return self.token_ids[i], self.labels[i], i


def tokenized_splits(splits, tokenizer, labels, args):
    """{split: BERTDataset} of the splits that have examples: token ids and label ids."""
    datasets = {}
    for split, examples in splits.items():
        if examples:
            ids = tokenize(tokenizer, [text for text, _ in examples], args.max_len,
                           args.cache_dir, args.truncation)
            where = getattr(args, f"{split}_file", None) or f"{split} data"
            by_id = args.data_labels if args.label_file else None
            datasets[split] = BERTDataset(ids, label_ids(examples, labels, where, by_id))
    return datasets


class LengthBucketSampler(torch.utils.data.Sampler):
    """Shuffled batches of similar length: shuffle all indices, sort each window of `window`
    batches by length, cut it into batches, shuffle the batches. The order is a function of
    seed and epoch alone, so a resumed run can skip the batches it has done (`set_epoch(e, start)`).
    Under torchrun each of `world` processes takes every world-th text of each global batch.
    With longest_first (set_epoch) the batch of the most tokens comes first, so that a batch too
    large for the memory fails at once, not an hour in (Hugging Face's Trainer does the same)."""

    def __init__(self, lengths, batch_size, seed=0, window=100, rank=0, world=1):
        self.lengths, self.batch_size = lengths, batch_size * world
        self.seed, self.window = seed, window
        self.rank, self.world, self.epoch, self.start = rank, world, 0, 0
        self.longest_first = True

    def set_epoch(self, epoch, start=0, longest_first=True):
        self.epoch, self.start, self.longest_first = epoch, start, longest_first

    def global_batches(self):
        rng = np.random.default_rng(self.seed + self.epoch)
        order = rng.permutation(len(self.lengths))
        size = self.batch_size * self.window
        batches = []
        for begin in range(0, len(order), size):
            chunk = order[begin:begin + size]
            # Sorting within a window of 100 batches, not the whole epoch: batches stay similar in
            # length but the epoch's order is still random
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        # a batch too small to give every process a text is dropped (only ever under torchrun)
        batches = [batches[i] for i in rng.permutation(len(batches))
                   if len(batches[i]) >= self.world]
        if self.longest_first:  # texts x longest text: the padded batch's size in memory
            largest = max(range(len(batches)),
                          key=lambda i: len(batches[i]) * self.lengths[batches[i]].max())
            batches.insert(0, batches.pop(largest))
        return batches

    def __iter__(self):
        for batch in self.global_batches()[self.start:]:
            # Each process a strided share of the same global batch, so the global batch is the same
            # for any number of processes
            yield batch[self.rank::self.world].tolist()

    def __len__(self):
        """Batches in a whole epoch, whatever `start` is."""
        full, rest = divmod(len(self.lengths), self.batch_size)
        return full + (rest >= self.world)


def mask_tokens(input_ids, attention_mask, special_ids, mask_id, vocab_size, p=0.15,
                word_starts=None):
    """BERT's masking (Devlin et al., 2019): pick a share p of each text's tokens (never [CLS],
    [SEP] or padding); 80% of them become [MASK], 10% a random token, 10% stay as they are.
    With word_starts (a bool per vocabulary id: does this token begin a word?) whole words are
    picked: a share p of the words, with all of their pieces (BERT's whole-word masking).
    Returns (the masked ids, the picked positions, their original ids), at least one position
    per batch. The draws come from torch's generator: a seed and --resume fix every mask."""
    # Only real tokens may be hidden: [CLS], [SEP] and padding are never predicted
    candidates = attention_mask.bool() & ~torch.isin(input_ids, special_ids)
    picked = candidates & (torch.rand(input_ids.shape) < p)
    if word_starts is not None:  # a word is picked when its first piece is; its pieces follow
        starts = word_starts[input_ids] | ~candidates
        word = starts.long().cumsum(1) - 1  # each token's word, counted along its text
        chosen = torch.zeros_like(word).scatter_reduce(1, word, (picked & starts).long(), "amax")
        picked = candidates & chosen.gather(1, word).bool()
    if not picked.any():  # a batch of very short texts: predict one token all the same
        picked.view(-1)[candidates.view(-1).int().argmax()] = True
    roll = torch.rand(input_ids.shape)
    # 80% [MASK], 10% a random token, 10% unchanged (BERT): the model cannot assume an unmasked
    # token is right
    masked = torch.where(picked & (roll < 0.8), mask_id, input_ids)
    swap = picked & (roll >= 0.8) & (roll < 0.9)
    masked = torch.where(swap, torch.randint_like(input_ids, vocab_size), masked)
    return masked, picked, input_ids[picked]


def special_ids(tokenizer):
    """(the ids pretraining never masks: the special tokens such as [CLS] [SEP] [PAD], the id of
    [MASK]) of a tokenizer."""
    if isinstance(tokenizer, BERTSPTokenizer):
        # KoBERT's transform has no all_special_ids: its specials are named pieces of the
        # SentencePiece model
        ids = [tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id]
        return torch.tensor(ids), tokenizer.token_id("[MASK]")
    if tokenizer.mask_token_id is None:
        raise ModelError("--pretrain_epochs: the model's tokenizer has no mask token")
    return torch.tensor(tokenizer.all_special_ids), tokenizer.mask_token_id


def word_starts(tokenizer):
    """Which vocabulary ids begin a word, for --mask_whole_words: WordPiece marks the pieces
    that continue a word with ##, SentencePiece (KoBERT) and byte-level BPE (RoBERTa) mark the
    pieces that start one with ▁ or Ġ."""
    if isinstance(tokenizer, BERTSPTokenizer):
        pieces = [tokenizer.sp.id_to_piece(i) for i in range(len(tokenizer))]
    else:
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    # WordPiece marks continuations (##), SentencePiece and byte-level BPE mark starts: one of the
    # two decides
    if any(piece.startswith("##") for piece in pieces):
        return torch.tensor([not piece.startswith("##") for piece in pieces])
    if any(piece.startswith(("▁", "Ġ")) for piece in pieces):
        return torch.tensor([piece.startswith(("▁", "Ġ")) for piece in pieces])
    raise ModelError("--mask_whole_words: this tokenizer marks neither where words start nor "
                     "where they continue")


def masking_for(tokenizer, vocab_size, rate, whole_words=False, keep_originals=False):
    """Pretraining's batch transform: mask_tokens on a batch's ids, the hidden tokens becoming its
    labels (as transformers' DataCollatorForLanguageModeling, a step of making batches).
    keep_originals (replaced-token detection): the unmasked ids too, for the discriminator."""
    hidden, mask_id = special_ids(tokenizer)  # never masked; what masked tokens become
    starts = word_starts(tokenizer) if whole_words else None

    def masking(batch):
        ids, positions, targets = mask_tokens(batch["input_ids"], batch["attention_mask"], hidden,
                                              mask_id, vocab_size, rate, starts)
        originals = {"original_ids": batch["input_ids"]} if keep_originals else {}
        return {**batch, "input_ids": ids, "positions": positions, "labels": targets, **originals}
    # A closure over the tokenizer's facts, called on each CPU batch in the training loop
    return masking


def length_sorted_batches(lengths, batch_size):
    """Batches for evaluation, longest first, so padding is minimal and memory peaks early."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]


def pad_to_longest(batch, pad_id, multiple=1):
    """Collate (ids, label, index) items into tensors padded to the batch's longest text
    (rounded up to `multiple`, pad_multiple's)."""
    longest = -(-max(len(ids) for ids, _, _ in batch) // multiple) * multiple
    # Built in numpy and handed to torch without a copy: collating costs little per batch
    input_ids = np.full((len(batch), longest), pad_id, dtype="int64")
    attention_mask = np.zeros((len(batch), longest), dtype="int64")
    for row, (ids, _, _) in enumerate(batch):
        input_ids[row, :len(ids)] = ids
        attention_mask[row, :len(ids)] = 1
    return {"input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(np.array([label for _, label, _ in batch])),
            "index": torch.from_numpy(np.array([i for _, _, i in batch], dtype="int64"))}


def pad_multiple(device):
    """What batches are padded to a multiple of on device: XLA compiles once per shape (few
    shapes); CUDA's tensor cores and attention kernels run aligned lengths faster. The heads ignore
    padding, so predictions do not change."""
    return {"xla": 32, "cuda": 8}.get(device.type, 1)


def make_loader(dataset, batch_sampler, pad_id, num_workers=0, seed=0, pad_multiple=1):
    # its own generator: creating the iterator must not draw from the global RNG (exact resume)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, num_workers=num_workers,
        collate_fn=functools.partial(pad_to_longest, pad_id=pad_id, multiple=pad_multiple),
        # A fixed generator for the loader's own draws (worker seeds), apart from the one training
        # uses
        generator=torch.Generator().manual_seed(seed))
