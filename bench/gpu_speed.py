"""Training speed on whatever GPU is here: this repository against Hugging Face's Trainer, on
the same BERT-base-shaped model (random weights, built from a config), data and precision.

    python3 bench/gpu_speed.py                          # the GPU at hand: the prepared check
    python3 bench/gpu_speed.py --shape tiny --samples 64 --max_lens 32 --imdb_texts 0   # a CPU

  ours     _3_main.py: batches of similar length padded to their longest text
  grouped  Trainer with DataCollatorWithPadding and train_sampling_strategy="group_by_length"
           (batches of similar length, as bench/train_speed.py's reference arm), in the precision
           --precision auto picks here (fp16 on 7.x, bf16 from 8.0)

For each --max_lens value both train one epoch on --samples texts; printed per arm: samples/s,
real (unpadded) tokens/s, model FLOPs utilisation against the matmul rate measured in this run in
that precision, and peak memory (GPU: torch's peak allocation; CPU: peak resident memory). Then
the IMDB setting of the RoBERTa notebooks, ours at --max_len 512, batch 32, as a Colab T4 would run
it: memory capped at 15 GiB and attention forced to PyTorch's math path (a T4 has no bf16
memory-efficient kernel): does it fit, and how fast. Texts: SST-2 sentences joined into reviews
of IMDB's lengths (--sst2, 3.8 MB, carried along) or, without it, synthetic words.
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_speed import training_flops  # noqa: E402

SHAPES = {  # BERT-base (roberta-base, klue/roberta-base, kcbert-base have this shape), and a toy
    "base": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
    },
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 128,
    },
}


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    a = p.add_argument
    a("--shape", choices=SHAPES, default="base", help="the model's shape (random weights)")
    a("--samples", type=int, default=4096, help="training texts per arm and length")
    a("--max_lens", default="128,512", help="comma-separated --max_len values")
    a("--batch_size", type=int, default=32, help="training batch size of both arms")
    a(
        "--imdb_texts",
        type=int,
        default=1024,
        help="texts of the capped IMDB-setting run (0: skip it)",
    )
    a(
        "--sst2",
        default=os.path.join(os.path.dirname(ROOT), "shared", "data", "sst2", "train.tsv"),
        help="SST-2 train.tsv to build texts from (synthetic words when missing)",
    )
    a("--worker", help=argparse.SUPPRESS)  # internal: one arm, in its own process
    a("--flags", help=argparse.SUPPRESS)
    return p


# ----------------------------------------------------------------------------- model and data


def make_texts(args, n, rng):
    """n labelled texts whose lengths spread like IMDB reviews (median ~230 words, long tail)."""
    if os.path.isfile(args.sst2):
        rows = [line.rstrip("\n").split("\t") for line in open(args.sst2, encoding="utf-8")][1:]
        sentences = [(text, label) for label, text in rows]
    else:
        words = [f"w{i}" for i in range(5000)]
        sentences = [(" ".join(rng.choice(words, 12)), str(i % 2)) for i in range(5000)]
    texts = []
    for _ in range(n):
        words, label = [], sentences[int(rng.integers(len(sentences)))][1]
        target = int(np.clip(rng.lognormal(np.log(230), 0.7), 10, 2000))
        while len(words) < target:
            words += sentences[int(rng.integers(len(sentences)))][0].split()
        texts.append((" ".join(words[:target]), label))
    return texts


def write_model(folder, shape, texts):
    """A BERT of `shape` with random weights and a WordPiece learned on the texts, as a folder
    both arms load by path."""
    from transformers import BertConfig, BertForSequenceClassification

    from _2_model import train_wordpiece

    tokenizer = train_wordpiece([t for t, _ in texts], 30522 if shape == "base" else 2000)
    config = BertConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        **SHAPES[shape],
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write_tsv(path, texts):
    with open(path, "w", encoding="utf-8") as f:
        f.write("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in texts))


# ----------------------------------------------------------------------------- the arms


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ours(flags):
    """_3_main.py in this process (for its peak memory): (seconds, samples/s of the epoch)."""
    import _3_main

    out = flags[flags.index("--output_dir") + 1]
    _3_main.main(flags)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        row = json.loads(f.readline())
    return row["n_train"] / row["train_samples_per_s"]


def grouped(flags):
    """Trainer on the same files, in the precision --precision auto picks here."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from inference import auto_precision

    flag = dict(zip(flags[::2], flags[1::2]))
    tokenizer = AutoTokenizer.from_pretrained(flag["--model"])
    rows = [line.rstrip("\n").split("\t") for line in open(flag["--train_file"], encoding="utf-8")][
        1:
    ]
    ids = tokenizer([t for t, _ in rows], truncation=True, max_length=int(flag["--max_len"]))[
        "input_ids"
    ]
    features = [{"input_ids": x, "labels": int(y)} for x, (_, y) in zip(ids, rows)]
    model = AutoModelForSequenceClassification.from_pretrained(flag["--model"], num_labels=2)
    cuda = torch.cuda.is_available()
    precision = auto_precision(torch.device("cuda" if cuda else "cpu"))[0]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            model=model,
            data_collator=DataCollatorWithPadding(tokenizer),
            train_dataset=features,
            args=TrainingArguments(
                output_dir=tmp,
                per_device_train_batch_size=int(flag["--train_batch_size"]),
                num_train_epochs=1,
                learning_rate=5e-5,
                weight_decay=0.01,
                warmup_steps=0.1,
                lr_scheduler_type="cosine",
                max_grad_norm=1.0,
                seed=42,
                fp16=precision == "fp16",
                bf16=precision == "bf16",
                use_cpu=not cuda,
                save_strategy="no",
                logging_strategy="no",
                report_to="none",
                disable_tqdm=True,
                train_sampling_strategy="group_by_length",
            ),
        )
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start


