"""Fine-tune a BERT-family encoder for document classification.

    python3 _3_main.py --model tiny --data_dir data/nsmc_sample          # offline, minutes on a CPU
    python3 _3_main.py --model kobert --head_name pooler --dr_rate 0.5   # the KoBERT notebook

The training loop is written out below: AdamW without decay on biases and LayerNorm, cosine
schedule with linear warmup, gradient clipping and accumulation, autocast per --precision.
"""
import argparse
import functools
import io
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from _1_data import (NSMC_LABEL_NAMES, BERTDataset, DataError, LengthBucketSampler, label_ids, label_list,
                     length_sorted_batches, load_corpus, pad_to_longest, tokenize)
from _2_model import (HEADS, PRESET_DEFAULTS, PRESETS, BERTClassifier, ModelError, load_backbone, load_checkpoint,
                      predict_logits, save_checkpoint, write_atomic)


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
    a("--save_steps", type=int, default=0, help="save a resumable state every N optimizer steps (0: at epoch ends only)")
    a("--resume", action="store_true", help="continue the run saved in --output_dir from its latest state")
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
              ("num_workers", args.num_workers >= 0), ("save_steps", args.save_steps >= 0)]
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


def all_reduce_sum(tensor, world):
    if world > 1:
        torch.distributed.all_reduce(tensor)
    return tensor


def evaluate(model, loader, device, dtype, world=1):
    """Loss, accuracy, macro-F1 and probabilities (in dataset order) over a labelled loader.
    Under torchrun each process runs a share of the batches and the logits are summed."""
    logits = torch.from_numpy(predict_logits(model, loader, device, dtype))
    logits = all_reduce_sum(logits.to(device), world).cpu()  # rows of other processes are zeros here
    labels = torch.tensor(loader.dataset.labels)
    result = classification_metrics(labels, logits.argmax(-1), logits.shape[1])
    return {"loss": F.cross_entropy(logits, labels).item(), **result, "probs": logits.softmax(-1).numpy()}


def save_figure(path, draw, size):
    """Draw on a fresh matplotlib figure and write it as PNG atomically (no display needed)."""
    import logging

    from matplotlib import rcParams
    from matplotlib.figure import Figure

    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    # Hangul label names need a CJK font; matplotlib falls back glyph by glyph through this list
    rcParams["font.family"] = ["DejaVu Sans", "Noto Sans CJK JP", "NanumGothic", "Malgun Gothic", "AppleGothic"]
    fig = Figure(figsize=size, layout="constrained")
    draw(fig)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def save_curves(rows, path):
    """curves.png: loss and accuracy per epoch for train, valid and test."""
    def draw(fig):
        for ax, metric in zip(fig.subplots(1, 2), ("loss", "accuracy")):
            for split in ("train", "valid", "test"):
                points = [(r["epoch"], r[f"{split}_{metric}"]) for r in rows if f"{split}_{metric}" in r]
                if points:
                    ax.plot(*zip(*points), marker="o", label=split)
            ax.set(title=metric, xlabel="epoch")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(alpha=0.3)
            ax.legend()
    save_figure(path, draw, size=(9, 3.5))


def make_loader(dataset, batch_sampler, pad_id, num_workers=0, seed=0, pad_multiple=1):
    # its own generator: creating the iterator must not draw from the global RNG (exact resume)
    return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers,
                                       collate_fn=functools.partial(pad_to_longest, pad_id=pad_id, multiple=pad_multiple),
                                       generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- resumable state

