"""The DP controller (loupe/dp_controller.py) over real ipc sockets: requests spread over the
replicas by the chosen method, aborts reach every replica."""

import shutil

import pytest
import zmq

from loupe import ipc
from loupe.core import SamplingParams, TokenizedRequest
from loupe.dp_controller import DataParallelController


@pytest.fixture
def replicas():
    """(a controller over 3 replicas, a function that drains what each replica received)."""
    endpoints = ipc.Endpoints.create(dp_size=3)
    ctx = zmq.Context()
    inboxes = [ipc.bind(ctx, zmq.PULL, endpoints.replica(d)) for d in range(3)]
    controllers = []

    def make(method: str) -> DataParallelController:
        controllers.append(DataParallelController(method, False, endpoints))
        return controllers[-1]

    def received() -> list[list]:
        got = []
        for sock in inboxes:
            messages = []
            while sock.poll(200):
                messages.append(ipc.recv(sock))
            got.append(messages)
        return got

    yield make, received
    for sock in inboxes:
        sock.close(0)
    for controller in controllers:
        for sock in (controller.inbox, controller.stats_inbox, *controller.replicas):
            sock.close(0)
    shutil.rmtree(endpoints.folder)


def request(rid: str) -> TokenizedRequest:
    return TokenizedRequest(rid, [1, 2], SamplingParams())


def test_round_robin_takes_turns_and_aborts_reach_every_replica(replicas):
    make, received = replicas
    controller = make("round_robin")
    for i in range(4):
        controller.route(request(f"r{i}"))
    controller.route(ipc.AbortRequest("r0"))
    got = received()
    assert [[m.rid for m in messages] for messages in got] == [["r0", "r3", "r0"], ["r1", "r0"], ["r2", "r0"]]
    assert all(isinstance(messages[-1], ipc.AbortRequest) for messages in got)


def test_least_loaded_counts_what_replicas_report_and_what_is_on_its_way(replicas):
    make, received = replicas
    controller = make("least_loaded")
    # running, waiting, KV used and total: replica 0 runs 5, replica 1 runs 1 and queues 1, 2 has not said.
    controller.stats = [ipc.SchedulerStats(5, 0, 0, 1, dp_rank=0), ipc.SchedulerStats(1, 1, 0, 1, dp_rank=1), None]
    for i in range(4):
        controller.route(request(f"r{i}"))
    # Loads before each choice: [5, 2, 0] -> 2; [5, 2, 1] -> 2; [5, 2, 2] -> 1 (ties go low); [5, 3, 2] -> 2.
    assert [[m.rid for m in messages] for messages in received()] == [[], ["r2"], ["r0", "r1", "r3"]]
