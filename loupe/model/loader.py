"""Find, read and build a model: a Hugging Face folder or a single GGUF file."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file

from loupe.distributed.parallel import Comm
from loupe.model.config import ModelConfig
from loupe.model.gguf_loader import bundled_model_path, load_gguf, load_gguf_tokenizer
from loupe.model.layers import RotaryEmbedding, pack_linears
from loupe.model.llama import MODEL_CLASSES
from loupe.model.quant import int4_supported, quantize_model

# GGUF weight types whose blocks of 32 int4 groups hold (Q4_1 exactly: BENCHMARKS.md, accuracy)
FOUR_BIT_GGUF_TYPES = {"Q4_0", "Q4_1"}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: ModelConfig
    tokenizer: object  # a transformers PreTrainedTokenizerFast
    path: str
    eos_token_ids: tuple[int, ...]
    quantization: str = "none"  # "int4": the layers' linears compute from int4 groups


def resolve_dtype(dtype: str, device: str, hf_config: dict) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    # On CPU float32 is the safe default: bfloat16 speed depends on the CPU and drifts numerically.
    if device == "cpu":
        return torch.float32
    stored = hf_config.get("torch_dtype") or hf_config.get("dtype") or "bfloat16"
    return torch.float32 if stored == "float32" else torch.bfloat16


def resolve_quantization(quantization: str, device: str, torch_dtype: torch.dtype, hf_config: dict) -> str:
    """"none" or "int4". "auto" is int4 for a GGUF whose layers are stored in 4 bits (computing
    from the file's own weights), on CPU in float32 or bfloat16; none for anything else."""
    usable = device == "cpu" and torch_dtype in (torch.float32, torch.bfloat16) and int4_supported()
    if quantization == "auto":
        layer_types = set(hf_config.get("gguf_layer_types", ()))
        return "int4" if usable and layer_types and layer_types <= FOUR_BIT_GGUF_TYPES else "none"
    if quantization == "int4" and not usable:
        raise ValueError(f"--quantization int4 needs the CPU and a float32 or bfloat16 --dtype "
                         f"(got {device}, {str(torch_dtype).removeprefix('torch.')})")
    return quantization


def read_checkpoint(path: str) -> tuple[dict, dict[str, torch.Tensor], object]:
    """(hf_config, state_dict, tokenizer) from a folder or a .gguf file; one clear error if not."""
    if not os.path.exists(path):
        raise ValueError(f"model path {path!r} does not exist")
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"model path {path!r} is a file but not a .gguf file")
        return load_gguf(path)
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"model path {path!r} has no config.json")
    try:
        with open(config_file) as f:
            hf_config = json.load(f)
        state_dict = {}
        index_file = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index_file):
            with open(index_file) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise ValueError("no *.safetensors files")
        for name in files:
            state_dict.update(load_file(os.path.join(path, name)))
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    except ValueError as e:
        raise ValueError(f"cannot load model from {path!r}: {e}") from None
    except Exception as e:  # corrupt JSON, safetensors or tokenizer files
        raise ValueError(f"cannot load model from {path!r}: {type(e).__name__}: {e}") from None
    generation_file = os.path.join(path, "generation_config.json")
    if os.path.isfile(generation_file):
        with open(generation_file) as f:
            hf_config.setdefault("generation_eos_token_id", json.load(f).get("eos_token_id"))
    return hf_config, state_dict, tokenizer


def eos_ids(hf_config: dict, config: ModelConfig, tokenizer) -> tuple[int, ...]:
    """The model's EOS tokens, its generation config's, and the tokenizer's: all end a request."""
    extra = hf_config.get("generation_eos_token_id")
    ids = {*config.eos_token_ids, *(extra if isinstance(extra, list) else [extra]), tokenizer.eos_token_id}
    return tuple(sorted(ids - {None}))


def load_model(
    path: str | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    context_length: int | None = None,
    comm: Comm | None = None,
    quantization: str = "auto",
) -> LoadedModel:
    """The model (this rank's part of it, given a `comm` with several ranks), ready to run."""
    path = path or bundled_model_path()
    hf_config, state_dict, tokenizer = read_checkpoint(path)
    try:
        config = ModelConfig.from_hf(hf_config)
    except (KeyError, ValueError) as e:
        raise ValueError(f"cannot load model from {path!r}: {e}") from None
    torch_dtype = resolve_dtype(dtype, device, hf_config)
    quantization = resolve_quantization(quantization, device, torch_dtype, hf_config)
    max_positions = context_length or config.max_position_embeddings
    with torch.device("meta"):  # no memory and no random init: every weight comes from the file
        try:
            model = MODEL_CLASSES[config.family](config, max_positions, comm)
        except ValueError as e:
            raise ValueError(f"cannot serve {path!r}: {e}") from None
    try:
        model.load_weights(state_dict, torch_dtype, device)
    except ValueError as e:
        raise ValueError(f"cannot load model from {path!r}: {e}") from None
    with torch.device(device):
        model.rotary = RotaryEmbedding(config, max_positions)  # buffers, not weights: computed here
    if quantization == "int4":
        quantize_model(model)
    if device == "cpu" and torch_dtype in (torch.float32, torch.bfloat16):
        pack_linears(model)  # the linears quantize_model left
    model.eval()
    return LoadedModel(model, config, tokenizer, path, eos_ids(hf_config, config, tokenizer), quantization)


def load_tokenizer(path: str | None):
    """Only the tokenizer of a model (for processes that never touch the weights)."""
    path = path or bundled_model_path()
    if not os.path.exists(path):
        raise ValueError(f"model path {path!r} does not exist")
    if os.path.isfile(path) and path.endswith(".gguf"):
        return load_gguf_tokenizer(path)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ValueError(f"cannot load the tokenizer from {path!r}: {type(e).__name__}: {e}") from None
