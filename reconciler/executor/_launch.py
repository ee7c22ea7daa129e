"""The in-sandbox launcher: the last step between bubblewrap's finished mounts and the action.

Bubblewrap runs `python3 -I -S -c <this file's text> ARGS -- ACTION-ARGV` inside the new
namespaces, with no capabilities and no_new_privs set. This program then, in order:

0. enters the run's working directory (while still root, so any directory bubblewrap could
   mount is enterable);
1. restricts itself with Landlock (the ruleset built by `landlock.py`), so the action and all its
   descendants can only read, write and execute what the rules allow; a ruleset that cannot be
   applied in full is a setup failure, never a silent fallback. This happens first, as root,
   so the rule paths are opened whatever the run's user may traverse (and the interpreter's own
   modules, perhaps under /root, are still loadable);
2. switches to the run's user when it is not root (bubblewrap kept CAP_SETUID/CAP_SETGID for
   exactly this; the switch clears them, which is checked);
3. closes every fd but 0-2 and the passed ones; restores the default SIGPIPE/SIGXFSZ handling
   that Python's start-up ignored (ignored signals would survive exec);
4. writes `exec` to the setup pipe (close-on-exec) and executes the action with exactly its
   environment. On failure it writes the reason there instead and exits 126 (127: not found).

`launch.c` is the same program compiled, which the sandbox prefers when the installation has
it: the two take the same arguments and must keep the same behaviour.

The fd may be a pipe that stays empty for a while: a prepared sandbox (sandbox.py) is set up
before its run is known, and its launcher waits here, in read(), until the run's arguments
come. It imports nothing but built-in modules (`_ctypes` for the three Landlock system calls, which the
standard library does not wrap), so it starts as fast as Python can. Its only argument is an fd
holding the real arguments, NUL-terminated (so the action's environment is in no command line):
COUNT (of the arguments after it), SETUP_FD UID GID GROUPS KEEP_FDS CWD, MOUNTS (0 here; a
prepared sandbox's run directories, which only launch.c mounts), then the Landlock arguments (`Ruleset.launcher_args`), then
N_ENV and N `KEY=VALUE` items, `--`, and the action's argv. launch.c takes a second fd in a
prepared sandbox: COUNT and the Landlock arguments of the sandbox's shape, which it adds to a
ruleset while it waits; the run's arguments then carry only the run's own rules.
"""

import posix  # what `os` wraps, without importing os.py and its imports (~2 ms of start-up)
import sys

SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
RULE_PATH_BENEATH, RULE_NET_PORT = 1, 2


class SetupError(Exception):
    def __init__(self, message, code=126):
        super().__init__(message)
        self.code = code


def main(args_fd):
    setup_fd = -1
    try:
        args = read_args(args_fd)
        if not args or not args[0].isdigit() or int(args[0]) != len(args) - 1:
            raise SetupError("launcher arguments are malformed: not the number they announce")
        args = args[1:]
        if not args or not args[0].isdigit():
            raise SetupError("launcher arguments are malformed")
        setup_fd = int(args[0])
        uid, gid = int(args[1]), int(args[2])
        groups = [int(g) for g in args[3].split(",") if g]
        keep = {int(fd) for fd in args[4].split(",") if fd}
        cwd = args[5]
        if args[6] != "0":  # a prepared sandbox's mounts: launch.c's mount_run_directories
            raise SetupError("a prepared sandbox needs the compiled launcher")
        rules, rest = parse_landlock(args[7:])
        env_count = int(rest[0])
        items = rest[1:1 + env_count]
        if any("=" not in item or item.startswith("=") for item in items):
            raise SetupError("launcher arguments are malformed: an environment item is not NAME=VALUE")
        env = dict(item.split("=", 1) for item in items)
        if rest[1 + env_count] != "--" or len(rest) < 3 + env_count:
            raise SetupError("launcher arguments are malformed")
        argv = rest[2 + env_count:]
        try:
            posix.chdir(cwd)
        except OSError as exc:
            raise SetupError(f"cannot enter working directory {cwd}: {exc.strerror}") from None
        if rules[0] > 0:
            restrict(*rules)
        if uid != 0:
            become(uid, gid, groups)
        close_fds_except(keep | {setup_fd})
        reset_signals()
        posix.set_inheritable(setup_fd, False)
        posix.write(setup_fd, b"exec\n")
        try:
            posix.execve(argv[0], argv, env)
        except OSError as exc:
            raise SetupError(f"cannot execute {argv[0]}: {exc.strerror}",
                             127 if exc.errno == 2 else 126) from None
    except SetupError as exc:
        fail(setup_fd, str(exc), exc.code)
    except (ValueError, IndexError):
        fail(setup_fd, "launcher arguments are malformed", 126)
    except Exception as exc:  # anything else is a launcher bug: still fail visibly
        fail(setup_fd, f"launcher error: {exc!r}", 126)


