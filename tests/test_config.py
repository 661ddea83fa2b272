"""Study files: the bundled studies, TOML round trips, and clear errors for bad files."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from pathlib import Path

import pytest
from helpers import assert_one_line_error, run_cli, tiny_study_toml

from fashionlab.config import (
    N_CLASSES,
    Augment,
    ConvLayer,
    DenseLayer,
    ModelSpec,
    bundled_studies,
    derived,
    load_study,
    quick_variant,
    study_from_dict,
    study_to_toml,
)
from fashionlab.config.specs import layer_parameters
from fashionlab.cv import make_folds
from fashionlab.data import CLASS_NAMES
from fashionlab.errors import ConfigError
from fashionlab.store import Store

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def test_seed_study_states_the_original_protocol():
    spec = load_study("seed")
    assert [c.name for c in spec.candidates] == [
        "dense(64)", "dense(64) L2", "dense(64) dropout", "dense(256) dropout",
        "dense(64)x2 dropout", "dense(256)x2 dropout"]
    train = spec.candidates[0].train
    assert (train.epochs, train.batch_size, train.optimizer, train.learning_rate, train.eps) == (
        40, 128, "adam", 1e-3, 1e-7)
    assert spec.candidates[1].model.layers[0].l2 == 0.001
    assert spec.candidates[3].model.layers[0].dropout == 0.4
    assert (spec.cv.n_splits, spec.cv.strategy) == (5, "contiguous")
    assert (spec.warning.patience, spec.warning.min_delta) == (10, 0.02)
    cnn = spec.final[0]
    assert [c.filters for c in cnn.model.conv] == [32, 64, 64]
    assert cnn.model.dropout == 0.3 and cnn.train.epochs == 30
    assert "seed" in bundled_studies()


def test_every_bundled_study_loads_and_round_trips():
    for name in bundled_studies():
        spec = load_study(name)
        assert study_from_dict(tomllib.loads(study_to_toml(spec))) == spec
        assert quick_variant(spec).name.endswith("-quick")


def test_settings_added_later_keep_a_study_fingerprint_at_their_old_meaning():
    """A study stored before `tta`, `ema`, `norm_after_pool`, `erase`, `residual` and `init`
    existed keeps its fingerprint (its runs resume and compare as the same study); setting any
    of them changes it."""
    import hashlib
    import json

    spec = load_study("seed")
    old = spec.to_dict()
    for candidate in old["candidates"] + old["final"]:
        del candidate["model"]["tta"], candidate["train"]["ema"]
        del candidate["train"]["augment"]["erase"]
        for layer in candidate["model"]["conv"]:
            del layer["norm_after_pool"], layer["residual"]
        del candidate["model"]["init"]
    assert any(final["model"]["conv"] for final in old["final"])  # the seed study's CNN
    text = json.dumps(old, sort_keys=True, default=str)
    assert spec.fingerprint() == hashlib.sha256(text.encode()).hexdigest()[:12]
    first = spec.candidates[0]
    for changed in (dataclasses.replace(first.model, tta="flip"),
                    dataclasses.replace(first.train, ema=0.99),
                    dataclasses.replace(first.train, augment=Augment(erase=0.5))):
        field = "model" if isinstance(changed, ModelSpec) else "train"
        other = dataclasses.replace(spec, candidates=(dataclasses.replace(first, **{field: changed}),
                                                      *spec.candidates[1:]))
        assert other.fingerprint() != spec.fingerprint()
    cnn = next(final for final in spec.final if final.model.conv)
    normed = (ConvLayer(4, batch_norm=True, pool=2, norm_after_pool=True),)
    other = dataclasses.replace(spec, final=(dataclasses.replace(
        cnn, model=dataclasses.replace(cnn.model, conv=normed)),))
    plain = dataclasses.replace(spec, final=(dataclasses.replace(
        cnn, model=dataclasses.replace(cnn.model, conv=(ConvLayer(4, batch_norm=True, pool=2),))),))
    assert other.fingerprint() != plain.fingerprint()
    residual = dataclasses.replace(spec, final=(dataclasses.replace(
        cnn, model=dataclasses.replace(cnn.model, conv=(
            ConvLayer(4, padding="same"), ConvLayer(4, padding="same", residual=True)))),))
    unconnected = dataclasses.replace(spec, final=(dataclasses.replace(
        cnn, model=dataclasses.replace(cnn.model, conv=(
            ConvLayer(4, padding="same"), ConvLayer(4, padding="same")))),))
    assert residual.fingerprint() != unconnected.fingerprint()
    torch_init = dataclasses.replace(spec, final=(dataclasses.replace(
        cnn, model=dataclasses.replace(cnn.model, init="pytorch")),))
    assert torch_init.fingerprint() != spec.fingerprint()


@pytest.mark.parametrize("epochs", ['"warning"', '"lowest"', "30", "5"])
def test_a_quick_variant_keeps_a_retrain_rule_and_caps_a_count(epochs: str):
    spec = study_from_dict(tomllib.loads(f'name = "x"\n[retrain]\nepochs = {epochs}\n{ENTRY}'))
    quick = quick_variant(spec).retrain.epochs
    assert quick == (epochs.strip('"') if epochs.startswith('"') else min(int(epochs), 8))


def test_a_quick_searchs_budget_is_what_its_trials_cost_on_its_own_folds():
    """--quick caps a fold-epoch budget at 6 trials x 8 epochs x the study's folds."""
    spec = load_study("search")
    assert spec.search is not None and spec.cv.n_splits == 5
    assert quick_variant(spec).search.budget == 6 * 8 * 5
    three = dataclasses.replace(spec, cv=dataclasses.replace(spec.cv, n_splits=3))
    assert quick_variant(three).search.budget == 6 * 8 * 3


