"""Run training.train and SIGKILL it at a chosen, reproducible point (the fault tests' runner).

    python tests/kill_train.py epoch:2:3 -- <training.train arguments>   # in epoch 2, after 3 batches
    python tests/kill_train.py write:last.pth:2 -- <arguments>           # half-way through the 2nd last.pth write

The kill is a real SIGKILL of this process (no handler, no `finally`, no flush runs), sent by the
process to itself at the named point, so the test does not race a timer against the training loop.
For the write, the real ``torch.save`` output is produced and half of it written and fsynced to the
checkpoint's temporary file before the kill: the file is on disk mid-write, as after a power cut.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import sys

import torch

from training import fit, recipes, train


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_in_epoch(epoch: int, after_batches: int) -> None:
    real = fit.train_one_epoch
    calls = {"n": 0}

    def train_one_epoch(model, loader, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] != epoch:
            return real(model, loader, *args, **kwargs)

        def batches():
            for i, batch in enumerate(loader):
                if i == after_batches:
                    die()
                yield batch

        return real(model, batches(), *args, **kwargs)

    fit.train_one_epoch = train_one_epoch


def kill_in_write(name: str, nth: int) -> None:
    real = torch.save
    seen = {"n": 0}

    def save(obj, f, *args, **kwargs):
        target = getattr(f, "name", "")
        if isinstance(target, int):  # atomic_torch_save writes through os.fdopen: the name is the descriptor
            target = os.readlink(f"/proc/self/fd/{target}")
        if isinstance(target, str) and os.path.basename(target).startswith(f".{name}."):
            seen["n"] += 1
            if seen["n"] == nth:
                buf = io.BytesIO()
                real(obj, buf, *args, **kwargs)
                data = buf.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                die()
        return real(obj, f, *args, **kwargs)

    torch.save = save


def main(argv: list[str]) -> None:
    where, sep, *args = argv
    assert sep == "--", "usage: kill_train.py MODE -- ARGS"
    kind, first, second = where.split(":")
    if kind == "epoch":
        kill_in_epoch(int(first), int(second))
    elif kind == "write":
        kill_in_write(first, int(second))
    else:
        raise SystemExit(f"unknown mode {where}")
    train.main(recipes.parse_args(train.get_args_parser(), args))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main(sys.argv[1:])
