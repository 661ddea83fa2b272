"""How fashionlab writes numbers, durations, verdicts, errors and names: one home for each.

Torch-free and numpy-free, so that the command line's tables, the report and `runs` format
their text without loading a training stack. Missing or non-finite numbers are shown as "-".
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Any

__all__ = [
    "duration",
    "finite",
    "first_line",
    "number",
    "one_line",
    "percent",
    "plus_minus",
    "safe_name",
    "verdict",
]


def finite(value: Any) -> bool:
    """A real, finite number (bools and None are not numbers here, nor an integer beyond any
    float's range, which no float arithmetic holds)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # 400 nines
        return False


def number(value: Any, spec: str, scale: float = 1.0) -> str:
    """`value * scale` formatted with `spec` ("-" for None, NaN or infinity)."""
    return format(value * scale, spec) if finite(value) else "-"


def percent(value: Any, digits: int = 2) -> str:
    """A fraction as a percentage without the sign: 0.8834 -> "88.34"."""
    return number(value, f".{digits}f", 100.0)


def percent_in(value: Any, low: Any, high: Any, digits: int = 2) -> str:
    """A fraction as a percentage with its interval, where it has one: 0.8835, 0.8771, 0.8896
    -> "88.35 [87.7, 89.0]"; without a finite interval, the percentage alone."""
    if not (finite(value) and finite(low) and finite(high)):
        return percent(value, digits)
    return f"{percent(value, digits)} [{100 * low:.1f}, {100 * high:.1f}]"


def plus_minus(mean: float, std: float, n: int, scale: float = 100.0, digits: int = 1) -> str:
    """"mean ± std" of n values (just the mean when n <= 1), scaled: 0.883, 0.004 -> 88.3 ± 0.4."""
    if not finite(mean):
        return "-"
    if n <= 1:
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def counted(n: int, noun: str) -> str:
    """A count with its noun, singular for one: "1 epoch", "14 epochs", "0 models"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def duration(seconds: float | None) -> str:
    """Seconds as people read them: "42.0 s", "6.8 min", "2.5 h"."""
    if not finite(seconds):
        return "-"
    assert seconds is not None
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def wall_time(seconds: float | None, resumed: bool) -> str:
    """A study run's wall time; after a resume, only the last process's is known."""
    return duration(seconds) + (" in the process that resumed the run (the earlier "
                                "processes not counted)" if resumed else "")


def verdict(*, is_best: bool, not_worse: bool | None, p_holm: float | None,
            reason: str | None = None) -> str:
    """The one sentence that says how a candidate (or trial) fares against the best:
    "best", "not worse (p=0.41)", "worse (p=0.003)" or "not compared (why)"."""
    if is_best:
        return "best"
    if not_worse is None:
        return f"not compared ({reason})" if reason else "not compared"
    return f"{'not worse' if not_worse else 'worse'} (p={number(p_holm, '.3g')})"


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (database drivers add pages of context;
    SQLAlchemy wraps the driver's error as `orig`)."""
    text = str(getattr(error, "orig", None) or error).strip()
    if "\x1b" in text:  # a library's colours for its terminal (torch.onnx's), not for ours
        from rich.text import Text
        text = Text.from_ansi(text).plain.strip()
    return text.splitlines()[0] if text else type(error).__name__


# Unicode's explicit embeddings, overrides and isolates (U+202A-U+202E, U+2066-U+2069): they
# reorder the text after them, so that a name would not read as what it is.
DIRECTION_CONTROLS = frozenset({"LRE", "RLE", "LRO", "RLO", "PDF", "LRI", "RLI", "FSI", "PDI"})


def one_line(text: str) -> str:
    """`text` with what would break or restyle a line escaped as Python writes it: control
    characters (a newline, a terminal's escape), the line and paragraph separators and the
    direction controls ("\\n", "\\x1b", "\\u2028"). For names and paths quoted in errors."""
    def escaped(ch: str) -> str:
        if unicodedata.category(ch) in ("Cc", "Zl", "Zp") \
                or unicodedata.bidirectional(ch) in DIRECTION_CONTROLS:
            return repr(ch)[1:-1]
        return ch

    return "".join(map(escaped, text))


SHOWN_CHARACTERS = 80  # of a wrong value quoted in an error: the line stays one a screen shows


def shortened(text: str, limit: int = SHOWN_CHARACTERS) -> str:
    """`text` cut to `limit` characters, "..." marking the cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def safe_name(name: str) -> str:
    """A model or candidate name as a file or directory name: letters, digits and "-_."
    kept, anything else (spaces, slashes, brackets) replaced by "_"; never "", "." or "..",
    which name no new file."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    return safe if safe.strip(".") else "_" * max(len(safe), 1)


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>&~])")
# What opens a block where the text starts a line or a list item's content ("- NAME: ..."):
# a heading ("# x"), a nested list ("- x", "+ x", "1. x", "2) x").
_MARKDOWN_BLOCK_START = re.compile(r"^(#{1,6}|[-+]|\d{1,9}(?=[.)]))(?=[.)]?(\s|$))")


def markdown_text(name: str) -> str:
    """Text (a name, a message) as literal Markdown: what would emphasise, strike through,
    link, quote code, open an HTML tag, or at the start open a heading or a list is
    backslash-escaped (a table's pipes are escaped by the table)."""
    escaped = _MARKDOWN_SPECIAL.sub(r"\\\1", name)
    match = _MARKDOWN_BLOCK_START.match(escaped)
    if match is None:
        return escaped
    if match.group(1)[0].isdigit():  # "1. x": the dot (or parenthesis) after the number
        end = match.end(1)
        return f"{escaped[:end]}\\{escaped[end:]}"
    return f"\\{escaped}"
