"""Fine-tune a BERT-family encoder for document classification.

    python3 _3_main.py --model tiny --data_dir data/nsmc_sample          # offline, minutes on a CPU
    python3 _3_main.py --model kobert --head_name pooler --dr_rate 0.5   # the KoBERT notebook

The training loop is `train_epoch` below: AdamW without decay on biases and LayerNorm, cosine
schedule with linear warmup, gradient clipping and accumulation, autocast per --precision.
"""
import argparse
import atexit
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

try:
    import fcntl  # the lock on --output_dir; Windows has none, and runs there unlocked
except ImportError:
    fcntl = None

from _1_data import (NSMC_LABEL_NAMES, TRUNCATIONS, ArgumentParser, BERTDataset, DataError,
                     LengthBucketSampler, SaveError, check_problem, label_ids, label_list,
                     length_sorted_batches, load_corpus, make_loader, mask_tokens,
                     read_label_file, read_unlabeled, tokenize, write_atomic)
from _2_model import (PRESET_DEFAULTS, PRESETS, MaskedLM, ModelError, choose_device,
                      classifier_to_finetune, length_limit, load_backbone, load_checkpoint,
                      masked_lm_to_pretrain, predict_logits, read_info, read_json, save_checkpoint,
                      save_figure, save_masked_lm, score_logits, special_ids)
from heads import HEADS


def build_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    # data
    a("--data", choices=["nsmc", "imdb"], default="nsmc",
      help="built-in corpus, used when no --train_file")
    a("--data_dir", default=None,
      help="folder of the corpus (default data/nsmc or data/imdb); downloaded when missing")
    a("--train_file", help="TSV/CSV/JSONL with a header, instead of --data")
    a("--valid_file", help="validation file; the checkpoint kept is the best on it")
    a("--test_file", help="test file, evaluated every epoch, never used for selection")
    a("--text_column", help="text column (default: document, text, sentence, review, ...)")
    a("--label_column", help="label column (default: label, labels, sentiment, ...)")
    a("--columns", help="names of the columns of TSV/CSV files without a header, comma-separated "
      "(e.g. text,labels); their first row is then data")
    a("--label_names", help="comma-separated display names in label order (NSMC: 부정,긍정)")
    a("--label_file", help="class names, one per line; labels in the data may be names or ids "
      "(line numbers from 0), as GoEmotions' label.txt")
    a("--problem", choices=["single_label", "multi_label"], default="single_label",
      help="multi_label: several labels per text (sigmoid outputs, binary cross-entropy)")
    a("--label_sep", default=",",
      help="with multi_label: separator of the labels in a TSV/CSV label field (JSONL: a list)")
    a("--threshold", type=float, default=0.5,
      help="with multi_label: a label is predicted when its probability is above this")
    a("--tune_threshold", action="store_true",
      help="with multi_label: pick the threshold with the best macro-F1 on the validation split")
    a("--class_weights", choices=["none", "balanced"], default="none",
      help="balanced: weigh each class in the loss by inverse frequency (multi_label: each "
      "label's positives by its negatives per positive)")
    a("--valid_ratio", type=float, default=0.0,
      help="carve this share of train as a seeded validation split")
    a("--max_train_samples", type=int, default=0, help="seeded subset of the training set (0: all)")
    a("--max_eval_samples", type=int, default=0, help="seeded subset of valid and test (0: all)")
    a("--min_chars", type=int, default=0, help="drop texts shorter than this many characters")
    a("--max_len", type=int, default=128,
      help="truncate texts to this many tokens, [CLS] and [SEP] included")
    a("--truncation", choices=TRUNCATIONS, default="head",
      help="which tokens of a text longer than --max_len to keep: its head, its tail, or "
      "head_tail (a quarter from the start, the rest from the end); predict.py does the same")
    a("--cache_dir", default=".cache", help="tokenized features are cached here ('' to disable)")
    # model
    a("--model", default="klue-roberta",
      help=f"preset ({', '.join(PRESETS)}), Hugging Face hub id, or local model folder")
    a("--head_name", default="cls", help=f"classification head: {', '.join(HEADS)}")
    a("--dr_rate", type=float, default=0.1, help="dropout rate in the head")
    a("--freeze_backbone", action="store_true", help="train the head only")
    # continued pretraining
    a("--mlm_epochs", type=int, default=0,
      help="before fine-tuning, train the backbone this many epochs as a masked language model "
      "on the training texts (and --unlabeled_file); saved in <output_dir>/pretrained")
    a("--unlabeled_file", help="more texts for --mlm_epochs: one per line, or a TSV/CSV/JSONL "
      "with a text column")
    a("--mlm_lr", type=float, default=None, help="peak learning rate of pretraining (default --lr)")
    a("--mlm_probability", type=float, default=0.15,
      help="share of each text's tokens that pretraining hides and predicts")
    # optimisation
    a("--train_batch_size", type=int, default=32, help="examples per training batch")
    a("--test_batch_size", type=int, default=128, help="examples per evaluation batch")
    a("--grad_accum_steps", type=int, default=1, help="batches per optimizer step")
    a("--lr", type=float, default=5e-5, help="peak learning rate of AdamW")
    a("--weight_decay", type=float, default=0.01,
      help="AdamW weight decay (none on biases and LayerNorm)")
    a("--warmup_rate", type=float, default=0.1, help="share of optimizer steps with linear warmup")
    a("--total_epochs", type=int, default=3, help="passes over the training set")
    a("--max_grad_norm", type=float, default=1.0,
      help="clip gradients to this norm (0: no clipping)")
    a("--seed", type=int, default=42, help="seed for python, numpy and torch")
    a("--metric_for_best", choices=["accuracy", "macro_f1", "loss"], default=None,
      help="validation metric that picks the checkpoint kept (default: accuracy; macro_f1 with "
      "multi_label, where accuracy is exact match)")
    a("--early_stopping", type=int, default=0,
      help="stop after this many epochs without a better --metric_for_best on validation "
      "(0: never)")
    # machine
    a("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
      help="autocast dtype; auto is bf16 on GPUs that support it, else fp32")
    a("--device", choices=["auto", "cpu", "cuda", "xla"], default="auto",
      help="auto: cuda when available")
    a("--num_workers", type=int, default=0, help="data-loader worker processes")
    a("--threads", type=int, default=0,
      help="CPU threads for torch (0: one per core that other work leaves idle at the start)")
    a("--output_dir", default="checkpoint",
      help="checkpoint folder: weights, config, tokenizer, metrics.jsonl")
    a("--log_interval", type=int, default=20, help="steps between progress-bar updates")
    a("--save_steps", type=int, default=0,
      help="save a resumable state every N optimizer steps (0: at epoch ends only)")
    a("--resume", action="store_true",
      help="continue the run saved in --output_dir from its latest state")
    return p


