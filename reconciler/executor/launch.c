/*
 * spos-launch: the in-sandbox launcher, compiled. It does what _launch.py does, with the same
 * arguments and the same messages, in a fraction of the time: Python's own start-up is most of
 * the cost of a sandboxed run's start. The protocol, the order of the steps and the reasons for
 * that order are described in _launch.py; for a sandbox set up for its run the two are
 * interchangeable (tests/test_sandbox.py runs the launcher contract against both). Only this
 * one also serves a prepared sandbox: it builds the Landlock ruleset of the sandbox's shape
 * while it waits for the run (prebuild_ruleset), mounts the run's own directories first
 * (mount_run_directories), with the capabilities bubblewrap left it for that, then drops them,
 * and executes the action only on the executor's go (wait_for_go).
 *
 * The same binary has a second job, outside the sandbox (`--enter`, see enter()): the executor
 * spawns it without forking itself (posix_spawn), and it puts itself into the run's cgroup and
 * nice level before it executes bubblewrap, which a forked copy of the executor did before.
 *
 * Built by setup.py (reconciler/executor/_build.py) as a static executable named after the
 * digest of this file, so a stale build is never used. Linux only; needs nothing beyond libc.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Landlock's system calls and rule types (linux/landlock.h), spelled out so that old kernel
 * headers still build this; the numbers are the same on every architecture that has them. */
#define SYS_LANDLOCK_CREATE_RULESET 444
#define SYS_LANDLOCK_ADD_RULE 445
#define SYS_LANDLOCK_RESTRICT_SELF 446
#define SYS_CLOSE_RANGE 436
#define SYS_OPENAT2 437
#define RESOLVE_NO_SYMLINKS_FLAG 0x04
#define RULE_PATH_BENEATH 1
#define RULE_NET_PORT 2

/* What the launcher needs of linux/capability.h and linux/magic.h, spelled out too: musl's
 * headers (the C library the launcher is best built with, _build.py) come without the kernel's. */
#define CAPABILITY_VERSION_3 0x20080522
#define CAPABILITY_SETGID 6
#define CAPABILITY_SETUID 7
#define CAPABILITY_SETPCAP 8
#define CAPABILITY_SYS_ADMIN 21
#define TMPFS_FS_MAGIC 0x01021994

struct capability_header {
    uint32_t version;
    int pid;
};

struct capability_data {
    uint32_t effective;
    uint32_t permitted;
    uint32_t inheritable;
};

struct ruleset_attr {
    uint64_t handled_access_fs;
    uint64_t handled_access_net;
    uint64_t scoped;
};

struct __attribute__((packed)) path_beneath_attr {
    uint64_t allowed_access;
    int32_t parent_fd;
};

struct net_port_attr {
    uint64_t allowed_access;
    uint64_t port;
};

static int setup_fd = -1;

static void write_all(int fd, const char *data, size_t length) {
    while (length > 0) {
        ssize_t written = write(fd, data, length);
        if (written < 0 && errno == EINTR)
            continue;
        if (written <= 0)
            return;
        data += written;
        length -= (size_t)written;
    }
}

/* Report a setup failure on the setup pipe (which the executor reads) and on stderr (the run's
 * log), then exit: 127 when the program is missing, 126 for everything else, like a shell. */
static void __attribute__((noreturn, format(printf, 2, 3))) fail(int code, const char *format, ...) {
    char message[4096];
    int length = snprintf(message, sizeof message, "spos sandbox: ");
    va_list args;
    va_start(args, format);
    length += vsnprintf(message + length, sizeof message - (size_t)length - 1, format, args);
    va_end(args);
    if (length > (int)sizeof message - 2)
        length = (int)sizeof message - 2;
    message[length++] = '\n';
    if (setup_fd >= 0)
        write_all(setup_fd, message, (size_t)length);
    write_all(2, message, (size_t)length);
    _exit(code);
}

struct args {
    char **items;
    size_t count;
    size_t next;
};

/* NUL-terminated arguments from an fd (a memfd, or a pipe for a prepared sandbox: nothing in
 * any command line). The first one counts the rest, so arguments cut short are refused. A
 * memfd is read to its end and closed. A prepared sandbox's pipe (`go` not NULL) is read only
 * until the count is complete and stays open: the executor may hold the run back there while
 * the launcher sets it up, and sends GO_BYTE after the arguments when it may start (at once,
 * or later: wait_for_go). *go tells whether that byte came with the arguments. */
#define GO_BYTE 'g'

