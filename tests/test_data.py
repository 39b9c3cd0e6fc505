import hashlib
import http.server
import io
import os
import tarfile
import threading

import numpy as np
import pytest
from conftest import SAMPLE, shared_file
from helpers import reviews, write

from _1_data import (
    BERTDataset,
    LengthBucketSampler,
    download,
    encode_texts,
    label_ids,
    label_list,
    length_sorted_batches,
    pad_to_longest,
    read_imdb,
    read_nsmc,
    read_table,
    split_off,
    take_subset,
    tokenize,
)
from _2_model import train_wordpiece
from common import DataError, sha256_of


def test_nsmc_quoted_and_empty_rows(tmp_path):
    # pandas to_csv quotes documents containing '"' and writes empty documents as empty fields
    path = write(
        tmp_path,
        "ratings.txt",
        'id\tdocument\tlabel\n1\t"""최고"" 라는 말\ttab"\t1\n2\t\t0\n3\t보통\t0\n',
    )
    assert read_table(path, "document", "label") == [
        ('"최고" 라는 말\ttab', "1"),
        ("", "0"),
        ("보통", "0"),
    ]


def test_csv_with_bom_and_crlf(tmp_path):
    path = write(
        tmp_path, "d.csv", b'\xef\xbb\xbftext,label\r\n"a, b",pos\r\n"two\r\nlines",neg\r\n'
    )
    assert read_table(path) == [("a, b", "pos"), ("two\r\nlines", "neg")]


def test_jsonl_with_int_labels_and_blank_lines(tmp_path):
    path = write(
        tmp_path,
        "d.jsonl",
        '{"sentence": "좋아요", "label": 1}\n\n{"sentence": "별로", "label": 0}\n',
    )
    assert read_table(path) == [("좋아요", "1"), ("별로", "0")]


def test_column_inference_and_explicit_columns(tmp_path):
    path = write(tmp_path, "d.tsv", "sentiment\tReview\tother\npos\tgreat\tx\n")
    assert read_table(path) == [("great", "pos")]
    assert read_table(path, "other", "sentiment") == [("x", "pos")]
    with pytest.raises(DataError, match="no column 'body'.*--text_column"):
        read_table(path, text_column="body")


