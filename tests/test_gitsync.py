"""reconciler.gitsync against a real bare repository as the remote.

Fetching accepts fast-forwards only; an export holds exactly the committed files; what a hostile
repository carries (hooks, a nested repository's config, an `ext::` submodule, symbolic links
out of the tree, crafted tree entries) never runs and never leaks; URLs and branch names are
refused before git runs; only commits signed by a key of the operator's keyring pass, checked
with real gpg keys generated here. Every repository lives under tmp_path.
"""

from __future__ import annotations

import binascii
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from reconciler.errors import SposError
from reconciler.gitsync import (
    ExportError,
    FetchError,
    ForcePushError,
    GitError,
    Mirror,
    SignatureError,
    UnknownCommitError,
    UnsafeSourceError,
    UnsafeTreeError,
    check_branch,
    check_url,
    redacted,
)
from reconciler.gitsync import _CREDENTIAL_HELPER, _HARDENING, _environment

TIMEOUT = 30
IDENTITY = {
    "GIT_AUTHOR_NAME": "Operator", "GIT_AUTHOR_EMAIL": "ops@example.org",
    "GIT_COMMITTER_NAME": "Operator", "GIT_COMMITTER_EMAIL": "ops@example.org",
}
REMOTE_HOOKS = ("pre-receive", "update", "post-receive", "post-update", "reference-transaction",
                "push-to-checkout", "pre-auto-gc", "post-checkout", "post-merge")


def isolated_env(home: Path, **extra: str) -> dict[str, str]:
    """An environment for the test's own git and gpg: no user or system configuration."""
    return {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(home), "LC_ALL": "C",
            "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null", **IDENTITY, **extra}


def run_raw(*argv: str | Path, env: dict[str, str], cwd: Path, stdin: bytes | None = None) -> bytes:
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, input=stdin,
                          capture_output=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def run(*argv: str | Path, env: dict[str, str], cwd: Path, stdin: bytes | None = None) -> str:
    return run_raw(*argv, env=env, cwd=cwd, stdin=stdin).decode().strip()


class Upstream:
    """The remote: a bare repository, fed by a working repository that pushes to it."""

    def __init__(self, root: Path):
        home = root / "home"
        home.mkdir()
        self.root, self.env = root, isolated_env(home)
        self.bare, self.work = root / "remote.git", root / "work"
        self.git("init", "-q", "--bare", self.bare)
        self.git("init", "-q", "-b", "main", self.work)

    def git(self, *args: str | Path, env: dict[str, str] | None = None, stdin: bytes | None = None) -> str:
        return run("git", *args, env=env or self.env, cwd=self.work if self.work.exists() else self.root,
                   stdin=stdin)

    def commit(self, files: dict[str, str | bytes] | None = None, *, executable: tuple[str, ...] = (),
               links: dict[str, str] | None = None, gitlinks: dict[str, str] | None = None,
               sign: str | None = None, gpg_program: str = "gpg", gnupghome: Path | None = None) -> str:
        """Commit these files, links and gitlinks on top of the last commit, push to main, and
        return the commit's id."""
        for name, content in (files or {}).items():
            path = self.work / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
            path.chmod(0o755 if name in executable else 0o644)
        for name, target in (links or {}).items():
            (self.work / name).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target, self.work / name)
        self.git("add", "-A")
        for name, sha in (gitlinks or {}).items():
            self.git("update-index", "--add", "--cacheinfo", f"160000,{sha},{name}")
        signing = ["-c", f"gpg.program={gpg_program}", "commit", f"-S{sign}"] if sign else ["commit"]
        env = {**self.env, "GNUPGHOME": str(gnupghome)} if gnupghome else None
        self.git(*signing, "-q", "--allow-empty", "-m", "change", env=env)
        return self.push(self.git("rev-parse", "HEAD"))

    def push(self, sha: str) -> str:
        """Point the remote's main at `sha`, rewriting history if need be."""
        self.git("push", "-q", "--force", self.bare, f"{sha}:refs/heads/main")
        return sha

    def unrelated_commit(self) -> str:
        """A commit that shares no history with main."""
        tree = self.git("mktree", stdin=b"")
        return self.git("commit-tree", tree, "-m", "unrelated")

    def arm_remote(self, marker: Path) -> None:
        """Hooks and configuration in the remote that create `marker` if anything runs them."""
        hooks = self.bare / "hooks"
        hooks.mkdir(exist_ok=True)
        for name in REMOTE_HOOKS:
            (hooks / name).write_text(f"#!/bin/sh\ntouch {marker}-{name}\n")
            (hooks / name).chmod(0o755)
        for key in ("core.fsmonitor", "uploadpack.packObjectsHook", "core.sshCommand"):
            self.git("config", "-f", self.bare / "config", key, f"touch {marker}-{key}")