static struct args read_args(int fd, int *go) {
    size_t size = 0, capacity = 1 << 16, ends = 0, wanted = 0, used = 0;
    char *buffer = malloc(capacity);
    for (;;) {
        if (buffer == NULL)
            fail(126, "launcher error: out of memory");
        if (go != NULL && wanted != 0 && ends == wanted)
            break;
        if (size == capacity) {
            capacity *= 2;
            buffer = realloc(buffer, capacity);
            continue;
        }
        ssize_t got = read(fd, buffer + size, capacity - size);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0)
            fail(126, "launcher error: cannot read its arguments: %s", strerror(errno));
        if (got == 0)
            break;
        for (size_t i = size; i < size + (size_t)got && (wanted == 0 || ends < wanted); i++) {
            if (buffer[i] != '\0')
                continue;
            used = i + 1;
            if (ends++ == 0) { /* the count: how many ends to wait for */
                char *declared_end;
                errno = 0;
                unsigned long long declared = strtoull(buffer, &declared_end, 10);
                if (errno != 0 || *declared_end != '\0' || declared_end == buffer ||
                    declared >= SIZE_MAX / 2)
                    fail(126, "launcher arguments are malformed: not the number they announce");
                wanted = (size_t)declared + 1;
            }
        }
        size += (size_t)got;
    }
    if (go == NULL) {
        close(fd);
        used = size;
    } else {
        /* After the arguments, nothing or the go byte alone. */
        if (size > used + 1 || (size == used + 1 && buffer[used] != GO_BYTE))
            fail(126, "launcher arguments are malformed: more than they announce");
        *go = size == used + 1;
        size = used;
    }
    struct args args = {NULL, 0, 0};
    for (size_t i = 0; i < size; i++)
        args.count += buffer[i] == '\0';
    args.items = calloc(args.count + 1, sizeof(char *));
    if (args.items == NULL)
        fail(126, "launcher error: out of memory");
    char *start = buffer;
    for (size_t i = 0, n = 0; i < size; i++) {
        if (buffer[i] == '\0') {
            args.items[n++] = start;
            start = buffer + i + 1;
        }
    }
    char *declared_end;
    errno = 0;
    unsigned long long declared = args.count ? strtoull(args.items[0], &declared_end, 10) : 0;
    if (args.count == 0 || errno != 0 || *declared_end != '\0' || declared != args.count - 1)
        fail(126, "launcher arguments are malformed: not the number they announce");
    args.next = 1;
    return args;
}

/* A prepared sandbox's run, set up in full, waits here for the executor's go (unless it came
 * with the arguments). The pipe closed instead means the executor withdrew the run before it
 * started (it could not write the run's log or attachments): nothing of the run executes, and
 * the executor, which knows why, says so; the launcher leaves quietly. */
static void wait_for_go(int fd, int go) {
    while (!go) {
        char byte;
        ssize_t got = read(fd, &byte, 1);
        if (got < 0 && errno == EINTR)
            continue;
        if (got == 0)
            _exit(126);
        if (got < 0)
            fail(126, "launcher error: cannot read the go of its run: %s", strerror(errno));
        if (byte != GO_BYTE)
            fail(126, "launcher arguments are malformed: more than they announce");
        go = 1;
    }
    close(fd);
}

static char *next_arg(struct args *args) {
    if (args->next >= args->count)
        fail(126, "launcher arguments are malformed");
    return args->items[args->next++];
}

static unsigned long long next_number(struct args *args) {
    const char *text = next_arg(args);
    char *end;
    errno = 0;
    unsigned long long value = strtoull(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || text[0] == '-')
        fail(126, "launcher arguments are malformed: %s is not a number", text);
    return value;
}

/* A comma-separated list of numbers, maybe empty, into a new array (one spare slot at the
 * end); returns how many were stored. */
static size_t parse_list(const char *text, unsigned long long **out) {
    size_t capacity = 2;
    for (const char *c = text; *c != '\0'; c++)
        capacity += *c == ',';
    unsigned long long *values = calloc(capacity, sizeof *values);
    if (values == NULL)
        fail(126, "launcher error: out of memory");
    *out = values;
    size_t count = 0;
    while (*text != '\0') {
        char *end;
        errno = 0;
        unsigned long long value = strtoull(text, &end, 10);
        if (errno != 0 || end == text || (*end != ',' && *end != '\0') || count + 1 >= capacity)
            fail(126, "launcher arguments are malformed: bad list %s", text);
        values[count++] = value;
        text = *end == ',' ? end + 1 : end;
    }
    return count;
}

/* An O_PATH fd of a rule's path, opened one component at a time. A symbolic link on the way is
 * followed only when it lies on a read-only mount (the host's tree: /lib64, /etc/localtime...);
 * one on a writable mount may have been left there by an earlier or concurrent run of the agent
 * to point the rule at something else ("/"), so the rule is refused (exit 126). -1 when the
 * path is missing. A path with no link on the way (most) takes one openat2 that refuses links;
 * one with a link, or a kernel without openat2 (before 5.6), takes the walk. */
