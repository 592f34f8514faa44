"""The scheduler process: receive requests, step the engine, send out new tokens."""

from __future__ import annotations

import logging
import os
import time

import torch
import zmq

from loupe import ipc
from loupe.config import ExchangeSettings, SchedulerSettings, ServerArgs, WorkerSettings
from loupe.core import FinishReason, ModelInfo, TokenizedRequest
from loupe.distributed.parallel import Comm, Ranks
from loupe.process import EXIT_LOST_PEER, HeapTrimmer
from loupe.runner.worker import Worker, resolve_device
from loupe.scheduler.exchange import exchange_for
from loupe.scheduler.request import Req
from loupe.scheduler.scheduler import Scheduler
from loupe.tracing.spans import SchedulerTracer, open_tracer

logger = logging.getLogger(__name__)


class SchedulerProcess:
    """One rank's scheduler. The driver rank (TP 0, PP 0) takes requests from its inbox, shares
    them with the other ranks of its replica and sends the outputs; every rank steps alike."""

    def __init__(self, args: ServerArgs, endpoints: ipc.Endpoints, ranks: Ranks, init_address: str | None = None):
        if args.ranks_per_node > 1:  # ranks on one machine share its cores instead of each taking all
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.ranks_per_node))
        device = resolve_device(args.device, ranks.dp_rank * ranks.world_size + ranks.world_rank)
        if ranks.world_size > 1:
            logger.info("rank %d of %d: meeting the others at %s", ranks.world_rank, ranks.world_size, init_address)
        self.comm = Comm(ranks, init_address, device)
        self.ranks = ranks
        worker = Worker(args.settings(WorkerSettings), comm=self.comm)
        mode = args.disaggregation_mode
        self.tracer = open_tracer(SchedulerTracer, args.traces("scheduler"), endpoints.tracing, ranks,
                                  prefill_server=mode == "prefill", backend=args.disaggregation_transfer_backend,
                                  handoff=args.traces("disaggregation"))
        self.scheduler = Scheduler(worker, args.settings(SchedulerSettings),
                                   exchange_for(args.settings(ExchangeSettings), worker), self.tracer)
        self.ready_info: ModelInfo = worker.info
        self.startup_phases = worker.phases
        logger.info("ready: %d KV tokens on %s, model loaded in %.1f s", worker.limits.max_total_tokens,
                    worker.device, worker.load_seconds)
        self.num_received = 0
        self.dispatch = ipc.Dispatch({TokenizedRequest: self.add, ipc.AbortRequest: self.abort})
        self.last_stats = None
        self.trim_heap = HeapTrimmer()
        if not ranks.is_driver:
            return
        ctx = zmq.Context()
        self.requests = ipc.bind(ctx, zmq.PULL, endpoints.replica(ranks.dp_rank))
        self.to_detokenizer = ipc.connect(ctx, zmq.PUSH, endpoints.detokenizer)
        self.stats_to = [ipc.connect(ctx, zmq.PUSH, endpoints.manager)]
        if args.dp_size > 1:
            self.stats_to.append(ipc.connect(ctx, zmq.PUSH, endpoints.dp_stats))

    def run_forever(self) -> None:
        start = time.perf_counter()
        try:
            self.serve()
        except RuntimeError as e:
            if self.ranks.world_size == 1 or "gloo" not in str(e) and "NCCL" not in str(e):
                raise
            logger.warning("lost contact with another rank of this replica (%s); stopping", str(e).split("\n")[0])
            logging.shutdown()
            os._exit(EXIT_LOST_PEER)  # skip interpreter teardown: the broken process group can abort it
        finally:
            logger.info("stopping after %.0f s", time.perf_counter() - start)

    def serve(self) -> None:
        driver = self.ranks.is_driver
        try:
            while True:
                idle = not self.scheduler.has_work
                # The driver waits at most a second, so the other ranks never wait longer; while
                # only KV is awaited from another server, its sockets wake the wait too (a NIXL
                # transfer's end wakes none: then the wait is short).
                wait_ms = 0 if self.scheduler.runnable else 1 if self.scheduler.exchange.busy else 1000
                messages = self.comm.share(self.receive(wait_ms) if driver else None)
                outputs = [out for out in map(self.dispatch, messages) if out is not None]  # aborts answer
                updated = self.scheduler.step()
                if driver:
                    outputs += [self.output(req) for req in updated]
                    if outputs:
                        ipc.send(self.to_detokenizer, ipc.TokenBatch(outputs))
                    self.send_stats()
                if idle and self.tracer:
                    self.tracer.maybe_flush()
                self.trim_heap(working=not idle)
        finally:  # shutdown: close every request's spans and hand them over
            self.scheduler.abort_all()
            if self.tracer:
                self.tracer.flush()

    def receive(self, timeout_ms: int) -> list:
        """The requests that came, waiting up to `timeout_ms` for one (or for another server's KV)."""
        if timeout_ms:
            poller = zmq.Poller()
            for sock in (self.requests, *self.scheduler.exchange.sockets):
                poller.register(sock, zmq.POLLIN)
            poller.poll(timeout_ms)
        messages = []
        while True:
            try:
                messages.append(ipc.recv(self.requests, zmq.NOBLOCK))
            except zmq.Again:
                return messages

    def add(self, request: TokenizedRequest) -> None:
        self.num_received += 1
        self.scheduler.add_request(request)

    def abort(self, message: ipc.AbortRequest) -> ipc.RequestOutput | None:
        req = self.scheduler.abort(message.rid)
        return self.output(req) if req is not None else None

    @staticmethod
    def output(req: Req) -> ipc.RequestOutput:
        first, req.sent_first_output = not req.sent_first_output, True
        aborted = req.finish_reason == FinishReason.ABORT
        out = ipc.RequestOutput(
            rid=req.rid,
            token_ids=[] if aborted else req.output_ids[-1:],
            logprobs=(req.output_logprobs[-1:] if not aborted else []) if req.sampling.logprobs else None,
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=len(req.output_ids),
            cached_tokens=req.cached_tokens or 0,
            queue_seconds=(req.admit_time - req.arrival_time) if first and req.admit_time else None,
            stop=req.sampling.stop if first else None,
            trace=req.trace if first else None,
        )
        if req.finished:
            _, prefill, decode = req.stage_seconds()
            out.result = ipc.RequestResult(req.finish_reason, req.matched_stop, req.error, prefill_seconds=prefill,
                                           decode_seconds=decode, events=req.events)
            if req.kv_transfer:
                out.result.kv_bytes = req.kv_bytes
                out.result.kv_seconds = (req.kv_transfer[1] - req.kv_transfer[0]) / 1e9
        return out

    def send_stats(self) -> None:
        s = self.scheduler
        stats = ipc.SchedulerStats(len(s.running), len(s.waiting), s.kv.used_tokens, s.worker.limits.max_total_tokens,
                                   self.num_received, self.ranks.dp_rank, s.kv.cached_tokens, s.exchange.rejected())
        if stats != self.last_stats:
            for sock in self.stats_to:
                ipc.send(sock, stats)
            self.last_stats = stats