def parse_args(argv=None):
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    parser.set_defaults(**PRESET_DEFAULTS.get(known.model, {}))  # given flags still win
    args = parser.parse_args(argv)
    if args.mlm_lr is None:
        args.mlm_lr = args.lr
    for flag in ("lr", "weight_decay", "warmup_rate", "dr_rate", "valid_ratio", "max_grad_norm",
                 "threshold", "mlm_lr", "mlm_probability"):
        if not math.isfinite(getattr(args, flag)):
            parser.error(f"--{flag} {getattr(args, flag)} is not a finite number")
    checks = [("train_batch_size", args.train_batch_size > 0),
              ("test_batch_size", args.test_batch_size > 0),
              ("grad_accum_steps", args.grad_accum_steps > 0), ("lr", args.lr > 0),
              ("max_len", args.max_len >= 3), ("total_epochs", args.total_epochs > 0),
              ("warmup_rate", 0 <= args.warmup_rate <= 1), ("dr_rate", 0 <= args.dr_rate < 1),
              ("valid_ratio", 0 <= args.valid_ratio < 1), ("weight_decay", args.weight_decay >= 0),
              ("max_grad_norm", args.max_grad_norm >= 0), ("log_interval", args.log_interval > 0),
              ("num_workers", args.num_workers >= 0), ("threads", args.threads >= 0),
              ("save_steps", args.save_steps >= 0),
              ("max_train_samples", args.max_train_samples >= 0),
              ("max_eval_samples", args.max_eval_samples >= 0), ("min_chars", args.min_chars >= 0),
              ("seed", 0 <= args.seed < 2**32), ("threshold", 0 < args.threshold < 1),
              ("early_stopping", args.early_stopping >= 0), ("mlm_epochs", args.mlm_epochs >= 0),
              ("mlm_lr", args.mlm_lr > 0), ("mlm_probability", 0 < args.mlm_probability < 1)]
    for flag, ok in checks:
        if not ok:
            parser.error(f"--{flag} {getattr(args, flag)} is out of range")
    if args.head_name not in HEADS:
        parser.error(f"--head_name {args.head_name!r} is not one of {', '.join(HEADS)}")
    if args.valid_file and args.valid_ratio:
        parser.error("give --valid_file or --valid_ratio, not both")
    if args.unlabeled_file and not args.mlm_epochs:
        parser.error("--unlabeled_file is for pretraining: give --mlm_epochs too")
    if not args.output_dir.strip() or os.path.isfile(args.output_dir):
        parser.error(f"--output_dir {args.output_dir!r} must name a folder")
    if args.cache_dir and os.path.exists(args.cache_dir) and not os.path.isdir(args.cache_dir):
        parser.error(f"--cache_dir {args.cache_dir} is a file, not a folder")
    names = args.label_names.split(",") if args.label_names else []
    if len(set(names)) != len(names):
        parser.error(f"--label_names {args.label_names} names a class twice")
    check_label_flags(parser, args)
    return args


def check_label_flags(parser, args):
    """The flags about labels and their validation, in one line each."""
    columns = args.columns.split(",") if args.columns else []
    if args.columns and (len(columns) < 2 or len(set(columns)) != len(columns)
                         or not all(c.strip() for c in columns)):
        parser.error(f"--columns {args.columns!r} must name two or more columns, each once")
    if args.label_file and args.label_names:
        parser.error("give --label_names or --label_file, not both")
    multi = args.problem == "multi_label"
    if multi and not args.train_file:
        parser.error("--problem multi_label needs --train_file (the built-in corpora have one "
                     "label per text)")
    if not args.label_sep:
        parser.error("--label_sep must not be empty")
    if args.tune_threshold and not multi:
        parser.error("--tune_threshold is for --problem multi_label")
    if (args.tune_threshold or args.early_stopping) and not (args.valid_file or args.valid_ratio):
        flag = "--tune_threshold" if args.tune_threshold else "--early_stopping"
        parser.error(f"{flag} needs a validation split: --valid_file or --valid_ratio")
    if args.metric_for_best is None:
        args.metric_for_best = "macro_f1" if multi else "accuracy"