static int open_rule_path(const char *path) {
    struct { uint64_t flags, mode, resolve; } how = {
        .flags = O_PATH | O_CLOEXEC, .mode = 0, .resolve = RESOLVE_NO_SYMLINKS_FLAG};
    int direct = (int)syscall(SYS_OPENAT2, AT_FDCWD, path, &how, sizeof how);
    if (direct >= 0)
        return direct;
    if (errno == ENOENT || errno == ENOTDIR)
        return -1; /* missing, and no link on the way before the missing part */
    char rest[2 * PATH_MAX], target[PATH_MAX];
    if (snprintf(rest, sizeof rest, "%s", path) >= (int)sizeof rest)
        return -1;
    int links = 0;
    int dir = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
    char *cursor = rest;
    while (dir >= 0) {
        while (*cursor == '/')
            cursor++;
        if (*cursor == '\0')
            return dir;
        char *end = strchr(cursor, '/');
        size_t length = end ? (size_t)(end - cursor) : strlen(cursor);
        char name[NAME_MAX + 1];
        if (length > NAME_MAX)
            break;
        memcpy(name, cursor, length);
        name[length] = '\0';
        cursor += length;
        int fd = openat(dir, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
        struct stat status;
        if (fd < 0 || fstat(fd, &status) < 0) {
            if (fd >= 0)
                close(fd);
            break;
        }
        if (!S_ISLNK(status.st_mode)) {
            close(dir);
            dir = fd;
            continue;
        }
        struct statvfs mount_of_link;
        if (fstatvfs(fd, &mount_of_link) < 0 || !(mount_of_link.f_flag & ST_RDONLY))
            fail(126, "refusing the rule for %s: a symbolic link on a writable mount leads "
                 "there", path);
        ssize_t got = readlinkat(fd, "", target, sizeof target - 1);
        close(fd);
        if (got < 0 || ++links > 40)
            break;
        target[got] = '\0';
        char joined[2 * PATH_MAX];
        if (snprintf(joined, sizeof joined, "%s/%s", target, cursor) >= (int)sizeof joined)
            break;
        memcpy(rest, joined, strlen(joined) + 1);
        cursor = rest;
        if (target[0] == '/') {
            close(dir);
            dir = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
        }
    }
    if (dir >= 0)
        close(dir);
    return -1;
}

/* Allow `rights` beneath `path`. 0 when the path is missing (not in this sandbox, or hidden:
 * nothing to allow), 1 otherwise; then `found` (if given) is what the path names. */
static int add_path_rule(int ruleset, uint64_t rights, const char *path, uint64_t file_rights,
                         struct stat *found) {
    int fd = open_rule_path(path);
    if (fd < 0)
        return 0;
    struct stat status = {0}; /* on failure (never seen) it matches nothing later */
    if (fstat(fd, &status) == 0 && !S_ISDIR(status.st_mode))
        rights &= file_rights;
    if (found != NULL)
        *found = status;
    if (rights != 0) {
        struct path_beneath_attr rule = {rights, fd};
        if (syscall(SYS_LANDLOCK_ADD_RULE, ruleset, RULE_PATH_BENEATH, &rule, 0) < 0)
            fail(126, "landlock_add_rule(%s) failed: %s", path, strerror(errno));
    }
    close(fd);
    return 1;
}

/* The Landlock arguments ABI HANDLED_FS HANDLED_NET SCOPED FILE_RIGHTS N (RIGHTS PATH)*N M
 * (RIGHTS PORT)*M, read from `args` (which is left after them). */
struct rules {
    unsigned long long header[5]; /* ABI HANDLED_FS HANDLED_NET SCOPED FILE_RIGHTS */
    struct args items;
    size_t path_at, port_at;
    unsigned long long paths, ports;
};

static struct rules read_rules(struct args *args) {
    struct rules rules;
    for (int i = 0; i < 5; i++)
        rules.header[i] = next_number(args);
    rules.paths = next_number(args);
    rules.path_at = args->next;
    if (rules.paths > args->count || args->next + 2 * rules.paths > args->count)
        fail(126, "launcher arguments are malformed");
    args->next += 2 * rules.paths;
    rules.ports = next_number(args);
    rules.port_at = args->next;
    if (rules.ports > args->count || args->next + 2 * rules.ports > args->count)
        fail(126, "launcher arguments are malformed");
    args->next += 2 * rules.ports;
    rules.items = *args;
    return rules;
}

static int create_ruleset(const unsigned long long header[5]) {
    struct ruleset_attr attr = {header[1], header[2], header[3]};
    size_t size = header[0] >= 6 ? 24 : header[0] >= 4 ? 16 : 8;
    int ruleset = (int)syscall(SYS_LANDLOCK_CREATE_RULESET, &attr, size, 0);
    if (ruleset < 0)
        fail(126, "landlock_create_ruleset failed: %s", strerror(errno));
    return ruleset;
}

/* Add the rules to `ruleset`: every path rule when `only` is NULL, else those whose flag in
 * `only` is set. A path rule whose path is missing gets its flag in `missing` (if given), one
 * whose path is found gets what it names in `found` (if given). */
static void add_rules(int ruleset, struct rules *rules, const unsigned char *only,
                      unsigned char *missing, struct stat *found) {
    struct args items = rules->items;
    items.next = rules->path_at;
    for (unsigned long long i = 0; i < rules->paths; i++) {
        uint64_t rights = next_number(&items);
        const char *path = next_arg(&items);
        if ((only == NULL || only[i]) &&
            !add_path_rule(ruleset, rights, path, rules->header[4], found ? &found[i] : NULL) &&
            missing != NULL)
            missing[i] = 1;
    }
    if (only != NULL)
        return; /* a second pass over paths alone */
    items.next = rules->port_at;
    for (unsigned long long i = 0; i < rules->ports; i++) {
        struct net_port_attr rule;
        rule.allowed_access = next_number(&items);
        rule.port = next_number(&items);
        if (syscall(SYS_LANDLOCK_ADD_RULE, ruleset, RULE_NET_PORT, &rule, 0) < 0)
            fail(126, "landlock_add_rule(port %llu) failed: %s", (unsigned long long)rule.port,
                 strerror(errno));
    }
}

/* A prepared sandbox's ruleset: the rules of its shape (everything but the run's own
 * directories and program), added while the launcher waits for its run, so that only the
 * run's few rules remain to be added once it comes. Opening each rule's path is most of the
 * launcher's work. The paths missing then are looked for again when the run comes, as a
 * sandbox set up for the run would look for them. */
static int prebuilt = -1;
static struct rules prebuilt_rules;
static unsigned char *prebuilt_missing;
static struct stat *prebuilt_found; /* what each path named then (where it was not missing) */

static void prebuild_ruleset(int fd) {
    struct args args = read_args(fd, NULL);
    prebuilt_rules = read_rules(&args);
    if (args.next != args.count)
        fail(126, "launcher arguments are malformed: the prepared rules go on");
    if (prebuilt_rules.header[0] == 0)
        return;
    prebuilt_missing = calloc(prebuilt_rules.paths + 1, 1);
    prebuilt_found = calloc(prebuilt_rules.paths + 1, sizeof *prebuilt_found);
    if (prebuilt_missing == NULL || prebuilt_found == NULL)
        fail(126, "launcher error: out of memory");
    prebuilt = create_ruleset(prebuilt_rules.header);
    add_rules(prebuilt, &prebuilt_rules, NULL, prebuilt_missing, prebuilt_found);
}

/* Whether every prebuilt rule's path that was found still names the same file. A rule holds
 * the file its path named when it was added, and the sandbox may have waited long for its
 * run: a file replaced by a rename since (a program upgraded, a new resolv.conf) must get
 * the rule, and the one moved aside must not keep it, as in a sandbox set up for the run. */
static int prebuilt_paths_unchanged(void) {
    struct args items = prebuilt_rules.items;
    items.next = prebuilt_rules.path_at;
    for (unsigned long long i = 0; i < prebuilt_rules.paths; i++) {
        next_number(&items);
        const char *path = next_arg(&items);
        if (prebuilt_missing[i])
            continue; /* looked for again anyway */
        int fd = open_rule_path(path);
        if (fd < 0)
            return 0;
        struct stat now, *then = &prebuilt_found[i];
        int same = fstat(fd, &now) == 0 && now.st_dev == then->st_dev &&
                   now.st_ino == then->st_ino &&
                   (now.st_mode & S_IFMT) == (then->st_mode & S_IFMT);
        close(fd);
        if (!same)
            return 0;
    }
    return 1;
}

/* Restrict this process (and so the action) with Landlock, from the arguments
 * ABI HANDLED_FS HANDLED_NET SCOPED FILE_RIGHTS N (RIGHTS PATH)*N M (RIGHTS PORT)*M: in a
 * prepared sandbox, the rules beyond those prebuilt, under the same header. */
static void restrict_self(struct args *args) {
    struct rules rules = read_rules(args);
    int ruleset;
    if (prebuilt >= 0) {
        if (memcmp(rules.header, prebuilt_rules.header, sizeof rules.header) != 0)
            fail(126, "the run's Landlock rules do not fit its prepared sandbox's");
        if (prebuilt_paths_unchanged()) {
            ruleset = prebuilt;
            add_rules(ruleset, &prebuilt_rules, prebuilt_missing, NULL, NULL);
        } else { /* build it again, as a sandbox set up for the run would */
            close(prebuilt);
            ruleset = create_ruleset(rules.header);
            add_rules(ruleset, &prebuilt_rules, NULL, NULL, NULL);
        }
    } else {
        if (rules.header[0] == 0)
            return;
        ruleset = create_ruleset(rules.header);
    }
    add_rules(ruleset, &rules, NULL, NULL, NULL);
    if (syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0) < 0)
        fail(126, "landlock_restrict_self failed: %s", strerror(errno));
    close(ruleset);
}

