"""Fine-tune a BERT-family encoder for document classification.

    python3 _3_main.py --model tiny --data_dir data/nsmc_sample --pretrain_epochs 0  # offline
    python3 _3_main.py --model kobert --head_name pooler --dr_rate 0.5   # the KoBERT notebook

Read in order: the flags; the parts a researcher changes (parameter groups, optimizer, schedule,
loss); `train`, the one loop of pretraining and fine-tuning; evaluation; `pretrain`, `main`. What
keeps a run alive (resume, Ctrl-C, torchrun, the --output_dir lock, metrics files) is _3_run.py.
"""
import argparse
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from _1_data import (CORPORA, TRUNCATIONS, BERTDataset, LengthBucketSampler, column_names,
                     labels_and_names, load_corpus, make_loader, masking_for, pad_multiple,
                     read_unlabeled, text_encoding, tokenize, tokenized_splits)
from _2_model import PRESETS, Detection, model_to_pretrain, pretraining_to_resume, set_dropout
from _3_run import (Run, check_flags, data_read, fingerprint, fit_max_len, load_state,
                    main_process_first, place_model, saved_args, seed_everything, split_logits,
                    start, with_precision)
from checkpoint import (classifier_to_finetune, load_checkpoint, save_checkpoint,
                        save_pretraining, trained_head)
from common import ArgumentParser, run_script
from heads import HEADS
from metrics import score_logits, tune_threshold

# -------------------------------------------------------------------------------------------- flags

# A model trained from scratch wants a larger learning rate than fine-tuning, and pretraining
# first, hiding 30% of the tokens (above 15% with both seeds; Wettig et al. 2022), without dropout
# (as accurate, faster) for 6 epochs (what fits in the hour), then the weight_avg head, which pools
# every token where [CLS] learnt nothing of its own (+0.0034): docs/results.md has the runs.
PRESET_DEFAULTS = {
    "tiny": {"lr": 3e-4, "warmup_rate": 0.06, "dr_rate": 0.1, "total_epochs": 2,
             "train_batch_size": 64, "pretrain_epochs": 6, "pretrain_lr": 5e-4, "mask_rate": 0.3,
             "pretrain_dropout": 0.0, "head_name": "weight_avg"},
}


# ...and where a --problem wants other ones: 28 labels of short comments need more epochs than two
# sentiments, and fewer of pretraining fit in the hour (docs/results.md: GoEmotions-Korean)
PROBLEM_DEFAULTS = {
    ("tiny", "multi_label"): {"pretrain_epochs": 3, "total_epochs": 6, "pretrain_dropout": None},
}


