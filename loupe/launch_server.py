"""Start a loupe server: `python -m loupe.launch_server [flags]` (same as `loupe serve`). The
processes it starts and supervises are drawn in docs/architecture.md ("Processes").
"""

from __future__ import annotations

import functools
import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections import Counter
from multiprocessing.connection import wait

import uvicorn

from loupe import ipc
from loupe.config import ServerArgs
from loupe.core import ModelInfo
from loupe.distributed.parallel import Ranks, free_address
from loupe.process import EXIT_LOST_PEER, Ready, StartFailed, configure_logging, run_child
from loupe.tracing.settings import ExportSettings, MetricsSettings, missing_packages
from loupe.tracing.spans import ChildStart

logger = logging.getLogger("loupe")
CHILD_STOP_SECONDS = 5
EXPORTER_START_S = 30  # a failed start waits this long at most for the span exporter, to send its trace
EXPORTER_RESTARTS = 5  # an exporter that keeps dying is left dead: serving comes first
# The children that serve no request, by name: what each is called in the log, what it exports.
EXPORTERS = {"exporter": ("span exporter", "spans"), "metrics": ("metrics exporter", "metrics")}


def served_model_name(args: ServerArgs) -> str:
    if args.served_model_name:
        return args.served_model_name
    if args.model_path is None:
        return "SmolLM2-135M-Instruct"
    return os.path.basename(os.path.normpath(args.model_path)).removesuffix(".gguf")


def listen_socket(host: str, port: int) -> socket.socket:
    """Bind the HTTP port before anything else starts, so that a busy port fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        reason = "is already in use" if e.errno == 98 else f"cannot be bound ({e.strerror})"
        raise SystemExit(f"loupe: port {port} on {host} {reason}") from None
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


def trace_control(args: ServerArgs):
    """Which requests are traced (tracing/sampling.py): the flags, then OTEL_TRACES_SAMPLER[_ARG]."""
    from loupe.tracing.sampling import TraceControl

    return TraceControl.from_env(args.trace_level, args.trace_sampling_ratio, args.trace_keep_errors,
                                 args.trace_keep_slower_than_ms, args.trace_keep_cancelled)


def tracing_settings(args: ServerArgs) -> ExportSettings | None:
    """Check that tracing can run before anything starts; one line and exit if not."""
    if not args.enable_tracing:
        return None
    missing = missing_packages()
    if missing:
        raise SystemExit(f"loupe: --enable-tracing needs OpenTelemetry: pip install {' '.join(missing)}")
    try:
        trace_control(args)
        return ExportSettings.from_env(args.otlp_endpoint)
    except ValueError as e:
        raise SystemExit(f"loupe: {e}") from None


def metrics_settings(spans: ExportSettings | None) -> MetricsSettings | None:
    """Check that OTEL_METRICS_EXPORTER=otlp can run before anything starts; one line and exit if
    not. `spans`: where spans go, when tracing is on."""
    try:
        settings = MetricsSettings.from_env(spans)
    except ValueError as e:
        raise SystemExit(f"loupe: {e}") from None
    missing = missing_packages() if settings is not None else []
    if missing:
        raise SystemExit(f"loupe: OTEL_METRICS_EXPORTER=otlp needs OpenTelemetry: pip install {' '.join(missing)}")
    return settings


def check_transfer_backend(args: ServerArgs) -> None:
    """A disaggregated server moving KV by NIXL needs it installed: one line and exit if not."""
    import importlib.util

    if args.disaggregation_mode != "null" and args.disaggregation_transfer_backend == "nixl" and (
            importlib.util.find_spec("nixl") is None):
        from loupe.disagg.nixl import INSTALL

        raise SystemExit(f"loupe: --disaggregation-transfer-backend nixl needs NIXL: {INSTALL} "
                         "(or use --disaggregation-transfer-backend tcp)")


def replica_ranks(args: ServerArgs, dp_rank: int) -> list[Ranks]:
    """The ranks of one replica that run on this machine (its TP x PP ranks split over nodes)."""
    per_node = args.tp_size * args.pp_size // args.nnodes
    first = args.node_rank * per_node
    return [Ranks.of_world_rank(w, args.tp_size, args.pp_size, dp_rank, args.dp_size)
            for w in range(first, first + per_node)]


def replica_address(args: ServerArgs, dp_rank: int) -> str | None:
    """Where a replica's ranks meet: --dist-init-addr (port + replica), else a free local port."""
    if args.tp_size * args.pp_size == 1:
        return None
    if args.dist_init_addr is None:
        return free_address()
    host, _, port = args.dist_init_addr.rpartition(":")
    return f"{host}:{int(port) + dp_rank}"


