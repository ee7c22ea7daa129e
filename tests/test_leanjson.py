"""The enqueue path's JSON reads and writes exactly what `json` does (it avoids importing it)."""

import json
import math

import pytest

from reconciler import leanjson

VALUES = [
    {},
    [],
    {"format": 1, "id": "20261127T021944-3fa2c1d0", "agent": "research-001", "task": "scan",
     "priority": 50, "enqueuedAt": "2026-11-27T02:19:44.123+00:00", "notAfter": None,
     "source": {"kind": "schedule", "name": "research-001-hourly"}, "attempt": 1},
    {"nested": {"empty": {}, "list": [], "deep": [[1, [2, {"x": [None, True, False]}]]]}},
    {"text": "quote \" backslash \\ tab \t newline \n nul \0 bell \x07 del \x7f",
     "unicode": "naïve – ✓ 😀 \u2028 \ud800", "key ✓": "v"},
    [0, -1, 2**70, -(2**70), 1.5, -0.0, 1e-300, 1e300, 0.1 + 0.2],
    "just a string",
    42,
    None,
    True,
    (1, "tuple", ()),
]


@pytest.mark.parametrize("value", VALUES)
def test_writes_what_json_writes_with_an_indent_of_two(value):
    assert leanjson.dumps(value) == json.dumps(value, indent=2)


def test_writes_non_finite_floats_as_json_does():
    value = [math.nan, math.inf, -math.inf]
    assert leanjson.dumps(value) == json.dumps(value, indent=2)


@pytest.mark.parametrize("value", [{1: "int key"}, {"set": {1, 2}}, [object()], b"bytes"])
def test_refuses_what_is_not_plain_data(value):
    with pytest.raises(TypeError):
        leanjson.dumps(value)


@pytest.mark.parametrize("value", VALUES)
def test_reads_back_what_json_reads(value):
    text = json.dumps(value, indent=2)
    assert leanjson.loads(text) == json.loads(text)
    compact = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    assert leanjson.loads(compact) == json.loads(compact)


@pytest.mark.parametrize("text", [
    ' \t\n\r{"a": 1} \n', "[1, 2]", '"s"', "0", "-1.5e3", "NaN", "-Infinity", "null",
    '{"a": {"b": [1, {"c": "\\u00e9\\ud83d\\ude00"}]}}', '{"dup": 1, "dup": 2}',
])
def test_reads_valid_text_as_json_does(text):
    expected = json.loads(text)
    result = leanjson.loads(text)
    if isinstance(expected, float) and math.isnan(expected):
        assert math.isnan(result)
    else:
        assert result == expected


@pytest.mark.parametrize("text", [
    "", "   ", "{", '{"a": 1', '{"a": 1}}', '{"a": 1} x', "[1, 2,]", '{"a": 1,}', "{'a': 1}",
    "\ufeff{}", '"unterminated', '"control \x01 char"', "01", "tru", "[1] [2]", "nan",
    '{"a" 1}', "\x00",
])
def test_refuses_what_json_refuses_with_a_value_error(text):
    with pytest.raises(ValueError) as expected:
        json.loads(text)
    with pytest.raises(ValueError) as refused:
        leanjson.loads(text)
    assert str(refused.value) == str(expected.value)


def test_without_the_accelerator_it_is_json_itself(monkeypatch):
    """On a Python without CPython's `_json`, the module hands over to `json`."""
    monkeypatch.setattr(leanjson, "_scan", None)
    monkeypatch.setattr(leanjson, "_quote", None)
    record = VALUES[2]
    assert leanjson.dumps(record) == json.dumps(record, indent=2)
    assert leanjson.loads(json.dumps(record)) == record
    with pytest.raises(ValueError):
        leanjson.loads("{")
