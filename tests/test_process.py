import subprocess
import sys
import time

CHILD = """
import atexit, time
atexit.register(time.sleep, 2)  # a library's exit handler, registered at its import
from loupe.process import setup_child
setup_child("child")
print("ready", flush=True)
"""


def test_sigterm_while_exiting_adds_no_traceback():
    """The supervisor stops children with SIGTERM; one that is already exiting (in a
    library's exit handler) must exit without printing a traceback."""
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    time.sleep(0.5)  # main has returned: the exit handlers are running
    child.terminate()
    _, stderr = child.communicate(timeout=10)
    assert child.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr


def test_a_child_takes_its_name_as_the_process_name():
    """ps, top and psutil show a child by the name it logs with (setup_child)."""
    import psutil

    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        assert psutil.Process(child.pid).name() == "child"
    finally:
        child.kill()
        child.communicate(timeout=10)
