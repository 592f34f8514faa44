"""loupe against llama.cpp's `llama-server` on the same GGUF file, side by side in one run.

    .venv/bin/python benchmarks/bench_vs_llamacpp.py                 # every load, 6 rounds: ~40 min on 2 cores
    .venv/bin/python benchmarks/bench_vs_llamacpp.py --quick         # smoke run, ~5 min
    .venv/bin/python benchmarks/bench_vs_llamacpp.py --loads stream  # one load (stream, chat, long)
    .venv/bin/python benchmarks/bench_vs_llamacpp.py --build-only    # just build (or find) llama-server

llama-server comes from PATH, from --llama-server, or is built once from the llama.cpp sources
that the llama-cpp-python sdist vendors (pip downloads the sdist; cmake + ninja build only the
`llama-server` target, Release, CPU only, nothing fetched at build time) and cached under
${XDG_CACHE_HOME:-~/.cache}/loupe/. The build is tuned to this CPU (GGML_NATIVE) with llama.cpp's
AMX kernels compiled out: on a CPU that advertises AMX they crashed (general protection fault at
`ldtilecfg`) on an earlier machine of this kind.

Both servers listen on 127.0.0.1 and serve the bundled SmolLM2 GGUF file: loupe as `make serve`
starts it (defaults: one matmul thread per core, the int4 decode step compiled at start),
llama-server with as many threads, continuous batching and `-np` slots for the highest
concurrency, each slot with room for the longest prompt and its answer. Both stay up; the idle
one costs nothing. Three loads, each `loupe bench`'s (greedy, `ignore_eos`, fresh prompts every
round so neither prefix cache helps, the same prompts for both servers), every run's order
alternating between rounds:

- stream: streamed /v1/completions of 20-60-word prompts at C = 1, 8, 32, each on a fresh
  connection (llama-server closes its connection after every streamed answer without saying
  so, and a client that reuses it fails now and then under load);
- chat: /v1/chat/completions of the same prompts answered whole, on kept-alive connections
  (which llama-server serves much faster than streams); no first token to time;
- long: streamed completions of ~1,000- and ~2,000-token prompts at C = 1 and 4: time to
  first token and prefill tokens/s (prompt tokens over TTFT).

Every answer is --max-tokens long: the usage each server reports is checked, so output tok/s
counts the same work on both. Prints the CPU (model, AMX/VNNI/BF16 flags) and the memory
bandwidth measured here, then per load and concurrency medians over rounds and the per-round
ratios loupe / llama-server: median, a 95% bootstrap interval of the median, lowest and highest.
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
from dataclasses import dataclass
from pathlib import Path

import httpx
from bench_ab import cpu_model
from bench_tracing import median_interval

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for harness
from harness import LiveProcess, LiveServer, free_port  # noqa: E402
from loupe.bench import PROMPT_WORDS  # noqa: E402
from loupe.bench import run as run_load  # noqa: E402
from loupe.model import kernels  # noqa: E402

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
    return kernels.cpu_flags() or platform.machine()


def cpu_features() -> str:
    """The instruction sets that decide these kernels' speed, as /proc/cpuinfo names them."""
    flags = set(cpu_flags().split())
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
    return " ".join(f for f in wanted if f in flags) or "none of AVX2, AVX-512, VNNI, BF16, AMX"


def memory_bandwidth_gbs(megabytes: int = 256, tries: int = 7) -> float:
    """Copy bandwidth with PyTorch's threads (bytes read plus written per second), best of `tries`."""
    import torch

    src = torch.ones(megabytes << 18)  # float32: 4 bytes each
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(tries):
        started = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - started)
    return 2 * src.nbytes / best / 1e9


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


def served_model(url: str) -> str:
    """The name an OpenAI-compatible server at `url` serves its model under."""
    return httpx.get(url + "/v1/models", timeout=10, trust_env=False).json()["data"][0]["id"]


@dataclass(frozen=True)
class Load:
    name: str
    chat: bool  # chat answered whole, on kept-alive connections; else streamed completions
    words: tuple[int, int]  # each prompt's words, about a token each
    concurrencies: tuple[int, ...]

    def requests(self, concurrency: int, quick: bool) -> int:
        """Enough to hold the concurrency for a while: 8 at 1, 32 at 8, 64 at 32; long prompts 3 at
        1, 8 at 4."""
        if quick:
            return max(2, concurrency)
        if self.words[0] > 500:
            return 2 * concurrency if concurrency > 1 else 3
        return max(8, 4 * concurrency) if concurrency <= 16 else 2 * concurrency