def test_fingerprint_changes_with_any_setting():
    spec = load_study("seed")
    other = study_from_dict({**tomllib.loads(study_to_toml(spec)), "seed": 1})
    assert spec.fingerprint() == load_study("seed").fingerprint()
    assert other.fingerprint() != spec.fingerprint()


def test_entry_train_table_overrides_the_defaults():
    spec = study_from_dict({
        "name": "x", "train": {"epochs": 7, "learning_rate": 0.01},
        "candidates": [{"name": "a", "layers": [{"units": 3}], "train": {"epochs": 2}}],
    })
    assert spec.candidates[0].train.epochs == 2
    assert spec.candidates[0].train.learning_rate == 0.01


BAD_STUDIES = [
    ('name = "x"\n[[candidates]]\nname = "a"\nunits = 3', "candidates[0]: unknown key 'units'"),
    ('name = "x"\nbogus = 1\n[[candidates]]\nname = "a"', "unknown key 'bogus'"),
    ('name = "x"\n[[candidates]]\nname = "a"\nlayers = [{ units = -4 }]',
     "candidates[0].layers[0].units"),
    ('name = "x"\n[[candidates]]\nname = "a"\nlayers = [{ units = 4, dropout = 1.0 }]',
     "candidates[0].layers[0].dropout"),
    ('name = "x"\n[cv]\nn_splits = 0\n[[candidates]]\nname = "a"', "cv.n_splits"),
    ('name = "x"\n[train]\noptimizer = "rmsprop"\n[[candidates]]\nname = "a"',
     ': train.optimizer: input should be "adam", "adamw" or "sgd" (got "rmsprop")'),
    ('name = "x"\n[train]\nepoch = 3\n[[final]]\nname = "a"', ": train: unknown key 'epoch'"),
    # wrong even where no model uses it
    ('name = "x"\n[train]\nepochs = "x"\n[[candidates]]\nname = "a"\ntrain = { epochs = 1 }',
     ': train.epochs: input should be a valid integer (got "x")'),
    ('name = "x"\n[[candidates]]\nname = "a"\ntrain = { epochs = 0 }',
     "candidates[0].train.epochs: input should be greater than 0 (got 0)"),
    ('name = "x"\n[train]\nearly_stopping = 3\n[[final]]\nname = "a"',
     "train.early_stopping: input should be a table (got 3)"),  # not "an instance of ..."
    ('name = "x"\n[[final]]\nname = "a"\nlayers = { units = 8 }',
     "final[0].layers: input should be an array (got { units = 8 })"),  # not "a valid tuple"
    ('name = "x"\n[[candidates]]\nname = "a"\n[[candidates]]\nname = "a"', "unique"),
    ('name = "x"', "at least one"),
    ('name = "x"\n[[candidates]]\nlayers = []', "candidates[0]: missing key 'name'"),
    ('name = "x"\n[cv]\nrepeats = 3\n[[candidates]]\nname = "a"', "cv: repeats > 1"),
    ('name = "x\n', "not valid TOML"),
]


def _load_error(path: Path, text: str) -> str:
    """The ConfigError that loading a study file holding `text` from `path` raises."""
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_study(path)
    return str(error.value)


@pytest.mark.parametrize(("text", "fragment"), BAD_STUDIES)
def test_bad_study_files_name_the_file_and_field(tmp_path: Path, text: str, fragment: str):
    path = tmp_path / "bad.toml"
    message = _load_error(path, text)
    assert message.startswith(f"{path}: ") and fragment in message, message
    assert "\n" not in message


def test_more_folds_than_samples_is_rejected():
    spec = study_from_dict({"name": "x", "cv": {"n_splits": 10},
                            "candidates": [{"name": "a"}]})
    with pytest.raises(ConfigError, match="cv.n_splits: 10 folds need at least 10 samples"):
        make_folds(5, spec.cv, seed=0)


def test_missing_study_file_and_unknown_bundled_name():
    with pytest.raises(ConfigError, match="no such study file"):
        load_study("does-not-exist.toml")
    with pytest.raises(ConfigError, match="bundled: .*seed"):
        load_study("no-such-study")


def test_a_folder_named_like_a_bundled_study_does_not_hide_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "seed").mkdir()
    (tmp_path / "mine").mkdir()
    assert load_study("seed").name == "seed"
    with pytest.raises(ConfigError, match="^mine: a folder, not a study file, and no bundled"):
        load_study("mine")
    (tmp_path / "folder.toml").mkdir()
    with pytest.raises(ConfigError, match="^folder.toml: a folder, not a study file$"):
        load_study("folder.toml")


@pytest.mark.parametrize("name", ["", "  "])
def test_an_empty_study_name_is_named_as_such(name: str):
    with pytest.raises(ConfigError, match=f"^'{name}': no study file or bundled study named so"):
        load_study(name)


