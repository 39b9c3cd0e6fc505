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


class Batcher:
    """One thread runs the model; requests queue for it. Each pass takes every request queued
    while the last one ran (up to MAX_BATCH sentences; it waits for nothing more), so a lone
    client pays one forward pass and 32 clients share a few. Every text's row is its own: the
    heads ignore padding, so a text's prediction does not depend on its batch-mates."""

    def __init__(self, predictor):
        self.predictor, self.waiting = predictor, collections.deque()
        self.ready = threading.Condition()
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
            try:
                rows = self.predictor.predict([text for texts, _ in jobs for text in texts])
            except Exception as e:  # each waiting request gets the error, the thread goes on
                for _, answer in jobs:
                    answer.set_exception(e)
                continue
            # Each request gets back its own rows, in the order it sent them
            start = 0
            for texts, answer in jobs:
                answer.set_result(rows[start:start + len(texts)])
                start += len(texts)


def create_app(predictor):
    from flask import Flask, jsonify, request
    from werkzeug.exceptions import HTTPException

    app = Flask(__name__)
    # A body over 1 MB is refused (413) before it is parsed
    app.config["MAX_CONTENT_LENGTH"] = 1 << 20
    app.json.sort_keys = False  # probs keep the label order (부정, 긍정), not the alphabet's
    batcher = Batcher(predictor)  # the model's one thread, shared by all request threads
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
        rows = batcher.predict(texts)
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
    # More connections than threads may wait in the queue, but not without bound
    server = create_server(create_app(predictor), host=host, port=port, threads=THREADS,
                           connection_limit=4 * THREADS)
    if host not in LOCAL_HOSTS:
        print(f"warning: --host {host} serves this page and its API to the network, without "
              f"any password", flush=True)
    print(f"serving on http://{host}:{server.effective_port} (Ctrl-C stops)", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
