"""Did my change help? Runs of _3_main.py side by side, with the noise measured.

    python compare.py runs/a runs/b                        # B against A
    python compare.py seed1 seed2 lr-seed1 lr-seed2        # groups of seeds, and their spread

One table: the flags that differ between the runs (not where and how they ran, which --resume
may change), the epoch each kept, its validation and test metrics, training time and
throughput. Then every run against the first on their test set, the very same texts (each run
keeps its test predictions with the fingerprint of the texts): the difference in accuracy and
macro-F1 with a 95% interval from a paired bootstrap over the texts, and McNemar's exact test on
the texts where exactly one of the two is right, with a verdict in words. Runs whose flags
differ only in --seed form a group: its mean and standard deviation, and the difference between
groups against that seed-to-seed spread. The runs' curves are drawn in one picture (--output).
"""
import argparse
import json
import os
import statistics

import numpy as np

from _3_run import PREDICTIONS, RENAMED_FLAGS, RUNTIME_FLAGS
from common import ArgumentParser, DataError, read_json, run_script
from folders import read_info
from metrics import mcnemar_p, paired_bootstrap, save_figure


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (_3_main.py's --output_dir); the first "
                   "is the one the others are compared with")
    p.add_argument("--output", default="comparison.png",
                   help="the runs' training curves in one picture (PNG)")
    p.add_argument("--resamples", type=int, default=2000, help="paired bootstrap resamples")
    args = p.parse_args(argv)
    # one run alone has nothing to be compared with; a few resamples make a ragged interval
    if len(args.runs) < 2:
        p.error("give two or more run folders")
    if args.resamples < 100:
        p.error("--resamples: at least 100 for a 95% interval")
    return args


def load_run(folder):
    """A run folder's flags (under today's names), kept epoch and metrics, history and test
    predictions; one line when it is not a run folder or keeps no predictions."""
    info = read_info(folder)  # checked field by field: a folder may come from anyone
    path = os.path.join(folder, PREDICTIONS)
    if not os.path.isfile(path):
        raise DataError(f"{folder}: no {PREDICTIONS}; runs keep their predictions since this "
                        f"version of _3_main.py: train it again to compare it")
    try:
        kept = read_json(path)
        test = kept["splits"].get("test")  # a run without a test split is named below
        if test is not None and not len(test["label"]) == len(test["predicted"]) > 0:
            raise ValueError("labels and predictions differ in number")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise DataError(f"{path}: not a run's predictions ({str(e).splitlines()[0][:100]})"
                        ) from None
    # the per-epoch rows draw the curves and give time and throughput; a copied folder may lack
    # them, and the table then says "-"
    history = []
    if os.path.isfile(os.path.join(folder, "metrics.jsonl")):
        with open(os.path.join(folder, "metrics.jsonl"), encoding="utf-8") as f:
            history = [json.loads(line) for line in f if line.strip()]
    # flags under today's names: a run saved with --mlm_epochs and one with --pretrain_epochs
    # differ in no flag when their values agree
    return {"name": os.path.basename(os.path.normpath(folder)) or folder, "folder": folder,
            "args": {RENAMED_FLAGS.get(k, k): v for k, v in info["args"].items()},
            "epoch": kept.get("epoch"), "metrics": info.get("metrics") or {},
            "history": history, "kept": kept, "test": test}


def differing_flags(runs):
    """The flags whose values differ between the runs, where and how they ran aside."""
    names = sorted({k for run in runs for k in run["args"]} - set(RUNTIME_FLAGS))
    # compared as JSON: a flag one run lacks (newer than it) and a list-valued one compare too
    return [k for k in names if len({json.dumps(run["args"].get(k)) for run in runs}) > 1]


def print_table(runs, flags):
    columns = [*flags, "epoch", "valid_accuracy", "valid_macro_f1", "test_accuracy",
               "test_macro_f1", "minutes", "samples/s"]
    rows = []
    for run in runs:
        # the whole run's time (every epoch, evaluation included), and the training throughput
        seconds = sum(r.get("seconds", 0) for r in run["history"])
        speeds = [r["train_samples_per_s"] for r in run["history"] if "train_samples_per_s" in r]
        cells = [str(run["args"].get(k)) for k in flags] + [str(run["epoch"])]
        cells += [f"{run['metrics'][k]:.4f}" if isinstance(run["metrics"].get(k), float) else "-"
                  for k in columns[len(flags) + 1:-2]]
        cells += [f"{seconds / 60:.1f}", f"{statistics.fmean(speeds):.1f}" if speeds else "-"]
        rows.append([run["name"], *cells])
    # columns as wide as their widest cell, names left and numbers right
    widths = [max(len(str(c)) for c in col) for col in zip(["run", *columns], *rows)]
    for row in [["run", *columns], *rows]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths))))


def label_matrix(rows, classes):
    """Boolean (texts, classes): one-hot rows of label ids, or multi-hot rows of id lists."""
    matrix = np.zeros((len(rows), classes), dtype=bool)
    # one form for both problems: the bootstrap counts per class the same way either way
    for i, row in enumerate(rows):
        matrix[i, row] = True
    return matrix


