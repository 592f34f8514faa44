"""`make demo`: Arize Phoenix plus a traced loupe server on the bundled model, wired together.
`make demo-pd` (`--pd`): Phoenix, SGLang's router in PD mode on --port, and a prefill and a
decode server behind it (on --port + 1 and + 2), all three tracing into Phoenix.

Phoenix runs from .phoenix-venv (`make phoenix-setup`) with its data under .phoenix/, its UI and
OTLP/HTTP on 6006 and OTLP/gRPC on 4317; loupe exports every request's trace to it over gRPC.
Ctrl-C (or SIGTERM) stops everything: Phoenix last, so the last spans reach it.

    python scripts/demo.py [--pd] [--port 30000] [--phoenix-port 6006] [--phoenix-grpc-port 4317]
                           [any other loupe.launch_server flags]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READY_TIMEOUT = 240
STOP_TIMEOUT = 20


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def port_busy(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_ready(name: str, proc: subprocess.Popen, url: str, log_hint: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while not healthy(url):
        if proc.poll() is not None:
            raise SystemExit(f"[demo] {name} exited with {proc.returncode} while starting; see {log_hint}")
        if time.monotonic() > deadline:
            raise SystemExit(f"[demo] {name} was not ready at {url} within {READY_TIMEOUT} s; see {log_hint}")
        time.sleep(0.25)


def stop(name: str, proc: subprocess.Popen | None) -> None:
    """SIGINT to the child (it stops its own children), then SIGKILL to whatever of its process
    group is still there after a while."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        say(f"{name} did not stop within {STOP_TIMEOUT} s; killing it")
    try:  # whatever of its group is left (children of an exited parent included)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def services(args, server_args: list[str]) -> list[tuple[str, list[str], str]]:
    """(name, command, health URL) of what runs beside Phoenix, in start order."""
    loupe = [sys.executable, "-m", "loupe.launch_server", "--enable-tracing",
             "--otlp-endpoint", f"http://127.0.0.1:{args.phoenix_grpc_port}", *server_args]
    if not args.pd:
        return [("the loupe server", [*loupe, "--port", str(args.port)], f"http://127.0.0.1:{args.port}/health")]
    prefill, decode, bootstrap = args.port + 1, args.port + 2, args.bootstrap_port
    router = [sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation", "--host", "127.0.0.1",
              "--port", str(args.port), "--prometheus-host", "127.0.0.1", "--prefill", f"http://127.0.0.1:{prefill}",
              str(bootstrap), "--decode", f"http://127.0.0.1:{decode}", "--enable-trace",
              "--otlp-traces-endpoint", f"127.0.0.1:{args.phoenix_grpc_port}"]
    return [("the prefill server", [*loupe, "--port", str(prefill), "--disaggregation-mode", "prefill",
                                    "--disaggregation-bootstrap-port", str(bootstrap)], f"http://127.0.0.1:{prefill}/health"),
            ("the decode server", [*loupe, "--port", str(decode), "--disaggregation-mode", "decode"],
             f"http://127.0.0.1:{decode}/health"),
            ("the router", router, f"http://127.0.0.1:{args.port}/readiness")]


