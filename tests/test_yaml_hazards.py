"""YAML hazards: each one is a clean diagnostic, never a traceback, a hang or a crash.

Every case runs `spos validate --json` in its own process with a timeout: a hang or a segfault
of the YAML parser fails that case instead of the whole suite. Inputs are generated here, not
stored: some are megabytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from reconciler import source

TIMEOUT_SECONDS = 10

MANIFEST = """\
apiVersion: spos/v1
kind: Quota
metadata:
  name: probe
spec:
  memory: 1G
"""


def write(tmp_path: Path, content: str | bytes | Callable[[Path], None]) -> None:
    """`content` as agents.d/x.yaml, or made there by a function of that path."""
    manifests = tmp_path / "agents.d"
    manifests.mkdir()
    target = manifests / "x.yaml"
    if callable(content):
        content(target)
    elif isinstance(content, bytes):
        target.write_bytes(content)
    else:
        target.write_text(content)


def report(code: int, stdout: str) -> tuple[int, list[tuple]]:
    diagnostics = json.loads(stdout)["diagnostics"]
    return code, [(d["file"], d["line"], d["col"], d["summary"], d["hint"]) for d in diagnostics]


@pytest.fixture
def isolated(tmp_path):
    """`spos validate --json` on `content` as agents.d/x.yaml, in a fresh process with a timeout:
    for inputs that could hang or crash the parser. Returns the exit code and the diagnostics
    as (file, line, col, summary, hint)."""

    def run(content: str | bytes) -> tuple[int, list[tuple]]:
        write(tmp_path, content)
        try:
            done = subprocess.run(
                [sys.executable, "-m", "reconciler", "validate", "agents.d", "--json"],
                cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_SECONDS,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"spos validate took more than {TIMEOUT_SECONDS}s")
        assert done.returncode in (0, 1), f"exit {done.returncode} (crashed?)\n{done.stderr[-2000:]}"
        assert done.stderr == "", done.stderr[-2000:]
        return report(done.returncode, done.stdout)

    return run


@pytest.fixture
def in_process(tmp_path, monkeypatch, spos):
    """The same, in this process: for inputs that are merely wrong."""

    def run(content: str | bytes) -> tuple[int, list[tuple]]:
        write(tmp_path, content)
        monkeypatch.chdir(tmp_path)
        result = spos("validate", "agents.d", "--json")
        assert result.err == ""
        return report(result.code, result.out)

    return run


def only(run, content: str | bytes) -> tuple:
    """The single diagnostic that `content` gets."""
    code, diagnostics = run(content)
    assert code == 1
    assert len(diagnostics) == 1, diagnostics
    return diagnostics[0]


BOMB = f"document expands to more than {source.MAX_EXPANDED_NODES} nodes (alias or merge bomb?)"
TOO_DEEP = f"YAML nesting deeper than {source.MAX_DEPTH} levels"
RECURSIVE = "recursive YAML alias: a node refers to itself"


def test_billion_laughs(isolated):
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for previous, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
    # a is 10 nodes, b 91, c 820, d 7,381, e 66,430: f (line 6) is the first over 100,000.
    assert only(isolated, "\n".join(lines) + "\n") == ("agents.d/x.yaml", 6, 4, BOMB, "")


def test_merge_key_bomb(isolated):
    lines = ["m0: &m0 {k0: v, k1: v}"]
    for level in range(1, 30):
        merged = ", ".join([f"*m{level - 1}"] * 10)
        lines += [f"m{level}: &m{level}", f"  <<: [{merged}]", f"  x{level}: 1"]
    # Ten merges per level: m4 has 55,555 nodes, so the merge list of m5 (line 15) is too many.
    assert only(isolated, "\n".join(lines) + "\n") == ("agents.d/x.yaml", 15, 7, BOMB, "")


@pytest.mark.parametrize("content, col", [
    ("a: &a [*a]\n", 4),
    ("a: &a {b: *a}\n", 4),
    ("a: &a\n  <<: *a\n", 4),
])
def test_recursive_aliases(isolated, content, col):
    assert only(isolated, content) == ("agents.d/x.yaml", 1, col, RECURSIVE, "")


def test_duplicate_keys_point_at_the_second_key(in_process):
    content = MANIFEST + "  cpu: '10%'\n  memory: 2G\n"
    assert only(in_process, content) == (
        "agents.d/x.yaml", 8, 3,
        'invalid YAML: while constructing a mapping found duplicate key "memory" with value "2G" '
        '(original value: "1G")', "",
    )


@pytest.mark.parametrize("tagged, tag", [
    ("!!python/object:os.system {}", "tag:yaml.org,2002:python/object:os.system"),
    ("!!python/object/apply:os.system [id]", "tag:yaml.org,2002:python/object/apply:os.system"),
    ("!!python/name:os.system", "tag:yaml.org,2002:python/name:os.system"),
    ("!include other.yaml", "!include"),
    ("!<tag:example.com,2000:thing> x", "tag:example.com,2000:thing"),
    ("!!binary aGVsbG8=", "tag:yaml.org,2002:binary"),
    ("!!set {a, b}", "tag:yaml.org,2002:set"),
    ("!!omap [a: 1]", "tag:yaml.org,2002:omap"),
    ("!!pairs [a: 1]", "tag:yaml.org,2002:pairs"),
])
def test_tags_outside_the_core_schema(in_process, tagged, tag):
    content = MANIFEST.replace("  memory: 1G", f"  memory: {tagged}")
    assert only(in_process, content) == (
        "agents.d/x.yaml", 6, 11, f"invalid YAML: the tag {tag!r} is not allowed in manifests", "",
    )


@pytest.mark.parametrize("tagged, summary", [
    ('!!int "x"', "'x' is not an integer, as its tag !!int says"),
    ("!!int 1.5", "'1.5' is not an integer, as its tag !!int says"),
    ("!!float many", "'many' is not a number, as its tag !!float says"),
    ("!!bool maybe", "'maybe' is not a boolean, as its tag !!bool says"),
    ("!!int", "'' is not an integer, as its tag !!int says"),
])
def test_a_core_tag_on_a_value_it_does_not_fit(in_process, tagged, summary):
    content = MANIFEST.replace("  memory: 1G", f"  memory: {tagged}")
    assert only(in_process, content) == ("agents.d/x.yaml", 6, 11, f"invalid YAML: {summary}", "")


@pytest.mark.parametrize("number", ["9" * 5000, "0x" + "f" * 5000, "1" * 101])
def test_integers_too_long_to_mean_anything(isolated, number):
    content = MANIFEST.replace("  memory: 1G", f"  tasksMax: {number}")
    assert only(isolated, content) == (
        "agents.d/x.yaml", 6, 13,
        f"invalid YAML: {number[:12]}... has more than {source.MAX_NUMBER_CHARS} characters: "
        "no field takes a number that large", "",
    )


def test_yaml_1_1_directive(in_process):
    assert only(in_process, "%YAML 1.1\n---\n" + MANIFEST) == (
        "agents.d/x.yaml", 1, 1, "unsupported YAML version directive %YAML 1.1",
        "manifests are YAML 1.2; remove the directive (YAML 1.1 reads `no` as false and 0755 as octal)",
    )


def test_yaml_1_2_directive_is_fine(in_process):
    assert in_process("%YAML 1.2\n---\n" + MANIFEST) == (0, [])


def test_yaml_1_1_booleans_are_strings(in_process):
    content = """\