def given_flags(argv):
    """{flag: value} of the flags given on the command line (not their defaults)."""
    parser, unset = build_parser(), object()
    blank = argparse.Namespace(**dict.fromkeys(vars(parser.parse_args([])), unset))
    given = parser.parse_args(argv, namespace=blank)  # argparse fills in only what is missing
    return {k: v for k, v in vars(given).items() if v is not unset}


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def save_curves(rows, path):
    """curves.png: loss and accuracy per epoch for train, valid and test."""
    def draw(fig):
        for ax, metric in zip(fig.subplots(1, 2), ("loss", "accuracy")):
            for split in ("train", "valid", "test"):
                points = [(r["epoch"], r[f"{split}_{metric}"]) for r in rows
                          if f"{split}_{metric}" in r]
                if points:
                    ax.plot(*zip(*points), marker="o", label=split)
            ax.set(title=metric, xlabel="epoch")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(alpha=0.3)
            ax.legend()
    save_figure(path, draw, size=(9, 3.5))


def write_metrics(output_dir, history):
    """metrics.jsonl, rewritten whole from the run's history (a resumed run never repeats a row)."""
    write_atomic(os.path.join(output_dir, "metrics.jsonl"),
                 lambda p: Path(p).write_text("".join(json.dumps(row) + "\n" for row in history)))


# ----------------------------------------------------------------------------- CPU-only speed-up

def dropout_mask(x, p):
    """x with a fraction p of its entries zeroed and the rest scaled by 1 / (1 - p); the mask comes
    from numpy's PCG64. torch draws CPU random numbers one at a time: its masks took a fifth of a
    MiniLM training step on a CPU (bench/step_ablation.py). The seed is drawn from torch's
    generator, so torch.manual_seed and --resume still fix every mask."""
    seed = int(torch.randint(2**63 - 1, ()))
    keep = np.random.Generator(np.random.PCG64(seed)).random(x.shape, dtype=np.float32)
    return x * torch.from_numpy(keep >= p).to(x.dtype).mul_(1 / (1 - p))


class FastDropout(nn.Dropout):
    """nn.Dropout with dropout_mask's masks (on GPUs torch's own dropout is fast)."""

    def forward(self, x):
        if not self.training or not self.p:
            return super().forward(x)
        return dropout_mask(x, self.p)


def fast_dropout_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                           **kwargs):
    """transformers' attention while training on a CPU. SDPA's fused CPU kernel cannot drop
    attention weights, so with dropout it falls back to a slow path that draws the mask with
    torch's generator; here the weights are computed as in BERT's eager attention and dropped
    with dropout_mask. Without dropout (evaluation) it is SDPA itself."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      **kwargs)
    scores = query @ key.transpose(2, 3) * (scaling or query.size(-1) ** -0.5)
    if attention_mask is not None:  # SDPA's mask: True where a key may be attended to
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    weights = dropout_mask(scores.softmax(dim=-1), dropout)
    return (weights @ value).transpose(1, 2).contiguous(), None


def use_fast_dropout(model, encoder):
    """Swap every nn.Dropout for FastDropout and the encoder's attention for
    fast_dropout_attention (with SDPA's masks) where it uses SDPA."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is nn.Dropout:
                setattr(module, name, FastDropout(child.p))
    AttentionInterface.register("fast_dropout", fast_dropout_attention)
    AttentionMaskInterface.register("fast_dropout", sdpa_mask)
    if getattr(encoder.config, "_attn_implementation", None) == "sdpa":
        encoder.set_attn_implementation("fast_dropout")


# ----------------------------------------------------------------------------- resumable state

class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss); the message is one line."""


class Progress:
    """Where the run stands: what a resumable state saves besides weights and optimizer."""

    def __init__(self, device, threshold):
        self.epoch, self.step, self.global_step, self.history = 0, 0, 0, []
        self.best_valid = -math.inf  # the best selection_score so far
        self.device, self.threshold = device, threshold
        self.new_epoch()
        self.first_bad = torch.tensor(-1, device=device)  # first step with a non-finite loss

    def new_epoch(self):
        self.sums = torch.zeros(3, device=self.device)  # loss * n, correct, n of this epoch
        self.n_tokens = 0

    def track(self, loss, logits, labels, attention_mask):
        """Add one batch to the epoch's sums without waiting for the device."""
        bad = (self.first_bad < 0) & ~torch.isfinite(loss)
        self.first_bad = torch.where(bad, self.global_step, self.first_bad)
        n = torch.tensor(len(labels), device=self.device)
        if labels.ndim == 2:  # several labels per text: right when all of them are right
            correct = ((logits.float().sigmoid() > self.threshold) == labels.bool()).all(-1).sum()
        else:
            correct = (logits.argmax(-1) == labels).sum()
        self.sums += torch.stack([loss.detach() * n, correct, n])
        self.n_tokens += int(attention_mask.sum())

    def check_finite(self, output_dir):
        bad = int(self.first_bad)
        if bad >= 0:
            raise TrainingError(f"the loss became NaN or infinite at optimizer step {bad + 1} "
                                f"(epoch {self.epoch + 1}); the last good state is kept in "
                                f"{output_dir}/states; try a lower --lr")

    KEYS = ("epoch", "step", "global_step", "best_valid", "history", "n_tokens")

    def state(self):
        return {**{k: getattr(self, k) for k in self.KEYS}, "sums": self.sums.cpu()}

    def load(self, state):
        for k in self.KEYS:
            setattr(self, k, state[k])
        self.sums = state["sums"].to(self.device)


