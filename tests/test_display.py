"""Tests of bncourse.display: tables formatted for people."""

import numpy as np
import pytest

from bncourse.display import format_value, show_table


def test_markdown_and_html_formats_by_column():
    table = show_table(
        [("BN", 0.97412, 12.51), ("no BN", 0.9123, 11.0)],
        headers=("model", "accuracy", "time (s)"),
        formats=(None, "{:.1%}", "{:.1f}"),
    )
    assert table.to_markdown().splitlines() == [
        "| model | accuracy | time (s) |",
        "|:---|---:|---:|",
        "| BN | 97.4% | 12.5 |",
        "| no BN | 91.2% | 11.0 |",
    ]
    page = table.to_html()
    assert "overflow-x: auto" in page and "<th" in page and "97.4%" in page
    assert page.count("<tr>") == 3


def test_mapping_rows_and_default_format():
    table = show_table({"a": (1, np.float32(0.123456))}, headers=("name", "n", "value"))
    assert table.rows == (("a", "1", "0.1235"),)
    assert table.numeric == (False, True, True)
    assert format_value(np.int64(7)) == "7" and format_value("x") == "x"


def test_html_escapes_text():
    assert "&lt;b&gt;" in show_table([("<b>",)], headers=("x",)).to_html()


def test_bad_shapes_name_the_argument():
    with pytest.raises(ValueError, match=r"rows\[1\] must have 2 cells"):
        show_table([(1, 2), (3,)], headers=("a", "b"))
    with pytest.raises(ValueError, match="formats must have one entry per header"):
        show_table([(1, 2)], headers=("a", "b"), formats=("{}",))
