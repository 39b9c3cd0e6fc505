"""The web page and JSON API of `python predict.py --serve`.

GET / is page.html; POST /api takes {"sentence": s} or {"sentences": [...]} (at most
MAX_SENTENCES) and answers with the fields of `predict.py --json`. The predictor
(predict.Predictor) is loaded once; a Batcher runs the sentences of requests that arrive while
the model is busy together in its next forward pass. waitress serves it on every platform.
"""
import collections
import json
import os
import threading
from concurrent.futures import Future
from html import escape

from _1_data import valid_unicode
from common import DataError

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")
# a request holds the model for one forward pass over its sentences: this bounds how long
# other requests wait (texts are cut to the checkpoint's max_len, so each costs a bounded time)
MAX_SENTENCES = 100
MAX_BATCH = 128  # sentences of several requests in one forward pass, at most
THREADS = 32  # waitress's request threads: up to 32 requests can wait for the same pass
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_BODY = 1 << 20  # bytes of a body: 100 sentences of 3,000 Korean characters (3 bytes each)
CONNECTIONS, CHANNEL_TIMEOUT = 1000, 10  # open connections at most; seconds a silent one stays


class Batcher:
    """One thread runs the model; requests queue for it. Each pass takes every request queued
    while the last one ran (up to MAX_BATCH sentences; it waits for nothing more), so a lone
    client pays one forward pass and 32 clients share a few. Every text's row is its own: the
    heads ignore padding, so a text's prediction does not depend on its batch-mates."""

    def __init__(self, predictor):
        self.predictor, self.waiting = predictor, collections.deque()
        self.ready, self.busy, self.stopping = threading.Condition(), threading.Lock(), False
        # daemon: the model's thread never keeps the process alive after the server stops
        threading.Thread(target=self.run, daemon=True).start()

    def predict(self, texts):
        job = (texts, Future())
        with self.ready:
            self.waiting.append(job)
            self.ready.notify()
        # The request's thread waits here while the model's thread runs its pass
        return job[1].result()

    def next_jobs(self):
        with self.ready:
            self.ready.wait_for(lambda: self.waiting)
            jobs, n = [], 0
            # Whole requests only, and always at least one, however many sentences it has
            while self.waiting and (not jobs or n + len(self.waiting[0][0]) <= MAX_BATCH):
                jobs.append(self.waiting.popleft())
                n += len(jobs[-1][0])
            return jobs

    def run(self):
        while True:
            jobs = self.next_jobs()
            with self.busy:  # a shutdown waits for the pass in flight (serve's Ctrl-C)
                if self.stopping:
                    return
                self.answer(jobs)

    def answer(self, jobs):
        """Runs one pass over the jobs' sentences; when it fails, each job runs again on its own,
        so that one poisoned text fails its own request and not its batch-mates'."""
        try:
            rows = self.predictor.predict([text for texts, _ in jobs for text in texts])
        # BaseException: a tokenizer's Rust panic arrives as pyo3's PanicException, which is not
        # an Exception; left uncaught it would end this thread and every request would wait
        except BaseException as e:
            if len(jobs) > 1:
                for job in jobs:
                    self.answer([job])
            else:
                jobs[0][1].set_exception(PredictionFailed(str(e).splitlines()[0][:200]
                                                          if str(e) else type(e).__name__))
            return
        # Each request gets back its own rows, in the order it sent them
        start = 0
        for texts, answer in jobs:
            answer.set_result(rows[start:start + len(texts)])
            start += len(texts)

    def stop(self):
        """No pass starts after this returns, and none is running: torch's threads are idle when
        the process exits (a pass cut off by exit aborts it: 'terminate called ...')."""
        with self.busy:
            self.stopping = True


class PredictionFailed(Exception):
    """The model failed on one request's sentences (the others of its pass are answered)."""


