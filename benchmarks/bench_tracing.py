"""What tracing costs.

1. Micro: the serving-path cost of recording one slice (a `Recorder.span` call), of adding
   one request to a decode-step fan-out, and of the branch taken when tracing is off; and
   the span exporter's CPU time per span (unpickling, queueing, encoding, sending over
   OTLP gRPC to a receiver in another process) for level-3 batches, against the former
   path of an SDK ReadableSpan per span encoded and sent by the SDK's exporter (grpcio).
2. Live: the bundled model at a given concurrency, tracing off vs levels 1, 2 and 3, and
   (--sampling) level 3 at a ratio of 0.01 without and with tail keep rules (spans
   exported over OTLP gRPC to a stand-in backend in another process), in rounds that
   alternate the configurations; medians of throughput, median latency and CPU time per
   output token (all the server's processes, the span exporter included), as ratios to off.
   CPU time is the steadier measure on a shared machine: it counts the work tracing adds
   even when a noisy neighbour moves the wall-clock figures by more than the overhead.
3. Census: CPU time and wake-ups per thread of one loaded server and the backend.

    .venv/bin/python benchmarks/bench_tracing.py [--rounds 3] [--concurrency 32] [--num-requests 64]
    .venv/bin/python benchmarks/bench_tracing.py --live-only --levels 3 --rounds 24
    .venv/bin/python benchmarks/bench_tracing.py --live-only --levels none --sampling --rounds 16
    .venv/bin/python benchmarks/bench_tracing.py --exporter-only [--profile]
    .venv/bin/python benchmarks/bench_tracing.py --census --levels 3
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import glob
import multiprocessing as mp
import os
import pstats
import random
import statistics
import sys
import time

import httpx
import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for harness
from harness import LiveServer  # noqa: E402
from loupe import ipc  # noqa: E402
from loupe.bench import run as run_load  # noqa: E402
from loupe.core import TraceContext  # noqa: E402
from loupe.tracing.ids import new_span_id  # noqa: E402
from loupe.tracing.recorder import SERVER, Fanout, Recorder, SpanRecord  # noqa: E402
from loupe.tracing.sampling import TraceControl  # noqa: E402
from loupe.tracing.settings import ExportSettings  # noqa: E402
from loupe.tracing.spans import RequestTracer  # noqa: E402


def micro(n: int = 200_000) -> dict[str, float]:
    """Nanoseconds per operation on the serving path (the recorder's socket is never flushed).
    The plain tuple with a fresh span id is what a slice cost before records had names."""
    recorder = Recorder("ipc:///tmp/loupe-bench-unused", "Bench")
    attrs = {"num_tokens": 8, "batch_size": 32}
    ctx = TraceContext(1, 2, 3)
    start = time.perf_counter_ns()
    for _ in range(n):
        t = time.perf_counter_ns()
        recorder.slice(ctx, 7, "prefill_chunk", t, t + 10, attrs)
    span_ns = (time.perf_counter_ns() - start) / n
    plain: list = []
    start = time.perf_counter_ns()
    for _ in range(n):
        t = time.perf_counter_ns()
        plain.append((1, new_span_id(), 7, "prefill_chunk", t, t + 10, attrs, None, None, 1, None, False))
    tuple_ns = (time.perf_counter_ns() - start) / n
    recorder.spans.clear()
    parents: list = []
    events: list = []
    scheduled = ("schedule", 0, {"batch_id": 1})
    start = time.perf_counter_ns()
    for i in range(n):
        parents.append((1, i, i))
        events.append(scheduled)
    fanout_ns = (time.perf_counter_ns() - start) / n
    unsampled = RequestTracer(recorder, TraceControl(3, sampling_ratio=0.0), include_content=False)
    root_attributes = {"gen_ai.operation.name": "chat", "gen_ai.response.model": "m", "gen_ai.request.model": "m"}
    start = time.perf_counter_ns()
    for _ in range(n // 10):
        trace = unsampled.start("chatcmpl-1", None, None, root_attributes)
        assert not trace.recording and trace.ctx.traceparent
    unsampled_ns = (time.perf_counter_ns() - start) / (n // 10)
    tracer = None
    start = time.perf_counter_ns()
    for _ in range(n):
        if tracer:
            pass
    off_ns = (time.perf_counter_ns() - start) / n
    return {"slice (Recorder.slice: span id, SpanRecord, clock)": span_ns,
            "the same as a plain tuple (former)": tuple_ns,
            "decode step, per request (fan-out with its step; schedule event)": fanout_ns,
            "tracing off (one branch)": off_ns,
            "an unsampled request, all it costs (ids, decision, traceparent)": unsampled_ns}


def level3_batch(rng: random.Random, t0: int, fanouts: int = 4, concurrency: int = 32) -> ipc.SpanBatch:
    """What a level-3 server sends in ~50 ms: one finished request's spans (root with
    attributes and events, thread spans, stages, slices) and `fanouts` decode steps of
    `concurrency` requests each, pickled as the recorder sends them."""
    trace_id, root, thread = rng.getrandbits(128), rng.getrandbits(64), rng.getrandbits(64)
    root_attrs = {"rid": "r1", "gen_ai.request.id": "r1", "gen_ai.request.max_tokens": 128, "stream": True,
                  "gen_ai.usage.prompt_tokens": 40, "gen_ai.usage.completion_tokens": 128,
                  "gen_ai.response.finish_reasons": ["length"], "gen_ai.latency.e2e": 1.25,
                  "gen_ai.latency.time_to_first_token": 0.05}
    events = [("first_token", t0 + 50, {"completion_tokens": 1}), ("token_milestone", t0 + 90, {"completion_tokens": 10}),
              ("token_milestone", t0 + 400, {"completion_tokens": 100})]
    thread_attrs = {"thread_label": "Scheduler", "host_id": "0a1b2c3d", "pid": 4242, "tp_rank": 0}
    spans = [SpanRecord(trace_id, root, None, "Req r1", t0, t0 + 500, root_attrs, events, kind=SERVER,
                        tracestate="vendor=1"),
             SpanRecord(trace_id, thread, root, "Scheduler [TP 0] (host:0a1b2c3d | pid:4242)", t0, t0 + 480,
                        thread_attrs)]
    for name, attrs in (("queue", None), ("prefill", {"num_tokens": 40, "cached_tokens": 0}),
                        ("prefill_chunk", {"num_tokens": 40, "start_position": 0, "batch_size": 32}),
                        ("decode", {"completion_tokens": 128}), ("tokenize", {"num_tokens": 40}),
                        ("detokenize", {"num_tokens": 128, "busy_seconds": 0.002})):
        spans.append(SpanRecord(trace_id, rng.getrandbits(64), thread, name, t0 + 1, t0 + 9, attrs))
    steps = [Fanout("decode_step", t0 + 10 * i, t0 + 10 * i + 9, {"batch_size": concurrency},
              [(rng.getrandbits(128), rng.getrandbits(64), i) for _ in range(concurrency)]) for i in range(fanouts)]
    return ipc.SpanBatch(time.time_ns() - t0, spans, steps, 0)


class SdkPath:
    """The exporter's former path, for comparison: an SDK ReadableSpan per span (built on
    receipt), encoded and sent by the SDK's own OTLP/gRPC exporter."""

    def __init__(self, endpoint: str) -> None:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace import Event, ReadableSpan
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        from loupe.tracing.exporter import make_resource

        self.trace, self.Event, self.ReadableSpan = trace, Event, ReadableSpan
        self.exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True)
        self.resource, self.scope = make_resource(), InstrumentationScope("loupe")
        self.flags = trace.TraceFlags(trace.TraceFlags.SAMPLED)
        self.queue: list = []

    def span(self, record: SpanRecord, offset: int):
        (trace_id, span_id, parent_id, name, start, end, attributes, events, error, kind, tracestate,
         remote_parent) = record
        t = self.trace
        state = t.TraceState.from_header([tracestate]) if tracestate else None
        parent = t.SpanContext(trace_id, parent_id, remote_parent, self.flags, state) if parent_id else None
        return self.ReadableSpan(
            name=name, context=t.SpanContext(trace_id, span_id, False, self.flags, state), parent=parent,
            resource=self.resource, attributes=attributes, instrumentation_scope=self.scope,
            events=[self.Event(n, a, ts + offset) for n, ts, a in events or ()],
            kind=t.SpanKind.SERVER if kind == SERVER else t.SpanKind.INTERNAL,
            status=t.Status(t.StatusCode.ERROR, error) if error else t.Status(t.StatusCode.UNSET),
            start_time=start + offset, end_time=end + offset)

    def add(self, batch: ipc.SpanBatch) -> None:
        self.queue.extend(self.span(r, batch.offset_ns) for r in batch.spans)
        for name, start, end, attributes, parents in batch.fanouts:
            self.queue.extend(self.span(SpanRecord(trace_id, new_span_id(), parent_id, name, start, end, attributes),
                                        batch.offset_ns) for trace_id, parent_id, _ in parents)

    def export_full(self, size: int, everything: bool = False) -> None:
        while len(self.queue) >= size or (everything and self.queue):
            batch, self.queue = self.queue[:size], self.queue[size:]
            self.exporter.export(batch)


