"""Run untrusted Python programs (model-written code) in isolation, many at once.

One run = one child interpreter (``python -I -S``) started in a new session (its own process
group), driven by a trusted prelude that sets the run up and then ``exec``s the program. What a
run gets, in the strongest mode this machine allows (``isolation_mode()``):

``namespaces-root`` (trainer runs as root and ``unshare`` works; what this machine uses):
  ``unshare --mount --net --pid --fork --mount-proc --kill-child``, then the prelude, still root
  inside the new namespaces: every existing mount remounted read-only; read-only empty tmpfs over
  the home directories (``/root``, ``/home``, the trainer's ``$HOME``) with only the Python install
  bound back in (read-only); a fresh size-limited tmpfs on ``/tmp`` (also bound over ``/var/tmp``,
  ``/dev/shm``, ``/run/lock``) as working directory and ``HOME``; then it sets no_new_privs and
  drops to an unprivileged uid (``nobody``, no capabilities) under ``RLIMIT_NPROC``.
  So: no network (an empty network namespace: even loopback is down), no view of or signal to
  processes outside the run (own PID namespace; when its first process dies the kernel kills the
  rest), writes only to its own tmpfs, no reads of the homes or of files only their owner may read,
  no privilege from setuid binaries, and no fork bomb beyond ``nproc`` processes.
``namespaces-user`` (non-root trainer, unprivileged user namespaces allowed): the same namespaces
  and mounts inside ``unshare --user --map-root-user``; instead of a uid drop (there is no other
  uid) the prelude clears every capability; ``RLIMIT_NPROC`` counts the processes of the run's
  user namespace (Linux >= 5.14; older kernels count all the user's processes). The tests emulate
  this mode by starting the trainer side in a user namespace mapped to a non-zero uid.
``plain`` (no working ``unshare``, e.g. a container without ``CAP_SYS_ADMIN``, or
  ``G2RPO_SANDBOX=plain``): resource limits, no_new_privs, a cleared environment, a fresh temporary
  directory and the prelude guard only; as root it drops to ``nobody`` when the Python install is
  readable by others, else it keeps uid 0 without capabilities (it can then read and write root's
  files, and ``RLIMIT_NPROC`` does not bind root). Weak: no network or filesystem isolation;
  prefer a machine where ``unshare`` works.

In every mode: ``RLIMIT_CPU``, ``RLIMIT_AS``, ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``, no core files
(set by the prelude: a ``preexec_fn`` would fork the multithreaded trainer), a wall-clock deadline
after which the whole process group (and, through ``--kill-child``, the PID namespace) gets
SIGKILL, stdout/stderr read through pipes with a size cap (over the cap: killed), a cleared
environment (``PATH``, ``HOME``, ``LANG`` only), stdin from a file. The prelude guard
(``guard=True``) also disables ``socket``, ``os.system``, ``subprocess``, ``os.fork``/``exec*``/
``kill`` and ``ctypes`` loading in the program: defence in depth, not the boundary (the tests run
the hostile programs with the guard off too).

A run succeeds only when the program returns normally (or, for ``exit_ok`` runs, through
``SystemExit(0)``): the prelude then writes a per-run random token to a status pipe. A program that
calls ``os._exit(0)`` early therefore fails instead of passing (a known reward hack). Not
defended: a program that inspects the prelude's frames to find that token, side channels, CPU
contention with the trainer (runs are niced), and kernel exploits. For hostile code at scale use
a VM or gVisor.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
import pwd
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

log = logging.getLogger(__name__)

NOBODY = "nobody"
HIDDEN_HOMES = ("/root", "/home")
SCRATCH_ALIASES = ("/var/tmp", "/dev/shm", "/run/lock")  # world-writable places, bound to the run's tmpfs
CHILD_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. ``timeout_s`` is wall clock; CPU time is limited to ``ceil(cpu_s)``."""

    timeout_s: float = 4.0
    cpu_s: Optional[float] = None  # None: same as timeout_s
    memory_mb: int = 1024  # RLIMIT_AS of the interpreter
    output_bytes: int = 4 << 20  # stdout cap; stderr is capped at 64 KiB
    file_bytes: int = 16 << 20  # RLIMIT_FSIZE: largest file the program may write
    tmpfs_mb: int = 64  # size of the private /tmp (namespace modes)
    nproc: int = 32  # RLIMIT_NPROC: processes (and threads) the run may have
    guard: bool = True  # the in-process guard (defence in depth)

    def validate(self) -> "SandboxLimits":
        for name in ("timeout_s", "memory_mb", "output_bytes", "file_bytes", "tmpfs_mb", "nproc"):
            if not getattr(self, name) > 0:
                raise ValueError(f"sandbox limit {name} must be > 0; got {getattr(self, name)!r}")
        if self.cpu_s is not None and not self.cpu_s > 0:
            raise ValueError(f"sandbox limit cpu_s must be > 0 or None; got {self.cpu_s!r}")
        return self