def build_parser():
    # Flags in the groups --help shows. Every default works; a preset (--model tiny, kobert, ...)
    # brings its own defaults for some of them (PRESET_DEFAULTS, by --problem too), and a flag
    # given still wins.
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument_group("data").add_argument
    a("--data", choices=list(CORPORA), default="nsmc",
      help="built-in corpus, used when no --train_file")
    a("--data_dir", help="folder of --data (default data/nsmc, data/imdb); downloaded if missing")
    a("--train_file", help="TSV/CSV/JSONL with a header, instead of --data")
    a("--valid_file", help="validation file; the checkpoint kept is the best on it")
    a("--test_file", help="test file, evaluated every epoch, never used for selection")
    a("--text_column", help="text column (default: document, text, sentence, review, ...)")
    a("--label_column", help="label column (default: label, labels, sentiment, ...)")
    a("--encoding", default="utf-8", type=text_encoding, help="of the files (Excel: cp949)")
    a("--columns", type=column_names,
      help="column names of a TSV/CSV without a header (e.g. text,labels)")
    a("--label_names", help="comma-separated display names in label order (NSMC: 부정,긍정)")
    a("--label_file", help="class names, one per line (GoEmotions' label.txt)")
    a("--data_labels", choices=["auto", "names", "line_numbers"], default="auto", help="with "
      "--label_file: the data's labels are class names or line numbers (auto: whichever fits)")
    a("--problem", choices=["single_label", "multi_label"], default="single_label",
      help="multi_label: several labels per text (sigmoids, binary cross-entropy)")
    a("--label_sep", default=",",
      help="with multi_label: separator of the labels in a TSV/CSV label field (JSONL: a list)")
    a("--valid_ratio", type=float, default=0.0, help="share of train kept out for validation")
    a("--max_train_samples", type=int, default=0, help="seeded subset of the training set (0: all)")
    a("--max_eval_samples", type=int, default=0, help="seeded subset of valid and test (0: all)")
    a("--min_chars", type=int, default=0, help="drop texts shorter than this many characters")
    a("--max_len", type=int, default=128, help="tokens per text at most, [CLS] and [SEP] in")
    a("--truncation", choices=TRUNCATIONS, default="head", help="what of a longer text to keep: "
      "its head, tail, or head_tail (a quarter from the start, the rest from the end)")
    a = p.add_argument_group("model").add_argument
    a("--model", default="klue-roberta",
      help=f"preset ({', '.join(PRESETS)}), Hugging Face hub id, or local model folder")
    a("--head_name", help=f"classification head: {', '.join(HEADS)} (default: cls; a preset's "
      "or a checkpoint folder's own)")
    a("--dr_rate", type=float, default=0.1, help="dropout rate in the head")
    a("--freeze_backbone", action="store_true", help="train the head only")
    a = p.add_argument_group("training").add_argument
    a("--train_batch_size", type=int, default=32, help="examples per training batch")
    a("--test_batch_size", type=int, default=128, help="examples per evaluation batch")
    a("--grad_accum_steps", type=int, default=1, help="batches per optimizer step")
    a("--lr", type=float, default=5e-5, help="peak learning rate of AdamW")
    a("--weight_decay", type=float, default=0.01, help="AdamW's (none on biases, LayerNorm)")
    a("--warmup_rate", type=float, default=0.1, help="share of optimizer steps with linear warmup")
    a("--total_epochs", type=int, default=3, help="passes over the training set")
    a("--max_grad_norm", type=float, default=1.0, help="clip gradients to this norm (0: none)")
    a("--class_weights", choices=["none", "balanced"], default="none",
      help="balanced: weigh each class in the loss by inverse frequency (multi_label: each "
      "label's positives by its negatives per positive)")
    a("--threshold", type=float, default=0.5,
      help="with multi_label: a label is predicted when its probability is above this")
    a("--tune_threshold", action="store_true",
      help="with multi_label: pick the threshold with the best macro-F1 on the validation split")
    a("--metric_for_best", choices=["accuracy", "macro_f1", "loss"], help="validation metric "
      "that picks the checkpoint kept (default: accuracy; multi_label: macro_f1)")
    a("--early_stopping", type=int, default=0,
      help="stop after this many epochs without a better --metric_for_best (0: never)")
    a("--seed", type=int, default=42, help="seed for python, numpy and torch")
    a("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
      help="autocast dtype; auto: bf16 on GPUs with bfloat16 units (A100, H100), fp16 with loss "
      "scaling on V100 and T4, else fp32; --resume keeps the saved run's")
    a = p.add_argument_group("continued pretraining (before fine-tuning)").add_argument
    a("--pretrain_epochs", "--mlm_epochs", type=int, default=0,
      help="pretrain the backbone this many epochs on the training texts (and --unlabeled_file) "
      "first; saved in <output_dir>/pretrained")
    a("--objective", choices=["mlm", "rtd"], default="mlm",
      help="mlm: predict the hidden tokens (BERT); rtd (tiny, ELECTRA): replaced-token "
      "detection, a small generator fills them and the model tells which tokens it replaced")
    a("--unlabeled_file", help="more texts for pretraining: one per line, or a table")
    a("--pretrain_lr", "--mlm_lr", type=float, help="pretraining's peak lr (default --lr)")
    a("--mask_rate", "--mlm_probability", type=float, default=0.15,
      help="share of each text's tokens that pretraining hides")
    a("--pretrain_dropout", type=float, help="dropout while pretraining (default: the model's)")
    a("--mask_whole_words", action="store_true",
      help="hide whole words (a piece and the pieces that continue it) instead of single pieces")
    a("--generator_size", type=float, default=0.25,
      help="rtd: the generator's width as a share of the model's (ELECTRA: 1/4 to 1/2)")
    a("--generator", help="rtd: an ELECTRA generator folder to start from, not a new one")
    a("--rtd_weight", type=float, default=50.0,
      help="rtd: weight of the detection loss against the generator's (ELECTRA: 50)")
    a = p.add_argument_group("run (where and how; --resume may change these)").add_argument
    a("--device", choices=["auto", "cpu", "cuda", "xla"], default="auto", help="auto: cuda if any")
    a("--num_workers", type=int, default=0, help="data-loader worker processes")
    a("--threads", type=int, default=0, help="CPU threads for torch (0: one per core other work "
      "leaves idle, looked at every few seconds)")
    a("--output_dir", default="checkpoint", help="the run's folder: model, metrics, states")
    a("--log_interval", type=int, default=20, help="steps between progress-bar updates")
    a("--tensorboard", action="store_true", help="write TensorBoard scalars in <output_dir>/"
      "tensorboard every --log_interval steps and epoch")
    a("--save_steps", type=int, default=0,
      help="save a resumable state every N optimizer steps (0: at epoch ends only)")
    a("--resume", action="store_true", help="continue the run in --output_dir from its last state")
    a("--overwrite_output_dir", action="store_true",
      help="start anew in an --output_dir that holds a trained model or a run to resume")
    a("--cache_dir", default=".cache", help="tokenized features are cached here ('' to disable)")
    a("--gradient_checkpointing", action="store_true", help="recompute activations in the "
      "backward pass: a third slower, for batches that do not fit in memory otherwise")
    return p