def test_values_nested_too_deeply_are_one_line(tmp_path: Path):
    path = tmp_path / "deep.toml"
    path.write_text('name = "deep"\nx = ' + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="deep.toml: not valid TOML .arrays or tables nested"):
        load_study(path)


def test_too_many_layers_and_a_long_wrong_value_are_said_in_a_short_line(tmp_path: Path):
    path = tmp_path / "deep.toml"
    message = _load_error(path, 'name = "x"\n[[candidates]]\nname = "a"\nlayers = ['
                          + ", ".join(["{ units = 16 }"] * 101) + "]\n")
    assert message == f"{path}: candidates[0].layers: at most 100 entries (got 101)"
    message = _load_error(path, 'name = "x"\n[[candidates]]\nname = "a"\nlayers = [{ units = "'
                          + "9" * 300 + '" }]\n')
    assert "layers[0].units: input should be a valid integer (got \"999" in message
    assert message.endswith('...)') and len(message) < len(str(path)) + 160


LONG = "q" * 300
SEARCH = '[[candidates]]\nname = "a"\nlayers = [{ units = 8 }]\n[search.space]\n'


@pytest.mark.parametrize(("toml", "expected"), [
    ('name = "x' + "\\t" * 2500 + '"\n', "name: a name of 2501 characters is too long"),
    ('name = "' + "." * 5000 + '"\n', "name: a name of 5000 characters is too long"),
    ('name = "x"\n[train]\n' + LONG + " = 1\n", "train: unknown key 'qqq"),
    ('name = "x"\n' + SEARCH + f'optimizer = {{ choices = ["adam", "{LONG}"] }}\n',
     "search.space.optimizer: 'qqq"),
    ('name = "x"\n' + SEARCH + f"units = {list(range(1, 300))}\n",
     "search.space.units: a list of values to choose from is written choices = [1, 2, 3"),
])
def test_a_long_wrong_value_is_quoted_short(tmp_path: Path, toml: str, expected: str):
    path = tmp_path / "s.toml"
    message = _load_error(path, toml)
    assert expected in message and len(message) < len(str(path)) + 200, message


def test_a_line_separator_in_a_wrong_value_is_quoted_escaped(tmp_path: Path):
    message = _load_error(tmp_path / "s.toml", 'name = "x"\n[train]\noptimizer = "ad\u2028am"\n')
    assert '(got "ad\\u2028am")' in message and "\u2028" not in message


def test_a_study_file_is_read_no_further_than_a_study_file_goes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """/dev/zero, or a huge file named by mistake, is refused after MAX_STUDY_FILE_BYTES,
    not read into memory until the machine runs out of it."""
    from fashionlab.config.files import MAX_STUDY_FILE_BYTES

    huge = tmp_path / "huge.toml"
    with huge.open("wb") as file:  # sparse: 2 GB that take no disk
        file.truncate(2_000_000_000)
    for path in (huge, Path("/dev/zero")):
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: longer than "
                                              rf"{MAX_STUDY_FILE_BYTES:,} bytes"):
            load_study(path)
    code, _, err = run_cli(capsys, "study", "/dev/zero", "--run-dir", str(tmp_path / "runs"))
    assert_one_line_error(code, err, "/dev/zero: longer than")
    padded = tmp_path / "padded.toml"  # the longest that is read
    text = 'name = "padded"\n[[final]]\nname = "f"\n'
    padded.write_text(text + "#" * (MAX_STUDY_FILE_BYTES - len(text) - 1) + "\n")
    assert load_study(padded).name == "padded"


def test_a_byte_order_mark_is_no_error(tmp_path: Path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + b'name = "bom"\n[[final]]\nname = "f"\n')
    assert load_study(path).name == "bom"


def test_cli_reports_a_bad_study_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = tmp_path / "bad.toml"
    path.write_text('name = "x"\n[[candidates]]\nname = "a"\nlayers = [{ units = 0 }]')
    code, _, err = run_cli(capsys, "study", str(path), "--run-dir", str(tmp_path / "runs"))
    assert_one_line_error(code, err, str(path), "candidates[0].layers[0].units")
    assert not (tmp_path / "runs").exists()  # nothing half-written