def share_cores_politely(args: ServerArgs) -> None:
    """The two servers of a prefill/decode pair often share a machine's cores. OpenMP threads
    spin at every barrier before they sleep (libgomp: 300,000 turns), so while one server runs
    a prompt the other's decode steps wait on threads the first one's spinning starves: two
    concurrent 2k-token prompts through a pair took 3-4x one alone. Spinning 10,000 turns
    keeps a single stream's step time (18.6 against 18.4 ms here) and brings that to 2x
    (BENCHMARKS.md). Children inherit it; an operator's own OpenMP setting wins."""
    if args.disaggregation_mode != "null" and not {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & set(os.environ):
        os.environ["GOMP_SPINCOUNT"] = "10000"


class Supervisor:
    """Starts the children, waits for them to be ready, and watches them while serving."""

    def __init__(self, args: ServerArgs, endpoints: ipc.Endpoints, tracing: ExportSettings | None,
                 metrics: MetricsSettings | None = None):
        from loupe.detokenizer import DetokenizerProcess
        from loupe.dp_controller import DataParallelController
        from loupe.scheduler.process import SchedulerProcess
        from loupe.tracing.exporter import ExporterProcess, server_resource
        from loupe.tracing.metrics_exporter import MetricsExporterProcess

        self.ctx = mp.get_context("spawn")
        share_cores_politely(args)
        self.log_level = args.log_level
        self.children: list[tuple[str, mp.Process, object]] = []
        self.starts: dict[str, ChildStart] = {}  # what each child's start took, for the start-up trace
        self.exporters = {}  # name -> how to start it
        resource = server_resource() if tracing is not None or metrics is not None else None
        if tracing is not None:
            self.exporters["exporter"] = (ExporterProcess, tracing, endpoints, resource)
        if metrics is not None:
            self.exporters["metrics"] = (MetricsExporterProcess, metrics, endpoints, resource)
        self.restarts: Counter[str] = Counter()
        serves_http = args.node_rank == 0
        for name, build in self.exporters.items():  # first, so that the others' spans have somewhere to go
            self.start(name, *build)
        if args.dp_size > 1 and serves_http:
            self.start("DP controller", DataParallelController, args.load_balance_method, args.traces("dp"), endpoints)
        for dp_rank in range(args.dp_size):
            address = replica_address(args, dp_rank)
            for ranks in replica_ranks(args, dp_rank):
                self.start(ranks.process_name(), SchedulerProcess, args, endpoints, ranks, address)
        if serves_http:
            self.start("detokenizer", DetokenizerProcess, args.model_path, args.traces("detokenizer"), endpoints)
        self.stopping = False
        self.exit_code = 0

    def start(self, name: str, build, *args) -> None:
        """A child process running `build(*args).run_forever()` (process.run_child)."""
        reader, writer = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=run_child, args=(name, self.log_level, writer, build, *args),
                                name=f"loupe-{name}", daemon=True)
        spawned = time.perf_counter_ns()
        proc.start()
        self.starts[name] = ChildStart(name, proc.pid, spawned)
        writer.close()
        self.children.append((name, proc, reader))

    def wait_ready(self) -> list[Ready]:
        """Each child's Ready; raises RuntimeError naming the first child that failed (ranks
        wait for one another, so all are watched at once)."""
        infos = []
        pending = {reader: (name, proc) for name, proc, reader in self.children}
        while pending:
            wait([*pending, *(proc.sentinel for _, proc in pending.values())])
            for reader, (name, proc) in list(pending.items()):
                if not reader.poll() and proc.is_alive():
                    continue
                try:
                    info = reader.recv() if reader.poll() else None
                except EOFError:  # it died before it could say why
                    info = None
                if info is None or isinstance(info, StartFailed):
                    self.starts[name].failed = True
                if info is None:
                    proc.join()
                    raise RuntimeError(f"the {name} process exited during start-up (exit code {proc.exitcode})")
                if isinstance(info, StartFailed):
                    raise RuntimeError(f"{name}: {info.error}")
                self._heard_ready(name, info)
                infos.append(info)
                del pending[reader]
        return infos

    def await_exporter(self, timeout: float) -> None:
        """Wait up to `timeout` s for a span exporter still starting: a start that failed
        before it served still gets its trace out."""
        for name, _, reader in self.children:
            if name != "exporter" or self.starts[name].ready is not None:
                continue
            try:
                info = reader.recv() if reader.poll(timeout) else None
            except EOFError:
                info = None
            if isinstance(info, Ready):
                self._heard_ready(name, info)

    def _heard_ready(self, name: str, info: Ready) -> None:
        self.starts[name].ready, self.starts[name].phases = time.perf_counter_ns(), info.phases

    def watch(self, on_death, on_exporter_death=None) -> None:
        """Until a serving child dies (then `on_death(message, exit code)`) or the server
        stops. An exporter is not a serving child: when one dies it is started again, up to
        EXPORTER_RESTARTS times (the span exporter's death: `on_exporter_death(restarted)`)."""
        while True:
            sentinels = {proc.sentinel: (name, proc) for name, proc, _ in self.children}
            ready = wait(list(sentinels))
            if self.stopping:
                return
            name, proc = sentinels[ready[0]]
            proc.join()
            if name not in self.exporters:
                break
            self.children = [child for child in self.children if child[1] is not proc]
            restart = self.restarts[name] < EXPORTER_RESTARTS
            called, what = EXPORTERS[name]
            if restart:
                self.restarts[name] += 1
                logger.warning("loupe: the %s (pid %d) died with exit code %s; starting it again%s", called, proc.pid,
                               proc.exitcode, " (the spans it held are lost, counted as dropped)" if name == "exporter"
                               else "")
                self.start(name, *self.exporters[name])
            else:
                logger.error("loupe: the %s (pid %d) died with exit code %s, %d times now; not starting it again: "
                             "serving goes on, %s are no longer exported", called, proc.pid, proc.exitcode,
                             EXPORTER_RESTARTS + 1, what)
            if name == "exporter" and on_exporter_death is not None:
                on_exporter_death(restart)
        what = ("lost contact with another rank of its replica (on another node, or stopped)"
                if proc.exitcode == EXIT_LOST_PEER else f"died with exit code {proc.exitcode}")
        on_death(f"loupe: the {name} process (pid {proc.pid}) {what}; shutting down", proc.exitcode)

    def stop(self, before_exporter=None) -> None:
        """Stop the serving children, run `before_exporter`, then stop the exporters last so
        that they export every span the others flushed on their way out, and the last metrics."""
        self.stopping = True
        serving = [p for name, p, _ in self.children if name not in self.exporters]
        exporters = [p for name, p, _ in self.children if name in self.exporters]
        for group in (serving, exporters):
            for proc in group:
                if proc.is_alive():
                    proc.terminate()
            for proc in group:
                proc.join(CHILD_STOP_SECONDS)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
            if before_exporter is not None and group is serving:
                before_exporter()


