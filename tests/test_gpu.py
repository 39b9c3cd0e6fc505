"""The GPU path, checked on a CPU: the precision each GPU gets (torch.cuda made to report a T4, a
V100, an A100, an H100), no device read between progress updates, the longest batch first, out of
memory as one line, gradient checkpointing, several processes."""

import argparse
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, run, write_data

import _3_run
from _1_data import LengthBucketSampler
from inference import auto_precision, choose_device
from _3_run import Machine, Run, StopRequest, with_precision

GPUS = {
    "Tesla T4": ((7, 5), "fp16"),
    "Tesla V100-SXM2-16GB": ((7, 0), "fp16"),
    "NVIDIA A100-SXM4-40GB": ((8, 0), "bf16"),
    "NVIDIA H100 80GB HBM3": ((9, 0), "bf16"),
    "Tesla P100-PCIE-16GB": ((6, 0), "fp32"),
}


@pytest.fixture
def gpu(monkeypatch):
    """make_gpu(name): torch.cuda reports that GPU (and, as torch 2.13 does on 7.x, bf16 support
    counting emulation)."""

    def make_gpu(name):
        capability = GPUS[name][0]
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(
            torch.cuda,
            "is_bf16_supported",
            lambda including_emulation=True: including_emulation or capability >= (8, 0),
        )
        return torch.device("cuda")

    return make_gpu


@pytest.mark.parametrize("name", GPUS)
def test_auto_precision_is_what_the_gpu_runs_fast(gpu, name):
    """bf16 from compute capability 8 (its own units), fp16 with loss scaling on 7.x (a T4 has
    fp16 tensor cores and emulates bf16, slower than float32), float32 below."""
    device = gpu(name)
    precision, why = auto_precision(device)
    assert precision == GPUS[name][1] and name in why
    args = argparse.Namespace(precision="auto")
    machine = with_precision(Machine(device, None, 0, 1, None, None), args)
    assert machine.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[precision]


def test_float32_matmuls_use_tf32_on_a_gpu(gpu):
    before = torch.backends.cuda.matmul.fp32_precision
    try:
        choose_device("cuda") if gpu("NVIDIA A100-SXM4-40GB") else None
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


@pytest.mark.parametrize(
    "state,expected",
    [
        ({"precision": "bf16", "scaler": {}}, torch.bfloat16),  # saved under bf16: stays bf16
        ({"scaler": {}}, torch.bfloat16),  # before states said: auto was bf16 on a T4
        ({"scaler": {"scale": 65536.0}}, torch.float16),
    ],
)
def test_resume_keeps_the_precision_its_state_was_saved_in(gpu, state, expected):
    """A T4 now picks fp16, but a state saved in bf16 (today's auto) holds an empty, disabled
    scaler state, which an enabled fp16 scaler cannot load: it goes on in bf16."""
    machine = Machine(gpu("Tesla T4"), None, 0, 1, None, None)
    args = argparse.Namespace(precision="auto")
    assert with_precision(machine, args, state).dtype == expected
    assert with_precision(machine, args).dtype == torch.float16  # a new run on a T4


def test_the_first_batch_of_every_epoch_is_the_longest():
    lengths = np.random.default_rng(0).integers(3, 200, 1000)
    sampler = LengthBucketSampler(lengths, 16, seed=1, window=4)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        new = list(sampler)
        sampler.set_epoch(epoch, longest_first=False)
        old = list(sampler)  # the order states of older versions were saved under
        size = [len(b) * lengths[b].max() for b in new]
        assert size[0] == max(size) and size[0] > np.median(size)
        assert new[1:] == [b for b in old if b != new[0]] and new != old


def tiny_run(machine, args, tmp_path):
    """A Run over a one-weight model, as _3_main builds one, for the state it restores."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    training = (
        optimizer,
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
        torch.amp.GradScaler("cpu", enabled=False),
    )
    return Run(args, "finetune", machine, training, None, str(tmp_path), None)


def test_a_state_of_an_older_version_ends_its_epoch_in_its_order(tmp_path):
    args = argparse.Namespace(log_interval=1, output_dir=str(tmp_path))
    machine = Machine(torch.device("cpu"), None, 0, 1, None, None)
    old = tiny_run(machine, args, tmp_path)
    state = {
        "epoch": 1,
        "step": 5,
        "global_step": 9,
        "best_valid": 0.0,
        "history": [],
        "sums": torch.zeros(3),
        "n_tokens": 0,
        "rng": _3_run.rng_states(),
        **dict(
            zip(("optimizer", "scheduler", "scaler"), (part.state_dict() for part in old.training))
        ),
    }
    old.restore(state)
    assert old.old_order_epoch == 1  # epoch 1 ends in the old order; epoch 2 is longest first
    new = tiny_run(machine, args, tmp_path)
    new.restore({**state, "batch_order": "longest_first"})
    assert new.old_order_epoch is None


class Reads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts what makes a CPU wait for a GPU: values read back to Python, and tensors made from
    Python numbers (on a CPU host and device are one, so every such operation counts)."""

    WAITS = {
        "aten._local_scalar_dense.default",
        "aten.lift_fresh.default",
        "aten.scalar_tensor.default",
    }

    def __init__(self):
        super().__init__()
        self.count, self.paused = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += str(func) in self.WAITS and not self.paused
        return func(*args, **(kwargs or {}))

    def pause(self, function):
        """function, with what it does left uncounted."""

        def paused(*args, **kwargs):
            self.paused += 1
            try:
                return function(*args, **kwargs)
            finally:
                self.paused -= 1

        return paused


