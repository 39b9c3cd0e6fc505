"""Scoring predictions (accuracy, macro-F1, per class; multi-label with a threshold) and drawing
figures with Korean labels that a reader can read (curves.png, the confusion matrix).
"""
import functools
import math
import os
import re
import sys

import numpy as np
import torch
import torch.nn.functional as F

from common import printable, write_atomic

# ------------------------------------------------------------------------------------------- scores

def per_class_report(truth, predicted, names):
    """{name: precision, recall, f1, support} from boolean (texts, classes) arrays of true and
    predicted labels; a class nobody has and nobody predicts scores 0 but has support 0."""
    # Counted per class over all texts: one pass serves single-label (one-hot rows) and multi-label
    # alike
    tp, n_true, n_pred = ((truth & predicted).sum(0), truth.sum(0), predicted.sum(0))
    report = {}
    for name, t, s, p in zip(names, tp.tolist(), n_true.tolist(), n_pred.tolist()):
        report[name] = {"precision": t / p if p else 0.0, "recall": t / s if s else 0.0,
                        # F1 as 2TP / (true + predicted): the harmonic mean of precision and recall
                        # without dividing by 0
                        "f1": 2 * t / (s + p) if s + p else 0.0, "support": s}
    return report


def score_logits(logits, labels, names, threshold=0.5):
    """Loss, accuracy, macro-F1, a per-class report, probabilities and the predicted labels (a
    boolean row per text) of logits against label ids, or against multi-hot rows (several labels
    per text: sigmoid, a label is predicted above threshold, accuracy is exact match, micro-F1
    too). Macro-F1 averages the classes that occur in the labels or the predictions."""
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels)
    multi_label = labels.ndim == 2
    if multi_label:
        probs, truth = logits.sigmoid(), labels.bool()
        predicted = probs > threshold
        loss = F.binary_cross_entropy_with_logits(logits, labels.float())
    else:
        probs, eye = logits.softmax(-1), torch.eye(len(names), dtype=torch.bool)
        # One-hot rows, so the counting below is the same as multi-label's
        truth, predicted = eye[labels], eye[logits.argmax(-1)]
        loss = F.cross_entropy(logits, labels)
    truth, predicted = truth.numpy(), predicted.numpy()
    report = per_class_report(truth, predicted, names)
    # one definition of macro-F1 for the run's reports and compare.py's bootstrap
    macro_f1 = f1_macro_of_counts((truth & predicted).sum(0), truth.sum(0), predicted.sum(0))
    result = {"loss": loss.item(), "accuracy": float((truth == predicted).all(-1).mean()),
              "macro_f1": float(macro_f1)}
    if multi_label:
        tp = (truth & predicted).sum()
        # Micro-F1 pools every label decision: frequent labels weigh more than in macro-F1
        result["micro_f1"] = float(2 * tp / max(1, truth.sum() + predicted.sum()))
        result["threshold"] = threshold
    return {**result, "per_class": report, "probs": probs.numpy(), "predicted": predicted}


# ---------------------------------------------------------------------------------------- figures

KOREAN_FONT_FILES = re.compile(r"(?i)nanum|cjk|korean|malgun|gulim|batang|dotum|unfonts|baekmuk|"
                               r"applesdgothic|applegothic|gothic")


@functools.lru_cache(maxsize=None)
def korean_fonts():
    """Family names of the installed fonts that draw Hangul, added to matplotlib. They are looked
    for on disk: matplotlib's font cache misses a font installed after the cache was built (as
    after `apt install fonts-nanum` on Colab), and then drew Hangul as empty boxes."""
    from matplotlib import font_manager, ft2font

    paths = font_manager.findSystemFonts()
    families = []
    # Fonts named like Korean ones first; only when none is, every font is opened (slower)
    for path in [p for p in paths if KOREAN_FONT_FILES.search(os.path.basename(p))] or paths:
        try:
            font = ft2font.FT2Font(path)
            # Drawn only by a font whose character map holds Hangul, not one that merely has the
            # name
            if ord("한") in font.get_charmap():
                font_manager.fontManager.addfont(path)
                families.append(font.family_name)
        except (OSError, RuntimeError, ValueError):
            continue  # not a font matplotlib can read
    return list(dict.fromkeys(families))


@functools.lru_cache(maxsize=None)
def note_no_korean_font():
    print("note: no font with Hangul is installed, so Korean names are drawn as boxes; install "
          "one (apt install fonts-nanum, or any Noto Sans CJK font) and run again",
          file=sys.stderr)


