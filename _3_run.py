"""What keeps a run of _3_main.py alive but is not the method: the checks of its flags, `start`
(torchrun, the lock on --output_dir, device, threads, seeds) and the precision, the model on its
device (DDP, --gradient_checkpointing, the CPU-only dropout/attention speed-up),
resumable states and the --resume checks, Ctrl-C, and `Run`, the object the training loop calls at
a few named points (`batches`, `track`, `after_step`, `end_epoch`) to count, save, log and keep
checkpoints. It never calls into the loop and does not know which method runs.
"""
import argparse
import atexit
import collections
import contextlib
import hashlib
import importlib.util
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

import filelock
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from _1_data import CORPORA, length_sorted_batches, make_loader, pad_multiple
from _2_model import cap_max_len, length_limit
from common import DataError, ModelError, TrainingError, read_json, write_atomic
from folders import read_info
from heads import HEADS
from inference import PRECISIONS, auto_precision, choose_device, predict_logits
from metrics import per_class_line, save_curves


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


# -------------------------------------------------------------------------------------------- flags

def check_flags(parser, args, argv):
    """_3_main.py's flags, checked before anything is loaded: a number out of range (NaN and inf
    too), flags that cannot both be meant, or a flag given where it would be ignored are one line
    naming the flag."""
    # Each flag with the range it makes sense in: found here, a bad value costs no minutes of
    # loading
    checks = [("train_batch_size", args.train_batch_size > 0),
              ("test_batch_size", args.test_batch_size > 0),
              ("grad_accum_steps", args.grad_accum_steps > 0), ("rtd_weight", args.rtd_weight > 0),
              ("max_len", args.max_len >= 3), ("total_epochs", args.total_epochs > 0),
              ("warmup_rate", 0 <= args.warmup_rate <= 1), ("dr_rate", 0 <= args.dr_rate < 1),
              ("valid_ratio", 0 <= args.valid_ratio < 1), ("weight_decay", args.weight_decay >= 0),
              ("max_grad_norm", args.max_grad_norm >= 0), ("log_interval", args.log_interval > 0),
              ("num_workers", args.num_workers >= 0), ("threads", args.threads >= 0),
              ("save_steps", args.save_steps >= 0), ("min_chars", args.min_chars >= 0),
              ("max_train_samples", args.max_train_samples >= 0),
              ("max_eval_samples", args.max_eval_samples >= 0), ("lr", args.lr > 0),
              ("seed", 0 <= args.seed < 2**32), ("threshold", 0 < args.threshold < 1),
              ("early_stopping", args.early_stopping >= 0),
              ("pretrain_epochs", args.pretrain_epochs >= 0),
              ("pretrain_dropout", 0 <= (args.pretrain_dropout or 0) < 1),
              ("mask_rate", 0 < args.mask_rate < 1), ("pretrain_lr", args.pretrain_lr > 0),
              ("generator_size", 0 < args.generator_size <= 1)]
    for flag, ok in checks:
        # NaN fails every comparison but would pass a check written as "not x < 0": tested apart
        value = getattr(args, flag) or 0  # None: a flag not given, nothing to check
        if not math.isfinite(value):
            parser.error(f"--{flag} {value} is not a finite number")
        if not ok:
            parser.error(f"--{flag} {value} is out of range")
    # The heads are a registry (heads.HEADS), so argparse's choices= would go stale in --help
    if args.head_name not in HEADS:
        parser.error(f"--head_name {args.head_name!r} is not one of {', '.join(HEADS)}")
    # combinations that cannot both be meant
    if args.valid_file and args.valid_ratio:
        parser.error("give --valid_file or --valid_ratio, not both")
    if args.unlabeled_file and not args.pretrain_epochs:
        parser.error("--unlabeled_file is for pretraining: give --pretrain_epochs too")
    if args.objective == "rtd" and args.pretrain_epochs and args.head_name == "pooler":
        parser.error("--head_name pooler: --objective rtd makes an ELECTRA model, which has no "
                     "pooler; use cls, weight_avg or lstm")
    if args.generator and args.objective != "rtd":
        parser.error("--generator is for --objective rtd")
    if args.tensorboard and not importlib.util.find_spec("tensorboard"):
        parser.error("--tensorboard needs the tensorboard package: pip install tensorboard")
    # A flag given on the command line where nothing reads it: refused, not silently ignored
    # (a preset's defaults, such as tiny's --mask_rate, are not given)
    given = given_flags(parser, argv)
    idle = [flag for flag in PRETRAINING_FLAGS if flag in given]
    if idle and not args.pretrain_epochs:
        parser.error(f"--{idle[0]} is for pretraining: give --pretrain_epochs too")
    if "metric_for_best" in given and not (args.valid_file or args.valid_ratio):
        parser.error("--metric_for_best needs a validation split: --valid_file or --valid_ratio")
    if "threshold" in given and args.problem != "multi_label":
        parser.error("--threshold is for --problem multi_label")
    # A file in its place would fail at the first save, after an epoch of work
    if not args.output_dir.strip() or os.path.isfile(args.output_dir):
        parser.error(f"--output_dir {args.output_dir!r} must name a folder")
    if args.cache_dir and os.path.exists(args.cache_dir) and not os.path.isdir(args.cache_dir):
        parser.error(f"--cache_dir {args.cache_dir} is a file, not a folder")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not args.cache_dir:  # under torchrun
        parser.error("--cache_dir '': under torchrun the processes share their vocabulary and "
                     "tokenized texts through --cache_dir; give it a folder")
    # Two classes of one name would merge in every report and in config.json's label2id
    names = args.label_names.split(",") if args.label_names else []
    if len(set(names)) != len(names):
        parser.error(f"--label_names {args.label_names} names a class twice")
    check_label_flags(parser, args)


