"""The ``saecircuits`` command line (typer). Each sub-command lives in its own module of this package."""

from __future__ import annotations

import os

import typer

app = typer.Typer(
    name="saecircuits",
    help="Train SAEs on a language model, find the features behind a behaviour, test them causally, report.",
    no_args_is_help=True,
    add_completion=False,
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


def main() -> None:
    """Console entry point."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _register()
    app()