@pytest.mark.parametrize(
    "name, data, message",
    [
        (
            "bad.jsonl",
            '{"text": "a", "label": 1}\n{"text": "b", "label"\n',
            r"bad.jsonl:2: not valid JSON",
        ),
        ("bad.tsv", "text\tlabel\na\t1\nb\t1\textra\n", r"bad.tsv:3: expected 2 fields"),
        ("bad.csv", "body,stars\na,1\n", r"bad.csv: no text column among \['body', 'stars'\]"),
        ("empty.tsv", "", r"empty.tsv: the file is empty"),
        ("header.tsv", "text\tlabel\n", r"header.tsv: the file has no rows"),
        ("latin1.tsv", b"text\tlabel\ncaf\xe9\t1\n", r"latin1.tsv:2: not UTF-8 text"),
        ("binary.tsv", b"text\tlabel\n\x00\x01\x02\t1\n", r"binary.tsv: contains NUL bytes"),
        ("nolabel.tsv", "text\tlabel\na\t\n", r"nolabel.tsv:2: missing label"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, name, data, message):
    with pytest.raises(DataError, match=message):
        read_table(write(tmp_path, name, data))


def test_missing_file():
    with pytest.raises(DataError, match="nope.tsv: no such file"):
        read_table("nope.tsv")


def test_label_maps():
    assert label_list([("a", y) for y in ("10", "2", "1", "2")]) == ["1", "2", "10"]
    assert label_list([("a", y) for y in ("pos", "neg", "neutral")]) == ["neg", "neutral", "pos"]
    assert label_ids([("a", "pos"), ("b", "neg")], ["neg", "pos"], "x") == [1, 0]
    with pytest.raises(DataError, match=r"test data: labels \['maybe'\] never appear in training"):
        label_ids([("a", "maybe")], ["neg", "pos"], "test data")


def test_subsets_and_splits_are_seeded():
    examples = [(str(i), str(i % 2)) for i in range(100)]
    assert (
        take_subset(examples, 10, 1) == take_subset(examples, 10, 1) != take_subset(examples, 10, 2)
    )
    sub = take_subset(examples, 10, 1)
    assert sub == sorted(sub, key=lambda ex: int(ex[0]))  # original order kept
    train, valid = split_off(examples, 0.2, 0)
    assert len(valid) == 20 and len(train) == 80 and not set(train) & set(valid)
    assert split_off(examples, 0.2, 0) == (train, valid)


def test_length_bucket_sampler_covers_everything_with_little_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 128, size=5000)
    sampler = LengthBucketSampler(lengths, 32, seed=7)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 157
    assert sorted(i for b in batches for i in b) == list(range(5000))
    assert batches == list(sampler)  # same epoch, same order
    sampler.set_epoch(1)
    assert list(sampler) != batches
    padded = sum(len(b) * lengths[b].max() for b in batches)
    random_padded = sum(
        len(b) * lengths[b].max() for b in np.array_split(rng.permutation(5000), 157)
    )
    assert padded < 0.6 * random_padded  # bucketing pads far less than random batches
    assert padded < 1.1 * lengths.sum()


def test_pad_to_longest_and_sorted_batches():
    dataset = BERTDataset(
        [np.array([2, 5, 3]), np.array([2, 3]), np.array([2, 7, 8, 9, 3])], [1, 0, 1]
    )
    batches = length_sorted_batches(dataset.lengths, 2)
    assert batches == [[2, 0], [1]]
    batch = pad_to_longest([dataset[i] for i in batches[0]], pad_id=0)
    assert batch["input_ids"].tolist() == [[2, 7, 8, 9, 3], [2, 5, 3, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [1, 1] and batch["index"].tolist() == [2, 0]


def test_tokenize_cache_round_trip(tmp_path, minilm):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm)
    texts = ["a short one", "", "a much longer sentence " * 20]
    fresh = tokenize(tokenizer, texts, 16, str(tmp_path))
    assert [len(x) for x in fresh] == [5, 2, 16] and fresh[2][-1] == tokenizer.sep_token_id
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].endswith(".npz")
    cached = tokenize(tokenizer, texts, 16, str(tmp_path))
    assert [x.tolist() for x in cached] == [x.tolist() for x in fresh]
    tokenize(tokenizer, texts, 32, str(tmp_path))
    assert len(os.listdir(tmp_path)) == 2  # max_len is part of the key


@pytest.fixture
def http_folder(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/'served'."""
    served = tmp_path / "served"
    served.mkdir()
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(
        *a, directory=str(served), **k
    )  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_verifies_sha256(http_folder, tmp_path):
    served, url = http_folder
    (served / "f.txt").write_bytes("id\tdocument\tlabel\n1\t좋다\t1\n".encode())
    good = hashlib.sha256((served / "f.txt").read_bytes()).hexdigest()
    dest = tmp_path / "out" / "f.txt"
    with pytest.raises(DataError, match="does not match"):
        download(f"{url}/f.txt", str(dest), "0" * 64)
    assert not dest.parent.exists() or os.listdir(dest.parent) == []  # nothing half-written left
    download(f"{url}/f.txt", str(dest), good)
    assert sha256_of(str(dest)) == good
    with pytest.raises(DataError, match="could not download"):
        download(f"{url}/missing.txt", str(tmp_path / "out" / "m.txt"), good)


def test_imdb_archive_layout(tmp_path):
    buf = tmp_path / "aclImdb_v1.tar.gz"
    with tarfile.open(buf, "w:gz") as tar:
        for name, text in [
            ("aclImdb/train/pos/10_9.txt", "Great.<br /><br />Loved it"),
            ("aclImdb/train/pos/2_8.txt", "Fine"),
            ("aclImdb/train/neg/0_1.txt", "Bad"),
            ("aclImdb/test/neg/5_2.txt", "Awful"),
            ("aclImdb/train/unsup/1_0.txt", "skip"),
            ("aclImdb/README", "readme"),
        ]:
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    splits = read_imdb(str(tmp_path))
    assert splits["train"] == [("Bad", "neg"), ("Fine", "pos"), ("Great.  Loved it", "pos")]
    assert splits["test"] == [("Awful", "neg")]


def test_real_nsmc_is_complete():
    folder = os.path.dirname(shared_file("nsmc", "ratings_train.txt"))
    assert sha256_of(os.path.join(folder, "ratings_train.txt")).startswith("e03b7d14")
    splits = read_nsmc(folder)  # present and verified: no download
    assert [len(splits["train"]), len(splits["test"])] == [150000, 50000]
    assert [sum(t == "" for t, _ in splits[s]) for s in ("train", "test")] == [5, 3]
    assert {label for _, label in splits["train"]} == {"0", "1"}


def test_shipped_sample_is_real_nsmc_rows():
    train = os.path.join(SAMPLE, "ratings_train.txt")
    full = shared_file("nsmc", "ratings_train.txt")
    with open(full, "rb") as f:
        rows = set(f.read().split(b"\n"))
    with open(train, "rb") as f:
        sample = [r for r in f.read().split(b"\n") if r]
    assert len(sample) == 10001 and all(r in rows for r in sample)


# ------------------------------------------------------------- hostile tables, caches and texts


def test_stray_quotes_in_a_tsv_lose_no_rows(tmp_path):
    rows = "".join(('"' if i == 10 else "") + f"review {i}\t{i % 2}\n" for i in range(100))
    examples = read_table(write(tmp_path, "d.tsv", "text\tlabel\n" + rows))
    assert len(examples) == 100 and examples[10] == ('"review 10', "0")


def test_damaged_cache_entries_are_rebuilt(tmp_path, capsys):
    texts = reviews(200)
    tokenizer = train_wordpiece(texts, 1000, str(tmp_path))
    tokenize(tokenizer, texts, 32, str(tmp_path))
    for name in os.listdir(tmp_path):
        open(tmp_path / name, "w").close()  # truncated to zero bytes
    assert len(train_wordpiece(texts, 1000, str(tmp_path))) > 500
    assert (
        tokenize(tokenizer, texts, 32, str(tmp_path))[5].tolist()
        == encode_texts(tokenizer, texts, 32)[5].tolist()
    )
    printed = capsys.readouterr().out
    assert "is damaged; learning the vocabulary again" in printed
    assert "is damaged; tokenizing again" in printed


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "\\ud800", "label": 1}', ":1: a lone surrogate"),
        ('{"text": ' + "[" * 100000 + "]" * 100000 + ', "label": 1}', ":1: JSON nested too deeply"),
        ('{"text": "a", "label": NaN}', ":1: label NaN is not a class name"),
        ('{"text": "a", "label": 1.0}', ":1: label 1.0 is not a class name"),
        ('{"text": "a", "label": true}', ":1: label true is not a class name"),
    ],
)
def test_bad_jsonl_lines_are_one_line(tmp_path, line, message):
    with pytest.raises(DataError, match=message):
        read_table(write(tmp_path, "d.jsonl", line + "\n"))


@pytest.mark.parametrize(
    "content, columns, message",
    [
        ("text\tlabel\na\tNaN\n", {}, ':2: label "NaN" is not a class name'),
        ("text\ttext\tlabel\na\tb\t1\n", {}, ":1: the header names ['text'] more than once"),
        (
            "text\tlabel\na\t1\n",
            {"text_column": "label", "label_column": "label"},
            "'label' cannot be both the text and the label column",
        ),
    ],
)
def test_ambiguous_tables_are_one_line(tmp_path, content, columns, message):
    with pytest.raises(DataError) as e:
        read_table(write(tmp_path, "d.tsv", content), **columns)
    assert message in str(e.value)


def test_a_huge_unbroken_text_costs_what_is_kept(tmp_path):
    tokenizer = train_wordpiece(reviews(200), 1000, str(tmp_path))
    huge = "가" * 4_000_000
    ids = encode_texts(tokenizer, [huge], 128)[0]
    assert np.array_equal(ids, encode_texts(tokenizer, [huge[: 128 * 50]], 128)[0])


def test_a_file_in_korean_excel_s_encoding_is_named_on_its_own_line(tmp_path):
    """CP949 (EUC-KR) bytes on line 10,006 after 10,004 rows of ASCII: the error names that line
    (not the one the decoder had reached reading ahead) and --encoding cp949 reads the file."""
    rows = "".join(f"review {i}\t{i % 2}\n" for i in range(10004))
    path = write(
        tmp_path, "excel.tsv", b"text\tlabel\n" + rows.encode() + "좋은 영화\t1\n".encode("cp949")
    )
    with pytest.raises(DataError, match=r"excel.tsv:10006: not UTF-8 text .*--encoding cp949"):
        read_table(path)
    assert read_table(path, encoding="cp949")[-1] == ("좋은 영화", "1")
