"""The KV exchange of a prefill/decode pair, in process: two engines on a tiny model, one
prefilling and one decoding, talking over a real loopback bootstrap socket."""

import time

import pytest

from harness import free_port
from loupe import Engine
from loupe.core import Bootstrap, SamplingParams, TokenizedRequest

PROMPTS = ["The capital of France is Paris. The capital of Italy is", "Hello, my name is loupe and I trace",
           "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"]
GREEDY = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}


def engine(folder: str, **flags) -> Engine:
    return Engine(folder, **{"dtype": "float32", "page_size": 4, "chunked_prefill_size": 8, **flags})


def decoder(folder: str, timeout: float = 60.0, backend: str = "tcp", secret: str | None = None, **flags) -> Engine:
    """An engine as a decode server's scheduler runs it."""
    return engine(folder, disaggregation_mode="decode", disaggregation_timeout=timeout,
                  disaggregation_transfer_backend=backend, disaggregation_secret=secret, **flags)


def pair(folder: str, timeout: float = 10.0, decode_timeout: float = 10.0, backend: str = "tcp",
         decode_backend: str | None = None, prefill_secret: str | None = None, decode_secret: str | None = None,
         **decode_flags):
    """(prefill engine, decode engine, bootstrap port), as the two servers run them."""
    port = free_port()
    prefill = engine(folder, disaggregation_mode="prefill", disaggregation_bootstrap_port=port,
                     disaggregation_timeout=timeout, disaggregation_transfer_backend=backend,
                     disaggregation_secret=prefill_secret)
    decode = decoder(folder, decode_timeout, decode_backend or backend, decode_secret, **decode_flags)
    return prefill, decode, port


def submit(eng: Engine, rid: str, prompt: str, port: int, room: int, params: dict = GREEDY):
    ids = eng.tokenizer.encode(prompt)
    return eng.scheduler.add_request(TokenizedRequest(rid, ids, SamplingParams(**params),
                                                      bootstrap=Bootstrap("127.0.0.1", port, room)))


def run(*engines: Engine, until=None, seconds: float = 30) -> None:
    """Step the engines until none has work (or `until()` holds)."""
    deadline = time.monotonic() + seconds
    while any(e.scheduler.has_work for e in engines) if until is None else not until():
        for e in engines:
            e.scheduler.step()
        assert time.monotonic() < deadline, "the pair did not finish"
        time.sleep(0.001)


def assert_nothing_held(eng: Engine) -> None:
    """Every page is free or in the prefix tree; every slot-table row is free."""
    kv = eng.scheduler.kv
    tree = sum(len(n.pages) for n in kv.tree._nodes())
    assert len(kv.pool.free_pages) + tree == kv.pool.num_pages - 1
    assert kv.tree.evictable_pages == tree and len(kv.slots.free_rows) == kv.slots.table.shape[0]


@pytest.mark.parametrize("backend", ["tcp", "nixl"])
def test_decode_continues_from_the_prefill_servers_kv_exactly(tiny_model_dir, backend):
    folder = tiny_model_dir("llama")
    reference = [o["output_ids"] for o in engine(folder).generate(PROMPTS, GREEDY)]
    prefill, decode, port = pair(folder, backend=backend)
    # The decode side's request arrives first for one room, after the prefill for another.
    decoded = [submit(decode, f"d{i}", p, port, room=100 + i) for i, p in enumerate(PROMPTS[:2])]
    prefilled = [submit(prefill, f"p{i}", p, port, room=100 + i) for i, p in enumerate(PROMPTS)]
    for _ in range(40):
        prefill.scheduler.step()
    decoded.append(submit(decode, "d2", PROMPTS[2], port, room=102))
    run(prefill, decode)
    assert [r.output_ids for r in decoded] == reference
    assert all(r.error is None and r.kv_bytes > 0 for r in decoded)
    assert [r.output_ids for r in prefilled] == [ids[:1] for ids in reference]
    assert all(r.finish_reason == "length" and r.kv_bytes == d.kv_bytes for r, d in zip(prefilled, decoded, strict=True))
    assert_nothing_held(prefill)
    assert_nothing_held(decode)
    # The prefill server cached the prompts: the same prompt again hits its prefix cache.
    again = submit(prefill, "p-again", PROMPTS[0], port, room=200)
    redo = submit(decode, "d-again", PROMPTS[0], port, room=200)
    run(prefill, decode)
    assert again.cached_tokens > 0 and redo.output_ids == reference[0]


def test_the_first_tokens_logprobs_come_from_the_prefill_server(tiny_model_dir):
    folder = tiny_model_dir("llama")
    asked = {**GREEDY, "logprobs": True, "top_logprobs": 3}
    single = engine(folder).generate(PROMPTS[0], GREEDY, return_logprob=True, top_logprobs_num=3)["meta_info"]
    prefill, decode, port = pair(folder)
    submit(prefill, "p", PROMPTS[0], port, room=300, params=asked)
    decoded = submit(decode, "d", PROMPTS[0], port, room=300, params=asked)
    run(prefill, decode)
    assert decoded.error is None
    assert [lp.token_id for lp in decoded.output_logprobs] == [t for _, t, _ in single["output_token_logprobs"]]
    assert [lp.logprob for lp in decoded.output_logprobs] == pytest.approx(
        [v for v, _, _ in single["output_token_logprobs"]], abs=1e-5)
    assert [[t for t, _ in lp.top] for lp in decoded.output_logprobs] == [
        [t for _, t, _ in top] for top in single["output_top_logprobs"]]
    # A prefill server that computed none (the two were given different requests): a clear failure.
    submit(prefill, "p2", PROMPTS[1], port, room=301)
    missing = submit(decode, "d2", PROMPTS[1], port, room=301, params=asked)
    run(prefill, decode)
    assert "no logprobs for the first token" in missing.error and missing.finish_reason == "abort"
    assert_nothing_held(decode)


