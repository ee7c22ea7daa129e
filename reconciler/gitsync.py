"""The git half of `spos sync`: fetch one branch of the manifests remote into a local mirror,
check who signed the fetched revision, and hand over that revision's files as plain files.

A sync uses it in this order; every step raises a `GitSyncError` and then has changed nothing
the caller relies on:

    mirror = Mirror(f"{root}/var/lib/systemprompt-os/sync", url)   # the URL is checked here
    fetched = mirror.fetch("main", applied=applied_sha)            # a force-push is refused
    mirror.verify(fetched.sha, keyring)                            # a good signature, trusted key
    export = mirror.export(fetched.sha, scratch / fetched.sha)     # plain files, nothing else
    # ...validate, plan and apply export.dest (the caller's part)

Neither the remote nor what it serves is trusted, so:

- The URL and the branch name are checked before any git runs (`check_url`, `check_branch`):
  no option injection, no transport helper (`ext::` runs a program), only https, ssh, file.
- Every git runs with an environment built from scratch (no system or global config, HOME an
  empty directory, no prompts) and with configuration that switches off whatever could run a
  program or reach beyond the fetched branch: hooks, fsmonitor, submodules, unlisted
  transports (`_HARDENING`). Fetched objects are checked by fsck, which refuses names such as
  `.git` or `..` in a tree before they reach the mirror.
- Nothing is ever checked out: `export` reads the tree from git's object store and writes the
  files itself, so git's working-tree code (filters, attributes, hooks, symlinks, submodules,
  fsmonitor) never runs. Symbolic links and submodules are reported, never created.

GitPython is not used: its command wrapper starts every git from a copy of `os.environ`, so it
can add variables but never remove inherited ones (GIT_DIR, GIT_CONFIG_PARAMETERS,
GIT_SSH_COMMAND, ...), and importing it costs about 100 ms, more than a whole no-change fetch.

One `Mirror` at a time per state directory: the caller serialises syncs (the apply lock).
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator
from urllib.parse import unquote_to_bytes, urlsplit

from reconciler.errors import SposError

FETCH_TIMEOUT_SECONDS = 300.0
GIT_TIMEOUT_SECONDS = 60.0
GPG_TIMEOUT_SECONDS = 60.0
MAX_EXPORT_BYTES = 256 << 20
MAX_EXPORT_FILES = 100_000
"""Entries of any kind in the exported tree (files, links, submodules)."""
MAX_LINK_TARGET_BYTES = 4096

INCOMING_REF = "refs/spos/incoming"
"""The last fetched commit that was accepted: a fast-forward, or a force-push allowed."""
FETCHED_REF = "refs/spos/fetched"
"""Where a fetch lands before it is judged; a refused force-push stays only here."""

_HARDENING = (
    # Nothing a repository holds may run a program or reach beyond the fetched branch.
    # core.symlinks only matters to a checkout, which never happens; it stays off all the same.
    "-c", "core.hooksPath=/dev/null",
    "-c", "core.fsmonitor=false",
    "-c", "core.symlinks=false",
    "-c", "submodule.recurse=false",
    "-c", "fetch.recurseSubmodules=false",
    "-c", "fetch.fsckObjects=true",
    "-c", "protocol.allow=never",
    "-c", "protocol.https.allow=always",
    "-c", "protocol.ssh.allow=always",
    # Git's default for file is "user" (allowed when a person typed the URL, refused when git
    # picked it, e.g. a submodule: CVE-2022-39253). With `protocol.allow=never` above it must
    # be named to be usable at all. It is needed for a remote on a local path (a mounted
    # medium, a test's bare repository); the only URL git fetches here is the operator's,
    # checked by `check_url`, and submodules are never fetched.
    "-c", "protocol.file.allow=always",
    "-c", "protocol.ext.allow=never",
    "-c", "credential.helper=",
    # An automatic gc, when one is due, runs while spos waits instead of in a detached process.
    "-c", "gc.autoDetach=false",
    "-c", "init.defaultBranch=main",
)
_PASSED_THROUGH = (
    "PATH", "TMPDIR", "SSH_AUTH_SOCK", "http_proxy", "https_proxy", "HTTPS_PROXY",
    "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY",
)
"""The only variables of spos's own environment that reach git: how to find programs, the
network, and an ssh agent. Everything else (GIT_DIR, GIT_CONFIG_*, GIT_SSH_COMMAND...) is left
behind."""
_CREDENTIAL_HELPER = (
    "!spos_credential() { test \"$1\" = get || exit 0; host=; "
    "while IFS= read -r line && test -n \"$line\"; do "
    "case $line in host=*) host=${line#host=};; esac; done; "
    "test \"$host\" = \"$SPOS_GIT_HOST\" || exit 0; "
    "printf 'username=%s\\npassword=%s\\n' \"$SPOS_GIT_USERNAME\" \"$SPOS_GIT_PASSWORD\"; }; "
    "spos_credential"
)
"""git's credential helper for an https URL that carries a user name or password: it answers
with them, from git's environment (which only root can read, unlike a command line), and only
for the URL's own host (not for a host a redirect leads to). The URL git is given has neither."""
_GPG_CONF = "no-autostart\nno-auto-key-retrieve\nno-auto-key-import\ntrust-model pgp\n"
"""No agent, no key server, no key taken from a signature: only the keyring decides."""

_FILE, _EXECUTABLE, _SYMLINK, _GITLINK = "100644", "100755", "120000", "160000"
_SHA = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TRANSPORT_HELPER = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*::")
_SCP_LIKE = re.compile(
    r"(?:(?P<user>[A-Za-z0-9_][A-Za-z0-9._-]*)@)?(?P<host>[A-Za-z0-9][A-Za-z0-9.-]*):(?P<path>.+)")