# Mistakes that used to surface only once a run had started (a traceback, an interrupted run),
# each with the whole message that now names it at load time.
ENTRY = '[[candidates]]\nname = "a"\n'
PRE_RUN_MISTAKES = [
    (ENTRY + "conv = [{ filters = 8, kernel = 40 }]",
     ('candidates[0].conv[0]: kernel 40 is larger than its 28x28 input: nothing is left (use a '
      'kernel of at most 28, or padding = "same")')),
    (ENTRY + "conv = [{ filters = 4, pool = 2 }, { filters = 4, pool = 2 }, "
             "{ filters = 4, pool = 4 }]",  # 28 -> 26 -> 13 -> 11 -> 5 -> 3 -> 0
     ("candidates[0].conv[2]: pool 4 is larger than the 3x3 feature map it gets (5x5 in, "
      "kernel 3): nothing is left")),
    ('[[final]]\nname = "f"\nconv = [{ filters = 4, pool = 32, padding = "same" }]',
     ("final[0].conv[0]: pool 32 is larger than the 28x28 feature map it gets (28x28 in, "
      "kernel 3): nothing is left")),
    (ENTRY + 'conv = [{ filters = 4, kernel = 4, padding = "same" }]',
     'candidates[0].conv[0].kernel: padding "same" needs an odd kernel (got 4)'),
    (ENTRY + "conv = [{ filters = 4, pool = 2, norm_after_pool = true }]",
     ("candidates[0].conv[0].norm_after_pool: needs batch_norm = true and a pool above 1: "
      "there is no pooling to normalise after")),
    (ENTRY + "conv = [{ filters = 4, batch_norm = true, norm_after_pool = true }]",
     ("candidates[0].conv[0].norm_after_pool: needs batch_norm = true and a pool above 1: "
      "there is no pooling to normalise after")),
    (ENTRY + 'conv = [{ filters = 4, padding = "same" }, { filters = 8, residual = true, '
             'padding = "same" }]',
     ('candidates[0].conv[1].residual: needs padding = "same" and as many filters as its '
      "input has channels (4), to add its input to its output")),
    (ENTRY + "conv = [{ filters = 1, residual = true }]",
     ('candidates[0].conv[0].residual: needs padding = "same" and as many filters as its '
      "input has channels (1), to add its input to its output")),
    (ENTRY + 'conv = [{ filters = 1, padding = "same", residual = true, batch_norm = true, '
             "pool = 2, norm_after_pool = true }]",
     ("candidates[0].conv[0].norm_after_pool: a residual layer pools after adding its input: "
      "nothing to normalise")),
    (ENTRY + "layers = [{ units = 8 }]\ndropout = 0.3",
     ("candidates[0].dropout: drops flattened conv features, and this model has no conv "
      "layers: set dropout on its layers")),
    (ENTRY + "n_classes = 5", "candidates[0].n_classes: the data has 10 classes (got 5)"),
    ("[data]\ntrain_limit = 4\n[cv]\nn_splits = 5\n" + ENTRY,
     "cv.n_splits: 5 folds need at least 5 training samples (data.train_limit is 4)"),
    ('[train]\nearly_stopping = { monitor = "val_acc" }\n' + ENTRY,
     ('train.early_stopping.monitor: input should be "val_loss" or '
      '"val_accuracy" (got "val_acc")')),
    ("[retrain]\nepochs = 0\n" + ENTRY, "retrain.epochs: input should be greater than 0 (got 0)"),
    # A number past the store's integers was taken, and failed once a run was made.
    (f"[retrain]\nepochs = {2**63}\n" + ENTRY,
     f"retrain.epochs: input should be less than or equal to 100000 (got {2**63})"),
    ("[train]\nepochs = 1979-05-27\n" + ENTRY,  # as the file spells it, not datetime.date(...)
     "train.epochs: input should be a valid integer (got 1979-05-27)"),
    ("[train]\naugment = { erase = 1.5 }\n" + ENTRY,
     "train.augment.erase: input should be less than or equal to 1 (got 1.5)"),
    ("[train]\nepochs = 100001\n" + ENTRY,
     "train.epochs: input should be less than or equal to 100000 (got 100001)"),
    ('[cv]\nstrategy = "shuffled"\nrepeats = 1000000000\n' + ENTRY,  # its folds fill memory
     "cv.repeats: input should be less than or equal to 100 (got 1000000000)"),
    ('[retrain]\nepochs = "best"\n' + ENTRY,
     'retrain.epochs: must be a number of epochs, "warning" or "lowest" (got "best")'),
    (ENTRY + "layers = [{ units = 64 }, { units = 100000000 }]",  # a typo, or a few zeros too many
     ("candidates[0].layers[1].units: the model would have 7,500,050,250 parameters, more than "
      "the 100,000,000 fashionlab trains (6,500,000,000 in this layer)")),
    (('[[final]]\nname = "f"\nconv = [{ filters = 32, padding = "same" }]\n'
      "layers = [{ units = 4096 }]"),  # 28 x 28 x 32 features into 4096 units
     ("final[0].layers[0].units: the model would have 102,805,834 parameters, more than the "
      "100,000,000 fashionlab trains (102,764,544 in this layer, fed by conv[0]'s 32 x 28 x 28 "
      "= 25,088 flattened features: fewer filters or more pooling shrink them)")),
    (('[[final]]\nname = "f"\nconv = [{ filters = 8 }, { filters = 20000, pool = 2 }]\n'
      "layers = [{ units = 40 }]"),  # the units are few: the conv stack's output is not
     ("final[0].layers[0].units: the model would have 116,660,530 parameters, more than the "
      "100,000,000 fashionlab trains (115,200,040 in this layer, fed by conv[1]'s 20000 x 12 x "
      "12 = 2,880,000 flattened features: fewer filters or more pooling shrink them)")),
    (('[[final]]\nname = "f"\nconv = [{ filters = 4, pool = 13 }]\n'
      "layers = [{ units = 7000000 }]"),  # 16 features: the units are what is too many
     ("final[0].layers[0].units: the model would have 189,000,050 parameters, more than the "
      "100,000,000 fashionlab trains (119,000,000 in this layer)")),
    (('[[final]]\nname = "f"\nconv = [{ filters = 200000, padding = "same" }]\n'),
     ("final[0].n_classes: the model would have 1,570,000,010 parameters, more than the "
      "100,000,000 fashionlab trains (1,568,000,010 in this layer, fed by conv[0]'s 200000 x "
      "28 x 28 = 156,800,000 flattened features: fewer filters or more pooling shrink them)")),
]


