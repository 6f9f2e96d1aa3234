"""The ``saecircuits`` command line (typer). Each sub-command lives in its own module of this package.

Console conventions, shared by every command:

- ``--help`` is click's plain two-column help (typer's rich panels cut option names and choices at 80 columns),
  wrapped to the terminal or ``COLUMNS`` (80 when piped), never splitting a word at a hyphen, with every option's
  default shown.
- A bad setting is ONE line on stderr, ``error: <what is wrong and the fix> (see 'saecircuits CMD --help')``, and
  exit status 2; click's own usage errors (unknown option, a value that is not a number) are shown the same way.
  Commands raise :class:`InputError` for theirs, and run their work inside :func:`user_errors`, which turns the
  project's own errors (a bad setting or input found deeper down) into the same one line.
- Progress is a tqdm bar on a terminal and plain lines in a log (:mod:`saecircuits.progress`); status lines are
  never folded at the console width.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

try:  # typer >= 0.20 ships its own copy of click
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click.exceptions import ClickException, UsageError

_NB_HYPHEN = "\u2011"  # stands in for "-" while click wraps help text, so no word is split at a hyphen
_TEXT_DEFAULT = re.compile(r"\[default: \((.*?)\)([;\]])")


def _keep_words_whole(text: str) -> str:
    # A default given as text (show_default="all layers") reads [default: all layers], not [default: (all layers)].
    return _TEXT_DEFAULT.sub(r"[default: \1\2", text).replace("-", _NB_HYPHEN)


class _HelpFormatter(TyperCommand.context_class.formatter_class):  # type: ignore[name-defined,misc]
    """Click's help formatter, except that wrapping never breaks a word at a hyphen (``--center-writing-weights``,
    ``exclude_first``, ``no-fold-ln`` and paths stay whole at any width)."""

    def write_dl(self, rows, col_max: int = 30, col_spacing: int = 2) -> None:  # noqa: ANN001
        super().write_dl([(first, _keep_words_whole(second)) for first, second in rows], col_max, col_spacing)

    def write_text(self, text: str) -> None:
        super().write_text(_keep_words_whole(text))

    def getvalue(self) -> str:
        return super().getvalue().replace(_NB_HYPHEN, "-")


class _Context(TyperCommand.context_class):  # type: ignore[name-defined,misc]
    formatter_class = _HelpFormatter


class SaeCommand(TyperCommand):
    """The class of every sub-command (``@app.command(..., cls=SaeCommand)``): plain help as described above, and
    no empty argument (:meth:`parse_args`)."""

    context_class = _Context

    def parse_args(self, ctx, args: list[str]) -> list[str]:  # noqa: ANN001
        """Refuse an empty value (``--out ""``, ``--sae=``): as a path it is the current folder, so ``--out ""``
        wrote results.json and report.html into it, and ``--sae ""`` listed every SAE below it (found by trying it);
        no option of saecircuits takes an empty value."""
        for i, arg in enumerate(args):
            if arg == "" or (arg.startswith("--") and arg.endswith("=")):
                where = arg[:-1] if arg else (args[i - 1] if i and args[i - 1].startswith("-") else "an argument")
                raise UsageError(f"{where} is given an empty value; give a path, a name or a number", ctx=ctx)
        return super().parse_args(ctx, args)


def num(value: Any, spec: str) -> str:
    """A number for the console: ``format(value, spec)``, or 'n/a' when it is missing or NaN (an undefined interval is
    never shown as 0). A value that rounds to zero is printed without a sign ("0.00", not "-0.00" or "+0.00"): the
    sign of a number too small to show means nothing."""
    if value is None or value != value:
        return "n/a"
    text = format(value, spec)
    mantissa = text.split("e")[0].split("E")[0]
    if text[:1] in "+-" and not any(c in "123456789" for c in mantissa) and "inf" not in text:
        return text[1:]
    return text


def one_line(message: str) -> str:
    """``message`` with its whitespace runs (newlines included) collapsed to single spaces."""
    return " ".join(str(message).split())


class InputError(UsageError):
    """A bad setting or input found by the command itself (not by click's parser): one line, exit status 2."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn what a bad setting or input raises into an :class:`InputError` (one line on stderr, exit status 2).

    Caught: the project's own errors (every ``ValueError`` subclass defined in ``saecircuits``: PipelineError,
    ModelLoadError, SAEError, TaskError, CorpusError, ...), invalid JSON, and file-system errors (a missing or
    unreadable file, a folder where a file is needed). Any other exception is a bug and keeps its traceback.
    """
    try:
        yield
    except ClickException:
        raise
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(one_line(str(err))) from err
    except ValueError as err:
        if not type(err).__module__.startswith("saecircuits."):
            raise
        raise InputError(one_line(str(err))) from err


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the OS has one, else the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_threads(n: int | None) -> None:
    """Refuse ``--threads N`` above the cores this process may use (None, the default, is always fine).

    Why: more torch threads than cores oversubscribe them, and every parallel step waits for threads that are not
    running: ``run --threads 1000`` on 2 cores took 4.1x the time of ``--threads 1`` (128 s against 31 s, 20
    prompts of stories260K) and pushed the machine's load average past 100 for everyone else on it.

    Raises:
        InputError: naming the number of cores and the largest value that works.
    """
    cores = usable_cores()
    if n is not None and n > cores:
        raise InputError(f"--threads {n} is more than the {cores} core(s) this process may use; pass --threads "
                         f"{cores} or fewer")


class _SaeGroup(TyperGroup):
    """The root group: rewrites ``--layers 0 1`` (see :func:`expand_multi_value_options`) and prints every usage
    error as one line with exit status 2."""

    context_class = _Context

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        args = expand_multi_value_options(list(sys.argv[1:] if args is None else args))
        if not sys.stderr.isatty():
            # Hugging Face download/"Loading weights" bars redraw with carriage returns; in a log they are noise.
            # Documented switch, read when huggingface_hub is first imported (the commands import it lazily).
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except ClickException as err:
            ctx = getattr(err, "ctx", None)
            if type(err).__name__ == "NoArgsIsHelpError":  # `saecircuits` alone: the help, as click does
                err.show()
                sys.exit(err.exit_code)
            hint = ctx is not None and not isinstance(err, InputError)
            where = f" (see '{ctx.command_path} --help')" if hint else ""
            typer.echo(f"error: {one_line(err.format_message())}{where}", err=True)
            sys.exit(err.exit_code)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="saecircuits",
    cls=_SaeGroup,
    help="Train SAEs on a language model, find the features behind a behaviour, test them causally, report.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"max_content_width": 120, "help_option_names": ["-h", "--help"]},
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
MULTI_VALUE_OPTIONS = ("--layers", "--sae", "--hook")
_NEGATIVE_INT = re.compile(r"-\d+")  # a value (`--layers 0 -1`, refused later with its reason), not an option


# Sub-commands where one of those options takes a single value (`saecircuits feature --sae DIR K`).
SINGLE_VALUE_IN = {"feature": ("--sae", "--hook"), "sae": ("--sae", "--hook")}


def expand_multi_value_options(argv: list[str]) -> list[str]:
    """Rewrite ``--layers 0 1`` as ``--layers 0 --layers 1`` (click options take one value per flag)."""
    command = next((a for a in argv if not a.startswith("-")), None)
    multi = tuple(o for o in MULTI_VALUE_OPTIONS if o not in SINGLE_VALUE_IN.get(command, ()))
    out: list[str] = []
    current: str | None = None
    pending = False  # a flag seen without a value yet: keep it so click reports the missing value
    for arg in argv:
        if arg in multi:
            if pending:
                out.append(current)
            current, pending = arg, True
            continue
        if current is not None and (not arg.startswith("-") or _NEGATIVE_INT.fullmatch(arg)):
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


WAIT_POLICY_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
"""OpenMP settings of how an idle thread waits; when the user sets any of them, the CLI leaves the wait alone."""


def threading_defaults(environ: dict[str, str] | None = None) -> None:
    """Make torch's OpenMP threads sleep while they wait (``OMP_WAIT_POLICY=PASSIVE``) unless the user chose a wait
    (any of :data:`WAIT_POLICY_VARS` set). Call before torch is imported: OpenMP reads it when it loads.

    Why: by default libgomp (torch's OpenMP on Linux) spins up to 300,000 rounds before a waiting thread sleeps, at
    every barrier and between parallel regions. Beside another CPU-bound process the spinning threads take the
    cores the working ones need: the cached demo at 2 threads ran 6x slower beside one busy process on 2 cores.
    Sleeping waits cost little when the machine is quiet (``benchmarks/bench_busy.py`` measures both)."""
    env = os.environ if environ is None else environ
    if not any(env.get(name) for name in WAIT_POLICY_VARS):
        env["OMP_WAIT_POLICY"] = "PASSIVE"


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    threading_defaults()  # before any command imports torch
    _register()
    app(args=argv, prog_name="saecircuits")