def rng_states():
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_states(states):
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


STATE_NAME = re.compile(r"step-\d{8}(-\d+)?")  # the state folders this repository writes


def save_state(output_dir, write_model, state):
    """A resumable state in output_dir/states/step-N: a model folder (write_model writes it) plus
    training_state.pt,
    built under a temporary name and renamed once complete; then `latest` names it and older
    states go. The folder `latest` names is never changed, so a kill at any moment (a second
    Ctrl-C, a full disk) leaves a complete state. Only this repository's folders are removed."""
    root = os.path.join(output_dir, "states")
    name, k = f"step-{state['global_step']:08d}", 1
    while os.path.exists(os.path.join(root, name)):  # an epoch's end saves its last step again
        k += 1
        name = f"step-{state['global_step']:08d}-{k}"
    building = os.path.join(root, ".tmp-" + name)
    shutil.rmtree(building, ignore_errors=True)  # left by a run killed while saving

    def write_state(path):
        with open(path, "wb") as f:  # a file object: torch.save rejects names starting with "."
            torch.save(state, f)
    try:
        write_model(building)
        write_atomic(os.path.join(building, "training_state.pt"), write_state)
    except BaseException:  # a full disk, a second Ctrl-C: leave no half-built state behind
        shutil.rmtree(building, ignore_errors=True)
        raise
    os.rename(building, os.path.join(root, name))
    write_atomic(os.path.join(root, "latest"), lambda p: Path(p).write_text(name))
    for old in os.listdir(root):  # older states, and leftovers of a run killed while saving
        path = os.path.join(root, old)
        ours = STATE_NAME.fullmatch(old.removeprefix(".tmp-")) or (
            old.startswith(".tmp-") and os.path.isfile(path))  # write_atomic's temporary files
        if ours and old != name:
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


def load_state(output_dir):
    """(folder, state) of the latest state in output_dir; unpickles nothing (weights_only=True
    reads tensors and plain containers only). state["phase"] is "pretrain" or "finetune"."""
    latest = os.path.join(output_dir, "states", "latest")
    if not os.path.isfile(latest):
        raise ModelError(f"--resume: no saved state in {output_dir}/states (states are written "
                         f"every --save_steps optimizer steps and at each epoch end)")
    name = Path(latest).read_text(encoding="utf-8", errors="replace").strip()
    if not STATE_NAME.fullmatch(name):
        raise ModelError(f"{latest}: names {name[:60]!r}, not a state folder of this run")
    folder = os.path.join(output_dir, "states", name)
    try:
        state = torch.load(os.path.join(folder, "training_state.pt"), map_location="cpu",
                           weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise ModelError(f"{folder}/training_state.pt: cannot load "
                         f"({str(e).splitlines()[0]})") from None
    return folder, {"phase": "finetune", **state}  # states of older versions: fine-tuning


def lock_output_dir(output_dir):
    """Create output_dir and hold states/.lock while the run lives: a second run into the same
    folder stops at once. The system drops the lock when the process ends, killed or not."""
    try:
        os.makedirs(os.path.join(output_dir, "states"), exist_ok=True)
        lock = open(os.path.join(output_dir, "states", ".lock"), "a")
    except OSError as e:
        raise DataError(f"--output_dir {output_dir}: cannot write there ({e.strerror})") from None
    if fcntl:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"--output_dir {output_dir}: another run is writing to it; wait for "
                            f"it to end or choose another folder") from None
    return lock


def refuse_changed_flags(argv, args, positions):
    """--resume continues the saved run: flags other than where and how to run may not change.
    The same command again is fine, also when its --max_len was capped at the positions."""
    changed = [f"--{k}" for k, v in given_flags(argv).items()
               if k not in RUNTIME_FLAGS and getattr(args, k, v) != v
               and not (k == "max_len" and v > args.max_len == positions)]
    if changed:
        raise DataError(f"--resume continues the saved run with its own flags; "
                        f"{' '.join(changed)} differ from it (a new --output_dir can change them)")


class Snapshots:
    """Saves resumable states of one phase ("pretrain" or "finetune"; main process only), never
    after a bad loss. write_model(folder) writes the model folder of a state."""

    def __init__(self, args, phase, write_model, training, progress, main_process):
        self.args, self.phase, self.write_model = args, phase, write_model
        self.training, self.progress, self.main_process = training, progress, main_process

    def save(self):
        self.progress.check_finite(self.args.output_dir)
        if self.main_process:
            optimizer, scheduler, scaler = self.training
            save_state(self.args.output_dir, self.write_model, {
                **self.progress.state(), "phase": self.phase, "rng": rng_states(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict()})

    def restore(self, state):
        for part, key in zip(self.training, ("optimizer", "scheduler", "scaler")):
            part.load_state_dict(state[key])
        self.progress.load(state)
        set_rng_states(state["rng"])


class StopRequest:
    """Ctrl-C or SIGTERM. While the run prepares they stop it at once (exit 130); during training
    the first asks the loop to save a state at the next optimizer step and stop, a second stops at
    once."""

    def __init__(self):
        self.requested = self.training = False
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum, frame):
        again, self.requested = self.requested, True
        if again or not self.training:
            raise KeyboardInterrupt
        print("\nstopping: saving a state at the next optimizer step (Ctrl-C again to quit now)",
              file=sys.stderr)

    def begin_training(self):
        # a library may catch the KeyboardInterrupt raised while it runs; the request still holds
        if self.requested:
            raise KeyboardInterrupt
        self.training = True


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
    atexit.register(leave_process_group)  # also when an error ends the run
    return torch.distributed.get_rank(), world