@pytest.fixture
def upstream(tmp_path) -> Upstream:
    return Upstream(tmp_path)


@pytest.fixture
def state_dir(tmp_path) -> Path:
    return tmp_path / "device/var/lib/systemprompt-os/sync"


@pytest.fixture
def mirror(state_dir, upstream) -> Mirror:
    return Mirror(state_dir, str(upstream.bare))


def exported(dest: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below `dest` with its content and permission bits; no symlink may be there."""
    found = {}
    for directory, dirs, files in os.walk(dest):
        for name in dirs + files:
            path = Path(directory, name)
            assert not path.is_symlink(), f"{path} is a symlink"
            if name in files:
                found[str(path.relative_to(dest))] = (path.read_bytes(), path.stat().st_mode & 0o777)
    return found


def every_path(top: Path) -> set[str]:
    return {os.path.join(d, n) for d, dirs, files in os.walk(top) for n in dirs + files}


# -- fetch and export --------------------------------------------------------------------------------

MANIFESTS = {
    "agents.d/research-001.yaml": "apiVersion: spos/v1\nkind: Agent\nmetadata: {name: research-001}\n",
    "agents.d/deep/nested/profiles.yaml": "kind: Quota\n",
    "bin/check.sh": "#!/bin/sh\nexit 0\n",
    "README": "manifests\n",
    "data.bin": bytes(range(256)) * 40,
}


def test_first_fetch_and_export_give_exactly_the_committed_files(tmp_path, upstream, mirror, state_dir):
    sha = upstream.commit(MANIFESTS, executable=("bin/check.sh",))

    fetched = mirror.fetch("main")
    export = mirror.export(fetched.sha, tmp_path / "export")

    assert (fetched.sha, fetched.previous, fetched.fast_forward, fetched.changed) == (sha, None, True, True)
    assert (state_dir / "mirror.git/HEAD").is_file()
    assert export.sha == sha and export.dest == tmp_path / "export"
    assert export.files == len(MANIFESTS) and export.skipped == ()
    files = exported(export.dest)
    assert {name: content for name, (content, _) in files.items()} == {
        name: content if isinstance(content, bytes) else content.encode()
        for name, content in MANIFESTS.items()}
    assert {name: mode for name, (_, mode) in files.items()} == {
        name: 0o755 if name == "bin/check.sh" else 0o644 for name in MANIFESTS}


def test_a_later_commit_is_fetched_as_a_fast_forward(tmp_path, upstream, mirror):
    first = upstream.commit(MANIFESTS)
    mirror.fetch("main")
    second = upstream.commit({"agents.d/monitor-001.yaml": "kind: Agent\n"})

    fetched = mirror.fetch("main", applied=first)
    again = mirror.fetch("main", applied=second)

    assert (fetched.sha, fetched.previous, fetched.fast_forward, fetched.changed) == (second, first, True, True)
    assert (again.sha, again.changed) == (second, False)
    assert "agents.d/monitor-001.yaml" in exported(mirror.export(second, tmp_path / "export").dest)


def test_without_applied_the_last_accepted_fetch_is_the_reference(upstream, mirror):
    first = upstream.commit(MANIFESTS)
    assert mirror.fetch("main").previous is None
    second = upstream.commit({"README": "changed\n"})

    assert (mirror.fetch("main").previous, mirror.fetch("main").previous) == (first, second)


def test_a_file_url_fetches_as_well(tmp_path, upstream, state_dir):
    sha = upstream.commit(MANIFESTS)
    assert Mirror(state_dir, f"file://{upstream.bare}").fetch("main").sha == sha


@pytest.mark.parametrize("rewrite", ["older commit", "unrelated commit"])
def test_a_force_push_is_refused_unless_allowed(upstream, mirror, rewrite):
    first = upstream.commit(MANIFESTS)
    second = upstream.commit({"README": "changed\n"})
    mirror.fetch("main")
    rewritten = upstream.push(first if rewrite == "older commit" else upstream.unrelated_commit())

    with pytest.raises(ForcePushError) as refused:
        mirror.fetch("main", applied=second)
    allowed = mirror.fetch("main", applied=second, allow_force=True)

    message = str(refused.value)
    assert "rewritten" in message and "does not descend from the applied commit" in message
    assert "force-push" in message and second[:12] in message and rewritten[:12] in message
    assert (refused.value.sha, refused.value.previous) == (rewritten, second)
    assert not refused.value.retryable
    assert (allowed.sha, allowed.previous, allowed.fast_forward) == (rewritten, second, False)


def test_a_refused_force_push_is_not_remembered(upstream, mirror):
    first = upstream.commit(MANIFESTS)
    second = upstream.commit({"README": "changed\n"})
    mirror.fetch("main")
    upstream.push(first)

    for _ in range(2):
        with pytest.raises(ForcePushError, match="the last sync fetched"):
            mirror.fetch("main")
    assert mirror.fetch("main", allow_force=True).previous == second


def test_an_applied_commit_the_remote_never_had_is_a_rewrite(upstream, mirror):
    upstream.commit(MANIFESTS)
    with pytest.raises(ForcePushError):
        mirror.fetch("main", applied="0123456789abcdef0123456789abcdef01234567")


def test_a_missing_branch_or_remote_is_a_retryable_fetch_error(tmp_path, upstream, mirror, state_dir):
    upstream.commit(MANIFESTS)
    with pytest.raises(FetchError, match="has no branch 'release'") as missing:
        mirror.fetch("release")
    with pytest.raises(FetchError, match="cannot fetch branch 'main'"):
        Mirror(state_dir, str(tmp_path / "nowhere.git")).fetch("main")
    assert missing.value.retryable


# -- hostile repository content ----------------------------------------------------------------------

def test_hostile_repository_content_never_runs_or_leaks(tmp_path, upstream, mirror, state_dir):
    markers = tmp_path / "markers"
    markers.mkdir()
    base = upstream.commit(MANIFESTS)
    upstream.commit({
        "nested.git/HEAD": "ref: refs/heads/main\n",
        "nested.git/config": f"[core]\n\tbare = true\n\tfsmonitor = touch {markers}/nested-fsmonitor\n",
        "nested.git/objects/.keep": "",
        "nested.git/refs/.keep": "",
        ".gitmodules": f'[submodule "evil"]\n\tpath = evil\n\turl = ext::sh -c touch% {markers}/ext\n',
    }, links={
        "passwd": "/etc/passwd",
        "up": "../../outside",
        "agents.d/escape": "../../../etc",
        "agents.d/current.yaml": "research-001.yaml",
    }, gitlinks={"evil": base})
    upstream.arm_remote(markers / "remote")
    state_dir.parent.mkdir(parents=True)
    before = every_path(tmp_path)

    fetched = mirror.fetch("main")
    export = mirror.export(fetched.sha, tmp_path / "export")

    assert list(markers.iterdir()) == []
    created = every_path(tmp_path) - before
    assert {path for path in created if not path.startswith((str(state_dir), str(export.dest)))} == set()
    assert not (tmp_path.parent / "outside").exists()
    assert [(s.path, s.kind, s.target) for s in export.skipped] == [
        ("agents.d/current.yaml", "symlink", "research-001.yaml"),
        ("agents.d/escape", "escaping-symlink", "../../../etc"),
        ("evil", "submodule", base),
        ("passwd", "escaping-symlink", "/etc/passwd"),
        ("up", "escaping-symlink", "../../outside"),
    ]
    assert "outside the repository" in export.skipped[3].reason
    files = exported(export.dest)
    assert export.files == len(files)
    assert not any(name in files for name in ("passwd", "up", "evil", "agents.d/current.yaml"))
    assert not (export.dest / "evil").exists()
    passwd = Path("/etc/passwd").read_bytes()
    assert passwd and not any(passwd in content for content, _ in files.values())
    assert files[".gitmodules"][0].startswith(b"[submodule")
    assert b"fsmonitor" in files["nested.git/config"][0]

    # The traps were real: a push runs the remote's hooks, git in the nested repository its fsmonitor.
    upstream.commit({"README": "after\n"})
    assert (markers / "remote-post-update").exists()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    run("git", f"--git-dir={export.dest / 'nested.git'}", f"--work-tree={scratch}", "status",
        env=upstream.env, cwd=scratch)
    assert (markers / "nested-fsmonitor").exists()


def test_the_callers_environment_never_reaches_git(tmp_path, monkeypatch, upstream, mirror):
    """A global config that rewrites every local URL into an `ext::` command, ext allowed by
    GIT_CONFIG_PARAMETERS, objects redirected by GIT_OBJECT_DIRECTORY: none of it applies."""
    sha = upstream.commit(MANIFESTS)
    marker, elsewhere, home = tmp_path / "marker", tmp_path / "elsewhere", tmp_path / "caller-home"
    home.mkdir()
    (home / ".gitconfig").write_text(f'[url "ext::sh -c touch% {marker}% #"]\n\tinsteadOf = /\n')
    for name, value in {"HOME": str(home), "GIT_CONFIG_PARAMETERS": "'protocol.ext.allow'='always'",
                        "GIT_OBJECT_DIRECTORY": str(elsewhere), "GIT_DIR": str(upstream.work / ".git"),
                        "GIT_SSH_COMMAND": f"touch {marker}"}.items():
        monkeypatch.setenv(name, value)

    fetched = mirror.fetch("main")
    export = mirror.export(fetched.sha, tmp_path / "export")

    assert fetched.sha == sha and export.files == len(MANIFESTS)
    assert not marker.exists() and not elsewhere.exists()
    # The trap was real: a git that inherits this environment runs the command.
    subprocess.run(["git", "ls-remote", str(upstream.bare)], cwd=tmp_path, capture_output=True,
                   timeout=TIMEOUT)
    assert marker.exists()


def write_tree(git_dir: Path, env: dict[str, str], entries: list[tuple[str, bytes, str]]) -> str:
    """A tree object with exactly these (mode, name, id) entries, names unchecked, unsorted."""
    raw = b"".join(mode.encode() + b" " + name + b"\0" + binascii.unhexlify(oid)
                   for mode, name, oid in entries)
    return run("git", f"--git-dir={git_dir}", "hash-object", "-t", "tree", "--literally", "-w",
               "--stdin", env=env, cwd=git_dir, stdin=raw)


def crafted_commit(git_dir: Path, env: dict[str, str], name: bytes, *, twice: bool = False,
                   beside: bytes | None = None) -> str:
    """A commit whose root tree holds `name` (a directory holding `escaped`), optionally twice,
    or a file `name` beside a file called `beside`."""
    def git(*args: str, stdin: bytes | None = None) -> str:
        return run("git", f"--git-dir={git_dir}", *args, env=env, cwd=git_dir, stdin=stdin)

    blob = git("hash-object", "-w", "--stdin", stdin=b"[core]\n\tfsmonitor = touch /tmp/never\n")
    if beside is not None:
        tree = write_tree(git_dir, env, [("100644", beside, blob), ("100644", name, blob)])
    else:
        inner = write_tree(git_dir, env, [("100644", b"escaped", blob)])
        tree = write_tree(git_dir, env, [("40000", name, inner)] * (2 if twice else 1))
    return git("commit-tree", tree, "-m", "crafted")


def test_fsck_refuses_a_tree_with_a_dot_git_entry_at_fetch(upstream, mirror):
    upstream.commit(MANIFESTS)
    crafted = crafted_commit(upstream.bare, upstream.env, b".git")
    upstream.git(f"--git-dir={upstream.bare}", "update-ref", "refs/heads/main", crafted)

    with pytest.raises(FetchError, match="contains '.git'"):
        mirror.fetch("main")


@pytest.mark.parametrize("name, options", [
    (b".git", {}), (b".GIT", {}), (b"..", {}), (b".", {}), (b"", {}),
    (b"twice", {"twice": True}), (b"a/escaped", {"beside": b"a"}),
], ids=[".git", ".GIT", "..", ".", "empty", "duplicate", "file-under-a-file"])
def test_export_refuses_crafted_trees_and_writes_nothing(tmp_path, upstream, mirror, name, options):
    """Fetching refuses most of these already (fsck); export does not rely on that: the commits
    are written straight into the mirror here."""
    upstream.commit(MANIFESTS)
    mirror.fetch("main")
    sha = crafted_commit(mirror.path, upstream.env, name, **options)
    before = every_path(tmp_path)

    with pytest.raises(UnsafeTreeError, match="forbidden component|conflicts with another entry|cannot read the tree"):
        mirror.export(sha, tmp_path / "export")

    assert every_path(tmp_path) == before


def test_export_limits_are_enforced_before_writing(tmp_path, upstream, mirror):
    sha = upstream.commit(MANIFESTS)
    mirror.fetch("main")

    with pytest.raises(UnsafeTreeError, match="more than 3 entries"):
        mirror.export(sha, tmp_path / "export", max_files=3)
    with pytest.raises(UnsafeTreeError, match="more than the 1000"):
        mirror.export(sha, tmp_path / "export", max_bytes=1000)
    assert not (tmp_path / "export").exists()


def test_a_git_killed_while_it_lists_the_tree_is_no_fault_of_the_revision(tmp_path, upstream, mirror,
                                                                           monkeypatch):
    """A daemon told to stop (gitsync.abort) or the OOM killer ends git with a signal: the sync
    fails and tries again, the revision is not refused as unreadable."""
    sha = upstream.commit(MANIFESTS)
    mirror.fetch("main")
    start = Mirror._start

    popen = subprocess.Popen

    def killed_at_once(self, args, **options):
        if args[0] != "ls-tree":
            return start(self, args, **options)
        # git is started behind a shell that stops itself first, so the kill always finds it
        # unfinished: a git quicker than the kill would exit 0 and prove nothing.
        monkeypatch.setattr(subprocess, "Popen", lambda argv, **kw: popen(
            ["sh", "-c", 'kill -STOP $$; exec "$@"', "sh", *argv], **kw))
        try:
            process = start(self, args, **options)
        finally:
            monkeypatch.setattr(subprocess, "Popen", popen)
        os.killpg(process.pid, signal.SIGKILL)
        return process

    monkeypatch.setattr(Mirror, "_start", killed_at_once)
    with pytest.raises(GitError, match="ls-tree was stopped before it finished .signal 9.") as raised:
        mirror.export(sha, tmp_path / "out")
    assert not isinstance(raised.value, UnsafeTreeError)
    assert not (tmp_path / "out").exists()


def test_export_needs_a_fresh_destination_and_a_known_commit(tmp_path, upstream, mirror):
    sha = upstream.commit(MANIFESTS)
    with pytest.raises(UnknownCommitError, match="fetch it first"):
        mirror.export(sha, tmp_path / "export")
    mirror.fetch("main")
    (tmp_path / "export").mkdir()

    with pytest.raises(ExportError, match="already exists") as exists:
        mirror.export(sha, tmp_path / "export")
    with pytest.raises(UnknownCommitError, match="not a full commit id"):
        mirror.export("HEAD", tmp_path / "other")
    assert exists.value.retryable and list((tmp_path / "export").iterdir()) == []


# -- URLs and branch names ---------------------------------------------------------------------------

@pytest.fixture
def git_must_not_run(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a process was started: {args[0]!r}")
    monkeypatch.setattr(subprocess, "Popen", refuse)


@pytest.mark.parametrize("url", [
    "-uhelp",
    "--upload-pack=touch {marker}",
    "ext::sh -c touch% {marker}",
    "fd::17",
    "ssh://-oProxyCommand=touch%20{marker}/repo",
    "-oProxyCommand=touch {marker}:repo",
    "git@host:-repo",
    "http://example.org/manifests.git",
    "git://example.org/manifests.git",
    "HTTPS://example.org/manifests.git",
    "file://host/srv/manifests.git",
    "relative/path.git",
    "https://example.org/x\n.git",
    "ssh://deploy:hunter2@example.org/manifests.git",
    "deploy:hunter2@example.org:org/manifests.git",
    "",
])
def test_unsafe_urls_are_refused_before_git_runs(tmp_path, state_dir, git_must_not_run, url):
    marker = tmp_path / "marker"
    with pytest.raises(UnsafeSourceError, match="refused|empty") as refused:
        Mirror(state_dir, url.format(marker=marker))
    assert isinstance(refused.value, SposError) and not refused.value.retryable
    assert not marker.exists() and not state_dir.exists()


@pytest.mark.parametrize("branch", ["-x", "a..b", "--upload-pack=x", "a b", "a:b", "HEAD", "@",
                                    "a/.b", "b.lock", "a//b", "/a", "a/", "a@{1}", "a.", ""])
def test_unsafe_branch_names_are_refused_before_git_runs(upstream, state_dir, git_must_not_run, branch):
    with pytest.raises(UnsafeSourceError, match="branch name .* is refused"):
        Mirror(state_dir, str(upstream.bare)).fetch(branch)
    assert not state_dir.exists()


@pytest.mark.parametrize("url", [
    "https://example.org/org/manifests.git",
    "https://deploy:token@example.org/manifests.git",
    "ssh://git@example.org:2222/org/manifests.git",
    "ssh://git@[2001:db8::1]/manifests.git",
    "git@example.org:org/manifests.git",
    "example.org:manifests.git",
    "file:///srv/manifests.git",
    "/srv/manifests.git",
])
def test_supported_urls_are_accepted(url):
    assert check_url(url) == url


def test_a_password_in_the_url_stays_out_of_messages(state_dir):
    mirror = Mirror(state_dir, "https://deploy:s3cret@127.0.0.1:1/manifests.git")
    with pytest.raises(FetchError) as failed:
        mirror.fetch("main")
    assert "s3cret" not in str(failed.value) + repr(mirror)


@pytest.mark.parametrize("url, shown", [
    ("https://deploy:p@ss-s3cret@git.example.net/fleet.git", "https://***@git.example.net/fleet.git"),
    ("\ufeffhttps://deploy:s3cret@git.example.net/f.git", "\ufeffhttps://***@git.example.net/f.git"),
    ("git+https://deploy:s3cret@git.example.net/f.git", "git+https://***@git.example.net/f.git"),
    ("https://s3cret@git.example.net/f.git?at=@x", "https://***@git.example.net/f.git?at=@x"),
])
def test_redaction_leaves_no_part_of_a_password(url, shown):
    """A password may hold `@`; a URL read from a file may carry a byte-order mark or any
    scheme before it is refused: none of it may show in a message or a state file."""
    assert redacted(url) == shown


def _command_lines() -> dict[int, str]:
    lines = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                lines[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                    errors="replace")
            except OSError:
                continue  # gone meanwhile
    return lines


@pytest.mark.parametrize("user", ["deploy:{token}", "{token}"], ids=["password", "token-as-user"])
def test_a_password_in_an_https_url_is_on_no_command_line_while_git_fetches(state_dir, user):
    """Every local user can read every process's command line (/proc/PID/cmdline). While git
    fetches from an https remote, none of its processes (git, its https helper) has the URL's
    password or token on it: git gets the URL without its user part, and a credential helper
    answers from the environment, which only root can read."""
    token = "s3cret-" + os.urandom(8).hex()
    listener = socket.create_server(("127.0.0.1", 0))  # accepts, never answers: git waits
    listener.settimeout(TIMEOUT)
    port = listener.getsockname()[1]
    mirror = Mirror(state_dir, f"https://{user.format(token=token)}@127.0.0.1:{port}/fleet.git")
    failed: list = []
    fetching = threading.Thread(target=lambda: failed.append(pytest.raises(FetchError, mirror.fetch, "main")))
    fetching.start()
    try:
        connection, _ = listener.accept()
        lines = _command_lines()
    finally:
        listener.close()
    connection.close()  # the handshake fails: the fetch ends at once
    fetching.join(TIMEOUT)
    assert failed and token not in str(failed[0].value)
    assert [line for line in lines.values() if token in line] == []
    assert any(f"https://127.0.0.1:{port}/fleet.git" in line for line in lines.values()), \
        "git's https helper was not seen: the test looked at the wrong moment"


def test_the_credential_helper_answers_for_the_urls_own_host_alone(state_dir, tmp_path):
    """The helper git asks for the URL's user and password gives them for the URL's host and
    port, and nothing for another host (one a redirect could lead to)."""
    mirror = Mirror(state_dir, "https://deploy:s3%40cret@git.example.net:8443/fleet.git")
    asked = {}
    for host in ("git.example.net:8443", "git.example.net", "elsewhere.example.net:8443"):
        done = subprocess.run(
            ["git", *_HARDENING, "-c", f"credential.helper={_CREDENTIAL_HELPER}", "credential", "fill"],
            input=f"protocol=https\nhost={host}\n\n", capture_output=True, text=True,
            env=_environment(str(tmp_path), mirror._credentials), timeout=TIMEOUT)
        asked[host] = (done.returncode, done.stdout)
    assert asked["git.example.net:8443"] == (
        0, "protocol=https\nhost=git.example.net:8443\nusername=deploy\npassword=s3@cret\n")
    assert asked["git.example.net"][0] != 0 and "password" not in asked["git.example.net"][1]
    assert asked["elsewhere.example.net:8443"][0] != 0


BRANCH_NAMES = ["main", "feature/x", "release-1.2", "a@b", "ü", "-x", "a..b", "foo.lock", ".h",
                "a/.b", "a//b", "a/", "/a", "a b", "a~1", "a^", "a:b", "a?", "a*", "a[", "a\\b",
                "a@{b", "a.", "a/b.lock/c", "x\ty", "HEAD", "refs/heads/main"]


@pytest.mark.parametrize("name", BRANCH_NAMES)
def test_branch_rules_match_git_check_ref_format(tmp_path, name):
    env = isolated_env(tmp_path)
    git_accepts = subprocess.run(["git", "check-ref-format", "--branch", name], cwd=tmp_path,
                                 env=env, capture_output=True, timeout=TIMEOUT).returncode == 0
    try:
        check_branch(name)
        accepted = True
    except UnsafeSourceError:
        accepted = False
    assert accepted == git_accepts


# -- signatures --------------------------------------------------------------------------------------

needs_gpg = pytest.mark.skipif(shutil.which("gpg") is None, reason="gpg is not installed (apt-get install gnupg)")
DAY = 86400


class Keys:
    """Real OpenPGP keys (ed25519, no passphrase) in a GNUPGHOME of their own: trusted;
    stranger (not in the keyring); revoked (the keyring holds its revocation, dated when the
    key was made, so each of its signatures is made after the revocation); expired (made 30
    days ago, valid for one day; it signs through `past_gpg`, a gpg whose clock is set back
    to that day)."""

    def __init__(self, top: Path):
        self.top, self.home = top, top / "signer"
        self.home.mkdir(mode=0o700)
        self.env = isolated_env(top, GNUPGHOME=str(self.home))
        made = int(time.time()) - 30 * DAY
        self.trusted = self.generate("Trusted Operator <trusted@example.org>")
        self.stranger = self.generate("Stranger <stranger@example.org>")
        self.revoked = self.generate("Revoked <revoked@example.org>")
        self.expired = self.generate("Expired <expired@example.org>", "--faked-system-time", str(made),
                                     expiry="1d")
        self.past_gpg = top / "past-gpg"
        self.past_gpg.write_text(f'#!/bin/sh\nexec gpg --faked-system-time {made + 3600} "$@"\n')
        self.past_gpg.chmod(0o755)
        self.keyring, self.armored_keyring = self.build_keyrings(top)

    def gpg(self, *args: str, env: dict[str, str] | None = None, stdin: bytes | None = None) -> str:
        return run("gpg", "--batch", "--no-tty", "--passphrase", "", "--pinentry-mode", "loopback",
                   *args, env=env or self.env, cwd=self.top, stdin=stdin)

    def generate(self, uid: str, *options: str, expiry: str = "never") -> str:
        self.gpg(*options, "--quick-gen-key", uid, "future-default", "default", expiry)
        listing = self.gpg("--with-colons", "--list-keys", uid.split("<")[1].rstrip(">"))
        return next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))

    def build_keyrings(self, top: Path) -> tuple[Path, Path]:
        """The operator's keyring: trusted, revoked (with its revocation) and expired keys,
        binary and ASCII-armoured. The signer's own copy of `revoked` stays usable for signing."""
        builder = top / "keyring-builder"
        builder.mkdir(mode=0o700)
        env = {**self.env, "GNUPGHOME": str(builder)}
        public = run_raw("gpg", "--batch", "--export", self.trusted, self.revoked, self.expired,
                         env=self.env, cwd=top)
        self.gpg("--import", env=env, stdin=public)
        revocation = (self.home / "openpgp-revocs.d" / f"{self.revoked}.rev").read_text()
        self.gpg("--import", env=env, stdin=revocation.replace(":-----BEGIN", "-----BEGIN").encode())
        binary, armored = top / "keyring.gpg", top / "keyring.asc"
        binary.write_bytes(run_raw("gpg", "--batch", "--export", env=env, cwd=top))
        armored.write_text(self.gpg("--armor", "--export", env=env))
        return binary, armored

    def stop(self) -> None:
        if shutil.which("gpgconf") is None:
            return
        for home in (self.home, self.top / "keyring-builder"):
            subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True,
                           timeout=TIMEOUT)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    made = Keys(tmp_path_factory.mktemp("keys"))
    yield made
    made.stop()


