"""How numbers, durations, verdicts, errors and names are written (fashionlab.text)."""

from __future__ import annotations

import math

import pytest

from fashionlab import text


@pytest.mark.parametrize("value, expected", [
    (0.88346, "88.35"), (1.0, "100.00"), (None, "-"), (math.nan, "-"), (math.inf, "-"),
    (True, "-"),
])
def test_percent(value, expected):
    assert text.percent(value) == expected


def test_number_and_plus_minus():
    assert text.number(0.1234, ".2f") == "0.12"
    assert text.number(0.1234, "+.1f", 100) == "+12.3"
    assert text.plus_minus(0.883, 0.004, 5) == "88.3 ± 0.4"
    assert text.plus_minus(0.883, 0.004, 1) == "88.3"  # one value: no spread to show
    assert text.plus_minus(0.3291, 0.0112, 5, 1.0, 3) == "0.329 ± 0.011"
    assert text.plus_minus(math.nan, 0.0, 5) == "-"


@pytest.mark.parametrize("seconds, expected", [
    (42.04, "42.0 s"), (119.9, "119.9 s"), (408, "6.8 min"), (9000, "2.5 h"), (None, "-"),
])
def test_duration(seconds, expected):
    assert text.duration(seconds) == expected


def test_the_one_verdict_sentence():
    assert text.verdict(is_best=True, not_worse=None, p_holm=None) == "best"
    assert text.verdict(is_best=False, not_worse=True, p_holm=0.1061) == "not worse (p=0.106)"
    assert text.verdict(is_best=False, not_worse=False, p_holm=0.0357) == "worse (p=0.0357)"
    assert text.verdict(is_best=False, not_worse=None, p_holm=None,
                        reason="fewer than 2 folds") == "not compared (fewer than 2 folds)"
    assert text.verdict(is_best=False, not_worse=None, p_holm=None) == "not compared"


def test_first_line_of_an_error():
    assert text.first_line(ValueError("bad value\nwith details")) == "bad value"
    assert text.first_line(KeyError()) == "KeyError"

    class Wrapped(Exception):  # SQLAlchemy keeps the driver's error as `orig`
        orig = OSError("disk full\ncontext")

    assert text.first_line(Wrapped("statement ...")) == "disk full"


def test_safe_name_keeps_names_readable_and_paths_flat():
    assert text.safe_name("dense(256)x2 dropout") == "dense_256_x2_dropout"
    assert text.safe_name("../etc/passwd") == ".._etc_passwd"
    assert text.safe_name("fast-cnn_v1.2") == "fast-cnn_v1.2"


@pytest.mark.parametrize("name", [
    "1. first", "12) twelfth", "# heading", "###", "- dash", "+ plus", "~~struck~~", "3.",
    "a_b*c", "<b>bold</b>", "[link](x)", "`code`", "&amp;", "1.5M params", "#tag",
])
def test_markdown_text_is_literal_as_a_list_items_start_and_inline(name: str):
    from html import escape

    from markdown_it import MarkdownIt  # rich's Markdown parser

    parser = MarkdownIt("commonmark").enable(["table", "strikethrough"])
    item = parser.render(f"- {text.markdown_text(name)}: a note\n")
    assert item == f"<ul>\n<li>{escape(name, quote=False)}: a note</li>\n</ul>\n"
    line = parser.render(f"{text.markdown_text(name)}\n")
    assert line == f"<p>{escape(name, quote=False)}</p>\n"


def test_a_count_of_one_takes_the_singular():
    assert [text.counted(n, "epoch") for n in (0, 1, 2)] == ["0 epochs", "1 epoch", "2 epochs"]
