"""Process lifecycle: signals stop everything, a dead child stops the server, and bad
start-up input fails fast with one clear line."""

import json
import os
import re
import signal
import subprocess
import threading
import time

import httpx
import psutil
import pytest

from harness import free_port, run_server

pytestmark = pytest.mark.slow  # it starts servers


def stream_long(server, on_line=lambda: None) -> str:
    """Stream a 1000-token /generate request to its end: "finished", or the error that ended it."""
    body = {"text": "one two three", "stream": True, "sampling_params": {"max_new_tokens": 1000, "ignore_eos": True}}
    try:
        with httpx.stream("POST", server.url("/generate"), json=body, timeout=60, trust_env=False) as r:
            for _ in r.iter_lines():
                on_line()
        return "finished"
    except httpx.HTTPError as e:
        return type(e).__name__


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_main_process_and_children(launch, tiny_flags, sig):
    server = launch(*tiny_flags, "--shutdown-timeout", 1).wait_ready()
    children = server.descendants()
    assert len(children) >= 2, "expected at least the scheduler and detokenizer processes"
    # A request in flight must not hold the shutdown up for long.
    streaming = threading.Event()
    worker = threading.Thread(target=stream_long, args=(server, streaming.set), daemon=True)
    worker.start()
    assert streaming.wait(30)
    start = time.monotonic()
    server.proc.send_signal(sig)
    code = server.wait_exit(10)
    assert code is not None, f"the main process still runs 10 s after {sig.name}:\n{server.log()}"
    left = server.wait_all_gone(max(0.5, 10 - (time.monotonic() - start)))
    assert not left, f"processes left after {sig.name}: {left}\n{server.log()}"
    assert code == 0, f"exit code {code} after {sig.name}:\n{server.log()}"
    worker.join(10)


