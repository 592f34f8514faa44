"""loupe against llama.cpp's `llama-server` on the same GGUF file, side by side in one run.

    .venv/bin/python benchmarks/bench_vs_llamacpp.py                 # C = 1, 8, 32; ~15-20 min on 2 cores
    .venv/bin/python benchmarks/bench_vs_llamacpp.py --quick         # smoke run, ~3 min
    .venv/bin/python benchmarks/bench_vs_llamacpp.py --build-only    # just build (or find) llama-server

llama-server comes from PATH, from --llama-server, or is built once from the llama.cpp sources
that the llama-cpp-python sdist vendors (pip downloads the sdist; cmake + ninja build only the
`llama-server` target, Release, CPU only, nothing fetched at build time) and cached under
${XDG_CACHE_HOME:-~/.cache}/loupe/. The build is tuned to this CPU (GGML_NATIVE) with llama.cpp's
AMX kernels compiled out: on a CPU that advertises AMX they crashed (general protection fault at
`ldtilecfg`) on an earlier machine of this kind.

Both servers listen on 127.0.0.1 and serve the bundled SmolLM2 GGUF file: loupe as `make serve`
starts it (defaults: one matmul thread per core), llama-server with as many threads, continuous
batching and `-np` slots for the highest concurrency, each slot with room for its prompt and
answer. Both stay up; the idle one costs nothing. Every round runs `loupe bench`'s load
(streaming /v1/completions, greedy, `ignore_eos`) on each server, the order alternating between
rounds, with the same prompts for both and fresh prompts every round (neither prefix cache
helps), each request on a fresh connection (llama-server closes its connection after every
streamed answer without saying so, and a client that reuses it fails now and then under load).
Every answer is --max-tokens long: the usage each server reports is checked, so output
tok/s counts the same work on both. Prints, per concurrency, medians over rounds of output tok/s,
TTFT and e2e p50/p90/p99 for both, and the per-round ratios loupe / llama-server: median and a
95% bootstrap interval of the median, with the lowest and highest.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from bench_ab import cpu_model
from bench_tracing import median_interval, wait_ready

from loupe.bench import run as run_load

LLAMA_CPP_PYTHON = "0.3.36"  # its sdist vendors the llama.cpp sources under vendor/llama.cpp
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary to cache
    "-DGGML_NATIVE=ON",  # what a user building on this machine gets
    "-DGGML_CCACHE=OFF",
    "-DGGML_OPENMP=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    # nothing may come from the network at build time: no HTTPS (no curl, no OpenSSL, no
    # BoringSSL fetch), no web UI (neither npm nor its prebuilt download), no FetchContent
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DFETCHCONTENT_FULLY_DISCONNECTED=ON",
]
# llama.cpp's AMX kernels crashed on an earlier machine whose CPU advertises AMX; explicit -mno-*
# flags win over -march=native in GCC and clang whatever their order.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.machine()


def cache_dir() -> Path:
    """Per llama.cpp version and CPU: a native build may not run on another CPU."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    cpu = hashlib.sha256((cpu_model() + cpu_flags()).encode()).hexdigest()[:8]
    return base / "loupe" / f"llama-server-{LLAMA_CPP_PYTHON}-{cpu}"


def cmake_flags() -> list[str]:
    flags = list(CMAKE_FLAGS)
    if platform.machine() in ("x86_64", "AMD64"):
        flags += [f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]
    return flags


def run_step(what: str, cmd: list[str], logfile: Path) -> float:
    """Run one build step, its output to `logfile`; seconds taken. On failure, the log's tail."""
    log(f"{what}: {' '.join(cmd[:4])}{' ...' if len(cmd) > 4 else ''}")
    start = time.perf_counter()
    with open(logfile, "a") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = logfile.read_text()[-3000:]
        raise RuntimeError(f"{what} failed (exit {rc}); the end of {logfile}:\n{tail}")
    return time.perf_counter() - start