def read_args(fd):
    """NUL-terminated arguments from an fd (a memfd, or a pipe: nothing in any command line);
    the first one counts the others, so arguments cut short are refused."""
    chunks = []
    while True:
        chunk = posix.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    posix.close(fd)
    encoding, errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
    return [arg.decode(encoding, errors) for arg in b"".join(chunks).split(b"\0")[:-1]]


def parse_landlock(args):
    abi, handled_fs, handled_net, scoped, file_rights, count = (int(a) for a in args[:6])
    paths = [(int(args[6 + 2 * i]), args[7 + 2 * i]) for i in range(count)]
    at = 6 + 2 * count
    port_count = int(args[at])
    ports = [(int(args[at + 1 + 2 * i]), int(args[at + 2 + 2 * i])) for i in range(port_count)]
    rules = (abi, handled_fs, handled_net, scoped, file_rights, paths, ports)
    return rules, args[at + 1 + 2 * port_count:]


def become(uid, gid, groups):
    # bubblewrap leaves CAP_SETUID and CAP_SETGID inheritable too: keep them effective and
    # permitted only, for the switch below (capset(2): version 3 header, two data triples).
    capset, errno_of = libc_function("capset")
    keep = ((1 << 6) | (1 << 7)).to_bytes(4, sys.byteorder)  # CAP_SETGID, CAP_SETUID
    header = (0x20080522).to_bytes(4, sys.byteorder) + bytes(4)
    if capset(header, keep + keep + bytes(4) + bytes(12)) != 0:
        raise SetupError(f"capset failed: {posix.strerror(errno_of())}")
    posix.setgroups(groups)
    posix.setresgid(gid, gid, gid)
    posix.setresuid(uid, uid, uid)
    with open("/proc/self/status") as status:
        caps = [line.split()[1] for line in status
                if line.startswith(("CapPrm", "CapEff", "CapAmb", "CapInh"))]
    if any(int(value, 16) for value in caps):
        raise SetupError(f"capabilities left after switching to uid {uid}: {caps}")


def restrict(abi, handled_fs, handled_net, scoped, file_rights, paths, ports):
    syscall, errno_of = libc_syscall()
    attr = handled_fs.to_bytes(8, sys.byteorder)
    if abi >= 4:
        attr += handled_net.to_bytes(8, sys.byteorder)
    if abi >= 6:
        attr += scoped.to_bytes(8, sys.byteorder)
    ruleset = syscall(SYS_CREATE_RULESET, attr, len(attr), 0)
    if ruleset < 0:
        raise SetupError(f"landlock_create_ruleset failed: {posix.strerror(errno_of())}")
    try:
        for rights, path in paths:
            add_path_rule(syscall, errno_of, ruleset, rights, path, file_rights)
        for rights, port in ports:
            rule = rights.to_bytes(8, sys.byteorder) + port.to_bytes(8, sys.byteorder)
            if syscall(SYS_ADD_RULE, ruleset, RULE_NET_PORT, rule, 0) < 0:
                raise SetupError(f"landlock_add_rule(port {port}) failed: {posix.strerror(errno_of())}")
        if syscall(SYS_RESTRICT_SELF, ruleset, 0) < 0:
            raise SetupError(f"landlock_restrict_self failed: {posix.strerror(errno_of())}")
    finally:
        posix.close(ruleset)


