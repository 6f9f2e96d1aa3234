"""The ``saecircuits`` command line (typer). Each sub-command lives in its own module of this package."""

from __future__ import annotations

import os
import sys

import typer

app = typer.Typer(
    name="saecircuits",
    help="Train SAEs on a language model, find the features behind a behaviour, test them causally, report.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"max_content_width": 120},
)


@app.callback()
def _root() -> None:
    """Train SAEs on a language model, find the features behind a behaviour, test them causally, report."""


def _register() -> None:
    # Sub-command modules register themselves on `app` when imported.
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


# Options that take several values after one flag (`--layers 0 1`), as well as the repeated form click supports.
MULTI_VALUE_OPTIONS = ("--layers", "--sae")


def expand_multi_value_options(argv: list[str]) -> list[str]:
    """Rewrite ``--layers 0 1`` as ``--layers 0 --layers 1`` (click options take one value per flag)."""
    out: list[str] = []
    current: str | None = None
    pending = False  # a flag seen without a value yet: keep it so click reports the missing value
    for arg in argv:
        if arg in MULTI_VALUE_OPTIONS:
            if pending:
                out.append(current)
            current, pending = arg, True
            continue
        if current is not None and not arg.startswith("-"):
            out += [current, arg]
            pending = False
            continue
        if pending:
            out.append(current)
        current, pending = None, False
        out.append(arg)
    if pending:
        out.append(current)
    return out


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _register()
    args = expand_multi_value_options(list(sys.argv[1:] if argv is None else argv))
    app(args=args, prog_name="saecircuits")
