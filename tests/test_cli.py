"""The command line as a whole: every command's help, and --version."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import typer
from helpers import assert_one_line_error, run_cli, tiny_search_toml, tiny_study_toml

import fashionlab
from fashionlab import cli, stops
from fashionlab.cli import app
from fashionlab.errors import StoreError
from fashionlab.store import Store

Group = typer.core.TyperGroup  # typer's own click (vendored since 0.2x)


def _commands(group: Group, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for name, command in group.commands.items():
        found.append((*path, name))
        if isinstance(command, Group):
            found += _commands(command, (*path, name))
    return found


def test_every_help_shows_its_example_with_its_placeholders(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("COLUMNS", "200")  # one example, one line
    code, out, _ = run_cli(capsys, "--help")  # registers every command
    assert code == 0 and "Example: fashionlab study" in out
    commands = _commands(typer.main.get_command(app))
    assert {("study",), ("search",), ("evaluate",), ("predict",), ("export",),
            ("runs", "show"), ("data", "fetch")} <= set(commands)
    for command in commands:
        code, out, err = run_cli(capsys, *command, "--help")
        assert code == 0, (command, err)
        examples = [line for line in out.splitlines() if "Example: fashionlab " in line]
        assert examples, (command, out)
        for line in examples:
            # a placeholder lost by the markdown formatter leaves "runs//models"
            assert not re.search(r"(?<![:/])//", line), (command, line)  # :// is a URL
            assert f"fashionlab {' '.join(command)}" in line, (command, line)
    _, out, _ = run_cli(capsys, "evaluate", "--help")
    assert "fashionlab-runs/RUN_ID/models/cnn" in out


def test_version_prints_the_package_and_installed_versions(capsys: pytest.CaptureFixture[str]):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0
    assert out.startswith(f"fashionlab {fashionlab.__version__} ")
    assert f"installed metadata: {metadata.version('fashionlab')}" in out
    assert out.count("\n") == 1


def test_python_dash_m_runs_the_command_line(tmp_path: Path):
    """`python -m fashionlab`: where the script is not on PATH (an environment not activated)."""
    done = subprocess.run([sys.executable, "-m", "fashionlab", "runs", "list", "--run-dir",
                           str(tmp_path / "none")], check=False, capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"error: no store at {tmp_path / 'none'}")
    assert done.stderr.count("\n") == 1


def _command(*args: str, stdout: str = "") -> subprocess.CompletedProcess[str]:
    """The command in a shell, its standard output sent to `stdout` (`>/dev/full`, `>&-`)."""
    line = " ".join([shlex.quote(sys.executable), "-m", "fashionlab",
                     *map(shlex.quote, args), stdout])
    return subprocess.run(["bash", "-c", line], check=False, capture_output=False,
                          stderr=subprocess.PIPE, text=True)


def test_an_output_that_cannot_be_written_is_one_line(tiny_idx_dir: Path):
    """A full disk under the output (/dev/full) and an output closed from the start."""
    for args in (("data", "info", "--dir", str(tiny_idx_dir), "--no-verify"),
                 ("data", "info", "--dir", str(tiny_idx_dir), "--no-verify", "--json")):
        full = _command(*args, stdout=">/dev/full")
        assert full.returncode == 2, full.stderr
        assert full.stderr == "error: cannot write (No space left on device)\n"
        closed = _command(*args, stdout=">&-")
        assert closed.returncode == 2, closed.stderr
        assert closed.stderr == ("error: the standard output is closed; send it to a file or "
                                 "to /dev/null\n")


def test_names_the_file_system_refuses_are_one_line(
        tiny_idx_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    too_long = "a" * 300 + ".png"  # a name may be 255 bytes
    code, _, err = run_cli(capsys, "data", "show", "--out", str(tmp_path / too_long),
                           "--dir", str(tiny_idx_dir), "--no-verify")
    assert_one_line_error(code, err, f"{too_long}: File name too long")
    study = tmp_path / "tiny.toml"
    study.write_text(tiny_study_toml(tiny_idx_dir, epochs=1, final=False))
    latin1 = tmp_path / "lat\udce9in"  # the byte 0xe9, not UTF-8, as Python holds it
    latin1.mkdir()
    code, _, err = run_cli(capsys, "study", str(study), "--run-dir", str(latin1 / "runs"))
    assert_one_line_error(code, err, "lat\\xe9in/runs: the run directory's name is not UTF-8 "
                          "text, which the store cannot record")
    assert list(latin1.iterdir()) == []  # refused before anything is made: no empty store


@pytest.mark.parametrize(("args", "says"), [
    (("study", "--bogus"), "No such option: --bogus (see 'fashionlab study --help')"),
    (("runs", "show"), "Missing argument 'run'. (see 'fashionlab runs show --help')"),
    (("data", "show", "--per-class", "0"), "'--per-class'"),
    (("study", "a.toml", "b.toml"), "unexpected extra argument"),
    (("nosuchcommand",), "No such command 'nosuchcommand'"),
    # raised by the option parser, before click has a context naming the command
    (("study", "--seed"), "Option '--seed' requires an argument. (see 'fashionlab study --help')"),
    (("runs", "export", "x", "--to"),
     "Option '--to' requires 2 arguments. (see 'fashionlab runs export --help')"),
])
def test_a_usage_error_is_one_line_naming_the_commands_help(
        args, says, capsys: pytest.CaptureFixture[str]):
    code, out, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, says)
    assert out == "" and "╭" not in err  # no boxed panel


@pytest.mark.parametrize("args", [
    ["study", "--run-dir", ""], ["search", "--run-dir", " "], ["runs", "list", "--run-dir", ""],
    ["data", "fetch", "--dir", ""], ["data", "show", "--out", ""], ["evaluate", ""],
    ["predict", "model", ""], ["export", "model", "--out", ""], ["report", "x", "--out", ""]])
def test_an_empty_path_is_refused_not_read_as_the_current_folder(
        args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)  # where Path("") would have written
    code, out, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, "empty: name a folder or file")
    assert out == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [
    ["study", "tiny.toml"], ["search", "tiny.toml"], ["runs", "list"], ["runs", "show", "x"]])
@pytest.mark.parametrize("url", ["", " "])
def test_an_empty_store_url_is_refused_not_read_as_the_local_store(
        args: list[str], url: str, tiny_idx_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """`--store "$DB_URL"` with the variable unset: a machine meant to join a shared run
    trained alone in its local store."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.toml").write_text(tiny_search_toml(tiny_idx_dir, n_trials=1))
    code, out, err = run_cli(capsys, *args, "--store", url)
    assert_one_line_error(code, err, "the store URL is empty: give a database URL, or none for "
                          "the run directory's SQLite store (an unset shell variable?)")
    assert out == "" and sorted(p.name for p in tmp_path.iterdir()) == ["tiny-idx", "tiny.toml"]
    with pytest.raises(StoreError, match="the store URL is empty"):  # the library too
        Store.open(tmp_path, url)