NAME_MISTAKES = [
    ('[[candidates]]\nname = ""\n', "candidates[0].name: a name must not be empty"),
    ('[[final]]\nname = "   "\n', "final[0].name: a name must not be empty"),
    ('[[final]]\nname = ".."\n',
     "final[0].name: '..' cannot be a name: it means a folder, not a file"),
    ('[[candidates]]\nname = "."\n',
     "candidates[0].name: '.' cannot be a name: it means a folder, not a file"),
    ('[[candidates]]\nname = "x y"\n[[final]]\nname = "x_y"\n',
     "model names must differ as file names too: 'x y' and 'x_y' are all saved as 'x_y'"),
    ('[[candidates]]\nname = "Wide"\n[[final]]\nname = "wide"\n',
     ("model names must differ as file names too: 'Wide' and 'wide' are all saved as one file "
     "where case (macOS, Windows), how an accent is encoded (macOS) or a name's trailing "
     "dots (Windows) are ignored")),
    ('[[candidates]]\nname = "\\u200b"\n',  # a zero-width space: its rows would look empty
     ("candidates[0].name: a name of U+200B shows nothing: a name needs a character that can "
      "be seen, or its rows would look empty")),
    ('[[candidates]]\nname = "\u3164 "\n',  # a Hangul filler, drawn as nothing
     ("candidates[0].name: a name of U+3164 U+0020 shows nothing: a name needs a character that "
      "can be seen, or its rows would look empty")),
    ('[[candidates]]\nname = "con"\n',  # a device on Windows: no file could be written
     ("candidates[0].name: 'con' cannot be a name: Windows reserves it for a device (CON, PRN, "
      "AUX, NUL, COM1-9, LPT1-9), so its files could not be written there")),
    ('[[final]]\nname = "LPT\u00b9.v2"\n',
     ("final[0].name: 'LPT\u00b9.v2' cannot be a name: Windows reserves it for a device (CON, "
      "PRN, AUX, NUL, COM1-9, LPT1-9), so its files could not be written there")),
    ('[[candidates]]\nname = "caf\u00e9"\n[[final]]\nname = "cafe\u0301"\n',  # NFC, NFD
     ("model names must differ as file names too: 'caf\\xe9' and 'cafe\\u0301' are all saved "
      "as one file where case (macOS, Windows), how an accent is encoded (macOS) or a name's "
      "trailing dots (Windows) are ignored")),
    ('[[candidates]]\nname = "m"\n[[candidates]]\nname = "m (retrained)"\n',
     ("model names must differ from a retrained candidate's: 'm (retrained)' is how the "
      "retrained 'm' is shown")),
    ('[[candidates]]\nname = "m"\n[[final]]\nname = "m."\n',
     ("model names must differ as file names too: 'm' and 'm.' are all saved as one file "
     "where case (macOS, Windows), how an accent is encoded (macOS) or a name's trailing "
     "dots (Windows) are ignored")),
    (('[[candidates]]\nname = "a/b"\n[[candidates]]\nname = "a:b"\n[[candidates]]\n'
     'name = "a_b"\n'),
     ("model names must differ as file names too: 'a/b' and 'a:b' and 'a_b' are all saved "
     "as 'a_b'")),
    ('[[candidates]]\nname = "line1\\nline2"\n',  # would split a row of results.md
     (r"candidates[0].name: 'line1\nline2' contains a control character (a newline, a tab, an "
     "escape): a name is one line of text")),
    ('[[final]]\nname = "red \\u001b[31m"\n',  # would colour the terminal
     (r"final[0].name: 'red \x1b[31m' contains a control character (a newline, a tab, an "
     "escape): a name is one line of text")),
    ('[[candidates]]\nname = "one\u2028two"\n',  # Unicode's line separator
     (r"candidates[0].name: 'one\u2028two' contains a control character (a newline, a tab, an "
     "escape): a name is one line of text")),
    ('[[candidates]]\nname = "best \u202egnp.exe"\n',  # shown as "best exe.png"
     (r"candidates[0].name: 'best \u202egnp.exe' contains a text-direction control (U+202E): "
     "tables and file listings would show the name reordered")),
    (f'[[candidates]]\nname = "{"L" * 101}"\n',
     "candidates[0].name: a name of 101 characters is too long: at most 100"),
    ('[[candidates]]\nname = "' + "\u4e2d" * 80 + '"\n',  # 3 bytes each in a file name
     ("candidates[0].name: too long as a file name: 240 bytes in UTF-8, at most 200 (shorten "
     "it)")),
]


@pytest.mark.parametrize(("text", "message"), NAME_MISTAKES)
def test_names_that_cannot_name_their_files_are_refused(text: str, message: str):
    with pytest.raises(ConfigError) as error:
        study_from_dict(tomllib.loads('name = "x"\n' + text), source="bad.toml")
    assert str(error.value).endswith(message), str(error.value)
    with pytest.raises(ConfigError, match="name: a name must not be empty"):
        study_from_dict(tomllib.loads('name = ""\n[[final]]\nname = "f"\n'), source="b.toml")


