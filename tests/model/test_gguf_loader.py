"""loupe.model.gguf_loader against transformers' own GGUF loading, on the bundled SmolLM2 file and on
tiny synthetic Llama / Qwen2 / Qwen3 files written here with gguf.GGUFWriter."""

import os
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers.convert_slow_tokenizer import bytes_to_unicode

from loupe.model.gguf_loader import bundled_model_path, load_gguf

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi! What's 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "Ünïcødé 世界 🙂 and\ttabs\n\nnewlines"},
]
TEXTS = [
    "Hello world",
    " leading space, trailing space ",
    "def f(x):\n    return x ** 2  # squares\n",
    "Numbers 12345 and 3.14159; ünïcødé 世界 🙂",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "",
]


@pytest.fixture(scope="module")
def bundled() -> str:
    try:
        return bundled_model_path()
    except ValueError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def loaded(bundled: str):
    start = time.perf_counter()
    result = load_gguf(bundled)
    print(f"load_gguf took {time.perf_counter() - start:.2f} s")
    return result


def _transformers_model(path: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    return model.config, model.state_dict()


def _transformers_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def _assert_same_weights(ours: dict[str, torch.Tensor], config, theirs: dict[str, torch.Tensor]):
    if config.tie_word_embeddings:
        theirs = {k: v for k, v in theirs.items() if k != "lm_head.weight"}
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == torch.float32, name
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=1e-6, msg=name)


def _assert_same_tokenizer(ours, theirs):
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert ours.chat_template == theirs.chat_template
    assert len(ours) == len(theirs)
    for text in TEXTS:
        ids = theirs(text)["input_ids"]
        assert ours(text)["input_ids"] == ids, text
        assert ours.decode(ids) == theirs.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(
            ids, skip_special_tokens=True
        )
    for prompt in (True, False):
        text = theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=prompt)
        assert ours.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=prompt) == text
        ids = theirs(text, add_special_tokens=False)["input_ids"]
        assert ours(text, add_special_tokens=False)["input_ids"] == ids
        assert ours.decode(ids) == text


# --- the bundled SmolLM2-135M-Instruct Q4_1 file ---------------------------------------------


@pytest.mark.slow
def test_bundled_config(loaded):
    config, state_dict, _ = loaded
    assert config == {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-05,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "attention_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "gguf_layer_types": ["Q4_1"],  # what --quantization auto reads
    }
    assert "lm_head.weight" not in state_dict
    assert state_dict["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert state_dict["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)


@pytest.mark.slow
def test_bundled_weights_match_transformers(bundled, loaded):
    config, theirs = _transformers_model(bundled)
    _assert_same_weights(loaded[1], config, theirs)


@pytest.mark.slow
def test_bundled_tokenizer_matches_transformers(bundled, loaded):
    tokenizer = loaded[2]
    _assert_same_tokenizer(tokenizer, _transformers_tokenizer(bundled))
    assert tokenizer.eos_token == "<|im_end|>" and not tokenizer.add_bos_token
    ids = tokenizer.apply_chat_template(CHAT[:2], add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_bundled_model_answers(loaded):
    from transformers import AutoConfig, AutoModelForCausalLM

    config, state_dict, tokenizer = loaded
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to the embeddings
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


# --- tiny synthetic files --------------------------------------------------------------------


def _write_tiny_gguf(path: Path, arch: str, *, tied: bool, head_dim: int, bias: bool = False):
    """Random weights, a mix of F32 / F16 / Q8_0, and a small byte-level BPE vocabulary."""
    hidden, kv_heads, ffn, layers = 64, 2, 96, 2
    heads = 4 if head_dim == 16 else 2  # head_dim 128 exercises head_dim != hidden / heads
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he", "l l", "Ġ w"]
    tokens = specials + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in merges]
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(4.0)
    writer.add_rope_scaling_orig_ctx_len(64)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )

    rng = np.random.default_rng(0)

    def add(name: str, shape: tuple[int, ...], qtype: str = "F32") -> None:
        data = rng.standard_normal(shape).astype(np.float32)
        if qtype == "F16":
            writer.add_tensor(name, data.astype(np.float16))
        elif qtype == "Q8_0":
            kind = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, data)

    add("token_embd.weight", (len(tokens), hidden), "Q8_0")
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", (hidden,))
        add(f"blk.{i}.attn_q.weight", (heads * head_dim, hidden), "Q8_0")
        add(f"blk.{i}.attn_k.weight", (kv_heads * head_dim, hidden), "F16")
        add(f"blk.{i}.attn_v.weight", (kv_heads * head_dim, hidden))
        if bias:
            add(f"blk.{i}.attn_q.bias", (heads * head_dim,))
            add(f"blk.{i}.attn_k.bias", (kv_heads * head_dim,))
            add(f"blk.{i}.attn_v.bias", (kv_heads * head_dim,))
        if arch == "qwen3":
            add(f"blk.{i}.attn_q_norm.weight", (head_dim,))
            add(f"blk.{i}.attn_k_norm.weight", (head_dim,))
        add(f"blk.{i}.attn_output.weight", (hidden, heads * head_dim), "Q8_0")
        add(f"blk.{i}.ffn_norm.weight", (hidden,))
        add(f"blk.{i}.ffn_gate.weight", (ffn, hidden), "F16")
        add(f"blk.{i}.ffn_up.weight", (ffn, hidden), "Q8_0")
        add(f"blk.{i}.ffn_down.weight", (hidden, ffn))
    add("output_norm.weight", (hidden,))
    if not tied:
        add("output.weight", (len(tokens), hidden), "F16")

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