@needs_gpg
@pytest.mark.parametrize("armored", [False, True], ids=["binary-keyring", "armored-keyring"])
def test_a_commit_signed_by_a_trusted_key_is_accepted(tmp_path, monkeypatch, keys, upstream, mirror, armored):
    sha = upstream.commit(MANIFESTS, sign=keys.trusted, gnupghome=keys.home)
    mirror.fetch("main")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    signature = mirror.verify(sha, keys.armored_keyring if armored else keys.keyring)

    assert (signature.sha, signature.fingerprint, signature.primary_fingerprint) == (sha, keys.trusted, keys.trusted)
    assert signature.signer == "Trusted Operator <trusted@example.org>"
    assert list(scratch.iterdir()) == [], "the temporary GNUPGHOME is left behind"


def signed_by(keys: Keys, upstream: Upstream, who: str) -> str:
    """A commit on main as `who` left it: unsigned, signed by one of the keys, or tampered with."""
    if who == "unsigned":
        return upstream.commit(MANIFESTS)
    if who == "expired":
        return upstream.commit(MANIFESTS, sign=keys.expired, gpg_program=str(keys.past_gpg),
                               gnupghome=keys.home)
    if who == "tampered":
        signed = upstream.commit(MANIFESTS, sign=keys.trusted, gnupghome=keys.home)
        raw = upstream.git("cat-file", "commit", signed).replace("\nchange", "\ntampered")
        return upstream.push(upstream.git("hash-object", "-t", "commit", "-w", "--stdin",
                                          stdin=raw.encode() + b"\n"))
    return upstream.commit(MANIFESTS, sign=getattr(keys, who), gnupghome=keys.home)