class DrainingServer(uvicorn.Server):
    """uvicorn, but SIGTERM or Ctrl-C drains first: new requests get 503 (and /health says
    so), the running ones get --shutdown-timeout to finish. A second signal stops without waiting."""

    def __init__(self, config: uvicorn.Config, manager, timeout: float):
        super().__init__(config)
        self.manager, self.timeout = manager, timeout

    def handle_exit(self, sig: int, frame) -> None:
        loop = self.manager.loop
        if self.manager.draining or loop is None or not self.manager.ready:
            super().handle_exit(sig, frame)
            return
        self.manager.draining = True  # at once: the drain itself starts on the loop
        loop.call_soon_threadsafe(lambda: loop.create_task(self.drain_then_exit(sig)))

    async def drain_then_exit(self, sig: int) -> None:
        try:
            await self.manager.drain(self.timeout)
        finally:
            super().handle_exit(sig, None)


def launch(args: ServerArgs) -> int:
    """Serve until a signal or a child's death; returns the process exit code."""
    started = time.perf_counter_ns()
    configure_logging(args.log_level, "loupe")
    tracing = tracing_settings(args)
    check_transfer_backend(args)
    if args.node_rank > 0:
        return run_other_node(args, tracing)
    metrics_export = metrics_settings(tracing)
    sock = listen_socket(args.host, args.port)
    endpoints = ipc.Endpoints.create(args.dp_size)
    supervisor = Supervisor(args, endpoints, tracing, metrics_export)
    from loupe.model.loader import load_tokenizer
    from loupe.server.app import create_app
    from loupe.server.metrics import Metrics, MetricsPusher
    from loupe.server.tokenizer_manager import TokenizerManager
    from loupe.tracing.spans import RequestTracer, open_tracer, record_startup

    metrics = Metrics()
    pusher = MetricsPusher(metrics, endpoints.metrics, metrics_export.interval_ms / 1000) if metrics_export else None
    tracer = None
    if tracing is not None:  # its environment was checked by tracing_settings
        tracer = open_tracer(RequestTracer, True, endpoints.tracing, include_content=args.trace_include_content,
                             control=trace_control(args), own_spans=args.traces("request"))
    manager = TokenizerManager(endpoints, metrics, tracer, args.log_requests)
    name = served_model_name(args)
    app = create_app(manager, args, metrics, name)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=False, timeout_graceful_shutdown=5)
    server = DrainingServer(config, manager, args.shutdown_timeout)

    def fail(message: str, *_child_exit_code) -> None:  # node 0 exits 1 whatever the child's code
        logger.error(message)
        supervisor.exit_code = 1
        if manager.loop is not None:  # the requests in flight are answered, with what happened
            manager.loop.call_soon_threadsafe(manager.fail_all, message.removeprefix("loupe: "))
        server.should_exit = True

    def trace_start(error: str | None = None) -> None:
        """The start as one trace, recorded on the event loop's thread, which alone uses the
        recorder (a failed start's spans go with the flush at exit)."""
        if tracer is None:
            return
        attributes = {"server.address": args.host, "server.port": args.port, "gen_ai.response.model": name,
                      "tp_size": args.tp_size, "pp_size": args.pp_size, "dp_size": args.dp_size,
                      "disaggregation.role": args.disaggregation_mode}
        record = functools.partial(record_startup, tracer.recorder, started, list(supervisor.starts.values()),
                                   attributes, error)
        if manager.loop is not None:
            manager.loop.call_soon_threadsafe(record)
        else:
            record()

    def bring_up() -> None:
        try:
            tokenizer = load_tokenizer(args.model_path)
            infos = supervisor.wait_ready()
        except (RuntimeError, ValueError) as e:
            if not supervisor.stopping:  # else a signal stopped the start-up: not a failure
                if tracer is not None:
                    supervisor.await_exporter(EXPORTER_START_S)
                    trace_start(str(e))
                fail(f"loupe: cannot start: {e}")
            return
        model = next(ready.info for ready in infos if isinstance(ready.info, ModelInfo))
        trace_start()
        manager.set_ready(tokenizer, model)
        logger.info("serving %s at http://%s:%d", name, args.host, args.port)
        supervisor.watch(fail, metrics.exporter_died)

    threading.Thread(target=bring_up, name="supervisor", daemon=True).start()
    # uvicorn handles SIGINT/SIGTERM itself, then re-raises them under the handlers it found:
    # make those harmless so that the children are stopped below rather than orphaned.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)

    def before_exporters() -> None:  # what the serving side still has for them
        if manager.tracer is not None:
            manager.tracer.flush()
        if pusher is not None:
            pusher.close()

    try:
        server.run(sockets=[sock])
    finally:
        supervisor.stop(before_exporter=before_exporters)
        shutil.rmtree(endpoints.folder, ignore_errors=True)
    return supervisor.exit_code