@dataclasses.dataclass
class RunResult:
    ok: bool  # the program ran to completion (status token seen, no limit hit)
    status: str  # "ok", "error" (exception / nonzero exit), "timeout", "output_limit", "spawn_error"
    stdout: str
    stderr: str
    elapsed_s: float
    returncode: Optional[int] = None


# --- the trusted prelude (runs first in the child, as `python -I -S -c PRELUDE spec_path`) ---------
PRELUDE = r'''
import json, os, sys
def _setup():
    spec_path = sys.argv[1]
    with open(spec_path) as f:
        spec = json.load(f)
    os.unlink(spec_path)
    fd = os.open(spec["stdin_path"], os.O_RDONLY)
    os.unlink(spec["stdin_path"])
    os.dup2(fd, 0)
    os.close(fd)
    if spec["mounts"]:
        _mounts(spec)
    import resource
    for name, value in spec["rlimits"].items():
        resource.setrlimit(getattr(resource, name), tuple(value))
    os.nice(5)
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS: setuid binaries and file caps stay inert
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    # Counted per user and user namespace (Linux >= 5.14); not enforced for the real root user.
    resource.setrlimit(resource.RLIMIT_NPROC, (spec["nproc"], spec["nproc"]))
    if spec["uid"] is not None:
        os.setgroups([])
        os.setgid(spec["gid"])
        os.setuid(spec["uid"])  # from root to another uid: all capabilities go
    else:
        _drop_capabilities(ctypes, libc)
    os.chdir(spec["workdir"])
    os.umask(0o077)
    return spec

def _drop_capabilities(ctypes, libc):
    """No uid to drop to (user namespace, or plain mode as root): clear every capability instead."""
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]
    if libc.capset(ctypes.byref(Header(0x20080522, 0)), (Data * 2)()) != 0:  # _LINUX_CAPABILITY_VERSION_3
        raise OSError(ctypes.get_errno(), "capset")

def _mounts(spec):
    import ctypes, re
    libc = ctypes.CDLL(None, use_errno=True)
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 32, 4096, 16384
    def mount(src, dst, fstype, flags, data=None):
        enc = lambda s: None if s is None else s.encode()
        if libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, "mount %s on %s: %s" % (src, dst, os.strerror(err)))
    keep = [(p, os.open(p, os.O_PATH | os.O_DIRECTORY)) for p in spec["keep"]]
    # Every mount read-only (flags the mount has are kept: a user namespace may not drop them).
    option_flags = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": 8, "noatime": 1024,
                    "nodiratime": 2048, "relatime": 1 << 21, "strictatime": 1 << 24}
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in mounts:
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])  # "\040" is a space
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for opt in fields[5].split(","):
            flags |= option_flags.get(opt, 0)
        try:
            mount(None, point, None, flags)
        except OSError:
            pass  # a mount hidden under another one, or locked: the uid drop still applies
    for home in spec["hide"]:
        mount("tmpfs", home, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
        for path, fd in keep:
            if path.startswith(home.rstrip("/") + "/"):
                os.makedirs(path, exist_ok=True)
                mount("/proc/self/fd/%d" % fd, path, None, MS_BIND | MS_REC)
                try:
                    mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
                except OSError:
                    pass
        mount(None, home, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    owner = "" if spec["uid"] is None else ",uid=%d,gid=%d" % (spec["uid"], spec["gid"])
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=%dm,mode=0700%s" % (spec["tmpfs_mb"], owner))
    for alias in spec["aliases"]:
        mount("/tmp", alias, None, MS_BIND)
    for _, fd in keep:
        os.close(fd)

def _guard():
    import builtins, os, socket, subprocess
    def refuse(*a, **k):
        raise PermissionError("disabled in the sandbox")
    class NoSocket(socket.socket):
        def __init__(self, *a, **k):
            refuse()
    socket.socket = NoSocket
    for name in ("create_connection", "create_server", "socketpair", "fromfd"):
        setattr(socket, name, refuse)
    for name in ("system", "popen", "fork", "forkpty", "kill", "killpg", "execv", "execve", "execl",
                 "execle", "execlp", "execvp", "execvpe", "spawnv", "spawnve", "spawnl", "posix_spawn",
                 "posix_spawnp", "setuid", "putenv"):
        if hasattr(os, name):
            setattr(os, name, refuse)
    subprocess.Popen = refuse
    real_import = builtins.__import__
    def guarded_import(name, *a, **k):
        if name.split(".")[0] in ("ctypes", "_ctypes", "posix", "multiprocessing", "_posixsubprocess"):
            raise ImportError("module %s is disabled in the sandbox" % name)
        return real_import(name, *a, **k)
    builtins.__import__ = guarded_import

def _run(spec):
    import builtins
    status_fd = spec["status_fd"]
    token = spec.pop("token")
    code = spec.pop("code")
    env = {"__name__": "__main__", "__builtins__": builtins}
    if spec["guard"]:
        _guard()
    ok = False
    try:
        exec(compile(code, "program.py", "exec"), env)
        ok = True
    except SystemExit as e:
        ok = spec["exit_ok"] and e.code in (None, 0)
        if not ok:
            raise
    finally:
        try:
            sys.stdout.flush()
        except Exception:
            ok = False
        if ok:
            os.write(status_fd, token.encode())
    os._exit(0)

_run(_setup())
'''