def run_worker(args):
    """One arm in this process; prints its seconds and peak memory as JSON."""
    flags = json.loads(args.flags)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cap = os.environ.get("GPU_MEMORY_CAP_GIB")
    if cap and device.type == "cuda":  # what a 15 GiB T4 leaves a run
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, float(cap) * 2**30 / total))
    math_only = (
        torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)
        if cap
        else contextlib.nullcontext()
    )
    from common import TrainingError

    try:
        with math_only:
            seconds = {"ours": ours, "grouped": grouped}[args.worker](flags)
    except (torch.OutOfMemoryError, TrainingError) as e:  # ours says out of memory in one line
        if "out of memory" not in str(e).lower():
            raise
        seconds = None
    print(json.dumps({"seconds": seconds, "peak_mib": peak_memory_mib(device)}))


def run_arm(arm, flags, env=None):
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", arm, "--flags", json.dumps(flags)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})},
    )
    if result.returncode:
        sys.exit(f"error: the {arm} arm exited {result.returncode}:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- measuring


def matmul_rate(device, dtype, n=4096):
    """Best matmul FLOP/s in dtype here (n x n by n x n): the MFU denominator."""
    n = n if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(10):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def main():
    args = build_parser().parse_args()
    if args.worker:
        return run_worker(args)
    import transformers
    from transformers import AutoModel, AutoTokenizer

    from inference import PRECISIONS, auto_precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision, why = auto_precision(device)
    rate = matmul_rate(device, PRECISIONS[precision] or torch.float32)
    rng = np.random.default_rng(0)
    texts = make_texts(args, args.samples + args.imdb_texts, rng)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(
        f"{name}, torch {torch.__version__}; precision {precision} ({why}); matmul "
        f"{rate / 1e12:.2f} TFLOP/s in it; shape {args.shape}, {args.samples} texts, batch "
        f"{args.batch_size}",
        flush=True,
    )
    transformers.logging.set_verbosity_error()  # the new head's load report, not a result
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        write_model(model, args.shape, texts)
        encoder = AutoModel.from_pretrained(model)
        embedding = sum(p.numel() for p in encoder.embeddings.parameters())
        pooler = sum(p.numel() for p in encoder.pooler.parameters())
        non_embedding = sum(p.numel() for p in encoder.parameters()) - embedding - pooler
        layers, hidden = encoder.config.num_hidden_layers, encoder.config.hidden_size
        tokenizer = AutoTokenizer.from_pretrained(model)
        settings = [
            (int(n), args.batch_size, texts[: args.samples], None, ("ours", "grouped"))
            for n in args.max_lens.split(",")
        ]
        if args.imdb_texts:
            settings.append((512, 32, texts[args.samples :], "15", ("ours",)))
        print(
            f"{'setting':28} {'arm':8} {'samples/s':>9} {'tokens/s':>9} {'MFU':>5} "
            f"{'peak MiB':>9}"
        )
        for max_len, batch, part, cap, arms in settings:
            data = os.path.join(tmp, f"train{max_len}{cap or ''}.tsv")
            write_tsv(data, part)
            lengths = [
                min(len(ids), max_len)
                for ids in tokenizer([t for t, _ in part], truncation=False)["input_ids"]
            ]
            flops = training_flops(lengths, non_embedding, layers, hidden)
            flags = [
                "--model",
                model,
                "--train_file",
                data,
                "--max_len",
                str(max_len),
                "--train_batch_size",
                str(batch),
                "--total_epochs",
                "1",
                "--lr",
                "5e-5",
                "--output_dir",
                os.path.join(tmp, f"out{max_len}{cap or ''}"),
                "--cache_dir",
                "",
                "--test_batch_size",
                "64",
            ]
            setting = f"max_len {max_len}, batch {batch}" + (
                f", {cap} GiB, math attn." if cap else ""
            )
            for arm in arms:
                r = run_arm(arm, flags, {"GPU_MEMORY_CAP_GIB": cap} if cap else None)
                if r["seconds"] is None:
                    print(f"{setting:28} {arm:8} {'out of memory':>25} {r['peak_mib']:9.0f}")
                    continue
                print(
                    f"{setting:28} {arm:8} {len(part) / r['seconds']:9.1f} "
                    f"{sum(lengths) / r['seconds']:9.0f} {flops / r['seconds'] / rate:5.0%} "
                    f"{r['peak_mib']:9.0f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
