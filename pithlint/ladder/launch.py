"""Launching one ladder check as a process group: free ports, GPU choice, the hard time limit.

Everything here is torch-free: the runner only starts processes and reads the files they
write. A check runs in a new session (``start_new_session``), so on its time limit the whole
run is killed at once: SIGTERM, then SIGKILL for whatever is left after a grace period. The
whole run is torchrun's process group and those of its descendants: torchrun starts every
rank in a session of its own, and a torchrun killed before it stopped its ranks leaves them
orphans, which the runner keeps track of.

Being in a session of its own, the group gets none of the signals a terminal sends to the
runner's process group (Ctrl-C): while a group runs, SIGINT and SIGTERM to the runner are
only recorded; the wait then kills the group as on its time limit and ``run_group`` raises
``Interrupted``, a ``KeyboardInterrupt`` that the runner reports.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

POLL_S = 0.5
KILL_GRACE_S = 5.0
# torchrun's TCPStore could not listen on the chosen port: someone took it between our
# probe and torchrun's bind. Only then is the launch retried, on a fresh port.
PORT_IN_USE = re.compile(r"EADDRINUSE|[Aa]ddress already in use")
PORT_ATTEMPTS = 3
# A GPU with more memory than this in use belongs to someone else (shared machines).
BUSY_GPU_MIB = 1024
# The signals that interrupt the runner: Ctrl-C, and what a CI job's cancel or `timeout`
# sends.
INTERRUPTS = (signal.SIGINT, signal.SIGTERM)
NVIDIA_SMI = ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"]


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it: bind to port 0)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------- devices


@dataclass(frozen=True)
class Gpu:
    index: int
    used_mib: int

    @property
    def busy(self) -> bool:
        return self.used_mib > BUSY_GPU_MIB


def query_gpus() -> Optional[list[Gpu]]:
    """Every GPU nvidia-smi lists with its memory in use, or None without a working
    nvidia-smi. Asked afresh before every check: the machines are shared."""
    try:
        out = subprocess.run(NVIDIA_SMI, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    gpus = []
    for line in out.stdout.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit():
            gpus.append(Gpu(int(fields[0]), int(fields[1])))
    return gpus


@dataclass(frozen=True)
class Placement:
    """Where one check runs: the device type and the GPUs it may see, or why it cannot run."""

    device: str  # "cpu" or "cuda"
    gpus: tuple[int, ...] = ()
    skip_reason: Optional[str] = None

    def describe(self) -> str:
        return "cpu" if self.device == "cpu" else "cuda:" + ",".join(map(str, self.gpus))

    def env(self) -> dict[str, str]:
        # On CPU the ranks must not grab a GPU either.
        return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, self.gpus))}


def place(device: str, needed: int) -> Placement:
    """Choose ``needed`` idle GPUs (``device == "cuda"``), or the CPU, which runs any rung."""
    if device == "cpu":
        return Placement("cpu")
    gpus = query_gpus() or []
    idle = [g.index for g in gpus if not g.busy]
    if len(gpus) < needed:
        return Placement("cuda", skip_reason=f"needs {needed} GPUs, found {len(gpus)}")
    if len(idle) < needed:
        busy = ", ".join(f"GPU {g.index}: {g.used_mib} MiB in use" for g in gpus if g.busy)
        return Placement(
            "cuda",
            skip_reason=f"needs {needed} idle GPUs, found {len(idle)} of {len(gpus)} ({busy})",
        )
    return Placement("cuda", tuple(idle[:needed]))


def resolve_device(device: str) -> str:
    """``auto``: CUDA when nvidia-smi lists a GPU, else the CPU."""
    if device == "auto":
        return "cuda" if query_gpus() else "cpu"
    return device


# ---------------------------------------------------------------------------- processes


@dataclass
class Launch:
    """How one check's process group ended."""

    returncode: Optional[int]  # None when it was killed at its time limit
    elapsed_s: float
    log_path: Path
    timed_out: bool = False
    port: Optional[int] = None
    attempts: int = 1
    left_behind: list[int] = field(default_factory=list)  # pids still alive after the kill
    interrupted_by: Optional[int] = None  # the signal to the runner that ended it


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached the runner while a group ran; the group is already ended,
    ``launch`` says how. A ``KeyboardInterrupt``, so no ``except Exception`` swallows it."""

    def __init__(self, launch: Launch) -> None:
        super().__init__(signal.Signals(launch.interrupted_by).name)
        self.launch = launch
        self.signum = launch.interrupted_by


def _process_table() -> Optional[dict[int, tuple[int, int]]]:
    """pid -> (ppid, pgrp) of every live (non-zombie) process, from /proc; None without."""
    proc_root = Path("/proc")
    if not (proc_root / "self" / "stat").exists():
        return None
    table = {}
    for entry in proc_root.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it just exited
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        state, ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if state != "Z":
            table[int(entry.name)] = (int(ppid), int(pgrp))
    return table


def live_groups(leader: int, known: Iterable[int] = ()) -> set[int]:
    """The process groups of ``leader``'s run that still have a member: its own, those of
    its descendants (torchrun starts every rank in a session of its own, which a kill of
    torchrun's group does not reach) and those of ``known`` (a rank that outlived torchrun
    is an orphan, no longer a descendant). Without /proc: ``leader``'s group."""
    table = _process_table()
    if table is None:
        return {leader}
    alive = {pgrp for _, pgrp in table.values()}
    groups = ({leader} | set(known)) & alive
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    todo = [pid for pid, (_, pgrp) in table.items() if pgrp in groups]
    while todo:
        pid = todo.pop()
        groups.add(table[pid][1])
        todo += children.get(pid, [])
    return groups