@needs_gpg
@pytest.mark.parametrize("who, status, words", [
    ("unsigned", "N", "is not signed"),
    ("stranger", "E", "not in the keyring"),
    ("revoked", "R", "has been revoked"),
    ("expired", "Y", "has expired"),
    ("tampered", "B", "BAD signature"),
])
def test_a_commit_without_a_good_trusted_signature_is_refused(keys, upstream, mirror, who, status, words):
    sha = signed_by(keys, upstream, who)
    mirror.fetch("main")

    with pytest.raises(SignatureError) as refused:
        mirror.verify(sha, keys.keyring)

    message = str(refused.value)
    assert refused.value.status == status and words in message and sha[:12] in message
    assert "not applied" in message
    if who in ("revoked", "expired"):
        assert refused.value.fingerprint == getattr(keys, who) and getattr(keys, who) in message
    if who == "stranger":
        assert keys.stranger.endswith(refused.value.fingerprint) and refused.value.fingerprint in message


@needs_gpg
def test_a_keyring_that_is_missing_or_holds_no_keys_is_refused(tmp_path, upstream, mirror):
    sha = upstream.commit(MANIFESTS)
    mirror.fetch("main")
    empty = tmp_path / "empty.gpg"
    empty.write_bytes(b"")

    with pytest.raises(SignatureError, match="is not a file: write the trusted public keys"):
        mirror.verify(sha, tmp_path / "missing.gpg")
    with pytest.raises(SignatureError, match="holds no public keys|cannot import"):
        mirror.verify(sha, empty)
    with pytest.raises(UnknownCommitError):
        mirror.verify("0" * 40, empty)