def leave_process_group():
    """Destroy the process group while the interpreter is whole: one left to the interpreter's
    shutdown can abort the process (SIGABRT, "terminate called without an active exception")."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def all_reduce_sum(tensor, world):
    if world > 1:
        torch.distributed.all_reduce(tensor)
    return tensor


def optimizer_step(model, optimizer, scheduler, scaler, max_grad_norm, device):
    scaler.unscale_(optimizer)
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    if device.type == "xla":
        import torch_xla.core.xla_model as xm

        xm.optimizer_step(optimizer)  # no GradScaler on XLA
        xm.mark_step()
    else:
        scaler.step(optimizer)
        scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- training

def saved_args(args, folder, state):
    """--resume: the saved run's flags (defaults for flags newer than it); where and how to run
    may change."""
    if state["phase"] == "pretrain":
        try:
            saved = read_json(os.path.join(folder, "pretraining.json"))["args"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelError(f"{folder}/pretraining.json: cannot load ({e})") from None
    else:
        saved = read_info(folder)["args"]
    keep = {k: getattr(args, k) for k in RUNTIME_FLAGS}
    return argparse.Namespace(**{**vars(parse_args([])), **saved, **keep})


def cap_max_len(args, encoder, tokenizer):
    limit = length_limit(encoder, tokenizer)
    if args.max_len > limit:
        print(f"note: --max_len {args.max_len} is more than {args.model} takes; using {limit}")
        args.max_len = limit


def prepare(args, splits, source, resumed, device):
    """(datasets, model, tokenizer, info) to fine-tune: the model from source (--model, or the
    folder pretraining saved), or from the latest state with --resume."""
    labels, names = labels_and_names(args, splits["train"])
    if resumed:
        model, tokenizer, info = load_checkpoint(resumed[0], device)
    else:
        texts = [text for text, _ in splits["train"]]
        model, tokenizer = classifier_to_finetune(source, len(labels), args.head_name,
                                                  args.dr_rate, texts, args.cache_dir)
        cap_max_len(args, model.backbone, tokenizer)
        info = {"args": vars(args), "labels": labels, "label_names": names}
    datasets = {}
    for split, examples in splits.items():
        if examples:
            ids = tokenize(tokenizer, [text for text, _ in examples], args.max_len,
                           args.cache_dir, args.truncation)
            where = getattr(args, f"{split}_file", None) or f"{split} data"
            datasets[split] = BERTDataset(ids, label_ids(examples, labels, where,
                                                         by_id=bool(args.label_file)))
    return datasets, model, tokenizer, info


def labels_and_names(args, train):
    """(labels, display names): from --label_file, else the training data's distinct labels."""
    where = args.train_file or f"{args.data} training data"
    check_problem(train, args.problem == "multi_label", args.label_sep, where)
    if args.label_file:
        labels = read_label_file(args.label_file)
        return labels, labels
    labels = label_list(train)
    if len(labels) < 2:
        raise DataError(f"training data has only one label ({labels[0]}); "
                        f"need two or more classes")
    nsmc = args.data == "nsmc" and not args.train_file and labels == ["0", "1"]
    names = args.label_names.split(",") if args.label_names else (
        NSMC_LABEL_NAMES if nsmc else labels)
    if len(names) != len(labels):
        raise DataError(f"--label_names gives {len(names)} names for {len(labels)} labels {labels}")
    return labels, names


RUNTIME_FLAGS = ("output_dir", "resume", "device", "num_workers", "threads", "log_interval",
                 "save_steps", "cache_dir")


def make_loss(args, train_labels, num_classes, device):
    """Cross-entropy, or for multi_label binary cross-entropy per label. --class_weights
    balanced weighs each class by n / (classes * its count), as scikit-learn's 'balanced', and
    for multi_label each label's positives by its negatives per positive."""
    weight = None
    if args.problem == "multi_label":
        if args.class_weights == "balanced":
            positives = np.maximum(train_labels.sum(0), 1)
            weight = torch.tensor((len(train_labels) - positives) / positives,
                                  dtype=torch.float32, device=device)
        return lambda logits, y: F.binary_cross_entropy_with_logits(logits, y, pos_weight=weight)
    if args.class_weights == "balanced":
        counts = np.maximum(np.bincount(train_labels, minlength=num_classes), 1)
        weight = torch.tensor(len(train_labels) / (num_classes * counts), dtype=torch.float32,
                              device=device)
    return lambda logits, y: F.cross_entropy(logits, y, weight=weight)