def parse_args(argv=None):
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    # the preset's defaults, and those for its --problem; flags given still win
    parser.set_defaults(**{**PRESET_DEFAULTS.get(known.model, {}),
                           **PROBLEM_DEFAULTS.get((known.model, known.problem), {})})
    args = parser.parse_args(argv)
    # a checkpoint folder as --model brings its own head, as a preset does
    args.head_name = args.head_name or trained_head(args.model) or "cls"
    # pretraining's learning rate follows --lr unless given (tiny's preset gives its own)
    args.pretrain_lr = args.lr if args.pretrain_lr is None else args.pretrain_lr
    check_flags(parser, args, argv)  # one line naming the flag (_3_run.py)
    return args


# ------------------------------------------------------------------------------- the method's parts
# Pretraining and fine-tuning both call these four, each phase with its own flags (--pretrain_lr
# and --pretrain_epochs against --lr and --total_epochs): a change here changes both.

def param_groups(model, weight_decay):
    """AdamW groups: no weight decay on biases and LayerNorm weights (1-d tensors)."""
    # Decay pulls weights toward 0 to keep the model simple. A bias or a LayerNorm gain only
    # shifts or scales activations, and pulling those to 0 hurts: BERT's recipe leaves them out.
    params = [p for p in model.parameters() if p.requires_grad]  # frozen ones: not at all
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def make_optimizer(model, lr, weight_decay, device):
    # AdamW: Adam with the weight decay applied to the weights directly, not mixed into the
    # gradient, where Adam's per-weight scaling would weaken it (Loshchilov & Hutter, 2019).
    # fused: one kernel for all parameters; the for-each AdamW update took ~6x longer on a CPU
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr,
                             fused=device.type in ("cpu", "cuda"))


