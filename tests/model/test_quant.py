"""Int4 layers and an int8 LM head: the grid of a Q4_1 file found again, the kernels against a
float matmul, which linears are swapped and when, and the bundled model's accuracy against its
exact float32 path (figures in BENCHMARKS.md)."""

import pytest
import torch
from torch import nn

from loupe import Engine
from loupe.model import quant
from loupe.model.gguf_loader import bundled_model_path, load_gguf
from loupe.model.loader import load_model, resolve_quantization
from loupe.model.quant import Int4Linear, Int8Linear, dequantize_int4, quantize_int4, quantize_model

PARITY_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
                  "Explain photosynthesis in one sentence.", "Who wrote Hamlet?"]


def q4_1_like(rows: int, cols: int) -> torch.Tensor:
    """A weight on a Q4_1 grid: per 32, a float16 scale and minimum, codes 0..15 using both ends."""
    codes = torch.randint(0, 16, (rows, cols // 32, 32))
    codes[..., 0], codes[..., 1] = 0, 15
    scale = torch.rand(rows, cols // 32, 1).half().float() / 10
    low = -torch.rand(rows, cols // 32, 1).half().float()
    return (codes * scale + low).reshape(rows, cols)


def test_quantizing_a_q4_1_grid_finds_it_again_exactly():
    weight = q4_1_like(64, 128)
    codes, scales_and_zeros = quantize_int4(weight)
    assert codes.min() == 0 and codes.max() == 15 and scales_and_zeros.shape == (4, 64, 2)
    assert torch.allclose(dequantize_int4(codes, scales_and_zeros), weight, rtol=0, atol=1e-6)


def test_the_bundled_files_layers_are_on_the_int4_grid():
    _, state_dict, _ = load_gguf(bundled_model_path())
    weight = state_dict["model.layers.0.mlp.down_proj.weight"]
    assert torch.allclose(dequantize_int4(*quantize_int4(weight)), weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 3, quant.INT4_MAX_ROWS + 1, 40])
def test_an_int4_linear_computes_what_its_grid_does(rows):
    linear = nn.Linear(128, 96, bias=True)
    linear.weight.data = q4_1_like(96, 128)
    x = torch.randn(rows, 128)
    expected = linear(x)
    with torch.inference_mode():
        layer = Int4Linear(linear)
        got = layer(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    if layer.vnni is None and rows > quant.INT4_MAX_ROWS and not quant.bf16_native():  # the exact path
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:  # an int4 kernel, or oneDNN in bfloat16 for more rows: each rounds the inputs (8 bits, bfloat16)
        assert 0 < (got - expected).abs().max() < 0.02 * expected.abs().max()


@pytest.mark.parametrize("native", [True, False])
def test_without_the_vnni_kernel_wide_decode_steps_compute_in_bfloat16_only_where_the_cpu_does(native, monkeypatch):
    monkeypatch.setattr(quant, "int4_vnni_available", lambda: False)
    monkeypatch.setattr(quant, "bf16_native", lambda: native)
    linear = nn.Linear(128, 96, bias=True)
    linear.weight.data = q4_1_like(96, 128)
    x = torch.randn(quant.INT4_MAX_ROWS + 8, 128)
    with torch.inference_mode():
        int4 = Int4Linear(linear)
        got = int4(x)
        exact = int4(x, exact=True)
    torch.testing.assert_close(exact, linear(x), rtol=1e-5, atol=1e-5)  # a prefill: exact either way
    assert (int4.wide_decode is not None) == native
    assert torch.equal(got, exact) != native
    assert (got - exact).abs().max() < 0.02 * exact.abs().max()


@pytest.mark.parametrize(("rows", "bias"), [(1, False), (16, False), (64, True)])
def test_an_int8_lm_head_computes_what_its_weight_does(rows, bias):
    linear = nn.Linear(64, 1000, bias=bias)
    x = torch.randn(rows, 64)
    expected = linear(x)
    with torch.inference_mode():
        head = Int8Linear(linear)
        got = head(x)
        exact = head(x, exact=True)
    torch.testing.assert_close(exact, expected, rtol=1e-5, atol=1e-5)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert 0 < (got - expected).abs().max() < 0.02 * expected.abs().max()  # 8-bit weights and inputs


def test_quantize_model_swaps_the_layers_and_the_lm_head_but_not_what_int4_cannot_hold():
    model = nn.Module()
    model.layer = nn.Sequential(nn.Linear(64, 32), nn.Linear(48, 32))  # 48 inputs: not groups of 32
    model.lm_head = nn.Module()
    model.lm_head.proj = nn.Linear(48, 32)
    assert quantize_model(model) == 2
    assert isinstance(model.layer[0], Int4Linear) and type(model.layer[1]) is nn.Linear
    assert isinstance(model.lm_head.proj, Int8Linear)


def test_auto_is_int4_only_for_a_4_bit_gguf_on_the_cpu():
    q4 = {"gguf_layer_types": ["Q4_1"]}
    assert resolve_quantization("auto", "cpu", torch.float32, q4) == "int4"
    assert resolve_quantization("auto", "cpu", torch.float32, {"gguf_layer_types": ["Q4_1", "Q6_K"]}) == "none"
    assert resolve_quantization("auto", "cpu", torch.float32, {}) == "none"  # a Hugging Face folder
    assert resolve_quantization("auto", "cuda", torch.bfloat16, q4) == "none"
    assert resolve_quantization("auto", "cpu", torch.float16, q4) == "none"
    assert resolve_quantization("none", "cpu", torch.float32, q4) == "none"
    assert resolve_quantization("int4", "cpu", torch.float32, {}) == "int4"
    with pytest.raises(ValueError, match="--quantization int4 needs the CPU"):
        resolve_quantization("int4", "cuda", torch.bfloat16, {})


def test_int4_on_a_hugging_face_checkpoint_when_asked(tiny_model_dir):
    loaded = load_model(tiny_model_dir("llama"), quantization="int4")
    assert loaded.quantization == "int4"
    assert any(isinstance(m, Int4Linear) for m in loaded.model.modules())
    assert load_model(tiny_model_dir("llama")).quantization == "none"


@pytest.fixture(scope="module")
def engines():
    exact, fast = Engine(quantization="none"), Engine()
    yield exact, fast
    exact.shutdown(), fast.shutdown()


@pytest.mark.slow
def test_the_bundled_model_computes_from_its_int4_weights_by_default(engines):
    exact, fast = engines
    assert fast.worker.model.quantization == "int4" and exact.worker.model.quantization == "none"
    assert fast.worker.info.as_dict()["quantization"] == "int4"


@pytest.mark.slow
def test_quantized_decoding_parts_from_the_exact_path_only_at_near_ties(engines):
    exact, fast = engines
    greedy = {"max_new_tokens": 32, "temperature": 0, "ignore_eos": True}
    agreed, texts = [], []
    for text in PARITY_PROMPTS:
        ids = exact.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=True)["input_ids"]
        a = exact.generate(input_ids=ids, sampling_params=greedy, return_logprob=True, top_logprobs_num=2)
        b = fast.generate(input_ids=ids, sampling_params=greedy)
        n = next((i for i, (x, y) in enumerate(zip(a["output_ids"], b["output_ids"], strict=True)) if x != y), None)
        if n is not None:  # the same text up to n: the exact model's two likeliest there must be nearly tied
            (first, _, _), (second, token, _) = a["meta_info"]["output_top_logprobs"][n]
            assert b["output_ids"][n] == token and first - second < 0.5, (text, n, first - second)
        agreed.append(32 if n is None else n)
        texts.append(b["text"])
    # Measured (int4 layers, int8 LM head): 19, 17, 23, 32 tokens before the first difference,
    # each where the exact logits put the two likeliest within 0.16 of each other.
    assert sum(agreed) >= 64, agreed
    assert "Paris" in texts[0]


def test_an_exact_pass_takes_the_exact_path_for_few_rows_too():
    linear = nn.Linear(128, 96, bias=False)
    linear.weight.data = q4_1_like(96, 128)
    x = torch.randn(2, 128)
    with torch.inference_mode():
        int4 = Int4Linear(linear)
        exact = int4(x, exact=True)
        fast = int4(x)
    torch.testing.assert_close(exact, linear(x), rtol=1e-5, atol=1e-5)
    assert not torch.equal(fast, exact)  # not exact: a kernel again
