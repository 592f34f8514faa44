"""The scheduler process: receive requests, step the engine, send out new tokens."""

from __future__ import annotations

import logging
import os
import time
from multiprocessing.connection import Connection

import torch
import zmq

from loupe import ipc
from loupe.config import ServerArgs
from loupe.distributed.dp_controller import replica_inbox
from loupe.distributed.parallel import Comm, Ranks
from loupe.process import EXIT_LOST_PEER, setup_child
from loupe.scheduler.request import FinishReason, Req, SamplingParams
from loupe.scheduler.scheduler import Scheduler, resolve_device
from loupe.tracing.recorder import Recorder
from loupe.tracing.spans import SchedulerTracer

logger = logging.getLogger(__name__)


class SchedulerProcess:
    """One rank's scheduler. The driver rank (TP 0, PP 0) takes requests from its inbox, shares
    them with the other ranks of its replica and sends the outputs; every rank steps alike."""

    def __init__(self, args: ServerArgs, ipc_dir: str, ranks: Ranks, init_address: str | None = None):
        if args.ranks_per_node > 1:  # ranks on one machine share its cores instead of each taking all
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.ranks_per_node))
        device = resolve_device(args.device, ranks.dp_rank * ranks.world_size + ranks.world_rank)
        if ranks.world_size > 1:
            logger.info("rank %d of %d: meeting the others at %s", ranks.world_rank, ranks.world_size, init_address)
        self.comm = Comm(ranks, init_address, device)
        self.ranks = ranks
        self.scheduler = Scheduler(args, comm=self.comm)
        self.recorder = None
        if args.enable_tracing:
            self.recorder = Recorder(ipc.endpoint(ipc_dir, "tracing"), "Scheduler", ranks.labels(), ranks.attributes())
            self.scheduler.tracer = SchedulerTracer(self.recorder)
        self.num_received = 0
        self.last_stats = None
        if not ranks.is_driver:
            return
        ctx = zmq.Context()
        self.requests = ipc.bind(ctx, zmq.PULL, ipc.endpoint(ipc_dir, replica_inbox(args.dp_size, ranks.dp_rank)))
        self.to_detokenizer = ipc.connect(ctx, zmq.PUSH, ipc.endpoint(ipc_dir, "detokenizer"))
        self.stats_to = [ipc.connect(ctx, zmq.PUSH, ipc.endpoint(ipc_dir, "manager"))]
        if args.dp_size > 1:
            self.stats_to.append(ipc.connect(ctx, zmq.PUSH, ipc.endpoint(ipc_dir, "dp-controller-stats")))

    def run_forever(self) -> None:
        driver = self.ranks.is_driver
        try:
            while True:
                idle = not self.scheduler.has_work
                # The driver waits at most a second, so the other ranks never wait longer.
                messages = self.comm.share(self.receive(1000 if idle else 0) if driver else None)
                outputs = self.handle(messages)
                updated = self.scheduler.step()
                if driver:
                    outputs += [self.output(req) for req in updated]
                    if outputs:
                        ipc.send(self.to_detokenizer, ipc.TokenBatch(outputs))
                    self.send_stats()
                if idle and self.recorder:
                    self.recorder.maybe_flush()
        finally:  # shutdown: close every request's spans and hand them over
            self.scheduler.abort_all()
            if self.recorder:
                self.recorder.flush()

    def receive(self, timeout_ms: int) -> list:
        messages = []
        if self.requests.poll(timeout_ms):
            while True:
                try:
                    messages.append(ipc.recv(self.requests, zmq.NOBLOCK))
                except zmq.Again:
                    break
        return messages

    def handle(self, messages: list) -> list[ipc.RequestOutput]:
        outputs = []
        for message in messages:
            if isinstance(message, ipc.TokenizedRequest):
                self.num_received += 1
                try:
                    sampling = SamplingParams.from_dict(message.sampling)
                    req = self.scheduler.make_request(message.rid, message.input_ids, sampling)
                except ValueError as e:  # the manager checks first; this is the last line of defence
                    outputs.append(ipc.RequestOutput(message.rid, [], "abort", error=str(e)))
                    continue
                if message.trace is not None:
                    req.trace = message.trace
                    if self.scheduler.tracer:
                        self.scheduler.tracer.on_arrival(req, message.trace)
                self.scheduler.add_request(req)
            elif isinstance(message, ipc.AbortRequest):
                req = self.scheduler.abort(message.rid)
                if req is not None:
                    outputs.append(self.output(req))
        return outputs

    @staticmethod
    def output(req: Req) -> ipc.RequestOutput:
        first, req.sent_first_output = not req.sent_first_output, True
        aborted = req.finish_reason == FinishReason.ABORT
        out = ipc.RequestOutput(
            rid=req.rid,
            new_token_ids=[] if aborted else req.output_ids[-1:],
            finish_reason=req.finish_reason.value if req.finish_reason else None,
            matched_stop=req.matched_stop,
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=len(req.output_ids),
            cached_tokens=req.cached_tokens or 0,
            queue_seconds=(req.admit_time - req.arrival_time) if first and req.admit_time else None,
            stop=req.sampling.stop if first else None,
            trace=req.trace if first else None,
        )
        if req.finished:
            _, out.prefill_seconds, out.decode_seconds = req.stage_seconds()
            out.events = req.events
        return out

    def send_stats(self) -> None:
        s = self.scheduler
        stats = ipc.SchedulerStats(len(s.running), len(s.waiting), s.kv_used_tokens, s.max_total_tokens,
                                   self.num_received, self.ranks.dp_rank)
        if stats != self.last_stats:
            for sock in self.stats_to:
                ipc.send(sock, stats)
            self.last_stats = stats


def run_scheduler_process(args: ServerArgs, ipc_dir: str, ready: Connection, ranks: Ranks,
                          init_address: str | None = None) -> None:
    setup_child(ranks.process_name(), args.log_level)
    try:
        proc = SchedulerProcess(args, ipc_dir, ranks, init_address)
    except Exception as e:  # a bad model path, out of memory...: tell the launcher in one line
        logger.debug("scheduler failed to start", exc_info=True)
        ready.send({"error": str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"})
        return
    s = proc.scheduler
    ready.send({
        "limits": s.limits,
        "max_total_tokens": s.max_total_tokens,
        "load_seconds": round(s.load_seconds, 2),
        "device": str(s.device),
        "dtype": str(next(s.model.model.parameters()).dtype).removeprefix("torch."),
        "model_path": s.model.path,
    })
    logger.info("ready: %d KV tokens on %s, model loaded in %.1f s", s.max_total_tokens, s.device, s.load_seconds)
    start = time.perf_counter()
    try:
        proc.run_forever()
    except RuntimeError as e:
        if proc.ranks.world_size == 1 or "gloo" not in str(e) and "NCCL" not in str(e):
            raise
        logger.warning("lost contact with another rank of this replica (%s); stopping", str(e).split("\n")[0])
        logging.shutdown()
        os._exit(EXIT_LOST_PEER)  # skip interpreter teardown: the broken process group can abort it
    finally:
        logger.info("stopping after %.0f s", time.perf_counter() - start)
