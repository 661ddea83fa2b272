"""The `fashionlab` command: a thin layer over the library. Nothing in the library imports it."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import signal
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer

from fashionlab import stops
from fashionlab.errors import FashionlabError
from fashionlab.provenance import version_line
from fashionlab.text import one_line

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

app = typer.Typer(
    name="fashionlab",
    help="Rigorous, fast deep-learning experiments on Fashion-MNIST.\n\n"
    "Example: fashionlab study   (the bundled seed study: 5-fold CV of six dense networks, "
    "the best retrained and tested, a CNN)\n\n"
    "Example: fashionlab study --help",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="markdown",  # docstrings reflow as paragraphs; [brackets] stay text
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(version_line())
        raise typer.Exit


@app.callback()
def _options(
    version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_print_version,
        help="Print the version (the package's, its installed metadata's) and the code "
        "revision, and exit.")] = False,
) -> None:
    # No docstring: the app's help stays the one given to typer.Typer above.
    pass


# SIGTERM (docker stop, systemd, schedulers) and SIGHUP (a closed terminal) stop a command the
# way Ctrl-C does: the library's cleanup runs (workers stopped, the run left resumable).
# Ctrl-C's too: recorded (`stops.received`), a stop raised inside a finaliser, where Python
# swallows it, is raised again by the training loop.
_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                      if hasattr(signal, name))
_announced: list[bool] = []  # a stop already said in one line (by `resumable`)


def _stop(signum: int, frame: FrameType | None) -> None:
    if stops.heard(signum):  # not a repeated stop (see `stops.heard`), not inside `deferred`
        raise KeyboardInterrupt


def _announce_stop(how: str) -> int:
    """Say in one line what stopped the command; returns its exit status (128 + number)."""
    signum = stops.received[0] if stops.received else signal.SIGINT  # the one that stopped it
    typer.secho(f"stopped by {signal.Signals(signum).name}{how}", fg="yellow", err=True)
    _announced.append(True)
    return 128 + signum


@contextlib.contextmanager
def resumable(how: str, *, goes_on: str = "") -> Iterator[None]:
    """Around a long command: when it is stopped (Ctrl-C, SIGTERM, SIGHUP), one line saying
    how to go on (`goes_on` where other processes train the run on), and the exit status of
    the signal (128 + its number)."""
    try:
        yield
        stops.raise_if_stopped()  # one a finaliser swallowed once training was over
    except KeyboardInterrupt as stopped:
        stops.cleaning_up()
        if goes_on and isinstance(stopped, stops.LeftRunning):
            how = goes_on
        if isinstance(stopped, stops.BeforeTheRun):  # nothing of it is kept, nor to resume
            raise typer.Exit(_announce_stop("")) from None
        raise typer.Exit(_announce_stop(f": {how}")) from None


def _usage_error_line(error: typer.TyperException, argv: Sequence[str]) -> str:
    """A usage error as one line: what is wrong, and where the command's help is."""
    # (pydantic's "Value error, " prefix, which typer passes on for an option's bad choice)
    message = re.sub(r"^(Invalid value for [^:]*: )Value error, ", r"\1",
                     " ".join(error.format_message().split()))
    context = getattr(error, "ctx", None)  # set on click's UsageError and its subclasses
    if context is not None:
        return f"{message} (see '{context.command_path} --help')"
    if error.exit_code == 2:  # a usage error the option parser raised before any context
        # exists (an option without its value): its command is found from the words given
        return f"{message} (see '{_command_path(argv)} --help')"
    return message


def _command_path(argv: Sequence[str]) -> str:
    """"fashionlab runs export": the command words at the start of argv."""
    command, words = typer.main.get_command(app), ["fashionlab"]
    for word in argv:
        command = getattr(command, "commands", {}).get(word)
        if command is None:
            break
        words.append(word)
    return " ".join(words)


def path_named(text: str | Path) -> Path:
    """A path option's or argument's value: refused when empty, which `Path("")` would read
    as the current folder (an unset shell variable, `--run-dir "$RUNS"`, would write there)."""
    if not str(text).strip():
        raise typer.BadParameter("empty: name a folder or file (an unset shell variable?)")
    return Path(text)


def path_text_named(text: str) -> str:
    """`path_named` for a path kept as text (its trailing "/" says "a folder")."""
    path_named(text)
    return str(text)