def train_epoch(net, loader, loss_fn, training, progress, snapshots, stop, args, device, dtype,
                bar, masking=None):
    """One pass over the training batches, from progress.step on (a resumed epoch skips the
    batches it has done). Returns the seconds spent training. Pretraining passes masking
    (mask_tokens): the net then predicts the tokens it hides."""
    optimizer, scheduler, scaler = training
    n_batches, start = len(loader.batch_sampler), time.perf_counter()
    inputs = ("input_ids", "attention_mask") + (("positions",) if masking else ())
    net.train()
    for batch in loader:
        if masking:
            batch["input_ids"], batch["positions"], batch["labels"] = masking(
                batch["input_ids"], batch["attention_mask"])
        x = [batch[k].to(device, non_blocking=True) for k in inputs]
        y = batch["labels"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = net(*x)
        loss = loss_fn(logits.float(), y)
        scaler.scale(loss / args.grad_accum_steps).backward()
        progress.track(loss, logits, y, batch["attention_mask"])
        progress.step += 1
        bar.update()
        if progress.step % args.grad_accum_steps == 0 or progress.step == n_batches:
            optimizer_step(net, optimizer, scheduler, scaler, args.max_grad_norm, device)
            progress.global_step += 1
            if args.save_steps and progress.global_step % args.save_steps == 0 \
                    and progress.step < n_batches:
                snapshots.save()
            if stop.requested:
                snapshots.save()
                raise KeyboardInterrupt
        if progress.step % args.log_interval == 0 and snapshots.main_process:
            progress.check_finite(args.output_dir)
            loss_sum, correct, n = progress.sums.tolist()
            bar.set_postfix(loss=f"{loss_sum / n:.4f}", acc=f"{correct / n:.4f}",
                            lr=f"{scheduler.get_last_lr()[0]:.2e}")
    return time.perf_counter() - start


def evaluate_epoch(model, datasets, names, pad_id, args, device, dtype, rank, world):
    """valid_* and test_* metrics, and for multi_label the threshold used (tuned on valid with
    --tune_threshold); under torchrun each process runs a share of the batches."""
    logits = {}
    model.eval()
    for split in ("valid", "test"):
        if split in datasets:
            data = datasets[split]
            batches = length_sorted_batches(data.lengths, args.test_batch_size)[rank::world]
            loader = make_loader(data, batches, pad_id, pad_multiple=pad_multiple(device))
            split_logits = torch.from_numpy(predict_logits(model, loader, device, dtype))
            logits[split] = all_reduce_sum(split_logits.to(device), world).cpu()  # others: 0
    threshold = args.threshold
    if args.tune_threshold:
        threshold = tune_threshold(logits["valid"], datasets["valid"].labels, names)
    row = {"threshold": threshold} if args.problem == "multi_label" else {}
    for split, values in logits.items():
        result = score_logits(values, datasets[split].labels, names, threshold)
        row.update({f"{split}_{k}": v for k, v in result.items() if k not in ("probs",
                                                                                 "threshold")})
    return row


def tune_threshold(logits, labels, names):
    """The threshold of 0.05, 0.10, ..., 0.95 with the best macro-F1 (the lowest of ties); a
    coarse grid, so that the validation split's own noise is not what is learnt."""
    grid = np.round(np.arange(0.05, 0.96, 0.05), 2)
    scores = [score_logits(logits, labels, names, t)["macro_f1"] for t in grid]
    return float(grid[int(np.argmax(scores))])


def selection_score(row, metric):
    """The validation number that picks the checkpoint; higher is better (loss is negated)."""
    value = row[f"valid_{metric}"]
    return -value if metric == "loss" else value


def early_stop(history, args):
    """True when the last --early_stopping epochs have not beaten the best before them."""
    if not args.early_stopping or not history:
        return False
    scores = [selection_score(row, args.metric_for_best) for row in history]
    return len(scores) - 1 - int(np.argmax(scores)) >= args.early_stopping


def per_class_line(report):
    """F1 per class, weakest first: every class when there are few, else the three weakest."""
    ranked = sorted(report.items(), key=lambda item: item[1]["f1"])
    shown = ", ".join(f"{name} {r['f1']:.2f}" for name, r in ranked[:3 if len(ranked) > 4 else 4])
    return f"F1 per class {shown}" if len(ranked) <= 4 else f"weakest F1 {shown}"


def epoch_row(progress, datasets, seconds, world):
    loss_sum, correct, n = all_reduce_sum(progress.sums.clone(), world).tolist()
    tokens = all_reduce_sum(torch.tensor(float(progress.n_tokens), device=progress.device),
                            world).item()
    return {"epoch": progress.epoch + 1, "train_loss": loss_sum / n, "train_accuracy": correct / n,
            "train_samples_per_s": n / seconds, "train_tokens_per_s": tokens / seconds,
            **{f"n_{s}": len(datasets.get(s, ())) for s in ("train", "valid", "test")}}


def finish_epoch(row, seconds, progress, model, tokenizer, info, args, datasets):
    """Log the epoch, write metrics and curves, keep the checkpoint (main process only)."""
    write_metrics(args.output_dir, progress.history)
    save_curves(progress.history, os.path.join(args.output_dir, "curves.png"))
    split = "valid" if "valid" in datasets else "test"
    tqdm.write(f"epoch {progress.epoch + 1}: " + " ".join(
        f"{k} {v:.4f}" for k, v in row.items() if k.endswith(("loss", "accuracy", "f1")))
        + (f" threshold {row['threshold']:.2f}" if "threshold" in row else "")
        + f" ({seconds:.0f} s train)"
        + (f"\n  {split} {per_class_line(row[split + '_per_class'])}"
           if split + "_per_class" in row else ""))
    # With a validation split keep the best on it; without one the last epoch (never test).
    if "valid" not in datasets or selection_score(row, args.metric_for_best) > progress.best_valid:
        save_checkpoint(args.output_dir, model, tokenizer,
                        {**info, "epoch": progress.epoch + 1, "metrics": row,
                         "threshold": row.get("threshold", args.threshold)})


def place_model(model, encoder, device, world):
    """The model on its device, ready to train; under torchrun wrapped in DDP."""
    model.to(device)
    if device.type == "cpu":
        use_fast_dropout(model, encoder)
    return torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model


def make_training(model, lr, args, device, dtype, total_steps):
    """(optimizer, scheduler, scaler): what an optimizer step uses and a state saves."""
    # fused: one kernel for all parameters; the for-each AdamW update took ~6x longer on a CPU
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr,
                                  fused=device.type in ("cpu", "cuda"))
    scheduler = cosine_with_warmup(optimizer, round(args.warmup_rate * total_steps), total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return optimizer, scheduler, scaler


def busy_cores(seconds=0.2):
    """How many of the cores this process may run on other work keeps busy now, from /proc/stat
    (0 where it cannot be read: not Linux)."""
    cpus = {f"cpu{i}" for i in os.sched_getaffinity(0)}

    def idle_and_total():
        with open("/proc/stat") as f:
            rows = [line.split() for line in f if line.split()[0] in cpus]
        return (sum(int(r[4]) + int(r[5]) for r in rows),  # idle + iowait
                sum(int(x) for r in rows for x in r[1:9]))

    try:
        idle, total = idle_and_total()
        time.sleep(seconds)
        idle2, total2 = idle_and_total()
    except (OSError, AttributeError):
        return 0
    return round((1 - (idle2 - idle) / max(total2 - total, 1)) * len(cpus))


def set_threads(requested, device):
    """torch's intra-op threads. Each CPU operation waits for its slowest thread, so a thread that
    shares its core with another program holds them all back: with one of two cores busy, two
    threads trained at 36 samples/s and one at 80 (bench/train_speed.py --busy_cores 1)."""
    if requested:
        torch.set_num_threads(requested)
    elif device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        threads = torch.get_num_threads()
        busy = busy_cores()
        if busy and threads > 1:
            torch.set_num_threads(max(1, threads - busy))
            print(f"note: {busy} of {threads} cores busy with other work; training on "
                  f"{torch.get_num_threads()} threads (--threads {threads} for all)")


def pad_multiple(device):
    return 32 if device.type == "xla" else 1  # XLA compiles once per shape: keep them few


def pretrain(args, argv, texts, resumed, stop, device, rank, world):
    """--mlm_epochs of masked-language-model training on texts: train_epoch with mask_tokens in
    front of the model. Returns the folder it saves the pretrained model in."""
    if resumed:
        lm, tokenizer, _ = load_backbone(resumed[0], masked_lm=True)
        model = MaskedLM(lm)
        refuse_changed_flags(argv, args, length_limit(lm.base_model, None))
    else:
        model, tokenizer = masked_lm_to_pretrain(args.model, texts, args.cache_dir)
        cap_max_len(args, model.lm.base_model, tokenizer)
    data = BERTDataset(tokenize(tokenizer, texts, args.max_len, args.cache_dir, args.truncation))
    sampler = LengthBucketSampler(data.lengths, args.train_batch_size, args.seed, rank=rank,
                                  world=world)
    loader = make_loader(data, sampler, tokenizer.pad_token_id, args.num_workers, args.seed,
                         pad_multiple(device))
    net = place_model(model, model.lm.base_model, device, world)
    dtype, main_process = autocast_dtype(args.precision, device), rank == 0
    total_steps = math.ceil(len(sampler) / args.grad_accum_steps) * args.mlm_epochs
    training = make_training(model, args.mlm_lr, args, device, dtype, total_steps)
    progress = Progress(device, args.threshold)
    save = lambda folder: save_masked_lm(  # noqa: E731
        folder, model, tokenizer, {"args": vars(args), "history": progress.history})
    snapshots = Snapshots(args, "pretrain", save, training, progress, main_process)
    if resumed:
        snapshots.restore(resumed[1])
    hidden, mask_id = special_ids(tokenizer)
    vocab_size = min(len(tokenizer), model.lm.config.vocab_size)
    masking = lambda ids, mask: mask_tokens(ids, mask, hidden, mask_id, vocab_size,  # noqa: E731
                                            args.mlm_probability)
    if main_process:
        print(f"pretraining {args.model} as a masked language model on {len(texts)} texts, "
              f"max_len {args.max_len}, {total_steps} optimizer steps", flush=True)
    stop.begin_training()
    while progress.epoch < args.mlm_epochs:
        sampler.set_epoch(progress.epoch, start=progress.step)
        with tqdm(desc=f"pretraining {progress.epoch + 1}/{args.mlm_epochs}",
                  initial=progress.step, total=len(sampler), leave=False, mininterval=1,
                  disable=None if main_process else True) as bar:
            seconds = train_epoch(net, loader, F.cross_entropy, training, progress, snapshots,
                                  stop, args, device, dtype, bar, masking)
        loss_sum, correct, n = all_reduce_sum(progress.sums.clone(), world).tolist()
        row = {"epoch": progress.epoch + 1, "mlm_loss": loss_sum / n, "mlm_accuracy": correct / n,
               "texts_per_s": len(data) / seconds}
        progress.history.append(row)
        progress.epoch, progress.step = progress.epoch + 1, 0
        progress.new_epoch()
        snapshots.save()
        if main_process:
            tqdm.write(f"pretraining epoch {row['epoch']}: mlm_loss {row['mlm_loss']:.4f} "
                       f"mlm_accuracy {row['mlm_accuracy']:.4f} ({seconds:.0f} s)")
        if stop.requested:
            raise KeyboardInterrupt
    folder = os.path.join(args.output_dir, "pretrained")
    if main_process:  # built aside, then swapped in: a kill never leaves half a folder there
        shutil.rmtree(folder + ".tmp", ignore_errors=True)
        save(folder + ".tmp")
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(folder + ".tmp", folder)
        print(f"saved the pretrained model in {folder} (--model {folder} starts from it)")
    if world > 1:
        torch.distributed.barrier()
    return folder


def main(argv=None):
    stop = StopRequest()
    args = parse_args(argv)
    rank, world = init_distributed(args.device)
    lock = lock_output_dir(args.output_dir) if rank == 0 else None  # noqa: F841 (held till exit)
    device = choose_device(args.device)
    set_threads(args.threads, device)
    seed_everything(args.seed)
    resumed = load_state(args.output_dir) if args.resume else None  # (folder, state)
    if resumed:
        args = saved_args(args, *resumed)
    splits = load_corpus(args)
    labels_and_names(args, splits["train"])  # wrong labels stop the run before pretraining
    source = args.model
    if args.mlm_epochs and (not resumed or resumed[1]["phase"] == "pretrain"):
        texts = [text for text, _ in splits["train"]]
        if args.unlabeled_file:
            texts += read_unlabeled(args.unlabeled_file, args.text_column)
        source = pretrain(args, argv, texts, resumed, stop, device, rank, world)
        resumed = None
        seed_everything(args.seed)  # fine-tuning starts alike whether pretraining resumed or not
    datasets, model, tokenizer, info = prepare(args, splits, source, resumed, device)
    if resumed:
        refuse_changed_flags(argv, args, length_limit(model.backbone, None))
    dtype, main_process = autocast_dtype(args.precision, device), rank == 0
    sampler = LengthBucketSampler(datasets["train"].lengths, args.train_batch_size, args.seed,
                                  rank=rank, world=world)
    loader = make_loader(datasets["train"], sampler, tokenizer.pad_token_id, args.num_workers,
                         args.seed, pad_multiple(device))
    if args.freeze_backbone:
        model.freeze_backbone()
    net = place_model(model, model.backbone, device, world)
    total_steps = math.ceil(len(sampler) / args.grad_accum_steps) * args.total_epochs
    training = make_training(model, args.lr, args, device, dtype, total_steps)
    progress = Progress(device, args.threshold)
    loss_fn = make_loss(args, datasets["train"].labels, len(info["labels"]), device)
    snapshots = Snapshots(args, "finetune", lambda f: save_checkpoint(f, model, tokenizer, info),
                          training, progress, main_process)
    if resumed:
        snapshots.restore(resumed[1])
    if main_process:
        sizes = {k: len(v) for k, v in datasets.items()}
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{args.model}: {n_params:.1f}M parameters, head {args.head_name}, max_len "
              f"{args.max_len}, device {device} x {world}, {sizes}, {total_steps} optimizer steps",
              flush=True)
        write_metrics(args.output_dir, progress.history)
    stop.begin_training()
    while progress.epoch < args.total_epochs and not early_stop(progress.history, args):
        sampler.set_epoch(progress.epoch, start=progress.step)
        start = time.perf_counter()
        with tqdm(desc=f"epoch {progress.epoch + 1}/{args.total_epochs}", initial=progress.step,
                  total=len(sampler), leave=False, mininterval=1,
                  disable=None if main_process else True) as bar:
            seconds = train_epoch(net, loader, loss_fn, training, progress, snapshots, stop,
                                  args, device, dtype, bar)
        snapshots.save()  # the epoch's training is done: a kill during evaluation resumes there
        row = epoch_row(progress, datasets, seconds, world)
        row.update(evaluate_epoch(model, datasets, info["label_names"], tokenizer.pad_token_id,
                                  args, device, dtype, rank, world))
        row["seconds"] = time.perf_counter() - start
        progress.history.append(row)
        if main_process:
            finish_epoch(row, seconds, progress, model, tokenizer, info, args, datasets)
        if "valid" in datasets:
            progress.best_valid = max(progress.best_valid,
                                      selection_score(row, args.metric_for_best))
        progress.epoch, progress.step = progress.epoch + 1, 0
        progress.new_epoch()
        snapshots.save()
        if stop.requested:
            raise KeyboardInterrupt
    if main_process and progress.epoch < args.total_epochs:  # the loop ended early
        best = max(progress.history, key=lambda r: selection_score(r, args.metric_for_best))
        print(f"early stopping: valid {args.metric_for_best} has not improved for "
              f"{args.early_stopping} epochs; kept epoch {best['epoch']}")
    if main_process:
        print(f"saved {args.output_dir} (predict with: python predict.py --model_dir "
              f"{args.output_dir} \"문장\")")
    if world > 1:
        torch.distributed.barrier()  # no process leaves while another still saves
        leave_process_group()


if __name__ == "__main__":
    try:
        main()
    except (DataError, ModelError) as e:
        sys.exit(print(f"error: {e}", file=sys.stderr) or 2)
    except (TrainingError, SaveError) as e:
        sys.exit(print(f"error: {e}", file=sys.stderr) or 1)
    except KeyboardInterrupt:
        sys.exit(print("interrupted; --resume continues from the last saved state, if any",
                       file=sys.stderr) or 130)