_SCP_WITH_PASSWORD = re.compile(r"[^/@:]+:[^/@]*@[^/:@]+:")
"""`user:password@host:path`: a password where the scp-like form has none."""
_REFNAME_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


class GitSyncError(SposError):
    """Base of the errors of fetching, verifying and exporting a revision."""


class UnsafeSourceError(GitSyncError):
    """The remote URL or branch name is refused; git was not run."""


class GitError(GitSyncError):
    """git could not run, timed out, or failed unexpectedly; a later sync may succeed."""

    retryable = True


class FetchError(GitError):
    """The branch could not be fetched (network, remote, missing branch, malformed objects);
    the mirror keeps what it had."""


class ForcePushError(GitSyncError):
    """The fetched commit does not descend from the reference commit: history was rewritten."""

    def __init__(self, message: str, *, sha: str, previous: str):
        super().__init__(message)
        self.sha, self.previous = sha, previous


class UnknownCommitError(GitSyncError):
    """The commit asked for is not in the mirror (or is not a commit)."""


class SignatureError(GitSyncError):
    """The commit carries no good signature by a key of the keyring. `status` is git's `%G?`
    letter ("" when the check itself could not run), `fingerprint` the signing key's when known."""

    def __init__(self, message: str, *, status: str = "", fingerprint: str = ""):
        super().__init__(message)
        self.status, self.fingerprint = status, fingerprint


class UnsafeTreeError(GitSyncError):
    """The revision's tree is refused as a whole (a forbidden or conflicting name, too many
    entries, too many bytes); nothing is left at the destination."""


class ExportError(GitSyncError):
    """The files could not be written (destination exists, disk full, permissions); nothing is
    left at the destination."""

    retryable = True


@dataclass(frozen=True)
class Fetched:
    """What `Mirror.fetch` accepted. `previous` is the commit it was judged against (the
    applied one, else the last accepted fetch, else None); `fast_forward` says `sha` is
    `previous` or descends from it (True when there is no previous)."""

    sha: str
    previous: str | None
    fast_forward: bool

    @property
    def changed(self) -> bool:
        return self.sha != self.previous


@dataclass(frozen=True)
class Signature:
    """A good signature by a key of the keyring. `fingerprint` is the signing (sub)key's,
    `primary_fingerprint` its primary key's, `signer` the user id gpg reports."""

    sha: str
    fingerprint: str
    primary_fingerprint: str
    signer: str


@dataclass(frozen=True)
class Skipped:
    """A tree entry that `export` did not write. `kind` is "symlink" (target inside the
    repository), "escaping-symlink" (absolute, or leaving the repository through `..`) or
    "submodule"; `target` is the link's target or the submodule's commit."""

    path: str
    kind: str
    target: str
    reason: str


@dataclass(frozen=True)
class Export:
    """The files of one revision, written by `Mirror.export` below `dest`."""

    sha: str
    dest: Path
    files: int
    skipped: tuple[Skipped, ...]


@dataclass(frozen=True)
class _Entry:
    """One line of `git ls-tree -r -l`: a blob, a symlink or a gitlink at a repository path."""

    mode: str
    oid: str
    size: int
    path: bytes


def check_url(url: str) -> str:
    """`url` when spos may fetch from it, else UnsafeSourceError saying why. Accepted:
    https://, ssh://, scp-like `user@host:path`, file:// and absolute local paths. Refused:
    anything git could read as an option, transport helpers (`ext::`, any `<name>::`), plain
    http and git://, relative paths, control characters."""
    if not isinstance(url, str) or not url:
        raise UnsafeSourceError("the remote URL is empty: set the URL of the manifests repository")
    problem = _url_problem(url)
    if problem:
        raise UnsafeSourceError(f"remote URL {redacted(url)!r} is refused: {problem}")
    return url


def _url_problem(url: str) -> str:
    if _CONTROL.search(url):
        return "it contains a control character"
    if url.startswith("-"):
        return "it starts with '-', which git would read as an option"
    helper = _TRANSPORT_HELPER.match(url)
    if helper:
        return (f"'{helper.group()}' selects a git transport helper, which runs a program; "
                "use https://, ssh://, user@host:path or a local path")
    if url.startswith("/"):
        return ""
    if "://" in url:
        return _scheme_problem(url)
    if _SCP_WITH_PASSWORD.match(url):
        return ("a user@host:path URL takes no password (git would read what comes before the "
                "first ':' as the host), and a file or command line showing it would give it "
                "away; use a key (an ssh agent, or ~/.ssh of the user spos runs as)")
    scp = _SCP_LIKE.fullmatch(url)
    if scp is None:
        return ("not an https://, ssh://, file:// or user@host:path URL; a local repository "
                "needs an absolute path")
    if scp.group("path").startswith("-"):
        return "its path starts with '-'"
    return ""


def _scheme_problem(url: str) -> str:
    scheme = url.split("://", 1)[0]
    try:
        parts = urlsplit(url)
        parts.port  # a port that is not a number in range raises ValueError
    except ValueError as exc:
        return f"it cannot be parsed ({exc})"
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            return "a file:// URL names an absolute path on this machine (file:///srv/repo.git)"
        return ""
    if scheme not in ("https", "ssh"):
        return (f"{scheme}:// is not allowed (plain http and git:// are neither encrypted nor "
                "authenticated); use https://, ssh://, user@host:path or a local path")
    if not parts.hostname or parts.hostname.startswith("-"):
        return "its host is missing or starts with '-'"
    if (parts.username or "").startswith("-"):
        return "its user name starts with '-'"
    if scheme == "ssh" and parts.password is not None:
        return ("ssh takes no password from a URL, and a file or command line showing it would "
                "give it away; use a key (an ssh agent, or ~/.ssh of the user spos runs as)")
    return ""