TINY = {
    "llama": dict(tied=False, head_dim=16),
    "qwen2": dict(tied=True, head_dim=16, bias=True),
    "qwen3": dict(tied=False, head_dim=128),  # transformers' Qwen3 GGUF config assumes 128
}


@pytest.mark.parametrize("arch", sorted(TINY))
def test_tiny_model_matches_transformers(tmp_path: Path, arch: str):
    path = tmp_path / f"tiny-{arch}.gguf"
    _write_tiny_gguf(path, arch, **TINY[arch])
    config, state_dict, tokenizer = load_gguf(str(path))

    their_config, theirs = _transformers_model(str(path))
    _assert_same_weights(state_dict, their_config, theirs)
    _assert_same_tokenizer(tokenizer, _transformers_tokenizer(str(path)))

    assert config["model_type"] == arch
    assert config["tie_word_embeddings"] == TINY[arch]["tied"]
    assert config["head_dim"] == TINY[arch]["head_dim"]
    assert config["rope_theta"] == 1_000_000.0 and config["rms_norm_eps"] == 1e-6
    assert config["rope_scaling"] == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_key_value_heads"):
        assert config[key] == getattr(their_config, key), key
    assert ("model.layers.0.self_attn.q_proj.bias" in state_dict) == (arch == "qwen2")
    assert ("model.layers.0.self_attn.q_norm.weight" in state_dict) == (arch == "qwen3")

    from transformers import AutoConfig

    rebuilt = AutoConfig.for_model(**config)  # the dict is a usable Hugging Face config
    assert rebuilt.head_dim == TINY[arch]["head_dim"]
    assert rebuilt.rope_parameters["rope_type"] == "yarn"


# --- errors ----------------------------------------------------------------------------------


def _error(path: Path) -> str:
    with pytest.raises(ValueError) as caught:
        load_gguf(str(path))
    message = str(caught.value)
    assert str(path) in message and "\n" not in message
    return message


def test_missing_file(tmp_path: Path):
    assert "no such file" in _error(tmp_path / "absent.gguf")


def test_text_file_renamed_gguf(tmp_path: Path):
    path = tmp_path / "notes.gguf"
    path.write_text("just some notes, not a model\n")
    assert "not a GGUF file" in _error(path)


def test_empty_file(tmp_path: Path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    assert "not a GGUF file" in _error(path)


def test_truncated_file(tmp_path: Path, bundled: str):
    path = tmp_path / "truncated.gguf"
    with open(bundled, "rb") as source:
        path.write_bytes(source.read(4_000_000))
    assert "truncated" in _error(path)
    path.write_bytes(path.read_bytes()[:100_000])  # cut inside the vocabulary
    assert "corrupt GGUF header" in _error(path)


def test_unsupported_architecture(tmp_path: Path):
    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert "unsupported architecture 'mamba'" in _error(path)


def test_unsupported_tensor_type(tmp_path: Path):
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, "llama", tied=True, head_dim=16)
    # rewrite one tensor's ggml type id in the header to I32 (26), which cannot be dequantised
    data = bytearray(path.read_bytes())
    name = b"blk.0.ffn_down.weight"
    type_at = data.index(name) + len(name) + 4 + 2 * 8
    assert data[type_at] == gguf.GGMLQuantizationType.F32
    data[type_at] = gguf.GGMLQuantizationType.I32
    path.write_bytes(bytes(data))
    assert "I32, which cannot be dequantised" in _error(path)