def check_label_flags(parser, args):
    """The flags about labels and their validation, in one line each."""
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
    # with many labels per text exact-match accuracy is near 0 and moves little: macro-F1 decides
    if args.metric_for_best is None:
        args.metric_for_best = "macro_f1" if multi else "accuracy"


# --------------------------------------------------------------------------------- setting a run up

# What start() set up: the device and the autocast dtype (None: float32 without autocast; set by
# with_precision once a resumed state is read), this process's rank and the world size under
# torchrun (else 0 and 1; rank 0 writes the files), the StopRequest, and the lock on --output_dir
# (rank 0), released when the run ends, and the Threads that follow the machine.
Machine = collections.namedtuple("Machine", "device dtype rank world stop lock threads",
                                 defaults=(None,))


def start(args):
    """A Machine for the run: Ctrl-C and SIGTERM handled, torchrun's process group, the lock on
    --output_dir, the device, torch's threads (following the machine) and the seeds."""
    # Signals first: Ctrl-C during the slow set-up below still exits with 130, not a traceback
    stop = StopRequest()
    rank, world = init_distributed(args.device)
    # Only the first process writes files, so only it holds the lock
    lock = lock_output_dir(args.output_dir) if rank == 0 else None
    if rank == 0 and not (args.resume or args.overwrite_output_dir):
        refuse_to_overwrite(args.output_dir)
    device = choose_device(args.device)
    threads = Threads(args.threads, device)
    seed_everything(args.seed)
    return Machine(device, None, rank, world, stop, lock, threads)


def with_precision(machine, args, state=None):
    """machine with the run's autocast dtype, said in one line: --precision (auto: what the GPU
    runs fast, auto_precision); a resumed run keeps the precision its state was saved in (an fp16
    scaler's state cannot go on in bf16, nor the other way)."""
    # The optimizer's and the scaler's states belong to one precision: a resumed run keeps it even
    # where auto would now choose another
    if state is not None and state.get("precision") in PRECISIONS:
        name, why = state["precision"], "the precision the resumed state was saved in"
    elif state is not None and args.precision == "auto":
        # a state saved before states recorded it: auto then meant bf16 wherever torch said it
        # had bf16 (also where emulated, on 7.x); an fp16 scaler's state says fp16
        name = ("fp16" if state["scaler"] else "bf16" if machine.device.type == "cuda"
                and torch.cuda.is_bf16_supported() else "fp32")
        why = "what --precision auto gave the resumed run before states recorded it"
    elif args.precision == "auto":
        name, why = auto_precision(machine.device)
    else:
        name, why = args.precision, "--precision"
    if machine.rank == 0:
        print(f"precision {name}: {why}", flush=True)
    return machine._replace(dtype=PRECISIONS[name])


# python, numpy and torch each have their own generator: data order, masks and init use all three
def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lock_output_dir(output_dir):
    """Create output_dir and hold states/.lock: a second run into the same folder stops at once.
    The system drops the lock when the process ends, killed or not (on every platform)."""
    try:
        os.makedirs(os.path.join(output_dir, "states"), exist_ok=True)
        lock = filelock.FileLock(os.path.join(output_dir, "states", ".lock"))
        lock.acquire(timeout=0)
    # timeout=0: a second run stops at once rather than waiting for the first to end
    except filelock.Timeout:
        raise DataError(f"--output_dir {output_dir}: another run is writing to it; wait for "
                        f"it to end or choose another folder") from None
    except OSError as e:
        raise DataError(f"--output_dir {output_dir}: cannot write there ({e.strerror})") from None
    return lock


def refuse_to_overwrite(output_dir):
    """A new run into a folder holding a trained model or a run to resume would replace them at
    its first save: one line instead (transformers' example scripts refused it alike). An empty
    states/ left by a run that failed to start holds neither."""
    held = ("a trained model (classifier.json)"
            if os.path.isfile(os.path.join(output_dir, "classifier.json")) else
            "a run to resume (states/latest)"
            if os.path.isfile(os.path.join(output_dir, "states", "latest")) else None)
    if held:
        raise DataError(f"--output_dir {output_dir} holds {held}: --resume continues that run, "
                        f"--overwrite_output_dir starts a new one over it")


