"""The gallery of a model's most confident mistakes, with Grad-CAM heat maps, and its per-class accuracy.

``python -m training.evaluate --mistakes N`` writes it to ``<report>/mistakes/``: ``index.html`` (open it
in a browser; it loads nothing from the internet) and three PNGs per mistake: the image as the model saw
it (the eval crop, ``model.pixels``), the heat map of the class it said and the heat map of the class it
should have said (``model.explain``). Confident mistakes are where labels are wrong, classes overlap or
the model looks at the wrong thing: the heat maps tell these apart.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model.bundle import Bundle
from model.explain import ExplanationUnsupported, GradCam, input_image, overlay
from model.pixels import prepare
from model.predictor import softmax
from training.data import Sample, load_image

logger = logging.getLogger(__name__)

EXPLAIN_BATCH = 16
GALLERY_SIDE = 160  # small inputs (28 px Fashion-MNIST) are enlarged to about this many pixels


def most_confident_mistakes(logits: np.ndarray, targets: np.ndarray, temperature: float, n: int) -> list[int]:
    """Indices of the ``n`` wrong predictions with the highest score, highest first (ties: lower index)."""
    probs = softmax(logits, temperature)
    predicted = probs.argmax(1)
    wrong = np.flatnonzero(predicted != targets)
    order = np.argsort(-probs[wrong, predicted[wrong]], kind="stable")
    return wrong[order][:n].tolist()


def per_class_accuracy(confusion: Sequence[Sequence[int]], class_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per class: images, correct, and accuracy (the diagonal over the row; None for a class with no image)."""
    out = {}
    for i, name in enumerate(class_names):
        row = confusion[i]
        total = int(sum(row))
        correct = int(row[i])
        out[name] = {"images": total, "correct": correct, "accuracy": round(correct / total, 6) if total else None}
    return out


