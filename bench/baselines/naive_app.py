"""The naive baseline bench/serve.py compares the service with: written the way the seed tutorials write it.

    NAIVE_BUNDLE=models/default.pth gunicorn -w 1 -b 127.0.0.1:8001 bench.baselines.naive_app:app

Model loaded when the module is imported, one request at a time per sync worker, PIL open -> transform
-> forward per request, no batching, torch's default threads, glibc's default malloc. Deliberately not
the service's code: it is the "before" of the comparison (it reuses only the bundle and its eval
transform, so both answer with the same preprocessing).
"""

import os

import torch
from flask import Flask, jsonify, request
from PIL import Image

from model.bundle import load_bundle
from model.transforms import build_eval_transform

app = Flask(__name__)
bundle, model = load_bundle(os.environ.get("NAIVE_BUNDLE", "models/default.pth"))
model.eval()
transform = build_eval_transform(bundle.preprocessing)
class_names = bundle.class_names


@app.route("/readyz")
def readyz():
    return jsonify(status="ready")


@app.route("/predict", methods=["POST"])
def predict():
    img = Image.open(request.files["file"].stream)
    x = transform(img).unsqueeze(0)
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1)[0]
    scores, indices = probs.topk(3)
    return jsonify(
        predictions=[
            {"label": class_names[i], "index": i, "score": round(float(s), 6)}
            for s, i in zip(scores.tolist(), indices.tolist(), strict=True)
        ]
    )
