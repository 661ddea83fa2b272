"""Study files: TOML read into a `StudySpec` (with one-line errors naming the file and the
field), written back with every default resolved, the bundled studies, and the quick variant.

    seed.toml: candidates[2].layers[0].dropout: must be < 1 (got 1.0)
"""

from __future__ import annotations

import codecs
import dataclasses
import os
import sys
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import TypeAdapter, ValidationError

from fashionlab.config.specs import (
    MAX_NAME_BYTES,
    MAX_NAME_CHARACTERS,
    Candidate,
    ModelSpec,
    ParamSpec,
    SearchSpec,
    StudySpec,
    TrainSpec,
    first_problem,
    toml_value,
)
from fashionlab.errors import ConfigError
from fashionlab.text import one_line, safe_name, shortened

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# --------------------------------------------------------------------------------------------
# Reading study files
#
# The file format is flatter than the dataclasses: a candidate states its model fields
# (`layers`, `conv`, `dropout`) directly and its training overrides in a `train` table, and a
# top-level [train] table holds the defaults every model starts from.

_MODEL_KEYS = {f.name for f in dataclasses.fields(ModelSpec)}
_ENTRY_KEYS = _MODEL_KEYS | {"name", "train"}


def _resolve_entry(entry: Any, defaults: Mapping[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(entry, Mapping):
        raise _FieldError(where, "must be a table")
    unknown = sorted(set(entry) - _ENTRY_KEYS)
    if unknown:
        raise _FieldError(
            where, f"unknown key '{one_line(shortened(str(unknown[0])))}' (expected one of: "
            f"{', '.join(sorted(_ENTRY_KEYS))})"
        )
    if "name" not in entry:
        raise _FieldError(where, "missing key 'name'")
    overrides = entry.get("train", {})
    if not isinstance(overrides, Mapping):
        raise _FieldError(f"{where}.train", "must be a table")
    train = {**defaults, **overrides}
    if isinstance(defaults.get("augment"), Mapping) and isinstance(overrides.get("augment"), Mapping):
        train["augment"] = {**defaults["augment"], **overrides["augment"]}
    model = {k: v for k, v in entry.items() if k in _MODEL_KEYS}
    return {"name": entry["name"], "model": model, "train": train}


class _FieldError(Exception):
    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")


def _format_location(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1 if parts else 0 :] = [f"{parts[-1] if parts else ''}[{item}]"]
        elif item in ("function-after", "literal['warning']", "int", "constrained-int"):
            continue  # pydantic's names for union branches and validators, not fields
        else:
            parts.append(one_line(shortened(str(item))))  # a key of the file, as written
    return ".".join(parts) or "(top level)"


# pydantic's words for a wrong type, in TOML's: a dataclass is a table, a tuple an array.
_TOML_TYPES = {"dataclass_type": "a table", "dict_type": "a table", "model_type": "a table",
               "tuple_type": "an array", "list_type": "an array"}


def _format_validation_error(error: ValidationError, within: tuple[str, ...] = ()) -> str:
    loc, message, first = first_problem(error)
    loc = within + loc
    if first["type"] in _TOML_TYPES:
        message = f"Input should be {_TOML_TYPES[first['type']]}"
    # A candidate's model fields live at the entry's top level in the file.
    if len(loc) >= 3 and loc[0] in ("candidates", "final") and loc[2] == "model":
        loc = loc[:2] + loc[3:]
    if first["type"] == "unexpected_keyword_argument":
        message = f"unknown key '{one_line(shortened(str(loc[-1])))}'"
        loc = loc[:-1]
    elif first["type"] == "missing":
        message = f"missing key '{loc[-1]}'"
        loc = loc[:-1]
    elif first["type"] == "too_long":  # its count is the point, not its items
        limit = first.get("ctx", {}).get("max_length")
        message = f"at most {limit} entries (got {len(first['input'])})"
    elif "input" in first and first["type"] not in ("value_error", "assertion_error"):
        if first["type"] == "literal_error":  # the options as the file spells strings
            message = message.replace("'", '"')
        got = shortened(toml_value(first["input"]))
        message = f"{message[0].lower()}{message[1:]} (got {got})"
    return f"{_format_location(loc)}: {message}"


_STUDY_ADAPTER = TypeAdapter(StudySpec)
_TRAIN_ADAPTER = TypeAdapter(TrainSpec)


def study_from_dict(raw: Mapping[str, Any], *, source: str | None = None) -> StudySpec:
    """Validate a study given as a (TOML-shaped) mapping; errors name `source` (e.g. the file
    it was read from) and the field, now and once the study runs (`study_source`)."""
    named = source
    source = source or "study"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a table of settings (a dict, as tomllib reads a "
                          f"study file), got {type(raw).__name__}")
    try:
        data = dict(raw)
        defaults = data.pop("train", {})
        if not isinstance(defaults, Mapping):
            raise _FieldError("train", "must be a table")
        # On its own first: a mistake there is the [train] table's, not the first model's that
        # inherits it, and is one even where every model overrides that value.
        try:
            _TRAIN_ADAPTER.validate_python(dict(defaults))
        except ValidationError as error:
            raise ConfigError(f"{source}: {_format_validation_error(error, ('train',))}") from None
        for section in ("candidates", "final"):
            entries = data.get(section, [])
            if not isinstance(entries, list):
                raise _FieldError(section, f"must be an array of tables ([[{section}]])")
            data[section] = [
                _resolve_entry(entry, defaults, f"{section}[{i}]") for i, entry in enumerate(entries)
            ]
        spec = _STUDY_ADAPTER.validate_python(data)
    except _FieldError as error:
        raise ConfigError(f"{source}: {error}") from None
    except ValidationError as error:
        raise ConfigError(f"{source}: {_format_validation_error(error)}") from None
    return spec if named is None else _read_from(spec, named)


# What a problem found only once a study runs (its data folder gone, more folds than images)
# calls the study: the file it was read from. Kept beside the fields, not among them, so it is
# in no fingerprint, stored config or comparison: the same study read from two files is one.
_SOURCE = "_fashionlab_source"


def _read_from(spec: StudySpec, source: str) -> StudySpec:
    object.__setattr__(spec, _SOURCE, source)  # (frozen: set as its own __init__ sets fields)
    return spec


def study_source(spec: StudySpec) -> str:
    """How errors name `spec`: the file it was read from ("my-study.toml"; "seed.toml" for a
    bundled study), or "study '<name>'" for one made in code."""
    return getattr(spec, _SOURCE, None) or f"study '{spec.name}'"


def check_spec(spec: Any) -> StudySpec:
    """`spec` if it is a StudySpec, else a ConfigError naming the argument."""
    if not isinstance(spec, StudySpec):
        raise ConfigError(f"spec: expected a StudySpec (from fashionlab.config.load_study), got "
                          f"{type(spec).__name__}")
    return spec


def derived(spec: StudySpec, **changes: Any) -> StudySpec:
    """`dataclasses.replace(spec, **changes)` that is still read from `spec`'s file (errors
    name it): a value the study cannot have is a one-line ConfigError, as in a file."""
    source = getattr(check_spec(spec), _SOURCE, None)
    try:
        new = dataclasses.replace(spec, **changes)
    except ValidationError as error:
        raise ConfigError(f"{source or 'study'}: {_format_validation_error(error)}") from None
    return new if source is None else _read_from(new, source)


def bundled_studies() -> list[str]:
    """Names of the studies that ship with fashionlab (`fashionlab study NAME`)."""
    folder = resources.files("fashionlab") / "studies"
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


# A study file is a page of settings: the bundled ones are under 5 kB. More is no study file
# (/dev/zero, a dataset named by mistake), and is not read into memory.
MAX_STUDY_FILE_BYTES = 1_000_000


def _read_study_file(path: Path) -> str:
    """The text of a study file, read no further than MAX_STUDY_FILE_BYTES (a device or pipe
    has no size to check first); ConfigError for a longer one."""
    with path.open("rb") as file:
        data = file.read(MAX_STUDY_FILE_BYTES + 1)
    if len(data) > MAX_STUDY_FILE_BYTES:
        raise ConfigError(f"{path}: longer than {MAX_STUDY_FILE_BYTES:,} bytes, which no study "
                          "file is (is it the file you meant?)")
    return data.decode("utf-8-sig")


def load_study(name_or_path: str | Path = "seed") -> StudySpec:
    """Read a study file, or a bundled study by name (e.g. "seed")."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ConfigError(f"expected a study file's path or a bundled study's name, got "
                          f"{name_or_path!r} (bundled: {', '.join(bundled_studies())})")
    if not str(name_or_path).strip():
        raise ConfigError(f"{str(name_or_path)!r}: no study file or bundled study named so "
                          f"(bundled: {', '.join(bundled_studies())})")
    path = Path(name_or_path)
    # A name that is no file is a bundled study's: a folder called "seed" here hides nothing.
    # (A pipe, `<(cat study.toml)`, is read as a file is.)
    if path.suffix != ".toml" and not (path.exists() and not path.is_dir()):
        bundled = resources.files("fashionlab") / "studies" / f"{name_or_path}.toml"
        if not bundled.is_file():
            what = "a folder, not a study file" if path.is_dir() else "no such study file"
            shown = name_or_path if str(name_or_path).strip() == str(name_or_path) \
                else repr(str(name_or_path))  # "seed ": the space is the slip, so show it
            raise ConfigError(
                f"{shown}: {what}, and no bundled study of that name "
                f"(bundled: {', '.join(bundled_studies())})"
            )
        text, source = bundled.read_text(encoding="utf-8"), f"{name_or_path}.toml"
    else:
        try:  # utf-8-sig: a byte-order mark some Windows editors write is not a TOML error
            text, source = _read_study_file(path), str(path)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such study file") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: a folder, not a study file") from None
        except UnicodeDecodeError as error:
            # An editor's "Unicode" on Windows is UTF-16: said so, with the fix
            utf16 = error.object[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
            raise ConfigError(f"{path}: not UTF-8 text ({'UTF-16: ' if utf16 else ''}byte "
                              f"{error.start} cannot be read as UTF-8); save it as UTF-8, "
                              "which TOML files are") from None
        except OSError as error:
            raise ConfigError(f"{path}: cannot read ({error})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{source}: not valid TOML ({error})") from None
    except RecursionError:  # tomllib reads nested arrays and tables recursively
        raise ConfigError(f"{source}: not valid TOML (arrays or tables nested too deeply)") \
            from None
    return study_from_dict(raw, source=source)


def study_to_toml(spec: StudySpec) -> str:
    """The resolved study as TOML (every default written out); reads back to an equal spec."""

    def clean(value: Any) -> Any:  # TOML has no null: omit None fields
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if v is not None}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    raw = clean(spec.to_dict())
    for section in ("candidates", "final"):
        raw[section] = [{"name": e["name"], **e["model"], "train": e["train"]} for e in raw[section]]
    return tomli_w.dumps(raw)


def quick_variant(spec: StudySpec) -> StudySpec:
    """A small version of a study for trying things: fewer samples and epochs, same shape."""
    check_spec(spec)
    replace = dataclasses.replace
    try:
        search = None if spec.search is None else _quick_search(
            spec.search, epochs=8, folds=spec.cv.n_splits * spec.cv.repeats)
    except ValidationError as error:  # epochs scaled down to one value, the only one searched
        source = getattr(spec, _SOURCE, None) or "study"
        raise ConfigError(f"{source}: its quick variant (8 epochs at most): "
                          f"{_format_validation_error(error, ('search',))}") from None

    def shorten(candidate: Candidate, epochs: int) -> Candidate:
        train = replace(candidate.train, epochs=min(candidate.train.epochs, epochs))
        return replace(candidate, train=train)

    return derived(
        spec,
        name=_quick_name(spec.name),
        # (6000 training samples, or one per fold where there are more folds)
        data=replace(spec.data, train_limit=min(spec.data.train_limit or 10**9,
                                                max(6000, spec.cv.n_splits)),
                     test_limit=min(spec.data.test_limit or 10**9, 2000)),
        warning=replace(spec.warning, patience=min(spec.warning.patience, 3)),
        candidates=tuple(shorten(c, 8) for c in spec.candidates),
        retrain=replace(spec.retrain, epochs=spec.retrain.epochs  # a rule: read off the curves
                        if isinstance(spec.retrain.epochs, str) else min(spec.retrain.epochs, 8)),
        final=tuple(shorten(c, 3) for c in spec.final),
        search=search,
    )


def _quick_name(name: str) -> str:
    """NAME-quick, NAME shortened where the suffix would pass a name's limits."""
    while len(name) + 6 > MAX_NAME_CHARACTERS or \
            len(safe_name(name).encode()) + 6 > MAX_NAME_BYTES:
        name = name[:-1]
    return f"{name}-quick"


def _fewer_epochs(spec: ParamSpec, epochs: int) -> ParamSpec:
    """A search's `epochs` parameter scaled down to at most `epochs`: its largest value becomes
    `epochs` and the others shrink in proportion (rounded, at least 1), so that the quick
    search still varies what the search varies (cutting off the values above `epochs` could
    leave one, a space that varies nothing), and a step still divides its range."""
    if spec.value is not None:
        return ParamSpec(value=min(int(spec.value), epochs))
    values = spec.choices if spec.choices is not None else (spec.low, spec.high)
    top = max(int(v) for v in values)
    if top <= epochs:
        return spec

    def scaled(value: float) -> int:
        return max(1, round(value * epochs / top))

    if spec.choices is not None:
        short = sorted({scaled(c) for c in spec.choices})
        return dataclasses.replace(spec, choices=tuple(short)) if len(short) > 1 \
            else ParamSpec(value=short[0])
    low, step = scaled(spec.low), None if spec.step is None else scaled(spec.step)
    high = epochs if step is None else low + step * ((epochs - low) // step)
    if low >= high:
        return ParamSpec(value=epochs)
    return dataclasses.replace(spec, low=low, high=high, step=step)


def _quick_search(search: SearchSpec, *, epochs: int, folds: int) -> SearchSpec:
    """A small version of a search (for `--quick`): at most 6 trials, `epochs` epochs; a
    budget of at most what they cost in fold-epochs (each trial trains `folds` folds)."""
    space = dict(search.space)
    if "epochs" in space:
        space["epochs"] = _fewer_epochs(space["epochs"], epochs)
    trials = min(search.n_trials or 6, 6)
    reference = search.reference
    if reference is not None and reference.study is not None:
        # Its folds are the quick study's (fewer images): the same study run with --quick.
        reference = dataclasses.replace(reference, study=_quick_name(reference.study))
    return dataclasses.replace(
        search, space=space, n_trials=trials, startup_trials=min(search.startup_trials, 2),
        reference=reference,
        warmup=min(search.warmup, 2),
        budget=None if search.budget is None else min(search.budget, trials * folds * epochs))