def cpu_times(cpus):
    """(busy jiffies of these cores, this process's own CPU time in jiffies) now, from /proc/stat
    and os.times; None where /proc/stat cannot be read (not Linux)."""
    try:
        with open("/proc/stat") as f:
            rows = [line.split() for line in f if line.split()[0] in cpus]
    except OSError:
        return None
    # user nice system irq softirq steal: time a core spent on some program, not idle or iowait
    busy = sum(int(r[i]) for r in rows for i in (1, 2, 3, 6, 7, 8))
    own = os.times()
    return busy, (own.user + own.system) * os.sysconf("SC_CLK_TCK")


def other_busy_cores(before, after, seconds):
    """How many cores other programs kept busy between two cpu_times looks `seconds` apart:
    all the cores' busy time minus this process's own (or its own threads look like others)."""
    ticks = seconds * os.sysconf("SC_CLK_TCK")
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / max(ticks, 1e-9))


class Threads:
    """torch's intra-op threads, following the machine while the run lasts (--threads 0 on a CPU).
    Each CPU operation waits for its slowest thread, so a thread that shares its core with another
    program holds them all back: with one of two cores busy, two threads trained at 36 samples/s
    and one at 80 (bench/train_speed.py --busy_cores 1). look(), called every step, acts every
    PERIOD seconds (the first time FIRST seconds after training starts) and compares /proc/stat
    since the last look, without sleeping: a burst of a second adds a fifth of a core to a
    5-second window and decides nothing; work that stays lowers the threads, and when it has gone
    they rise again, each change said in one line."""

    PERIOD = 5.0  # seconds between looks: long enough that a passing burst does not count
    FIRST = 2.0  # the first look after training starts: a core busy all along costs 2 s, not 5

    def __init__(self, requested, device):
        self.cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.all = max(1, min(torch.get_num_threads(), len(self.cores) or 1))
        # --threads N and OMP_NUM_THREADS fix the count (exact resume needs a fixed one)
        self.adaptive = (not requested and device.type == "cpu"
                         and "OMP_NUM_THREADS" not in os.environ and self.all > 1)
        if requested:
            torch.set_num_threads(requested)
        self.last, self.wait = (self.sample() if self.adaptive else None), self.PERIOD

    def sample(self):
        times = cpu_times({f"cpu{i}" for i in self.cores})
        return None if times is None else (*times, time.monotonic())

    def restart(self):
        """Look from now on: called as training starts, so that what ran while the data and
        the model loaded (this process then used one core) is not taken for other work."""
        if self.adaptive:
            self.last, self.wait = self.sample(), self.FIRST

    def look(self):
        """Set the threads to the cores other work left idle since the last look."""
        if not self.adaptive or self.last is None or time.monotonic() - self.last[2] < self.wait:
            return
        now, self.wait = self.sample(), self.PERIOD
        # a core counts as busy when other work held it three quarters of the window: the end
        # of a passing burst does not take a thread away
        busy = int(other_busy_cores(self.last, now, now[2] - self.last[2]) + 0.25)
        self.last = now
        want = max(1, self.all - busy)
        if want != torch.get_num_threads():
            torch.set_num_threads(want)
            print(f"note: other work keeps {busy} of {self.all} cores busy; training on {want} "
                  f"thread{'s' * (want > 1)} (--threads N fixes the count)", flush=True)


# -------------------------------------------------------------------------------- several processes

def init_distributed(device_name):
    """(rank, world size) under torchrun (gloo on CPU, nccl on GPU); (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    if device_name == "xla":  # torch_xla has its own launcher and collectives, not torchrun's
        raise DataError("--device xla runs as one process here; start it without torchrun")
    # nccl reduces on the GPUs themselves; gloo is the backend that runs on CPUs
    cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        # Each process on its own GPU, before anything allocates on the default one
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    atexit.register(leave_process_group)  # also when an error ends the run
    return torch.distributed.get_rank(), world


def leave_process_group():
    """Destroy the process group while the interpreter is whole: one left to the interpreter's
    shutdown can abort the process (SIGABRT, "terminate called without an active exception")."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def main_process_first(machine):
    """Under torchrun, the first process runs the block before the others: it fills the caches in
    --cache_dir (tiny's learned vocabulary, the tokenized texts), which the others then read, so
    every process has the very same vocabulary (two trainings of one may differ in ties)."""
    # The others wait here until the first has filled the caches
    if machine.world > 1 and machine.rank != 0:
        torch.distributed.barrier()
    yield
    if machine.world > 1 and machine.rank == 0:
        torch.distributed.barrier()


def split_logits(model, data, pad_id, batch_size, num_classes, machine):
    """The logits of every text of an evaluation split (rows in its order); under torchrun each
    process computes a share of the batches and the processes add their rows up."""
    # longest texts first, in order: the least padding, and memory peaks at once
    batches = length_sorted_batches(data.lengths, batch_size)[machine.rank::machine.world]
    loader = make_loader(data, batches, pad_id, pad_multiple=pad_multiple(machine.device))
    logits = predict_logits(model, loader, machine.device, machine.dtype)
    if logits is None:  # more processes than batches: this one had none
        logits = np.zeros((len(data), num_classes), dtype="float32")
    # each process filled in its own rows (the others are 0): the sum has them all
    return all_reduce_sum(torch.from_numpy(logits).to(machine.device), machine.world).cpu()


