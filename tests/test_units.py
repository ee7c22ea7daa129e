"""The quantity readers against the regular expressions that define their grammar: the readers
avoid `re` for cron's sake, and must accept and refuse exactly what those expressions do."""

import re

import pytest

from reconciler import units

DURATION = re.compile(r"^(?:\d+(?:ms|s|m|h|d))+$")
DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d)")
SIZE = re.compile(r"^(\d+)(K|M|G|T|Ki|Mi|Gi|Ti)?$")
PERCENT = re.compile(r"^(\d+(?:\.\d+)?)%$")
MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
FACTOR = {None: 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}

DURATIONS = ["90s", "5m", "2h", "1h30m", "7d", "1500ms", "0s", "1ms5s", "1m5ms", "10m\n", "",
             "\n", "s", "5", "5x", "5 m", " 5m", "5m ", "1h30", "ms", "5mss", "5sm", "1m\n\n",
             "٣s", "²s", "1.5s", "-5s", "+5s", "5M", "5S", "1d2h3m4s5ms", "00005m", "5ms\n"]
SIZES = ["2G", "1Gi", "512M", "1024", "0", "2Ki", "2k", "2g", "2G\n", "2G\n\n", "G", "", "2 G",
         "1.5G", "2Gb", "٣M", "²M", "2KiB", "-1", "2Ti", "07K"]
PERCENTS = ["50%", "150%", "0.5%", "50.%", ".5%", "5.5.5%", "%", "", "50", "50%\n", "50 %",
            "٥٠%", "²%", "1e2%", "-5%", "50%%", "0%"]


def expected_seconds(text):
    if not DURATION.match(text):
        return ValueError
    ms = sum(int(n) * MS[unit] for n, unit in DURATION_PART.findall(text))
    return ms // 1000 if ms % 1000 == 0 else ms / 1000


def expected_size(text):
    match = SIZE.match(text)
    return int(match.group(1)) * FACTOR[match.group(2)] if match else ValueError


def expected_percent(text):
    match = PERCENT.match(text)
    return float(match.group(1)) if match else ValueError


def outcome(function, text):
    try:
        return function(text)
    except ValueError:
        return ValueError


@pytest.mark.parametrize("text", DURATIONS)
def test_durations_read_as_their_expression_says(text):
    result = outcome(units.seconds, text)
    assert result == expected_seconds(text)
    assert type(result) is type(expected_seconds(text))  # whole seconds stay ints
    assert outcome(units.seconds, text) == result  # and the remembered answer is the same


@pytest.mark.parametrize("text", SIZES)
def test_sizes_read_as_their_expression_says(text):
    assert outcome(units.size_bytes, text) == expected_size(text)


@pytest.mark.parametrize("text", PERCENTS)
def test_percentages_read_as_their_expression_says(text):
    assert outcome(units.percent, text) == expected_percent(text)


def test_errors_name_the_text_and_an_example():
    with pytest.raises(ValueError, match=r"not a duration: '5x' \(use e.g. 90s"):
        units.seconds("5x")
    with pytest.raises(ValueError, match=r"not a size: '2Gb' \(use e.g. 512M"):
        units.size_bytes("2Gb")
    with pytest.raises(ValueError, match=r"not a percentage: '50' \(use e.g. 50%\)"):
        units.percent("50")


def test_a_duration_is_text():
    with pytest.raises(TypeError):
        units.seconds(5)
    assert units.size_bytes(1024) == 1024  # sizes and percentages read numbers' text