@pytest.mark.skipif(sys.platform == "win32", reason="Windows cannot delete a folder in use")
def test_a_current_folder_that_was_deleted_is_one_line(tmp_path: Path):
    gone = tmp_path / "gone"
    gone.mkdir()

    def leave_it_deleted() -> None:  # in the child, before it runs: `cd gone; rmdir ../gone`
        os.chdir(gone)
        os.rmdir(gone)

    done = subprocess.run([sys.executable, "-c", "from fashionlab.console import main; main()",
                           "runs", "list"], capture_output=True, text=True, timeout=60,
                          check=False, preexec_fn=leave_it_deleted)
    assert done.returncode == 2 and done.stderr == (
        "error: the current folder no longer exists (it was deleted or moved away): cd to a "
        "folder that exists\n")


@pytest.mark.skipif(sys.platform != "linux", reason="the C locale's ASCII is Linux's")
def test_the_c_locale_without_utf8_mode_shows_the_tables_and_says_what_to_change(
        tiny_idx_dir: Path, tmp_path: Path):
    # LC_ALL=C with UTF-8 mode off: the standard output is ASCII, and a name that is not ASCII
    # reaches Python as bytes it could not read as text.
    study = tmp_path / "tiny.toml"
    study.write_text(tiny_study_toml(tiny_idx_dir, epochs=1, final=False))
    environment = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0"}
    environment.pop("PYTHONIOENCODING", None)
    command = [sys.executable, "-c", "from fashionlab.console import main; main()"]
    done = subprocess.run([*command, "study", str(study), "--run-dir", str(tmp_path / "runs")],
                          capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=300, check=False, env=environment)
    assert done.returncode == 0, done.stderr
    assert "small L2" in done.stdout and "? 0." in done.stdout  # "±" shown as "?"
    done = subprocess.run([*command, "runs", "list", "--run-dir", str(tmp_path / "runs-é")],
                          capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=60, check=False, env=environment)
    assert done.returncode == 2
    assert done.stderr.endswith("the run directory's name is not ASCII, and this locale reads "
                                "only ASCII names as text: run in a UTF-8 locale "
                                "(LANG=C.UTF-8) or with PYTHONUTF8=1\n"), done.stderr
    assert not (tmp_path / "runs-é").exists()