def write_gallery(
    model: nn.Module,
    bundle: Bundle,
    samples: Sequence[Sample],
    logits: np.ndarray,
    confusion: Sequence[Sequence[int]],
    out: Path,
    n: int,
    *,
    device: torch.device,
) -> dict[str, Any]:
    """Write ``out/index.html`` and the PNGs of the ``n`` most confident mistakes; returns its summary."""
    class_names = list(bundle.class_names)
    targets = np.array([label for _, label in samples])
    chosen = most_confident_mistakes(logits, targets, bundle.temperature, n)
    probs = softmax(logits, bundle.temperature)
    out.mkdir(parents=True, exist_ok=True)
    prep = bundle.preprocessing
    scale = max(1, GALLERY_SIDE // prep.crop)
    try:
        cam: GradCam | None = GradCam(model.to(device), prep)
        note = f"Grad-CAM on layer {cam.layer}"
    except ExplanationUnsupported as exc:
        cam, note = None, f"no heat maps: {exc}"
        logger.warning("%s", note)
    entries = []
    for start in range(0, len(chosen), EXPLAIN_BATCH):
        part = chosen[start : start + EXPLAIN_BATCH]
        pixels = np.stack([prepare(load_image(samples[i][0]), prep) for i in part])
        predicted = [int(probs[i].argmax()) for i in part]
        said = cam.explain(pixels, predicted) if cam else None
        truth = cam.explain(pixels, [int(targets[i]) for i in part]) if cam else None
        for j, i in enumerate(part):
            rank = start + j + 1
            files = {"photo": f"{rank:04d}-photo.png"}
            empty: list[str] = []
            input_image(pixels[j], scale=scale).save(out / files["photo"])
            if said and truth:
                files["predicted"] = f"{rank:04d}-predicted.png"
                files["true"] = f"{rank:04d}-true.png"
                overlay(pixels[j], said[j].heatmap, scale=scale).save(out / files["predicted"])
                overlay(pixels[j], truth[j].heatmap, scale=scale).save(out / files["true"])
                # Grad-CAM keeps only what raised the score: an all-zero map means nothing in the image did
                empty = [k for k, e in (("predicted", said[j]), ("true", truth[j])) if not e.heatmap.any()]
            entries.append(
                {
                    "rank": rank,
                    "path": str(samples[i][0]),
                    "true": class_names[int(targets[i])],
                    "predicted": class_names[predicted[j]],
                    "score": round(float(probs[i, predicted[j]]), 6),
                    "true_score": round(float(probs[i, int(targets[i])]), 6),
                    "files": files,
                    "empty_maps": empty,
                }
            )
    accuracy = per_class_accuracy(confusion, class_names)
    (out / "index.html").write_text(_page(bundle, entries, accuracy, note, len(samples)), encoding="utf-8")
    logger.info("the %d most confident mistakes and per-class accuracy: %s", len(entries), out / "index.html")
    return {"folder": str(out), "mistakes": entries, "per_class_accuracy": accuracy, "heat_maps": note}


def _page(
    bundle: Bundle, entries: list[dict[str, Any]], accuracy: dict[str, dict[str, Any]], note: str, total: int
) -> str:
    e = html.escape
    rows = []
    for name, a in sorted(accuracy.items(), key=lambda kv: (kv[1]["accuracy"] is None, kv[1]["accuracy"] or 0)):
        percent = "-" if a["accuracy"] is None else f"{100 * a['accuracy']:.1f} %"
        rows.append(f"<tr><td>{e(name)}</td><td>{a['images']}</td><td>{a['correct']}</td><td>{percent}</td></tr>")
    cards = []
    for m in entries:
        images = [f'<figure><img src="{e(m["files"]["photo"])}" alt="the image as the model saw it">'
                  "<figcaption>as the model saw it</figcaption></figure>"]  # fmt: skip
        for key, label in (("predicted", m["predicted"]), ("true", m["true"])):
            if key in m["files"]:
                caption = (
                    f"nothing here raised <b>{e(label)}</b>"
                    if key in m["empty_maps"]
                    else f"where it saw <b>{e(label)}</b>"
                )
                images.append(
                    f'<figure><img src="{e(m["files"][key])}" alt="heat map: where the model saw {e(label)}">'
                    f"<figcaption>{caption}</figcaption></figure>"
                )
        cards.append(
            f"<article><h3>#{m['rank']}: said <b>{e(m['predicted'])}</b> ({100 * m['score']:.1f} %), "
            f"is <b>{e(m['true'])}</b> ({100 * m['true_score']:.1f} %)</h3>"
            f'<p class="path">{e(m["path"])}</p><div class="row">{"".join(images)}</div></article>'
        )
    mistakes = "\n".join(cards) or "<p>No mistakes on these images.</p>"
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Most confident mistakes: {e(bundle.arch)}</title>
<style>
body {{ font: 15px/1.5 system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; padding: 0 1rem; color: #1e293b; }}
table {{ border-collapse: collapse; }}
td, th {{ padding: .2rem .8rem; border-bottom: 1px solid #cbd5e1; text-align: left; }}
article {{ margin: 1.5rem 0; }} h3 {{ font-size: 1rem; font-weight: 500; margin: 0; }}
.path {{ color: #475569; font-size: .85rem; margin: .2rem 0 .5rem; word-break: break-all; }}
.row {{ display: flex; flex-wrap: wrap; gap: .8rem; }} figure {{ margin: 0; }}
img {{ image-rendering: pixelated; display: block; }} figcaption {{ font-size: .85rem; color: #475569; }}
</style>
</head>
<body>
<main>
<h1>Most confident mistakes</h1>
<p>{e(bundle.arch)}, {len(bundle.class_names)} classes; {len(entries)} mistakes shown of {total} images. {e(note)}.
Warm colours: where the network found what raised that class's score.</p>
<h2>Accuracy per class</h2>
<table><thead><tr><th>class</th><th>images</th><th>correct</th><th>accuracy</th></tr></thead>
<tbody>
{"".join(rows)}
</tbody></table>
<h2>Mistakes, most confident first</h2>
{mistakes}
</main>
</body>
</html>
"""
