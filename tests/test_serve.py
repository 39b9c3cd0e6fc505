"""predict.py as people see it: the web page in a real browser, the JSON API, the prompt loop."""

import json
import os
import pty
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from conftest import ROOT, run
from helpers import ENV

import predict
import serve

ARTIFACTS = os.environ.get("ARTIFACTS_DIR", os.path.join(ROOT, "tests", "artifacts"))
REVIEW = "배우들 연기가 정말 좋았고 마지막 장면은 감동적이었다"


def start_server(folder, *flags, **kwargs):
    """predict.py --serve of folder on a free port: (the process, its URL) once it serves."""
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, "predict.py"),
            "--serve",
            "--port",
            "0",
            "--model_dir",
            str(folder),
            *flags,
        ],
        stdout=subprocess.PIPE,
        text=True,
        **kwargs,
    )
    line = proc.stdout.readline()  # "serving on http://127.0.0.1:PORT ..."
    assert line.startswith("serving on http://127.0.0.1:"), line
    return proc, line.split()[2].rstrip("/")


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    proc, url = start_server(tiny_checkpoint[0])
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def post(url, data, content_type="application/json"):
    request = urllib.request.Request(
        url + "/api", data=data, headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def post_json(url, body):
    return post(url, json.dumps(body).encode())


def same_row(got, expected):
    assert (got["text"], got["label"]) == (expected["text"], expected["label"])
    assert got["probability"] == pytest.approx(expected["probability"], abs=1e-5)
    assert got["probs"] == pytest.approx(expected["probs"], abs=1e-5)


def test_api_matches_predict_json(server, tiny_checkpoint):
    folder, _ = tiny_checkpoint
    expected = [
        json.loads(line)
        for line in run(
            "predict.py", "--model_dir", folder, "--json", REVIEW, "최악"
        ).stdout.splitlines()
    ]
    status, one = post_json(server, {"sentence": REVIEW})
    assert status == 200
    same_row(one, expected[0])
    status, many = post_json(server, {"sentences": [REVIEW, "최악"]})
    assert status == 200 and len(many) == 2
    for got, want in zip(many, expected):
        same_row(got, want)
    assert post_json(server, {"sentences": []}) == (200, [])


@pytest.mark.parametrize(
    "data, code",
    [
        (b"{not json", 400),
        (b"[1, 2]", 400),
        (json.dumps({"text": "hi"}).encode(), 400),
        (json.dumps({"sentence": 5}).encode(), 400),
        (json.dumps({"sentences": ["ok", 3]}).encode(), 400),
        (json.dumps({"sentences": "not a list"}).encode(), 400),
        # past serve.MAX_BODY (1 MB) and under what waitress refuses unread (2 MB): Flask's JSON
        (json.dumps({"sentence": "가" * 200_000}).encode(), 413),
    ],
    ids=["not_json", "list", "no_sentence", "number", "list_with_a_number", "string", "too_big"],
)
def test_bad_requests_get_json_errors(server, data, code):
    status, body = post(server, data)
    assert status == code and isinstance(body["error"], str) and body["error"]


def test_concurrent_requests(server):
    texts = [f"{REVIEW} {i}번째" for i in range(8)]
    _, expected = post_json(server, {"sentences": texts})
    failures = []

    def client(i):
        for _ in range(50):
            status, row = post_json(server, {"sentence": texts[i]})
            if (
                status != 200
                or row["text"] != texts[i]
                or row["probs"] != pytest.approx(expected[i]["probs"], abs=1e-5)
            ):
                failures.append((i, status, row))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:3]


def page_answer(server, text, screenshot):
    """Type text into the page in headless Chromium and submit: (label text, {bar: percent},
    highlighted bars)."""
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=800,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(server + "/")
        driver.find_element(By.ID, "sentence").send_keys(text)
        url_before = driver.current_url
        driver.find_element(By.ID, "submit").click()
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CLASS_NAME, "bar"))
        label = driver.find_element(By.ID, "label").text
        bars = driver.find_elements(By.CLASS_NAME, "bar")
        values = {
            bar.get_attribute("data-label"): float(
                bar.find_element(By.CLASS_NAME, "value").text.rstrip("%")
            )
            for bar in bars
        }
        chosen = {
            bar.get_attribute("data-label")
            for bar in bars
            if "chosen" in bar.get_attribute("class")
        }
        assert driver.current_url == url_before  # no reload
        os.makedirs(ARTIFACTS, exist_ok=True)
        driver.save_screenshot(os.path.join(ARTIFACTS, screenshot))
    finally:
        driver.quit()
    return label, values, chosen


