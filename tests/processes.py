"""Helpers for tests that kill a process at a chosen moment (a torn checkpoint write, a removal cut short)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path


def kill_when_ready(argv: list[str], ready: Path, what: str, timeout_s: float = 120) -> None:
    """Start `argv`, wait until it creates the file `ready` (it does so just before the step to interrupt), then
    SIGKILL it. `what` names the step in the failure messages ("started writing")."""
    child = subprocess.Popen(argv)
    try:
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            assert child.poll() is None, f"the process ended before it {what}"
            assert time.monotonic() < deadline, f"the process never {what}"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
