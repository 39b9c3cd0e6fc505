"""Fine-tune a BERT-family encoder for document classification.

    python3 _3_main.py --model tiny --data_dir data/nsmc_sample          # offline, minutes on a CPU
    python3 _3_main.py --model kobert --head_name pooler --dr_rate 0.5   # the KoBERT notebook

The training loop is written out below: AdamW without decay on biases and LayerNorm, cosine
schedule with linear warmup, gradient clipping and accumulation, autocast per --precision.
"""
import argparse
import functools
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from _1_data import (NSMC_LABEL_NAMES, BERTDataset, DataError, LengthBucketSampler, label_ids, label_list,
                     length_sorted_batches, load_corpus, pad_to_longest, tokenize)
from _2_model import (HEADS, PRESET_DEFAULTS, PRESETS, BERTClassifier, ModelError, load_backbone,
                      predict_logits, save_checkpoint)


class ArgumentParser(argparse.ArgumentParser):
    """Bad flags get one line naming the flag and what is allowed, not the whole usage; exit 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    # data
    a("--data", choices=["nsmc", "imdb"], default="nsmc", help="built-in corpus, used when no --train_file")
    a("--data_dir", default=None, help="folder of the corpus (default data/nsmc or data/imdb); downloaded when missing")
    a("--train_file", help="TSV/CSV/JSONL with a header, instead of --data")
    a("--valid_file", help="validation file; the checkpoint kept is the best on it")
    a("--test_file", help="test file, evaluated every epoch, never used for selection")
    a("--text_column", help="text column (default: document, text, sentence, review, ...)")
    a("--label_column", help="label column (default: label, labels, sentiment, ...)")
    a("--label_names", help="comma-separated display names in label order (NSMC: 부정,긍정)")
    a("--valid_ratio", type=float, default=0.0, help="carve this share of train as a seeded validation split")
    a("--max_train_samples", type=int, default=0, help="seeded subset of the training set (0: all)")
    a("--max_eval_samples", type=int, default=0, help="seeded subset of valid and test (0: all)")
    a("--min_chars", type=int, default=0, help="drop texts shorter than this many characters")
    a("--max_len", type=int, default=128, help="truncate texts to this many tokens, [CLS] and [SEP] included")
    a("--cache_dir", default=".cache", help="tokenized features are cached here ('' to disable)")
    # model
    a("--model", default="klue-roberta",
      help=f"preset ({', '.join(PRESETS)}), Hugging Face hub id, or local model folder")
    a("--head_name", default="cls", help=f"classification head: {', '.join(HEADS)}")
    a("--dr_rate", type=float, default=0.1, help="dropout rate in the head")
    a("--freeze_backbone", action="store_true", help="train the head only")
    # optimisation
    a("--train_batch_size", type=int, default=32, help="examples per training batch")
    a("--test_batch_size", type=int, default=128, help="examples per evaluation batch")
    a("--grad_accum_steps", type=int, default=1, help="batches per optimizer step")
    a("--lr", type=float, default=5e-5, help="peak learning rate of AdamW")
    a("--weight_decay", type=float, default=0.01, help="AdamW weight decay (none on biases and LayerNorm)")
    a("--warmup_rate", type=float, default=0.1, help="share of optimizer steps with linear warmup")
    a("--total_epochs", type=int, default=3, help="passes over the training set")
    a("--max_grad_norm", type=float, default=1.0, help="clip gradients to this norm (0: no clipping)")
    a("--seed", type=int, default=42, help="seed for python, numpy and torch")
    # machine
    a("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
      help="autocast dtype; auto is bf16 on GPUs that support it, else fp32")
    a("--device", choices=["auto", "cpu", "cuda", "xla"], default="auto", help="auto: cuda when available")
    a("--num_workers", type=int, default=0, help="data-loader worker processes")
    a("--output_dir", default="checkpoint", help="checkpoint folder: weights, config, tokenizer, metrics.jsonl")
    a("--log_interval", type=int, default=20, help="steps between progress-bar updates")
    return p


def parse_args(argv=None):
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    parser.set_defaults(**PRESET_DEFAULTS.get(known.model, {}))  # preset defaults; given flags still win
    args = parser.parse_args(argv)
    checks = [("train_batch_size", args.train_batch_size > 0), ("test_batch_size", args.test_batch_size > 0),
              ("grad_accum_steps", args.grad_accum_steps > 0), ("lr", args.lr > 0),
              ("max_len", args.max_len >= 3), ("total_epochs", args.total_epochs > 0),
              ("warmup_rate", 0 <= args.warmup_rate <= 1), ("dr_rate", 0 <= args.dr_rate < 1),
              ("valid_ratio", 0 <= args.valid_ratio < 1), ("weight_decay", args.weight_decay >= 0),
              ("max_grad_norm", args.max_grad_norm >= 0), ("log_interval", args.log_interval > 0),
              ("num_workers", args.num_workers >= 0)]
    for flag, ok in checks:
        if not ok:
            parser.error(f"--{flag} {getattr(args, flag)} is out of range")
    if args.head_name not in HEADS:
        parser.error(f"--head_name {args.head_name!r} is not one of {', '.join(HEADS)}")
    if args.valid_file and args.valid_ratio:
        parser.error("give --valid_file or --valid_ratio, not both")
    return args


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def choose_device(name):
    if name == "xla":
        try:
            import torch_xla.core.xla_model as xm
        except ImportError:
            raise ModelError("--device xla needs torch-xla: pip install torch==2.9.0 torch-xla==2.9.0 "
                             "(in its own environment; see README)") from None
        return xm.xla_device()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda: no CUDA GPU is visible to torch")
    return torch.device(name)


def autocast_dtype(precision, device):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def param_groups(model, weight_decay):
    """AdamW groups: no weight decay on biases and LayerNorm weights (1-d tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def cosine_with_warmup(optimizer, warmup_steps, total_steps):
    """Linear warmup from 0 to the peak lr, then cosine decay to 0."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def classification_metrics(labels, predictions, num_classes):
    """Accuracy and macro-F1 (classes absent from both labels and predictions are skipped)."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    f1s = []
    for c in range(num_classes):
        tp = np.sum((predictions == c) & (labels == c))
        support = np.sum(labels == c) + np.sum(predictions == c)
        if support:
            f1s.append(2 * tp / support)
    return {"accuracy": float(np.mean(labels == predictions)), "macro_f1": float(np.mean(f1s))}


def evaluate(model, loader, device, dtype):
    """Loss, accuracy, macro-F1 and probabilities (in dataset order) over a labelled loader."""
    logits = torch.from_numpy(predict_logits(model, loader, device, dtype))
    labels = torch.tensor(loader.dataset.labels)
    result = classification_metrics(labels, logits.argmax(-1), logits.shape[1])
    return {"loss": F.cross_entropy(logits, labels).item(), **result, "probs": logits.softmax(-1).numpy()}


def make_loader(dataset, batch_sampler, pad_id, num_workers=0):
    return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers,
                                       collate_fn=functools.partial(pad_to_longest, pad_id=pad_id))