def all_reduce_sum(tensor, world):
    if world > 1:
        torch.distributed.all_reduce(tensor)
    return tensor


# -------------------------------------------------------------------------- the model on its device

def dropout_mask(x, p):
    """x with a fraction p of its entries zeroed and the rest scaled by 1 / (1 - p); the mask comes
    from numpy's PCG64. torch draws CPU random numbers one at a time: its masks took a fifth of a
    MiniLM training step on a CPU (bench/step_ablation.py). The seed is drawn from torch's
    generator, so torch.manual_seed and --resume still fix every mask."""
    # One draw from torch's generator per mask: what torch.manual_seed and --resume fix
    seed = int(torch.randint(2**63 - 1, ()))
    keep = np.random.Generator(np.random.PCG64(seed)).random(x.shape, dtype=np.float32)
    # Scaled by 1 / (1 - p) while training, so evaluation (no dropout) sees the same expected values
    return x * torch.from_numpy(keep >= p).to(x.dtype).mul_(1 / (1 - p))


class FastDropout(nn.Dropout):
    """nn.Dropout with dropout_mask's masks (on GPUs torch's own dropout is fast)."""

    def forward(self, x):
        # Evaluation, or a rate of 0: torch's own (which then does nothing)
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
    # Scaled dot-product attention written out, as BERT's eager attention computes it
    scores = query @ key.transpose(2, 3) * (scaling or query.size(-1) ** -0.5)
    if attention_mask is not None:  # SDPA's mask: True where a key may be attended to
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    weights = dropout_mask(scores.softmax(dim=-1), dropout)
    return (weights @ value).transpose(1, 2).contiguous(), None


