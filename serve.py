"""The web page and JSON API of `python predict.py --serve`.

GET / is page.html; POST /api takes {"sentence": s} or {"sentences": [...]} (at most
MAX_SENTENCES) and answers with the fields of `predict.py --json`. The predictor
(predict.Predictor) is loaded once and shared by all request threads, one forward pass at a time.
"""
import json
import os
import threading
from html import escape

from _1_data import DataError, valid_unicode

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")
# a request holds the model for one forward pass over its sentences: this bounds how long
# other requests wait (texts are cut to the checkpoint's max_len, so each costs a bounded time)
MAX_SENTENCES = 100
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def create_app(predictor):
    from flask import Flask, jsonify, request
    from werkzeug.exceptions import HTTPException

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 1 << 20
    app.json.sort_keys = False  # probs keep the label order (부정, 긍정), not the alphabet's
    lock = threading.Lock()  # the model is shared by all request threads
    info = predictor.info
    names = ", ".join(predictor.names)
    title = f"{info['args'].get('model', '')} · {info['head_name']} · {names}"
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
                valid_unicode("sentence", i, text)
        except DataError as e:
            return jsonify(error=str(e)), 400
        with lock:
            rows = predictor.predict(texts)
        return jsonify(rows if "sentences" in body else rows[0])

    @app.errorhandler(HTTPException)
    def http_error(e):
        return jsonify(error=e.description), e.code

    return app


def serve(predictor, host, port):
    from werkzeug.serving import make_server

    server = make_server(host, port, create_app(predictor), threaded=True)
    if host not in LOCAL_HOSTS:
        print(f"warning: --host {host} serves this page and its API to the network, without "
              f"any password", flush=True)
    print(f"serving on http://{host}:{server.server_port} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