def test_a_sentence_off_a_terminal_stays_one_line(capsys: pytest.CaptureFixture[str]):
    # A log or a pipe: no width to fold it to (grep finds the whole line).
    sentence = " ".join(["this worker is done; other workers are still running trials"] * 5)
    cli.output_console().print(sentence)
    assert capsys.readouterr().out == sentence + "\n"


def test_a_group_called_bare_prints_its_help_and_nothing_else(
        capsys: pytest.CaptureFixture[str]):
    code, out, err = run_cli(capsys, "runs")
    assert code == 2 and "fashionlab runs list" in out and err == ""


@pytest.mark.parametrize(("url", "says"), [
    ("postgresql://ann:s3cret@db.lab:abc/runs", "its port is not a number"),
    ("mysql://ann:s3cret@db.lab/runs", "its database driver is not installed"),
    ("not a url", "Could not parse"),
    ("https://ann:s3cret@db.lab/runs",  # not SQLAlchemy's "Can't load plugin"
     "'https' names no database SQLAlchemy knows (a store is sqlite:///PATH, postgresql://"),
])
@pytest.mark.parametrize("command", ["study", "search"])
def test_a_store_url_that_cannot_be_opened_is_one_line_without_its_password(
        command: str, url: str, says: str, tiny_idx_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]):
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_search_toml(tiny_idx_dir, n_trials=1))
    code, _, err = run_cli(capsys, command, str(path), "--store", url)
    assert_one_line_error(code, err, "cannot open the store", says)
    assert "s3cret" not in err


