import os
import random

from loupe.core import format_traceparent
from loupe.tracing.context import parse_traceparent, start_context
from loupe.tracing.ids import new_span_id, new_trace_id


def test_forked_children_of_one_seeded_parent_never_share_ids():
    random.seed(1234)
    new_span_id()  # the parent's generator is in use before the forks
    children = []
    for _ in range(24):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: same memory, same seeded `random` state as every sibling
            os.close(read)
            random.seed(1234)
            ids = [f"{new_trace_id():x}" for _ in range(50)] + [f"{new_span_id():x}" for _ in range(50)]
            os.write(write, ",".join(ids).encode())
            os._exit(0)
        os.close(write)
        children.append((pid, read))
    seen = []
    for pid, read in children:
        data = b""
        while chunk := os.read(read, 65536):
            data += chunk
        os.close(read)
        os.waitpid(pid, 0)
        seen.extend(data.decode().split(","))
    assert len(seen) == 24 * 100
    assert len(set(seen)) == len(seen)


def test_id_widths():
    assert all(0 < new_trace_id() < 2**128 and 0 < new_span_id() < 2**64 for _ in range(1000))


def test_traceparent_round_trip_and_rejects():
    header = format_traceparent(0xABC, 0x123)
    assert header == "00-00000000000000000000000000000abc-0000000000000123-01"
    assert parse_traceparent(header) == (0xABC, 0x123, 1)
    for bad in [None, "", "garbage", "00-" + "0" * 32 + "-0000000000000123-01",
                "00-00000000000000000000000000000abc-" + "0" * 16 + "-01",
                "ff-00000000000000000000000000000abc-0000000000000123-01",
                "00-00000000000000000000000000000abc-0000000000000123-01-extra",
                "00-xyz00000000000000000000000000abc-0000000000000123-01"]:
        assert parse_traceparent(bad) is None
    # a future version may carry more fields
    assert parse_traceparent("01-00000000000000000000000000000abc-0000000000000123-00-more") == (0xABC, 0x123, 0)


def test_context_joins_the_callers_trace_or_starts_one():
    joined = start_context(3, "00-00000000000000000000000000000abc-0000000000000123-01", "k=v")
    assert joined.trace_id == 0xABC and joined.remote_parent_id == 0x123 and joined.tracestate == "k=v"
    assert joined.root_span_id not in (0, 0x123)
    assert joined.traceparent.startswith("00-00000000000000000000000000000abc-")
    fresh = start_context(2, "malformed")
    assert fresh.remote_parent_id is None and fresh.trace_id != 0xABC and fresh.level == 2
