"""Helpers the test files share (no test file imports another): texts and data, small models
and checkpoint info, training flags, killing and finishing runs, and reading what they wrote."""

import json
import os
import subprocess
import sys
import time

from conftest import ROOT, SAMPLE
from safetensors.torch import load_file

from _1_data import read_table


def reviews(n=2000, start=0):
    """n reviews of the shipped NSMC sample's training file, from `start` on."""
    return [t for t, _ in read_table(os.path.join(SAMPLE, "ratings_train.txt"))][start : start + n]


def info_for(labels, names, max_len=128):
    return {"args": {"max_len": max_len, "dr_rate": 0.1}, "labels": labels, "label_names": names}


def family_backbone(family, tokenizer):
    """A small random RoBERTa or ELECTRA encoder (ELECTRA with a narrower embedding, projected)."""
    from transformers import ElectraConfig, ElectraModel, RobertaConfig, RobertaModel

    kw = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    if family == "roberta":
        return RobertaModel(RobertaConfig(**kw, max_position_embeddings=130))
    return ElectraModel(ElectraConfig(**kw, embedding_size=32))


CHECK_TEXTS = [
    "이 영화 정말 재밌다",
    "최악",
    "Not bad at all, really!",
    "ㅋㅋㅋ 배우 연기 👍 " * 100,
    "漢字 ☃ \t x",
    "",
]


def write(folder, name, data):
    """folder/name holding data (text as UTF-8, or bytes); its path as a string."""
    path = folder / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return str(path)


def write_tsv(path, rows):
    path.write_text(
        "text\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in rows), encoding="utf-8"
    )
    return path


def flags(train, out, *extra):
    return [
        "--model",
        "tiny",
        "--mlm_epochs",
        "0",
        "--train_file",
        str(train),
        "--total_epochs",
        "1",
        "--max_len",
        "16",
        "--train_batch_size",
        "16",
        "--cache_dir",
        "",
        "--output_dir",
        str(out),
        *map(str, extra),
    ]


ROWS = [(text, i % 2) for i, text in enumerate(reviews(64))]


def one_line_error(result, pattern):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert pattern in lines[0], lines[0]


def preset_args(model, out, *extra):
    return [
        "--model",
        model,
        "--data_dir",
        SAMPLE,
        "--max_train_samples",
        "48",
        "--max_eval_samples",
        "16",
        "--total_epochs",
        "1",
        "--train_batch_size",
        "16",
        "--cache_dir",
        "",
        "--output_dir",
        str(out),
        *map(str, extra),
    ]


def train_args(data, out, *extra):
    """Tiny on the small data; the shared cache gives every run the same learned vocabulary."""
    args = [
        "--model",
        "tiny",
        "--mlm_epochs",
        0,
        "--train_file",
        data / "train.jsonl",
        "--test_file",
        data / "test.jsonl",
        "--total_epochs",
        2,
        "--train_batch_size",
        16,
        "--max_len",
        32,
        "--output_dir",
        out,
        "--cache_dir",
        data / "cache",
        "--precision",
        "fp32",
        "--device",
        "cpu",
        *extra,
    ]
    return [str(a) for a in args]  # strings, as argv holds them


def command(args):
    return [sys.executable, os.path.join(ROOT, "_3_main.py"), *map(str, args)]


# One intra-op thread: with two, torch's CPU kernels differ in the last bits from run to run in
# about 1 of 10 identical fresh runs (no kill at all), which an exact comparison cannot absorb.
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
}


def latest_state(out):
    try:
        with open(out / "states" / "latest") as f:
            return f.read()
    except FileNotFoundError:
        return None


def kill_after_next_state(args, out, rng):
    """Start training, SIGKILL it at a random moment after it has written a state newer than now."""
    before = latest_state(out)
    proc = subprocess.Popen(
        command(args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 300
    while latest_state(out) in (None, before) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(rng.uniform(0, 0.6))  # anywhere: mid-step, mid-save, mid-evaluation
    proc.kill()
    proc.wait()
    return proc.returncode


def finish(args):
    """A run to its end, with the same one-thread environment as the killed runs."""
    subprocess.run(command(args), env=ENV, check=True, capture_output=True, timeout=600)


def weights(out):
    return load_file(str(out / "model.safetensors"))


def metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [
        {k: v for k, v in row.items() if k.startswith(("train_loss", "train_accuracy", "test"))}
        for row in rows
    ]


def kill_at_state(args, out, step):
    """Start training and SIGKILL it as soon as a state of optimizer step `step` or later exists."""
    proc = subprocess.Popen(
        command(args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        name = latest_state(out)
        if name and int(name[5:13]) >= step:
            break
        time.sleep(0.01)
    proc.kill()
    return proc.wait()