def test_page_in_a_real_browser(server):
    label, bars, chosen = page_answer(server, REVIEW, "page.png")
    _, expected = post_json(server, {"sentence": REVIEW})
    assert label == expected["label"] in ("부정", "긍정") and chosen == {label}
    assert bars == pytest.approx(
        {k: round(100 * v, 1) for k, v in expected["probs"].items()}, abs=0.051
    )


@pytest.fixture(scope="module")
def multi_label_server(multi_label_checkpoint):
    folder, _ = multi_label_checkpoint
    proc, url = start_server(folder, "--threshold", "0.3")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_multi_label_api_and_page(multi_label_server, multi_label_checkpoint):
    folder, _ = multi_label_checkpoint
    text = "ㅋㅋㅋ 이 영화 정말 재밌다"
    expected = json.loads(
        run("predict.py", "--model_dir", folder, "--threshold", "0.3", "--json", text).stdout
    )
    status, got = post_json(multi_label_server, {"sentence": text})
    assert status == 200 and [x["label"] for x in got["labels"]] == [
        x["label"] for x in expected["labels"]
    ]
    assert got["probs"] == pytest.approx(expected["probs"], abs=1e-5)
    label, bars, chosen = page_answer(multi_label_server, text, "page_multi_label.png")
    assert len(bars) == 4 and chosen == {x["label"] for x in got["labels"]}
    assert label == (", ".join(x["label"] for x in got["labels"]) or "—")
    assert bars == pytest.approx({k: round(100 * v, 1) for k, v in got["probs"].items()}, abs=0.051)


def read_until(fd, needle, timeout=120):
    out, deadline = b"", time.time() + timeout
    while needle.encode() not in out:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.time()))
        if not ready:
            raise AssertionError(f"no {needle!r} in {out.decode(errors='replace')!r}")
        out += os.read(fd, 4096)
    return out.decode()


def test_prompt_loop_on_a_terminal(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "predict.py"), "--model_dir", str(folder)],
        stdin=slave,
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)
    try:
        read_until(master, "문장을 입력해 주세요")
        os.write(master, (REVIEW + "\n").encode())
        answer = read_until(master, "문장을 입력해 주세요")
        assert REVIEW in answer and ("긍정" in answer or "부정" in answer)
        os.write(master, b"\n")  # an empty line ends the loop
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        os.close(master)


def test_concurrent_requests_share_forward_passes_and_get_their_own_answers(tiny_checkpoint):
    """32 clients at once: the model runs far fewer passes than requests, and each client's row is
    the row that text gets alone (the heads ignore padding)."""
    from predict import Predictor
    from serve import create_app

    folder, _ = tiny_checkpoint
    predictor = Predictor(str(folder))
    texts = [f"{REVIEW} {'정말 ' * (i % 7)}{i}번째" for i in range(32)]  # distinct, of many lengths
    alone = [predictor.predict([text])[0] for text in texts]
    passes, predict = [], predictor.predict
    predictor.predict = lambda batch: passes.append(len(batch)) or predict(batch)  # counts passes
    client = create_app(predictor).test_client()
    answers, start = [None] * 32, threading.Barrier(32)

    def ask(i):
        start.wait()
        for _ in range(5):
            answers[i] = client.post("/api", json={"sentence": texts[i]}).get_json()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, expected in zip(answers, alone):
        same_row(got, expected)
    assert sum(passes) == 160 and len(passes) < 160 and max(passes) > 1, passes
    assert max(passes) <= 128  # serve.MAX_BATCH


# ---------------------------------------------------------------------- what the API turns away


class EchoPredictor:
    info = {"args": {"model": "echo"}, "head_name": "cls"}
    names = ["a", "b"]

    def predict(self, texts):
        return [
            {"text": t, "label": "a", "probability": 1.0, "probs": {"a": 1.0, "b": 0.0}}
            for t in texts
        ]


@pytest.mark.parametrize(
    "body, status, message",
    [
        (
            json.dumps({"sentences": ["x"] * (serve.MAX_SENTENCES + 1)}),
            413,
            f"at most {serve.MAX_SENTENCES} sentences per request",
        ),
        ('{"sentence": ' + "[" * 100000 + "]" * 100000 + "}", 400, "not valid JSON"),
        ('{"sentence": "\\ud800"}', 400, "lone surrogate"),
    ],
)
def test_the_api_turns_away_what_it_cannot_serve(body, status, message):
    client = serve.create_app(EchoPredictor()).test_client()
    response = client.post("/api", data=body, content_type="application/json")
    assert response.status_code == status and message in response.get_json()["error"]
    assert client.post("/api", json={"sentences": ["x"] * serve.MAX_SENTENCES}).status_code == 200


@pytest.mark.parametrize("port", ["99999", "-5"])
def test_bad_ports_are_one_line(port, capsys):
    with pytest.raises(SystemExit) as e:
        predict.parse_args(["--serve", "--port", port])
    assert e.value.code == 2 and f"--port {port} is not a port number" in capsys.readouterr().err