def print_json(value: object) -> None:
    """What a command prints for scripts (--json): valid JSON whatever the numbers (NaN and
    infinities as null, never the bare NaN that JSON parsers refuse)."""
    import json  # (with serialize's numpy: when a command prints, so --help stays instant)

    from fashionlab.serialize import jsonable

    typer.echo(json.dumps(jsonable(value), indent=2, allow_nan=False))


def output_console(*, highlight: bool = False) -> Console:
    """The console of a command's output (stdout). Markup off: names and paths are text, and
    "[v2]" in a folder's name is no style. Off a terminal (logs, pipes) there is no width to
    respect: tables are not folded, and a sentence stays one line (for grep)."""
    from rich.console import Console

    terminal = sys.stdout.isatty()
    return Console(width=None if terminal else 160, soft_wrap=not terminal,
                   highlight=highlight, markup=False)


def text_table(title: str | None, headers: Sequence[str], rows: Iterable[Sequence[str]]) -> Table:
    """A table of plain-text cells: names and paths are text, never markup, and long cells
    fold rather than being cut."""
    # rich's tables: when a command prints one (`--help` and --json never do)
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title)
    for header in headers:
        table.add_column(header, overflow="fold")
    for cells in rows:
        table.add_row(*(Text(cell) for cell in cells))
    return table


def _register_commands() -> None:
    # Each module adds its commands or sub-groups to `app`; imported here so that
    # `fashionlab --help` lists them all.
    from fashionlab.cli import data, model, runs, search, study  # noqa: F401


def _writable(folder: Path) -> bool:
    """Whether `folder` is, or can be made, a folder this process writes in: matplotlib's own
    test (it makes the folder as it starts, so making it here leaves nothing it would not)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def _private_folder(folder: Path) -> bool:
    """Whether `folder` is a folder, not a link to one, of this user's that no one else may
    write in."""
    try:
        info = os.lstat(folder)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() \
        and not info.st_mode & 0o077


def _matplotlib_home() -> None:
    """Give matplotlib a lasting folder for its settings and font cache where its own (XDG's
    ~/.config and ~/.cache) cannot be written, a container's read-only HOME say: matplotlib
    would make a new temporary one at every start, rebuild the font cache there and warn about
    it in two lines on stderr. The folder is this user's, in the temporary directory."""
    if os.environ.get("MPLCONFIGDIR") or not sys.platform.startswith("linux"):
        return  # chosen by the user; elsewhere matplotlib looks in ~/.matplotlib
    try:
        home = Path.home()
    except RuntimeError:  # no HOME and no password entry
        home = Path("/nonexistent")
    config, cache = (Path(os.environ.get(variable) or home / default) / "matplotlib"
                     for variable, default in (("XDG_CONFIG_HOME", ".config"),
                                               ("XDG_CACHE_HOME", ".cache")))
    if (config / "matplotlibrc").is_file():
        return  # the user's settings: matplotlib must find them, even if it then warns
    if _writable(config) and _writable(cache):
        return
    temporary = Path(tempfile.gettempdir())
    if temporary == Path.cwd():  # no temporary directory at all: not a folder left here
        return
    folder = temporary / f"fashionlab-matplotlib-{os.getuid()}"
    with contextlib.suppress(OSError):
        folder.mkdir(mode=0o700, exist_ok=True)
    if _private_folder(folder):  # not another user's folder (or link) of that name
        os.environ["MPLCONFIGDIR"] = str(folder)


# What the machine or the names given make impossible, said in one line like a bad option: a
# full disk (the output to /dev/full too), a name longer than the file system takes, a
# read-only place or one this user may not write in.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG, errno.EROFS,
                       errno.EACCES, errno.EPERM}


def _environment_error_line(error: OSError) -> str:
    why = error.strerror or str(error)
    return f"{error.filename}: {why}" if error.filename else f"cannot write ({why})"


def _unencodable_name_line(error: UnicodeEncodeError) -> str:
    """A name that is no text in the file system's encoding: bytes that are not UTF-8 in a
    path (Python holds them as surrogates), or a non-ASCII name in the C locale with UTF-8
    mode off (PYTHONUTF8=0)."""
    name = error.object[max(0, error.start - 30) : error.end + 30]
    shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return (f"cannot use the name ...{shown}...: it holds characters the file system's "
            f"{error.encoding} cannot encode; use UTF-8 names in a UTF-8 locale")


