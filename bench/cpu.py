"""CPU time and CPU pinning of process trees, from /proc (Linux), for the serving benchmarks.

    tree = process_tree(server.process.pid)   # tritonserver and its Python-backend stubs
    before = cpu_seconds(tree)                # user + system of every thread, live processes
    pin(tree, {0}); pin([os.getpid()], {1})   # every thread of each process, as taskset -a -p
    account = CpuAccount(server.process.pid, pin_apart=True)   # both, per named path

Why by hand: os.sched_setaffinity(pid) sets one thread (the one with that id), and a running
tritonserver has dozens; threads created later inherit their creator's mask, so pinning every
existing thread pins the process from then on. cutime/cstime of /proc/PID/stat count only
children that have exited and been waited for; the stubs live as long as the server, so their
own stat is read instead.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (which may hold spaces), or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def process_tree(pid: int) -> list[int]:
    """pid and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))  # fields[1]: ppid
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree


def cpu_seconds(pids) -> float:
    """User + system CPU seconds of these processes (all their threads) so far; processes
    that are gone count 0."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / CLOCK_TICKS


def pin(pids, cpus) -> None:
    """Every thread of these processes to the CPU set `cpus` (threads that end meanwhile are skipped)."""
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(tid, cpus)
            except (ProcessLookupError, PermissionError):
                pass



class CpuAccount:
    """A server's process tree (tritonserver and its stubs) and this process: their CPU seconds per
    named path over the runs counted, and, for the paths run pinned, the server on one CPU and
    this process on another, as with clients on other machines (pin_apart and two CPUs at least)."""

    def __init__(self, server_pid: int, pin_apart: bool):
        self.tree = process_tree(server_pid)
        self.cpus = sorted(os.sched_getaffinity(0))
        self.can_pin = pin_apart and len(self.cpus) >= 2
        self.seen: set = set()  # the server processes' CPU sets while pinned: what took effect
        self.seconds: dict[str, dict[str, float]] = {}

    @contextlib.contextmanager
    def run(self, path: str, pinned: bool = False, count: bool = True):
        if pinned:
            pin(self.tree, {self.cpus[0]})
            pin([os.getpid()], {self.cpus[1]})
            self.seen.update(tuple(sorted(os.sched_getaffinity(pid))) for pid in self.tree)
        server, client = cpu_seconds(self.tree), cpu_seconds([os.getpid()])
        try:
            yield
        finally:
            server, client = cpu_seconds(self.tree) - server, cpu_seconds([os.getpid()]) - client
            if pinned:
                pin(self.tree, set(self.cpus))
                pin([os.getpid()], set(self.cpus))
        if count:
            total = self.seconds.setdefault(path, {"server": 0.0, "client": 0.0})
            total["server"] += server
            total["client"] += client

    def per_1000(self, units: dict[str, float]) -> dict[str, dict[str, float]]:
        """CPU seconds per 1000 of each path's units (its rows, say, summed over the runs counted)."""
        return {path: {who: 1000 * v / units[path] for who, v in self.seconds[path].items()} for path in units}

    def pinning(self) -> dict:
        return {"server_cpu": self.cpus[0], "client_cpu": self.cpus[1], "server_processes": len(self.tree),
                "server_affinity_seen": sorted(map(list, self.seen))}
