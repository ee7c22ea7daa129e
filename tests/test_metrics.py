"""`spos metrics` shows a scraper what the device's state files say (reconciler/metrics.py).

One fixed device state is laid out by hand in a temporary root, the way the executor, the
trigger daemon and the sync loop leave it: run records in an agent's queue/, active/,
completed/ and failed/ (docs/queue.md, docs/executor.md), `triggerd/status.json`
(docs/triggers.md) and `sync/state.json` (docs/sync.md). Each test reads the exposition as a
scraper would, parsed with prometheus_client's own parsers, and checks exact samples. The
HTTP server and the textfile loop run as real processes and are stopped with SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families
from fixed_state import AGENT, APPLIED, HOUR, MIB, NOW, STATE, DeviceState, attempt, build, iso
from waiting import wait_for

from reconciler import metrics
from reconciler.device import Device

WAIT = 10


@pytest.fixture
def device(device_root) -> DeviceState:
    return build(device_root)


def samples(text: str, parse=text_string_to_metric_families) -> dict[tuple, float]:
    """{(sample name, ((label, value), ...)): value} of an exposition."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in parse(text) for sample in family.samples}


def values(found: dict[tuple, float], name: str, **labels) -> dict[tuple, float]:
    """The samples named `name` whose labels include `labels`, keyed by their other labels."""
    return {tuple(value for key, value in key_labels if key not in labels): value
            for (sample, key_labels), value in found.items()
            if sample == name and labels.items() <= dict(key_labels).items()}


def without_scrape_time(text: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True)
                   if not line.startswith("spos_scrape_duration_seconds "))


# -- what a scrape shows -------------------------------------------------------------------------


def test_runs_by_state_queue_depth_and_read_errors(device):
    found = samples(metrics.exposition(Device(device.root)))

    assert values(found, "spos_runs", agent=AGENT, task="daily_scan") == {
        ("queued",): 1, ("active",): 0, ("completed",): 2, ("failed",): 0, ("timeout",): 1,
        ("cancelled",): 0, ("skipped",): 0, ("expired",): 1}
    assert values(found, "spos_runs", agent=AGENT, task="weekly_report") == {
        ("queued",): 1, ("active",): 1, ("completed",): 0, ("failed",): 0, ("timeout",): 0,
        ("cancelled",): 1, ("skipped",): 0, ("expired",): 0}
    assert values(found, "spos_runs", agent="idle-001") == {}
    assert values(found, "spos_queue_depth") == {(AGENT,): 2, ("idle-001",): 0}
    assert values(found, "spos_active_runs") == {(AGENT,): 1, ("idle-001",): 0}
    assert values(found, "spos_run_read_errors") == {(AGENT,): 1, ("idle-001",): 0}  # the torn record