def test_update_turns_an_export_into_the_next_revisions_touching_only_what_changed(tmp_path, upstream, mirror):
    first = upstream.commit(MANIFESTS, executable=("bin/check.sh",))
    mirror.fetch("main")
    checkout = mirror.export(first, tmp_path / "checkout").dest
    untouched = (checkout / "agents.d/research-001.yaml").stat()
    # a file removed, a file turned into a directory and a directory into a file, a changed
    # mode, a changed and a new file, and a new link (reported, never created)
    upstream.git("rm", "-q", "-r", "data.bin", "README", "agents.d/deep")
    (upstream.work / "bin/check.sh").chmod(0o644)
    second = upstream.commit({"README/inner.yaml": "kind: Quota\n", "agents.d/deep": "now a file\n",
                              "agents.d/new.yaml": "kind: Capability\n"},
                             links={"agents.d/alias.yaml": "new.yaml"})
    mirror.fetch("main")

    updated = mirror.update(second, checkout, first)
    fresh = mirror.export(second, tmp_path / "fresh")

    assert exported(checkout) == exported(fresh.dest)
    assert (updated.sha, updated.files, updated.skipped) == (second, fresh.files, fresh.skipped)
    assert [item.path for item in updated.skipped] == ["agents.d/alias.yaml"]
    kept = (checkout / "agents.d/research-001.yaml").stat()
    assert (kept.st_ino, kept.st_mtime_ns, kept.st_ctime_ns) == \
        (untouched.st_ino, untouched.st_mtime_ns, untouched.st_ctime_ns)
    assert not (tmp_path / "checkout.spos-update").exists()
    # and back again, as a sync does when it puts the applied revision back in force
    mirror.update(first, checkout, second)
    assert exported(checkout) == exported(mirror.export(first, tmp_path / "first").dest)


def test_update_refuses_a_crafted_tree_before_changing_anything(tmp_path, upstream, mirror):
    first = upstream.commit(MANIFESTS)
    mirror.fetch("main")
    checkout = mirror.export(first, tmp_path / "checkout").dest
    before = exported(checkout)
    upstream.commit({f"many/{index}": "x" for index in range(20)})
    second = mirror.fetch("main").sha

    with pytest.raises(UnsafeTreeError):
        mirror.update(second, checkout, first, max_files=10)
    assert exported(checkout) == before


def test_a_password_in_a_user_at_host_path_url_is_refused_without_being_shown(state_dir):
    """`user:password@host:path` is no scp-like URL git would read as meant (the host would be
    `user`), and the refusal must not show the password it refuses."""
    with pytest.raises(UnsafeSourceError) as refused:
        Mirror(state_dir, "deploy:hunter2@example.org:org/manifests.git")
    assert "hunter2" not in str(refused.value) and "takes no password" in str(refused.value)
    assert redacted("deploy:hunter2@example.org:org/manifests.git") == "***@example.org:org/manifests.git"
    assert redacted("git@example.org:org/manifests.git") == "git@example.org:org/manifests.git"
