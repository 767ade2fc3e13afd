"""What a tritonserver started by server/launcher.py can leave behind, and how it is ended: its
Python backend stubs (one process per model instance) and their shared-memory regions.

A stub outlives its tritonserver when the server exits before the stub has finished (Triton's
"Exit timeout expired": it exits without waiting for the models to unload), or when the server is
killed: the stub is re-parented to init, and its region stays in /dev/shm (the server removes
regions as it unloads). A stub polls its parent (every 0.3 s) and exits once it is gone, unless a
thread of it is stuck in a call into the server holding the GIL; its region stays either way.

The launcher gives every server a unique region prefix (--backend-config=python,
shm-region-prefix-name=PREFIX, see `unique_prefix`), so both are found exactly, whoever their
parent is by then: each region is /dev/shm/PREFIX<uuid>, and the prefix is on the command line of
the server (that flag) and of each stub (its region's name).

Run as a script (`python -I -S reaper.py`), this file is the launcher's watchdog, in a session of
its own: it reads JSON lines on stdin, {"watch": PREFIX, "log": PATH} for a server started and
{"done": PREFIX} for one the launcher has stopped and cleaned up. When the launcher process ends
(its end of the pipe closes, or the process exits), every server still watched is ended here
and a line saying so is added to its log: a launcher killed with SIGKILL leaves no server.

Standard library only: the script runs without the project's environment.
"""
from __future__ import annotations

import glob
import json
import os
import secrets
import select
import signal
import sys
import time

# Triton's own prefix starts every one the launcher makes, so tools that know the default still
# recognise the regions (tests/deployment.py and server/cluster.py read them from /proc/PID/maps).
DEFAULT_PREFIX = "triton_python_backend_shm_region_"
PROGRAMS = ("tritonserver", "triton_python_backend_stub")
END_WAIT_S = 10.0  # a SIGKILLed process is gone at once unless stuck in the kernel (disk, NFS)


def unique_prefix() -> str:
    """A region prefix no other server on the machine has: this process's id and random bits."""
    return f"{DEFAULT_PREFIX}pixelrnn-{os.getpid()}-{secrets.token_hex(4)}-"


def server_processes(prefix: str) -> list[int]:
    """Live processes of the server with this prefix: tritonserver and its backend stubs (a dead
    one not yet reaped has an empty command line and is not listed)."""
    needle, found = prefix.encode(), []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        if os.path.basename(argv[0]).decode(errors="replace") in PROGRAMS and any(needle in a for a in argv[1:]):
            found.append(int(entry.name))
    return found


def shm_regions(prefix: str) -> list[str]:
    return sorted(glob.glob(f"/dev/shm/{glob.escape(prefix)}*"))


def end_server(prefix: str, wait_s: float = END_WAIT_S) -> dict[str, list]:
    """SIGKILL every process of the server with this prefix, then remove its regions ->
    {"killed": pids, "removed": regions, "alive": pids that outlived wait_s}."""
    killed = []
    for pid in server_processes(prefix):
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass
    alive, deadline = list(killed), time.monotonic() + wait_s
    while alive:
        alive = server_processes(prefix)
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    removed = []
    for region in shm_regions(prefix):
        try:
            os.unlink(region)
            removed.append(region)
        except FileNotFoundError:  # its server removed it meanwhile
            pass
    return {"killed": killed, "removed": removed, "alive": alive}


def describe(ended: dict[str, list]) -> str:
    text = f"killed {len(ended['killed'])} process(es) {ended['killed']}, removed {len(ended['removed'])} shared-memory region(s)"
    return text + (f"; still alive after {END_WAIT_S:g} s: {ended['alive']}" if ended["alive"] else "")


def note(log: str, line: str) -> None:
    try:
        with open(log, "a") as f:
            f.write(line + "\n")
    except OSError:  # no log to write to: the clean-up itself is what matters
        pass


# -------------------------------------------------------------------------------- the watchdog

def _read(fd: int, pending: bytes, watched: dict) -> tuple[bytes, bool]:
    """Apply the whole lines ready on fd to `watched` -> (the partial rest, whether fd closed)."""
    chunk = os.read(fd, 65536)
    *lines, pending = (pending + chunk).split(b"\n")
    for message in (json.loads(line) for line in lines if line.strip()):
        if "watch" in message:
            watched[message["watch"]] = message.get("log")
        else:
            watched.pop(message.get("done"), None)
    return pending, not chunk


def watch(stdin: int = 0) -> None:
    launcher = os.getppid()
    try:
        gone = [os.pidfd_open(launcher)]  # readable once the launcher process has exited
    except (AttributeError, OSError):  # no pidfd (old kernel): the closed pipe alone tells
        gone = []
    watched, pending, closed = {}, b"", os.getppid() != launcher  # re-parented: the launcher died first
    while not closed:
        ready, _, _ = select.select([stdin, *gone], [], [])
        if stdin not in ready:  # exited, while a process it forked holds the pipe open
            while not closed and select.select([stdin], [], [], 0)[0]:  # what it wrote before it exited
                pending, closed = _read(stdin, pending, watched)
            break
        pending, closed = _read(stdin, pending, watched)
    for prefix, log in watched.items():
        ended = end_server(prefix)
        if log:
            note(log, f"[pixelrnn] the launcher (pid {launcher}) went away without stopping this tritonserver: {describe(ended)}")


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # its work starts when the launcher's ends
    watch(sys.stdin.fileno())