def _discard_output() -> None:
    """Point the standard output at /dev/null once writing to it failed, so that the
    interpreter's last flush of what is still buffered fails no more (a second message)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)


def _replace_what_cannot_be_encoded(stream: object) -> None:
    """An output in an encoding without the tables' characters ("±", "·"; ASCII in the C
    locale with PYTHONUTF8=0) shows them as "?" instead of failing once the work is done."""
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        "±·…".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        with contextlib.suppress(AttributeError, ValueError):  # not a text file: left as is
            stream.reconfigure(errors="replace")  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script; user-fixable errors exit 2 with one line."""
    if sys.stdout is None:  # started with its output closed (`>&-`): nothing can be said
        if sys.stderr is not None:
            sys.stderr.write("error: the standard output is closed; send it to a file or to "
                             "/dev/null\n")
        sys.exit(2)
    try:
        os.getcwd()
    except FileNotFoundError:  # every relative path, and even torch's libraries, would fail
        sys.stderr.write("error: the current folder no longer exists (it was deleted or moved "
                         "away): cd to a folder that exists\n")
        sys.exit(2)
    for stream in (sys.stdout, sys.stderr):
        _replace_what_cannot_be_encoded(stream)
    if sys.stdin is None:  # started with its input closed (`<&-`): a question reads its end
        sys.stdin = open(os.devnull)  # noqa: SIM115 - the process's input, open until it exits
    # First of all, so that a stop during the imports or while a command reads its input
    # is said in one line too, not as a traceback or a silent exit.
    stops.forget()  # what an earlier call in this process (a test, a notebook) heard
    _announced.clear()
    previous = {signum: signal.getsignal(signum) for signum in _STOP_SIGNALS}
    unraisable = sys.unraisablehook
    sys.unraisablehook = functools.partial(stops.quiet_swallowed_stop, unraisable)
    stops.recording.append(True)
    for signum, handler in previous.items():
        # An ignored signal stays ignored: `nohup` ignores SIGHUP so that the command outlives
        # its terminal, and a shell ignores SIGINT in its background jobs.
        if handler is not signal.SIG_IGN:
            signal.signal(signum, _stop)
    _matplotlib_home()  # read when matplotlib is imported
    args = sys.argv[1:] if argv is None else argv
    try:
        _register_commands()
        # Not standalone: typer hands back usage errors (an unknown option, a missing or bad
        # argument) to be said in one line like every other error, not as a boxed panel,
        # and returns the status of a `typer.Exit` instead of exiting.
        status = app(args=args, prog_name="fashionlab", standalone_mode=False)
        sys.stdout.flush()  # a full disk is said here, not as the interpreter exits
    except FashionlabError as error:
        # One line, whatever a path or key quoted in it holds (a newline, a terminal escape).
        typer.secho(f"error: {one_line(str(error))}", fg="red", err=True)
        sys.exit(2)
    except typer.TyperException as error:  # click's usage errors derive from it
        if error.format_message().strip():  # blank: a group called bare, its help printed
            typer.secho(f"error: {one_line(_usage_error_line(error, args))}", fg="red",
                        err=True)
        sys.exit(error.exit_code)
    except typer.Abort:  # "no" (or end of input, or a stop) at a confirmation prompt
        if stops.received:  # click turns the signal's KeyboardInterrupt into Abort
            sys.exit(_announce_stop(""))
        typer.secho("aborted", fg="yellow", err=True)
        sys.exit(1)
    except KeyboardInterrupt:  # during the imports, before the command started
        sys.exit(_announce_stop(""))
    except OSError as error:
        if error.errno not in _ENVIRONMENT_ERRNOS:
            raise
        if error.filename is None:
            _discard_output()
        typer.secho(f"error: {one_line(_environment_error_line(error))}", fg="red", err=True)
        sys.exit(2)
    except UnicodeEncodeError as error:
        if "surrogate" not in error.reason and error.encoding != "ascii":
            raise
        typer.secho(f"error: {one_line(_unencodable_name_line(error))}", fg="red", err=True)
        sys.exit(2)
    else:
        # typer turns a KeyboardInterrupt outside `resumable` into a silent status 130; a
        # stop a finaliser swallowed where nothing checked again is said too, not lost.
        if (status == 130 or stops.received) and not _announced:
            status = _announce_stop("")
        sys.exit(status if isinstance(status, int) else 0)
    finally:
        # The command is over: the handlers it found are back (in a fresh process, SIGTERM's
        # and SIGHUP's default: a stop while the interpreter shuts down ends it the default
        # way, not with a KeyboardInterrupt in some finaliser).
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        sys.unraisablehook = unraisable
        stops.recording.pop()
        stops.forget()  # the library, called next in this process, is not stopped
        stops.handled.clear()
