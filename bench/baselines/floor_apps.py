"""The least any gunicorn + WSGI server does per request: the floors bench/overhead.py sets the service
beside. Neither decodes an image nor runs a model; both answer a fixed top-3 JSON.

    gunicorn -k gthread --threads 24 -w 1 bench.baselines.floor_apps:bare    # WSGI only: read the body
    gunicorn -k gthread --threads 24 -w 1 bench.baselines.floor_apps:flask   # Flask: the `file` field

``bare`` reads the body and answers, with no framework: what gunicorn's HTTP handling costs. ``flask``
is the smallest Flask view a tutorial would write (``request.files["file"]``, ``jsonify``): what Flask,
Werkzeug's routing and its multipart parser add. Both answer GET /readyz for the launcher.
"""

import json

from flask import Flask, jsonify, request

ANSWER = {"predictions": [{"label": "a", "index": 0, "score": 0.5}] * 3}
_BODY = json.dumps(ANSWER).encode()


def bare(environ, start_response):
    size = int(environ.get("CONTENT_LENGTH") or 0)
    environ["wsgi.input"].read(size)
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(_BODY)))])
    return [_BODY]


flask = Flask(__name__)


@flask.get("/readyz")
def readyz():
    return jsonify(ready=True)


@flask.post("/predict")
def predict():
    request.files["file"].read()
    return jsonify(ANSWER)