@functools.lru_cache(maxsize=None)
def isolation_mode() -> str:
    """'namespaces-root', 'namespaces-user' or 'plain' (see the module docstring).

    ``G2RPO_SANDBOX=plain`` forces the weak mode, for machines where ``unshare`` works but mounting
    inside it does not (the sandbox's self-check then fails with the reason)."""
    forced = os.environ.get("G2RPO_SANDBOX", "")
    if forced:
        if forced != "plain":
            raise ValueError(f"G2RPO_SANDBOX={forced!r}: the only accepted value is 'plain' (weaker isolation)")
        log.warning("sandbox: G2RPO_SANDBOX=plain: untrusted code runs with resource limits only")
        return "plain"
    unshare = shutil.which("unshare")
    if unshare is None:
        return "plain"
    base = [unshare] + _unshare_flags(os.geteuid() == 0) + ["true"]
    try:
        ok = subprocess.run(base, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    if not ok:
        log.warning("sandbox: `unshare` does not work here; running untrusted code with resource limits "
                    "only (no network/PID/mount namespaces). See g2rpo_jax/rewards/sandbox.py")
        return "plain"
    return "namespaces-root" if os.geteuid() == 0 else "namespaces-user"


def _unshare_flags(root: bool) -> list[str]:
    user = [] if root else ["--user", "--map-root-user"]
    return user + ["--mount", "--net", "--pid", "--fork", "--mount-proc", "--kill-child"]


def _python_install() -> tuple[str, list[str]]:
    """The interpreter to run (the real binary, not a venv link) and the directories it reads."""
    exe = os.path.realpath(sys.executable)
    dirs = sorted({os.path.realpath(sys.base_prefix), os.path.dirname(exe)})
    # A directory inside another one comes along with it.
    return exe, [d for d in dirs if not any(d != o and d.startswith(o.rstrip("/") + "/") for o in dirs)]


def _hidden_homes() -> list[str]:
    homes = set(h for h in HIDDEN_HOMES if os.path.isdir(h))
    # The trainer's home by the user database and by $HOME: they differ on clusters and CI machines
    # (HOME=/scratch/...), and either may hold tokens and keys.
    own = [os.environ.get("HOME", "")]
    try:
        own.append(pwd.getpwuid(os.geteuid()).pw_dir)
    except KeyError:
        pass
    homes.update(os.path.realpath(h) for h in own
                 if h and os.path.isdir(h) and os.path.realpath(h) not in ("/", "/tmp"))
    # A home inside another hidden one is covered already (and would no longer exist to mount on).
    return sorted(h for h in homes if not any(h != o and h.startswith(o.rstrip("/") + "/") for o in homes))


def _world_accessible(path: str) -> bool:
    """Can 'others' traverse every directory down to ``path``? (for the plain-mode uid drop)."""
    path = os.path.realpath(path)
    parts = path.split("/")
    for i in range(2, len(parts) + 1):
        mode = os.stat("/".join(parts[:i]) or "/").st_mode
        if not mode & stat.S_IXOTH:
            return False
    return True


@functools.lru_cache(maxsize=None)
def _unprivileged_ids(mode: str) -> tuple[Optional[int], Optional[int]]:
    if os.geteuid() != 0 or mode == "namespaces-user":
        return None, None
    try:
        pw = pwd.getpwnam(NOBODY)
        uid, gid = pw.pw_uid, pw.pw_gid
    except KeyError:
        uid = gid = 65534
    if mode == "plain" and not all(_world_accessible(d) for d in _python_install()[1]):
        log.warning("sandbox: the Python install is not readable by '%s', so code runs as root in plain "
                    "mode", NOBODY)
        return None, None
    return uid, gid


def _rlimits(limits: SandboxLimits) -> dict[str, list[int]]:
    """Resource limits the prelude sets before the program runs (inherited by all it starts).

    Set by the prelude, not by a ``preexec_fn``: that would make subprocess fork the multithreaded
    trainer (JAX) and run Python in the child, which can deadlock.
    """
    cpu = int(-(-(limits.cpu_s or limits.timeout_s) // 1))
    mem = limits.memory_mb << 20
    return {"RLIMIT_CPU": [cpu, cpu + 1], "RLIMIT_AS": [mem, mem],
            "RLIMIT_FSIZE": [limits.file_bytes, limits.file_bytes], "RLIMIT_NOFILE": [256, 256],
            "RLIMIT_CORE": [0, 0]}


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass


STDERR_CAP = 64 << 10


def run_program(code: str, stdin: str = "", limits: SandboxLimits = SandboxLimits(), *, exit_ok: bool = True,
                tag: str = "") -> RunResult:
    """Run ``code`` with ``stdin`` under ``limits``; never raises for anything the program does.

    ``exit_ok``: whether ``SystemExit(0)`` counts as finishing (stdin/stdout programs) or as failing
    (assert-style tests, where exiting early would skip the asserts). ``tag`` is added to the child's
    command line (tests use it to look for leftover processes).
    """
    start = time.monotonic()
    mode = isolation_mode()
    run_dir = tempfile.mkdtemp(prefix="g2rpo_sandbox_")
    status_r = status_w = None
    proc = None
    try:
        uid, gid = _unprivileged_ids(mode)
        exe, install_dirs = _python_install()
        namespaces = mode.startswith("namespaces")
        if uid is not None:
            os.chown(run_dir, uid, gid)  # plain mode: the program's working directory
        stdin_path = os.path.join(run_dir, ".stdin")
        with open(stdin_path, "w") as f:
            f.write(stdin)
        status_r, status_w = os.pipe()
        spec = {"code": code, "token": os.urandom(16).hex(), "stdin_path": stdin_path, "status_fd": status_w,
                "mounts": namespaces, "uid": uid, "gid": gid, "nproc": limits.nproc, "guard": limits.guard,
                "exit_ok": exit_ok, "rlimits": _rlimits(limits), "workdir": "/tmp" if namespaces else run_dir, "tmpfs_mb": limits.tmpfs_mb,
                "hide": _hidden_homes(), "keep": install_dirs,
                "aliases": [a for a in SCRATCH_ALIASES if os.path.isdir(a)]}
        spec_path = os.path.join(run_dir, ".spec")
        fd = os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(spec, f)
        home = "/tmp" if namespaces else run_dir
        env = {"PATH": CHILD_PATH, "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1"}
        argv = [exe, "-I", "-S", "-c", PRELUDE, spec_path] + ([tag] if tag else [])
        if namespaces:
            argv = [shutil.which("unshare")] + _unshare_flags(mode == "namespaces-root") + argv
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=run_dir, env=env, start_new_session=True, pass_fds=(status_w,),
                                close_fds=True)
        os.close(status_w)
        status_w = None
        return _collect(proc, status_r, spec["token"], limits, start)
    except Exception as e:  # the trainer survives: a failure to run is a failed run
        if proc is not None:
            _kill_group(proc)
        log.warning("sandbox: run failed to start or collect: %s", e)
        return RunResult(False, "spawn_error", "", str(e), time.monotonic() - start)
    finally:
        if proc is not None:
            _kill_group(proc)  # nothing the run started outlives it
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            for pipe in (proc.stdout, proc.stderr):
                pipe.close()
        for fd in (status_r, status_w):
            if fd is not None:
                os.close(fd)
        shutil.rmtree(run_dir, ignore_errors=True)


def _collect(proc: subprocess.Popen, status_r: int, token: str, limits: SandboxLimits, start: float) -> RunResult:
    """Read stdout, stderr and the status pipe until all close or a limit is hit."""
    deadline = start + limits.timeout_s
    caps = {proc.stdout.fileno(): limits.output_bytes, proc.stderr.fileno(): STDERR_CAP, status_r: 64}
    bufs = {fd: bytearray() for fd in caps}
    sel = selectors.DefaultSelector()
    for fd in caps:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    status = None
    try:
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                status = "timeout"
                break
            for key, _ in sel.select(remaining):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                bufs[key.fd] += chunk
                if len(bufs[key.fd]) > caps[key.fd]:
                    if key.fd == proc.stdout.fileno():
                        status = "output_limit"
                        break
                    del bufs[key.fd][caps[key.fd]:]
            if status:
                break
        if status is None:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                status = "timeout"
    finally:
        sel.close()
    if status is not None:
        _kill_group(proc)
    rc = proc.poll()
    if status is None and rc == -signal.SIGXCPU:
        # the CPU limit (ceil of the wall limit by default) can end a busy loop just before the wall
        # deadline is seen: a time limit either way
        status = "timeout"
    finished = status is None and bufs[status_r].decode(errors="replace") == token
    out = bytes(bufs[proc.stdout.fileno()][:limits.output_bytes]).decode(errors="replace")
    err = bytes(bufs[proc.stderr.fileno()]).decode(errors="replace")
    return RunResult(finished, "ok" if finished else (status or "error"), out, err, time.monotonic() - start, rc)


@dataclasses.dataclass(frozen=True)
class Job:
    """One program run: ``code`` fed ``stdin``; see ``run_program`` for ``exit_ok``."""

    code: str
    stdin: str = ""
    exit_ok: bool = True


def default_workers() -> int:
    return max(2, min(32, 2 * (os.cpu_count() or 1)))


@functools.lru_cache(maxsize=None)
def check_sandbox() -> str:
    """Run a trivial program once; a sandbox that cannot run even that (e.g. the Python install is
    hidden by the mounts) would silently score every program 0, so it is an error instead."""
    result = run_program("print(6 * 7)", limits=SandboxLimits(timeout_s=30))
    if not (result.ok and result.stdout == "42\n"):
        raise RuntimeError(f"the code sandbox ({isolation_mode()}) cannot run a trivial program: status "
                           f"{result.status}, stderr: {result.stderr.strip()[-500:]!r}; see g2rpo_jax/rewards/sandbox.py (or set "
                           "G2RPO_SANDBOX=plain to accept resource limits only)")
    return isolation_mode()


def run_many(jobs: Sequence[Job], limits: SandboxLimits = SandboxLimits(), max_workers: Optional[int] = None,
             tag: str = "") -> list[RunResult]:
    """Run ``jobs`` concurrently on a bounded thread pool (each thread drives one child); results in order."""
    limits.validate()
    if not jobs:
        return []
    check_sandbox()
    workers = max(1, min(max_workers or default_workers(), len(jobs)))
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda j: run_program(j.code, j.stdin, limits, exit_ok=j.exit_ok, tag=tag), jobs))