def cosine_with_warmup(optimizer, warmup_steps, total_steps):
    """Linear warmup from 0 to the peak lr, then cosine decay to 0."""
    # Warmup: in the first steps Adam's estimates of the gradients' scale rest on few batches,
    # and full-size steps then can wreck the pretrained weights. The decay lets the last steps
    # settle. factor(step) multiplies the peak lr; the scheduler calls it once per step.
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_loss(args, train_labels, num_classes, device):
    """Cross-entropy, or for multi_label binary cross-entropy per label. --class_weights
    balanced weighs each class by n / (classes * its count), as scikit-learn's 'balanced', and
    for multi_label each label's positives by its negatives per positive."""
    # The functions take logits, not probabilities: softmax/sigmoid inside the loss is exact
    # where probabilities near 0 or 1 would round off.
    weight = None
    if args.problem == "multi_label":
        if args.class_weights == "balanced":
            positives = np.maximum(train_labels.sum(0), 1)
            weight = torch.tensor((len(train_labels) - positives) / positives,
                                  dtype=torch.float32, device=device)
        # one yes/no decision per label: a text may have several, or none
        return lambda logits, y: F.binary_cross_entropy_with_logits(logits, y, pos_weight=weight)
    if args.class_weights == "balanced":
        # a class absent from training counts as 1: its weight stays finite
        counts = np.maximum(np.bincount(train_labels, minlength=num_classes), 1)
        weight = torch.tensor(len(train_labels) / (num_classes * counts), dtype=torch.float32,
                              device=device)
    return lambda logits, y: F.cross_entropy(logits, y, weight=weight)


def pretraining_loss(args):
    """mlm: cross-entropy of the hidden tokens. rtd (ELECTRA): the generator's cross-entropy of
    the hidden tokens plus --rtd_weight times the discriminator's binary cross-entropy over every
    real token (ELECTRA weighs it 50: a yes/no per token costs far less than picking a word)."""
    if args.objective == "mlm":
        return F.cross_entropy
    return lambda out, targets: (F.cross_entropy(out.generated, targets) + args.rtd_weight
                                 * F.binary_cross_entropy_with_logits(out.detected, out.replaced))


def count_right(out, labels, threshold):
    """(right, n) of a batch for its accuracy: texts whose top class is the label (multi-label:
    whose every label is right), or the tokens pretraining predicted (rtd: told) right. `right`
    stays on the device, n is the host's."""
    if isinstance(out, Detection):  # replaced-token detection: every real token, replaced or not
        told = (out.detected > 0) == out.replaced.bool()
        return told.sum(), told.numel()
    if labels.ndim == 2:  # several labels per text: right when all of them are right
        return ((out.float().sigmoid() > threshold) == labels.bool()).all(-1).sum(), len(labels)
    return (out.argmax(-1) == labels).sum(), len(labels)


# -------------------------------------------------------------------------------- the training loop

