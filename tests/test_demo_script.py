"""`make demo` stopped with Ctrl-C on a terminal ends cleanly: the demo script takes the
terminal's Ctrl-C for itself, so make does not hear it and fail (printing "*** … Interrupt" when
the recipe died of it)."""

from __future__ import annotations

import os
import pty
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAND_IN = """
import sys, time
sys.path.insert(0, {scripts!r})
import demo
give_back = demo.own_the_terminal() if {own} else (lambda: None)
try:
    print("ready", flush=True)
    time.sleep(30)
except KeyboardInterrupt:
    print("stopped cleanly", flush=True)
give_back()
"""


def make_demo_on_a_terminal(tmp_path, own: bool) -> tuple[int, str]:
    """`make demo` on a pseudo-terminal, its recipe a stand-in for scripts/demo.py (the same
    terminal handling, no Phoenix): Ctrl-C typed once it is ready; make's exit status and output."""
    (tmp_path / "stand_in.py").write_text(STAND_IN.format(scripts=os.path.join(REPO, "scripts"), own=own))
    (tmp_path / "Makefile").write_text(f"demo:\n\t{sys.executable} stand_in.py\n")
    pid, fd = pty.fork()
    if pid == 0:  # the child: a new session, the terminal's foreground, as a shell would run make
        os.chdir(tmp_path)
        os.execvp("make", ["make", "--no-print-directory", "demo"])
    output, deadline, typed = b"", time.monotonic() + 30, False
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 1024)
        except OSError:  # the terminal closed: make has exited
            break
        if not chunk:
            break
        output += chunk
        if not typed and b"ready" in output:
            os.write(fd, b"\x03")  # Ctrl-C
            typed = True
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return status, output.decode(errors="replace")


@pytest.mark.parametrize("own", [True, False], ids=["the demo takes Ctrl-C", "without it"])
def test_ctrl_c_stops_make_demo_cleanly(tmp_path, own):
    status, output = make_demo_on_a_terminal(tmp_path, own)
    assert "stopped cleanly" in output, output
    if own:
        assert os.waitstatus_to_exitcode(status) == 0 and "Interrupt" not in output, output
    else:  # make heard the Ctrl-C as well: it ends killed by it, a failure, though the recipe exited 0
        assert os.waitstatus_to_exitcode(status) != 0, output