def carries_credentials(url: str) -> bool:
    """Whether `url` holds a password or token (the user part of an https URL; check_url
    refuses a password in any other). A URL that cannot be parsed is taken to hold one."""
    if not url.lower().startswith("https://"):
        return False
    try:
        return "@" in urlsplit(url).netloc
    except ValueError:
        return True


def _without_credentials(url: str) -> tuple[str, dict[str, str] | None]:
    """An https URL's user part taken out: (the URL without it, the environment its credential
    helper answers from), or (url, None) when there is none to take. ssh URLs keep their user:
    it is a login name, and ssh takes no password from a URL."""
    if not carries_credentials(url):
        return url, None
    parts = urlsplit(url)
    userinfo, _, host = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    # Bytes that are not UTF-8 survive as surrogates, which the environment turns back into them.
    username, password = (os.fsdecode(unquote_to_bytes(part)) for part in (username, password))
    if _CONTROL.search(username + password):
        raise UnsafeSourceError(f"remote URL {redacted(url)!r} is refused: its user name or "
                                "password holds a control character")
    return parts._replace(netloc=host).geturl(), {
        "SPOS_GIT_HOST": host, "SPOS_GIT_USERNAME": username, "SPOS_GIT_PASSWORD": password}


def redacted(url: str) -> str:
    """The URL as it may appear in messages and logs: the user part (a password, or a token
    given as the user name) is replaced by ***, up to the last `@` before the path, since a
    password may hold an `@` itself; wherever a scheme's `://` is, so that nothing in front of
    it (a stray byte-order mark, a typo) leaves the password standing. So is the user part of
    a `user:password@host:path` URL, which check_url refuses."""
    url = re.sub(r"([a-z][a-z0-9+.-]*://)[^/?#]*@", r"\1***@", url, flags=re.IGNORECASE)
    if _SCP_WITH_PASSWORD.match(url):  # `user:password@host:path`, which check_url refuses
        url = "***@" + url.split("@", 1)[1]
    return url


def check_branch(branch: str) -> str:
    """`branch` when it is a branch name by the rules of `git check-ref-format --branch`, else
    UnsafeSourceError saying which rule it breaks. Stricter than git in one place: `@` is
    refused (git reads it as HEAD, the current branch)."""
    problem = _branch_problem(branch) if isinstance(branch, str) else "it is not a string"
    if problem:
        raise UnsafeSourceError(f"branch name {branch!r} is refused: {problem}")
    return branch


def _branch_problem(branch: str) -> str:
    if not branch:
        return "it is empty"
    if branch.startswith("-"):
        return "it starts with '-', which git would read as an option"
    if branch in ("@", "HEAD"):
        return "it names the current branch, not a branch; give the branch's own name"
    rules = (
        (_REFNAME_FORBIDDEN.search(branch), "it contains a space, a control character or one of ~ ^ : ? * [ \\"),
        (".." in branch, "it contains '..'"),
        ("@{" in branch, "it contains '@{'"),
        (branch.endswith("."), "it ends with '.'"),
    )
    for broken, why in rules:
        if broken:
            return why
    for part in branch.split("/"):
        if not part:
            return "it has an empty component (a leading, trailing or doubled '/')"
        if part.startswith(".") or part.endswith(".lock"):
            return f"its component {part!r} starts with '.' or ends with '.lock'"
    return ""


def _check_sha(sha: str, what: str) -> str:
    if not isinstance(sha, str) or not _SHA.fullmatch(sha):
        raise UnknownCommitError(f"{what} {sha!r} is not a full commit id (40 or 64 lowercase hex digits)")
    return sha