def own_the_terminal() -> Callable[[], None]:
    """Take the terminal's Ctrl-C for this script alone: its own process group, made the
    terminal's foreground. `make demo` would otherwise hear the Ctrl-C too, and make ends an
    interrupted recipe with "*** [Makefile:…] Interrupt" and a failure whatever the recipe did.
    Returns what gives the terminal back (nothing to do off a terminal)."""
    try:
        fd = sys.stdin.fileno()
        before = os.tcgetpgrp(fd)
    except OSError:  # not a terminal (CI, a pipe)
        return lambda: None

    def foreground(group: int) -> None:
        muted = signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # a background group may not otherwise
        try:
            os.tcsetpgrp(fd, group)
        except OSError:
            pass
        finally:
            signal.signal(signal.SIGTTOU, muted)

    if os.getpgrp() == before:
        try:
            os.setpgid(0, 0)
        except OSError:  # already leading a session or a group: the terminal's signals are ours
            return lambda: None
    foreground(os.getpgrp())
    return lambda: foreground(before)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=30000, help="loupe's HTTP port")
    parser.add_argument("--phoenix-port", type=int, default=6006, help="Phoenix UI, REST and OTLP/HTTP")
    parser.add_argument("--phoenix-grpc-port", type=int, default=4317, help="Phoenix OTLP/gRPC")
    parser.add_argument("--pd", action="store_true", help="a prefill/decode pair behind SGLang's router")
    parser.add_argument("--bootstrap-port", type=int, default=8998, help="with --pd: the prefill server's")
    args, server_args = parser.parse_known_args()

    venv = os.environ.get("PHOENIX_VENV", ".phoenix-venv")
    phoenix_bin = os.path.join(REPO, venv, "bin", "phoenix")
    if not os.access(phoenix_bin, os.X_OK):
        raise SystemExit(f"[demo] {phoenix_bin} is missing: run `make phoenix-setup` first")
    ports = [("Phoenix", args.phoenix_port), ("Phoenix gRPC", args.phoenix_grpc_port), ("loupe", args.port)]
    if args.pd:
        ports += [("the prefill server", args.port + 1), ("the decode server", args.port + 2),
                  ("the bootstrap port", args.bootstrap_port)]
    for what, port in ports:
        if port_busy(port):
            raise SystemExit(f"[demo] port {port} (for {what}) is already in use; is another demo or "
                             "collector running? Pick others with --port/--phoenix-port/--phoenix-grpc-port")

    data = os.path.join(REPO, ".phoenix")
    os.makedirs(data, exist_ok=True)
    phoenix_log = os.path.join(data, "phoenix.log")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PHOENIX_")}
    phoenix_env = {
        **clean,
        "PHOENIX_WORKING_DIR": data,  # its SQLite database: traces survive a restart of the demo
        "PHOENIX_TELEMETRY_ENABLED": "false",
        "PHOENIX_ALLOW_EXTERNAL_RESOURCES": "false",  # offline: no downloads on its own initiative
        "PHOENIX_HOST": os.environ.get("PHOENIX_HOST", "127.0.0.1"),
        "PHOENIX_PORT": str(args.phoenix_port),
        "PHOENIX_GRPC_PORT": str(args.phoenix_grpc_port),
        "PYTHONUNBUFFERED": "1",
    }
    server_env = {**clean, "PYTHONUNBUFFERED": "1"}
    server_env.setdefault("OTEL_SERVICE_NAME", "loupe")
    server_env.setdefault("UCX_NET_DEVICES", "lo")  # a PD pair's KV stays on this machine's loopback

    # Each child gets its own session: the terminal's Ctrl-C reaches only this script, which
    # then stops them in order.
    give_back_terminal = own_the_terminal()
    phoenix = None
    started: list[tuple[str, subprocess.Popen]] = []
    interrupted = False

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    # Ctrl-C always stops the demo, even when started from a shell that had SIGINT ignored
    # (a background job); the children then start with SIGINT at its default too.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        say(f"starting Phoenix (log: {os.path.relpath(phoenix_log, REPO)}) ...")
        with open(phoenix_log, "ab") as log:
            phoenix = subprocess.Popen([phoenix_bin, "serve"], env=phoenix_env, cwd=REPO, stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        wait_ready("Phoenix", phoenix, f"http://127.0.0.1:{args.phoenix_port}/healthz", phoenix_log)
        for name, command, health in services(args, server_args):
            say(f"starting {name}, tracing into Phoenix over OTLP/gRPC ...")
            proc = subprocess.Popen(command, env=server_env, cwd=REPO, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            started.append((name, proc))
            wait_ready(name, proc, health, "its output above")
        print(f"""
  Phoenix (traces):  http://localhost:{args.phoenix_port}   (project "default")
  loupe (OpenAI API): http://127.0.0.1:{args.port}/v1

  Try:
    curl http://127.0.0.1:{args.port}/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{{"model": "SmolLM2-135M-Instruct", "messages": [{{"role": "user", "content": "Hi!"}}], "max_tokens": 32}}'

  then, in Phoenix, open the project "default", the Traces tab, and the newest trace ("Req chatcmpl-..."):
  the Spans tab lists only spans without a parent, so it hides a request that came with a caller's
  traceparent (through the router, say). Ctrl-C stops everything.
""", flush=True)
        while True:
            for name, proc in (("Phoenix", phoenix), *started):
                if proc.poll() is not None:
                    say(f"{name} exited with {proc.returncode}; stopping the demo")
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        interrupted = True
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if interrupted:
            say("stopping ...")
        for name, proc in reversed(started):  # first, so that they flush their last spans into Phoenix
            stop(name, proc)
        stop("Phoenix", phoenix)
        say("stopped" + (": Ctrl-C, a clean stop" if interrupted else ""))
        give_back_terminal()


if __name__ == "__main__":
    sys.exit(main())