class LoupePath:
    """The span exporter process's own receive, queue and export code, run in this process."""

    def __init__(self, endpoint: str, size: int) -> None:
        from loupe.tracing.exporter import ExporterProcess

        self.proc = ExporterProcess(ExportSettings(endpoint, "grpc", 500, size, 1 << 30), ipc.Endpoints.create(1))
        self.add = self.proc.add

    def export_full(self, size: int, everything: bool = False) -> None:
        queue = self.proc.queue
        while len(queue) >= size or (everything and queue):
            self.proc.export([queue.popleft() for _ in range(min(size, len(queue)))])


def exporter_cpu(repeats: int = 5, num_batches: int = 150, size: int = 64,
                 profile: bool = False) -> tuple[dict[str, list[float]], dict[str, pstats.Stats]]:
    """CPU µs of this process per span: pickled level-3 `SpanBatch`es unpickled, queued,
    encoded and exported in batches of `size` over gRPC to a receiver in another process
    (gRPC's own threads count; the receiver does not). Alternates the paths per repeat.
    With `profile`, also a cProfile (of process CPU time) of one more run of each path."""
    receiver, port = start_receiver()
    endpoint = f"http://127.0.0.1:{port}"
    rng = random.Random(0)
    frames = [ipc.encode(level3_batch(rng, 1_000_000_000 + i * 50_000_000)) for i in range(num_batches)]
    first = ipc.decode(frames[0])
    num_spans = num_batches * (len(first.spans) + sum(len(f.parents) for f in first.fanouts))
    paths = {"SDK ReadableSpan + SDK encoding (former)": SdkPath(endpoint),
             "direct protobuf (loupe)": LoupePath(endpoint, size)}

    def run(path) -> None:
        for frame in frames:
            path.add(ipc.decode(frame))
            path.export_full(size)
        path.export_full(size, everything=True)

    results: dict[str, list[float]] = {name: [] for name in paths}
    profiles: dict[str, pstats.Stats] = {}
    try:
        for path in paths.values():
            run(path)  # warm: connect, first calls
        for _ in range(repeats):
            for name, path in paths.items():
                start = time.process_time()
                run(path)
                results[name].append((time.process_time() - start) * 1e6 / num_spans)
        if profile:
            for name, path in paths.items():
                profiler = cProfile.Profile(time.process_time)
                profiler.runcall(run, path)
                profiles[name] = pstats.Stats(profiler)
    finally:
        receiver.kill()
    return results, profiles