class Mirror:
    """A bare local mirror of the remote `url`, kept in `state_dir` (created on first fetch).

    `state_dir` holds `mirror.git` (the bare repository; a cache: deleting it costs one full
    fetch) and `home` (the empty HOME every git runs with). Constructing a Mirror checks the
    URL and touches nothing.
    """

    def __init__(self, state_dir: str | os.PathLike, url: str):
        self.url = check_url(url)
        # What git is told: the URL without its user part, which a credential helper answers
        # from the environment instead, so that no command line shows a password or token.
        self._remote, self._credentials = _without_credentials(self.url)
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / "mirror.git"
        self._home = self.state_dir / "home"

    def __repr__(self) -> str:
        return f"Mirror({str(self.state_dir)!r}, {redacted(self.url)!r})"

    def fetch(self, branch: str, *, applied: str | None = None, allow_force: bool = False) -> Fetched:
        """Fetch `branch` and accept its commit when it is a fast-forward.

        The reference is `applied` (the commit the device runs) when given, else the commit
        the last fetch accepted; the first fetch without `applied` accepts anything. A commit
        that does not descend from the reference (a force-push, or another repository)
        raises ForcePushError unless `allow_force`; it is then not accepted, so the next fetch
        is judged against the same reference. Raises UnsafeSourceError before git runs for a
        bad branch name, FetchError when the fetch fails.
        """
        check_branch(branch)
        if applied is not None:
            _check_sha(applied, "the applied commit")
        self._ensure_mirror()
        self._fetch_branch(branch)
        refs = self._spos_refs()
        sha = refs.get(FETCHED_REF)
        if sha is None:
            raise FetchError(f"branch {branch!r} of {redacted(self.url)} does not point at a "
                             "commit: point it at a commit of the manifests")
        previous = applied or refs.get(INCOMING_REF)
        fast_forward = previous is None or sha == previous or self._descends(sha, previous)
        if not fast_forward and not allow_force:
            raise self._force_push_error(branch, sha, previous, applied is not None)
        if refs.get(INCOMING_REF) != sha:
            self._git_checked("update-ref", INCOMING_REF, sha)
        return Fetched(sha, previous, fast_forward)

    def verify(self, sha: str, keyring: str | os.PathLike) -> Signature:
        """The signature of commit `sha` when it is good and made by a key of `keyring`, else
        SignatureError naming what is wrong (unsigned, bad, unknown key, expired, revoked...).

        `keyring` is a file of the public keys the operator trusts, as `gpg --export [--armor]`
        writes it. Each is imported into a new GNUPGHOME (mode 0700, removed afterwards) and
        given ultimate trust, so exactly these keys count; only git's `%G?` = "G" is accepted.
        """
        self._require_commit(sha)
        gpg = shutil.which("gpg")
        if gpg is None:
            raise SignatureError("gpg is not installed, so signatures cannot be checked: install gnupg")
        keyring = Path(keyring)
        if not keyring.is_file():
            raise SignatureError(f"keyring {keyring} is not a file: write the trusted public keys "
                                 f"into it with `gpg --export KEY... > {keyring}`")
        with tempfile.TemporaryDirectory(prefix="spos-gnupg-") as home:
            os.chmod(home, 0o700)
            _trust_keyring(gpg, home, keyring.resolve())
            status, key, fingerprint, primary, signer = self._signature_fields(sha, gpg, home)
        if status != "G":
            raise _signature_error(sha, status, fingerprint or key, keyring)
        return Signature(sha, fingerprint, primary, signer)

    def export(self, sha: str, dest: str | os.PathLike, *, max_bytes: int = MAX_EXPORT_BYTES,
               max_files: int = MAX_EXPORT_FILES) -> Export:
        """Write the tree of commit `sha` below `dest` as plain files, read from git objects.

        `dest` must not exist; its parent must. Regular files get their content and mode 0644
        (0755 when executable); directories 0755. Symbolic links are never created and
        submodules never fetched: each is listed in `Export.skipped`. The whole tree is
        checked before anything is written: a `.git`, `.` or `..` component, an empty
        component or conflicting entries raise UnsafeTreeError, as do more than `max_files`
        entries or more than `max_bytes` of content (files and link targets). On any error
        nothing is left at `dest`. The files are not fsynced: after a crash, discard `dest` and
        export again.
        """
        entries, blobs = self._checked_tree(sha, max_files, max_bytes)
        root = _make_destination(dest)
        try:
            links = self._write_blobs(root, blobs)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        submodules = [_submodule_skipped(entry) for entry in entries if entry.mode == _GITLINK]
        skipped = sorted(links + submodules, key=lambda item: item.path)
        return Export(sha, Path(os.fsdecode(root)), len(blobs) - len(links), tuple(skipped))

    def update(self, sha: str, dest: str | os.PathLike, base: str, *,
               max_bytes: int = MAX_EXPORT_BYTES, max_files: int = MAX_EXPORT_FILES) -> Export:
        """Turn `dest`, an export of commit `base` that nothing else wrote to, into an export
        of `sha`, touching only what differs: removed files are deleted, changed and new ones
        written (each to a temporary name, then renamed over), unchanged ones left alone, so
        their inode and times stay (the plan memo knows them by those). The tree of `sha` is
        checked in full first, as `export` does; an error leaves `dest` partly updated, so the
        caller discards it and exports afresh."""
        self._require_commit(base)
        entries, blobs = self._checked_tree(sha, max_files, max_bytes)
        before = {entry.path: entry for entry in self._list_tree(base, max_files)}
        root = os.fsencode(os.path.abspath(dest))
        wanted = {entry.path: entry for entry in blobs if entry.mode != _SYMLINK}
        for path, old in before.items():
            new = wanted.get(path)
            if old.mode in (_FILE, _EXECUTABLE) and (new is None or new.mode != old.mode
                                                     or new.oid != old.oid):
                _remove_file(root, path)
        _prune_directories(root, set(wanted))
        changed = [entry for entry in blobs if entry.mode == _SYMLINK or (
            before.get(entry.path) is None or before[entry.path].mode != entry.mode
            or before[entry.path].oid != entry.oid)]
        staging = root + b".spos-update"
        shutil.rmtree(staging, ignore_errors=True)
        os.mkdir(staging, 0o700)
        try:
            links = self._write_blobs(root, changed, staging=staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        submodules = [_submodule_skipped(entry) for entry in entries if entry.mode == _GITLINK]
        skipped = sorted(links + submodules, key=lambda item: item.path)
        return Export(sha, Path(os.fsdecode(root)), len(blobs) - len(links), tuple(skipped))

    def _checked_tree(self, sha: str, max_files: int, max_bytes: int) -> tuple[list, list]:
        """Every entry of the tree of commit `sha`, and those that are files or links, once
        the whole tree passed the checks an export makes before writing anything."""
        self._require_commit(sha)
        entries = self._list_tree(sha, max_files)
        for entry in entries:
            _check_entry(entry)
        blobs = [entry for entry in entries if entry.mode != _GITLINK]
        size = sum(entry.size for entry in blobs)
        if size > max_bytes:
            raise UnsafeTreeError(f"commit {sha[:12]} holds {size} bytes of files, more than the "
                                  f"{max_bytes} an export may write: keep large files out of the "
                                  "manifests repository")
        return entries, blobs

    def _ensure_mirror(self) -> None:
        self._home.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.path.is_dir():
            return
        staging = tempfile.mkdtemp(prefix="mirror.git.", dir=self.state_dir)
        try:
            self._git_checked("init", "--quiet", "--bare", "--template=", staging, in_repository=False)
            os.rename(staging, self.path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _fetch_branch(self, branch: str) -> None:
        config: tuple[str, ...] = ()
        if self._credentials is not None:
            config = ("-c", f"credential.helper={_CREDENTIAL_HELPER}")
        done = self._git(
            "fetch", "--quiet", "--no-tags", "--no-recurse-submodules", "--no-write-fetch-head",
            "--no-show-forced-updates", "--", self._remote, f"+refs/heads/{branch}:{FETCHED_REF}",
            timeout=FETCH_TIMEOUT_SECONDS, config=config, extra_env=self._credentials)
        if done.returncode == 0:
            return
        why = _tail(done.stderr)
        if "couldn't find remote ref" in why:
            raise FetchError(f"the remote {redacted(self.url)} has no branch {branch!r}: check "
                             "the branch name, or push the branch")
        raise FetchError(f"cannot fetch branch {branch!r} from {redacted(self.url)}: "
                         f"{why.rstrip('.')}. Nothing changed; the next sync tries again")

    def _spos_refs(self) -> dict[str, str]:
        """The spos refs that point at commits, by name, in one git run."""
        listing = self._git_checked(
            "for-each-ref", "--format=%(refname) %(objecttype) %(objectname)", "refs/spos/")
        refs = {}
        for line in listing.decode().splitlines():
            name, kind, sha = line.split(" ")
            if kind == "commit":
                refs[name] = sha
        return refs

    def _descends(self, sha: str, ancestor: str) -> bool:
        done = self._git("merge-base", "--is-ancestor", ancestor, sha)
        if done.returncode in (0, 1):
            return done.returncode == 0
        if not self._has_commit(ancestor):
            return False
        raise GitError(f"cannot tell whether {sha[:12]} descends from {ancestor[:12]}: {_tail(done.stderr)}")

    def _force_push_error(self, branch: str, sha: str, previous: str, applied: bool) -> ForcePushError:
        reference = "the applied commit" if applied else "the commit the last sync fetched"
        return ForcePushError(
            f"branch {branch!r} of {redacted(self.url)} was rewritten: its commit {sha[:12]} "
            f"does not descend from {reference} {previous[:12]} (a force-push, or another "
            "repository). Nothing was changed. If the new history is intended, sync once with "
            "force-pushes allowed", sha=sha, previous=previous)

    def _has_commit(self, sha: str) -> bool:
        return self.path.is_dir() and self._git("cat-file", "-e", f"{sha}^{{commit}}").returncode == 0

    def _require_commit(self, sha: str) -> None:
        _check_sha(sha, "commit")
        if not self._has_commit(sha):
            raise UnknownCommitError(f"commit {sha} is not in the mirror {self.path}: fetch it first")

    def _signature_fields(self, sha: str, gpg: str, home: str) -> list[str]:
        """git's %G? (status), %GK (key id), %GF (fingerprint), %GP (primary fingerprint) and
        %GS (signer) of `sha`, checked with gpg in `home`. Only OpenPGP signatures are
        checked: the x509 and ssh verifiers are replaced by /bin/false."""
        done = self._git(
            "log", "-1", "--format=%G?%x00%GK%x00%GF%x00%GP%x00%GS", sha,
            config=("-c", f"gpg.program={gpg}", "-c", "gpg.minTrustLevel=ultimate",
                    "-c", "gpg.x509.program=/bin/false", "-c", "gpg.ssh.program=/bin/false"),
            extra_env={"GNUPGHOME": home})
        fields = done.stdout.decode(errors="replace").rstrip("\n").split("\0")
        if done.returncode != 0 or len(fields) != 5:
            raise SignatureError(f"cannot check the signature of {sha[:12]}: {_tail(done.stderr)}")
        return fields

    def _list_tree(self, sha: str, max_files: int) -> list[_Entry]:
        entries = []
        with self._streaming("ls-tree", "-r", "-z", "-l", "--full-tree", sha,
                             failure=f"git cannot read the tree of commit {sha[:12]} (malformed "
                                     "or incomplete); it is not exported") as listing:
            for record in _nul_records(listing):
                entries.append(_parse_entry(record))
                if len(entries) > max_files:
                    raise UnsafeTreeError(f"commit {sha[:12]} has more than {max_files} entries, "
                                          "more than an export may write")
        return entries

    def _write_blobs(self, root: bytes, blobs: list[_Entry], staging: bytes | None = None) -> list[Skipped]:
        """Write each regular file of `blobs` below `root`; return the symlinks, skipped
        (every link is listed, so a report of what was left out is whole). With `staging`, a
        directory on the same file system outside `root`, directories may exist already and
        each file is written there first and renamed over its path."""
        links, made, staged = [], set(), 0
        with tempfile.TemporaryFile() as wanted:
            wanted.write(b"".join(entry.oid.encode() + b"\n" for entry in blobs))
            wanted.seek(0)
            with self._streaming("cat-file", "--batch", stdin=wanted) as objects:
                for entry in blobs:
                    size = _object_header(objects, entry)
                    if entry.mode == _SYMLINK:
                        links.append(_link_skipped(entry, _link_target(objects, size, entry)))
                    elif staging is not None:
                        _make_parents(root, entry.path, made, exist_ok=True)
                        staged += 1
                        _replace_file(root, entry, _chunks(objects, size, entry), staging, staged)
                    else:
                        _make_parents(root, entry.path, made)
                        _write_file(root, entry, _chunks(objects, size, entry))
                    _end_of_object(objects, entry)
        return links

    @contextmanager
    def _streaming(self, *args: str, stdin: IO[bytes] | None = None,
                   failure: str = "") -> Iterator[IO[bytes]]:
        """Run git with its output streamed to the caller; an exception in the caller kills git.
        When git fails, raises UnsafeTreeError saying `failure` if given, else GitError."""
        with tempfile.TemporaryFile() as errors:
            process = self._start(args, stdin=stdin, stderr=errors)
            try:
                yield process.stdout
                returncode = process.wait(timeout=GIT_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                _kill(process)
                raise GitError(f"git {args[0]} did not exit within {GIT_TIMEOUT_SECONDS:.0f} s "
                               "and was stopped; the next sync tries again") from None
            except BaseException:
                _kill(process)
                raise
            finally:
                process.stdout.close()
                _RUNNING.discard(process)
            if returncode != 0:
                errors.seek(0)
                if _ABORTED.is_set() or returncode < 0:
                    # Stopped from outside (spos shutting down, the OOM killer): nothing is
                    # known against the revision, so it is not refused; the next sync retries.
                    raise GitError(f"git {args[0]} was stopped before it finished"
                                   + (" (spos is shutting down)" if _ABORTED.is_set() else
                                      f" (signal {-returncode})") + "; the next sync tries again")
                if failure:
                    raise UnsafeTreeError(f"{failure}: {_tail(errors.read())}")
                raise GitError(f"git {args[0]} failed in {self.path}: {_tail(errors.read())}")

    def _git_checked(self, *args: str, in_repository: bool = True) -> bytes:
        done = self._git(*args, in_repository=in_repository)
        if done.returncode != 0:
            raise GitError(f"git {args[0]} failed in {self.path}: {_tail(done.stderr)}. If the "
                           "mirror is damaged, delete it: the next sync fetches it again")
        return done.stdout

    def _git(self, *args: str, in_repository: bool = True, timeout: float = GIT_TIMEOUT_SECONDS,
             config: tuple[str, ...] = (), extra_env: dict[str, str] | None = None,
             ) -> subprocess.CompletedProcess:
        """Run one hardened git and collect its output. Raises GitError only when git cannot
        start or does not finish in `timeout`; judging the exit status is the caller's part."""
        process = self._start(args, in_repository=in_repository, config=config, extra_env=extra_env)
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(process)
            raise GitError(f"git {args[0]} did not finish within {timeout:.0f} s and was stopped; "
                           "the next sync tries again") from None
        except BaseException:
            _kill(process)
            raise
        finally:
            _RUNNING.discard(process)
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)

    def _start(self, args: tuple[str, ...], *, in_repository: bool = True,
               stdin: IO[bytes] | None = None, stderr: IO[bytes] | int = subprocess.PIPE,
               config: tuple[str, ...] = (), extra_env: dict[str, str] | None = None,
               ) -> subprocess.Popen:
        """Start git in its own session (a timeout kills ssh and helpers too), without a
        terminal, with `_HARDENING`, then `config`, and the scrubbed environment."""
        repository = [f"--git-dir={self.path}"] if in_repository else []
        argv = ["git", *repository, *_HARDENING, *config, *args]
        if _ABORTED.is_set():
            raise GitError("stopped: spos is shutting down")
        try:
            process = subprocess.Popen(
                argv, stdin=stdin if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=stderr, cwd=self.state_dir,
                env=_environment(str(self._home), extra_env), start_new_session=True)
        except OSError as exc:
            raise GitError(f"cannot run git: {exc.strerror}; install git") from None
        _RUNNING.add(process)
        if _ABORTED.is_set():  # abort() ran while it was being started: it missed this one
            _kill_group(process)
        return process


_RUNNING: set = set()
"""The git processes running now, so that `abort()` can end them."""
_ABORTED = threading.Event()


def abort() -> None:
    """End every git this process runs, and start no more: what a daemon told to stop does, so
    that a fetch hanging on a remote does not hold it up. The sync then fails as for an
    unreachable remote."""
    _ABORTED.set()
    for process in list(_RUNNING):  # only signalled: the thread that started it reaps it
        _kill_group(process)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _environment(home: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """git's whole environment: `_PASSED_THROUGH`, an empty HOME, no configuration but the
    repository's own, nothing that prompts. ssh runs in batch mode (an unknown host key or a
    key with a passphrase fails instead of waiting); it still finds its keys and known_hosts
    in the user's home from the password database, which HOME does not change."""
    env = {name: os.environ[name] for name in _PASSED_THROUGH if name in os.environ}
    env.setdefault("PATH", os.defpath)
    env.update({
        "HOME": home,
        "LC_ALL": "C",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ASKPASS": "/bin/false",
        "SSH_ASKPASS": "/bin/false",
        "GIT_SSH_COMMAND": "ssh -o BatchMode=yes",
        "GIT_NO_REPLACE_OBJECTS": "1",
    })
    env.update(extra or {})
    return env


def _kill(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _tail(stderr: bytes) -> str:
    """The last lines git wrote to stderr, on one line, for a message."""
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    return "; ".join(lines[-3:]) or "no message"


def _trust_keyring(gpg: str, home: str, keyring: Path) -> None:
    """Import `keyring` into the GNUPGHOME `home` and give each of its keys ultimate trust."""
    Path(home, "gpg.conf").write_text(_GPG_CONF)
    _gpg(gpg, home, "--import", str(keyring), what=f"import the keyring {keyring}")
    listing = _gpg(gpg, home, "--with-colons", "--list-keys", what="list the imported keys")
    fingerprints = _primary_fingerprints(listing)
    if not fingerprints:
        raise SignatureError(f"keyring {keyring} holds no public keys: write the trusted keys into "
                             f"it with `gpg --export KEY... > {keyring}`")
    ownertrust = "".join(f"{fingerprint}:6:\n" for fingerprint in fingerprints)
    _gpg(gpg, home, "--import-ownertrust", stdin=ownertrust.encode(), what="trust the imported keys")


def _gpg(gpg: str, home: str, *args: str, what: str, stdin: bytes | None = None) -> str:
    env = {"PATH": os.environ.get("PATH", os.defpath), "GNUPGHOME": home, "HOME": home, "LC_ALL": "C"}
    try:
        done = subprocess.run([gpg, "--batch", "--no-tty", "--homedir", home, *args], input=stdin,
                              capture_output=True, env=env, timeout=GPG_TIMEOUT_SECONDS)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SignatureError(f"cannot {what}: {exc}") from None
    if done.returncode != 0:
        raise SignatureError(f"cannot {what}: {_tail(done.stderr)}")
    return done.stdout.decode(errors="replace")


def _primary_fingerprints(listing: str) -> list[str]:
    """The fingerprint of each primary key in `gpg --with-colons --list-keys` output: the
    first `fpr` record after each `pub` record (later ones belong to subkeys)."""
    fingerprints, after_pub = [], False
    for line in listing.splitlines():
        fields = line.split(":")
        if fields[0] == "pub":
            after_pub = True
        elif fields[0] == "fpr" and after_pub and len(fields) > 9:
            fingerprints.append(fields[9])
            after_pub = False
    return fingerprints


_SIGNATURE_PROBLEMS = {
    "N": "is not signed: sign the commits of the manifests repository (git commit -S) with a "
         "key from the keyring",
    "B": "has a BAD signature{by}: the commit was changed after signing, or the signature is "
         "forged. Do not apply it",
    "U": "is signed{by}, which is not trusted here: add the key to the keyring if you trust it",
    "X": "has a signature{by} that has expired: sign the commit again",
    "Y": "is signed{by}, which has expired: extend the key (gpg --quick-set-expire) and export "
         "the keyring again, or sign with a valid key",
    "R": "is signed{by}, which has been revoked: sign the commit with a key that is not revoked",
    "E": "has a signature{by} that cannot be checked: the key is not in the keyring. Add it if "
         "you trust it",
}


def _signature_error(sha: str, status: str, key: str, keyring: Path) -> SignatureError:
    problem = _SIGNATURE_PROBLEMS.get(status, f"has a signature git reports as {status!r}")
    by = f" by key {key}" if key else ""
    return SignatureError(f"commit {sha[:12]} {problem.format(by=by)} (keyring {keyring}); it is "
                          "not applied", status=status, fingerprint=key)


def _nul_records(stream: IO[bytes]) -> Iterator[bytes]:
    pending = b""
    while chunk := stream.read1(1 << 16):
        *records, pending = (pending + chunk).split(b"\0")
        yield from records
    if pending:
        raise GitError("git ls-tree output ended in the middle of an entry")


def _parse_entry(record: bytes) -> _Entry:
    """`<mode> <type> <oid> <size>\\t<path>`; the size is "-" for a gitlink."""
    meta, _, path = record.partition(b"\t")
    mode, _kind, oid, size = meta.decode().split()
    return _Entry(mode, oid, -1 if size == "-" else int(size), path)


MAX_DEPTH = 64
"""Directories an exported path may go through; deeper trees are refused."""
MAX_NAME_BYTES = 255
"""The longest file name (one path component) Linux file systems hold."""


def _check_entry(entry: _Entry) -> None:
    shown = os.fsdecode(entry.path)
    if entry.mode not in (_FILE, _EXECUTABLE, _SYMLINK, _GITLINK):
        raise UnsafeTreeError(f"tree entry {shown!r} has the unknown mode {entry.mode}")
    parts = entry.path.split(b"/")
    if len(parts) > MAX_DEPTH:
        raise UnsafeTreeError(f"tree entry {shown[:200]!r}... is {len(parts)} levels deep, more "
                              f"than the {MAX_DEPTH} an export goes: the revision is not exported")
    if any(len(part) > MAX_NAME_BYTES for part in parts):
        raise UnsafeTreeError(f"tree entry {shown[:200]!r} has a name longer than "
                              f"{MAX_NAME_BYTES} bytes, which no file system here holds")
    for part in parts:
        if part in (b"", b".", b"..") or part.lower() == b".git":
            raise UnsafeTreeError(f"tree entry {shown!r} has the forbidden component "
                                  f"{os.fsdecode(part)!r}: the revision was crafted to escape or "
                                  "imitate a repository and is not exported")


def _make_destination(dest: str | os.PathLike) -> bytes:
    root = os.fsencode(os.path.abspath(dest))
    try:
        os.mkdir(root, 0o755)
    except FileExistsError:
        raise ExportError(f"{os.fsdecode(root)} already exists: an export writes a new "
                          "directory; remove it or choose another") from None
    except OSError as exc:
        raise ExportError(f"cannot create {os.fsdecode(root)}: {exc.strerror}") from None
    os.chmod(root, 0o755)
    return root


def _make_parents(root: bytes, path: bytes, made: set[bytes], exist_ok: bool = False) -> None:
    parts = path.split(b"/")[:-1]
    if not parts or b"/".join(parts) in made:
        return
    for depth in range(1, len(parts) + 1):
        directory = b"/".join(parts[:depth])
        if directory not in made:
            host = os.path.join(root, directory)
            if exist_ok and stat_is_directory(host):
                made.add(directory)
                continue
            _guarded(os.mkdir, host, 0o755, shown=directory)
            os.chmod(host, 0o755)
            made.add(directory)


def stat_is_directory(path: bytes) -> bool:
    """A real directory (not a link to one)."""
    try:
        return os.lstat(path).st_mode & 0o170000 == 0o040000
    except OSError:
        return False


def _replace_file(root: bytes, entry: _Entry, content: Iterator[bytes], staging: bytes,
                  number: int) -> None:
    """Write the file in `staging` and rename it over its path: a reader sees the old or the
    new content, and no name of the tree is ever used for a temporary file."""
    name = str(number).encode()
    _write_file(staging, _Entry(entry.mode, entry.oid, entry.size, name), content)
    _guarded(os.rename, os.path.join(staging, name), os.path.join(root, entry.path),
             shown=entry.path)


def _remove_file(root: bytes, path: bytes) -> None:
    try:
        os.unlink(os.path.join(root, path))
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        shutil.rmtree(os.path.join(root, path), ignore_errors=True)


def _prune_directories(root: bytes, files: set[bytes]) -> None:
    """Remove the directories below `root` that no file of `files` is in (deepest first)."""
    needed = {b"/".join(path.split(b"/")[:depth])
              for path in files for depth in range(1, path.count(b"/") + 1)}
    for current, directories, _ in sorted(os.walk(root), key=lambda item: -len(item[0])):
        for directory in directories:
            full = os.path.join(current, directory)
            relative = os.path.relpath(full, root)
            if relative not in needed:
                shutil.rmtree(full, ignore_errors=True)


def _write_file(root: bytes, entry: _Entry, content: Iterator[bytes]) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    descriptor = _guarded(os.open, os.path.join(root, entry.path), flags, 0o600, shown=entry.path)
    try:
        with open(descriptor, "wb") as target:
            os.fchmod(descriptor, 0o755 if entry.mode == _EXECUTABLE else 0o644)
            for chunk in content:
                target.write(chunk)
    except OSError as exc:  # a full disk: the export's error, retried at the next sync
        raise ExportError(f"cannot write {os.fsdecode(entry.path)!r}: {exc.strerror}") from None


def _guarded(operation, path: bytes, *args, shown: bytes):
    """`operation(path, *args)`, with OSError turned into the export's errors."""
    try:
        return operation(path, *args)
    except (FileExistsError, NotADirectoryError):
        raise UnsafeTreeError(f"tree entry {os.fsdecode(shown)!r} conflicts with another entry of "
                              "the same path: the tree was crafted, it is not exported") from None
    except OSError as exc:
        raise ExportError(f"cannot write {os.fsdecode(shown)!r}: {exc.strerror}") from None


def _object_header(stream: IO[bytes], entry: _Entry) -> int:
    header = stream.readline(200).split()
    if len(header) != 3 or header[0].decode() != entry.oid or header[1] != b"blob":
        raise GitError(f"git cat-file did not return the blob of {os.fsdecode(entry.path)!r}: {header!r}")
    return int(header[2])


def _end_of_object(stream: IO[bytes], entry: _Entry) -> None:
    if stream.read(1) != b"\n":
        raise GitError(f"git cat-file output is garbled after {os.fsdecode(entry.path)!r}")


def _chunks(stream: IO[bytes], size: int, entry: _Entry) -> Iterator[bytes]:
    """The next `size` bytes of `stream`, in pieces of at most 1 MiB."""
    remaining = size
    while remaining:
        chunk = stream.read(min(remaining, 1 << 20))
        if not chunk:
            raise GitError(f"git cat-file ended in the middle of {os.fsdecode(entry.path)!r}")
        remaining -= len(chunk)
        yield chunk


def _link_target(stream: IO[bytes], size: int, entry: _Entry) -> bytes:
    """A symlink's target, cut just past MAX_LINK_TARGET_BYTES (such a link is judged
    escaping anyway); the rest of the blob is read and dropped."""
    target = bytearray()
    for chunk in _chunks(stream, size, entry):
        if len(target) <= MAX_LINK_TARGET_BYTES:
            target += chunk[:MAX_LINK_TARGET_BYTES + 1 - len(target)]
    return bytes(target)


def _link_skipped(entry: _Entry, target: bytes) -> Skipped:
    path, shown_target = os.fsdecode(entry.path), os.fsdecode(target)
    if _escapes(entry.path, target):
        return Skipped(path, "escaping-symlink", shown_target,
                       f"symbolic link to {shown_target!r} points outside the repository: refused")
    return Skipped(path, "symlink", shown_target,
                   f"symbolic link to {shown_target!r} is not created: exports hold plain files only")


def _escapes(path: bytes, target: bytes) -> bool:
    """Whether a link at `path` to `target` leaves the repository (or is too odd to judge)."""
    if not target or target.startswith(b"/") or len(target) > MAX_LINK_TARGET_BYTES:
        return True
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
    return resolved == b".." or resolved.startswith(b"../")


def _submodule_skipped(entry: _Entry) -> Skipped:
    return Skipped(os.fsdecode(entry.path), "submodule", entry.oid,
                   f"submodule (commit {entry.oid[:12]}) is not fetched: an export holds the "
                   "manifests repository's own files only")
