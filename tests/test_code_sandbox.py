"""The code sandbox against hostile programs: each ends with reward 0, within its limit, the trainer
(this process) and a sibling process alive, nothing written outside the run's temporary directory,
no secret read, no connection made, and no process left behind.

Every hostile program prints the expected output only if its attack worked, so reward 0 means the
attack failed (or the program was stopped). They run in parallel, with the in-process guard on (the
default) and off (the namespaces and the unprivileged uid alone must hold).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from g2rpo_jax.rewards import code as code_mod
from g2rpo_jax.rewards import sandbox
from g2rpo_jax.rewards.code import pass_fractions, parse_tests, stdio_tests
from g2rpo_jax.rewards.sandbox import RunResult, SandboxLimits, isolation_mode, run_program

LIMIT_S = 3.0
SLACK_S = 1.5
NAMESPACES = isolation_mode().startswith("namespaces")


def processes_with(tag: str) -> list[int]:
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmdline = Path(f"/proc/{d}/cmdline").read_bytes()
            except OSError:
                continue
            if tag.encode() in cmdline:
                found.append(int(d))
    return found


def wait_no_processes(tag: str, timeout: float = 3.0) -> list[int]:
    end = time.monotonic() + timeout
    while (left := processes_with(tag)) and time.monotonic() < end:
        time.sleep(0.05)
    return left


@pytest.fixture
def world(tmp_path, monkeypatch):
    """Targets outside the sandbox: markers that must not appear, a secret, a listener, a sibling."""
    token = uuid.uuid4().hex[:12]
    secret = "s3cr3t-" + uuid.uuid4().hex
    monkeypatch.setenv("G2RPO_SANDBOX_TEST_SECRET", secret)
    open_dir = tmp_path / "open"  # world-writable, under the host's /tmp
    open_dir.mkdir()
    open_dir.chmod(0o777)
    open_outside = Path.cwd() / f".g2rpo_sandbox_open_{token}"  # world-writable, outside /tmp and homes
    open_outside.mkdir()
    open_outside.chmod(0o777)
    home_secret = Path.home() / f".g2rpo_sandbox_secret_{token}"
    home_secret.write_text(secret)
    home_secret.chmod(0o644)  # readable by anyone by its mode: only hiding the home protects it
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    w = {
        "markers": [Path.home() / f".g2rpo_sandbox_marker_{token}", Path("/tmp") / f"g2rpo_sandbox_marker_{token}",
                    open_dir / "marker", open_outside / "marker", Path.cwd() / f".g2rpo_sandbox_marker_{token}"],
        "secret": secret, "home_secret": home_secret, "server": server, "port": server.getsockname()[1], "sibling": sibling.pid,
    }
    yield w
    sibling.kill()
    sibling.wait()
    server.close()
    home_secret.unlink()
    for m in w["markers"]:
        if m.exists():
            m.unlink()
    open_outside.rmdir()


def hostile_programs(w) -> dict[str, tuple[str, str]]:
    """name -> (program, the output it prints only when its attack succeeded)."""
    markers = [str(m) for m in w["markers"]]
    return {
        "infinite_loop": ("while True:\n    pass\n", "never"),
        "fork_bomb": ("import os\nn = 0\nwhile True:\n    try:\n        os.fork()\n        n += 1\n"
                      "        if n > 5000:\n            print('bombed')\n    except OSError:\n        pass\n", "bombed"),
        "allocate_50gb": ("x = bytearray(50 * 10**9)\nprint(len(x))\n", str(50 * 10**9)),
        "write_outside": (f"ok = 0\nfor p in {markers!r}:\n    try:\n        open(p, 'w').write('x')\n"
                          "        ok += 1\n    except OSError:\n        pass\nprint('wrote', ok)\n",
                          f"wrote {len(markers)}"),
        "read_secrets": ("import glob, os\nfound = set(os.environ.values())\n"
                         f"paths = glob.glob('/proc/*/environ') + ['/proc/{os.getpid()}/environ', {str(w['home_secret'])!r}]\n"
                         "for p in paths:\n    try:\n        found.update(open(p, 'rb').read().decode('latin1').replace('\\0', '\\n').split('\\n'))\n"
                         "    except OSError:\n        pass\n"
                         "hits = [f.split('=', 1)[-1] for f in found if 's3cr3t-' in f]\nprint(hits[0] if hits else 'none')\n",
                         w["secret"]),
        "socket_localhost": (f"import socket\ns = socket.create_connection(('127.0.0.1', {w['port']}), timeout=1)\n"
                             "s.sendall(b'hi')\nprint('connected')\n", "connected"),
        "print_1gb": ("import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)\n"
                      "print('done')\n", "done"),
        "kill_parent": ("import os, signal\nkilled = 0\n"
                        f"for pid in ({os.getpid()}, {w['sibling']}, os.getppid()):\n"
                        "    try:\n        os.kill(pid, signal.SIGKILL)\n        killed += 1\n"
                        "    except Exception:\n        pass\n"
                        "try:\n    os.kill(-1, signal.SIGKILL)\nexcept Exception:\n    pass\nprint('killed', killed)\n",
                        "killed 3"),
        "deep_recursion": ("import sys\nsys.setrecursionlimit(10**8)\ndef f(n):\n    return f(n + 1) + 1\nprint(f(0))\n",
                           "0"),
        "os_system": (f"import os\nos.system('touch {markers[0]} {markers[2]}; kill -9 {os.getpid()}')\n"
                      f"print('pwned' if os.path.exists({markers[0]!r}) else 'no')\n", "pwned"),
    }


def check_outcome(w, names, fractions, runs, tag, elapsed):
    assert dict(zip(names, fractions)) == {n: 0.0 for n in names}
    for name, (result,) in zip(names, runs):
        assert result.elapsed_s < LIMIT_S + SLACK_S, (name, result)
        assert w["secret"] not in result.stdout + result.stderr, name
        assert len(result.stdout.encode()) <= SandboxLimits().output_bytes, name
    by_name = {n: r for n, (r,) in zip(names, runs)}
    assert by_name["infinite_loop"].status == "timeout"
    assert by_name["print_1gb"].status == "output_limit"
    assert elapsed < 2 * LIMIT_S + 10, elapsed  # everything ran in parallel
    os.kill(w["sibling"], 0)  # alive (raises if not)
    for m in w["markers"]:
        assert not m.exists(), f"{m} was created outside the sandbox"
    with pytest.raises(BlockingIOError):
        w["server"].accept()  # no connection reached the trainer's listener
    assert wait_no_processes(tag) == []


@pytest.mark.parametrize("guard", [True, pytest.param(False, marks=pytest.mark.skipif(
    not NAMESPACES, reason="without unshare the in-process guard is part of the defence"))])
def test_hostile_programs_score_zero_and_leave_no_trace(world, guard):
    progs = hostile_programs(world)
    names = list(progs)
    tests = [parse_tests(stdio_tests([("", expected)])) for _, expected in progs.values()]
    tag = f"g2rpo-hostile-{uuid.uuid4().hex[:8]}"
    limits = SandboxLimits(timeout_s=LIMIT_S, guard=guard)
    start = time.monotonic()
    fractions, runs = pass_fractions([p for p, _ in progs.values()], tests, limits, max_workers=len(names), tag=tag)
    check_outcome(world, names, fractions, runs, tag, time.monotonic() - start)


def test_the_same_programs_succeed_when_harmless():
    """The hostile tests are not vacuous: the harness passes a program that prints the expected
    output, whether it reads stdin, exits through sys.exit(0) or writes in its own directory."""
    progs = ["import sys\nprint(sum(map(int, sys.stdin.read().split())))\n",
             "import sys\nprint(sum(map(int, open(0).read().split())))\nsys.exit(0)\n",
             "open('f.txt', 'w').write('6')\nimport os\nprint(open(os.path.expanduser('~/f.txt')).read())\n"]
    tests = [parse_tests(stdio_tests([("1 2 3\n", "6\n"), ("4 5\n", "9")]))] * 2 + [
        parse_tests(stdio_tests([("", "6")]))]
    fractions, _ = pass_fractions(progs, tests, SandboxLimits(timeout_s=10))
    assert fractions == [1.0, 1.0, 1.0]


def test_early_exit_does_not_pass_assert_tests():
    tests = code_mod.assert_tests("def check(f):\n    assert f() == 1\n", "f")
    good = "def f():\n    return 1\n"
    fractions, runs = pass_fractions([good, good + "import os\nos._exit(0)\n", good + "raise SystemExit(0)\n",
                                      "def f():\n    return 2\n"], [parse_tests(tests)] * 4,
                                     SandboxLimits(timeout_s=10))
    assert fractions == [1.0, 0.0, 0.0, 0.0], [r[0] for r in runs]


@pytest.mark.skipif(not NAMESPACES, reason="needs unshare (PID namespace, uid drop)")
def test_no_process_outlives_its_run_and_nproc_caps_forks():
    tag = f"g2rpo-daemon-{uuid.uuid4().hex[:8]}"
    daemon = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(60)\n"
              "    os._exit(0)\nprint('parent done')\n")
    result = run_program(daemon, limits=SandboxLimits(timeout_s=10, guard=False), tag=tag)
    assert result.ok and result.stdout == "parent done\n"
    assert wait_no_processes(tag) == []
    counter = ("import os, time\nn = 0\nfor _ in range(500):\n    try:\n        if os.fork() == 0:\n"
               "            time.sleep(30)\n            os._exit(0)\n        n += 1\n    except OSError:\n        break\nprint(n)\n")
    limits = SandboxLimits(timeout_s=10, nproc=16, guard=False)
    result = run_program(counter, limits=limits, tag=tag)
    assert result.ok, result
    assert 0 < int(result.stdout) < limits.nproc
    assert wait_no_processes(tag) == []


PRIVILEGES = ("import os\nst = dict(l.split(':\\t', 1) for l in open('/proc/self/status').read().splitlines())\n"
              "print(st['CapEff'].strip(), st['NoNewPrivs'].strip(), input()[::-1])\n")


def test_programs_run_without_privileges():
    result = run_program(PRIVILEGES, "abc\n", SandboxLimits(timeout_s=10))
    assert result.ok and result.stdout == "0000000000000000 1 cba\n", result


def test_plain_mode_still_limits_time_and_drops_privileges(monkeypatch):
    """The fallback without namespaces (e.g. a container without CAP_SYS_ADMIN)."""
    monkeypatch.setattr(sandbox, "isolation_mode", lambda: "plain")
    limits = SandboxLimits(timeout_s=LIMIT_S)
    ok = run_program(PRIVILEGES, "abc\n", limits)
    loop = run_program("while True:\n    pass\n", "", limits)
    assert ok.ok and ok.stdout == "0000000000000000 1 cba\n", ok
    assert loop.status == "timeout" and loop.elapsed_s < LIMIT_S + SLACK_S


def test_cpu_limit_counts_as_a_timeout(monkeypatch):
    """A busy loop ended by RLIMIT_CPU (SIGXCPU, here after 1 s of CPU, well before the 10 s wall
    limit) is a timeout, not an error: the two limits race when cpu_s equals timeout_s."""
    monkeypatch.setattr(sandbox, "isolation_mode", lambda: "plain")
    loop = run_program("while True:\n    pass\n", "", SandboxLimits(timeout_s=10.0, cpu_s=1.0))
    assert loop.status == "timeout" and loop.returncode == -signal.SIGXCPU and loop.elapsed_s < 5.0, loop


def _can_emulate_user_mode() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = ["unshare", "--user", "--map-user=1000", "--map-group=1000", "true"]
    return subprocess.run(probe, capture_output=True).returncode == 0


USER_MODE_CHILD = """
import json, sys
from g2rpo_jax.rewards.code import pass_fractions, parse_tests, stdio_tests
from g2rpo_jax.rewards.sandbox import SandboxLimits, isolation_mode, run_program
job = json.load(sys.stdin)
limits = SandboxLimits(timeout_s=job["timeout"], guard=False)
tests = [parse_tests(stdio_tests([("", expected)])) for _, expected in job["programs"]]
fractions, runs = pass_fractions([p for p, _ in job["programs"]], tests, limits, max_workers=len(tests), tag=job["tag"])
probe = run_program(job["probe"], "abc\\n", limits)
print(json.dumps({"mode": isolation_mode(), "fractions": fractions, "probe": probe.__dict__,
                  "runs": [[r.__dict__ for r in rs] for rs in runs]}))
