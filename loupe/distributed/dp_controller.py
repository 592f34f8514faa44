"""The data-parallel controller: one process in front of `--dp-size` scheduler replicas.

It takes the place of the scheduler's inbox — the tokenizer manager sends to it exactly as
it would to a lone scheduler — and hands each request to one replica: in turn
(`round_robin`) or to the one with the fewest requests (`least_loaded`, counting those
still on their way). Aborts go to every replica; the ones that do not hold the request
ignore them.
"""

from __future__ import annotations

import logging
import time
from multiprocessing.connection import Connection

import zmq

from loupe import ipc
from loupe.config import ServerArgs
from loupe.process import setup_child
from loupe.tracing.ids import new_span_id
from loupe.tracing.recorder import Recorder

logger = logging.getLogger(__name__)


def replica_inbox(dp_size: int, dp_rank: int) -> str:
    """The ZMQ endpoint name a scheduler pulls requests from."""
    return "scheduler" if dp_size == 1 else f"scheduler-dp{dp_rank}"


class DataParallelController:
    def __init__(self, args: ServerArgs, ipc_dir: str):
        self.method = args.load_balance_method
        ctx = zmq.Context()
        self.inbox = ipc.bind(ctx, zmq.PULL, ipc.endpoint(ipc_dir, "scheduler"))
        self.stats_inbox = ipc.bind(ctx, zmq.PULL, ipc.endpoint(ipc_dir, "dp-controller-stats"))
        self.replicas = [ipc.connect(ctx, zmq.PUSH, ipc.endpoint(ipc_dir, replica_inbox(args.dp_size, d)))
                         for d in range(args.dp_size)]
        self.dispatched = [0] * args.dp_size  # requests sent to each replica, ever
        self.stats: list[ipc.SchedulerStats | None] = [None] * args.dp_size
        self.next = 0
        self.recorder = Recorder(ipc.endpoint(ipc_dir, "tracing"), "DP Controller") if args.enable_tracing else None

    def run_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self.inbox, zmq.POLLIN)
        poller.register(self.stats_inbox, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll(1000))
                while self.stats_inbox in ready and self.stats_inbox.poll(0):
                    stats = ipc.recv(self.stats_inbox)
                    self.stats[stats.dp_rank] = stats
                while self.inbox in ready and self.inbox.poll(0):
                    self.route(ipc.recv(self.inbox))
                if self.recorder:
                    self.recorder.maybe_flush()
        finally:
            if self.recorder:
                self.recorder.flush()

    def route(self, message) -> None:
        if isinstance(message, ipc.AbortRequest):
            for replica in self.replicas:
                ipc.send(replica, message)
            return
        start = time.perf_counter_ns()
        rank = self.choose()
        self.dispatched[rank] += 1
        ipc.send(self.replicas[rank], message)
        trace = message.trace
        if self.recorder and trace is not None and trace.level >= 2:
            end, rec, thread_id = time.perf_counter_ns(), self.recorder, new_span_id()
            rec.span(trace.trace_id, thread_id, trace.root_span_id, rec.thread_name, start, end,
                     rec.thread_attributes, tracestate=trace.tracestate)
            rec.span(trace.trace_id, new_span_id(), thread_id, "dispatch", start, end, {"dp_rank": rank},
                     tracestate=trace.tracestate)

    def choose(self) -> int:
        if self.method == "round_robin":
            rank, self.next = self.next, (self.next + 1) % len(self.replicas)
            return rank
        return min(range(len(self.replicas)), key=lambda d: (self.load(d), d))

    def load(self, rank: int) -> int:
        """Requests a replica holds, plus those sent to it that it has not received yet."""
        stats = self.stats[rank]
        if stats is None:
            return self.dispatched[rank]
        return stats.num_running + stats.num_waiting + self.dispatched[rank] - stats.num_received


def run_dp_controller_process(args: ServerArgs, ipc_dir: str, ready: Connection) -> None:
    setup_child("dp-controller", args.log_level)
    controller = DataParallelController(args, ipc_dir)
    ready.send({})
    controller.run_forever()
