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


HOLES = """
import ctypes, psutil
from loupe.process import HeapTrimmer
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
blocks = [libc.malloc(64 << 10) for _ in range(2000)]  # 128 MB on the heap, below the mmap threshold
for b in blocks:
    ctypes.memset(b, 1, 64 << 10)
for b in blocks[:-1]:  # the last block pins the top: free() alone gives nothing back
    libc.free(b)
rss = lambda: psutil.Process().memory_info().rss >> 20
trim, before = HeapTrimmer(), rss()
trim(working=False)  # idle before any work: nothing to give back
idle = rss()
trim(working=True)  # working, within the interval: not yet
working = rss()
trim(working=False)  # fell idle after work: gives the free pages back
print(before, idle, working, rss())
"""


def test_the_heap_trimmer_gives_free_heap_pages_back_when_work_ends():
    run = subprocess.run([sys.executable, "-c", HOLES], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    before, idle, working, after = map(int, run.stdout.split())
    assert before - idle < 16 and before - working < 16, run.stdout
    assert before - after > 100, run.stdout


def test_the_heap_trimmer_trims_every_interval_while_working():
    from loupe.process import HeapTrimmer

    trims = []
    trim = HeapTrimmer(interval=0.2)
    trim._trim = trims.append
    for _ in range(3):
        trim(working=True)
    assert trims == []
    time.sleep(0.25)
    trim(working=True)
    trim(working=True)
    assert trims == [0]
    trim(working=False)
    trim(working=False)
    assert trims == [0, 0]