/* Switch to the run's user; every capability must be gone afterwards. */
static void become(uid_t uid, gid_t gid, const unsigned long long *groups, size_t count) {
    gid_t *list = calloc(count + 1, sizeof *list);
    if (list == NULL)
        fail(126, "launcher error: out of memory");
    for (size_t i = 0; i < count; i++)
        list[i] = (gid_t)groups[i];
    /* bubblewrap leaves CAP_SETUID and CAP_SETGID inheritable too: clear that set first. */
    struct capability_header header = {CAPABILITY_VERSION_3, 0};
    struct capability_data data[2];
    if (syscall(SYS_capget, &header, data) == 0) {
        data[0].inheritable = data[1].inheritable = 0;
        syscall(SYS_capset, &header, data);
    }
    if (setgroups(count, list) < 0)
        fail(126, "launcher error: setgroups failed: %s", strerror(errno));
    if (setresgid(gid, gid, gid) < 0)
        fail(126, "launcher error: setresgid(%u) failed: %s", gid, strerror(errno));
    if (setresuid(uid, uid, uid) < 0)
        fail(126, "launcher error: setresuid(%u) failed: %s", uid, strerror(errno));
    FILE *status = fopen("/proc/self/status", "re");
    if (status == NULL)
        fail(126, "launcher error: cannot read /proc/self/status: %s", strerror(errno));
    char line[256], left[256] = "";
    while (fgets(line, sizeof line, status) != NULL) {
        if (strncmp(line, "CapPrm:", 7) != 0 && strncmp(line, "CapEff:", 7) != 0 &&
            strncmp(line, "CapAmb:", 7) != 0 && strncmp(line, "CapInh:", 7) != 0)
            continue;
        if (strtoull(line + 7, NULL, 16) != 0) {
            line[strcspn(line, "\n")] = '\0';
            strncat(left, line, sizeof left - strlen(left) - 2);
            strcat(left, " ");
        }
    }
    fclose(status);
    if (left[0] != '\0')
        fail(126, "capabilities left after switching to uid %u: %s", uid, left);
}