def create_app(predictor):
    from flask import Flask, jsonify, request
    from werkzeug.exceptions import HTTPException

    app = Flask(__name__)
    # A body over 1 MB is refused (413) before it is parsed
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.json.sort_keys = False  # probs keep the label order (부정, 긍정), not the alphabet's
    app.json.ensure_ascii = False  # Korean as Korean in the body, not \uXXXX escapes
    # the model's one thread, shared by all request threads; serve() stops it on Ctrl-C
    batcher = app.batcher = Batcher(predictor)
    info = predictor.info
    names = ", ".join(predictor.names)
    title = f"{info['args'].get('model', '')} · {info['head_name']} · {names}"
    # The model's name and labels are escaped into the page: a label cannot inject HTML
    with open(PAGE, encoding="utf-8") as f:
        page = f.read().replace("__MODEL__", escape(title))

    @app.get("/")
    def show_page():
        return page

    @app.post("/api")
    def api():
        try:
            body = json.loads(request.get_data())
        except (ValueError, RecursionError):  # RecursionError: JSON nested too deeply
            return jsonify(error="the body is not valid JSON"), 400
        if not isinstance(body, dict):
            return jsonify(error="the body must be a JSON object"), 400
        if "sentences" in body:
            texts = body["sentences"]
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                return jsonify(error='"sentences" must be a list of strings'), 400
            if len(texts) > MAX_SENTENCES:
                return jsonify(error=f"at most {MAX_SENTENCES} sentences per request, "
                                     f"got {len(texts)}"), 413
        elif isinstance(body.get("sentence"), str):
            texts = [body["sentence"]]
        else:
            return jsonify(error='give "sentence" (a string) '
                                 'or "sentences" (a list of strings)'), 400
        try:
            for i, text in enumerate(texts, 1):
                # JSON may carry lone surrogates, which the tokenizer cannot encode: a 400, not a
                # failed pass
                valid_unicode("sentence", i, text)
        except DataError as e:
            return jsonify(error=str(e)), 400
        try:
            rows = batcher.predict(texts)
        except PredictionFailed as e:
            return jsonify(error=f"the model failed on these sentences: {e}"), 500
        return jsonify(rows if "sentences" in body else rows[0])

    @app.errorhandler(HTTPException)
    def http_error(e):
        return jsonify(error=e.description), e.code

    return app


def serve(predictor, host, port):
    import logging

    from waitress import create_server

    # "Task queue depth is N": requests waiting for a thread are what the Batcher is for
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    # More connections than threads may wait in the queue, but not without bound; a connection
    # that sends nothing for CHANNEL_TIMEOUT seconds is closed, so a few hundred half-sent
    # requests cannot lock the others out for long (waitress's defaults: 100, and 120 s); a body
    # past 2 MB is refused from its Content-Length, before it is read (waitress's own limit: 1 GB;
    # one under 2 MB is read, and Flask's 413 past MAX_BODY answers it in JSON)
    app = create_app(predictor)
    try:
        server = create_server(app, host=host, port=port, threads=THREADS,
                               connection_limit=CONNECTIONS, channel_timeout=CHANNEL_TIMEOUT,
                               max_request_body_size=2 * MAX_BODY)
    # a port in use or not ours, an address that is not this machine's (waitress: ValueError)
    except (OSError, ValueError) as e:
        raise DataError(f"--host {host} --port {port}: cannot serve there "
                        f"({getattr(e, 'strerror', None) or e})") from None
    if host not in LOCAL_HOSTS:
        print(f"warning: --host {host} serves this page and its API to the network, without "
              f"any password", flush=True)
    print(f"serving on http://{host}:{server.effective_port} (Ctrl-C stops)", flush=True)
    try:
        server.run()  # until Ctrl-C, which waitress catches and returns from
    finally:
        server.close()
        app.batcher.stop()  # the pass in flight ends first: exiting inside torch aborts
    raise KeyboardInterrupt  # the process ends as every script's Ctrl-C does (exit 130)