def test_sigterm_drains_running_requests_and_refuses_new_ones(launch, tiny_flags):
    server = launch(*tiny_flags, "--shutdown-timeout", 60).wait_ready()
    body = {"text": "one two three", "stream": True, "sampling_params": {"max_new_tokens": 1000, "ignore_eos": True}}
    with httpx.stream("POST", server.url("/generate"), json=body, timeout=60, trust_env=False) as running:
        lines = running.iter_lines()
        next(lines)  # it runs
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        late = httpx.post(server.url("/generate"), json={"text": "hi", "sampling_params": {"max_new_tokens": 2}},
                          timeout=10, trust_env=False)
        health = httpx.get(server.url("/health"), timeout=5, trust_env=False)
        events = [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: {")]
    assert events[-1]["meta_info"]["completion_tokens"] == 1000  # it was let finish
    assert late.status_code == 503 and late.json()["error"]["code"] == "draining" and late.headers["retry-after"]
    assert health.status_code == 503 and health.json()["error"]["code"] == "draining"
    assert server.wait_exit(30) == 0, server.log()
    assert "draining: 1 requests running" in server.log()
    assert not server.wait_all_gone(5), f"processes left: {server.alive_pids()}"


def test_sigterm_answers_what_outlasts_the_shutdown_timeout(launch, tiny_flags):
    server = launch(*tiny_flags, "--shutdown-timeout", 0.5).wait_ready()
    answers = []
    body = {"text": "one two three", "sampling_params": {"max_new_tokens": 1000, "ignore_eos": True}}

    def request():
        answers.append(httpx.post(server.url("/generate"), json=body, timeout=60, trust_env=False))

    worker = threading.Thread(target=request)
    worker.start()
    time.sleep(0.3)
    server.proc.send_signal(signal.SIGTERM)
    worker.join(30)
    assert server.wait_exit(20) == 0, server.log()
    (answer,) = answers
    assert answer.status_code == 503 and "did not finish within 0.5 s" in answer.json()["error"]["message"]
    assert not server.wait_all_gone(5), f"processes left: {server.alive_pids()}"


def test_a_signal_during_start_up_is_not_a_failed_start(launch):
    """Ctrl-C while the model loads is the user's choice: exit 0, no "cannot start" error."""
    server = launch()  # the bundled model: the HTTP server is up seconds before it is loaded
    server.wait_log("Application startup complete", 30)
    assert "serving" not in server.log(), "the server was ready before the signal"
    server.proc.send_signal(signal.SIGINT)
    code = server.wait_exit(20)
    assert code == 0 and "cannot start" not in server.log(), server.log()
    assert not server.wait_all_gone(5), f"processes left: {server.alive_pids()}"


def client_connections(server) -> list:
    """The server's established TCP connections on its HTTP port."""
    return [c for c in psutil.Process(server.proc.pid).net_connections(kind="tcp")
            if c.laddr.port == server.port and c.status == psutil.CONN_ESTABLISHED]


@pytest.mark.parametrize("victim,flags", [("scheduler", ()), ("detokenizer", ()),
                                          ("scheduler [TP 1]", ("--tp-size", 2))], ids=["scheduler", "detokenizer", "tp-rank"])
def test_a_serving_process_death_answers_every_request_and_stops_the_server(launch, tiny_flags, victim, flags):
    server = launch(*tiny_flags, *flags).wait_ready()
    children = psutil.Process(server.proc.pid).children()
    (pid,) = [p.pid for p in children if p.name() == victim[:15]]  # children name themselves (15 bytes kept)
    answers = []

    def request():
        body = {"text": "one two three", "sampling_params": {"max_new_tokens": 1000, "ignore_eos": True}}
        try:
            r = httpx.post(server.url("/generate"), json=body, timeout=30, trust_env=False)
            answers.append((r.status_code, r.json()))
        except httpx.HTTPError as e:
            answers.append((None, repr(e)))

    # Stopped first, the victim holds all four in flight however fast the model is (the
    # scheduler runs none, the detokenizer passes none on, the TP group waits for its rank).
    os.kill(pid, signal.SIGSTOP)
    workers = [threading.Thread(target=request) for _ in range(4)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 30
    while len(client_connections(server)) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(client_connections(server)) == 4
    time.sleep(0.5)  # each request read and sent on
    os.kill(pid, signal.SIGKILL)  # all four in flight
    for worker in workers:
        worker.join(30)
    code = server.wait_exit(10)
    assert code is not None, f"the main process still runs 10 s after its {victim} died:\n{server.log()}"
    assert code != 0
    assert len(answers) == 4, answers
    for status, body in answers:  # answered, in OpenAI's shape, saying what happened
        assert status == 503, (status, body)
        assert body["error"]["code"] == "engine_unavailable" and victim in body["error"]["message"], body
    log = server.log()
    assert len(re.findall(rf"the {re.escape(victim)} process \(pid {pid}\) died", log)) == 1, log
    assert "Traceback" not in log, log
    assert not server.wait_all_gone(5), f"processes left: {server.alive_pids()}"


def test_the_main_process_death_leaves_no_request_hanging_and_no_process(launch, tiny_flags):
    """The HTTP server and the tokenizer live in the main process: killed, it cannot answer,
    but its clients see their connections end at once, and every child says why it stops."""
    server = launch(*tiny_flags).wait_ready()
    children = server.descendants()
    outcomes = []
    streaming = [threading.Event() for _ in range(4)]
    workers = [threading.Thread(target=lambda e=e: outcomes.append(stream_long(server, e.set))) for e in streaming]
    for worker in workers:
        worker.start()
    assert all(event.wait(30) for event in streaming)  # all four stream: killed in the middle of them
    killed = time.monotonic()
    server.proc.kill()
    for worker in workers:
        worker.join(max(0.1, killed + 10 - time.monotonic()))
    assert not any(worker.is_alive() for worker in workers), "a client still waits 10 s after the kill"
    assert len(outcomes) == 4 and "finished" not in outcomes, outcomes
    left = server.wait_all_gone(10)
    assert not left, f"processes left after the main process died: {left}\n{server.log()}"
    log = server.log()
    lines = re.findall(rf"\[(\w+) pid:\d+\] ERROR loupe: the main process \(pid {server.proc.pid}\) died", log)
    assert "scheduler" in lines and "detokenizer" in lines and len(lines) == len(set(lines)), log
    assert len(children) >= 2 and "Traceback" not in log, log


def run_server_expecting_failure(*args, timeout: float = 90) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    result = run_server(*args, timeout=timeout)
    return result, time.monotonic() - start


def test_busy_port_fails_fast(launch, tiny_flags):
    first = launch(*tiny_flags).wait_ready()
    result, seconds = run_server_expecting_failure("--port", first.port, *tiny_flags, timeout=30)
    assert result.returncode != 0
    assert seconds < 30, f"took {seconds:.1f} s to notice the busy port"
    output = result.stdout + result.stderr
    assert re.search(rf"port {first.port}\b.*(in use|already)", output), output
    # The first server is unharmed.
    assert httpx.get(first.url("/health"), trust_env=False).status_code == 200


@pytest.mark.parametrize("kind", ["missing", "not-a-model"])
def test_bad_model_path_fails_naming_it(tmp_path, kind):
    path = tmp_path / "no-such-model" if kind == "missing" else tmp_path
    result, seconds = run_server_expecting_failure("--port", free_port(), "--model-path", path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert str(path) in output, output
    assert "Traceback" not in output, output


@pytest.mark.parametrize("flag,value", [("--page-size", "0"), ("--dtype", "float8"), ("--port", "70000"),
                                        ("--max-total-tokens", "1"), ("--trace-level", "7"), ("--tp-size", "0"),
                                        ("--pp-size", "-1"), ("--node-rank", "2"), ("--nnodes", "2"),
                                        ("--dist-init-addr", "no-port")])
def test_bad_flag_value_fails_with_one_line_naming_it(flag, value):
    result, seconds = run_server_expecting_failure("--port", 12345, flag, value, timeout=60)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and flag in errors[0], result.stderr