def open_rule_path(path):
    """An O_PATH fd of a rule's path, opened one component at a time. A symbolic link on the
    way is followed only when it lies on a read-only mount (the host's tree); one on a writable
    mount may have been left there by an earlier or concurrent run of the agent to point the
    rule at something else ("/"): SetupError. OSError when the path is missing."""
    flags = posix.O_PATH | posix.O_CLOEXEC
    parts = path.split("/")[::-1]  # the components still to open, the next one last
    links = 0
    directory = posix.open("/", flags | posix.O_DIRECTORY)
    try:
        while parts:
            name = parts.pop()
            if not name:
                continue
            fd = posix.open(name, flags | posix.O_NOFOLLOW, dir_fd=directory)
            if posix.fstat(fd).st_mode & 0o170000 != 0o120000:  # not a symbolic link
                posix.close(directory)
                directory = fd
                continue
            try:
                if not posix.fstatvfs(fd).f_flag & 1:  # ST_RDONLY
                    raise SetupError(f"refusing the rule for {path}: a symbolic link on a "
                                     "writable mount leads there")
                target = posix.readlink("", dir_fd=fd)
            finally:
                posix.close(fd)
            links += 1
            if links > 40:
                raise OSError(40, "too many levels of symbolic links")  # ELOOP
            parts += target.split("/")[::-1]
            if target.startswith("/"):
                posix.close(directory)
                directory = -1
                directory = posix.open("/", flags | posix.O_DIRECTORY)
    except BaseException:
        if directory >= 0:
            posix.close(directory)
        raise
    return directory


def add_path_rule(syscall, errno_of, ruleset, rights, path, file_rights):
    try:
        fd = open_rule_path(path)
    except OSError:
        return  # not in this sandbox (or hidden): nothing to allow
    try:
        if posix.fstat(fd).st_mode & 0o170000 != 0o040000:  # not a directory
            rights &= file_rights
        if not rights:
            return
        rule = rights.to_bytes(8, sys.byteorder) + fd.to_bytes(4, sys.byteorder, signed=True)
        if syscall(SYS_ADD_RULE, ruleset, RULE_PATH_BENEATH, rule, 0) < 0:
            raise SetupError(f"landlock_add_rule({path}) failed: {posix.strerror(errno_of())}")
    finally:
        posix.close(fd)


def libc_syscall():
    """libc's syscall(2) through the bare `_ctypes` module (importing `ctypes` costs ~6 ms)."""
    return libc_function("syscall")


def libc_function(name):
    """A libc function taking ints and buffers and returning a C long, and the errno getter."""
    import _ctypes

    class Long(_ctypes._SimpleCData):
        _type_ = "l"

    class Function(_ctypes.CFuncPtr):
        _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
        _restype_ = Long

    class Libc:
        _handle = _ctypes.dlopen(None)

    function = Function((name, Libc))

    def syscall(*args):
        return function(*(Long(a) if isinstance(a, int) else a for a in args))

    return syscall, _ctypes.get_errno


def close_fds_except(keep):
    low = 3
    for fd in sorted(f for f in keep if f >= 3):
        if fd > low:
            posix.closerange(low, fd)
        low = fd + 1
    posix.closerange(low, 1 << 20)


def reset_signals():
    """An ignored signal survives exec: Python ignores SIGPIPE and SIGXFSZ at start-up, and the
    executor may have been started ignoring others (SIGHUP under nohup). None stays ignored."""
    import _signal

    for signum in _signal.valid_signals():
        if signum not in (_signal.SIGKILL, _signal.SIGSTOP) and \
                _signal.getsignal(signum) == _signal.SIG_IGN:
            _signal.signal(signum, _signal.SIG_DFL)


def fail(setup_fd, message, code):
    text = f"spos sandbox: {message}\n".encode(errors="replace")
    for fd in (setup_fd, 2) if setup_fd >= 0 else (2,):
        try:
            posix.write(fd, text)
        except OSError:
            pass
    posix._exit(code)


main(int(sys.argv[1]))