/* A prepared sandbox's last step before its run (sandbox.py, PreparedSandbox): from the
 * arguments N (STAGE NAME TARGET)*N, bind STAGE/NAME (the run's own directory, reached through
 * its parent directory bound at STAGE) at TARGET (a directory made in the tmpfs that stands for
 * that parent), detach every STAGE so nothing else of the parents stays in reach, make those
 * tmpfs read-only, then give up every capability bubblewrap left for this (CAP_SYS_ADMIN and
 * CAP_SETPCAP; CAP_SETUID and CAP_SETGID stay for `become` when the run is not root's). */
static int valid_run_name(const char *name) {
    if (name[0] == '\0' || strlen(name) > 255)
        return 0;
    for (const char *c = name; *c != '\0'; c++)
        if (!((*c >= '0' && *c <= '9') || (*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') ||
              *c == '_' || *c == '-'))
            return 0;
    return 1;
}

/* The parent of a target, which must be a tmpfs mount of its own (the one bubblewrap made for
 * it): never anything of the host's. */
static void parent_of(const char *target, char *parent, size_t size) {
    if (snprintf(parent, size, "%s", target) >= (int)size)
        fail(126, "launcher arguments are malformed: %s is too long", target);
    char *slash = strrchr(parent, '/');
    if (slash == NULL || slash == parent)
        fail(126, "launcher arguments are malformed: %s has no parent", target);
    *slash = '\0';
    struct statfs fs;
    if (statfs(parent, &fs) < 0 || fs.f_type != TMPFS_FS_MAGIC)
        fail(126, "%s is not the prepared sandbox's tmpfs", parent);
}

static int has_capability(int cap) {
    struct capability_header header = {CAPABILITY_VERSION_3, 0};
    struct capability_data data[2];
    if (syscall(SYS_capget, &header, data) < 0)
        return 1; /* cannot tell: act as if it had */
    return (data[cap / 32].permitted >> (cap % 32)) & 1;
}

/* The bounding set (CapBnd in /proc/self/status); every capability when it cannot be read. */
static uint64_t bounding_set(void) {
    uint64_t set = ~(uint64_t)0;
    FILE *status = fopen("/proc/self/status", "re");
    if (status == NULL)
        return set;
    char line[256];
    while (fgets(line, sizeof line, status) != NULL) {
        if (strncmp(line, "CapBnd:", 7) == 0) {
            char *end;
            errno = 0;
            unsigned long long read = strtoull(line + 7, &end, 16);
            if (errno == 0 && end != line + 7)
                set = read;
            break;
        }
    }
    fclose(status);
    return set;
}

/* Give up every capability bubblewrap left for mounting, in every set, bounding set included;
 * CAP_SETUID and CAP_SETGID stay (effective and permitted only) when `become` needs them.
 * Only what the bounding set holds is dropped from it (bubblewrap keeps there no more than
 * it was asked to keep): a system call per capability it holds, not one per capability. */
static void drop_mount_capabilities(uid_t uid) {
    uint64_t bounding = bounding_set();
    for (int cap = 0; cap <= 63; cap++) {
        if (uid != 0 && (cap == CAPABILITY_SETUID || cap == CAPABILITY_SETGID))
            continue;
        if (!((bounding >> cap) & 1))
            continue;
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno != EINVAL)
            fail(126, "cannot drop capability %d: %s", cap, strerror(errno));
    }
    struct capability_header header = {CAPABILITY_VERSION_3, 0};
    struct capability_data data[2];
    memset(data, 0, sizeof data);
    if (uid != 0)
        data[0].effective = data[0].permitted = (1u << CAPABILITY_SETUID) | (1u << CAPABILITY_SETGID);
    if (syscall(SYS_capset, &header, data) < 0)
        fail(126, "cannot drop capabilities: %s", strerror(errno));
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
    if (has_capability(CAPABILITY_SYS_ADMIN) || has_capability(CAPABILITY_SETPCAP))
        fail(126, "capabilities left after mounting the run's directories");
}

