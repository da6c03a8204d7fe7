"""A Qwen3 decoder run on packed rows: the work of a QwenReranker forward pass.

The weights are a loaded ``Qwen3Model``'s own, or, on CPU, read straight from the
checkpoint's files with no transformers model built (``PackedQwen3.from_checkpoint``,
as ``QwenReranker`` loads a checkpoint this engine covers): each layer's tensors are
memory-mapped, cast to the dtype as transformers casts them, prepared and prepacked in
turn. On CPU (float32 or bfloat16, where torch has oneDNN) every projection runs as
oneDNN's prepacked linear (see ``linear``): the weight is reordered once, at load, not
on every call. When the engine owns a loaded model's weights (``own_weights``) the
plain copy is released, so the model is held once. Elsewhere the weights are used in
place. Prepacked, the MLP's SiLU and its gate-times-up product and both residual adds run
inside the matmuls as oneDNN post-ops, with no pass of their own over memory. The
prepacked copies are prepared for the engine (``PackedQwen3._prepacked``): q and k in
rotary pairs (below), the weights of the RMSNorms before attention and before the MLP
folded into the projections that read their output (one multiply pass less per norm),
and, for bf16 on a CPU with AMX tiles only, q/k/v stacked into one projection. Rows
of any length are packed into one ``[tokens, hidden]`` matrix: no padding is ever run
through a matrix multiply.

A row rests on a context: a cached prefix (per layer ``(keys, values)``), or the
tokens of an earlier row of the same pass (its *parent*, e.g. a query that every
document of a call shares), or nothing. Attention is split by where the keys come
from and the parts merged by their log-sum-exp (as cascade / shared-prefix
attention does), so no row's context is masked or copied per row:

* the context, unmasked: one call for all rows that share it;
* the row's own tokens before the current query block, unmasked;
* the block itself, causal.

On CPU two cases run as one masked call over the context and own keys joined (a copy
of both) instead, where one pass over the queries costs less than the parts and
their merges: a row block of at least 64 queries whose context is no longer than it
(a RAG passage), and, for bf16 on an AMX CPU, consecutive short blocks that share a
context, up to 128 queries per call (memory rows; see ``_WHOLE_QUERIES``).

The pass runs layer by layer, and within a layer in chunks of at most
``chunk_tokens`` tokens: each chunk's keys and values are written into one
buffer for the layer, then its queries, attention, output projection and MLP run
and its residual stream is updated in place (causality means a chunk never needs a
later chunk's keys). So the memory a pass holds is the residual stream and one
layer's keys and values (for Qwen3-0.6B in float32: 12 KiB per token, the least an
exact method can hold, since the last token attends to every token's keys and
values) plus one chunk's activations, however long a row is. In the last layer only
what the caller reads is computed: the last token of each scored row, and the keys
and values of a row whose cache is kept.

The arithmetic is the model's: RMSNorm in float32 as ``Qwen3RMSNorm``, rotary
embeddings from the model's own ``rotary_emb`` (any RoPE scaling it was configured
with), softmax attention with the model's scaling. Prepacked, q and k are produced
with each head's dimensions in rotary pairs (their projections' rows reordered, a
layout attention does not see), so each one's norm and rotary run in one float32
pass ending in a complex multiply and one rounding. Models this engine does
not cover (sliding-window layers, other activations) keep the transformers forward.

torch is imported inside functions only, so importing this module stays cheap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._calls import check_stop
from .checkpoint import DefaultRotary, Qwen3Checkpoint, default_inv_freq
from .cpu import cpu_has_amx
from .linear import Linear, can_prepack, release

if TYPE_CHECKING:
    import torch

__all__ = ["CHUNK_TOKENS", "PackedQwen3", "PackedRow", "checkpoint_engine", "packed_engine"]

# Activations are held for at most this many tokens at a time (a pass's token budget
# caps it further). Matrix multiplies of this height already run at the CPU's peak.
CHUNK_TOKENS = 2048
# A parent's cached prefix and its own keys are joined (copied once per layer) up
# to this many positions, so its children attend to them in one call.
_JOIN_CONTEXT = 4096
# Keys per block where the fused CPU kernel is not used (other devices).
_KEY_BLOCK = 1024
# bf16 attention of at most this many queries runs the fused CPU kernel in float32, on
# CPUs without AMX tiles (see ``PackedQwen3.upcast_queries``).
_UPCAST_QUERIES = 32
# Masked calls (fused CPU kernel only): a piece of at least _WHOLE_QUERIES queries
# whose context is no longer than its queries, and whose context and own keys number
# at most _MASKED_KEYS, attends in one masked call over them joined (a copy), not in
# parts merged: one pass over its queries instead of two or three. Where
# ``PackedQwen3.group_queries`` is set, shorter pieces that share a context attend
# likewise, up to that many queries per call. Longer contexts keep the parts.
_WHOLE_QUERIES = 64
_MASKED_KEYS = 1024
# Queries per masked call of short pieces: grouping applies only to bf16 on a CPU with
# AMX tiles (``_amx_bf16``), where the kernel's matmuls are cheap and its per-call
# passes are not.
_GROUP_QUERIES = 128

# Per decoder layer, (keys, values) of shape [1, kv_heads, length, head_dim].
_KV = list[tuple["torch.Tensor", "torch.Tensor"]]


@dataclass(frozen=True)
class PackedRow:
    """Tokens to run in one pass.

    ``prefix`` is a cached prefix of ``prefix_length`` positions (per layer ``(keys,
    values)`` of shape ``[1, kv_heads, length, head_dim]``, as this engine returned
    them: keys in its own dimension order), or ``None``. ``parent``
    is the index of an earlier row of the same pass that this row continues (the row
    then sees that row's context and tokens, and must have no ``prefix`` of its own);
    a parent has no parent. ``keep_kv`` returns the row's KV cache (its context's
    included); ``score`` returns its final-norm hidden state at its last token.
    """

    prefix: _KV | None
    prefix_length: int
    ids: Sequence[int]
    parent: int | None = None
    keep_kv: bool = False
    score: bool = True


@dataclass
class _Layer:
    q: Linear | None  # None: q, k and v come from ``qkv``
    k: Linear | None
    v: Linear | None
    qkv: Linear | None  # q, k and v stacked into one projection (prepacked)
    out: Linear
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    input_norm: torch.Tensor | None  # None: folded into q/k/v (prepacked)
    post_norm: torch.Tensor | None  # None: folded into gate/up (prepacked)
    gate: Linear
    up: Linear
    down: Linear


@dataclass(frozen=True)
class _LayerWeights:
    """One decoder layer's tensors as stored (a module's own, or a checkpoint's):
    each projection's ``(weight, bias)``, and the norm weights."""

    q: tuple[torch.Tensor, torch.Tensor | None]
    k: tuple[torch.Tensor, torch.Tensor | None]
    v: tuple[torch.Tensor, torch.Tensor | None]
    out: tuple[torch.Tensor, torch.Tensor | None]
    gate: tuple[torch.Tensor, torch.Tensor | None]
    up: tuple[torch.Tensor, torch.Tensor | None]
    down: tuple[torch.Tensor, torch.Tensor | None]
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    input_norm: torch.Tensor
    post_norm: torch.Tensor