def save_figure(path, draw, size):
    """Draw on a fresh matplotlib figure and write it as PNG atomically (no display needed)."""
    import logging
    import warnings

    from matplotlib import rcParams
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    # matplotlib falls back glyph by glyph through this list: Latin from DejaVu, Hangul after
    rcParams["font.family"] = ["DejaVu Sans", *korean_fonts()]
    fig = Figure(figsize=size, layout="constrained")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph")  # said once below, not per glyph
        draw(fig)
        write_atomic(path, lambda p: fig.savefig(p, dpi=100, format="png"))
    if not korean_fonts() and any(re.search("[\u3131-\u318e\uac00-\ud7a3]", t.get_text())
                                  for t in fig.findobj(Text)):
        note_no_korean_font()


# ---------------------------------------------------------------------------- in a run's reports

def per_class_line(report):
    """F1 per class, weakest first: every class when there are few, else the three weakest."""
    # Weakest first: the classes that need data or weights are what a reader looks for
    ranked = sorted(report.items(), key=lambda item: item[1]["f1"])
    shown = ", ".join(f"{printable(name)} {r['f1']:.2f}"
                      for name, r in ranked[:3 if len(ranked) > 4 else 4])
    return f"F1 per class {shown}" if len(ranked) <= 4 else f"weakest F1 {shown}"


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
            # Epochs are whole numbers: no tick at 1.5
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(alpha=0.3)
            ax.legend()
    save_figure(path, draw, size=(9, 3.5))


def tune_threshold(logits, labels, names):
    """The threshold of 0.05, 0.10, ..., 0.95 with the best macro-F1 (the lowest of ties); a
    coarse grid, so that the validation split's own noise is not what is learnt."""
    grid = np.round(np.arange(0.05, 0.96, 0.05), 2)
    scores = [score_logits(logits, labels, names, t)["macro_f1"] for t in grid]
    return float(grid[int(np.argmax(scores))])


# ------------------------------------------------------------------------ two runs on one test set

def mcnemar_p(b, c):
    """McNemar's exact test, two-sided: b texts only the first run gets right, c only the second;
    the chance of a split at least this uneven were either run as likely to be the right one on
    them (b + c coin flips). The texts both get right or both wrong say nothing of a difference."""
    n = b + c
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n  # exact, also for large n
    return min(1.0, 2 * tail)


def f1_macro_of_counts(tp, n_true, n_pred):
    """Macro-F1 from per-class counts (rows: resamples), over the classes present in the labels
    or the predictions: a class absent from both would add a meaningless 0 to the mean."""
    both = n_true + n_pred
    f1 = np.where(both > 0, 2 * tp / np.maximum(both, 1), 0.0)
    return f1.sum(-1) / np.maximum((both > 0).sum(-1), 1)


def paired_bootstrap(truth, pred_a, pred_b, resamples=2000, seed=0, chunk=100):
    """{metric: (B - A, low, high)} for accuracy and macro-F1 with a 95% interval: the texts are
    resampled with replacement, the same draw for both runs (paired: what they share cancels).
    truth and the predictions are boolean (texts, classes) arrays, one-hot when single-label.
    A draw is a multinomial count per text, so each resample is a weighted sum."""
    rng = np.random.default_rng(seed)
    n = len(truth)
    right = [(truth == p).all(-1).astype(float) for p in (pred_a, pred_b)]
    parts = [np.stack([truth & p, np.broadcast_to(truth, p.shape), p]).astype(float)
             for p in (pred_a, pred_b)]  # (3, texts, classes): tp, true, predicted per text

    def scores(weights):  # weights: (resamples, texts) -> accuracy and macro-F1 of B - A
        acc = weights @ (right[1] - right[0]) / n
        f1 = [f1_macro_of_counts(*(np.einsum("rn,knc->krc", weights, p))) for p in parts]
        return acc, f1[1] - f1[0]

    draws = [scores(rng.multinomial(n, np.full(n, 1 / n), size=min(chunk, resamples - done)))
             for done in range(0, resamples, chunk)]
    full = scores(np.ones((1, n)))
    result = {}
    for k, name in enumerate(("accuracy", "macro_f1")):
        values = np.concatenate([d[k] for d in draws])
        low, high = np.percentile(values, [2.5, 97.5])
        result[name] = (float(full[k][0]), float(low), float(high))
    return result
