"""Helpers every click CLI of the project uses: logging set-up and error-to-exit-code translation.

Use `run_cli(fn, *args, **kwargs)` inside a click command: it calls the library function and turns
a `ReweightOODError` (bad input the user can fix) into one line on stderr and exit status 2, and
Ctrl-C into exit status 130, instead of a traceback. An error about a field that is also an option
of the running command (field 'batch_size' -> --batch-size) names the option, so the user reads the
flag they typed, not a library argument. Declare commands with `cls=Command` so that click's own
usage errors (unknown option, bad choice) are one `error:` line with status 2 too.
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Callable, TypeVar

import click

from .errors import ReweightOODError

__all__ = ["run_cli", "setup_logging", "Command", "Group", "PROJECT_LOGGERS", "error_message"]

T = TypeVar("T")

# The loggers of this project's packages: `-v` turns on their DEBUG lines, and only theirs.
PROJECT_LOGGERS = ("detector_server", "trainer", "exporter", "reweightood", "bench", "__main__")


def setup_logging(verbose: bool = False, tag: str = "") -> None:
    """Log to stderr with a short format at INFO; `verbose` adds this project's DEBUG lines.
    `tag` ("worker 1") goes in every line, to tell processes apart in one log.

    Other libraries stay at INFO either way: their DEBUG output (Pillow lists every image plugin
    it imports, hundreds of lines) says nothing about a run.
    """
    where = f"[{tag}] " if tag else ""
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s %(levelname)s {where}%(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger().setLevel(logging.INFO)
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.NOTSET)
    # faiss logs which SIMD build it loaded, six lines before anything useful
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


class Command(click.Command):
    """A click command whose usage errors print `error: <message> (see --help)` and exit 2.

    Every command of the project takes -h as well as --help and wraps its help at 100 columns;
    `context_settings` given to the decorator add to (or override) these.
    """

    CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

    def __init__(self, *args: Any, context_settings: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, context_settings={**self.CONTEXT_SETTINGS,
                                                  **(context_settings or {})}, **kwargs)

    def main(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("standalone_mode", True) is False:
            return super().main(*args, **kwargs)
        try:
            return super().main(*args, **{**kwargs, "standalone_mode": False})
        except click.UsageError as e:
            click.echo(f"error: {e.format_message()} (see --help)", err=True)
            sys.exit(2)
        except click.exceptions.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)


class Group(Command, click.Group):
    """A click group (a command with subcommands, e.g. `rwood-bank add|remove|info`) that behaves
    as `Command` does; its subcommands are `Command`s."""

    command_class = Command


def _option_for(field: str | None) -> str | None:
    """The long flag of the running click command's option for `field` (None if none): the option
    whose parameter name is `field`, or whose flag is `--field` (`--search`, stored as
    `search_params`)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None or not field:
        return None
    flag = "--" + field.replace("_", "-")
    for p in ctx.command.params:
        if isinstance(p, click.Option) and (p.name == field.replace("-", "_") or flag in p.opts):
            return max(p.opts, key=len)
    return None


def error_message(e: ReweightOODError) -> str:
    """`e` as one line, its field named by the command's flag where it has one (and no path says
    the value came from elsewhere, such as a config file)."""
    flag = _option_for(e.field) if e.path is None else None
    if flag is None:
        return str(e)
    return f"{flag}: {e.message}"


def run_cli(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call `fn`; exit 2 with a one-line message on ReweightOODError, 130 on KeyboardInterrupt."""
    try:
        return fn(*args, **kwargs)
    except ReweightOODError as e:
        click.echo(f"error: {error_message(e)}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