static void mount_run_directories(struct args *args, uid_t uid) {
    unsigned long long count = next_number(args);
    if (count > args->count || args->next + 3 * count > args->count)
        fail(126, "launcher arguments are malformed");
    size_t at = args->next;
    for (unsigned long long i = 0; i < count; i++) {
        const char *stage = next_arg(args), *name = next_arg(args), *target = next_arg(args);
        if (!valid_run_name(name))
            fail(126, "launcher arguments are malformed: bad run directory %s", name);
        char parent[4096];
        parent_of(target, parent, sizeof parent);
        /* The run's directory itself, never through a link, on the stage's file system. */
        int stage_fd = open(stage, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (stage_fd < 0)
            fail(126, "cannot open %s: %s", stage, strerror(errno));
        int fd = openat(stage_fd, name, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        struct stat stage_status, status;
        if (fd < 0 || fstat(stage_fd, &stage_status) < 0 || fstat(fd, &status) < 0 ||
            status.st_dev != stage_status.st_dev)
            fail(126, "the run's directory %s/%s is not a directory of its own", stage, name);
        close(stage_fd);
        char source[64];
        snprintf(source, sizeof source, "/proc/self/fd/%d", fd);
        if (mkdir(target, 0750) < 0 && errno != EEXIST)
            fail(126, "cannot make %s: %s", target, strerror(errno));
        if (mount(source, target, NULL, MS_BIND, NULL) < 0)
            fail(126, "cannot bind %s: %s", target, strerror(errno));
        close(fd);
        /* Keep what the stage's mount had (nosuid, nodev; read-only if it was). */
        struct statvfs mounted;
        if (statvfs(target, &mounted) < 0)
            fail(126, "cannot look at %s: %s", target, strerror(errno));
        unsigned long flags = MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV;
        if (mounted.f_flag & ST_RDONLY)
            flags |= MS_RDONLY;
        if (mount(NULL, target, NULL, flags, NULL) < 0)
            fail(126, "cannot remount %s: %s", target, strerror(errno));
    }
    args->next = at;
    for (unsigned long long i = 0; i < count; i++) {
        const char *stage = next_arg(args);
        next_arg(args);
        const char *target = next_arg(args);
        if (umount2(stage, MNT_DETACH) < 0 && errno != EINVAL) /* EINVAL: detached already */
            fail(126, "cannot detach %s: %s", stage, strerror(errno));
        char parent[4096];
        parent_of(target, parent, sizeof parent);
        /* This mount only (MS_BIND): a remount without it would change the file system. */
        if (mount(NULL, parent, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV,
                  NULL) < 0)
            fail(126, "cannot make %s read-only: %s", parent, strerror(errno));
    }
    /* Whatever was asked, no capability for mounting ever reaches the action. */
    if (has_capability(CAPABILITY_SYS_ADMIN) || has_capability(CAPABILITY_SETPCAP))
        drop_mount_capabilities(uid);
}

static int compare_fds(const void *a, const void *b) {
    unsigned long long x = *(const unsigned long long *)a, y = *(const unsigned long long *)b;
    return (x > y) - (x < y);
}

static void close_range_or_each(unsigned int low, unsigned int high) {
    if (syscall(SYS_CLOSE_RANGE, low, high, 0) == 0)
        return;
    for (unsigned int fd = low; fd <= high && fd < (1u << 20); fd++)
        close((int)fd);
}

/* Close every fd but 0-2 and `keep` (sorted in place). */
static void close_fds_except(unsigned long long *keep, size_t count) {
    qsort(keep, count, sizeof *keep, compare_fds);
    unsigned int low = 3;
    for (size_t i = 0; i < count; i++) {
        if (keep[i] < low)
            continue;
        if (keep[i] > low)
            close_range_or_each(low, (unsigned int)keep[i] - 1);
        low = (unsigned int)keep[i] + 1;
    }
    close_range_or_each(low, ~0u);
}

/* An ignored signal survives exec, and so does a blocked one: the action starts with neither. */
static void reset_signals(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = SIG_DFL;
    for (int signum = 1; signum < NSIG; signum++)
        sigaction(signum, &action, NULL); /* SIGKILL, SIGSTOP and the libc-reserved ones refuse */
    /* The C library keeps the real-time signals below SIGRTMIN for itself and its sigaction()
     * refuses them; but a posix_spawn() child starts with them ignored (glibc sets that while
     * the child runs with every signal blocked), which would reach the action. An all-zero
     * kernel sigaction is SIG_DFL, with no flags and an empty mask, whatever the field order. */
    static const unsigned char dfl[64];
    for (int signum = 32; signum < SIGRTMIN; signum++)
        syscall(SYS_rt_sigaction, signum, dfl, NULL, (NSIG - 1) / 8);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

/* `spos-launch --enter SETUP_FD NICE KEEP JOIN NETNS -- PROGRAM ARGS...`, outside the sandbox:
 * what a forked copy of the executor did before executing bubblewrap, done by a small program
 * the executor spawns instead (copying the executor's address space for each run, then tearing
 * it down at the exec, cost more than bubblewrap itself). In order: write to each fd of JOIN
 * (the run's cgroup.procs files, opened by the executor: this process joins the run's cgroup
 * before anything of the run exists), enter the network namespace NETNS ("-": stay; an fd kept
 * by the executor, netns.py), take the nice level NICE ("-": none), close every fd but 0-2 and
 * KEEP, set every signal's handling back to the default and unblock them all, and execute
 * PROGRAM with an empty environment; fds 0-2 were set by the spawn. A failure is reported on
 * SETUP_FD, as "cannot start bubblewrap". */
static int enter(int argc, char **argv) {
    if (argc < 9 || strcmp(argv[7], "--") != 0)
        fail(126, "usage: spos-launch --enter SETUP_FD NICE KEEP JOIN NETNS -- PROGRAM ARGS...");
    char *end;
    long fd = strtol(argv[2], &end, 10);
    if (*end != '\0' || end == argv[2] || fd < 0)
        fail(126, "cannot start bubblewrap: bad setup fd %s", argv[2]);
    setup_fd = (int)fd;
    unsigned long long *keep, *join;
    size_t keep_count = parse_list(argv[4], &keep);
    size_t join_count = parse_list(argv[5], &join);
    for (size_t i = 0; i < join_count; i++) {
        if (write((int)join[i], "0", 1) != 1)
            fail(126, "cannot start bubblewrap: cannot join the run's cgroup: %s", strerror(errno));
        close((int)join[i]);
    }
    if (strcmp(argv[6], "-") != 0) {
        long netns = strtol(argv[6], &end, 10);
        if (*end != '\0' || end == argv[6] || netns < 0 || netns > INT_MAX)
            fail(126, "cannot start bubblewrap: bad network namespace fd %s", argv[6]);
        if (setns((int)netns, CLONE_NEWNET) < 0)
            fail(126, "cannot start bubblewrap: cannot enter the run's network namespace: %s",
                 strerror(errno));
        close((int)netns);
    }
    if (strcmp(argv[3], "-") != 0) {
        long nice = strtol(argv[3], &end, 10);
        if (*end != '\0' || end == argv[3])
            fail(126, "cannot start bubblewrap: bad nice level %s", argv[3]);
        if (setpriority(PRIO_PROCESS, 0, (int)nice) < 0)
            fail(126, "cannot start bubblewrap: cannot set nice level %ld: %s", nice, strerror(errno));
    }
    close_fds_except(keep, keep_count);
    reset_signals();
    char *no_environment[] = {NULL};
    execve(argv[8], argv + 8, no_environment);
    fail(126, "cannot start bubblewrap: cannot execute %s: %s", argv[8], strerror(errno));
}

int main(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "--enter") == 0)
        return enter(argc, argv);
    if (argc != 2 && argc != 3)
        fail(126, "usage: spos-launch ARGS_FD [RULES_FD]");
    char *end;
    long args_fd = strtol(argv[1], &end, 10);
    if (*end != '\0' || args_fd < 0)
        fail(126, "usage: spos-launch ARGS_FD [RULES_FD]");
    if (argc == 3) { /* a prepared sandbox: its shape's Landlock rules, ahead of its run */
        long rules_fd = strtol(argv[2], &end, 10);
        if (*end != '\0' || rules_fd < 0 || rules_fd == args_fd)
            fail(126, "usage: spos-launch ARGS_FD [RULES_FD]");
        prebuild_ruleset((int)rules_fd);
    }
    /* A prepared sandbox's arguments come on a pipe (a set-up run's in a memfd). */
    struct stat args_status;
    int prepared = fstat((int)args_fd, &args_status) == 0 && S_ISFIFO(args_status.st_mode);
    int go = 1;
    struct args args = read_args((int)args_fd, prepared ? &go : NULL);
    setup_fd = (int)next_number(&args);
    unsigned long long uid_number = next_number(&args), gid_number = next_number(&args);
    if (uid_number >= (uid_t)-1 || gid_number >= (gid_t)-1)
        fail(126, "launcher arguments are malformed: no such uid or gid");
    uid_t uid = (uid_t)uid_number;
    gid_t gid = (gid_t)gid_number;
    unsigned long long *groups, *keep;
    size_t group_count = parse_list(next_arg(&args), &groups);
    size_t keep_count = parse_list(next_arg(&args), &keep);
    const char *cwd = next_arg(&args);
    size_t mounts_at = args.next;
    /* Skip over the mount and Landlock arguments to check the rest before changing anything. */
    struct args probe = args;
    unsigned long long mounts = next_number(&probe);
    if (mounts > probe.count)
        fail(126, "launcher arguments are malformed");
    probe.next += 3 * mounts;
    size_t landlock_at = probe.next;
    for (int i = 0; i < 5; i++)
        next_number(&probe);
    unsigned long long paths = next_number(&probe);
    if (paths > probe.count)
        fail(126, "launcher arguments are malformed");
    probe.next += 2 * paths;
    unsigned long long ports = next_number(&probe);
    if (ports > probe.count)
        fail(126, "launcher arguments are malformed");
    probe.next += 2 * ports;
    unsigned long long env_count = next_number(&probe);
    if (env_count > probe.count || probe.next + env_count >= probe.count ||
        strcmp(probe.items[probe.next + env_count], "--") != 0 ||
        probe.next + env_count + 1 >= probe.count)
        fail(126, "launcher arguments are malformed");
    char **env = probe.items + probe.next;
    for (unsigned long long i = 0; i < env_count; i++)
        if (strchr(env[i], '=') == NULL || env[i][0] == '=')
            fail(126, "launcher arguments are malformed: %s is not NAME=VALUE", env[i]);
    env[env_count] = NULL; /* the "--" */
    char **action = probe.items + probe.next + env_count + 1;

    args.next = mounts_at;
    mount_run_directories(&args, uid);
    if (chdir(cwd) < 0)
        fail(126, "cannot enter working directory %s: %s", cwd, strerror(errno));
    args.next = landlock_at;
    restrict_self(&args);
    if (uid != 0)
        become(uid, gid, groups, group_count);
    reset_signals();
    if (prepared)
        wait_for_go((int)args_fd, go);
    keep[keep_count++] = (unsigned long long)setup_fd;
    close_fds_except(keep, keep_count);
    fcntl(setup_fd, F_SETFD, FD_CLOEXEC);
    write_all(setup_fd, "exec\n", 5);
    execve(action[0], action, env);
    fail(errno == ENOENT ? 127 : 126, "cannot execute %s: %s", action[0], strerror(errno));
}