apiVersion: spos/v1
kind: Schedule
metadata:
  name: probe
spec:
  agent: probe
  task: tick
  cron: "0 * * * *"
  suspend: no
"""
    assert only(in_process, content) == (
        "agents.d/x.yaml", 9, 3, "expected a boolean, got the string 'no'", "",
    )


@pytest.mark.parametrize("content", [
    "x: " + "[" * 50_000 + "]" * 50_000 + "\n",
    "x: " + "{a: " * 50_000 + "1" + "}" * 50_000 + "\n",
    "[" * 50_000 + "\n",
    "- " * 30_000 + "x\n",
    "? " * 30_000 + "x\n",
    "".join(" " * level + f"k{level}:\n" for level in range(1_200)),
], ids=["flow-lists", "flow-mappings", "unclosed", "block-sequences", "complex-keys", "indentation"])
def test_absurd_nesting_is_refused_before_the_parser_recurses(isolated, content):
    """The C parser recurses once per level and crashes past ~20,000: the pre-scan refuses
    anything near that before parsing."""
    assert only(isolated, content) == ("agents.d/x.yaml", 1, 1, TOO_DEEP, "")


def test_deep_nesting_the_pre_scan_lets_through_is_refused_where_it_gets_too_deep(isolated):
    # The root mapping is level 0, the list opened at column 4 level 1: level 65 opens at column 68.
    content = "x: " + "[" * 100 + "]" * 100 + "\n"
    assert only(isolated, content) == ("agents.d/x.yaml", 1, 68, TOO_DEEP, "")


def test_a_file_over_one_mebibyte(isolated):
    content = MANIFEST + "# padding\n" * (2 * 1024 * 1024 // 10)
    assert only(isolated, content) == (
        "agents.d/x.yaml", 1, 1, f"file is larger than {source.MAX_FILE_BYTES} bytes", "",
    )


def test_a_very_long_single_line(isolated):
    assert only(isolated, "x: " + "a" * (source.MAX_FILE_BYTES + 1) + "\n") == (
        "agents.d/x.yaml", 1, 1, f"file is larger than {source.MAX_FILE_BYTES} bytes", "",
    )


def test_a_long_line_under_the_limit_is_read(isolated):
    content = MANIFEST.replace("  memory: 1G", f"  memory: {'9' * 900_000}G")
    assert isolated(content) == (0, [])


def test_absurdly_many_documents(isolated):
    content = "a: 1\n---\n" * (source.MAX_DOCUMENTS + 5)
    line = 2 * source.MAX_DOCUMENTS + 1
    assert only(isolated, content) == (
        "agents.d/x.yaml", line, 1, f"more than {source.MAX_DOCUMENTS} documents in one file",
        "split the file",
    )


def test_many_problems_in_one_file_are_located_in_bounded_time(isolated):
    """Each problem's line and column come from one re-parse of the file, not one per problem."""
    keys = "".join(f"  unknown{n}: 1\n" for n in range(10_000))
    code, diagnostics = isolated(MANIFEST + keys)
    assert code == 1 and len(diagnostics) == 10_000
    assert diagnostics[-1][:4] == ("agents.d/x.yaml", 10_006, 3, "unknown field 'unknown9999'")


