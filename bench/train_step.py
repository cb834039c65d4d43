"""Training-step throughput of simple_cnn on this CPU: float32 vs bfloat16 autocast (`--amp on`).

    python -m bench.train_step [--widths 32,64] [--steps 30]

The model alone on random 28x28 grey batches (channels-last, SGD), both precisions interleaved in one
run; writes bench/results/train_step.json and prints a table with the bfloat16/float32 ratio.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn import functional as F  # noqa: N812 - the usual alias

from bench.common import RESULTS_DIR, write_results
from model.simple_cnn import SimpleCNN


def images_per_second(width: int, dtype: torch.dtype | None, batch: int, steps: int) -> float:
    model = SimpleCNN(10, 1, width=width).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="32,64", help="simple_cnn widths (default: %(default)s)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default: %(default)s)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for width in (int(w) for w in args.widths.split(",")):
        fp32 = images_per_second(width, None, args.batch, args.steps)
        bf16 = images_per_second(width, torch.bfloat16, args.batch, args.steps)
        rows.append({"width": width, "fp32_img_s": round(fp32, 1), "bf16_img_s": round(bf16, 1),
                     "ratio": round(bf16 / fp32, 2)})  # fmt: skip
    write_results("train_step", rows, str(RESULTS_DIR / "train_step.json"))
    print(f"{'width':>5} {'fp32 img/s':>11} {'bf16 img/s':>11} {'bf16/fp32':>9}")
    for r in rows:
        print(f"{r['width']:>5} {r['fp32_img_s']:>11.0f} {r['bf16_img_s']:>11.0f} {r['ratio']:>9.2f}")


if __name__ == "__main__":
    main()