def test_serving_to_the_network_warns(tiny_checkpoint):
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, "predict.py"),
            "--serve",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--model_dir",
            str(tiny_checkpoint[0]),
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().startswith("warning: --host 0.0.0.0 serves this page")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ----------------------------------------------------------------------------- hostile clients

POISON = "aaaa " * 100 + "!"  # backtracks past the regex engine's limit: the tokenizer panics


@pytest.fixture(scope="module")
def poisoned(tiny_checkpoint, tmp_path_factory):
    """A copy of the tiny checkpoint whose tokenizer.json splits on a regex that passes the load
    check and panics on POISON (tokenizers' Rust code: pyo3's PanicException), served."""
    folder = tmp_path_factory.mktemp("poisoned") / "checkpoint"
    shutil.copytree(tiny_checkpoint[0], folder, ignore=shutil.ignore_patterns("states"))
    tokenizer = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    split = {
        "type": "Split",
        "pattern": {"Regex": r"(\w+\s?)*$"},
        "behavior": "Isolated",
        "invert": False,
    }
    tokenizer["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [split, tokenizer["pre_tokenizer"]],
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    proc, url = start_server(folder, env={**ENV, "RUST_BACKTRACE": "0"}, stderr=subprocess.DEVNULL)
    yield folder, url
    proc.terminate()
    proc.wait(timeout=30)


def test_one_poisoned_text_fails_its_own_request_only(poisoned):
    """Requests that share a forward pass with a text the tokenizer panics on get their answers;
    the poisoned one gets a JSON 500; the model's thread lives on."""
    _, url = poisoned
    texts = [f"{REVIEW} {i}" for i in range(12)] + [POISON, POISON]
    answers = [None] * len(texts)

    def ask(i):
        answers[i] = post_json(url, {"sentence": texts[i]})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(texts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(
        code == 200 and row["text"] == text for (code, row), text in zip(answers[:12], texts)
    ), answers
    assert all(
        code == 500 and "the model failed on these sentences" in row["error"]
        for code, row in answers[12:]
    ), answers[12:]
    assert post_json(url, {"sentence": REVIEW})[0] == 200


def test_the_cli_names_a_text_the_tokenizer_fails_on(poisoned):
    folder, _ = poisoned
    result = run(
        "predict.py", "--model_dir", folder, POISON, check=False, env={**ENV, "RUST_BACKTRACE": "0"}
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "error: the tokenizer failed on a text" in result.stderr


def test_korean_answers_are_korean_in_the_body(server):
    request = urllib.request.Request(
        server + "/api",
        data=json.dumps({"sentence": REVIEW}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        body = response.read().decode("utf-8")
    assert REVIEW in body and "\\u" not in body


def raw_connection(url):
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def test_a_body_past_the_limit_is_refused_before_it_is_read(server):
    with raw_connection(server) as s:
        s.sendall(
            b"POST /api HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 150000000\r\n\r\n{"
        )
        start = time.time()
        answer = s.recv(200)
    assert answer.startswith(b"HTTP/1.1 413") and time.time() - start < 10, answer


def test_idle_half_sent_requests_do_not_lock_the_others_out(server):
    idle = [raw_connection(server) for _ in range(140)]
    try:
        for s in idle:
            s.sendall(b"POST /api HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        start = time.time()
        assert post_json(server, {"sentence": REVIEW})[0] == 200
        assert time.time() - start < 10
    finally:
        for s in idle:
            s.close()


def test_ctrl_c_with_a_pass_in_flight_exits_130(tiny_checkpoint):
    proc, url = start_server(
        tiny_checkpoint[0],
        env=ENV,
        stderr=subprocess.PIPE,
        # Ctrl-C as a terminal sends it, also where pytest runs with SIGINT ignored (a background
        # job), which a child would inherit
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    busy = threading.Thread(target=lambda: post_json(url, {"sentences": [REVIEW * 20] * 100}))
    busy.start()
    time.sleep(0.5)  # the pass of 100 long sentences is running
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    busy.join(timeout=60)
    assert proc.returncode == 130 and "terminate called" not in err, err


def test_serving_where_it_cannot_is_one_line(tiny_checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flags, message in (
            (["--port", port], f"--port {port}: cannot serve there"),
            (["--host", "999.1.1.1"], "--host 999.1.1.1 --port 8000: cannot serve there"),
            (
                ["--file", "x.txt", "--output", "y.jsonl"],
                "--serve answers requests; leave out " "--file, --output",
            ),
        ):
            result = run(
                "predict.py", "--serve", "--model_dir", tiny_checkpoint[0], *flags, check=False
            )
            assert result.returncode == 2 and message in result.stderr, result.stderr
            assert "Traceback" not in result.stderr