def run_other_node(args: ServerArgs, tracing: ExportSettings | None) -> int:
    """A machine other than node 0: only its scheduler ranks (and a span exporter) run here;
    node 0 serves HTTP and drives them. Stops on a signal or when a rank stops."""
    import zmq

    endpoints = ipc.Endpoints.create(args.dp_size)
    supervisor = Supervisor(args, endpoints, tracing)
    done = threading.Event()

    def finish(message: str, exit_code: int) -> None:
        if exit_code == EXIT_LOST_PEER:  # node 0 stopped (or died, and says so itself)
            logger.info("node %d: the ranks on node 0 are gone; stopping", args.node_rank)
        else:
            logger.error(message)
            supervisor.exit_code = 1
        done.set()

    def bring_up() -> None:
        try:
            supervisor.wait_ready()
        except RuntimeError as e:
            if not supervisor.stopping:
                finish(f"loupe: cannot start: {e}", 1)
            return
        logger.info("node %d of %d: ranks ready, driven from %s", args.node_rank, args.nnodes, args.dist_init_addr)
        supervisor.watch(finish)

    threading.Thread(target=bring_up, name="supervisor", daemon=True).start()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    # The span exporter reports its counters to the HTTP process; here nobody shows them.
    sink = ipc.bind(zmq.Context.instance(), zmq.PULL, endpoints.manager)
    try:
        while not done.is_set():
            while sink.poll(500):
                sink.recv()
    finally:
        supervisor.stop()
        shutil.rmtree(endpoints.folder, ignore_errors=True)
    return supervisor.exit_code


def main(argv: list[str] | None = None) -> None:
    args = ServerArgs.from_cli(argv)
    sys.exit(launch(args))


if __name__ == "__main__":
    main()
