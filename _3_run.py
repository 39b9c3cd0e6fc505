"""What keeps a run of _3_main.py alive but is not the method: `start` (torchrun, the lock on
--output_dir, device, threads, seeds), resumable states and the --resume checks, Ctrl-C, the
CPU-only dropout/attention speed-up, and `Run`, the object the training loop calls at a few named
points (`batches`, `track`, `after_step`, `end_epoch`) to count, save, log and keep checkpoints.
"""
import argparse
import atexit
import collections
import contextlib
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

from _1_data import DataError, printable, write_atomic
from _2_model import (PRECISIONS, ModelError, auto_precision, choose_device, read_info, read_json,
                      save_figure)


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss); the message is one line."""


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


# ----------------------------------------------------------------------------- setting a run up

# What start() set up: the device and the autocast dtype (None: float32 without autocast; set by
# with_precision once a resumed state is read), this
# process's rank and the world size under torchrun (else 0 and 1; rank 0 writes the files), the
# StopRequest, and the lock on --output_dir (rank 0), released when the run ends.
Machine = collections.namedtuple("Machine", "device dtype rank world stop lock")


def start(args):
    """A Machine for the run: Ctrl-C and SIGTERM handled, torchrun's process group, the lock on
    --output_dir, the device, torch's threads and the seeds."""
    stop = StopRequest()
    rank, world = init_distributed(args.device)
    lock = lock_output_dir(args.output_dir) if rank == 0 else None
    device = choose_device(args.device)
    set_threads(args.threads, device)
    seed_everything(args.seed)
    return Machine(device, None, rank, world, stop, lock)


def with_precision(machine, args, state=None):
    """machine with the run's autocast dtype, said in one line: --precision (auto: what the GPU
    runs fast, auto_precision); a resumed run keeps the precision its state was saved in (an fp16
    scaler's state cannot go on in bf16, nor the other way)."""
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
    except filelock.Timeout:
        raise DataError(f"--output_dir {output_dir}: another run is writing to it; wait for "
                        f"it to end or choose another folder") from None
    except OSError as e:
        raise DataError(f"--output_dir {output_dir}: cannot write there ({e.strerror})") from None
    return lock


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


# ----------------------------------------------------------------------------- several processes

def init_distributed(device_name):
    """(rank, world size) under torchrun (gloo on CPU, nccl on GPU); (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    if device_name == "xla":  # torch_xla has its own launcher and collectives, not torchrun's
        raise DataError("--device xla runs as one process here; start it without torchrun")
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


@contextlib.contextmanager
def main_process_first(machine):
    """Under torchrun, the first process runs the block before the others: it fills the caches in
    --cache_dir (tiny's learned vocabulary, the tokenized texts), which the others then read, so
    every process has the very same vocabulary (two trainings of one may differ in ties)."""
    if machine.world > 1 and machine.rank != 0:
        torch.distributed.barrier()
    yield
    if machine.world > 1 and machine.rank == 0:
        torch.distributed.barrier()


def all_reduce_sum(tensor, world):
    if world > 1:
        torch.distributed.all_reduce(tensor)
    return tensor


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


def use_fast_dropout(model, encoders):
    """Swap every nn.Dropout for FastDropout and the encoders' attention for
    fast_dropout_attention (with SDPA's masks) where they use SDPA."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is nn.Dropout:
                setattr(module, name, FastDropout(child.p))
    AttentionInterface.register("fast_dropout", fast_dropout_attention)
    AttentionMaskInterface.register("fast_dropout", sdpa_mask)
    for encoder in encoders:
        if getattr(encoder.config, "_attn_implementation", None) == "sdpa":
            encoder.set_attn_implementation("fast_dropout")


# ----------------------------------------------------------------------------- --resume

RUNTIME_FLAGS = ("output_dir", "resume", "device", "num_workers", "threads", "log_interval",
                 "save_steps", "cache_dir", "compile", "gradient_checkpointing")  # where and how
# to run: --resume may change them (after running out of memory: --gradient_checkpointing)


def given_flags(parser, argv):
    """{flag: value} of the flags given on the command line (not their defaults)."""
    unset = object()
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
    keep = {k: getattr(args, k) for k in RUNTIME_FLAGS}
    return argparse.Namespace(**{**defaults, **saved, **keep})


def refuse_changed_flags(parser, argv, args, positions):
    """--resume continues the saved run: flags other than where and how to run may not change.
    The same command again is fine, also when its --max_len was capped at the positions."""
    changed = [f"--{k}" for k, v in given_flags(parser, argv).items()
               if k not in RUNTIME_FLAGS and getattr(args, k, v) != v
               and not (k == "max_len" and v > args.max_len == positions)]
    if changed:
        raise DataError(f"--resume continues the saved run with its own flags; "
                        f"{' '.join(changed)} differ from it (a new --output_dir can change them)")


def check_same_data(saved, now):
    """--resume: one line naming the file and what changed since the saved run read its data."""
    if saved is None:
        print("note: this state was saved before states recorded the data they were trained on: "
              "--resume cannot check that the data files are unchanged")
        return
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


# ----------------------------------------------------------------------------- the run

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
        if self.step % self.args.log_interval == 0:
            self.check_finite()  # in every process, so that they stop together
            if self.main_process:
                loss_sum, right = self.sums.tolist()
                self.bar.set_postfix(loss=f"{loss_sum / self.n:.4f}", acc=f"{right / self.n:.4f}",
                                     lr=f"{self.training[1].get_last_lr()[0]:.2e}")

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
        prefix = self.prefix
        row = {"epoch": self.epoch + 1, f"{prefix}_loss": loss_sum / n,
               f"{prefix}_accuracy": right / n, f"{prefix}_samples_per_s": n / self.seconds,
               f"{prefix}_tokens_per_s": tokens / self.seconds, **(evaluate() if evaluate else {})}
        row["seconds"] = time.perf_counter() - self.started
        self.history.append(row)
        score = selection_score(row, self.args.metric_for_best) if "valid_loss" in row else None
        if self.main_process:
            self.report(row)
            if score is None or score > self.best_valid:  # without valid: the last epoch
                self.write_model(self.keep_dir, epoch=row["epoch"], metrics=row,
                                 threshold=row.get("threshold", self.args.threshold))
        if score is not None:
            self.best_valid = max(self.best_valid, score)
        self.epoch, self.step = self.epoch + 1, 0
        self.new_epoch()
        self.save()
        if self.machine.stop.requested:
            raise KeyboardInterrupt

    def report(self, row):
        """The epoch's line; for fine-tuning metrics.jsonl and curves.png too."""
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


# ----------------------------------------------------------------------------- metrics and curves

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
    shown = ", ".join(f"{printable(name)} {r['f1']:.2f}"
                      for name, r in ranked[:3 if len(ranked) > 4 else 4])
    return f"F1 per class {shown}" if len(ranked) <= 4 else f"weakest F1 {shown}"


def write_metrics(output_dir, history):
    """metrics.jsonl, rewritten whole from the run's history (a resumed run never repeats a row)."""
    write_atomic(os.path.join(output_dir, "metrics.jsonl"),
                 lambda p: Path(p).write_text("".join(json.dumps(row) + "\n" for row in history)))


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
