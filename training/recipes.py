"""Recipes as files: configs/*.toml hold training options by their flag names; flags override them.

    python -m training.train --config configs/small.toml --data DIR --out runs/fashion
    python -m training.train --config configs/long.toml --data DIR --out runs/x --epochs 20 --no-batch-aug

A recipe's keys are the options' names (``batch_size`` for ``--batch-size``); ``arch_kwargs`` may be a
TOML table. ``--config`` makes the file's values the parser's defaults and the command line is parsed
again, so every flag given wins over the file (argparse ``set_defaults``: timm's config pattern).
Unknown keys and values a flag would refuse are errors that name the key.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from pathlib import Path
from typing import Any

from training.flags import check_options, explicit_flags, option_actions

RECIPES_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_RECIPE = RECIPES_DIR / "default.toml"


def recipe_path(name: str) -> Path:
    """configs/NAME.toml."""
    return RECIPES_DIR / f"{name}.toml"


def load_recipe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A recipe file's options, checked: ValueError naming the file and the key for anything a flag would refuse."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            recipe = tomllib.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such recipe file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from None
    if "config" in recipe:
        raise ValueError(f"{path}: a recipe cannot name another recipe ('config')")
    check_options(recipe, str(path))
    return recipe


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` over the defaults of the recipe it names with ``--config``, if any."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config", default=None)
    known, _ = first.parse_known_args(argv)
    if known.config:
        try:
            recipe = load_recipe(known.config)
        except ValueError as exc:
            parser.error(f"--config {exc}")
        parser.set_defaults(**recipe)
        for name, action in option_actions(parser).items():
            if name in recipe:  # a recipe may name the data or the run folder too
                action.required = False
    return parser.parse_args(argv)


def recipe_and_flags(argv: list[str]) -> dict[str, Any]:
    """The options ``argv`` sets: its ``--config`` recipe's, then its flags' (tune's and compare's ``-- FLAGS``)."""
    given = explicit_flags(argv)
    recipe = load_recipe(given["config"]) if given.get("config") else {}
    return {**recipe, **given}