def _weights_of(layer: Any) -> _LayerWeights:
    """A transformers ``Qwen3DecoderLayer``'s tensors (detached, in place)."""
    attention, mlp = layer.self_attn, layer.mlp

    def pair(module: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = None if module.bias is None else module.bias.detach()
        return module.weight.detach(), bias

    return _LayerWeights(
        q=pair(attention.q_proj),
        k=pair(attention.k_proj),
        v=pair(attention.v_proj),
        out=pair(attention.o_proj),
        gate=pair(mlp.gate_proj),
        up=pair(mlp.up_proj),
        down=pair(mlp.down_proj),
        q_norm=attention.q_norm.weight.detach(),
        k_norm=attention.k_norm.weight.detach(),
        input_norm=layer.input_layernorm.weight.detach(),
        post_norm=layer.post_attention_layernorm.weight.detach(),
    )


def _checkpoint_layer(checkpoint: Qwen3Checkpoint, index: int) -> _LayerWeights:
    """A checkpoint's tensors of decoder layer ``index`` (memory-mapped, as stored)."""
    prefix = f"model.layers.{index}."
    biased = checkpoint.settings.attention_bias

    def read(name: str) -> torch.Tensor:
        return checkpoint.tensor(prefix + name)

    def pair(name: str, *, bias: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        return read(f"{name}.weight"), read(f"{name}.bias") if bias else None

    return _LayerWeights(
        q=pair("self_attn.q_proj", bias=biased),
        k=pair("self_attn.k_proj", bias=biased),
        v=pair("self_attn.v_proj", bias=biased),
        out=pair("self_attn.o_proj", bias=biased),
        gate=pair("mlp.gate_proj"),
        up=pair("mlp.up_proj"),
        down=pair("mlp.down_proj"),
        q_norm=read("self_attn.q_norm.weight"),
        k_norm=read("self_attn.k_norm.weight"),
        input_norm=read("input_layernorm.weight"),
        post_norm=read("post_attention_layernorm.weight"),
    )


def packed_engine(
    decoder: Any, *, prepack: bool | None = None, own_weights: bool = False
) -> PackedQwen3 | None:
    """The packed engine for a loaded ``Qwen3Model``, or ``None`` where the model has
    a feature the engine does not implement (the caller then keeps transformers'
    own forward). ``prepack``: run the projections as oneDNN's prepacked linears
    (default: where :func:`can_prepack`); ``own_weights``: the engine then releases
    the decoder's plain projection weights (the decoder's own forward can no longer
    run, and says so if called)."""
    config = decoder.config
    if getattr(config, "model_type", None) not in ("qwen3",) and not hasattr(decoder, "layers"):
        return None
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    if any(kind != "full_attention" for kind in layer_types):
        return None
    if getattr(config, "hidden_act", "silu") != "silu":
        return None
    try:
        return PackedQwen3(decoder, prepack=prepack, own_weights=own_weights)
    except (AttributeError, TypeError, ValueError):
        return None


def checkpoint_engine(checkpoint: Qwen3Checkpoint, dtype: torch.dtype) -> PackedQwen3 | None:
    """The packed engine of a checkpoint read from its files (see
    :meth:`PackedQwen3.from_checkpoint`), on CPU; ``None`` where this torch cannot
    prepack ``dtype`` or oneDNN refuses a weight (the caller then loads the model
    through transformers)."""
    import torch

    if not can_prepack(torch.empty(0, dtype=dtype)):
        return None
    try:
        return PackedQwen3.from_checkpoint(checkpoint, dtype)
    except RuntimeError:
        return None


@dataclass(frozen=True)
class _Piece:
    """The queries of one row inside one chunk: ``q[lo:hi]`` of the chunk's queries,
    at stream positions ``[first, end)`` of the row that starts at ``start``."""

    row: int
    lo: int
    hi: int
    start: int
    first: int
    end: int


class PackedQwen3:
    """The decoder layers of a ``Qwen3Model`` over packed rows (see the module docs)."""

    def __init__(
        self, decoder: Any, *, prepack: bool | None = None, own_weights: bool = False
    ) -> None:
        config = decoder.config
        heads = int(config.num_attention_heads)
        self._describe(
            embed_tokens=decoder.embed_tokens,
            rotary=decoder.rotary_emb,
            norm=decoder.norm.weight,
            eps=float(config.rms_norm_eps),
            heads=heads,
            kv_heads=int(config.num_key_value_heads),
            head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
        )
        if prepack is None:
            prepack = can_prepack(self.norm)
        for layer in decoder.layers:
            attention, mlp = layer.self_attn, layer.mlp
            if attention.q_norm.variance_epsilon != self.eps:
                raise ValueError("per-layer epsilons differ")
            if mlp.gate_proj.bias is not None or mlp.up_proj.bias is not None:
                raise ValueError("MLP biases")
            if mlp.down_proj.bias is not None:
                raise ValueError("MLP biases")
            self.scaling = float(attention.scaling)
        # Prepacked (the copy is made anyway), q and k come out of their projections
        # with each head's dimensions in rotary pairs, (i, i + head_dim / 2) side by
        # side: attention only takes q.k, which any common order of q's and k's
        # dimensions leaves unchanged, and in pairs the norm and rotary run as one
        # float32 pass and one complex multiply (see ``_norm_rope``).
        self.pairs = prepack and self._rotary_in_halves(device=self.norm.device)
        self.stack_qkv = prepack and _amx_bf16(self.norm.dtype)
        self.layers: list[_Layer] = []
        if prepack:
            try:
                scratch = _Scratch()
                self.layers = [
                    self._prepacked(_weights_of(layer), scratch=scratch) for layer in decoder.layers
                ]
            except RuntimeError:  # oneDNN refused a weight: every projection stays plain
                self.layers = []
        self.prepacked = bool(self.layers)
        if not self.prepacked:
            self.pairs = self.stack_qkv = False
            self.layers = [self._plain(layer) for layer in decoder.layers]
        if self.prepacked and own_weights:
            for layer in decoder.layers:
                for module in _projections(layer):
                    release(module, "the packed Qwen3 engine (PackedQwen3.forward)")
        self._kernels()

    @classmethod
    def from_checkpoint(cls, checkpoint: Qwen3Checkpoint, dtype: torch.dtype) -> PackedQwen3:
        """The engine of a checkpoint read from its files (on CPU, prepacked), with no
        transformers model built: each layer's tensors are read (memory-mapped), cast to
        ``dtype``, prepared and prepacked in turn, so only the prepacked copies are
        held, plus the embedding (memory-mapped, as stored) and the norms in
        ``dtype``. Raises ``RuntimeError`` where oneDNN refuses a weight (the
        caller then loads through transformers)."""
        import torch

        settings = checkpoint.settings
        engine = cls.__new__(cls)
        # The embedding stays memory-mapped as stored (only the rows looked up are
        # ever read; it is never written), as transformers keeps one stored in
        # ``dtype``; one stored in another dtype has each row looked up cast to
        # ``dtype``, the rows transformers' cast table holds.
        table = torch.nn.Embedding(
            num_embeddings=settings.vocab_size,
            embedding_dim=settings.hidden_size,
            _weight=checkpoint.embedding(),
            _freeze=True,
        )
        engine._describe(
            embed_tokens=table if table.weight.dtype == dtype else _CastRows(table, dtype),
            rotary=DefaultRotary(default_inv_freq(settings)),
            norm=checkpoint.tensor("model.norm.weight").to(dtype, copy=True),
            eps=settings.eps,
            heads=settings.heads,
            kv_heads=settings.kv_heads,
            head_dim=settings.head_dim,
        )
        engine.scaling = settings.head_dim**-0.5  # as Qwen3Attention's
        engine.pairs = engine._rotary_in_halves(device=engine.norm.device)
        engine.stack_qkv = _amx_bf16(dtype)
        engine.layers = []
        scratch = _Scratch()
        for index in range(settings.layers):
            weights = _checkpoint_layer(checkpoint, index)
            engine.layers.append(engine._prepacked(weights, dtype=dtype, scratch=scratch))
        engine.prepacked = True
        engine._kernels()
        return engine

    def _describe(
        self,
        *,
        embed_tokens: Any,
        rotary: Any,
        norm: torch.Tensor,
        eps: float,
        heads: int,
        kv_heads: int,
        head_dim: int,
    ) -> None:
        self.embed_tokens = embed_tokens
        self.rotary = rotary
        self.norm = norm
        self.eps = eps
        self.heads = heads
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        if self.heads % self.kv_heads or self.head_dim % 2:
            raise ValueError("unsupported head layout")

    def _kernels(self) -> None:
        import torch

        # The fused CPU flash-attention kernel returns the log-sum-exp the merge needs.
        self._flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
        # bf16 attention of at most this many queries runs the fused kernel in float32
        # on CPUs without AMX tiles; with AMX tiles attention stays in bf16.
        self.upcast_queries = 0 if cpu_has_amx() else _UPCAST_QUERIES
        self.group_queries = _GROUP_QUERIES if _amx_bf16(self.norm.dtype) else 0

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the engine runs in (its weights' and activations')."""
        return self.norm.dtype

    # -- the layers' weights -------------------------------------------------------------

    def _plain(self, layer: Any) -> _Layer:
        """A decoder layer's projections on the model's own weights, in place."""
        attention = layer.self_attn
        q, k, v, out, gate, up, down = (
            Linear(module, prepack=False) for module in _projections(layer)
        )
        return _Layer(
            q=q,
            k=k,
            v=v,
            qkv=None,
            out=out,
            q_norm=attention.q_norm.weight,
            k_norm=attention.k_norm.weight,
            input_norm=layer.input_layernorm.weight,
            post_norm=layer.post_attention_layernorm.weight,
            gate=gate,
            up=up,
            down=down,
        )

    def _prepacked(
        self,
        weights: _LayerWeights,
        *,
        dtype: torch.dtype | None = None,
        scratch: _Scratch | None = None,
    ) -> _Layer:
        """A decoder layer's projections prepacked for oneDNN, on copies prepared for
        the engine (in ``dtype``, default the weights' own): the RMSNorm weights before
        attention and before the MLP folded into the projections that read them (one
        pass less per norm), q and k in rotary pairs (``pairs``), q/k/v stacked
        (``stack_qkv``). Each copy is prepared in ``scratch`` (buffers reused from
        layer to layer) and prepacked before the next is made. Raises
        ``RuntimeError`` where oneDNN refuses a weight."""
        import torch

        dtype = weights.q[0].dtype if dtype is None else dtype
        scratch = _Scratch() if scratch is None else scratch
        before, after = weights.input_norm.to(dtype), weights.post_norm.to(dtype)
        q_norm, k_norm = weights.q_norm.to(dtype, copy=True), weights.k_norm.to(dtype, copy=True)
        pairs = None
        if self.pairs:  # each head's dimensions in pairs (i, i + half)
            pairs = self.head_dim
            # The norm and rotary pass over q and k runs in float32.
            q_norm = _in_pairs(q_norm, pairs).reshape(-1).float()
            k_norm = _in_pairs(k_norm, pairs).reshape(-1).float()

        def packed(
            stored: tuple[torch.Tensor, torch.Tensor | None],
            pairs: int | None = None,
            columns: torch.Tensor | None = None,
        ) -> Linear:
            weight = _prepared(stored[0], dtype, scratch, pairs=pairs, columns=columns)
            return Linear.from_weight(weight, _prepared_bias(stored[1], dtype, pairs=pairs))

        qkv = ((weights.q, pairs), (weights.k, pairs), (weights.v, None))
        stacked = separate = None
        if self.stack_qkv:
            sizes = [len(stored[0]) for stored, _ in qkv]
            weight = scratch.take("stacked", (sum(sizes), weights.q[0].shape[1]), dtype)
            first = 0
            biases = []
            for (stored, in_pairs), size in zip(qkv, sizes, strict=True):
                part = weight[first : first + size]
                _prepared(stored[0], dtype, scratch, pairs=in_pairs, columns=before, out=part)
                bias = _prepared_bias(stored[1], dtype, pairs=in_pairs)
                biases.append(part.new_zeros(size) if bias is None else bias)
                first += size
            any_bias = any(stored[1] is not None for stored, _ in qkv)
            stacked = Linear.from_weight(weight, torch.cat(biases) if any_bias else None)
        else:
            separate = [packed(stored, in_pairs, before) for stored, in_pairs in qkv]
        return _Layer(
            q=None if separate is None else separate[0],
            k=None if separate is None else separate[1],
            v=None if separate is None else separate[2],
            qkv=stacked,
            out=packed(weights.out),
            q_norm=q_norm,
            k_norm=k_norm,
            input_norm=None,
            post_norm=None,
            gate=packed(weights.gate, columns=after),
            up=packed(weights.up, columns=after),
            down=packed(weights.down),
        )

    # -- small pieces --------------------------------------------------------------------

    def _rotary_in_halves(self, *, device: Any) -> bool:
        """Whether the model's rotary embedding turns dimension pairs (i, i + half)
        by one angle each (cos and sin repeat across the halves), as every RoPE
        variant transformers implements does; probed on a few positions."""
        import torch

        positions = torch.arange(64, device=device)[None]
        cos, sin = self.rotary(torch.zeros(1, dtype=torch.float32, device=device), positions)
        half = self.head_dim // 2
        return bool(
            cos.shape[-1] == self.head_dim
            and torch.equal(cos[..., :half], cos[..., half:])
            and torch.equal(sin[..., :half], sin[..., half:])
        )

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """``Qwen3RMSNorm``: the statistics in float32, the weight in the input dtype
        (``None``: the weight is folded into the projections that read the result)."""
        import torch

        dtype = x.dtype
        if dtype == torch.float32:
            return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, self.eps)
        x = self._normalized(x)
        return x.to(dtype) if weight is None else x.to(dtype).mul_(weight)

    def _normalized(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` over its last dimension's root mean square, as a new float32 tensor:
        Qwen3RMSNorm's statistics in few passes (the mean square as a float32 norm
        squared, no tensor of squares; the scaling in place)."""
        import torch

        y = x.to(torch.float32)
        scale = torch.linalg.vector_norm(y, dim=-1, keepdim=True)
        return y.mul_(scale.square_().div_(y.shape[-1]).add_(self.eps).rsqrt_())

    def _norm_rope(
        self, x: torch.Tensor, weight: torch.Tensor, turns: torch.Tensor, out: torch.Tensor
    ) -> None:
        """``Qwen3RMSNorm`` then the rotary embedding of ``x`` [n, heads, dim] in pair
        order (``weight`` in pair order, float32), into ``out``: in float32 and
        rounded once, where ``_rms_norm`` + ``_rope`` round to bf16 after each step.
        The rotation is one complex multiply by ``turns`` [n, 1, dim / 2] (cos + i
        sin of each pair's angle)."""
        import torch

        if x.dtype == torch.float32:
            y = torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, self.eps)
        else:
            y = self._normalized(x).mul_(weight)
        pairs = torch.view_as_complex(y.view(*y.shape[:-1], -1, 2))
        if out.dtype == torch.float32:
            torch.mul(pairs, turns, out=torch.view_as_complex(out.view(*out.shape[:-1], -1, 2)))
        else:
            pairs.mul_(turns)
            out.copy_(y)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor) -> None:
        """``x * cos + rotate_half(x) * sin`` into ``out`` (x: [n, heads, dim];
        cos, sin: [n, 1, dim]), half by half without materialising rotate_half."""
        import torch

        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        o1, o2 = out[..., :half], out[..., half:]
        torch.mul(x1, cos[..., :half], out=o1).addcmul_(x2, sin[..., :half], value=-1)
        torch.mul(x2, cos[..., half:], out=o2).addcmul_(x1, sin[..., half:])

    def _attention(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        *,
        causal: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax attention of ``query`` [1, heads, n, dim] over ``keys``/``values``
        [1, kv_heads, m, dim] (causal: n == m, query i sees keys <= i); returns the
        output [1, heads, n, dim] and the log-sum-exp of the scores [1, heads, n]."""
        import torch

        if self._flash is not None and query.device.type == "cpu":
            if query.dtype == torch.bfloat16 and query.shape[2] <= self.upcast_queries:
                fused, fused_lse = self._flash(
                    query.float(), keys.float(), values.float(), 0.0, causal, scale=self.scaling
                )
                return fused.to(query.dtype), fused_lse
            fused, fused_lse = self._flash(query, keys, values, 0.0, causal, scale=self.scaling)
            return fused, fused_lse
        # Elsewhere: plain softmax attention in float32, the keys in blocks so that
        # memory stays bounded by the chunk, the blocks merged like the parts are.
        group = self.heads // self.kv_heads
        if causal:
            blocks = [(0, keys.shape[2])]
        else:
            length = keys.shape[2]
            blocks = [(s, min(s + _KEY_BLOCK, length)) for s in range(0, length, _KEY_BLOCK)]
        output: torch.Tensor | None = None
        lse = torch.empty(0)
        for first, end in blocks:
            block_k = keys[:, :, first:end].float().repeat_interleave(group, dim=1)
            block_v = values[:, :, first:end].float().repeat_interleave(group, dim=1)
            scores = torch.matmul(query.float(), block_k.transpose(-1, -2)) * self.scaling
            if causal:
                n = scores.shape[-1]
                above = torch.ones((n, n), dtype=torch.bool, device=scores.device).triu(1)
                scores = scores.masked_fill(above, float("-inf"))
            block_lse = torch.logsumexp(scores, dim=-1)
            part = torch.matmul(torch.exp(scores - block_lse[..., None]), block_v)
            if output is None:
                output, lse = part, block_lse
            else:
                self._merge(output, lse, part, block_lse)
        assert output is not None
        return output.to(query.dtype), lse

    @staticmethod
    def _merge(
        output: torch.Tensor, lse: torch.Tensor, part: torch.Tensor, part_lse: torch.Tensor
    ) -> None:
        """Fold one more attention part into ``output``/``lse`` in place: each part's
        softmax weighs its keys, the log-sum-exps weigh the parts."""
        import torch

        weight = torch.sigmoid(part_lse - lse)
        output.lerp_(part, weight.unsqueeze(-1).to(output.dtype))
        torch.logaddexp(lse, part_lse, out=lse)

    # -- the pass ------------------------------------------------------------------------

    def forward(self, rows: Sequence[PackedRow], *, chunk_tokens: int = CHUNK_TOKENS) -> list[Any]:
        """Run ``rows`` as one pass; for each row its KV cache (``keep_kv``; prefix and
        parent included), else its final-norm hidden state at its last token
        (``score``), else ``None``."""
        import torch

        if not rows or chunk_tokens < 1:
            raise ValueError("no rows, or no room per chunk")
        device = self.norm.device
        lengths = [len(row.ids) for row in rows]
        if min(lengths) < 1:
            raise ValueError("a row has no tokens")
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        total = starts[-1]
        offsets = []
        for i, row in enumerate(rows):
            if row.parent is None:
                offsets.append(row.prefix_length)
                continue
            parent = rows[row.parent]
            if not 0 <= row.parent < i or parent.parent is not None or row.prefix is not None:
                raise ValueError("a parent must be an earlier root row")
            offsets.append(parent.prefix_length + lengths[row.parent])

        ids = torch.tensor([token for row in rows for token in row.ids], dtype=torch.long)
        # The embedding module is called as transformers does (its hooks see the ids).
        hidden = self.embed_tokens(ids.to(device)[None])[0]  # [tokens, hidden]
        positions = torch.cat(
            [torch.arange(offset, offset + n) for offset, n in zip(offsets, lengths, strict=True)]
        ).to(device)
        if self.pairs:  # each pair's turn, cos + i sin, in float32: [tokens, 1, dim / 2]
            half = self.head_dim // 2
            cos, sin = self.rotary(hidden.new_zeros(1, dtype=torch.float32), positions[None])
            turns = torch.complex(cos[0, :, :half], sin[0, :, :half])[:, None, :]
        else:
            cos, sin = self.rotary(hidden[None], positions[None])
            cos, sin = cos[0][:, None, :], sin[0][:, None, :]  # [tokens, 1, head_dim]

        chunks = [(a, min(a + chunk_tokens, total)) for a in range(0, total, chunk_tokens)]
        # The residual stream, chunk by chunk (each layer replaces a chunk's tensor).
        stream = [hidden[a:b] for a, b in chunks]
        del hidden
        spans = [(i, starts[i], starts[i + 1]) for i in range(len(rows))]
        finals: dict[int, torch.Tensor] = {}
        kept: list[_KV] = [[] for _ in rows]
        q_size = self.heads * self.head_dim
        kv_size = self.kv_heads * self.head_dim
        last_layer = len(self.layers) - 1

        for index, layer in enumerate(self.layers):
            check_stop()  # a latency budget stops the pass between layers
            final = index == last_layer
            keys = stream[0].new_empty((1, self.kv_heads, total, self.head_dim))
            values = stream[0].new_empty((1, self.kv_heads, total, self.head_dim))
            contexts = _Contexts(rows, index, starts, keys, values)
            for c, (a, b) in enumerate(chunks):
                h = stream[c]
                x = self._rms_norm(h, layer.input_norm)
                if layer.qkv is not None:  # one stacked projection, read in slices
                    stacked = layer.qkv(x)
                    q_all = stacked[:, :q_size]
                    k = stacked[:, q_size : q_size + kv_size]
                    v = stacked[:, q_size + kv_size :]
                else:
                    assert layer.k is not None and layer.v is not None
                    k, v = layer.k(x), layer.v(x)
                k = k.view(b - a, self.kv_heads, self.head_dim)
                if self.pairs:
                    self._norm_rope(k, layer.k_norm, turns[a:b], keys[0, :, a:b].transpose(0, 1))
                else:
                    k = self._rms_norm(k, layer.k_norm)
                    self._rope(k, cos[a:b], sin[a:b], keys[0, :, a:b].transpose(0, 1))
                v = v.view(b - a, self.kv_heads, self.head_dim)
                values[0, :, a:b].copy_(v.transpose(0, 1))
                pieces = _pieces(rows, spans, a, b, final=final)
                if not pieces:
                    continue
                picks: Any = slice(None)
                if final:  # only the last token of each scored row is read
                    picks = torch.tensor([p.first - a for p in pieces], device=device)
                    h = h[picks]
                n = h.shape[0]
                if layer.qkv is not None:
                    q = q_all[picks] if final else q_all
                else:
                    assert layer.q is not None
                    q = layer.q(x[picks] if final else x)
                q = q.view(n, self.heads, self.head_dim)
                roped = torch.empty_like(q)
                if self.pairs:
                    self._norm_rope(q, layer.q_norm, turns[a:b][picks], roped)
                else:
                    q = self._rms_norm(q, layer.q_norm)
                    self._rope(q, cos[a:b][picks], sin[a:b][picks], roped)
                attended = self._attend(roped, pieces, rows, contexts, keys, values)
                # (h is a copy in the last layer, of the picked rows.)
                h = layer.out.plus(attended.view(n, q_size), h)
                x = self._rms_norm(h, layer.post_norm)
                h = layer.down.plus(layer.up.times(x, layer.gate.silu(x)), h)
                if not final:
                    stream[c] = h
                else:
                    for j, piece in enumerate(pieces):
                        finals[piece.row] = h[j]
            for i, row in enumerate(rows):
                if row.keep_kv:
                    own_k = keys[:, :, starts[i] : starts[i + 1]]
                    own_v = values[:, :, starts[i] : starts[i + 1]]
                    parts_k = [part[0] for part in contexts.of(i)] + [own_k]
                    parts_v = [part[1] for part in contexts.of(i)] + [own_v]
                    kept[i].append((torch.cat(parts_k, 2), torch.cat(parts_v, 2)))
            del keys, values, contexts
        out: list[Any] = [None] * len(rows)
        for i, row in enumerate(rows):
            if row.keep_kv:
                out[i] = kept[i]
            elif row.score:
                out[i] = self._rms_norm(finals[i], self.norm)
        return out

    def _attend(
        self,
        q: torch.Tensor,
        pieces: Sequence[_Piece],
        rows: Sequence[PackedRow],
        contexts: _Contexts,
        keys: torch.Tensor,
        values: torch.Tensor,
    ) -> torch.Tensor:
        """Attention output [n, heads, dim] for the chunk's queries ``q`` [n, heads,
        dim] (rotated), each query over its row's context and its row's own keys up to
        itself."""
        queries = q.transpose(0, 1)[None]  # [1, heads, n, dim], a view
        attended = q.new_empty(q.shape)  # the out projection reads it as [n, heads * dim]
        output = attended.transpose(0, 1)[None]  # [1, heads, n, dim], a view
        lse = q.new_empty((1, self.heads, q.shape[0]), dtype=_float32())
        filled = [False] * len(pieces)
        # Pieces whose whole attention is one masked call (nothing to merge).
        masked = [False] * len(pieces)
        for group in self._groups(pieces, contexts, queries.device):
            self._masked([pieces[j] for j in group], contexts, queries, keys, values, output)
            for j in group:
                masked[j] = True
        # Context first: one call for each run of pieces that share a context.
        j = 0
        while j < len(pieces):
            if masked[j]:
                j += 1
                continue
            context = contexts.of(pieces[j].row)
            end = j + 1
            while (
                end < len(pieces)
                and not masked[end]
                and _same(contexts.of(pieces[end].row), context)
            ):
                end += 1
            if context:
                lo, hi = pieces[j].lo, pieces[end - 1].hi
                for keys_part, values_part in context:
                    part, part_lse = self._attention(
                        queries[:, :, lo:hi], keys_part, values_part, causal=False
                    )
                    if filled[j]:
                        self._merge(output[:, :, lo:hi], lse[:, :, lo:hi], part, part_lse)
                    else:
                        output[:, :, lo:hi] = part
                        lse[:, :, lo:hi] = part_lse
                        for filled_index in range(j, end):
                            filled[filled_index] = True
            j = end
        # Then each piece's own keys: those before the piece, then the piece's, causal.
        for j, piece in enumerate(pieces):
            if masked[j]:
                continue
            lo, hi = piece.lo, piece.hi
            parts = []
            if piece.first > piece.start:
                parts.append((piece.start, piece.first, False))
            parts.append((piece.first, piece.end, True))
            for first, end, causal in parts:
                part, part_lse = self._attention(
                    queries[:, :, lo:hi],
                    keys[:, :, first:end],
                    values[:, :, first:end],
                    causal=causal,
                )
                if filled[j]:
                    self._merge(output[:, :, lo:hi], lse[:, :, lo:hi], part, part_lse)
                else:
                    output[:, :, lo:hi] = part
                    lse[:, :, lo:hi] = part_lse
                    filled[j] = True
        return attended

    def _groups(
        self, pieces: Sequence[_Piece], contexts: _Contexts, device: Any
    ) -> list[list[int]]:
        """Runs of consecutive pieces (their indices) that attend in one masked call
        each (see ``_WHOLE_QUERIES``)."""
        if self._flash is None or device.type != "cpu":
            return []
        groups = []
        j = 0
        while j < len(pieces):
            context = contexts.of(pieces[j].row)
            length = sum(part[0].shape[2] for part in context)
            n = pieces[j].hi - pieces[j].lo
            own = pieces[j].end - pieces[j].start
            if not context or length + own > _MASKED_KEYS:
                j += 1
                continue
            if n >= _WHOLE_QUERIES:
                if length <= n:
                    groups.append([j])
                j += 1
                continue
            if not self.group_queries:
                j += 1
                continue
            group, size, width = [j], n, length + own
            j += 1
            while j < len(pieces):
                n = pieces[j].hi - pieces[j].lo
                own = pieces[j].end - pieces[j].start
                if n >= _WHOLE_QUERIES or size + n > self.group_queries:
                    break
                if width + own > _MASKED_KEYS or not _same(contexts.of(pieces[j].row), context):
                    break
                group.append(j)
                size, width = size + n, width + own
                j += 1
            groups.append(group)
        return groups

    def _masked(
        self,
        group: Sequence[_Piece],
        contexts: _Contexts,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        output: torch.Tensor,
    ) -> None:
        """The attention of consecutive pieces that share a context, as one call over
        the context and each piece's own keys up to its last query (joined), masked so
        that each query sees the context and its own row's keys up to itself."""
        import torch

        context = contexts.of(group[0].row)
        length = sum(part[0].shape[2] for part in context)
        owns = [slice(piece.start, piece.end) for piece in group]
        joined_k = torch.cat([part[0] for part in context] + [keys[:, :, own] for own in owns], 2)
        joined_v = torch.cat([part[1] for part in context] + [values[:, :, own] for own in owns], 2)
        lo, hi = group[0].lo, group[-1].hi
        total = joined_k.shape[2]
        seen = torch.zeros((hi - lo, total), dtype=torch.bool, device=queries.device)
        seen[:, :length] = True
        column = length
        for piece in group:
            rows, width = piece.hi - piece.lo, piece.end - piece.start
            # Query i of the piece sees its row's keys up to itself: first - start + i.
            block = seen[piece.lo - lo : piece.hi - lo, column : column + width]
            block.copy_(torch.ones((rows, width), dtype=torch.bool).tril_(width - rows))
            column += width
        mask = torch.zeros((hi - lo, total), dtype=queries.dtype, device=queries.device)
        mask.masked_fill_(seen.logical_not_(), float("-inf"))
        assert self._flash is not None
        part, _ = self._flash(
            queries[:, :, lo:hi],
            joined_k,
            joined_v,
            0.0,
            False,
            attn_mask=mask,
            scale=self.scaling,
        )
        output[:, :, lo:hi] = part


class _Contexts:
    """Each row's context keys/values in one layer: its cached prefix, or its parent's
    cached prefix and (views of) the parent's own keys/values, built when first asked
    for (by then the parent's keys and values of this layer are written)."""

    def __init__(
        self,
        rows: Sequence[PackedRow],
        index: int,
        starts: Sequence[int],
        keys: torch.Tensor,
        values: torch.Tensor,
    ) -> None:
        self.rows, self.index, self.starts = rows, index, starts
        self.keys, self.values = keys, values
        self._parents: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def of(self, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        import torch

        this = self.rows[row]
        if this.parent is None:
            return [] if this.prefix is None else [this.prefix[self.index]]
        context = self._parents.get(this.parent)
        if context is not None:
            return context
        parent = self.rows[this.parent]
        first, end = self.starts[this.parent], self.starts[this.parent + 1]
        own = (self.keys[:, :, first:end], self.values[:, :, first:end])
        context = [own]
        if parent.prefix is not None:
            cached = parent.prefix[self.index]
            context = [cached, own]
            if cached[0].shape[2] + own[0].shape[2] <= _JOIN_CONTEXT:
                # A short context costs one attention call, not one per part.
                context = [(torch.cat([cached[0], own[0]], 2), torch.cat([cached[1], own[1]], 2))]
        self._parents[this.parent] = context
        return context


def _projections(layer: Any) -> tuple[Any, ...]:
    """A decoder layer's linear modules: q, k, v, out, gate, up, down."""
    attention, mlp = layer.self_attn, layer.mlp
    return (
        attention.q_proj,
        attention.k_proj,
        attention.v_proj,
        attention.o_proj,
        mlp.gate_proj,
        mlp.up_proj,
        mlp.down_proj,
    )


def _amx_bf16(dtype: Any) -> bool:
    """bf16 on a CPU with AMX tiles: where prepacked q, k and v run as one stacked
    projection and short pieces attend in grouped masked calls (``group_queries``).
    float32, and bf16 without AMX, keep separate projections and one call per part."""
    import torch

    return bool(dtype == torch.bfloat16 and cpu_has_amx())


class _CastRows:
    """An embedding table stored in another dtype than the engine's: the rows looked
    up, cast to ``dtype`` (equal to looking them up in the table cast whole, without
    reading or holding the rest)."""

    def __init__(self, table: Any, dtype: torch.dtype) -> None:
        self.table = table
        self.dtype = dtype

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        rows: torch.Tensor = self.table(ids).to(self.dtype)
        return rows


class _Scratch:
    """Buffers reused while weights are prepared, one per use (grown as needed): each
    prepared copy lives only until it is prepacked, so after the first layer none
    costs a fresh allocation (and its page faults)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, use: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        import torch

        size = math.prod(shape)
        buffer = self._buffers.get(use)
        if buffer is None or buffer.dtype != dtype or buffer.numel() < size:
            buffer = self._buffers[use] = torch.empty(size, dtype=dtype)
        return buffer[:size].view(shape)


def _in_pairs(tensor: torch.Tensor, head_dim: int) -> torch.Tensor:
    """A view of ``tensor`` (contiguous; its first dimension heads of ``head_dim``
    outputs each) with each head's dimensions in rotary pairs (i, i + head_dim / 2):
    its reshape to ``tensor``'s shape has as output ``h * head_dim + 2 i + s`` the
    output ``h * head_dim + s * head_dim / 2 + i``."""
    half = head_dim // 2
    return tensor.view(-1, 2, half, *tensor.shape[1:]).transpose(1, 2)


def _prepared(
    weight: torch.Tensor,
    dtype: torch.dtype,
    scratch: _Scratch,
    *,
    pairs: int | None = None,
    columns: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """A projection's weight in ``dtype``, prepared for prepacking (in ``scratch`` or
    ``out``; the stored weight is never written, and is returned itself where nothing
    changes): ``pairs`` (a head size) puts each head's outputs in rotary pairs (see
    :func:`_in_pairs`; in the same pass as the cast), ``columns`` (in ``dtype``)
    multiplies each input feature in float32, the product rounded once to ``dtype`` (a
    norm's weight folded in)."""
    import torch

    weight = weight.detach()
    shape = tuple(weight.shape)
    if pairs is not None:
        target = scratch.take("cast", shape, dtype)
        target.view(-1, pairs // 2, 2, *shape[1:]).copy_(_in_pairs(weight, pairs))
        weight = target
    elif weight.dtype != dtype:  # the model's weight in dtype, as transformers casts it
        weight = scratch.take("cast", shape, dtype).copy_(weight)
    if columns is not None:
        product = scratch.take("fold", shape, torch.float32).copy_(weight)
        product.mul_(columns.detach().float())
        if dtype == torch.float32 and out is None:
            return product
        weight = (scratch.take("cast", shape, dtype) if out is None else out).copy_(product)
    if out is not None and weight is not out:
        out.copy_(weight)
        return out
    return weight


def _prepared_bias(
    bias: torch.Tensor | None, dtype: torch.dtype, *, pairs: int | None = None
) -> torch.Tensor | None:
    """A projection's bias (if any) as a copy in ``dtype``, its outputs in rotary
    pairs like the weight's (see :func:`_prepared`)."""
    if bias is None:
        return None
    bias = bias.detach().to(dtype, copy=True)
    return bias if pairs is None else _in_pairs(bias, pairs).reshape(-1)


def _pieces(
    rows: Sequence[PackedRow],
    spans: Sequence[tuple[int, int, int]],
    a: int,
    b: int,
    *,
    final: bool,
) -> list[_Piece]:
    """The queries of stream positions ``[a, b)``, row by row: all of them, or in the
    last layer only the last token of each scored row that ends in the chunk."""
    pieces = []
    lo = 0
    for row, start, end in spans:
        if end <= a or start >= b:
            continue
        if final:
            if end > b or not rows[row].score or rows[row].keep_kv:
                continue
            pieces.append(_Piece(row, lo, lo + 1, start, end - 1, end))
            lo += 1
            continue
        first, last = max(start, a), min(end, b)
        pieces.append(_Piece(row, lo, lo + last - first, start, first, last))
        lo += last - first
    return pieces


def _float32() -> Any:
    import torch

    return torch.float32


def _same(
    first: Sequence[tuple[torch.Tensor, torch.Tensor]],
    second: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> bool:
    """Whether two contexts are the same keys/values (the same tensors, viewed alike)."""
    if len(first) != len(second):
        return False
    for (k1, _), (k2, _) in zip(first, second, strict=True):
        if k1 is k2:
            continue
        if k1.data_ptr() != k2.data_ptr() or k1.shape != k2.shape or k1.stride() != k2.stride():
            return False
    return True