class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss); the message is one line."""


def rng_states():
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states):
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


def save_state(output_dir, model, tokenizer, info, state):
    """A resumable state in output_dir/states/step-N: a checkpoint folder plus training_state.pt.
    `latest` is switched atomically only once the folder is complete, then older states go."""
    root = os.path.join(output_dir, "states")
    name = f"step-{state['global_step']:08d}"
    folder = os.path.join(root, name)
    shutil.rmtree(folder, ignore_errors=True)
    save_checkpoint(folder, model, tokenizer, info)
    buffer = io.BytesIO()  # torch.save wants a file name it likes; the temporary one is not
    torch.save(state, buffer)
    write_atomic(os.path.join(folder, "training_state.pt"), lambda p: Path(p).write_bytes(buffer.getvalue()))
    write_atomic(os.path.join(root, "latest"), lambda p: Path(p).write_text(name))
    for old in os.listdir(root):  # older states, and leftovers of a run killed while saving
        if old not in (name, "latest"):
            path = os.path.join(root, old)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


def load_state(output_dir, device):
    """(model, tokenizer, info, state) of the latest state in output_dir; never unpickles objects."""
    latest = os.path.join(output_dir, "states", "latest")
    if not os.path.isfile(latest):
        raise ModelError(f"--resume: no saved state in {output_dir}/states (states are written every "
                         f"--save_steps optimizer steps and at each epoch end)")
    with open(latest) as f:
        folder = os.path.join(output_dir, "states", f.read().strip())
    model, tokenizer, info = load_checkpoint(folder, device)
    try:
        state = torch.load(os.path.join(folder, "training_state.pt"), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise ModelError(f"{folder}/training_state.pt: cannot load ({str(e).splitlines()[0]})") from None
    return model, tokenizer, info, state


# ----------------------------------------------------------------------------- several processes

def init_distributed(device_name):
    """(rank, world size) under torchrun (gloo on CPU, nccl on GPU); (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return torch.distributed.get_rank(), world


# ----------------------------------------------------------------------------- main

def prepare(args, device):
    """Data, labels, model and tokenizer: fresh, or from the latest state with --resume."""
    resumed = load_state(args.output_dir, device) if args.resume else None
    if resumed:  # the saved run's flags; only where and how to run may change
        keep = {k: getattr(args, k) for k in RUNTIME_FLAGS}
        args = argparse.Namespace(**{**resumed[2]["args"], **keep})
    splits = load_corpus(args)
    labels = label_list([label for _, label in splits["train"]])
    if len(labels) < 2:
        raise DataError(f"training data has only one label ({labels[0]}); need two or more classes")
    names = args.label_names.split(",") if args.label_names else (
        NSMC_LABEL_NAMES if args.data == "nsmc" and not args.train_file and labels == ["0", "1"] else labels)
    if len(names) != len(labels):
        raise DataError(f"--label_names gives {len(names)} names for {len(labels)} labels {labels}")
    if resumed:
        model, tokenizer, info, state = resumed
    else:
        backbone, tokenizer = load_backbone(args.model, [text for text, _ in splits["train"]], args.cache_dir)
        model = BERTClassifier(backbone, len(labels), args.head_name, args.dr_rate)
        info, state = {"args": vars(args), "labels": labels, "label_names": names}, None
    datasets = {}
    for split, examples in splits.items():
        if examples:
            ids = tokenize(tokenizer, [text for text, _ in examples], args.max_len, args.cache_dir)
            datasets[split] = BERTDataset(ids, label_ids(examples, labels, f"{split} data"))
    return args, datasets, model, tokenizer, info, state


RUNTIME_FLAGS = ("output_dir", "resume", "device", "num_workers", "log_interval", "save_steps", "cache_dir")


def main(argv=None):
    args = parse_args(argv)
    rank, world = init_distributed(args.device)
    device = choose_device(args.device)
    seed_everything(args.seed)
    args, datasets, model, tokenizer, info, state = prepare(args, device)
    dtype = autocast_dtype(args.precision, device)
    train_set, pad_id = datasets["train"], tokenizer.pad_token_id
    sampler = LengthBucketSampler(train_set.lengths, args.train_batch_size, args.seed, rank=rank, world=world)
    pad_multiple = 32 if device.type == "xla" else 1
    train_loader = make_loader(train_set, sampler, pad_id, args.num_workers, args.seed, pad_multiple)

    model.to(device)
    if args.freeze_backbone:
        model.freeze_backbone()
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    # fused: one kernel for all parameters; the for-each AdamW update took ~6x longer on a CPU
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, fused=device.type in ("cpu", "cuda"))
    steps_per_epoch = math.ceil(len(sampler) / args.grad_accum_steps)
    total_steps = steps_per_epoch * args.total_epochs
    scheduler = cosine_with_warmup(optimizer, round(args.warmup_rate * total_steps), total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    main_process = rank == 0
    if main_process:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{args.model}: {n_params / 1e6:.1f}M parameters, head {args.head_name}, device {device} x {world}, "
              f"{ {k: len(v) for k, v in datasets.items()} }, {total_steps} optimizer steps", flush=True)

    # Where the run stands; with --resume, exactly where the saved run stopped.
    epoch, step, global_step, best_valid, history = 0, 0, 0, -1.0, []
    sums, n_tokens = torch.zeros(3, device=device), 0  # loss * n, correct, n of this epoch so far
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        epoch, step, global_step = state["epoch"], state["step"], state["global_step"]
        best_valid, history, n_tokens = state["best_valid"], state["history"], state["n_tokens"]
        sums = state["sums"].to(device)
        set_rng_states(state["rng"])
    if main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        write_metrics(args.output_dir, history)

    def check_finite():
        bad = int(first_bad)
        if bad >= 0:
            raise TrainingError(f"the loss became NaN or infinite at optimizer step {bad + 1} (epoch {epoch + 1}); "
                                f"the last good state is kept in {args.output_dir}/states; try a lower --lr")

    def snapshot():
        """Save a resumable state at an optimizer-step boundary (main process only), never after a bad loss."""
        check_finite()
        if main_process:
            save_state(args.output_dir, model, tokenizer, info, {
                "epoch": epoch, "step": step, "global_step": global_step, "best_valid": best_valid,
                "history": history, "sums": sums.cpu(), "n_tokens": n_tokens, "rng": rng_states(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()})

    stop = install_stop_handlers()
    first_bad = torch.tensor(-1, device=device)  # first optimizer step with a non-finite loss; read only when saving
    n_batches = len(sampler)
    while epoch < args.total_epochs:
        net.train()
        sampler.set_epoch(epoch, start=step)
        start = time.perf_counter()
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{args.total_epochs}", initial=step, total=n_batches,
                   leave=False, mininterval=1, disable=None if main_process else True)
        for batch in bar:
            input_ids, mask, y = (batch[k].to(device, non_blocking=True) for k in ("input_ids", "attention_mask", "labels"))
            with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                logits = net(input_ids, mask)
            loss = F.cross_entropy(logits.float(), y)
            scaler.scale(loss / args.grad_accum_steps).backward()
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), global_step, first_bad)
            sums += torch.stack([loss.detach() * len(y), (logits.argmax(-1) == y).sum(), torch.tensor(len(y), device=device)])
            n_tokens += int(batch["attention_mask"].sum())
            step += 1
            if step % args.grad_accum_steps == 0 or step == n_batches:
                scaler.unscale_(optimizer)
                if args.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                if device.type == "xla":
                    import torch_xla.core.xla_model as xm
                    xm.optimizer_step(optimizer)  # no GradScaler on XLA
                    xm.mark_step()
                else:
                    scaler.step(optimizer)
                    scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                if args.save_steps and global_step % args.save_steps == 0 and step < n_batches:
                    snapshot()
                if stop.requested:
                    snapshot()
                    raise KeyboardInterrupt
            if step % args.log_interval == 0 and main_process:
                check_finite()
                loss_sum, correct, n = sums.tolist()
                bar.set_postfix(loss=f"{loss_sum / n:.4f}", acc=f"{correct / n:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        seconds = time.perf_counter() - start  # training only, not the saving that follows
        snapshot()  # the epoch's training is done: a kill during evaluation resumes at evaluation
        tokens = all_reduce_sum(torch.tensor(float(n_tokens), device=device), world).item()
        row = epoch_metrics(epoch, all_reduce_sum(sums.clone(), world), tokens, seconds)
        net.eval()
        for split in ("valid", "test"):
            if split in datasets:
                batches = length_sorted_batches(datasets[split].lengths, args.test_batch_size)[rank::world]
                loader = make_loader(datasets[split], batches, pad_id, pad_multiple=pad_multiple)
                result = evaluate(model, loader, device, dtype, world)
                row.update({f"{split}_{k}": v for k, v in result.items() if k != "probs"})
        row.update({f"n_{s}": len(datasets[s]) if s in datasets else 0 for s in ("train", "valid", "test")})
        row["seconds"] = time.perf_counter() - start
        history.append(row)
        if main_process:
            write_metrics(args.output_dir, history)
            save_curves(history, os.path.join(args.output_dir, "curves.png"))
            tqdm.write(f"epoch {epoch + 1}: " + " ".join(
                f"{k} {v:.4f}" for k, v in row.items() if k.endswith(("loss", "accuracy", "f1"))) + f" ({seconds:.0f} s train)")
            # With a validation split keep the best on it; without one, the last epoch (never select on test).
            if "valid" not in datasets or row["valid_accuracy"] > best_valid:
                save_checkpoint(args.output_dir, model, tokenizer, {**info, "epoch": epoch + 1, "metrics": row}, traced=True)
        best_valid = max(best_valid, row.get("valid_accuracy", best_valid))
        epoch, step, n_tokens = epoch + 1, 0, 0
        sums = torch.zeros(3, device=device)
        snapshot()
        if stop.requested:
            raise KeyboardInterrupt
    if main_process:
        print(f"saved {args.output_dir} (predict with: python predict.py --model_dir {args.output_dir} \"문장\")")
    if world > 1:
        torch.distributed.destroy_process_group()


def epoch_metrics(epoch, sums, n_tokens, seconds):
    loss_sum, correct, n = sums.tolist()
    return {"epoch": epoch + 1, "train_loss": loss_sum / n, "train_accuracy": correct / n,
            "train_samples_per_s": n / seconds, "train_tokens_per_s": n_tokens / seconds}


def write_metrics(output_dir, history):
    """metrics.jsonl, rewritten whole from the run's history (so a resumed run never repeats a row)."""
    write_atomic(os.path.join(output_dir, "metrics.jsonl"),
                 lambda p: Path(p).write_text("".join(json.dumps(row) + "\n" for row in history)))


def install_stop_handlers():
    """Ctrl-C or SIGTERM asks the loop to save a state at the next optimizer step and stop (exit 130);
    a second Ctrl-C stops at once."""
    stop = argparse.Namespace(requested=False)

    def handler(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True
        print("\nstopping: saving a state at the next optimizer step (Ctrl-C again to quit now)", file=sys.stderr)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


if __name__ == "__main__":
    try:
        main()
    except (DataError, ModelError) as e:
        sys.exit(print(f"error: {e}", file=sys.stderr) or 2)
    except TrainingError as e:
        sys.exit(print(f"error: {e}", file=sys.stderr) or 1)
    except KeyboardInterrupt:
        sys.exit(print("interrupted; continue with --resume", file=sys.stderr) or 130)