def hook_share(steps: int = 60, concurrency: int = 32) -> dict[str, float]:
    """In-process: the engine decoding `concurrency` requests with a level-3 tracer, timing
    every tracer call; what the hooks cost per forward step and as a share of the step."""
    from loupe import Engine
    from loupe.core import SamplingParams, TokenizedRequest
    from loupe.tracing.spans import SchedulerTracer

    tracer = SchedulerTracer(Recorder("ipc:///tmp/loupe-bench-hooks", "Scheduler", {"TP": 0}))
    spent = [0]

    def timed(method):
        def wrapper(*args, **kwargs):
            start = time.perf_counter_ns()
            try:
                return method(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter_ns() - start
        return wrapper

    for name in ("arrived", "admitted", "forward", "retracted", "finished"):
        setattr(tracer, name, timed(getattr(tracer, name)))
    engine = Engine(max_running_requests=concurrency, tracer=tracer)
    scheduler = engine.scheduler
    sampling = SamplingParams(max_new_tokens=steps, temperature=0, ignore_eos=True)
    for i in range(concurrency):
        prompt = engine.tokenizer.encode(f"Request number {i} asks where time goes.")
        scheduler.add_request(TokenizedRequest(f"r{i}", prompt, sampling, TraceContext(i + 1, i + 1000, 3)))
    start = time.perf_counter_ns()
    while scheduler.has_work:
        scheduler.step()
    total = time.perf_counter_ns() - start
    n = scheduler.num_forward_steps
    return {"steps": n, "step_ms": total / n / 1e6, "hooks_us_per_step": spent[0] / n / 1e3,
            "hooks_share_pct": 100 * spent[0] / total}


def receiver_process(port_out) -> None:
    """The OTLP backend. It stands in for one on another machine, so it costs this machine
    as little as a gRPC server can: one thread (h2 framing on an asyncio loop, where a grpcio
    server hands each call across ~10 thread wake-ups, ~0.5 ms of CPU more per call here),
    answering every Export without parsing it, at the lowest CPU priority. A backend's own
    work is not loupe's overhead."""
    import h2.config
    import h2.connection
    import h2.events

    from loupe.process import setup_child, yield_to_serving

    setup_child("otlp receiver")  # dies with the benchmark, however that ends
    yield_to_serving()
    empty_response = b"\x00" + (0).to_bytes(4, "big")  # an uncompressed, empty ExportTraceServiceResponse

    class Connection(asyncio.Protocol):
        def connection_made(self, transport) -> None:
            self.transport = transport
            self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
            self.h2.initiate_connection()
            transport.write(self.h2.data_to_send())

        def data_received(self, data: bytes) -> None:
            for event in self.h2.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    self.h2.send_headers(event.stream_id, [(":status", "200"), ("content-type", "application/grpc")])
                    self.h2.send_data(event.stream_id, empty_response)
                    self.h2.send_headers(event.stream_id, [("grpc-status", "0")], end_stream=True)
            self.transport.write(self.h2.data_to_send())

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(Connection, "127.0.0.1", 0)
        port_out.send(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    asyncio.run(serve())


def start_receiver() -> tuple[mp.Process, int]:
    """The stand-in OTLP backend in its own process, and the port it listens on."""
    ctx = mp.get_context("spawn")
    read, write = ctx.Pipe(duplex=False)
    receiver = ctx.Process(target=receiver_process, args=(write,), daemon=True)
    receiver.start()
    return receiver, read.recv()


SAMPLED = ["--trace-sampling-ratio", "0.01"]
# Rules that keep next to nothing here (no request fails, none takes a minute): what is
# measured is recording every request and holding its spans until the verdict discards them.
KEEPING = [*SAMPLED, "--trace-keep-errors", "--trace-keep-slower-than-ms", "60000"]
# Held spans may fill half the exporter's queue: at level 3 that needs about a span per token
# of every request in flight (32 here, of up to ~250 tokens), which the default 2048 is not.
HOLDING_ROOM = {"OTEL_BSP_MAX_QUEUE_SIZE": "16384"}


def tracing_flags(level: int | None, *extra: str) -> list[str] | None:
    return None if level is None else ["--trace-level", str(level), *extra]


def bench_server(port: int, tracing: list[str] | None, otlp_port: int, model_threads: int | None = None,
                 env: dict | None = None) -> LiveServer:
    """A server on the bundled model, its decode step compiled as served by default (not
    started): tracing off (None) or on with these flags (and `env`)."""
    flags = [] if tracing is None else ["--enable-tracing", "--otlp-endpoint", f"127.0.0.1:{otlp_port}", *tracing]
    env = {**(env or {}), **({"OMP_NUM_THREADS": str(model_threads)} if model_threads else {})}
    return LiveServer(*flags, port=port, env=env, compile=True, ready_timeout=600)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU time used so far by a server (its main process `pid` and every child) and, of that,
    by its span exporter (the one child that runs at the lowest priority)."""
    tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    total = sum(sum(p.cpu_times()[:2]) for p in tree)
    exporter = sum(sum(p.cpu_times()[:2]) for p in tree if p.nice() > 0)
    return total, exporter


def tracing_metrics(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("loupe_tracing")}


def span_counts(port: int) -> tuple[int, int, int]:
    values = tracing_metrics(port)
    return tuple(int(values[f"loupe_tracing_spans_{kind}_total"]) for kind in ("exported", "dropped", "failed"))


def tail_counts(port: int) -> tuple[int, int]:
    """Traces kept and discarded by the tail rules, all reasons."""
    values = tracing_metrics(port)
    return tuple(int(sum(v for k, v in values.items() if k.startswith(f"loupe_tracing_traces_{kind}_total")))
                 for kind in ("kept", "discarded"))


def thread_use(pid: int) -> dict[str, tuple[float, int]]:
    """Per thread name (same-named threads summed) of one process: CPU ms, exact (from
    schedstat, where psutil counts 10 ms ticks), and voluntary context switches: how often
    its threads went to sleep, so roughly how often something had to wake them."""
    use: dict[str, tuple[float, int]] = {}
    for task in glob.glob(f"/proc/{pid}/task/*"):
        try:
            with open(f"{task}/comm") as f:
                name = f.read().strip()
            with open(f"{task}/schedstat") as f:
                cpu_ms = int(f.read().split()[0]) / 1e6
            with open(f"{task}/status") as f:
                sleeps = next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))
        except (OSError, StopIteration):  # a thread that ended meanwhile
            continue
        ms, n = use.get(name, (0.0, 0))
        use[name] = (ms + cpu_ms, n + sleeps)
    return use


def census(level: int | None, concurrency: int, num_requests: int, model_threads: int | None) -> None:
    """One loaded server: CPU and wake-ups per second of every thread of its processes and
    of the stand-in backend, to see where tracing's side work goes (on a busy machine each
    wake-up takes a core from the model's threads)."""
    receiver, otlp_port = start_receiver()
    server = bench_server(31190, tracing_flags(level), otlp_port, model_threads)
    try:
        server.start().wait_ready()
        url = server.base_url
        asyncio.run(run_load(url, "SmolLM2-135M-Instruct", 4, 4, 99, None))  # warm
        procs = {f"server main {server.pid}": server.pid, f"otlp receiver {receiver.pid}": receiver.pid}
        for child in psutil.Process(server.pid).children(recursive=True):
            procs[f"{'exporter' if child.nice() > 0 else 'child'} {child.pid}"] = child.pid
        before = {label: thread_use(pid) for label, pid in procs.items()}
        start = time.monotonic()
        summary = asyncio.run(run_load(url, "SmolLM2-135M-Instruct", concurrency, num_requests, 0, None))
        seconds = time.monotonic() - start
        after = {label: thread_use(pid) for label, pid in procs.items()}
    finally:
        server.stop()
        receiver.kill()
    print(f"tracing {'off' if level is None else f'level {level}'}: {summary['output_tokens_per_s']:.1f} tok/s; "
          f"per second of load ({seconds:.1f} s): CPU ms and wake-ups, per process and thread name")
    for label in procs:
        rows = {name: ((ms - before[label].get(name, (0, 0))[0]) / seconds,
                       (n - before[label].get(name, (0, 0))[1]) / seconds) for name, (ms, n) in after[label].items()}
        print(f"  {label:<22} {sum(r[0] for r in rows.values()):8.2f} ms {sum(r[1] for r in rows.values()):7.1f} wake-ups")
        for name, (ms, wakes) in sorted(rows.items(), key=lambda item: -item[1][0]):
            if ms >= 0.05 or wakes >= 0.5:
                print(f"      {name:<18} {ms:8.2f} ms {wakes:7.1f} wake-ups")


def median_interval(ratios: list[float], confidence: float = 0.95, resamples: int = 10_000) -> tuple[float, float]:
    """A bootstrap interval for the median of per-round ratios (fixed seed: the same data
    give the same interval)."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    tail = (1 - confidence) / 2
    return medians[int(tail * resamples)], medians[int((1 - tail) * resamples) - 1]


def live(rounds: int, concurrency: int, num_requests: int, levels: list[int], model_threads: int | None,
         sampling: bool = False) -> None:
    receiver, otlp_port = start_receiver()
    configs = {"off": None, **{f"level {level}": tracing_flags(level) for level in levels}}
    if sampling:  # at level 3, the costliest to record
        configs.update({"ratio 0.01": tracing_flags(3, *SAMPLED), "0.01+keep": tracing_flags(3, *KEEPING)})
    envs = {"0.01+keep": HOLDING_ROOM}
    ports = {name: 31100 + i for i, name in enumerate(configs)}
    servers = {name: bench_server(ports[name], flags, otlp_port, model_threads, envs.get(name))
               for name, flags in configs.items()}
    results: dict[str, list[dict]] = {name: [] for name in configs}
    try:
        for server in servers.values():
            server.start()
        for name in configs:
            servers[name].wait_ready()
            asyncio.run(run_load(f"http://127.0.0.1:{ports[name]}", "SmolLM2-135M-Instruct", 4, 4, 99, None))  # warm
        for r in range(rounds):
            order = list(configs) if r % 2 == 0 else list(reversed(configs))  # alternate, to spread drift
            for name in order:
                cpu_before, exporter_before = cpu_seconds(servers[name].pid)
                summary = asyncio.run(run_load(f"http://127.0.0.1:{ports[name]}", "SmolLM2-135M-Instruct",
                                               concurrency, num_requests, r, None))
                tokens = summary["output_tokens_per_s"] * summary["wall_s"]
                cpu_after, exporter_after = cpu_seconds(servers[name].pid)
                summary["cpu_ms_per_token"] = (cpu_after - cpu_before) * 1000 / tokens
                summary["exporter_cpu_pct"] = 100 * (exporter_after - exporter_before) / (cpu_after - cpu_before)
                assert summary["failed"] == 0, summary
                results[name].append(summary)
                print(f"round {r + 1} {name:>8}: {summary['output_tokens_per_s']:7.1f} tok/s, "
                      f"e2e p50 {summary['e2e_p50_s']:.3f} s, {summary['cpu_ms_per_token']:.2f} CPU ms/token",
                      file=sys.stderr)
        time.sleep(2)  # the last batches leave
        spans = {name: span_counts(ports[name]) for name in configs if configs[name] is not None}
        kept = {name: tail_counts(ports[name]) for name in envs if name in configs}
    finally:
        for server in servers.values():
            server.stop()
        receiver.kill()
    def median(name: str, key: str) -> float:
        return statistics.median(s[key] for s in results[name])

    def paired(name: str, key: str) -> list[float]:
        """Per round, this config's figure over off's: neighbours in time share the noise."""
        return sorted(a[key] / b[key] for a, b in zip(results[name], results["off"], strict=True))

    print(f"\nlive: concurrency {concurrency}, {num_requests} requests per run, {rounds} rounds, "
          f"{model_threads or os.cpu_count()} matmul threads on {os.cpu_count()} cores, medians; "
          f"load average now {os.getloadavg()[0]:.1f}")
    print(f"{'config':>8} {'tok/s':>8} {'vs off':>8} {'e2e p50 s':>10} {'vs off':>8} {'CPU ms/tok':>11} "
          f"{'vs off':>8} {'exporter CPU %':>15}")
    for name in configs:
        tps, p50, cpu, exp = (median(name, k) for k in ("output_tokens_per_s", "e2e_p50_s", "cpu_ms_per_token",
                                                        "exporter_cpu_pct"))
        print(f"{name:>8} {tps:8.1f} {tps / median('off', 'output_tokens_per_s'):8.3f} {p50:10.3f} "
              f"{p50 / median('off', 'e2e_p50_s'):8.3f} {cpu:11.2f} {cpu / median('off', 'cpu_ms_per_token'):8.3f} "
              f"{exp:15.2f}")
    print("spans exported / dropped / failed: " + ", ".join(f"{name} {'/'.join(map(str, counts))}"
                                                           for name, counts in spans.items()))
    for name, counts in kept.items():
        print(f"{name}: traces kept / discarded by tail rules: {counts[0]} / {counts[1]}")
    print("\nper-round ratios to off: median (95% bootstrap interval of the median) [lowest, highest]:")
    for name in list(configs)[1:]:
        parts = []
        for key, label in (("output_tokens_per_s", "tok/s"), ("e2e_p50_s", "e2e p50"), ("cpu_ms_per_token", "CPU/tok")):
            r = paired(name, key)
            low, high = median_interval(r)
            parts.append(f"{label} {statistics.median(r):.3f} ({low:.3f}-{high:.3f}) [{r[0]:.3f}, {r[-1]:.3f}]")
        print(f"{name:>8}: " + ",  ".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--levels", default="1,2,3", help="the tracing levels to compare with off, e.g. 3 "
                        "(none: only off and, with --sampling, the sampled configurations)")
    parser.add_argument("--sampling", action="store_true", help="live: also level 3 at a sampling ratio of 0.01, "
                        "and the same with both tail keep rules")
    parser.add_argument("--model-threads", type=int, help="the servers' matmul threads (OMP_NUM_THREADS); "
                        "default: one per core")
    parser.add_argument("--micro-only", action="store_true")
    parser.add_argument("--live-only", action="store_true", help="only the live servers")
    parser.add_argument("--exporter-only", action="store_true", help="only the span exporter's CPU per span")
    parser.add_argument("--profile", action="store_true", help="with the exporter figures, a cProfile of each path")
    parser.add_argument("--census", action="store_true", help="only per-thread CPU and wake-ups of one loaded "
                        "server, off and at each of --levels")
    args = parser.parse_args()
    levels = [int(level) for level in args.levels.split(",") if level not in ("", "none")]
    if args.census:
        for level in [None, *levels]:
            census(level, args.concurrency, args.num_requests, args.model_threads)
        return
    if args.live_only:
        return live(args.rounds, args.concurrency, args.num_requests, levels, args.model_threads, args.sampling)
    print("exporter CPU per span (µs, median of 5; level-3 batches, OTLP gRPC in batches of 64):")
    results, profiles = exporter_cpu(profile=args.profile)
    for name, values in results.items():
        print(f"  {name:<40} {statistics.median(values):8.2f} µs   ({', '.join(f'{v:.2f}' for v in values)})")
    for name, stats in profiles.items():
        print(f"\nprofile of the exporter, {name} (process CPU time):")
        stats.sort_stats("tottime").print_stats(14)
    if args.exporter_only:
        return
    print("micro (ns per operation on the serving path):")
    for name, ns in micro().items():
        print(f"  {name:<52} {ns:8.1f} ns")
    hooks = hook_share(concurrency=args.concurrency)
    print(f"scheduler hooks at level 3, {args.concurrency} requests decoding: {hooks['hooks_us_per_step']:.1f} us "
          f"per forward step of {hooks['step_ms']:.1f} ms = {hooks['hooks_share_pct']:.3f}% ({hooks['steps']} steps)")
    if not args.micro_only:
        live(args.rounds, args.concurrency, args.num_requests, levels, args.model_threads, args.sampling)


if __name__ == "__main__":
    main()
