"""What an `bbd.Executable` test leaves behind: processes and run directories, checked by the test itself.

`Leftovers` gives a test a private ``workdir`` for run directories and an environment marker
(``env=guard.env``) that every process of the run inherits: the supervisor, the program and whatever
the program starts, including daemons that leave its session. `assert_clean()` fails if a process
carrying the marker is alive or a run directory remains.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

MARK = "BBD_TEST_LEFTOVER_MARK"


class Leftovers:
    def __init__(self, folder: Path) -> None:
        self.token = uuid.uuid4().hex
        self.workdir = folder / "runs"
        self.workdir.mkdir()
        self.env = {MARK: self.token}

    def processes(self) -> list[int]:
        """Live (non-zombie) processes whose environment holds this guard's marker."""
        needle = f"{MARK}={self.token}".encode()
        found = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/environ", "rb") as fh:
                    environ = fh.read()
            except OSError:
                continue  # gone, or a zombie (its environment is no longer readable)
            if needle in environ.split(b"\0"):
                found.append(int(name))
        return found

    def assert_clean(self, wait: float = 0.0) -> None:
        """No marked process alive and no run directory left (after up to `wait` seconds for them to go)."""
        give_up = time.monotonic() + wait
        while (self.processes() or os.listdir(self.workdir)) and time.monotonic() < give_up:
            time.sleep(0.05)
        alive = self.processes()
        assert not alive, f"processes left behind: {[_describe(pid) for pid in alive]}"
        left = os.listdir(self.workdir)
        assert not left, f"run directories left behind in {self.workdir}: {left}"


def _describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            command = fh.read().replace(b"\0", b" ").decode(errors="replace")
        return f"{pid}: {command}"
    except OSError:
        return str(pid)
