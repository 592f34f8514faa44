"""The data-parallel controller: one process in front of `--dp-size` scheduler replicas.

It takes the place of the scheduler's inbox — the tokenizer manager sends to it exactly as
it would to a lone scheduler — and hands each request to one replica: in turn
(`round_robin`) or to the one with the fewest requests (`least_loaded`, counting those
still on their way). Aborts go to every replica; the ones that do not hold the request
ignore them.
"""

from __future__ import annotations

import time

import zmq

from loupe import ipc
from loupe.core import TokenizedRequest
from loupe.tracing.spans import DispatchTracer, open_tracer


class DataParallelController:
    def __init__(self, method: str, traced: bool, endpoints: ipc.Endpoints):
        self.method = method  # --load-balance-method
        ctx = zmq.Context()
        self.inbox = ipc.bind(ctx, zmq.PULL, endpoints.scheduler)
        self.stats_inbox = ipc.bind(ctx, zmq.PULL, endpoints.dp_stats)
        dp_size = endpoints.dp_size
        self.replicas = [ipc.connect(ctx, zmq.PUSH, endpoints.replica(d)) for d in range(dp_size)]
        self.dispatched = [0] * dp_size  # requests sent to each replica, ever
        self.stats: list[ipc.SchedulerStats | None] = [None] * dp_size
        self.next = 0
        self.tracer = open_tracer(DispatchTracer, traced, endpoints.tracing)
        self.route = ipc.Dispatch({TokenizedRequest: self.send_to_one, ipc.AbortRequest: self.send_to_all})

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
                if self.tracer:
                    self.tracer.maybe_flush()
        finally:
            if self.tracer:
                self.tracer.flush()

    def send_to_all(self, abort: ipc.AbortRequest) -> None:
        """An abort goes to every replica: only the one holding the request answers."""
        for replica in self.replicas:
            ipc.send(replica, abort)

    def send_to_one(self, message: TokenizedRequest) -> None:
        start = time.perf_counter_ns()
        rank = self.choose()
        self.dispatched[rank] += 1
        ipc.send(self.replicas[rank], message)
        if self.tracer:
            self.tracer.dispatched(message.trace, start, time.perf_counter_ns(), rank)

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