@pytest.mark.parametrize(("text", "message"), PRE_RUN_MISTAKES)
def test_mistakes_that_training_would_hit_are_refused_at_load(text: str, message: str):
    with pytest.raises(ConfigError) as error:
        study_from_dict(tomllib.loads('name = "x"\n' + text), source="bad.toml")
    assert str(error.value) == f"bad.toml: {message}"


def test_the_largest_models_that_fit_are_accepted():
    spec = study_from_dict(tomllib.loads('name = "x"\n[data]\ntrain_limit = 5\n' + ENTRY + """
conv = [{ filters = 4, pool = 2 }, { filters = 4, kernel = 13 }]   # 28 -> 26 -> 13 -> 1
[[final]]
name = "f"
conv = [{ filters = 4, kernel = 5, padding = "same", pool = 28 }]  # 28 -> 28 -> 1
"""))
    assert [c.name for c in spec.candidates + spec.final] == ["a", "f"]


@pytest.mark.parametrize("study", ["seed", "fast-cnn", str(
    Path(__file__).parents[1] / "examples" / "fast-cnn-residual.toml")],
    ids=["seed", "fast-cnn", "example-residual"])
def test_a_models_parameters_are_counted_as_torch_counts_them(study: str):
    from fashionlab.models import build_module

    for candidate in load_study(study).candidates + load_study(study).final:
        module = build_module(candidate.model)
        counts = layer_parameters(candidate.model)
        assert sum(counts.values()) == sum(p.numel() for p in module.parameters())
    bn = ModelSpec(conv=(ConvLayer(8, batch_norm=True, pool=2), ConvLayer(4, kernel=5)),
                   layers=(DenseLayer(16),))
    assert sum(layer_parameters(bn).values()) == sum(
        p.numel() for p in build_module(bn).parameters())
    assert sum(layer_parameters(ModelSpec(n_classes=10)).values()) == 7850  # 784 x 10 + 10


# TOML has types: a value of the wrong one is refused, never converted.
STRICT_TYPES = [  # (line of the entry, field, what pydantic asks for, the value as written)
    ('layers = [{ units = "64" }]', "layers[0].units", "a valid integer", '"64"'),
    ("layers = [{ units = 64.0 }]", "layers[0].units", "a valid integer", "64.0"),
    ("train = { epochs = 1.5 }", "train.epochs", "a valid integer", "1.5"),
    ("train = { batch_size = true }", "train.batch_size", "a valid integer", "true"),
    ('train = { learning_rate = "0.001" }', "train.learning_rate", "a valid number", '"0.001"'),
    ("train = { learning_rate = true }", "train.learning_rate", "a valid number", "true"),
    ("train = { learning_rate = inf }", "train.learning_rate", "a finite number", "inf"),
    ("train = { weight_decay = nan }", "train.weight_decay", "a finite number", "nan"),
    ("train = { augment = { flip = 1 } }", "train.augment.flip", "a valid boolean", "1"),
    ('conv = [{ filters = 4, batch_norm = "true" }]', "conv[0].batch_norm", "a valid boolean",
     '"true"'),
    ("conv = [{ filters = 4, kernel = 3.0 }]", "conv[0].kernel", "a valid integer", "3.0"),
]


@pytest.mark.parametrize(("line", "field", "expected", "value"), STRICT_TYPES)
def test_values_of_the_wrong_type_are_refused(line: str, field: str, expected: str, value: str):
    with pytest.raises(ConfigError) as error:
        study_from_dict(tomllib.loads(f'name = "x"\n{ENTRY}{line}'), source="bad.toml")
    assert str(error.value) == (f"bad.toml: candidates[0].{field}: input should be {expected} "
                                f"(got {value})")


@pytest.mark.parametrize(("text", "field"), [
    ('seed = "3"', "seed"), ('[cv]\nn_splits = "5"', "cv.n_splits"),
    ('[data]\nverify = "yes"', "data.verify"), ("[data]\ntrain_limit = 100.0", "data.train_limit"),
    ("[retrain]\nenabled = 0", "retrain.enabled"), ("[retrain]\nepochs = 3.0", "retrain.epochs"),
    ('[warning]\npatience = "10"', "warning.patience"),
])
def test_study_level_values_of_the_wrong_type_are_refused(text: str, field: str):
    with pytest.raises(ConfigError, match=rf"^bad\.toml: {re.escape(field)}: "):
        study_from_dict(tomllib.loads(f'name = "x"\n{text}\n{ENTRY}'), source="bad.toml")


@pytest.mark.parametrize("directory", ["", "  "])
def test_an_empty_data_directory_is_refused_not_read_as_the_default(directory: str):
    with pytest.raises(ConfigError, match=r"^bad\.toml: data\.directory: must not be empty"):
        study_from_dict(tomllib.loads(f'name = "x"\n[data]\ndirectory = "{directory}"\n'
                                      f"{ENTRY}"), source="bad.toml")


