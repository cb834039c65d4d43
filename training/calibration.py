"""Are the scores honest? Expected calibration error, and a softmax temperature fitted on held-out data.

A model that says "92 %" should be right about 92 % of the time. ``expected_calibration_error`` bins
predictions by confidence and averages |accuracy - confidence| over the bins, weighted by their size;
``fit_temperature`` finds the T that minimises the negative log-likelihood of ``softmax(logits / T)``
(Guo et al., 2017). Dividing by one T never changes which class ranks first, only how sure it sounds.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F  # noqa: N812 - the usual alias

ECE_BINS = 15


def expected_calibration_error(
    probs: torch.Tensor, targets: torch.Tensor, n_bins: int = ECE_BINS
) -> tuple[float, list[dict[str, float]]]:
    """(ECE, per-bin counts/confidence/accuracy) with ``n_bins`` equal-width confidence bins."""
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == targets).double()
    confidence = confidence.double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    total = max(len(targets), 1)
    ece = 0.0
    bins = []
    for i in range(n_bins):
        lower, upper = float(edges[i]), float(edges[i + 1])
        in_bin = (confidence > lower) & (confidence <= upper) if i else (confidence >= lower) & (confidence <= upper)
        count = int(in_bin.sum())
        conf = float(confidence[in_bin].mean()) if count else 0.0
        acc = float(correct[in_bin].mean()) if count else 0.0
        ece += abs(acc - conf) * count / total
        bins.append({"lower": lower, "upper": upper, "count": count, "confidence": conf, "accuracy": acc})
    return ece, bins


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature minimising NLL on (logits, targets); optimised as log T so it stays positive."""
    # Clones: tensors made under inference_mode (the evaluation pass) cannot take part in autograd.
    logits = logits.detach().double().clone()
    targets = targets.detach().clone()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def calibration_report(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, n_bins: int = ECE_BINS
) -> dict[str, Any]:
    """ECE and NLL at ``temperature`` (what the predictor serves), and at T = 1 for comparison."""
    logits = logits.double()
    ece, bins = expected_calibration_error(torch.softmax(logits / temperature, dim=1), targets, n_bins)
    ece_t1, _ = expected_calibration_error(torch.softmax(logits, dim=1), targets, n_bins)
    return {
        "temperature": float(temperature),
        "ece": round(ece, 6),
        "nll": round(float(F.cross_entropy(logits / temperature, targets)), 6),
        "ece_at_temperature_1": round(ece_t1, 6),
        "nll_at_temperature_1": round(float(F.cross_entropy(logits, targets)), 6),
        "bins": bins,
    }
