"""A ``Qwen3ForCausalLM`` checkpoint read straight from its files (``config.json`` and
safetensors, memory-mapped), so the packed engine can load it without building
transformers' model: each tensor is read once, cast and prepared for the engine as
it is read.

:func:`open_qwen3` reads a checkpoint only where every setting and every tensor in it
is one the packed engine implements exactly as transformers would load it (a Qwen3
causal LM: full attention in every layer, SiLU MLP, default RoPE, unquantized, every
tensor of the expected name and shape, nothing else); otherwise, or where a setting
is missing (its default differs between transformers versions), it returns ``None``
and the caller loads the model through transformers.

torch is imported inside functions only, so importing this module stays cheap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["Qwen3Checkpoint", "Qwen3Settings", "model_file", "open_qwen3"]

_SAFETENSORS = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_ROPE_KEYS = {"rope_type", "rope_theta"}


@dataclass(frozen=True)
class Qwen3Settings:
    """What the packed engine reads from a Qwen3 ``config.json``."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    rope_theta: float
    tied: bool
    attention_bias: bool


def _integer(config: dict[str, Any], key: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _Unsupported(key)
    return value


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise _Unsupported(key)
    return float(value)


def _flag(config: dict[str, Any], key: str, *, default: bool | None = None) -> bool:
    value = config.get(key, default)
    if not isinstance(value, bool):
        raise _Unsupported(key)
    return value


class _Unsupported(Exception):
    """A setting or tensor the packed engine does not implement (or is unsure of)."""


def _settings(config: dict[str, Any]) -> Qwen3Settings:
    """The engine's settings of a Qwen3 causal LM config; raises ``_Unsupported``
    where the model is not one, or is one the engine does not cover."""
    if config.get("model_type") != "qwen3":
        raise _Unsupported("model_type")
    if config.get("architectures", ["Qwen3ForCausalLM"]) != ["Qwen3ForCausalLM"]:
        raise _Unsupported("architectures")
    if config.get("quantization_config") is not None:
        raise _Unsupported("quantization_config")
    if config.get("hidden_act") != "silu":
        raise _Unsupported("hidden_act")
    if _flag(config, "use_sliding_window", default=False):
        raise _Unsupported("use_sliding_window")
    layers = _integer(config, "num_hidden_layers")
    layer_types = config.get("layer_types")
    if layer_types is not None and layer_types != ["full_attention"] * layers:
        raise _Unsupported("layer_types")
    heads = _integer(config, "num_attention_heads")
    kv_heads = config.get("num_key_value_heads")
    kv_heads = heads if kv_heads is None else _integer(config, "num_key_value_heads")
    head_dim = _integer(config, "head_dim")
    if heads % kv_heads or head_dim % 2:
        raise _Unsupported("head layout")
    # RoPE: transformers 5 writes ``rope_parameters``, 4.x ``rope_theta`` and
    # ``rope_scaling``; only the default (unscaled) rotary embedding is read here.
    rope = config.get("rope_parameters")
    if rope is None:
        if config.get("rope_scaling") is not None:
            raise _Unsupported("rope_scaling")
        rope = {"rope_type": "default", "rope_theta": config.get("rope_theta")}
    if not isinstance(rope, dict) or set(rope) - _ROPE_KEYS or rope.get("rope_type") != "default":
        raise _Unsupported("rope_parameters")
    return Qwen3Settings(
        vocab_size=_integer(config, "vocab_size"),
        hidden_size=_integer(config, "hidden_size"),
        intermediate_size=_integer(config, "intermediate_size"),
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        eps=_number(config.get("rms_norm_eps"), "rms_norm_eps"),
        rope_theta=_number(rope.get("rope_theta"), "rope_theta"),
        tied=_flag(config, "tie_word_embeddings"),
        attention_bias=_flag(config, "attention_bias", default=False),
    )


def _expected_shapes(settings: Qwen3Settings) -> dict[str, tuple[int, ...]]:
    """Every tensor a ``Qwen3ForCausalLM`` checkpoint holds, with its shape (the
    output head's only where it is not tied to the embedding)."""
    hidden, inner = settings.hidden_size, settings.intermediate_size
    q_size = settings.heads * settings.head_dim
    kv_size = settings.kv_heads * settings.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (settings.vocab_size, hidden),
        "model.norm.weight": (hidden,),
    }
    if not settings.tied:
        shapes["lm_head.weight"] = (settings.vocab_size, hidden)
    for i in range(settings.layers):
        prefix = f"model.layers.{i}."
        layer = {
            "input_layernorm.weight": (hidden,),
            "post_attention_layernorm.weight": (hidden,),
            "self_attn.q_proj.weight": (q_size, hidden),
            "self_attn.k_proj.weight": (kv_size, hidden),
            "self_attn.v_proj.weight": (kv_size, hidden),
            "self_attn.o_proj.weight": (hidden, q_size),
            "self_attn.q_norm.weight": (settings.head_dim,),
            "self_attn.k_norm.weight": (settings.head_dim,),
            "mlp.gate_proj.weight": (inner, hidden),
            "mlp.up_proj.weight": (inner, hidden),
            "mlp.down_proj.weight": (hidden, inner),
        }
        if settings.attention_bias:
            layer.update(
                {
                    "self_attn.q_proj.bias": (q_size,),
                    "self_attn.k_proj.bias": (kv_size,),
                    "self_attn.v_proj.bias": (kv_size,),
                    "self_attn.o_proj.bias": (hidden,),
                }
            )
        shapes.update({prefix + name: shape for name, shape in layer.items()})
    return shapes