def test_an_agent_directory_that_is_a_link_is_counted_not_followed(device, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    for bucket in ("queue", "active", "completed", "failed"):
        (elsewhere / bucket).mkdir(parents=True)
    (device.root / STATE / "agents" / "linked-001").symlink_to(elsewhere)

    found = samples(metrics.exposition(Device(device.root)))

    assert values(found, "spos_run_read_errors") == {(AGENT,): 1, ("idle-001",): 0, ("linked-001",): 4}
    assert values(found, "spos_queue_depth", agent=AGENT) == {(): 2}


def test_attempts_retries_and_resource_usage_per_task(device):
    found = samples(metrics.exposition(Device(device.root)))

    assert values(found, "spos_run_attempts", agent=AGENT, task="daily_scan") == {
        ("completed",): 2, ("failed",): 2, ("timeout",): 1}
    assert values(found, "spos_run_attempts", agent=AGENT, task="weekly_report") == {
        ("cancelled",): 1, ("interrupted",): 1}
    assert values(found, "spos_run_retries", agent=AGENT) == {("daily_scan",): 2, ("weekly_report",): 1}
    # weekly_report's attempts recorded no usage: no sample rather than a made-up 0
    assert values(found, "spos_run_cpu_seconds", agent=AGENT) == {("daily_scan",): 6.75}
    assert values(found, "spos_run_memory_peak_bytes", agent=AGENT) == {("daily_scan",): 200 * MIB}
    assert values(found, "spos_run_io_bytes", agent=AGENT, task="daily_scan") == {
        ("read",): 3015, ("write",): 1525}
    # only one attempt ran on a link of its own; the others left network bytes out
    assert values(found, "spos_run_network_bytes", agent=AGENT) == {
        ("sent", "daily_scan"): 5000, ("received", "daily_scan"): 70000}


def test_durations_of_finished_runs_as_a_gauge_histogram(device):
    text = metrics.exposition(Device(device.root))
    found = samples(text)

    assert "# TYPE spos_run_duration_seconds histogram" in text
    # 12.5 s; 0.5 + 40 s over two attempts; 4000 s; the expired run never started
    assert values(found, "spos_run_duration_seconds_bucket", agent=AGENT, task="daily_scan") == {
        ("1",): 0, ("5",): 0, ("15",): 1, ("60",): 2, ("300",): 2, ("900",): 2, ("3600",): 2, ("+Inf",): 3}
    assert values(found, "spos_run_duration_seconds_gcount", agent=AGENT) == {
        ("daily_scan",): 3, ("weekly_report",): 1}
    assert values(found, "spos_run_duration_seconds_gsum", agent=AGENT) == {
        ("daily_scan",): 4053.0, ("weekly_report",): 7.0}
    assert values(found, "spos_run_last_duration_seconds", agent=AGENT) == {
        ("daily_scan",): 4000.0, ("weekly_report",): 7.0}
    assert values(found, "spos_run_last_end_timestamp_seconds", agent=AGENT, task="daily_scan") == {
        ("completed",): NOW - 2 * HOUR, ("timeout",): NOW - HOUR, ("expired",): NOW - 0.5 * HOUR}


def test_trigger_counts_and_which_triggers_are_up(device):
    found = samples(metrics.exposition(Device(device.root)))
    github, drop, broken = "research-001-github", "research-001-drop", "research-001-broken"

    assert values(found, "spos_triggers_daemon_up") == {(): 1}
    assert values(found, "spos_trigger_up") == {(github,): 1, (drop,): 0, (broken,): 0}
    assert values(found, "spos_trigger_events_total") == {(github,): 9, (drop,): 0}
    assert values(found, "spos_trigger_outcomes_total", trigger=github) == {
        ("queued",): 4, ("debounced",): 0, ("duplicate",): 2, ("limited",): 1, ("skipped",): 1,
        ("disabled",): 0, ("error",): 1}
    assert values(found, "spos_trigger_last_fired_timestamp_seconds") == {(github,): NOW - 600}
    assert found[("spos_trigger_info", (("agent", AGENT), ("task", "daily_scan"), ("trigger", github),
                                        ("type", "webhook")))] == 1


def test_a_stopped_trigger_daemon_is_down_and_keeps_its_last_counts(device):
    status_file = device.root / STATE / "triggerd/status.json"
    status = json.loads(status_file.read_text())
    status["stoppedAt"] = iso(NOW)
    status_file.write_text(json.dumps(status))

    found = samples(metrics.exposition(Device(device.root)))

    assert values(found, "spos_triggers_daemon_up") == {(): 0}
    assert set(values(found, "spos_trigger_up").values()) == {0}
    assert values(found, "spos_trigger_outcomes_total", trigger="research-001-github", outcome="queued") == {(): 4}


def test_numbers_no_process_wrote_in_the_trigger_status_are_left_out(device):
    """A pid beyond any Linux hands out and a 400-digit count (a hand-edited status file) make
    no traceback: the daemon is down and the count is not shown."""
    status_file = device.root / STATE / "triggerd/status.json"
    status = json.loads(status_file.read_text())
    status["pid"] = 2 ** 64
    status["triggers"]["research-001-github"]["events"] = 10 ** 400
    status_file.write_text(json.dumps(status))

    found = samples(metrics.exposition(Device(device.root)))

    assert values(found, "spos_triggers_daemon_up") == {(): 0}
    assert "research-001-github" not in {key[0] for key in values(found, "spos_trigger_events_total")}


def test_sync_outcome_applied_revision_quarantine_and_drift_repairs(device):
    found = samples(metrics.exposition(Device(device.root)))

    assert values(found, "spos_sync_last_outcome") == {
        ("applied",): 0, ("unchanged",): 0, ("quarantined",): 1, ("skipped",): 0, ("refused",): 0,
        ("failed",): 0}
    assert values(found, "spos_sync_last_timestamp_seconds") == {(): NOW - 60}
    assert values(found, "spos_sync_last_failure_timestamp_seconds") == {(): NOW - 60}
    assert values(found, "spos_sync_applied_info") == {(APPLIED,): 1}
    assert values(found, "spos_sync_applied_timestamp_seconds") == {(): NOW - 2 * HOUR}
    assert values(found, "spos_sync_quarantined_revisions") == {(): 2}
    assert values(found, "spos_drift_repairs_total") == {(): 3}
    assert values(found, "spos_drift_last_check_timestamp_seconds") == {(): NOW - 30}
    assert values(found, "spos_executor_up") == {(): 0}
    assert found[("spos_scrape_duration_seconds", ())] >= 0


def test_trend_and_flags_per_task(device):
    for n in range(10):  # runs that lately take three times as long
        seconds = 10.0 if n < 5 else 30.0
        device.run("trend-001", "slowing", "completed", "completed", ended_hours_ago=30 - n,
                   attempts=[attempt(1, "completed", seconds)], duration=seconds)

    found = samples(metrics.exposition(Device(device.root)))

    assert values(found, "spos_task_slowdown_ratio", agent="trend-001") == {("slowing",): 3.0}
    assert values(found, "spos_task_failed_share", agent="trend-001") == {("slowing",): 0.0}
    # daily_scan: of its completed, completed and timed-out runs, one in three failed; weekly_report's
    # only run was cancelled, which is no outcome
    assert values(found, "spos_task_failed_share", agent=AGENT) == {("daily_scan",): 1 / 3}
    assert values(found, "spos_task_flagged", agent="trend-001", task="slowing") == {
        ("trending_slower",): 1, ("failing_often",): 0}
    assert values(found, "spos_task_flagged", agent=AGENT, task="daily_scan") == {
        ("trending_slower",): 0, ("failing_often",): 0}


def test_every_family_is_documented_and_no_label_names_a_run(device):
    text = metrics.exposition(Device(device.root))
    families = list(text_string_to_metric_families(text))

    assert all(family.name.startswith("spos_") and family.documentation for family in families)
    label_values = {value for family in families for sample in family.samples
                    for value in sample.labels.values()}
    assert not label_values & set(device.run_ids)


def test_an_empty_root_gives_zeros_and_no_run_samples(device_root):
    text = metrics.exposition(Device(device_root))
    found = samples(text)

    assert "# TYPE spos_runs gauge" in text
    assert {name for name, _ in found} == {
        "spos_triggers_daemon_up", "spos_sync_last_outcome", "spos_sync_quarantined_revisions",
        "spos_drift_repairs_total", "spos_executor_up", "spos_scrape_duration_seconds"}
    assert set(values(found, "spos_sync_last_outcome").values()) == {0}
    assert found[("spos_drift_repairs_total", ())] == 0


# -- the CLI -------------------------------------------------------------------------------------


def test_spos_metrics_prints_the_exposition(spos, device):
    result = spos("metrics", "--root", device.root)

    assert result.code == 0, result.err
    assert without_scrape_time(result.out) == without_scrape_time(metrics.exposition(Device(device.root)))


def test_textfile_once_replaces_the_file_atomically(spos, device, tmp_path):
    textfiles = tmp_path / "textfile"
    textfiles.mkdir()
    target = textfiles / "spos.prom"
    target.write_text("stale\n")
    before = target.stat().st_ino

    result = spos("metrics", "--root", device.root, "--textfile", target, "--once")

    assert result.code == 0, result.err
    assert result.out == ""
    assert os.listdir(textfiles) == ["spos.prom"]  # no temporary file left behind
    assert target.stat().st_ino != before  # renamed into place, never rewritten in place
    assert target.stat().st_mode & 0o777 == 0o644
    assert without_scrape_time(target.read_text()) == without_scrape_time(metrics.exposition(Device(device.root)))


def test_textfile_without_once_needs_a_positive_interval(spos, device, tmp_path):
    result = spos("metrics", "--root", device.root, "--textfile", tmp_path / "spos.prom", "--interval", "0s")

    assert result.code == 1
    assert "interval" in result.err
    assert not (tmp_path / "spos.prom").exists()


def _spos_process(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "reconciler", "metrics", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stop(process: subprocess.Popen) -> tuple[int, str]:
    process.send_signal(signal.SIGTERM)
    try:
        _, err = process.communicate(timeout=WAIT)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("spos metrics did not stop on SIGTERM")
    return process.returncode, err


def test_textfile_loop_rewrites_from_fresh_state_until_sigterm(device, tmp_path):
    target = tmp_path / "spos.prom"
    process = _spos_process("--root", device.root, "--textfile", target, "--interval", "1s")
    try:
        wait_for(lambda: target.exists() or process.poll() is not None, "the first textfile", WAIT)
        assert process.poll() is None, process.communicate()
        device.run("idle-001", "tidy", "queue")

        def depth() -> float | None:
            return samples(target.read_text()).get(("spos_queue_depth", (("agent", "idle-001"),)))

        wait_for(lambda: depth() == 1, "the textfile to show the new queued run", WAIT)
    finally:
        code, err = _stop(process)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == ["device", "spos.prom"]  # no temporary file left


def test_textfile_loop_outlives_a_failed_write_and_says_so(device, tmp_path):
    """node_exporter keeps serving the last file: a writer that died at one failed write
    (its directory moved away a moment) would leave stale numbers with no sign of it."""
    directory = tmp_path / "textfiles"
    directory.mkdir()
    target = directory / "spos.prom"
    process = _spos_process("--root", device.root, "--textfile", target, "--interval", "1s")
    try:
        wait_for(lambda: target.exists() or process.poll() is not None, "the first textfile", WAIT)
        directory.rename(tmp_path / "away")
        time.sleep(2.2)  # two writes fail meanwhile
        assert process.poll() is None
        (tmp_path / "away").rename(directory)
        target.unlink()
        wait_for(lambda: target.exists() or process.poll() is not None, "the textfile again", WAIT)
        assert process.poll() is None
    finally:
        code, err = _stop(process)
    assert code == 0 and f"spos metrics: cannot write {target}" in err, err


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str, accept: str | None = None) -> tuple[int, str, str]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as answer:
            return answer.status, answer.headers["Content-Type"], answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def test_listen_serves_fresh_metrics_and_exits_0_on_sigterm(device):
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    process = _spos_process("--root", device.root, "--listen", f"127.0.0.1:{port}")
    try:
        def scrape():
            try:
                return _get(f"{base}/metrics")
            except OSError:  # not listening yet
                return None

        code, content_type, body = wait_for(scrape, "the metrics server", WAIT)
        assert (code, content_type) == (200, "text/plain; version=0.0.4; charset=utf-8")
        assert samples(body)[("spos_queue_depth", (("agent", AGENT),))] == 2

        device.run(AGENT, "daily_scan", "queue")
        assert samples(_get(f"{base}/metrics")[2])[("spos_queue_depth", (("agent", AGENT),))] == 3

        code, content_type, body = _get(f"{base}/metrics", accept="application/openmetrics-text; version=1.0.0")
        assert code == 200 and content_type.startswith("application/openmetrics-text")
        found = samples(body, parse=openmetrics_families)
        assert found[("spos_run_duration_seconds_gcount", (("agent", AGENT), ("task", "daily_scan")))] == 3

        assert _get(f"{base}/")[0] == 404
        assert _get(f"{base}/metrics/extra")[0] == 404
    finally:
        code, err = _stop(process)
    assert code == 0, err
    assert err == f"spos metrics: serving http://127.0.0.1:{port}/metrics (pid {process.pid})\n"


def test_the_listener_lets_go_of_silent_clients_and_bounds_connections(device, monkeypatch):
    """Clients that connect and send nothing (or never read) hold no thread or fd beyond
    MAX_CONNECTIONS, are let go after the client timeout, and a scrape then gets its answer."""
    import threading

    monkeypatch.setattr(metrics._MetricsHandler, "timeout", 0.5)
    server = metrics._MetricsServer("127.0.0.1", 0, metrics._registry(Device(device.root)))
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                               daemon=True)
    serving.start()
    port = server.server_address[1]
    silent = []
    try:
        for _ in range(metrics.MAX_CONNECTIONS + 8):
            silent.append(socket.create_connection(("127.0.0.1", port), timeout=WAIT))
        over = silent[-1]
        assert over.recv(1) == b""  # closed at once: over the limit
        assert threading.active_count() <= metrics.MAX_CONNECTIONS + 4
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/metrics"), "a scrape after the "
                 "silent clients were let go", WAIT)
    finally:
        for connection in silent:
            connection.close()
        server.shutdown()
        server.server_close()


def _answers(url: str) -> bool:
    try:
        return _get(url)[0] == 200
    except OSError:
        return False