def test_no_step_waits_for_the_device_between_progress_updates(small_data, tmp_path, monkeypatch):
    """K steps with --log_interval K: no read back and no tensor from a Python number in K - 1
    of them (the K-th shows the running loss and checks it is finite). Not counted: making the
    batch and the epoch's loader seed (on the host), FastDropout's seed (the CPU-only dropout: a
    GPU runs torch's), and transformers' own check whether a batch has padding (sdpa_mask reads
    mask.all() per forward: theirs, not the loop's)."""
    import transformers.masking_utils

    import _1_data
    import _3_main

    k = 6
    reads, per_step = Reads(), []
    for module, name in (
        (_1_data, "pad_to_longest"),
        (torch.utils.data.DataLoader, "__iter__"),
        (_3_run, "dropout_mask"),
        (transformers.masking_utils, "_ignore_bidirectional_mask_sdpa"),
    ):
        monkeypatch.setattr(module, name, reads.pause(getattr(module, name)))
    track = Run.track

    def counted_track(self, *args):  # the count at the end of each step
        track(self, *args)
        per_step.append(reads.count)

    monkeypatch.setattr(Run, "track", counted_track)
    monkeypatch.setattr(StopRequest, "__init__", lambda self: setattr(self, "requested", False))
    argv = [
        "--model",
        "tiny",
        "--mlm_epochs",
        "0",
        "--head_name",
        "cls",
        "--train_file",
        str(small_data / "train.jsonl"),
        "--test_file",
        str(small_data / "test.jsonl"),
        "--max_train_samples",
        str(16 * k),
        "--train_batch_size",
        "16",
        "--total_epochs",
        "1",
        "--log_interval",
        str(k),
        "--max_len",
        "32",
        "--output_dir",
        str(tmp_path / "out"),
        "--cache_dir",
        str(tmp_path / "cache"),
    ]
    start = _3_main.start

    def start_counting(args):  # count from the first step on, not while loading
        machine = start(args)
        per_step.append(0)
        return machine

    monkeypatch.setattr(_3_main, "start", start_counting)
    original_train = _3_main.train

    def train_counted(*args, **kwargs):
        with reads:
            per_step[0] = reads.count
            original_train(*args, **kwargs)

    monkeypatch.setattr(_3_main, "train", train_counted)
    _3_main.main(argv)
    state = torch.load(
        tmp_path
        / "out"
        / "states"
        / (tmp_path / "out" / "states" / "latest").read_text()
        / "training_state.pt",
        weights_only=True,
    )
    assert state["precision"] == "fp32" and state["batch_order"] == "longest_first"
    waits = np.diff(per_step[: k + 1])
    assert len(waits) == k and list(waits[:-1]) == [0] * (k - 1) and waits[-1] > 0


def long_texts(folder, n, words):
    rng = np.random.default_rng(0)
    syllables = list("가나다라마바사아자차카타파하고노도로모보소오조")
    rows = ["".join(rng.choice(syllables, 3)) for _ in range(n * words)]
    (folder / "long.jsonl").write_text(
        "".join(
            json.dumps(
                {"text": " ".join(rows[i * words : (i + 1) * words]), "label": i % 2},
                ensure_ascii=False,
            )
            + "\n"
            for i in range(n)
        ),
        encoding="utf-8",
    )
    return folder / "long.jsonl"


def test_out_of_memory_is_one_line_in_the_first_seconds(tmp_path):
    """A batch that does not fit fails at the first step (the longest comes first), in one line
    naming the batch and the flags that help; here a CPU allocation under a 2.5 GB data limit."""
    data = long_texts(tmp_path, 96, 400)

    def limit():
        resource.setrlimit(resource.RLIMIT_DATA, (int(2.5 * 2**30), int(2.5 * 2**30)))

    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "_3_main.py"),
            "--model",
            "tiny",
            "--mlm_epochs",
            "0",
            "--train_file",
            str(data),
            "--max_len",
            "512",
            "--train_batch_size",
            "96",
            "--output_dir",
            str(tmp_path / "out"),
            "--cache_dir",
            str(tmp_path / "cache"),
        ],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert re.search(r"out of memory on cpu in a training batch of 96 texts x \d{3} tokens", line)
    assert "--gradient_checkpointing" in line and "--grad_accum_steps" in line


