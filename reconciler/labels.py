"""The device's labels, which Agents' selectors match (docs/manifests.md, "Device labels").

A device's labels come from two places: the operator's file `device-labels.yaml` in spos's
state directory (a YAML map, label key -> string value) and the facts spos finds itself,
`spos.dev/hostname` and `spos.dev/arch`. The `spos.dev/` prefix belongs to those facts: the
file may not use it. `--device-labels k=v,k2=v2` gives the complete set instead (file and
facts are not read), so that CI can plan for any device from anywhere.

Keys and values follow the label rules of schemas/common.schema.json (`labelKey`,
`labelValue`), as metadata labels do. A problem in the file is a ManifestError whose
diagnostics name the file, line and column: nothing is planned or applied.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from typing import Callable

from reconciler import STATE_DIR
from reconciler.device import Device
from reconciler.diagnostics import Diagnostic
from reconciler.errors import ManifestError, UsageError


class LabelsError(UsageError):
    """The device's labels cannot be used (the --device-labels value, its host name): a
    problem of the device, not of the manifests."""
from reconciler.source import locate, parse, schemas_path

LABELS_FILE = f"/{STATE_DIR}/device-labels.yaml"
HOSTNAME = "spos.dev/hostname"
ARCH = "spos.dev/arch"
RESERVED_PREFIX = "spos.dev"
"""Label keys with this prefix (or a subdomain of it) are the facts spos sets itself."""

ARCHITECTURES = {
    "x86_64": "amd64", "amd64": "amd64",
    "aarch64": "arm64", "arm64": "arm64",
    "i386": "386", "i486": "386", "i586": "386", "i686": "386", "x86": "386",
    "loongarch64": "loong64",
}
"""The machine name (`uname -m`, platform.machine()) -> the name Kubernetes (Go's GOARCH)
uses; 32-bit ARM is `arm`, and anything else keeps its own name, lower case (ppc64le, s390x,
riscv64)."""


def device_labels(device: Device, given: str | None = None,
                  uname: Callable[[], os.uname_result] = os.uname) -> dict[str, str]:
    """The device's labels: `given` (the text of `--device-labels`) when it is not None, else
    the labels file under the device's root and spos's facts about the device, the machine's
    from `uname` (its `nodename` and `machine`: what socket.gethostname() and
    platform.machine() return, without importing them)."""
    if given is not None:
        return parse_option(given)
    machine = uname()
    labels = read_file(device)
    labels[HOSTNAME] = hostname(device, machine.nodename)
    if machine.machine:
        labels[ARCH] = architecture(machine.machine)
    return labels


def read_file(device: Device) -> dict[str, str]:
    """The operator's labels from LABELS_FILE ({} when there is none), or a ManifestError
    naming every problem with its line and column."""
    raw = device.read_bytes(LABELS_FILE)
    if raw is None:
        return {}
    name = device.host(LABELS_FILE)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ManifestError([Diagnostic(name, line, 1, "the labels file is not UTF-8 text")]) from None
    documents, problems = parse(text, name)
    if problems:
        raise ManifestError(problems)
    if not documents:
        return {}
    if len(documents) > 1:
        raise ManifestError([Diagnostic(
            name, documents[1].line, 1, "the labels file holds more than one YAML document",
            hint="put every label in one mapping")])
    data = documents[0].data
    if not isinstance(data, dict):
        raise ManifestError([Diagnostic(
            name, documents[0].line, 1, "the labels file must be a mapping of label -> value",
            hint="write one `key: value` line per label, e.g. `role: research`")])
    diagnostics = []
    for key, value in data.items():
        summary, hint = _key_problem(key, reserved=True)
        if not summary:
            summary, hint = _value_problem(key, value)
        if summary:
            line, col = locate(text, documents[0].index, (key,))
            diagnostics.append(Diagnostic(name, line, col, summary, field_path=key, hint=hint))
    if diagnostics:
        raise ManifestError(diagnostics)
    return dict(data)


def parse_option(text: str) -> dict[str, str]:
    """`k=v,k2=v2` as `--device-labels` takes it: the complete label set, `spos.dev/` facts
    included when given; the empty string is a device without labels."""
    labels: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, equals, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not equals:
            raise LabelsError(f"--device-labels: {item!r} is not KEY=VALUE")
        if key in labels:
            raise LabelsError(f"--device-labels: {key!r} is given twice")
        summary, hint = _key_problem(key, reserved=False)
        if not summary:
            summary, hint = _value_problem(key, value)
        if summary:
            raise LabelsError(f"--device-labels: {summary}" + (f" ({hint})" if hint else ""))
        labels[key] = value
    return labels


def hostname(device: Device, machine_hostname: str) -> str:
    """`spos.dev/hostname`: for a --root other than /, the first name in ROOT/etc/hostname if
    there is one, else `machine_hostname`; lower case (host names ignore case)."""
    found = None
    if str(device.root) != "/":
        text = device.read_text("/etc/hostname") or ""
        found = next((line.strip() for line in text.splitlines()
                      if line.strip() and not line.lstrip().startswith("#")), None)
    name = (found or machine_hostname).lower()
    if not _rules()["value"].fullmatch(name) or len(name) > _rules()["value_length"]:
        raise LabelsError(
            f"the host name {name!r} is not a valid label value for {HOSTNAME} (at most "
            f"{_rules()['value_length']} letters, digits, '.', '_' and '-'); give the device's "
            "labels with --device-labels"
        )
    return name


def architecture(machine: str) -> str:
    """`spos.dev/arch` for a machine name: amd64, arm64, arm, 386, or the name itself."""
    machine = machine.lower()
    if machine in ARCHITECTURES:
        return ARCHITECTURES[machine]
    if machine.startswith("arm"):
        return "arm"
    return machine


def _key_problem(key: str, reserved: bool) -> tuple[str, str]:
    """(summary, hint) of what is wrong with a label key, ("", "") when nothing is."""
    rules = _rules()
    if len(key) > rules["key_length"] or not rules["key"].fullmatch(key):
        return (f"{key!r} is not a valid label key",
                "an optional DNS-subdomain prefix and '/', then a name of at most 63 letters, "
                "digits, '-', '_' and '.' that starts and ends with a letter or digit")
    prefix = key.rpartition("/")[0]
    if reserved and (prefix == RESERVED_PREFIX or prefix.endswith("." + RESERVED_PREFIX)):
        return (f"label key {key!r} uses the {RESERVED_PREFIX}/ prefix, which spos keeps for "
                f"the labels it sets itself ({HOSTNAME}, {ARCH})",
                "use a prefix of your own, such as example.org/, or none")
    return "", ""


def _value_problem(key: str, value) -> tuple[str, str]:
    rules = _rules()
    if not isinstance(value, str):
        shown = "null" if value is None else json.dumps(value, default=str)
        return (f"the value of label {key!r} is {shown}, not a string",
                'quote it (`"1"`, `"true"`); write "" for an empty value')
    if len(value) > rules["value_length"] or not rules["value"].fullmatch(value):
        return (f"{value!r} is not a valid value for label {key!r}",
                f"at most {rules['value_length']} letters, digits, '.', '_' and '-'")
    return "", ""


@lru_cache(maxsize=1)
def _rules() -> dict:
    """The label key and value rules of schemas/common.schema.json, so that device labels
    follow exactly the rules metadata labels do."""
    with open(os.path.join(schemas_path(), "common.schema.json")) as handle:
        definitions = json.load(handle)["$defs"]
    key, value = definitions["labelKey"], definitions["labelValue"]
    return {
        "key": re.compile(key["pattern"]), "key_length": key["maxLength"],
        "value": re.compile(value["pattern"]), "value_length": value["maxLength"],
    }