def train(net, loader, loss_fn, args, epochs, run, masking=None, evaluate=None):
    """The training loop of both phases: `epochs` passes over the loader's batches from where
    `run` stands (a resumed run skips what it has done). Pretraining passes `masking`, which hides
    tokens for the model to predict; fine-tuning passes `evaluate`, run after every epoch."""
    # To change how the model learns, change the step between the rulers below; `run` only
    # counts, saves and reports. `net` is the model (DDP-wrapped under torchrun, so backward
    # also averages the gradients of the processes).
    device, dtype = run.machine.device, run.machine.dtype
    optimizer, scheduler, scaler = run.training  # set_up_phase made them
    if device.type == "xla":
        import torch_xla.core.xla_model as xm  # TPUs step through torch_xla (see below)
    # a resumed run starts at its saved epoch; --early_stopping ends fine-tuning before `epochs`
    while run.epoch < epochs and not run.early_stopped():
        net.train()  # dropout on (evaluation turns it off)
        for batch in run.batches(loader, epochs):  # with a progress bar of loss and accuracy
            if masking:  # pretraining: the labels are the tokens masking hides
                batch = masking(batch)
            # the batch is padded to its own longest text; attention_mask marks the real tokens
            inputs = [batch[k].to(device, non_blocking=True) for k in
                      ("input_ids", "attention_mask", "positions", "original_ids") if k in batch]
            labels = batch["labels"].to(device, non_blocking=True)
            # an optimizer step after every --grad_accum_steps batches and the epoch's last one;
            # the batches between only add up gradients, so DDP (torchrun) need not average them
            # across processes yet (nanoGPT's idiom; a model without DDP ignores the attribute)
            stepping = (run.step + 1) % args.grad_accum_steps == 0 or run.step + 1 == len(loader)
            net.require_backward_grad_sync = stepping
            # ------------------------------------------------------------------------ one step
            # the forward pass in --precision's dtype (bf16/fp16 matmuls; fp32: no autocast)
            with torch.autocast(device.type, dtype=dtype or torch.bfloat16,
                                enabled=dtype is not None):
                logits = net(*inputs)
            loss = loss_fn(logits.float(), labels)  # the loss itself always in float32
            # Each batch adds 1/N of its gradient (N = --grad_accum_steps); with fp16 the scaler
            # multiplies the loss so that small gradients do not underflow (else it does nothing)
            scaler.scale(loss / args.grad_accum_steps).backward()
            run.track(loss, *count_right(logits, labels, args.threshold),
                      batch["attention_mask"])  # counts run.step too
            if not stepping:
                continue  # gradients keep adding up until N batches or the epoch's last one
            scaler.unscale_(optimizer)  # clip the true gradients, not fp16's scaled ones
            if args.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(net.parameters(), args.max_grad_norm)
            if device.type == "xla":  # TPUs: torch_xla's step, which runs the traced graph too
                xm.optimizer_step(optimizer, barrier=True)
            else:
                scaler.step(optimizer)  # the update; skipped when fp16 gradients overflowed
            scaler.update()  # fp16: a smaller scale after an overflow, a larger one in time
            scheduler.step()  # the learning rate of the next step
            optimizer.zero_grad(set_to_none=True)  # None, not zeros: less memory, no extra add
            # ---------------------------------------------------------------------------------
            run.after_step()  # a state every --save_steps; stops here after Ctrl-C
        run.end_epoch(evaluate)  # the epoch's line and metrics, the checkpoint kept, a state
    run.end()


# --------------------------------------------------------------------------------------- evaluation

def evaluate(model, datasets, names, pad_id, args, machine):
    """valid_* and test_* metrics, and for multi_label the threshold used (tuned on valid with
    --tune_threshold); under torchrun each process runs a share of the batches."""
    model.eval()  # dropout off: the same text always gets the same logits
    logits = {split: split_logits(model, datasets[split], pad_id, args.test_batch_size,
                                  len(names), machine)
              for split in ("valid", "test") if split in datasets}
    # multi_label: a label is predicted above the threshold; it is chosen on valid, never test
    threshold = args.threshold
    if args.tune_threshold:
        threshold = tune_threshold(logits["valid"], datasets["valid"].labels, names)
    row = {"threshold": threshold} if args.problem == "multi_label" else {}
    row.update({f"n_{split}": len(datasets.get(split, ())) for split in ("train", "valid", "test")})
    kept = {}  # each split's predictions: Run keeps those of the kept checkpoint beside it
    for split, values in logits.items():
        result = score_logits(values, datasets[split].labels, names, threshold)
        kept[split] = {"label": datasets[split].labels, "predicted": result.pop("predicted"),
                       "probs": result.pop("probs")}
        row.update({f"{split}_{k}": v for k, v in result.items() if k != "threshold"})
    return {**row, "predictions": {"label_names": names, "splits": kept}}


# ----------------------------------------------------------------------------------- the two phases