def test_gradient_checkpointing_recomputes_the_same_dropout(small_data, tmp_path):
    """With --gradient_checkpointing the recomputed forward draws the same dropout masks (torch
    restores the random state, and FastDropout seeds from it): the same test loss."""
    losses = []
    for flags in ([], ["--gradient_checkpointing"]):
        out = tmp_path / f"out{len(flags)}"
        run(
            "_3_main.py",
            "--model",
            "tiny",
            "--mlm_epochs",
            0,
            "--train_file",
            small_data / "train.jsonl",
            "--test_file",
            small_data / "test.jsonl",
            "--max_len",
            32,
            "--total_epochs",
            1,
            "--dr_rate",
            0.3,
            "--output_dir",
            out,
            "--threads",
            1,
            "--cache_dir",
            tmp_path / "cache",
            *flags,
        )
        losses.append(json.loads((out / "metrics.jsonl").read_text())["test_loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


COUNT_REDUCTIONS = """
import atexit, os, torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
class Counting(torch.nn.parallel.DistributedDataParallel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        def hook(state, bucket):
            CALLS[0] += bucket.index() == 0  # one gradient reduction (its first bucket)
            return allreduce_hook(None, bucket)
        self.register_comm_hook(None, hook)
CALLS = [0]
torch.nn.parallel.DistributedDataParallel = Counting
if "RANK" in os.environ:  # the processes torchrun starts, not torchrun itself
    atexit.register(lambda: open(os.environ["COUNT_FILE"] + os.environ["RANK"], "w").write(
        str(CALLS[0])))
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path, out, *flags):
    """_3_main.py in 3 gloo processes on 300 training and 100 test texts (1 test batch of 64
    and one of 36: fewer batches than processes), counting DDP's gradient reductions."""
    data = write_data(tmp_path, 300, 100)
    (tmp_path / "sitecustomize.py").write_text(COUNT_REDUCTIONS)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(tmp_path),
        "COUNT_FILE": str(tmp_path / "reductions"),
    }
    return subprocess.run(
        [
            "torchrun",
            "--nproc_per_node",
            "3",
            "--master_port",
            str(free_port()),
            os.path.join(ROOT, "_3_main.py"),
            "--model",
            "tiny",
            "--mlm_epochs",
            "0",
            "--train_file",
            str(data / "train.jsonl"),
            "--test_file",
            str(data / "test.jsonl"),
            "--max_len",
            "32",
            "--train_batch_size",
            "8",
            "--test_batch_size",
            "64",
            "--total_epochs",
            "1",
            "--output_dir",
            str(out),
            "--cache_dir",
            str(tmp_path / "cache"),
            *flags,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_three_processes_evaluate_every_text_once_and_reduce_once_per_step(tmp_path):
    if not shutil.which("torchrun"):
        pytest.skip("torchrun is not on PATH")
    out = tmp_path / "out"
    result = torchrun(tmp_path, out, "--grad_accum_steps", "3")
    assert result.returncode == 0, result.stderr[-4000:]
    row = json.loads((out / "metrics.jsonl").read_text())
    # 300 texts in global batches of 24: 13 batches (the last of 12), 5 optimizer steps
    steps = int(result.stdout.split(" optimizer steps")[0].rsplit(" ", 1)[1])
    assert steps == 5
    for rank in range(3):
        assert int((tmp_path / f"reductions{rank}").read_text()) == steps
    scored = run(
        "predict.py",
        "--model_dir",
        out,
        "--file",
        tmp_path / "test.jsonl",
        "--output",
        tmp_path / "rows.jsonl",
    )
    assert row["n_test"] == 100 and f"accuracy {row['test_accuracy']:.4f}" in scored.stderr


def test_a_non_finite_loss_stops_every_process_with_one_line(tmp_path):
    if not shutil.which("torchrun"):
        pytest.skip("torchrun is not on PATH")
    result = torchrun(tmp_path, tmp_path / "out", "--lr", "1e30", "--log_interval", "2")
    # the line from each process (torchrun then adds its own report of the failed processes)
    assert result.returncode != 0
    assert result.stderr.count("error: the loss became NaN or infinite at optimizer step") == 3


def test_xla_under_torchrun_is_refused(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "_3_main.py"),
            "--device",
            "xla",
            "--output_dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"},
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--device xla runs as one process here" in result.stderr


def test_padding_to_a_multiple_of_8_leaves_predictions_unchanged(tiny_checkpoint):
    """CUDA batches are padded to a multiple of 8; the heads ignore padding."""
    from _1_data import make_loader
    from inference import predict_logits
    from predict import Predictor

    predictor = Predictor(str(tiny_checkpoint[0]), "cpu", batch_size=7)
    texts = ["재밌다", "정말 최고의 영화였다 배우들 연기가 좋고", "별로", "ㅋㅋㅋ 웃기다 " * 5]
    loader = predictor.loader(texts)
    padded = make_loader(loader.dataset, loader.batch_sampler, predictor.pad_id, pad_multiple=8)
    assert next(iter(padded))["input_ids"].shape[1] % 8 == 0
    expected = predict_logits(predictor.model, loader, torch.device("cpu"))
    got = predict_logits(predictor.model, padded, torch.device("cpu"))
    np.testing.assert_allclose(got, expected, atol=1e-5)