def use_fast_dropout(model, encoders):
    """Swap every nn.Dropout for FastDropout and the encoders' attention for
    fast_dropout_attention (with SDPA's masks) where they use SDPA."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for module in model.modules():
        for name, child in module.named_children():
            # type(...) is: exactly nn.Dropout, not subclasses that mean something else
            if type(child) is nn.Dropout:
                setattr(module, name, FastDropout(child.p))
    AttentionInterface.register("fast_dropout", fast_dropout_attention)
    AttentionMaskInterface.register("fast_dropout", sdpa_mask)
    for encoder in encoders:
        if getattr(encoder.config, "_attn_implementation", None) == "sdpa":
            encoder.set_attn_implementation("fast_dropout")


def place_model(model, encoders, machine, checkpointing=False):
    """The model on its device; under torchrun wrapped in DDP, which averages the gradients.
    (torch.compile is not offered: measured on MiniLM it stepped 0.96x as fast on a CPU, and no
    GPU has measured it here; docs/results.md.)"""
    # On the device before DDP wraps it: DDP broadcasts the first process's weights from there
    model.to(machine.device)
    if checkpointing:
        # --gradient_checkpointing: each encoder layer keeps only its input and recomputes the
        # rest in backward. torch restores the random state for the recomputation, so dropout
        # (FastDropout too: its seed comes from torch's generator) draws the same masks
        for encoder in encoders:
            encoder.gradient_checkpointing_enable({"use_reentrant": False})
    if machine.device.type == "cpu":
        # CPU-only speed-up: nn.Dropout becomes FastDropout and SDPA attention becomes
        # fast_dropout_attention (above). The same dropout, with masks drawn by numpy:
        # torch draws CPU random numbers one at a time, which cost a fifth of a training step.
        # On GPUs the model is transformers' own; edit dropout here as well as in the model.
        use_fast_dropout(model, encoders)
    # DDP averages the gradients of the processes during backward; the loop sets
    # require_backward_grad_sync to skip that on accumulation steps
    return torch.nn.parallel.DistributedDataParallel(model) if machine.world > 1 else model


# ----------------------------------------------------------------------------------------- --resume

# where and how to run: --resume may change them (after running out of memory:
# --gradient_checkpointing)
RUNTIME_FLAGS = ("output_dir", "resume", "device", "num_workers", "threads", "log_interval",
                 "save_steps", "cache_dir", "gradient_checkpointing", "overwrite_output_dir",
                 "tensorboard")


PRETRAINING_FLAGS = ("objective", "pretrain_lr", "mask_rate", "pretrain_dropout",
                     "mask_whole_words", "generator_size", "generator", "rtd_weight")
RENAMED_FLAGS = {"mlm_epochs": "pretrain_epochs", "mlm_lr": "pretrain_lr",
                 "mlm_probability": "mask_rate"}  # old name -> new, as saved runs hold them


def given_flags(parser, argv):
    """{flag: value} of the flags given on the command line (not their defaults)."""
    unset = object()
    # A namespace whose every value is a marker: what argparse replaces was given on the command
    # line
    blank = argparse.Namespace(**dict.fromkeys(vars(parser.parse_args([])), unset))
    given = parser.parse_args(argv, namespace=blank)  # argparse fills in only what is missing
    return {k: v for k, v in vars(given).items() if v is not unset}


def saved_args(args, folder, state, defaults):
    """--resume: the saved run's flags (defaults for flags newer than it); where and how to run
    may change."""
    if state["phase"] == "pretrain":
        try:
            saved = read_json(os.path.join(folder, "pretraining.json"))["args"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelError(f"{folder}/pretraining.json: cannot load ({e})") from None
    else:
        saved = read_info(folder)["args"]
    # runs before the flags' names changed saved them under their old names
    saved = {RENAMED_FLAGS.get(k, k): v for k, v in saved.items()}
    # The command given now decides where and how to run; the saved run decides everything else
    keep = {k: getattr(args, k) for k in RUNTIME_FLAGS}
    return argparse.Namespace(**{**defaults, **saved, **keep})


def refuse_changed_flags(parser, argv, args, positions):
    """--resume continues the saved run: flags other than where and how to run may not change.
    The same command again is fine, also when its --max_len was capped at the positions."""
    changed = [f"--{k}" for k, v in given_flags(parser, argv).items()
               if k not in RUNTIME_FLAGS and getattr(args, k, v) != v
               # The same command again is fine when --max_len was lowered to the model's positions
               # at start
               and not (k == "max_len" and v > args.max_len == positions)]
    if changed:
        raise DataError(f"--resume continues the saved run with its own flags; "
                        f"{' '.join(changed)} differ from it (a new --output_dir can change them)")


def fit_max_len(parser, argv, args, encoder, tokenizer, resumed):
    """--max_len within what the model takes; a resumed run instead refuses changed flags."""
    if resumed:
        refuse_changed_flags(parser, argv, args, length_limit(encoder, None))
    else:
        cap_max_len(args, encoder, tokenizer)


def fingerprint(source, examples):
    """What a run read from a source: its rows and sha256 digests of its texts and its labels."""
    texts, labels = hashlib.sha256(), hashlib.sha256()
    for text, label in examples:
        # Each text with its length first, so that "ab", "c" and "a", "bc" do not hash alike
        texts.update(f"{len(text)}:{text}".encode("utf-8", "surrogatepass"))
        labels.update(f"{label!r}\n".encode("utf-8", "surrogatepass"))
    return {"source": source, "rows": len(examples), "texts": texts.hexdigest(),
            "labels": labels.hexdigest()}


def data_read(args, splits, labels):
    """Fingerprints of the splits as read (pipes too) and the label list: every resumable state
    records them, and --resume refuses data that changed since."""
    source = args.train_file or f"--data {args.data} ({args.data_dir or CORPORA[args.data].folder})"
    sources = {"train": source, "valid": args.valid_file or f"{source}, its --valid_ratio split",
               "test": args.test_file or source}
    return {**{split: fingerprint(sources[split], examples)
               for split, examples in splits.items() if examples}, "label_list": labels}


def check_same_data(saved, now):
    """--resume: one line naming the file and what changed since the saved run read its data."""
    if saved is None:
        print("note: this state was saved before states recorded the data they were trained on: "
              "--resume cannot check that the data files are unchanged")
        return
    # Other labels change what every output row means: the saved head cannot go on with them
    if saved["label_list"] != now["label_list"]:
        raise DataError(f"--resume: the training data's labels are now {now['label_list']}, the "
                        f"saved run's were {saved['label_list']}"[:400])
    for split, read in now.items():
        was = saved.get(split)
        if split == "label_list" or was is None:
            continue
        what = (f"{read['rows']} rows where the saved run read {was['rows']}"
                if read["rows"] != was["rows"] else "its labels differ"
                if read["labels"] != was["labels"] else "its texts differ"
                if read["texts"] != was["texts"] else None)
        if what:
            raise DataError(f"--resume: {read['source']} has changed since the saved run read it "
                            f"({what}); resume with the same data, or start anew in another "
                            f"--output_dir")


# Every generator the run draws from, so that a resumed run draws what the uninterrupted one would
def rng_states():
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    # GPU dropout draws from the CUDA generators, one per device
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
    training_state.pt, built under a temporary name and renamed once complete; then `latest`
    names it and older states go. The folder `latest` names is never changed, so a kill at any
    moment (a second Ctrl-C, a full disk) leaves a complete state. Only this repository's folders
    are removed."""
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
    # A rename within one folder is atomic: the state appears whole or not at all
    os.rename(building, os.path.join(root, name))
    # latest names the new state only once it is complete, so a kill before here keeps the old one
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
    # latest is a name, not a path: "../../etc" cannot make --resume read elsewhere
    if not STATE_NAME.fullmatch(name):
        raise ModelError(f"{latest}: names {name[:60]!r}, not a state folder of this run")
    folder = os.path.join(output_dir, "states", name)
    try:
        state = torch.load(os.path.join(folder, "training_state.pt"), map_location="cpu",
                           weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise ModelError(f"{folder}/training_state.pt: cannot load "
                         f"({str(e).splitlines()[0]})") from None
    state = {"phase": "finetune", **state}  # states of older versions: fine-tuning
    check_state(f"{folder}/training_state.pt", state)
    return folder, state


STATE_FIELDS = {"epoch": int, "step": int, "global_step": int, "n_tokens": int, "history": list,
                "rng": dict, "optimizer": dict, "scheduler": dict, "scaler": dict}


def check_state(where, state):
    """training_state.pt as Run.save writes it, or one line naming the field that is not."""
    if not isinstance(state, dict):
        raise ModelError(f"{where}: not a dictionary")
    for key, kind in STATE_FIELDS.items():
        value = state.get(key)
        if type(value) is not kind or kind is int and value < 0:
            raise ModelError(f"{where}: {key} must be a {kind.__name__}"
                             + (" of at least 0" if kind is int else ""))
    checks = {"best_valid": type(state.get("best_valid")) in (int, float),
              "sums": isinstance(state.get("sums"), torch.Tensor) and state["sums"].shape == (3,),
              "phase": state.get("phase") in ("pretrain", "finetune"),
              "history": all(isinstance(row, dict) for row in state["history"]),
              "rng": set(state["rng"]) == {"python", "numpy", "torch", "cuda"}}
    for key, ok in checks.items():
        if not ok:
            raise ModelError(f"{where}: {key} is not what a state of this repository holds")


# ------------------------------------------------------------------------------------------ the run

class Run:
    """Where one phase of a run ("pretrain" or "finetune") stands, and what keeps it alive: the
    progress bar, the epoch's running sums, resumable states (with the optimizer, scheduler and
    scaler of `training`), Ctrl-C, the log line, metrics.jsonl and curves.png (fine-tuning), the
    checkpoint kept. write_model(folder, **info) writes the model folder of a state, and after
    an epoch (with the epoch's row as info) the checkpoint in keep_dir. `data` (data_read) is
    saved with every state, and restore() refuses a state whose data differ."""

    KEYS = ("epoch", "step", "global_step", "best_valid", "history")  # in a state

    def __init__(self, args, phase, machine, training, write_model, keep_dir, data,
                 prefix="train"):
        self.args, self.phase, self.machine, self.training = args, phase, machine, training
        self.write_model, self.keep_dir, self.data = write_model, keep_dir, data
        self.prefix = prefix  # of the epoch's metrics: train_loss, or mlm_loss when pretraining
        self.main_process = machine.rank == 0
        self.epoch, self.step, self.global_step, self.history = 0, 0, 0, []
        self.best_valid = -math.inf  # the best selection_score so far
        self.old_order_epoch = None  # a state of older versions ends its epoch in their order
        self.batch_shape = None  # (texts, length) of the batch in training, for out of memory
        self.board = None  # --tensorboard: the package is imported only when the flag is given
        if getattr(args, "tensorboard", False) and self.main_process:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(os.path.join(args.output_dir, "tensorboard", phase))
        self.new_epoch()

    def new_epoch(self):
        # the sums that need the model's outputs stay on the device (reading them back makes the
        # CPU wait for the GPU); the counts are the host's, the tokens the CPU batches'
        self.sums = torch.zeros(2, device=self.machine.device)  # loss * n, right
        self.n, self.n_tokens = 0, torch.zeros((), dtype=torch.long)
        self.losses, self.loss_steps = [], []  # the losses since the last check, and their steps

    def batches(self, loader, epochs):
        """The epoch's batches from self.step on (a resumed epoch skips those it has done), the
        longest first: a setting that does not fit in memory fails in its first seconds."""
        self.machine.stop.begin_training()
        if self.machine.threads:
            self.machine.threads.restart()
        loader.batch_sampler.set_epoch(self.epoch, start=self.step,
                                       longest_first=self.epoch != self.old_order_epoch)
        if self.phase == "finetune" and self.main_process:
            write_metrics(self.args.output_dir, self.history)
        self.n_batches, self.started = len(loader), time.perf_counter()
        title = "pretraining" if self.phase == "pretrain" else "epoch"
        with tqdm(desc=f"{title} {self.epoch + 1}/{epochs}", initial=self.step,
                  total=self.n_batches, leave=False, mininterval=1,
                  disable=None if self.main_process else True) as self.bar:
            for batch in loader:
                self.batch_shape = tuple(batch["input_ids"].shape)
                yield batch
        self.batch_shape = None
        self.seconds = time.perf_counter() - self.started

    def track(self, loss, right, n, attention_mask):
        """Add one batch to the epoch's sums: of its n items (texts; tokens in pretraining), `right`
        (a tensor) were right. Nothing is read back from the device here: the numbers come back
        every --log_interval batches, for the progress bar and the check of the loss."""
        self.sums += torch.stack([loss.detach().float() * n, right.float()])
        self.n += n
        self.n_tokens += attention_mask.sum()  # the CPU batch's mask, before it went to the device
        self.losses.append(loss.detach())
        self.loss_steps.append(self.global_step)
        self.step += 1
        self.bar.update()
        if self.machine.threads:  # every few seconds: as many threads as other work leaves cores
            self.machine.threads.look()
        if self.step % self.args.log_interval == 0:
            self.check_finite()  # in every process, so that they stop together
            if self.main_process:  # the epoch's running numbers, read back here only
                loss_sum, right = self.sums.tolist()
                now = {"loss": loss_sum / self.n, "accuracy": right / self.n,
                       "lr": self.training[1].get_last_lr()[0],
                       "samples_per_s": self.n / (time.perf_counter() - self.started)}
                self.bar.set_postfix(loss=f"{now['loss']:.4f}", acc=f"{now['accuracy']:.4f}",
                                     lr=f"{now['lr']:.2e}")
                self.scalars("step", now, self.global_step)

    @contextlib.contextmanager
    def out_of_memory_line(self):
        """Out of memory, on a GPU or in a CPU allocation, as one line naming the batch and the
        flags that help; the states already written stay."""
        try:
            yield
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
                raise
            where = (f"a training batch of {self.batch_shape[0]} texts x {self.batch_shape[1]} "
                     f"tokens" if self.batch_shape else "evaluation (--test_batch_size)")
            raise TrainingError(
                f"out of memory on {self.machine.device.type} in {where}: lower "
                f"--train_batch_size and raise --grad_accum_steps to keep the batch, or give "
                f"--gradient_checkpointing, or a lower --max_len; the states written so far are "
                f"kept in {self.args.output_dir}/states") from None

    def after_step(self):
        """After an optimizer step: a state every --save_steps; on Ctrl-C a state, then stop."""
        self.global_step += 1
        save_steps = self.args.save_steps
        if save_steps and self.global_step % save_steps == 0 and self.step < self.n_batches:
            self.save()
        if self.machine.stop.requested:
            self.save()
            raise KeyboardInterrupt

    def end_epoch(self, evaluate=None):
        """After the epoch's last batch: its row (evaluate() adds its metrics; a state before it
        lets a kill during evaluation resume there), its line, metrics.jsonl and curves, the
        checkpoint kept (the best on validation, else the last), and a state."""
        if evaluate:
            self.save()
        counts = torch.tensor([self.n, int(self.n_tokens)], device=self.sums.device)
        totals = all_reduce_sum(torch.cat([self.sums, counts.float()]), self.machine.world)
        loss_sum, right, n, tokens = totals.tolist()
        # the epoch's row: its training numbers (the prefix names the phase), then evaluation's
        row = {"epoch": self.epoch + 1, **{f"{self.prefix}_{k}": v for k, v in (
            ("loss", loss_sum / n), ("accuracy", right / n), ("samples_per_s", n / self.seconds),
            ("tokens_per_s", tokens / self.seconds))}, **(evaluate() if evaluate else {})}
        row["seconds"] = time.perf_counter() - self.started
        predictions = row.pop("predictions", None)  # arrays: beside the checkpoint, not in a row
        self.history.append(row)
        score = selection_score(row, self.args.metric_for_best) if "valid_loss" in row else None
        if self.main_process:
            self.report(row)
            if score is None or score > self.best_valid:  # without valid: the last epoch
                self.write_model(self.keep_dir, epoch=row["epoch"], metrics=row,
                                 threshold=row.get("threshold", self.args.threshold))
                if predictions:
                    write_predictions(self.keep_dir, predictions, row, self.data)
        if score is not None:
            self.best_valid = max(self.best_valid, score)
        self.epoch, self.step = self.epoch + 1, 0
        self.new_epoch()
        self.save()
        if self.machine.stop.requested:
            raise KeyboardInterrupt

    def scalars(self, kind, values, x):
        """--tensorboard: values as scalars named <kind>/<name> (step: every --log_interval
        batches, at the optimizer step; epoch: the epoch's row)."""
        if self.board:
            for name, value in values.items():
                if isinstance(value, (int, float)) and name != "epoch":
                    self.board.add_scalar(f"{kind}/{name}", value, x)
            self.board.flush()

    def report(self, row):
        """The epoch's line; for fine-tuning metrics.jsonl and curves.png too."""
        self.scalars("epoch", row, row["epoch"])
        if self.phase == "finetune":
            write_metrics(self.args.output_dir, self.history)
            save_curves(self.history, os.path.join(self.args.output_dir, "curves.png"))
        split = "valid" if "valid_loss" in row else "test"
        title = "pretraining epoch" if self.phase == "pretrain" else "epoch"
        tqdm.write(f"{title} {row['epoch']}: " + " ".join(
            f"{k} {v:.4f}" for k, v in row.items() if k.endswith(("loss", "accuracy", "f1")))
            + (f" threshold {row['threshold']:.2f}" if "threshold" in row else "")
            + f" ({self.seconds:.0f} s train)"
            + (f"\n  {split} {per_class_line(row[split + '_per_class'])}"
               if split + "_per_class" in row else ""))

    def early_stopped(self):
        """--early_stopping: True (with a note) once that many epochs have not beaten the best."""
        if self.phase == "pretrain" or not early_stop(self.history, self.args):
            return False
        if self.main_process:
            best = max(self.history,
                       key=lambda r: selection_score(r, self.args.metric_for_best))
            print(f"early stopping: valid {self.args.metric_for_best} has not improved for "
                  f"{self.args.early_stopping} epochs; kept epoch {best['epoch']}")
        return True

    def end(self):
        """After the last epoch: what was saved; no process goes on while another still writes."""
        if self.main_process and self.phase == "pretrain":
            print(f"saved the pretrained model in {self.keep_dir} (--model {self.keep_dir} starts "
                  f"from it)")
        elif self.main_process:
            print(f"saved {self.keep_dir} (predict with: python predict.py --model_dir "
                  f"{self.keep_dir} \"문장\")")
        if self.machine.world > 1:
            torch.distributed.barrier()

    def check_finite(self):
        """One line when a loss since the last check was NaN or infinite; under torchrun every
        process checks at the same steps and all stop at the first bad step of any of them."""
        finite = torch.isfinite(torch.stack(self.losses)) if self.losses else None
        bad = -1
        if finite is not None and not bool(finite.all()):  # one value read back, where all is well
            bad = self.loss_steps[finite.tolist().index(False)]
        self.losses, self.loss_steps = [], []
        if self.machine.world > 1:
            never = 2**62  # a process without a bad step: later than any step
            earliest = torch.tensor(bad if bad >= 0 else never, device=self.sums.device)
            torch.distributed.all_reduce(earliest, op=torch.distributed.ReduceOp.MIN)
            bad = int(earliest) if int(earliest) < never else -1
        if bad >= 0:
            raise TrainingError(f"the loss became NaN or infinite at optimizer step {bad + 1} "
                                f"(epoch {self.epoch + 1}); the last good state is kept in "
                                f"{self.args.output_dir}/states; try a lower --lr")

    def save(self):
        """A resumable state (main process only), never one after a non-finite loss."""
        self.check_finite()
        if self.main_process:
            optimizer, scheduler, scaler = self.training
            precision = {v: k for k, v in PRECISIONS.items()}[self.machine.dtype]
            save_state(self.args.output_dir, self.write_model, {
                **{k: getattr(self, k) for k in self.KEYS}, "phase": self.phase,
                "sums": torch.tensor([*self.sums.tolist(), self.n]),  # loss * n, right, n
                "n_tokens": int(self.n_tokens), "precision": precision,
                "batch_order": "longest_first", "data": self.data, "rng": rng_states(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()})

    def restore(self, state):
        check_same_data(state.get("data"), self.data)
        key = "optimizer"
        try:  # load_state checked the fields' types; here, that they fit this run's parts
            for part, key in zip(self.training, ("optimizer", "scheduler", "scaler")):
                part.load_state_dict(state[key])
            key = "rng"
            set_rng_states(state["rng"])
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
            raise ModelError(f"--resume: training_state.pt: {key} does not fit this model "
                             f"({str(e).splitlines()[0][:120]})") from None
        for k in self.KEYS:
            setattr(self, k, state[k])
        self.sums, self.n = state["sums"][:2].to(self.machine.device), int(state["sums"][2])
        self.n_tokens = torch.tensor(state["n_tokens"])
        if state.get("batch_order") != "longest_first" and self.step:  # an older version's
            self.old_order_epoch = self.epoch  # epoch, begun in its order: ended in it
        if self.main_process:  # where the run goes on from, said before its first batch
            print(f"resuming {'pretraining' if self.phase == 'pretrain' else 'fine-tuning'} at "
                  f"epoch {self.epoch + 1}, batch {self.step} of it (optimizer step "
                  f"{self.global_step})", flush=True)


# ------------------------------------------------------------------------------ the checkpoint kept

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


PREDICTIONS = "predictions.json"


def write_predictions(folder, predictions, row, data):
    """predictions.json beside the kept checkpoint: per evaluation split, each text's label,
    predicted label(s) and probabilities in the split's order, with the split's fingerprint (the
    one states record), so that compare.py can tell two runs were scored on the very same texts.
    Single-label labels are ids; multi-label ones lists of ids."""
    def ids(rows):  # label ids, or for multi-hot rows the ids of each row's labels
        rows = np.asarray(rows)
        return rows.tolist() if rows.ndim == 1 else [np.flatnonzero(r).tolist() for r in rows]

    splits = {split: {"fingerprint": data.get(split), "label": ids(kept["label"]),
                      "predicted": ids(kept["predicted"].argmax(-1) if row.get("threshold") is None
                                       else kept["predicted"]),
                      "probs": np.round(kept["probs"], 5).tolist()}
              for split, kept in predictions["splits"].items()}
    record = {"epoch": row["epoch"], "label_names": predictions["label_names"],
              "problem": "single_label" if row.get("threshold") is None else "multi_label",
              "threshold": row.get("threshold"), "splits": splits}
    write_atomic(os.path.join(folder, PREDICTIONS), lambda p: Path(p).write_text(
        json.dumps(record, ensure_ascii=False), encoding="utf-8"))


def write_metrics(output_dir, history):
    """metrics.jsonl, rewritten whole from the run's history (a resumed run never repeats a row)."""
    write_atomic(os.path.join(output_dir, "metrics.jsonl"),
                 lambda p: Path(p).write_text("".join(json.dumps(row) + "\n" for row in history)))