@pytest.mark.parametrize("key, summary, hint", [
    ("1", "mapping key 1 is read as a number, not a string", 'quote it: "1"'),
    ("1.5", "mapping key 1.5 is read as a number, not a string", 'quote it: "1.5"'),
    ("true", "mapping key true is read as a boolean, not a string", 'quote it: "true"'),
    ("null", "mapping key null is read as null, not a string", 'quote it: "null"'),
    ("[a, b]", "a mapping key must be a string, not a list", ""),
    ("{a: b}", "a mapping key must be a string, not a mapping", ""),
])
def test_mapping_keys_must_be_strings(in_process, key, summary, hint):
    content = MANIFEST.replace("spec:\n", f"spec:\n  env:\n    ? {key}\n    : value\n")
    assert only(in_process, content) == ("agents.d/x.yaml", 7, 7, summary, hint)


def test_control_characters_in_the_file_itself(in_process):
    content = MANIFEST.replace("name: probe", "name: pro\x00be")
    assert only(in_process, content) == (
        "agents.d/x.yaml", 4, 12, "invalid YAML: control characters are not allowed: '\\x00'", "",
    )


def test_a_file_that_is_not_utf8(in_process):
    assert only(in_process, MANIFEST.encode() + b"# caf\xe9\n") == (
        "agents.d/x.yaml", 1, 1, "file is not valid UTF-8", "",
    )


def test_tabs_for_indentation(in_process):
    assert only(in_process, MANIFEST.replace("  memory", "\tmemory")) == (
        "agents.d/x.yaml", 6, 1,
        "invalid YAML: while scanning for the next token found character that cannot start any token",
        "",
    )


def test_an_undefined_alias(in_process):
    assert only(in_process, MANIFEST.replace("memory: 1G", "memory: *size")) == (
        "agents.d/x.yaml", 6, 11, "invalid YAML: found undefined alias", "",
    )


@pytest.mark.parametrize("text, value", [
    ("2024-01-01", "2024-01-01"),
    ("=", "="),
    ("0755", 755),
    ("0o17", 15),
    ("no", "no"),
    ("on", "on"),
    ("1:30", "1:30"),
    ("~", None),
])
def test_scalars_are_read_as_yaml_1_2(text, value):
    documents, problems = source.parse(f"x: {text}\n", "x.yaml")
    assert problems == []
    assert documents[0].data == {"x": value}


@pytest.mark.parametrize("text, shown", [(".inf", "inf"), ("-.inf", "-inf"), (".nan", "nan")])
def test_infinite_numbers_are_refused(in_process, text, shown):
    content = """\
apiVersion: spos/v1
kind: Trigger
metadata:
  name: probe
spec:
  agent: probe
  task: tick
  condition: {metric: cpu_temp, above: %s}
""" % text
    assert only(in_process, content) == ("agents.d/x.yaml", 8, 33, f"{shown} is not a finite number", "")


@pytest.mark.parametrize("make, where, summary", [
    (lambda path: path.symlink_to("/dev/zero"), "agents.d/x.yaml", "not a regular file"),
    (lambda path: os.mkfifo(path), "agents.d/x.yaml", "not a regular file"),
    (lambda path: path.symlink_to(path.parent / "gone.yaml"), "agents.d/gone.yaml",
     "cannot read the file: No such file or directory"),
], ids=["dev-zero", "fifo", "dangling-symlink"])
def test_files_that_never_end_or_do_not_exist(isolated, make, where, summary):
    """A symlink to a file in the project is reported at its target (the file to fix)."""
    assert only(isolated, make) == (where, 1, 1, summary, "")