def build_llama_server(jobs: int) -> Path:
    """llama-server from the llama-cpp-python sdist, built once and cached; its path."""
    folder = cache_dir()
    binary, info_file = folder / "llama-server", folder / "build-info.json"
    if binary.exists() and info_file.exists():
        info = json.loads(info_file.read_text())
        log(f"cached {binary} (built {info['date']} in {info['build_s']:.0f} s; "
            f"download {info['download_s']:.0f} s, configure {info['configure_s']:.0f} s)")
        return binary
    for tool in ("cmake", "ninja"):
        if not shutil.which(tool):
            raise RuntimeError(f"building llama-server needs {tool} on PATH (or pass --llama-server)")
    work = Path(tempfile.mkdtemp(prefix="loupe-llama-build-"))
    logfile = work / "build.log"
    try:
        download_s = run_step("pip download", [sys.executable, "-m", "pip", "download", "--no-binary", ":all:",
                                               "--no-deps", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d",
                                               str(work)], logfile)
        (sdist,) = work.glob("llama_cpp_python-*.tar.gz")
        prefix = f"{sdist.name[:-len('.tar.gz')]}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            tar.extractall(work, members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        source, build = work / prefix, work / "build"
        flags = cmake_flags()
        configure_s = run_step("cmake configure", ["cmake", "-S", str(source), "-B", str(build), "-G", "Ninja",
                                                   *flags], logfile)
        build_s = run_step(f"cmake build -j{jobs}", ["cmake", "--build", str(build), "--target", "llama-server",
                                                     "-j", str(jobs)], logfile)
        log(f"built llama-server in {build_s:.0f} s (configure {configure_s:.0f} s, download {download_s:.0f} s)")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build / "bin" / "llama-server", folder / "llama-server.partial")
        os.replace(folder / "llama-server.partial", binary)  # appears whole or not at all
        info = {"llama_cpp_python": LLAMA_CPP_PYTHON, "cmake_flags": flags, "jobs": jobs, "cpu": cpu_model(),
                "date": time.strftime("%Y-%m-%d %H:%M"), "download_s": round(download_s, 1),
                "configure_s": round(configure_s, 1), "build_s": round(build_s, 1)}
        info_file.write_text(json.dumps(info, indent=1) + "\n")
        return binary
    finally:
        shutil.rmtree(work, ignore_errors=True)