def main(argv=None):
    args = parse_args(argv)
    seed_everything(args.seed)
    device = choose_device(args.device)
    dtype = autocast_dtype(args.precision, device)

    splits = load_corpus(args)
    labels = label_list([label for _, label in splits["train"]])
    if len(labels) < 2:
        raise DataError(f"training data has only one label ({labels[0]}); need two or more classes")
    names = args.label_names.split(",") if args.label_names else (
        NSMC_LABEL_NAMES if args.data == "nsmc" and not args.train_file and labels == ["0", "1"] else labels)
    if len(names) != len(labels):
        raise DataError(f"--label_names gives {len(names)} names for {len(labels)} labels {labels}")

    backbone, tokenizer = load_backbone(args.model, [text for text, _ in splits["train"]])
    loaders = {}
    for split, examples in splits.items():
        if not examples:
            continue
        ids = tokenize(tokenizer, [text for text, _ in examples], args.max_len, args.cache_dir)
        dataset = BERTDataset(ids, label_ids(examples, labels, f"{split} data"))
        sampler = (LengthBucketSampler(dataset.lengths, args.train_batch_size, args.seed) if split == "train"
                   else length_sorted_batches(dataset.lengths, args.test_batch_size))
        loaders[split] = make_loader(dataset, sampler, tokenizer.pad_token_id, args.num_workers)

    model = BERTClassifier(backbone, len(labels), args.head_name, args.dr_rate).to(device)
    if args.freeze_backbone:
        model.freeze_backbone()
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr)
    steps_per_epoch = math.ceil(len(loaders["train"]) / args.grad_accum_steps)
    total_steps = steps_per_epoch * args.total_epochs
    scheduler = cosine_with_warmup(optimizer, round(args.warmup_rate * total_steps), total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    info = {"args": vars(args), "labels": labels, "label_names": names}
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {n_params / 1e6:.1f}M parameters, head {args.head_name}, device {device}, "
          f"{ {k: len(v.dataset) for k, v in loaders.items()} }, {total_steps} optimizer steps", flush=True)

    os.makedirs(args.output_dir, exist_ok=True)
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    open(metrics_path, "w").close()
    best_valid = -1.0
    for epoch in range(args.total_epochs):
        model.train()
        loaders["train"].batch_sampler.set_epoch(epoch)
        sums = torch.zeros(3, device=device)  # loss * n, correct, n; read only at log steps (no sync per step)
        n_tokens, start = 0, time.perf_counter()
        bar = tqdm(loaders["train"], desc=f"epoch {epoch + 1}/{args.total_epochs}", leave=False, mininterval=1, disable=None)
        for step, batch in enumerate(bar):
            input_ids, mask, y = (batch[k].to(device, non_blocking=True) for k in ("input_ids", "attention_mask", "labels"))
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = model(input_ids, mask)
            loss = F.cross_entropy(logits.float(), y)
            scaler.scale(loss / args.grad_accum_steps).backward()
            if (step + 1) % args.grad_accum_steps == 0 or step + 1 == len(loaders["train"]):
                scaler.unscale_(optimizer)
                if args.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                if device.type == "xla":
                    import torch_xla.core.xla_model as xm
                    xm.optimizer_step(optimizer)  # scaler is disabled on XLA (fp16 GradScaler is CUDA/CPU)
                    xm.mark_step()
                else:
                    scaler.step(optimizer)
                    scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            sums += torch.stack([loss.detach() * len(y), (logits.argmax(-1) == y).sum(), torch.tensor(len(y), device=device)])
            n_tokens += int(batch["attention_mask"].sum())
            if step % args.log_interval == 0:
                loss_sum, correct, n = sums.tolist()
                bar.set_postfix(loss=f"{loss_sum / n:.4f}", acc=f"{correct / n:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        seconds = time.perf_counter() - start
        loss_sum, correct, n = sums.tolist()
        row = {"epoch": epoch + 1, "train_loss": loss_sum / n, "train_accuracy": correct / n,
               "train_samples_per_s": n / seconds, "train_tokens_per_s": n_tokens / seconds}
        model.eval()
        for split in ("valid", "test"):
            if split in loaders:
                result = evaluate(model, loaders[split], device, dtype)
                row.update({f"{split}_{k}": v for k, v in result.items() if k != "probs"})
        row.update({f"n_{s}": len(loaders[s].dataset) if s in loaders else 0 for s in ("train", "valid", "test")})
        row["seconds"] = time.perf_counter() - start
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        tqdm.write(f"epoch {epoch + 1}: " + " ".join(
            f"{k} {v:.4f}" for k, v in row.items() if k.endswith(("loss", "accuracy", "f1"))) + f" ({seconds:.0f} s train)")
        # With a validation split keep the best on it; without one, the last epoch (never select on test).
        if "valid" not in loaders or row["valid_accuracy"] > best_valid:
            best_valid = row.get("valid_accuracy", best_valid)
            save_checkpoint(args.output_dir, model, tokenizer, {**info, "epoch": epoch + 1, "metrics": row})
    print(f"saved {args.output_dir} (predict with: python predict.py --model_dir {args.output_dir} \"문장\")")


if __name__ == "__main__":
    try:
        main()
    except (DataError, ModelError) as e:
        sys.exit(print(f"error: {e}", file=sys.stderr) or 2)
    except KeyboardInterrupt:
        sys.exit(130)
