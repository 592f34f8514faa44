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


PARENT = """
import os, subprocess, sys, threading, time
child_code = "from loupe.process import setup_child; setup_child('child'); print('ready', flush=True); " \\
             "import time; time.sleep(60)"
children = []
def start():  # a thread that starts the child, then ends (as the supervisor's does at shutdown)
    children.append(subprocess.Popen([sys.executable, "-c", child_code], stdout=subprocess.PIPE, text=True))
    assert children[0].stdout.readline().strip() == "ready"
thread = threading.Thread(target=start)
thread.start()
thread.join()
time.sleep(1)
print(children[0].pid, children[0].poll() is None, flush=True)  # still alive after its thread ended
os.kill(os.getpid(), 9)
"""


def test_a_child_stays_when_its_starting_thread_ends_and_says_so_when_the_parent_dies():
    import psutil

    parent = subprocess.run([sys.executable, "-c", PARENT], capture_output=True, text=True, timeout=60)
    pid, alive = parent.stdout.split()
    assert alive == "True", parent.stderr
    deadline = time.monotonic() + 10
    while psutil.pid_exists(int(pid)) and psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the child outlived its parent"
        time.sleep(0.05)
    assert "ERROR loupe: the main process" in parent.stderr and "died; stopping" in parent.stderr, parent.stderr