def find_llama_server(given: str | None, jobs: int) -> Path:
    """--llama-server, else one on PATH, else the cached build (built now if missing)."""
    if given:
        return Path(given)
    on_path = shutil.which("llama-server")
    if on_path:
        log(f"using llama-server from PATH: {on_path}")
        return Path(on_path)
    return build_llama_server(jobs)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """In the child before exec: SIGTERM when this script dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start(cmd: list[str], logfile: Path) -> subprocess.Popen:
    """A server in its own process group (stopped as a group), its output to `logfile`."""
    with open(logfile, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=die_with_parent)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, then SIGKILL to whatever of it is left after 30 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        proc.poll()
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def requests_per_run(concurrency: int, quick: bool) -> int:
    """Enough requests to hold the concurrency for a while: 8 at 1, 32 at 8, 64 at 32."""
    if quick:
        return max(2, concurrency)
    return max(8, 4 * concurrency) if concurrency <= 16 else 2 * concurrency


SERVERS = ("loupe", "llama-server")
KEYS = ("output_tokens_per_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "e2e_p50_s", "e2e_p90_s", "e2e_p99_s")


def load(url: str, model: str, concurrency: int, num: int, seed: int, max_tokens: int) -> dict:
    summary = asyncio.run(run_load(url, model, concurrency, num, seed, None, max_tokens, keepalive=False))
    if summary["failed"] or summary["wrong_lengths"]:
        raise RuntimeError(f"{url}: {summary['failed']} failed, {summary['wrong_lengths']} answers not "
                           f"{max_tokens} tokens long by their usage: {summary}")
    return summary


def report(results: dict, concurrencies: list[int]) -> None:
    print("\nmedians over rounds (each round's percentiles are over its requests); latencies in seconds")
    print(f"{'C':>3} {'server':>12} {'tok/s':>8} {'TTFT p50':>9} {'p90':>7} {'p99':>7} "
          f"{'e2e p50':>8} {'p90':>7} {'p99':>7}")
    for c in concurrencies:
        for name in SERVERS:
            m = {k: statistics.median(r[k] for r in results[name, c]) for k in KEYS}
            print(f"{c:>3} {name:>12} {m['output_tokens_per_s']:8.1f} {m['ttft_p50_s']:9.3f} {m['ttft_p90_s']:7.3f} "
                  f"{m['ttft_p99_s']:7.3f} {m['e2e_p50_s']:8.3f} {m['e2e_p90_s']:7.3f} {m['e2e_p99_s']:7.3f}")
    print("\nper-round ratios loupe / llama-server: median (95% bootstrap interval of the median) [lowest, highest]")
    print("(tok/s above 1: loupe faster; latency below 1: loupe faster)")
    shown = ("output_tokens_per_s", "ttft_p50_s", "ttft_p90_s", "e2e_p50_s", "e2e_p90_s", "e2e_p99_s")
    for c in concurrencies:
        cells = []
        for key in shown:
            ratios = [a[key] / b[key] for a, b in zip(results["loupe", c], results["llama-server", c], strict=True)]
            low, high = median_interval(ratios)
            cells.append(f"{key.removesuffix('_s').replace('output_tokens_per', 'tok/s')} "
                         f"{statistics.median(ratios):.3f} ({low:.3f}-{high:.3f}) [{min(ratios):.3f}, {max(ratios):.3f}]")
        print(f"C={c}:\n    " + "\n    ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=None, help="default 8 (2 with --quick)")
    parser.add_argument("--num-requests", type=int, default=None,
                        help="requests per run (default: 8 at C=1, 32 at C=8, 64 at C=32; C with --quick)")
    parser.add_argument("--max-tokens", type=int, default=64, help="every answer's length (ignore_eos)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="llama-server's threads (default: one per core, as loupe's matmuls)")
    parser.add_argument("--quick", action="store_true", help="a ~3-minute smoke run: 2 rounds, few requests")
    parser.add_argument("--llama-server", default=None, help="this binary (default: PATH's, else build one)")
    parser.add_argument("--build-only", action="store_true", help="build (or find) llama-server and stop")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs of the build")
    parser.add_argument("--json", default=None, help="also write every round's summaries to this file")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 8)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally below: stop the servers
    binary = find_llama_server(args.llama_server, args.jobs)
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    version_line = next((ln for ln in (version.stdout + version.stderr).splitlines() if ln.startswith("version")),
                        "version unknown")
    if binary.parent == cache_dir():
        version_line += f", the llama.cpp of llama-cpp-python {LLAMA_CPP_PYTHON}"
    if args.build_only:
        print(binary)
        return

    from loupe.model.gguf_loader import bundled_model_path

    gguf = bundled_model_path()
    slots = max(args.concurrency)
    per_slot = 256 + args.max_tokens  # prompts of 20-60 words are under 200 tokens
    print(f"{cpu_model()}, {os.cpu_count()} cores; 1-min load average {os.getloadavg()[0]:.2f} at start")
    print(f"model {gguf}")
    print(f"llama-server {binary} ({version_line}): {args.threads} threads, {slots} slots of {per_slot} tokens, "
          "continuous batching")
    print(f"loupe: `python -m loupe.launch_server` defaults ({os.cpu_count()} matmul threads; on this GGUF, "
          "int4 weights for up to 16 rows, float32 otherwise: --quantization auto)")
    logs = Path(tempfile.mkdtemp(prefix="loupe-vs-llamacpp-"))
    ports = {name: free_port() for name in SERVERS}
    commands = {
        "loupe": [sys.executable, "-m", "loupe.launch_server", "--port", str(ports["loupe"])],
        "llama-server": [str(binary), "-m", gguf, "--host", "127.0.0.1", "--port", str(ports["llama-server"]),
                         "-t", str(args.threads), "-tb", str(args.threads), "-np", str(slots),
                         "-c", str(slots * per_slot), "--cont-batching", "--no-webui"],
    }
    servers: dict[str, subprocess.Popen] = {}
    results: dict[tuple[str, int], list[dict]] = {(n, c): [] for n in SERVERS for c in args.concurrency}
    started = time.perf_counter()
    try:
        for name in SERVERS:  # one at a time: loading is not measured, but keep it off the other's start
            servers[name] = start(commands[name], logs / f"{name}.log")
            try:
                model = wait_ready(ports[name], servers[name])
            except RuntimeError as e:
                tail = (logs / f"{name}.log").read_text()[-2000:]
                raise RuntimeError(f"{name} did not start ({' '.join(commands[name])}); its log ends:\n{tail}") from e
            load(f"http://127.0.0.1:{ports[name]}", model, 4, 4, 10**6, args.max_tokens)  # warm-up
            commands[name].append(model)  # remember the name to send
            log(f"{name} ready on port {ports[name]} (log {logs / f'{name}.log'})")
        for r in range(rounds):
            for c in args.concurrency:
                num = args.num_requests or requests_per_run(c, args.quick)
                line = []
                for name in (SERVERS if r % 2 == 0 else SERVERS[::-1]):
                    summary = load(f"http://127.0.0.1:{ports[name]}", commands[name][-1], c, num, 1000 * r + c,
                                   args.max_tokens)
                    results[name, c].append(summary)
                    line.append(f"{name} {summary['output_tokens_per_s']:6.1f} tok/s, TTFT p50 "
                                f"{summary['ttft_p50_s']:.3f} s, e2e p50 {summary['e2e_p50_s']:.2f} s")
                log(f"round {r + 1}/{rounds} C={c} ({num} requests, load {os.getloadavg()[0]:.1f}): " + "; ".join(line))
    except BaseException:
        log(f"stopped; the servers' logs are in {logs}")
        raise
    finally:
        for proc in servers.values():
            stop(proc)
    print(f"\n{rounds} rounds, {args.max_tokens} output tokens per request (checked in every answer's usage), "
          f"run in {time.perf_counter() - started:.0f} s; 1-min load average {os.getloadavg()[0]:.2f} at end")
    report(results, args.concurrency)
    if args.json:
        Path(args.json).write_text(json.dumps({f"{n} C={c}": v for (n, c), v in results.items()}, indent=1))
    shutil.rmtree(logs, ignore_errors=True)


if __name__ == "__main__":
    main()