def check_same_texts(a, b):
    """One line unless both runs were scored on the very same test texts, in one problem."""
    # exact-match accuracy of several labels and the accuracy of one are not the same measure
    if a["kept"].get("problem") != b["kept"].get("problem"):
        raise DataError(f"{b['folder']} is a {b['kept'].get('problem')} run, {a['folder']} a "
                        f"{a['kept'].get('problem')} one: their scores do not compare")
    # the test split decides; validation picked each run's epoch, so it favours both
    for run in (a, b):
        if run["test"] is None:
            raise DataError(f"{run['folder']} has no test split (--test_file) to compare on")
    # the fingerprints hash the texts and labels as read: a pairing of rows holds only then
    fa, fb = a["test"].get("fingerprint") or {}, b["test"].get("fingerprint") or {}
    what = (f"{fb.get('rows')} rows against {fa.get('rows')}" if fa.get("rows") != fb.get("rows")
            else "as many rows, other texts (--max_eval_samples draws its subset by --seed)"
            if fa.get("texts") != fb.get("texts") else "other labels"
            if fa.get("labels") != fb.get("labels") else None)
    if what:
        raise DataError(f"{b['folder']} was tested on other texts than {a['folder']} ({what}): "
                        f"compare runs on the same test set")
    if a["kept"].get("label_names") != b["kept"].get("label_names"):
        raise DataError(f"{b['folder']} and {a['folder']} name their classes differently")


def versus(a, b, resamples):
    """B against A on their shared test texts: one line of numbers and a verdict in words."""
    classes = len(a["kept"]["label_names"])
    # the labels are the same in both (checked): either run's serve as the truth
    truth = label_matrix(a["test"]["label"], classes)
    pred_a, pred_b = (label_matrix(r["test"]["predicted"], classes) for r in (a, b))
    diffs = paired_bootstrap(truth, pred_a, pred_b, resamples)
    right_a, right_b = ((truth == p).all(-1) for p in (pred_a, pred_b))
    # McNemar counts only the texts where exactly one run is right; the others cancel
    only_a, only_b = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    p = mcnemar_p(only_a, only_b)
    diff, low, high = diffs["accuracy"]
    f1, f1_low, f1_high = diffs["macro_f1"]
    numbers = (f"{diff:+.4f}, 95% interval {low:+.4f} to {high:+.4f}, p = {p:.3g}")
    # A difference counts when both tests see it: the interval leaves out 0 and p < 0.05
    if p < 0.05 and (low > 0 or high < 0):
        verdict = f"{b['name']} is {'better' if diff > 0 else 'worse'} than {a['name']}: {numbers}"
    else:
        verdict = f"no difference this test set can see ({numbers})"
    print(f"{b['name']} vs {a['name']} on {len(truth)} test texts: accuracy {verdict}; "
          f"macro-F1 {f1:+.4f} ({f1_low:+.4f} to {f1_high:+.4f}); right only in "
          f"{a['name']} {only_a}, only in {b['name']} {only_b}")


def print_groups(runs, flags):
    """Runs whose flags differ only in --seed, as groups: mean and standard deviation of their
    test metrics, and each group against the first next to the seed-to-seed spread."""
    keys = [k for k in flags if k != "seed"]
    # runs with equal values of every differing flag but --seed repeat one setting
    groups = {}
    for run in runs:
        groups.setdefault(tuple(json.dumps(run["args"].get(k)) for k in keys), []).append(run)
    if "seed" not in flags or max(len(g) for g in groups.values()) < 2:
        return
    print("\nruns that differ only in --seed, as groups (test metrics: mean ± sd over seeds)")
    stats = []
    for members in groups.values():
        values = {m: [r["metrics"].get(f"test_{m}", float("nan")) for r in members]
                  for m in ("accuracy", "macro_f1")}
        # a group of one has no spread to speak of: nan, and it is left out of the spread below
        sd = {m: statistics.stdev(v) if len(v) > 1 else float("nan") for m, v in values.items()}
        stats.append(({m: statistics.fmean(v) for m, v in values.items()}, sd))
        print(f"  {', '.join(r['name'] for r in members)}: accuracy "
              f"{stats[-1][0]['accuracy']:.4f} ± {sd['accuracy']:.4f}, macro-F1 "
              f"{stats[-1][0]['macro_f1']:.4f} ± {sd['macro_f1']:.4f}")
    # the spread of one run's score from seed to seed: what a difference must stand out from
    spread = statistics.fmean(s["accuracy"] for _, s in stats if not np.isnan(s["accuracy"]))
    for (mean, _), members in list(zip(stats, groups.values()))[1:]:
        gap = mean["accuracy"] - stats[0][0]["accuracy"]
        print(f"  {members[0]['name']}'s group - the first: accuracy {gap:+.4f}, "
              f"{abs(gap) / spread if spread else float('inf'):.1f} seed-to-seed sd")


def save_comparison(runs, path):
    """The runs' curves in one picture: training loss and test (or valid) accuracy per epoch."""
    def draw(fig):
        for ax, (title, keys) in zip(fig.subplots(1, 2), (
                ("train loss", ("train_loss",)),
                ("accuracy", ("valid_accuracy", "test_accuracy")))):
            for run in runs:
                # valid where a run has it (it picked the epoch), else test
                key = next((k for k in keys if any(k in r for r in run["history"])), None)
                points = [(r["epoch"], r[key]) for r in run["history"] if key in r]
                if points:
                    ax.plot(*zip(*points), marker="o", label=f"{run['name']} ({key})")
            ax.set(title=title, xlabel="epoch")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
    save_figure(path, draw, size=(10, 4))


def main(argv=None):
    args = parse_args(argv)
    # every folder read and checked first: a bad one is one line, not a half-printed table
    runs = [load_run(folder) for folder in args.runs]
    for run in runs[1:]:  # refused before anything is printed
        check_same_texts(runs[0], run)
    flags = differing_flags(runs)
    print_table(runs, flags)
    print()
    for run in runs[1:]:
        versus(runs[0], run, args.resamples)
    print_groups(runs, flags)
    save_comparison(runs, args.output)
    print(f"\ncurves: {args.output}")


if __name__ == "__main__":
    run_script(main)
