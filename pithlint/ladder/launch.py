"""Launching one ladder check as a process group: free ports, GPU choice, the hard time limit.

Everything here is torch-free: the runner only starts processes and reads the files they
write. A check runs in a new session (``start_new_session``), so on its time limit the whole
group (torchrun, its agent, every rank) is killed at once: SIGTERM, then SIGKILL for
whatever is left after a grace period.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

POLL_S = 0.5
KILL_GRACE_S = 5.0
# torchrun's TCPStore could not listen on the chosen port: someone took it between our
# probe and torchrun's bind. Only then is the launch retried, on a fresh port.
PORT_IN_USE = re.compile(r"EADDRINUSE|[Aa]ddress already in use")
PORT_ATTEMPTS = 3
# A GPU with more memory than this in use belongs to someone else (shared machines).
BUSY_GPU_MIB = 1024
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


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``: from /proc on Linux, else
    ``[pgid]`` while any member of the group exists."""
    proc_root = Path("/proc")
    if not (proc_root / "self" / "stat").exists():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        return [pgid]
    pids = []
    for entry in proc_root.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it just exited
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            pids.append(int(entry.name))
    return pids


def _wait_group(proc: subprocess.Popen, wait_s: float) -> bool:
    """Whether the leader and every other member of its group are gone within ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None and not group_pids(proc.pid):
            return True
        time.sleep(0.1)
    return False


def kill_group(proc: subprocess.Popen) -> list[int]:
    """Kill ``proc``'s whole process group: SIGTERM, a grace period, then SIGKILL. Returns
    the pids still alive afterwards (none, short of a process stuck in the kernel)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        if _wait_group(proc, KILL_GRACE_S):
            break
    if proc.poll() is None:
        proc.wait()
    return group_pids(proc.pid)


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
    """
    log_path = result_dir / "log.txt"
    attempt = 0
    while True:
        attempt += 1
        port = free_port() if use_port else None
        clear_results(result_dir)
        launch = _run_once(argv_for_port(port), cwd, env, log_path, timeout_s, on_tick)
        launch.port, launch.attempts = port, attempt
        retry = (
            use_port
            and attempt < PORT_ATTEMPTS
            and launch.returncode not in (0, None)
            and not any(result_dir.glob("rank*.progress"))
            and PORT_IN_USE.search(log_path.read_text(encoding="utf-8", errors="replace"))
        )
        if not retry:
            return launch


def _run_once(argv, cwd, env, log_path: Path, timeout_s: float, on_tick) -> Launch:
    started = time.monotonic()
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
    try:
        while True:
            try:
                returncode = proc.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                pass
            elapsed = time.monotonic() - started
            on_tick(elapsed)
            if elapsed > timeout_s:
                left = kill_group(proc)
                elapsed = time.monotonic() - started
                return Launch(None, elapsed, log_path, timed_out=True, left_behind=left)
    except BaseException:  # Ctrl-C or an error in on_tick: never leave the group running
        kill_group(proc)
        raise
    # torchrun has exited; anything it left in its group goes too.
    left = kill_group(proc) if group_pids(proc.pid) else []
    return Launch(returncode, time.monotonic() - started, log_path, left_behind=left)
