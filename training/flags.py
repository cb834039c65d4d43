"""Every option of training.train, by group: the flags, their defaults, and the checks a recipe file's values get.

The names (argparse ``dest``: ``batch_size`` for ``--batch-size``) are the keys of the recipe files in
configs/, of the options tune and compare build in code, and of ``TrainConfig``: one vocabulary.
Switches are ``--x/--no-x`` so that a flag can turn off what a recipe file turned on.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
from collections.abc import Mapping
from typing import Any

from model.registry import PRETRAINED_CHOICES, list_architectures
from model.transforms import AUTO_AUGMENTS, CROP_MODES
from training.precision import AMP_CHOICES

SWITCH = argparse.BooleanOptionalAction


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="image folder (ImageFolder, train/val/test splits, or Kaggle flat)")
    g.add_argument("--val-split", type=float, default=0.1, help="fraction held out for validation when no val/ folder")
    g.add_argument("--test-split", type=float, default=0.1, help="fraction held out for testing when no test/ folder")
    g.add_argument(
        "--per-class",
        type=int,
        default=None,
        metavar="N",
        help="train on at most N images of each class, drawn by --seed (small-data runs and learning curves;"
        " validation and test splits stay whole; a smaller N keeps a subset of a larger N's images)",
    )
    g.add_argument(
        "--img-size",
        type=int,
        default=None,
        help="crop size (default: the pretrained weights' size; "
        "from scratch: the images' median short side, at most 224)",
    )
    g.add_argument(
        "--resize",
        type=int,
        default=None,
        help="eval resize of the short side (default: crop/0.875, or the crop itself below 64 px)",
    )
    g.add_argument(
        "--channels",
        type=int,
        default=0,
        choices=(0, 1, 3),
        help="1 grey, 3 colour, 0 auto (grey data with a from-scratch model gets 1)",
    )
    g.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader worker processes (default: usable CPUs per process - 1, at most 8)",
    )
    g.add_argument("--cache", action=SWITCH, default=False, help="decode every image once and keep it in memory")
    g.add_argument(
        "--batch-aug",
        action=SWITCH,
        default=False,
        help="small images: decode once into one uint8 tensor and augment whole batches on the training"
        " device (kornia: pad-crop, flip, random erasing) instead of each image in DataLoader workers;"
        " faster on few cores",
    )
    g.add_argument(
        "--balance", action=SWITCH, default=False, help="sample classes equally often (WeightedRandomSampler)"
    )
    g.add_argument(
        "--class-weights",
        default="none",
        choices=("none", "auto"),
        help="auto: weight the loss of each class by its inverse frequency in the training split"
        " (imbalanced data; an alternative to --balance)",
    )


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="simple_cnn", help=f"architecture, one of: {', '.join(list_architectures())}")
    g.add_argument("--arch-kwargs", default="{}", help="JSON of extra constructor arguments, e.g. '{\"width\": 48}'")
    g.add_argument(
        "--pretrained",
        default=None,
        choices=PRETRAINED_CHOICES,
        help="start from ImageNet weights (default: imagenet, except none for simple_cnn and with --weights-file)",
    )
    g.add_argument(
        "--weights-file",
        default=None,
        help="start from a local state_dict/bundle file instead of --pretrained weights (nothing is downloaded)",
    )
    g.add_argument(
        "--freeze-backbone", action=SWITCH, default=False, help="train the new head only (feature extraction)"
    )
    g.add_argument(
        "--unfreeze-at",
        type=int,
        default=None,
        metavar="EPOCH",
        help="two-phase fine-tuning: train the head with the backbone frozen, then the whole network from"
        " epoch EPOCH (1-based) on",
    )
    g.add_argument(
        "--backbone-lr-scale",
        type=float,
        default=1.0,
        help="the backbone's learning rate is lr x this (the head keeps lr); e.g. 0.1 for fine-tuning",
    )
    g.add_argument(
        "--keep-norm-stats",
        action=SWITCH,
        default=False,
        help="BatchNorm layers keep the running statistics they started from and use them in training too"
        " (their scale and shift still train): fine-tuning a pretrained network on small batches of"
        " another domain without the batch statistics replacing what the head learnt",
    )
    g.add_argument(
        "--init-from",
        default=None,
        help="start from a bundle: its architecture, arguments, preprocessing and weights (e.g. a pruned bundle)",
    )
    g.add_argument(
        "--keep-zeros",
        action=SWITCH,
        default=False,
        help="weights that are exactly zero at the start stay zero (fine-tuning a pruned model keeps its sparsity)",
    )
    g = p.add_argument_group("distillation")
    g.add_argument("--distill-from", default=None, help="teacher bundle whose soft labels the student learns from")
    g.add_argument(
        "--distill-alpha", type=float, default=0.5, help="weight of the teacher's soft labels (1 - alpha: true labels)"
    )
    g.add_argument("--distill-temperature", type=float, default=4.0, help="softmax temperature of the soft labels")


def add_optimisation_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=10, help="epochs")
    g.add_argument("--batch-size", type=int, default=128, help="batch size per process")
    g.add_argument("--opt", default="sgd", choices=("sgd", "adamw"), help="optimizer")
    g.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate (default: SGD 0.1 from scratch, "
        "0.01 pretrained; AdamW 2e-3 / 5e-4; scaled by batch size / 128)",
    )
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--nesterov", action=SWITCH, default=True, help="Nesterov momentum (--no-nesterov: plain)")
    g.add_argument(
        "--wd",
        type=float,
        default=None,
        help="weight decay, not applied to biases and norms (default: SGD 5e-4, AdamW 0.05)",
    )
    g.add_argument("--sched", default="cosine", choices=("cosine", "step", "plateau", "none"), help="LR schedule")
    g.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up (cosine)")
    g.add_argument("--step-size", type=int, default=10, help="epochs between LR drops (step)")
    g.add_argument("--gamma", type=float, default=0.1, help="LR factor at each drop (step, plateau)")
    g.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--mixup-alpha", type=float, default=0.0, help="MixUp alpha (0: off)")
    g.add_argument("--cutmix-alpha", type=float, default=0.0, help="CutMix alpha (0: off)")
    g.add_argument("--ema-decay", type=float, default=0.0, help="EMA of weights per step, e.g. 0.999 (0: off)")
    g.add_argument("--clip-grad", type=float, default=0.0, help="max gradient norm (0: off)")
    g.add_argument(
        "--amp",
        default="auto",
        choices=AMP_CHOICES,
        help="mixed precision (autocast): auto picks bfloat16 where the device has it natively (GPUs from"
        " Ampere; CPUs with AVX-512 BF16, AMX or Arm BF16), else float16 with a GradScaler on CUDA and float32"
        " on CPU; fp16, bf16 and off as named; on: float16 on CUDA, bfloat16 on CPU",
    )
    g.add_argument("--patience", type=int, default=0, help="early stopping after N epochs without improvement (0: off)")


def add_augmentation_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("augmentation")
    g.add_argument(
        "--crop",
        default="auto",
        choices=CROP_MODES,
        help="auto: random-resized for photos, pad (random crop of a padded image) below 64 px",
    )
    g.add_argument("--min-scale", type=float, default=0.25, help="smallest area fraction of random-resized crops")
    g.add_argument("--pad", type=int, default=2, help="padding of the pad crop")
    g.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    g.add_argument("--vflip", type=float, default=0.0, help="vertical flip probability")
    g.add_argument(
        "--rotation", type=float, default=0.0, metavar="DEG", help="random rotation by up to +/- DEG degrees (0: off)"
    )
    g.add_argument("--auto-augment", default="none", choices=AUTO_AUGMENTS, help="policy")
    g.add_argument("--color-jitter", type=float, default=0.0, help="brightness/contrast/saturation jitter")
    g.add_argument("--hue", type=float, default=0.0, help="hue jitter, at most 0.5 (colour input only; 0: off)")
    g.add_argument("--random-erasing", type=float, default=0.0, help="RandomErasing probability")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument(
        "--config",
        default=None,
        help="recipe file (TOML, e.g. configs/small.toml): its values become "
        "the defaults, and flags given here override them",
    )
    g.add_argument("--out", required=True, help="run folder for bundles, logs and figures")
    g.add_argument("--resume", default=None, help="continue from RUN_DIR/last.pth")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--deterministic", action=SWITCH, default=False, help="deterministic algorithms (slower on GPU)")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device")
    g.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads per process (default: usable CPUs / processes)"
    )
    g.add_argument(
        "--channels-last",
        action=SWITCH,
        default=None,
        help="channels_last memory format (default: on for convolutional networks on CUDA, off on CPU)",
    )
    g.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop after N epochs of this invocation, as if interrupted (time-sliced jobs; the resume test)",
    )
    g.add_argument("--quiet", action=SWITCH, default=False, help="no progress bars")


def add_training_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    for add in (
        add_data_arguments,
        add_model_arguments,
        add_optimisation_arguments,
        add_augmentation_arguments,
        add_run_arguments,
    ):
        add(p)
    return p


def training_parser(**kwargs: Any) -> argparse.ArgumentParser:
    """A parser with every training option (training.train's own adds its description)."""
    return add_training_arguments(argparse.ArgumentParser(**kwargs))


def option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's training options by name (argparse keeps its actions in a private list; no public API)."""
    return {a.dest: a for a in parser._actions if a.dest != "help"}


@functools.cache
def _actions() -> dict[str, argparse.Action]:
    return option_actions(training_parser())


def defaults() -> dict[str, Any]:
    """Every option's default, as the flags define it (the one place defaults live)."""
    return {name: action.default for name, action in _actions().items()}


def explicit_flags(argv: list[str]) -> dict[str, Any]:
    """Only the options ``argv`` sets, parsed by the training flags (tune's and compare's ``-- FLAGS``)."""
    parser = training_parser(add_help=False)
    for action in option_actions(parser).values():
        action.default, action.required = argparse.SUPPRESS, False
    return vars(parser.parse_args(argv))


def check_options(options: Mapping[str, Any], source: str) -> None:
    """Reject unknown names and values a flag would refuse (type, choices), naming ``source`` and the key."""
    actions = _actions()
    for key, value in options.items():
        action = actions.get(key)
        if action is None:
            raise ValueError(f"{source}: unknown option {key!r}{_did_you_mean(key, actions)}")
        problem = _value_problem(action, value)
        if problem:
            raise ValueError(f"{source}: {key} = {value!r}: {problem}")


def _value_problem(action: argparse.Action, value: Any) -> str | None:
    if value is None:
        return None if action.default is None else "must be set (only options without a default may be unset)"
    if isinstance(action, SWITCH):
        return None if isinstance(value, bool) else "must be true or false"
    if action.dest == "arch_kwargs":
        return None if isinstance(value, dict) or _is_json_object(value) else "must be a table or a JSON object"
    kind = action.type or str
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        return f"must be {kind.__name__}"
    if action.choices is not None and value not in action.choices:
        return f"must be one of {', '.join(map(str, action.choices))}"
    return None


def _is_json_object(text: Any) -> bool:
    try:
        return isinstance(text, str) and isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _did_you_mean(key: str, actions: Mapping[str, argparse.Action]) -> str:
    close = difflib.get_close_matches(key.replace("-", "_"), list(actions), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
