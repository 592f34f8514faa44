"""The int4 decode step compiled at start (runner/compiled.py), on a tiny random llama."""

from types import SimpleNamespace

import pytest
import torch

from loupe import Engine
from loupe.model.attention import KVCache

pytestmark = pytest.mark.slow  # compiles the decode step of a tiny model: ~20 s

GREEDY = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
PROMPTS = ["one two three", "Hello, my name is loupe and I trace", "The capital of France is", "Where"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    engine = Engine(tiny_model_dir("llama"), quantization="int4", disable_radix_cache=True)
    yield engine
    engine.shutdown()


def decode_step_inputs(engine, prompts):
    """The inputs of the first decode step after these prompts' prefill, as the runner builds them."""
    reqs = []
    for i, prompt in enumerate(prompts):
        ids = engine.tokenizer.encode(prompt)
        reqs.append(SimpleNamespace(row=i, kv_len=len(ids), seq_len=len(ids) + 1, all_ids=ids + [7], output_ids=[7]))
    runner = engine.worker.runner
    with torch.inference_mode():
        for req in reqs:  # the prompts' KV, written eagerly
            runner.slot_table[req.row, : req.seq_len] = torch.arange(1, req.seq_len + 1) + 64 * req.row
            batch, ids, positions = runner._prepare([req], [req.kv_len])
            runner.model(ids, positions, batch)
        return runner._prepare(reqs, [1] * len(reqs))


def test_the_compiled_step_matches_the_eager_one_for_every_row_count_it_serves(engine):
    runner = engine.worker.runner
    assert runner.compiled is not None and runner.compiled.warm_up_seconds > 0
    for count in (1, 2, 3, 4, 17, 20):  # one row, the int4 kernel's few, the bfloat16 copy's many
        batch, ids, positions = decode_step_inputs(engine, (PROMPTS * 5)[:count])
        assert runner.compiled.serves(batch, len(ids))
        with torch.inference_mode(), torch.compiler.set_stance("fail_on_recompile"):  # compiled at start
            compiled = runner.compiled.forward(ids, positions, batch)
            eager = runner.model(ids, positions, batch)
        torch.testing.assert_close(compiled, eager, atol=2e-3, rtol=2e-3)


def test_greedy_text_is_the_same_compiled_or_not(engine):
    runner = engine.worker.runner
    compiled = engine.generate(PROMPTS, GREEDY)
    graph, runner.compiled = runner.compiled, None
    try:
        eager = engine.generate(PROMPTS, GREEDY)
    finally:
        runner.compiled = graph
    assert [o["output_ids"] for o in compiled] == [o["output_ids"] for o in eager]


def test_prefills_and_batches_beside_them_run_eagerly(engine):
    runner = engine.worker.runner

    def batch(lengths, num_new):
        reqs = [SimpleNamespace(row=row, kv_len=n - new, seq_len=n, all_ids=[1] * n, output_ids=[1])
                for row, (n, new) in enumerate(zip(lengths, num_new, strict=True))]
        batch, ids, _ = runner._prepare(reqs, num_new)
        return batch, len(ids)

    assert runner.compiled.serves(*batch([6] * 16, [1] * 16))
    assert runner.compiled.serves(*batch([6] * 40, [1] * 40))  # past the int4 kernel's side too
    assert not runner.compiled.serves(*batch([5], [5]))  # a prefill
    assert not runner.compiled.serves(*batch([6, 5], [1, 5]))  # decodes beside a prefill chunk


def test_only_int4_models_on_one_rank_compile_and_enforce_eager_turns_it_off(tiny_model_dir):
    folder = tiny_model_dir("llama")
    assert Engine(folder, quantization="int4", enforce_eager=True).worker.runner.compiled is None
    assert Engine(folder, quantization="none").worker.runner.compiled is None


def test_each_layer_of_the_kv_cache_has_its_own_storage_over_the_same_memory():
    kv = KVCache(3, 10, 2, 4, torch.float32, "cpu")
    kv.k_layers[1][5] = 1.0
    kv.v[2, 7] = 2.0
    assert kv.k[1, 5].eq(1).all() and kv.k.sum() == 8 and kv.v_layers[2][7].eq(2).all()
    pointers = {t.untyped_storage().data_ptr() for t in kv.k_layers}
    assert len(pointers) == 3 and kv.k_layers[0].data_ptr() == kv.k.data_ptr()