def test_an_integer_is_a_valid_float():
    # TOML users write learning_rate = 1; it is the float 1.0, with the fingerprint of 1.0.
    text = 'name = "x"\n' + ENTRY + "layers = [{ units = 8, dropout = 0 }]\n"
    spec = study_from_dict(tomllib.loads(text + "train = { learning_rate = 1 }"))
    as_float = study_from_dict(tomllib.loads(text + "train = { learning_rate = 1.0 }"))
    assert type(spec.candidates[0].train.learning_rate) is float
    assert type(spec.candidates[0].model.layers[0].dropout) is float
    assert spec == as_float and spec.fingerprint() == as_float.fingerprint()


def test_the_study_class_count_is_the_data_s():
    assert N_CLASSES == len(CLASS_NAMES)


MISTAKES_FOR_THE_CLI = [
    ("conv = [{ filters = 8, kernel = 40 }]", "candidates[0].conv[0]: kernel 40 is larger"),
    ('layers = [{ units = "64" }]', "candidates[0].layers[0].units: input should be a valid"),
    ("train = { early_stopping = { monitor = \"val_acc\" } }",
     "candidates[0].train.early_stopping.monitor"),
]


@pytest.mark.parametrize(("line", "fragment"), MISTAKES_FOR_THE_CLI)
def test_cli_refuses_a_mistake_before_creating_a_run(
        line: str, fragment: str, tiny_idx_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]):
    path = tmp_path / "bad.toml"
    path.write_text(tiny_study_toml(tiny_idx_dir, final=False, candidates=ENTRY + line))
    runs = tmp_path / "runs"
    code, _, err = run_cli(capsys, "study", str(path), "--run-dir", str(runs), "--workers", "1")
    assert_one_line_error(code, err, f"{path}: {fragment}")
    assert not runs.exists()  # no store, no run, nothing to resume or clean up


def test_more_folds_than_the_data_holds_creates_no_run(tiny_idx_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]):
    # The tiny data holds 300 images: known once the files are read, still before any run.
    path = tmp_path / "folds.toml"
    path.write_text(tiny_study_toml(tiny_idx_dir, folds=301, final=False))
    runs = tmp_path / "runs"
    code, _, err = run_cli(capsys, "study", str(path), "--run-dir", str(runs), "--workers", "1")
    assert_one_line_error(code, err, f"error: {path}: cv.n_splits: 301 folds need at least 301 "
                          "training images (the data has 300)")
    store = Store.open(runs)
    try:
        assert store.runs() == []
    finally:
        store.close()


@pytest.mark.parametrize("name", ["N" * 100, "\u4e2d" * 66])  # at the limits, as written
def test_the_quick_variant_of_a_study_with_the_longest_name(name: str):
    from fashionlab.config import quick_variant

    spec = study_from_dict(tomllib.loads(f'name = "{name}"\n[[final]]\nname = "f"\n'))
    quick = quick_variant(spec)
    assert quick.name.endswith("-quick") and name.startswith(quick.name.removesuffix("-quick"))


# Scaled to 8 epochs at most: a search that varies epochs still does (cutting off what lies
# above 8 left one value of [10, 20], a space that varied nothing: a traceback).
@pytest.mark.parametrize(("epochs", "quick"), [
    ("{ choices = [4, 20] }", "choices=(2, 8)"), ("{ choices = [20, 30] }", "choices=(5, 8)"),
    ("{ choices = [4, 8] }", "choices=(4, 8)"), ("{ choices = [30, 31] }", "value=8"),
    ("{ low = 5, high = 40 }", "low=1, high=8,"), ("{ low = 10, high = 40 }", "low=2, high=8,"),
    ("{ low = 3, high = 6 }", "low=3, high=6,"), ("{ low = 19, high = 20 }", "value=8"),
    ("{ low = 4, high = 20, step = 4 }", "low=2, high=8, log=False, step=2"),
    ("{ low = 4, high = 40, step = 12 }", "low=1, high=7, log=False, step=2"),
    ("30", "value=8"), ("6", "value=6")])
def test_the_quick_variant_of_a_search_that_varies_epochs(epochs: str, quick: str):
    spec = study_from_dict(tomllib.loads(
        'name = "s"\n[[candidates]]\nname = "a"\nlayers = [{ units = 8 }]\n'
        f"[search]\nn_trials = 10\n[search.space]\nunits = {{ low = 4, high = 64 }}\n"
        f"epochs = {epochs}\n"))
    short = quick_variant(spec).search
    assert short is not None and quick in repr(short.space["epochs"])
    assert short.space["units"] == spec.search.space["units"]


def test_a_quick_variant_whose_search_would_vary_nothing_is_one_line():
    spec = study_from_dict(tomllib.loads(
        'name = "s"\n[[candidates]]\nname = "a"\nlayers = [{ units = 8 }]\n'
        "[search]\nn_trials = 10\n[search.space]\nepochs = { low = 19, high = 20 }\n"),
        source="s.toml")
    with pytest.raises(ConfigError, match=r"^s.toml: its quick variant \(8 epochs at most\): "
                       "search.space: varies nothing"):
        quick_variant(spec)


def test_the_quick_variant_of_a_search_compares_with_the_quick_reference_study():
    # A quick search's folds are a quick study's (fewer images): the seed study it can be
    # paired with fold by fold is the quick one, `fashionlab study --quick`.
    search, seed = quick_variant(load_study("search")), quick_variant(load_study("seed"))
    assert search.search is not None and search.search.reference is not None
    assert search.search.reference.study == seed.name == "seed-quick"
    assert search.search.reference.candidate == "dense(256) dropout"
    assert (search.data, search.cv, search.seed) == (seed.data, seed.cv, seed.seed)