def set_up_phase(phase, model, encoders, dataset, pad_id, epochs, lr, args, machine, resumed,
                 **run_parts):
    """What both phases build alike: (net, loader, run, optimizer steps). The batches, the model
    on its device, AdamW and its schedule over all the phase's steps, the fp16 scaler, and the
    Run (restored from the state on --resume); run_parts: Run's write_model, keep_dir, data."""
    # Texts of similar length share a batch, so little compute goes to padding; the batches come
    # in random order, and the order is a function of --seed and the epoch (so --resume can skip
    # the batches it has done). Under torchrun each process takes its share of every batch.
    sampler = LengthBucketSampler(dataset.lengths, args.train_batch_size, args.seed,
                                  rank=machine.rank, world=machine.world)
    loader = make_loader(dataset, sampler, pad_id, args.num_workers, args.seed,
                         pad_multiple(machine.device))
    net = place_model(model, encoders, machine, args.gradient_checkpointing)
    # one optimizer step per --grad_accum_steps batches; the schedule spans all of them
    steps = math.ceil(len(loader) / args.grad_accum_steps) * epochs
    optimizer = make_optimizer(model, lr, args.weight_decay, machine.device)
    scheduler = cosine_with_warmup(optimizer, round(args.warmup_rate * steps), steps)
    # fp16 (a T4's precision) scales the loss so that small gradients do not underflow to 0
    scaler = torch.amp.GradScaler(machine.device.type, enabled=machine.dtype == torch.float16)
    run = Run(args, phase, machine, (optimizer, scheduler, scaler), **run_parts)
    if resumed:  # optimizer, scheduler, scaler, random-number states, where the epoch stood
        run.restore(resumed[1])
    return net, loader, run, steps


def pretrain(args, argv, texts, resumed, machine, data):
    """--pretrain_epochs of --objective on the training texts and --unlabeled_file, with the
    loop and parts of fine-tuning: mlm predicts the hidden tokens (BERT's masking, mask_tokens);
    rtd (ELECTRA) has a generator fill them and the model find them. Returns the folder it saves
    the pretrained model in, <output_dir>/pretrained."""
    if args.unlabeled_file:
        more = read_unlabeled(args.unlabeled_file, args.text_column, args.encoding)
        texts = texts + more
        data = {**data, "unlabeled": fingerprint(args.unlabeled_file, [(t, None) for t in more])}
    # resumed: the model folder of the state (weights and tokenizer) instead of --model
    if resumed:
        model, tokenizer = pretraining_to_resume(resumed[0], args.objective)
    else:
        with main_process_first(machine):  # one vocabulary for every process (tiny learns one)
            model, tokenizer = model_to_pretrain(args.model, texts, args.cache_dir,
                                                 args.objective, args.generator_size,
                                                 args.generator)
    encoders = ([model.lm.base_model] if args.objective == "mlm"
                else [model.generator.electra, model.discriminator.electra])
    set_dropout(model, args.pretrain_dropout)  # (None: as it is) config.json keeps its rates
    fit_max_len(build_parser(), argv, args, encoders[-1], tokenizer, resumed)
    # token ids only: pretraining needs no labels (masking makes them)
    with main_process_first(machine):
        dataset = BERTDataset(tokenize(tokenizer, texts, args.max_len, args.cache_dir,
                                       args.truncation))
    # fine-tuning's set-up, with pretraining's own peak lr and epochs; the states of this phase
    # hold the model's folder, and after each epoch it is kept in <output_dir>/pretrained
    folder = os.path.join(args.output_dir, "pretrained")
    net, loader, run, steps = set_up_phase(
        "pretrain", model, encoders, dataset, tokenizer.pad_token_id, args.pretrain_epochs,
        args.pretrain_lr, args, machine, resumed, keep_dir=folder, data=data,
        prefix=args.objective, write_model=lambda f, **_: save_pretraining(
            f, model, tokenizer, {"args": vars(args), "history": run.history}))
    # the model sees the masked ids and learns the hidden tokens; random replacements come from
    # the ids the tokenizer can produce (some models pad the embedding table beyond them)
    masking = masking_for(tokenizer, min(len(tokenizer), encoders[-1].config.vocab_size),
                          args.mask_rate, args.mask_whole_words, args.objective == "rtd")
    if machine.rank == 0:
        print(f"pretraining {args.model} ({args.objective}) on {len(texts)} texts, max_len "
              f"{args.max_len}, {steps} optimizer steps", flush=True)
    with run.out_of_memory_line():
        train(net, loader, pretraining_loss(args), args, args.pretrain_epochs, run,
              masking=masking)
    return folder