_FLOAT_DTYPES = ("F32", "BF16", "F16")


class Qwen3Checkpoint:
    """An open checkpoint: its settings and its tensors, memory-mapped (close it, or
    use it as a context manager, once the engine has read them)."""

    def __init__(self, settings: Qwen3Settings, files: dict[str, Path]) -> None:
        from safetensors import safe_open

        self.settings = settings
        self._files = files
        self._handles: dict[Path, Any] = {}
        self._where: dict[str, Any] = {}
        try:
            for name, file in files.items():
                handle = self._handles.get(file)
                if handle is None:
                    handle = self._handles[file] = safe_open(file, framework="pt")
                self._where[name] = handle
            self._check()
        except BaseException:
            self.close()
            raise

    def _check(self) -> None:
        expected = _expected_shapes(self.settings)
        names = set(self._where)
        tied_head = self.settings.tied and "lm_head.weight" in names
        if tied_head:
            names.discard("lm_head.weight")
        if names != set(expected):
            raise _Unsupported("tensor names")
        for name, shape in expected.items():
            view = self._where[name].get_slice(name)
            if tuple(view.get_shape()) != shape or view.get_dtype() not in _FLOAT_DTYPES:
                raise _Unsupported(f"tensor {name}")
        if tied_head:
            # transformers ties the head to the embedding; a checkpoint whose stored
            # head differs from it is one this reader is unsure of.
            import torch

            if not torch.equal(
                self.tensor("lm_head.weight"), self.tensor("model.embed_tokens.weight")
            ):
                raise _Unsupported("an untied lm_head in a tied checkpoint")

    def tensor(self, name: str) -> torch.Tensor:
        """The stored tensor (in the file's dtype, memory-mapped: read-only)."""
        tensor: torch.Tensor = self._where[name].get_tensor(name)
        return tensor

    def embedding(self) -> torch.Tensor:
        """The input embedding as stored, through a mapping of its own: kept as it is
        (as transformers keeps a weight stored in the dtype it loads), it holds
        resident only the rows looked up, not the pages of the other tensors read
        through the checkpoint's mapping."""
        from safetensors import safe_open

        name = "model.embed_tokens.weight"
        with safe_open(self._files[name], framework="pt") as handle:
            tensor: torch.Tensor = handle.get_tensor(name)
        return tensor

    def output_rows(self, ids: list[int]) -> torch.Tensor:
        """Rows of the output head (the embedding's, where they are tied), as stored."""
        name = "model.embed_tokens.weight" if self.settings.tied else "lm_head.weight"
        return self.tensor(name)[ids]

    def close(self) -> None:
        for handle in self._handles.values():
            exit_ = getattr(handle, "__exit__", None)
            if exit_ is not None:
                exit_(None, None, None)
        self._handles.clear()
        self._where.clear()

    def __enter__(self) -> Qwen3Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def model_file(model: str, name: str) -> Path | None:
    """A file of a model: in its directory, or in the Hugging Face cache for a Hub id
    (downloaded where the Hub is reachable); ``None`` where there is none."""
    directory = Path(model).expanduser()
    if directory.is_dir():
        path = directory / name
        return path if path.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(model, name))
    except Exception:  # not on the Hub, offline, no such file: transformers decides
        return None


def open_qwen3(model: str) -> Qwen3Checkpoint | None:
    """The checkpoint of ``model`` (a directory or a Hub id), where the packed engine
    covers it; ``None`` where it does not, is not sure to, or the files are not
    safetensors (the caller then loads the model through transformers)."""
    config_file = model_file(model, "config.json")
    if config_file is None:
        return None
    try:
        settings = _settings(json.loads(config_file.read_text()))
    except (_Unsupported, ValueError, OSError):
        return None
    files: dict[str, Path] = {}
    index_file = model_file(model, _INDEX)
    single = model_file(model, _SAFETENSORS) if index_file is None else None
    try:
        if single is not None:
            from safetensors import safe_open

            with safe_open(single, framework="pt") as handle:
                files = dict.fromkeys(handle.keys(), single)
        elif index_file is not None:
            weight_map = json.loads(index_file.read_text())["weight_map"]
            shards: dict[str, Path] = {}
            for name, shard in weight_map.items():
                if shard not in shards:
                    path = model_file(model, str(shard))
                    if path is None:
                        return None
                    shards[shard] = path
                files[name] = shards[shard]
        else:
            return None
        return Qwen3Checkpoint(settings, files)
    except (_Unsupported, ValueError, KeyError, OSError):
        return None


def default_inv_freq(settings: Qwen3Settings) -> torch.Tensor:
    """The default RoPE's inverse frequencies (as transformers computes them)."""
    import torch

    dim = settings.head_dim
    return 1.0 / (settings.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


class DefaultRotary:
    """The default (unscaled) rotary embedding of transformers' Qwen3 model:
    ``(cos, sin)`` of ``positions x inv_freq``, each frequency twice, in ``x``'s dtype."""

    def __init__(self, inv_freq: torch.Tensor) -> None:
        self.inv_freq = inv_freq

    def __call__(
        self, x: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        freqs = position_ids[..., None].float() * self.inv_freq.to(
            device=x.device, dtype=torch.float
        )
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype=x.dtype), emb.sin().to(dtype=x.dtype)