@pytest.mark.parametrize("value", [None, 5, ["seed"]])
def test_load_study_says_what_it_takes(value: object):
    with pytest.raises(ConfigError, match=r"^expected a study file's path or a bundled study's "
                                          rf"name, got {re.escape(repr(value))} \(bundled: "):
        load_study(value)  # type: ignore[arg-type]


def test_a_quick_variant_takes_a_study_spec_not_its_name():
    with pytest.raises(ConfigError, match="^spec: expected a StudySpec .*, got str$"):
        quick_variant("seed")  # type: ignore[arg-type]


def test_the_quick_variant_keeps_a_fold_per_sample():
    spec = study_from_dict(tomllib.loads(
        'name = "s"\n[cv]\nn_splits = 7000\n[[candidates]]\nname = "a"\n'))
    quick = quick_variant(spec)
    assert quick.cv.n_splits == 7000 and quick.data.train_limit == 7000


@pytest.mark.parametrize(("line", "message"), [
    (r'"evil\nkey" = 1', "my.toml: candidates[0]: unknown key 'evil\\nkey' (expected"),
    ('train = { "a\\u001b[2Jb" = 1 }',
     "my.toml: candidates[0].train: unknown key 'a\\x1b[2Jb'"),
    ('layers = [{ units = 8, "x\\u2028y" = 1 }]',
     "my.toml: candidates[0].layers[0]: unknown key 'x\\u2028y'"),
])
def test_a_key_that_would_break_the_line_is_quoted_escaped(line: str, message: str):
    raw = tomllib.loads(f'name = "x"\n[[candidates]]\nname = "a"\n{line}\n')
    with pytest.raises(ConfigError) as error:
        study_from_dict(raw, source="my.toml")
    assert str(error.value).startswith(message), str(error.value)
    assert str(error.value).isprintable()


def test_a_path_that_would_break_the_line_is_said_in_one(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]):
    path = tmp_path / "s.toml"
    path.write_text('name = "x"\n[data]\ndirectory = "/nope\\nerror: fake line"\n'
                    '[[candidates]]\nname = "a"\n')
    code, _, err = run_cli(capsys, "study", str(path), "--run-dir", str(tmp_path / "runs"))
    assert_one_line_error(code, err, "/nope\\nerror: fake line")


def test_a_study_file_read_from_a_pipe():
    """`fashionlab study <(sed ... study.toml)`: the shell names a pipe, /dev/fd/N."""
    read, write = os.pipe()
    try:
        os.write(write, b'name = "piped"\n[[candidates]]\nname = "a"\n')
        os.close(write)
        assert load_study(f"/dev/fd/{read}").name == "piped"
    finally:
        os.close(read)


@pytest.mark.parametrize("raw", [None, ["x"], "name = 'x'", 3])
def test_a_study_that_is_not_a_table_is_a_config_error(raw: object):
    with pytest.raises(ConfigError, match=f"^api: expected a table of settings .*, got "
                                          f"{type(raw).__name__}$"):
        study_from_dict(raw, source="api")  # type: ignore[arg-type]


def test_a_derived_spec_with_a_value_it_cannot_take_is_one_line_naming_its_file():
    seed = load_study("seed")
    assert derived(seed, seed=3).seed == 3
    for changes, says in (({"seed": "1"}, 'seed: input should be a valid integer (got "1")'),
                          ({"seed": 2**70}, "seed: input should be less than or equal to"),
                          ({"name": ""}, "name: a name must not be empty"),
                          ({"bogus": 1}, "unknown key 'bogus'")):
        with pytest.raises(ConfigError) as error:
            derived(seed, **changes)
        assert str(error.value).startswith("seed.toml: ") and says in str(error.value)
        assert "\n" not in str(error.value)


def test_an_entrys_train_overrides_augment_key_by_key_and_early_stopping_whole():
    spec = study_from_dict(tomllib.loads(
        'name = "s"\n[train]\naugment = { crop = 2, flip = true }\n'
        'early_stopping = { monitor = "val_accuracy", patience = 5 }\n'
        '[[candidates]]\nname = "a"\nlayers = [{ units = 8 }]\n'
        'train = { augment = { flip = false }, early_stopping = { patience = 3 } }\n'))
    train = spec.candidates[0].train
    assert (train.augment.crop, train.augment.flip) == (2, False)
    assert train.early_stopping is not None
    assert (train.early_stopping.monitor, train.early_stopping.patience) == ("val_loss", 3)


@pytest.mark.parametrize(("encoding", "says"), [
    ("utf-16", "not UTF-8 text (UTF-16: byte 0 cannot be read as UTF-8); save it as UTF-8"),
    ("latin-1", "not UTF-8 text (byte 8 cannot be read as UTF-8); save it as UTF-8")])
def test_a_study_file_that_is_not_utf8_says_so_and_how_to_mend_it(encoding: str, says: str,
                                                                  tmp_path: Path):
    path = tmp_path / "s.toml"
    path.write_bytes('name = "\u00e9"\n'.encode(encoding))
    with pytest.raises(ConfigError) as error:
        load_study(path)
    assert str(error.value) == f"{path}: {says}, which TOML files are"