def main(argv=None):
    # --- set-up: flags, the machine, the data; --resume reads the saved run's flags and state
    args = parse_args(argv)
    machine = start(args)  # Ctrl-C handling, torchrun, the --output_dir lock, device, seeds
    resumed = load_state(args.output_dir) if args.resume else None  # (folder, state)
    if resumed:  # the saved run's own flags: only where and how to run may change
        args = saved_args(args, *resumed, defaults=vars(parse_args([])))
    # autocast's dtype (--precision; a resumed run keeps its state's), said in one line
    machine = with_precision(machine, args, resumed[1] if resumed else None)
    splits = load_corpus(args)
    labels, names = labels_and_names(args, splits["train"])  # bad labels stop before pretraining
    read = data_read(args, splits, labels)  # what the states record and --resume compares
    source, train_texts = args.model, [text for text, _ in splits["train"]]
    # --- continued pretraining (--pretrain_epochs): fine-tuning then starts from what it saved
    if args.pretrain_epochs and (not resumed or resumed[1]["phase"] == "pretrain"):
        source, resumed = pretrain(args, argv, train_texts, resumed, machine, read), None
        seed_everything(args.seed)  # fine-tuning starts alike whether pretraining resumed or not
    # --- fine-tuning: the model (with a new head, or the resumed state's), data, parts, loop
    if resumed:  # a fine-tuning state is a checkpoint folder: the classifier with its head
        model, tokenizer, info = load_checkpoint(resumed[0], machine.device)
    else:
        with main_process_first(machine):  # one vocabulary for every process (tiny learns one)
            model, tokenizer = classifier_to_finetune(source, len(labels), args.head_name,
                                                      args.dr_rate, train_texts, args.cache_dir)
        info = {"args": vars(args), "labels": labels, "label_names": names}
    fit_max_len(build_parser(), argv, args, model.backbone, tokenizer, resumed)
    # tokenized once (and cached on disk), kept unpadded: each batch is padded when it is made
    with main_process_first(machine):
        datasets = tokenized_splits(splits, tokenizer, labels, args)
    if args.freeze_backbone:
        model.freeze_backbone()
    # states hold a checkpoint folder; after each epoch the best (on valid) is kept in output_dir
    net, loader, run, steps = set_up_phase(
        "finetune", model, [model.backbone], datasets["train"], tokenizer.pad_token_id,
        args.total_epochs, args.lr, args, machine, resumed, keep_dir=args.output_dir, data=read,
        write_model=lambda f, **kept: save_checkpoint(f, model, tokenizer, {**info, **kept}))
    loss_fn = make_loss(args, datasets["train"].labels, len(labels), machine.device)
    if machine.rank == 0:
        print(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
              f"head {args.head_name}, max_len {args.max_len}, device {machine.device} x "
              f"{machine.world}, { {k: len(v) for k, v in datasets.items()} }, {steps} optimizer "
              f"steps", flush=True)
    with run.out_of_memory_line():
        train(net, loader, loss_fn, args, args.total_epochs, run,
              evaluate=lambda: evaluate(model, datasets, info["label_names"],
                                        tokenizer.pad_token_id, args, machine))


if __name__ == "__main__":
    run_script(main, "interrupted; --resume continues from the last saved state, if any")