def _signal_itself(where: str, *args: str,
                   signum: int = signal.SIGTERM) -> subprocess.CompletedProcess:
    """Run `fashionlab ARGS` in a fresh interpreter that sends itself `signum` at `where`:
    "imports" (while the commands are imported), "reading" (while the study command reads its
    file, before any run exists), "loading" (while `study` or `search` loads the data, before
    its run exists), "finaliser" (in a __del__, after the first stored epoch),
    "finishing" (in a __del__, once training is over, as the report is written), "twice"
    (after the first stored epoch, and again in a __del__ while the run is marked
    interrupted) or "teardown" (after the command, while the interpreter exits)."""
    script = f"""
import atexit, os, sys, time
import fashionlab.cli as cli
import fashionlab.cli.study as study_cli

def signal_itself(*args, **kwargs):
    os.kill(os.getpid(), {int(signum)})
    time.sleep(5)  # the handler interrupts this

where = {where!r}
if where == "finaliser":
    # The handler's KeyboardInterrupt is raised inside a __del__, where Python prints
    # "Exception ignored" and carries on.
    # Once, in the main thread: after the first stored epoch (trained here) or the first
    # events forwarded from the workers.
    import fashionlab.runner, fashionlab.store

    class Finalised:
        def __del__(self):
            os.kill(os.getpid(), {int(signum)})
            time.sleep(1)  # the handler interrupts this

    done = []

    def then_stop(function):
        def wrapped(*args, **kwargs):
            result = function(*args, **kwargs)
            if not done:
                done.append(True)
                Finalised()  # dropped at once
            return result
        return wrapped

    fashionlab.store.Store.record_epochs = then_stop(fashionlab.store.Store.record_epochs)
    fashionlab.runner.forward = then_stop(fashionlab.runner.forward)
elif where == "finishing":
    # Nothing checks for a stop any more: it was lost, the command exiting 0.
    import fashionlab.study.run as run_module

    class Finalised:
        def __del__(self):
            os.kill(os.getpid(), {int(signum)})
            time.sleep(1)  # the handler interrupts this

    report = run_module.write_report

    def dropping_one_first(*args, **kwargs):
        Finalised()  # dropped at once
        return report(*args, **kwargs)

    run_module.write_report = dropping_one_first
elif where == "twice":
    # The stop again while the first one's cleanup runs (Ctrl-C pressed twice), landing in a
    # finaliser: it must not be raised there.
    import fashionlab.store

    class Finalised:
        def __del__(self):
            os.kill(os.getpid(), {int(signum)})
            time.sleep(0.5)

    first = []
    record, end = fashionlab.store.Store.record_epochs, fashionlab.store.Store.end_run

    def then_stop(*args, **kwargs):
        record(*args, **kwargs)
        if not first:
            first.append(True)
            os.kill(os.getpid(), {int(signum)})
            time.sleep(5)  # the handler interrupts this

    def ending(*args, **kwargs):
        Finalised()  # dropped at once
        return end(*args, **kwargs)

    fashionlab.store.Store.record_epochs = then_stop
    fashionlab.store.Store.end_run = ending
elif where == "imports":
    cli._register_commands = signal_itself
elif where == "reading":
    study_cli.load_study = signal_itself
elif where == "loading":
    import fashionlab.search.loop, fashionlab.study.run
    fashionlab.study.run.load_study_data = signal_itself
    fashionlab.search.loop.load_study_data = signal_itself
else:
    def signal_itself_while_exiting():
        os.kill(os.getpid(), {int(signum)})
        time.sleep(0.5)  # what a default action would interrupt
    atexit.register(signal_itself_while_exiting)
sys.argv = ["fashionlab", *{list(args)!r}]
from fashionlab.console import main
main()
"""
    return subprocess.run([sys.executable, "-c", script], check=False, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("where", ["imports", "reading"])
def test_a_stop_before_the_command_starts_is_one_line_with_the_signals_status(where, tmp_path):
    done = _signal_itself(where, "study", "--run-dir", str(tmp_path / "runs"))
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert done.stderr == "stopped by SIGTERM\n"
    assert not (tmp_path / "runs").exists()  # nothing was created


def test_ctrl_c_while_the_command_line_loads_is_one_line_too(tmp_path):
    # A Ctrl-C lands in the ~0.1 s the console script spends importing typer and rich, before
    # the command's own handling is in place: made certain here by an import that raises it.
    script = """
import sys

class Interrupting:
    def find_spec(self, name, path=None, target=None):
        if name == "fashionlab.cli":
            raise KeyboardInterrupt

sys.meta_path.insert(0, Interrupting())
sys.argv = ["fashionlab", "--version"]
from fashionlab.console import main
main()
"""
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 128 + signal.SIGINT, done.stderr
    assert done.stderr == "stopped by SIGINT\n"
    assert done.stdout == ""


@pytest.mark.parametrize("command", ["study", "search"])
def test_a_stop_before_the_run_exists_says_nothing_is_kept(command, tiny_idx_dir: Path,
                                                           tmp_path: Path):
    # While the data loads (or the store opens, a server that never answers): no run to keep
    # or resume, so not "the run is kept" (nor a search's "finished trials are kept").
    study = tmp_path / "tiny.toml"
    study.write_text(tiny_search_toml(tiny_idx_dir, n_trials=2) if command == "search"
                     else tiny_study_toml(tiny_idx_dir, final=False))
    done = _signal_itself("loading", command, str(study), "--run-dir", str(tmp_path / "runs"),
                          signum=signal.SIGINT)
    assert done.returncode == 128 + signal.SIGINT, done.stderr
    assert done.stderr == "stopped by SIGINT\n"
    assert not (tmp_path / "runs").exists()  # nothing was created


def test_ctrl_c_while_reading_the_study_is_one_line_too(tmp_path):
    done = _signal_itself("reading", "study", "--run-dir", str(tmp_path / "runs"),
                          signum=signal.SIGINT)
    assert done.returncode == 128 + signal.SIGINT, done.stderr
    assert done.stderr == "stopped by SIGINT\n"


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_that_a_finaliser_swallows_still_stops_the_study(
        signum, workers, tiny_idx_dir: Path, tmp_path: Path):
    study = tmp_path / "tiny.toml"
    study.write_text(tiny_study_toml(tiny_idx_dir, epochs=30, final=False))
    done = _signal_itself("finaliser", "study", str(study), "--run-dir", str(tmp_path),
                          "--workers", workers, signum=signum)
    name = signal.Signals(signum).name
    assert done.returncode == 128 + signum, done.stderr
    assert f"stopped by {name}: the run is kept" in done.stderr
    assert "Exception ignored" not in done.stderr  # recorded, and raised again by training
    store = Store.open(tmp_path, create=False)
    (run,) = store.runs()
    store.close()
    assert run.state == "interrupted"  # not trained on to the end


def test_a_stop_that_a_finaliser_swallows_once_training_is_over_is_said(
        tiny_idx_dir: Path, tmp_path: Path):
    # It was lost: "Exception ignored in ..." and a traceback, then exit 0 as if nothing came.
    study = tmp_path / "tiny.toml"
    study.write_text(tiny_study_toml(tiny_idx_dir, epochs=2, final=False))
    done = _signal_itself("finishing", "study", str(study), "--run-dir", str(tmp_path),
                          "--workers", "1", signum=signal.SIGINT)
    assert done.returncode == 128 + signal.SIGINT, done.stderr
    assert done.stderr.endswith("\nstopped by SIGINT: the run is kept; run the same command "
                                "again to resume it\n")  # after the progress lines
    assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_repeated_during_the_first_ones_cleanup_is_one_line_too(
        signum, tiny_idx_dir: Path, tmp_path: Path):
    study = tmp_path / "tiny.toml"
    study.write_text(tiny_study_toml(tiny_idx_dir, epochs=30, final=False))
    done = _signal_itself("twice", "study", str(study), "--run-dir", str(tmp_path),
                          "--workers", "1", "-q", signum=signum)
    name = signal.Signals(signum).name
    assert done.returncode == 128 + signum, done.stderr
    assert done.stderr == f"stopped by {name}: the run is kept; run the same command again " \
                          "to resume it\n"
    store = Store.open(tmp_path, create=False)
    (run,) = store.runs()
    store.close()
    assert run.state == "interrupted"  # the cleanup went to its end


def test_which_repeated_stops_are_only_recorded(monkeypatch: pytest.MonkeyPatch):
    clock = [100.0]
    monkeypatch.setattr(stops.time, "monotonic", lambda: clock[0])

    def stop_at(seconds: float) -> bool:
        """Whether the handler raised, for a signal `seconds` after the start."""
        clock[0] = 100.0 + seconds
        try:
            cli._stop(signal.SIGINT, None)
        except KeyboardInterrupt:
            return True
        return False

    def fresh() -> None:
        stops.forget()

    try:
        fresh()
        assert stop_at(0) and not stop_at(0.5)  # pressed twice: the first is unwinding
        assert stop_at(2)  # no cleanup caught the first (a finaliser swallowed it): raised
        fresh()
        assert stop_at(0)
        stops.cleaning_up()  # the run is being left resumable: not cut short
        assert not stop_at(2) and not stop_at(4.9)
        assert stop_at(5.5)  # a cleanup that hangs can still be stopped
        assert stops.received == [signal.SIGINT] * 4
    finally:
        fresh()


def test_a_stop_that_leaves_the_run_to_others_is_said_so(capsys: pytest.CaptureFixture[str]):
    try:
        for raised, said in ((KeyboardInterrupt(), "kept"), (stops.LeftRunning(), "goes on")):
            with pytest.raises(typer.Exit) as ended, \
                    cli.resumable("kept", goes_on="goes on"):
                raise raised
            assert ended.value.exit_code == 128 + signal.SIGINT
            assert capsys.readouterr().err == f"stopped by SIGINT: {said}\n"
    finally:
        stops.handled.clear()
        cli._announced.clear()


def test_a_stop_while_locks_are_held_is_raised_once_they_are_let_go():
    # Raised inside concurrent.futures.wait, a stop can leave a future's lock held, and the
    # pool's shutdown then waits forever: the workers' loop defers it.
    ended: list[str] = []
    try:
        stops.received.clear()
        stops.stopping_since.clear()
        with pytest.raises(KeyboardInterrupt), stops.deferred():
            cli._stop(signal.SIGTERM, None)  # only recorded
            ended.append("block")
        assert ended == ["block"] and stops.received == [signal.SIGTERM]
        assert not stops.deferring
        stops.stopping_since.clear()  # not a second press of the same stop
        with pytest.raises(KeyboardInterrupt):  # outside a deferred block: raised at once
            cli._stop(signal.SIGTERM, None)
    finally:
        stops.received.clear()
        stops.stopping_since.clear()


def test_a_signal_ignored_when_the_command_starts_stays_ignored(tiny_idx_dir: Path,
                                                               tmp_path: Path):
    # `nohup fashionlab study` ignores SIGHUP: the study outlives its closed terminal.
    study = tmp_path / "tiny.toml"
    study.write_text(tiny_study_toml(tiny_idx_dir, epochs=1, final=False))
    script = f"""
import os, signal
import fashionlab.cli as cli
import fashionlab.cli.study as study_cli

signal.signal(signal.SIGHUP, signal.SIG_IGN)
read = study_cli.load_study

def hung_up_then_read(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGHUP)  # the terminal closes
    return read(*args, **kwargs)

study_cli.load_study = hung_up_then_read
cli.main(["study", {str(study)!r}, "--run-dir", {str(tmp_path)!r}, "--workers", "1", "-q"])
"""
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    store = Store.open(tmp_path, create=False)
    (run,) = store.runs()
    store.close()
    assert run.state == "finished"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_while_the_interpreter_exits_ends_it_with_the_commands_status(
        signum: int, tmp_path: Path):
    # Not a KeyboardInterrupt raised in some finaliser ("Exception ignored in ..."), nor a
    # death by the signal (Ctrl-C pressed twice: the second one lands here).
    done = _signal_itself("teardown", "--version", signum=signum)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("fashionlab ")
    assert done.stderr == ""
    done = _signal_itself("teardown", "runs", "list", "--run-dir", str(tmp_path / "none"),
                          signum=signum)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: no store at ") and done.stderr.count("\n") == 1


@pytest.mark.parametrize("command", ["study", "search"])
@pytest.mark.parametrize("workers", ["0", "abc", "\u00b2", "\u0663"])  # superscript 2, Arabic 3
def test_a_bad_workers_count_is_one_line(command: str, workers: str,
                                         capsys: pytest.CaptureFixture[str]):
    code, _, err = run_cli(capsys, command, "--workers", workers)
    assert_one_line_error(code, err, f"Invalid value for '--workers': expected a positive "
                          f"number or auto, got '{workers}' (see 'fashionlab {command} --help')")