"""


@pytest.mark.skipif(not _can_emulate_user_mode(), reason="needs root and unshare to emulate a non-root trainer")
def test_user_namespace_mode_holds_for_a_non_root_trainer(world):
    """The trainer side runs in a user namespace as uid 1000, so the sandbox takes its non-root path
    (unshare --user --map-root-user, capabilities cleared instead of a uid drop). The fork bomb is
    left out: this emulation maps to the real root, for which the kernel does not enforce RLIMIT_NPROC."""
    progs = {k: v for k, v in hostile_programs(world).items() if k != "fork_bomb"}
    tag = f"g2rpo-userns-{uuid.uuid4().hex[:8]}"
    job = {"programs": list(progs.values()), "tag": tag, "timeout": LIMIT_S, "probe": PRIVILEGES}
    start = time.monotonic()
    child = subprocess.run(["unshare", "--user", "--map-user=1000", "--map-group=1000", sys.executable, "-c",
                            USER_MODE_CHILD], input=json.dumps(job), capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    out = json.loads(child.stdout)
    assert out["mode"] == "namespaces-user"
    assert out["probe"]["ok"] and out["probe"]["stdout"] == "0000000000000000 1 cba\n", out["probe"]
    runs = [[RunResult(**r) for r in rs] for rs in out["runs"]]
    check_outcome(world, list(progs), out["fractions"], runs, tag, time.monotonic() - start)