LOADS = {
    "stream": [Load("stream", False, PROMPT_WORDS, (1, 8, 32))],
    "chat": [Load("chat", True, PROMPT_WORDS, (1, 8, 32))],
    "long": [Load("long 1k", False, (950, 970), (1, 4)), Load("long 2k", False, (1900, 1940), (1, 4))],
}
SERVERS = ("loupe", "llama-server")
KEYS = ("output_tokens_per_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "e2e_p50_s", "e2e_p90_s", "e2e_p99_s",
        "prefill_tokens_per_s_p50", "prompt_tokens_mean")


def load(url: str, model: str, workload: Load, concurrency: int, num: int, seed: int, max_tokens: int) -> dict:
    summary = asyncio.run(run_load(url, model, concurrency, num, seed, None, max_tokens, keepalive=workload.chat,
                                   chat=workload.chat, words=workload.words))
    if summary["failed"] or summary["wrong_lengths"]:
        raise RuntimeError(f"{url}: {summary['failed']} failed, {summary['wrong_lengths']} answers not "
                           f"{max_tokens} tokens long by their usage: {summary}")
    return summary


def cell(value: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}.{digits}f}"


def report(results: dict, loads: list[Load]) -> None:
    print("\nmedians over rounds (each round's percentiles are over its requests); latencies in seconds; "
          "no TTFT for chat answered whole")
    print(f"{'load':>8} {'C':>3} {'server':>12} {'tok/s':>8} {'TTFT p50':>9} {'p90':>7} {'p99':>7} "
          f"{'e2e p50':>8} {'p90':>7} {'p99':>7} {'prompt':>7} {'prefill tok/s':>14}")
    for workload in loads:
        for c in workload.concurrencies:
            for name in SERVERS:
                rounds = results[name, workload.name, c]
                m = {k: None if rounds[0][k] is None else statistics.median(r[k] for r in rounds) for k in KEYS}
                print(f"{workload.name:>8} {c:>3} {name:>12} {m['output_tokens_per_s']:8.1f} "
                      f"{cell(m['ttft_p50_s'], 9, 3)} {cell(m['ttft_p90_s'], 7, 3)} {cell(m['ttft_p99_s'], 7, 3)} "
                      f"{m['e2e_p50_s']:8.3f} {m['e2e_p90_s']:7.3f} {m['e2e_p99_s']:7.3f} "
                      f"{m['prompt_tokens_mean']:7.0f} {cell(m['prefill_tokens_per_s_p50'], 14, 1)}")
    print("\nper-round ratios loupe / llama-server: median (95% bootstrap interval of the median) [lowest, highest]")
    print("(tok/s above 1: loupe faster; latency below 1: loupe faster)")
    shown = ("output_tokens_per_s", "ttft_p50_s", "ttft_p90_s", "e2e_p50_s", "e2e_p90_s", "e2e_p99_s",
             "prefill_tokens_per_s_p50")
    for workload in loads:
        for c in workload.concurrencies:
            pairs = list(zip(results["loupe", workload.name, c], results["llama-server", workload.name, c], strict=True))
            cells = []
            for key in shown:
                if pairs[0][0][key] is None or pairs[0][1][key] is None:
                    continue
                ratios = [a[key] / b[key] for a, b in pairs]
                low, high = median_interval(ratios)
                label = key.removesuffix("_s").replace("output_tokens_per", "tok/s").replace("_tokens_per_s_p50", " tok/s")
                cells.append(f"{label} {statistics.median(ratios):.3f} ({low:.3f}-{high:.3f}) "
                             f"[{min(ratios):.3f}, {max(ratios):.3f}]")
            print(f"{workload.name} C={c}:\n    " + "\n    ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loads", nargs="+", choices=list(LOADS), default=list(LOADS), help="which loads to run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=None,
                        help="only these concurrencies (default: each load's own)")
    parser.add_argument("--rounds", type=int, default=None, help="default 6 (2 with --quick)")
    parser.add_argument("--num-requests", type=int, default=None,
                        help="requests per run (default: 8 at C=1, 32 at C=8, 64 at C=32, 3 and 8 for long "
                             "prompts; C with --quick)")
    parser.add_argument("--max-tokens", type=int, default=64, help="every answer's length (ignore_eos)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="llama-server's threads (default: one per core, as loupe's matmuls)")
    parser.add_argument("--quick", action="store_true", help="a ~5-minute smoke run: 2 rounds, few requests")
    parser.add_argument("--llama-server", default=None, help="this binary (default: PATH's, else build one)")
    parser.add_argument("--build-only", action="store_true", help="build (or find) llama-server and stop")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs of the build")
    parser.add_argument("--json", default=None, help="also write every round's summaries to this file")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 6)
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

    loads = [Load(w.name, w.chat, w.words, tuple(c for c in w.concurrencies if c in args.concurrency)
                  if args.concurrency else w.concurrencies) for name in args.loads for w in LOADS[name]]
    loads = [w for w in loads if w.concurrencies]
    gguf = bundled_model_path()
    slots = max(c for w in loads for c in w.concurrencies)
    per_slot = int(max(w.words[1] for w in loads) * 1.1) + 64 + args.max_tokens  # ~1.04 tokens a word
    print(f"{cpu_model()}, {os.cpu_count()} cores ({cpu_features()}); memory bandwidth "
          f"{memory_bandwidth_gbs():.1f} GB/s (copy); 1-min load average {os.getloadavg()[0]:.2f} at start")
    print(f"model {gguf}")
    print(f"llama-server {binary} ({version_line}): {args.threads} threads, {slots} slots of {per_slot} tokens, "
          "continuous batching")
    matmuls = ("every decode step through loupe's int4 VNNI kernel" if kernels.int4_vnni_wanted() else
               "PyTorch's int4 kernel for up to 16 rows, bfloat16 or float32 for more")
    print(f"loupe: `python -m loupe.launch_server` defaults ({os.cpu_count()} matmul threads; on this GGUF, "
          f"int4 weights, {matmuls}: --quantization auto; the int4 decode step compiled)")
    logs = Path(tempfile.mkdtemp(prefix="loupe-vs-llamacpp-"))
    llama_port = free_port()
    servers = {
        "loupe": LiveServer(log_path=str(logs / "loupe.log"), compile=True, ready_timeout=600),  # no flags: defaults
        "llama-server": LiveProcess([binary, "-m", gguf, "--host", "127.0.0.1", "--port", llama_port,
                                     "-t", args.threads, "-tb", args.threads, "-np", slots, "-c", slots * per_slot,
                                     "--cont-batching", "--no-webui"], name="llama-server", port=llama_port,
                                    ready_path="/v1/models", log_dir=str(logs), ready_timeout=600),
    }
    models: dict[str, str] = {}
    results: dict[tuple[str, str, int], list[dict]] = {(n, w.name, c): [] for n in SERVERS for w in loads
                                                       for c in w.concurrencies}
    started = time.perf_counter()
    try:
        for name in SERVERS:  # one at a time: loading is not measured, but keep it off the other's start
            began, server = time.perf_counter(), servers[name]
            try:
                server.start().wait_ready()
                models[name] = served_model(server.base_url)
                load(server.base_url, models[name], loads[0], 4, 4, 10**6, args.max_tokens)  # warm-up
            except RuntimeError as e:
                raise RuntimeError(f"{name} did not start ({' '.join(server.command)}); its log ends:\n"
                                   f"{server.log()[-2000:]}") from e
            log(f"{name} ready on port {server.port} and warmed up {time.perf_counter() - began:.0f} s after its "
                f"start (log {server.log_path})")
        for r in range(rounds):
            for workload in loads:
                for c in workload.concurrencies:
                    num = args.num_requests or workload.requests(c, args.quick)
                    line = []
                    for name in (SERVERS if r % 2 == 0 else SERVERS[::-1]):
                        summary = load(servers[name].base_url, models[name], workload, c, num,
                                       1000 * r + c, args.max_tokens)
                        results[name, workload.name, c].append(summary)
                        ttft = "-" if summary["ttft_p50_s"] is None else f"{summary['ttft_p50_s']:.3f} s"
                        line.append(f"{name} {summary['output_tokens_per_s']:6.1f} tok/s, TTFT p50 {ttft}, "
                                    f"e2e p50 {summary['e2e_p50_s']:.2f} s")
                    log(f"round {r + 1}/{rounds} {workload.name} C={c} ({num} requests, load "
                        f"{os.getloadavg()[0]:.1f}): " + "; ".join(line))
    except BaseException:
        log(f"stopped; the servers' logs are in {logs}")
        raise
    finally:
        for server in servers.values():
            server.stop()
    print(f"\n{rounds} rounds, {args.max_tokens} output tokens per request (checked in every answer's usage), "
          f"run in {time.perf_counter() - started:.0f} s; 1-min load average {os.getloadavg()[0]:.2f} at end")
    report(results, loads)
    if args.json:
        Path(args.json).write_text(json.dumps({f"{n} {w} C={c}": v for (n, w, c), v in results.items()}, indent=1))
    shutil.rmtree(logs, ignore_errors=True)


if __name__ == "__main__":
    main()