def group_pids(groups: Iterable[int]) -> list[int]:
    """Live (non-zombie) members of the process groups ``groups``: from /proc on Linux,
    else each group's id while the group has a member."""
    groups = set(groups)
    table = _process_table()
    if table is not None:
        return sorted(pid for pid, (_, pgrp) in table.items() if pgrp in groups)
    pids = []
    for pgid in groups:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            continue
        pids.append(pgid)
    return pids


def _wait_groups(proc: subprocess.Popen, groups: set[int], wait_s: float) -> bool:
    """Whether the leader and every member of ``groups`` are gone within ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None and not group_pids(groups):
            return True
        time.sleep(0.1)
    return False


def kill_group(proc: subprocess.Popen, known: Iterable[int] = ()) -> list[int]:
    """Kill ``proc``'s run, every process group of it (``live_groups``): SIGTERM, a grace
    period, then SIGKILL. Returns the pids still alive afterwards (none, short of a process
    stuck in the kernel)."""
    groups = set(known)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        groups = live_groups(proc.pid, groups)
        for pgid in groups:
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass  # its last member just exited
        if _wait_groups(proc, groups, KILL_GRACE_S):
            break
    if proc.poll() is None:
        proc.wait()
    return group_pids(groups)


def clear_results(result_dir: Path) -> None:
    """Remove what an earlier attempt wrote (rank files and the log)."""
    result_dir.mkdir(parents=True, exist_ok=True)
    for path in result_dir.iterdir():
        if path.is_file():
            path.unlink()


def run_group(
    argv_for_port: Callable[[Optional[int]], list[str]],
    *,
    cwd: Path,
    env: dict[str, str],
    result_dir: Path,
    timeout_s: float,
    on_tick: Callable[[float], None],
    use_port: bool,
) -> Launch:
    """Run the command ``argv_for_port(port)`` as its own process group with a hard limit.

    With ``use_port`` it gets a free port; a launch that fails because the port was taken
    between the probe and torchrun's bind (nothing started: no rank wrote progress) is
    retried on a fresh port, ``PORT_ATTEMPTS`` times at most. The output goes to
    ``result_dir/log.txt``; ``on_tick(elapsed)`` is called about every ``POLL_S``.
    Raises ``Interrupted`` when SIGINT or SIGTERM reached the runner meanwhile.
    """
    log_path = result_dir / "log.txt"
    # A rank killed by a fatal signal (SIGSEGV, SIGABRT, ...) prints its Python stack to
    # the log: the diagnosis has nothing else from it.
    env = {"PYTHONFAULTHANDLER": "1", **env}
    attempt = 0
    while True:
        attempt += 1
        port = free_port() if use_port else None
        clear_results(result_dir)
        launch = _run_once(argv_for_port(port), cwd, env, log_path, timeout_s, on_tick)
        launch.port, launch.attempts = port, attempt
        if launch.interrupted_by is not None:
            raise Interrupted(launch)
        retry = (
            use_port
            and attempt < PORT_ATTEMPTS
            and launch.returncode not in (0, None)
            and not any(result_dir.glob("rank*.progress"))
            and PORT_IN_USE.search(log_path.read_text(encoding="utf-8", errors="replace"))
        )
        if not retry:
            return launch


@contextmanager
def _interrupts_recorded():
    """SIGINT and SIGTERM are appended to the yielded list instead of acting. Acting at
    once, Ctrl-C could land between the fork and the wait, or in the middle of
    ``kill_group``, and leave ranks running. Signals go to the main thread only, and a
    signal the runner was started ignoring (a background job) stays ignored."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    previous = {}
    for sig in INTERRUPTS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, lambda signum, _frame: caught.append(signum))
    try:
        yield caught
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_once(argv, cwd, env, log_path: Path, timeout_s: float, on_tick) -> Launch:
    started = time.monotonic()
    with _interrupts_recorded() as caught:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, killed as a whole
            )
        groups: set[int] = set()
        try:
            returncode, timed_out, groups = _wait(proc, started, timeout_s, on_tick, caught)
        finally:
            # However the wait ended (the command exited, the time limit, a signal to the
            # runner, an error in on_tick), nothing of the run outlives it.
            left = kill_group(proc, groups)
    return Launch(
        returncode,
        time.monotonic() - started,
        log_path,
        timed_out=timed_out,
        left_behind=left,
        interrupted_by=caught[0] if caught else None,
    )


def _wait(proc, started: float, timeout_s: float, on_tick, caught: list[int]):
    """(exit code, timed out, the run's process groups as last seen: ``live_groups``) of
    the group's leader; the exit code is None at the time limit and once ``caught`` holds a
    signal to the runner, with the leader still running."""
    groups: set[int] = set()
    while not caught:
        try:
            return proc.wait(timeout=POLL_S), False, groups
        except subprocess.TimeoutExpired:
            pass
        groups = live_groups(proc.pid, groups)
        elapsed = time.monotonic() - started
        on_tick(elapsed)
        if elapsed > timeout_s:
            return None, True, groups
    return None, False, groups