def test_a_room_the_prefill_server_never_gets_fails_and_frees_the_pages(tiny_model_dir):
    prefill, decode, port = pair(tiny_model_dir("llama"), timeout=0.5)
    lost = submit(decode, "d", PROMPTS[0], port, room=7)
    run(prefill, decode)
    assert "has no request for room 7" in lost.error and lost.finish_reason == "abort"
    assert_nothing_held(decode)
    # Both go on serving.
    submit(prefill, "p2", PROMPTS[1], port, room=8)
    served = submit(decode, "d2", PROMPTS[1], port, room=8)
    run(prefill, decode)
    assert served.error is None and len(served.output_ids) == GREEDY["max_new_tokens"]


def test_a_request_waiting_for_kv_never_holds_up_the_batch(tiny_model_dir):
    prefill, decode, port = pair(tiny_model_dir("llama"))
    waiting = submit(decode, "d", PROMPTS[0], port, room=20)  # its prefill server never gets it
    local = decode.scheduler.add_request(TokenizedRequest("local", decode.tokenizer.encode(PROMPTS[1]),
                                                          SamplingParams(**GREEDY)))
    run(decode, until=lambda: local.output_ids)  # its prompt, in chunks
    for _ in range(6):
        before = len(local.output_ids)
        decode.scheduler.step()
        assert len(local.output_ids) == before + 1  # a token every step, while the other waits
    assert not waiting.output_ids and not waiting.finished
    assert decode.scheduler.abort("d") is waiting


def test_a_prefill_nobody_claims_fails_and_frees_the_pages(tiny_model_dir):
    prefill, _, port = pair(tiny_model_dir("llama"), timeout=0.5)
    unclaimed = submit(prefill, "p", PROMPTS[0], port, room=8)
    run(prefill)
    assert "room 8" in unclaimed.error and "no decode server claimed it" in unclaimed.error
    assert_nothing_held(prefill)


def test_a_prefill_server_that_is_not_there_fails_the_request_at_once(tiny_model_dir):
    decode = decoder(tiny_model_dir("llama"))
    orphan = submit(decode, "d", PROMPTS[0], free_port(), room=9)  # nobody listens there
    start = time.monotonic()
    run(decode)
    assert time.monotonic() - start < 2  # not the 60 s timeout
    assert "could not connect to the prefill server" in orphan.error
    assert_nothing_held(decode)
    assert decode.scheduler.exchange.intake.links == {}  # the failed link is closed, not retried


@pytest.mark.parametrize("mismatch,named", [({"page_size": 8}, ("page_size=4", "page_size=8")),
                                            ({"decode_backend": "nixl"}, ("by tcp", "by nixl"))])
def test_mismatched_servers_are_refused_naming_both_values(tiny_model_dir, mismatch, named):
    prefill, decode, port = pair(tiny_model_dir("llama"), **mismatch)
    submit(prefill, "p", PROMPTS[0], port, room=10)
    refused = submit(decode, "d", PROMPTS[0], port, room=10)
    run(prefill, decode, until=lambda: refused.finished)
    assert all(value in refused.error for value in named), refused.error
    assert_nothing_held(decode)


def test_aborts_free_pages_held_for_the_exchange(tiny_model_dir):
    prefill, decode, port = pair(tiny_model_dir("llama"))
    waiting = submit(decode, "d", PROMPTS[0], port, room=11)
    held = submit(prefill, "p", PROMPTS[1], port, room=12)
    for _ in range(20):
        prefill.scheduler.step()
        decode.scheduler.step()
    assert held.output_ids and not held.finished  # prefilled, its pages held for a claim
    assert prefill.scheduler.abort("p") is held and decode.scheduler.abort("d") is waiting
    for eng, holder in ((prefill, prefill.scheduler.exchange.handoff), (decode, decode.scheduler.exchange.intake)):
        assert not eng.scheduler.runnable and not eng.scheduler.exchange.held() and holder.requests == []
    assert_nothing_held(prefill)
    assert_nothing_held(decode)


def test_an_abort_keeps_pages_nixl_may_write_until_the_prefill_server_answers(tiny_model_dir):
    prefill, decode, port = pair(tiny_model_dir("llama"), backend="nixl")
    prompt = submit(prefill, "p", PROMPTS[2], port, room=13)
    waiting = submit(decode, "d", PROMPTS[2], port, room=13)
    decode.scheduler.step()  # claimed: the prefill server may write into its pages from now on
    free = len(decode.scheduler.kv.pool.free_pages)
    assert decode.scheduler.abort("d") is waiting and waiting.finish_reason == "abort"
    assert len(decode.scheduler.kv.pool.free_pages) == free  # kept from reuse
    # The prefill server drops the claim (or, had it served it already, the decode server answers
    # Received(ok=False)); either way its prompt ends and says why.
    run(prefill, decode)
    assert "its request ended there" in prompt.error, prompt.error
    assert_nothing_held(decode)
    assert_nothing_held(prefill)


@pytest.fixture(autouse=True)
def _close_sockets():
    yield
    import zmq

    zmq.Context.instance().destroy(linger=0)
