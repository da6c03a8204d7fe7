"""A BERT-family cross-encoder run on packed rows: the work of a CrossEncoderReranker
forward pass, for ``BertForSequenceClassification`` and
``XLMRobertaForSequenceClassification`` checkpoints (``cross-encoder/ms-marco-*``,
``BAAI/bge-reranker-*``).

Two things a padded transformers forward does are skipped:

* padding in the matrix multiplies: a pass's rows are packed into one ``[tokens,
  hidden]`` matrix for every linear layer; only attention, which is per row, sees
  them padded to the longest row of their group (groups of similar length);
* in the last layer, everything but the first token of each row: the head reads only
  that token (the ``[CLS]`` pooler / classification head), so the last layer runs
  keys and values for every token but queries, attention output, feed-forward and
  head for one token per row.

Everything else is the model's own: embeddings (modules called in place, with
explicit positions, so RoBERTa's padding-offset positions are the same as its
forward computes), the attention's query/key/value linears and its scaling, the
output and feed-forward blocks with their LayerNorms and activation, the pooler and
the classifier. The layers' linears run as ``_linear.Linear``: on CPU oneDNN's
prepacked linear (the plain copy released where the engine owns the weights), else
the module's own weight. So the scores are the transformers forward's, up to float
rounding. Other models keep the transformers forward.

torch is imported inside functions only, so importing this module stays cheap.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .batching import limit_padding
from .linear import can_prepack, linears, release

if TYPE_CHECKING:
    import torch

__all__ = ["PackedBert", "packed_bert"]

# Attention groups: split a pass where over a tenth of a group's attention would run
# on padding, but not below this many padded tokens.
_ATTENTION_PADDING = 0.1
_ATTENTION_MIN_TOKENS = 512


# The blocks of a layer, by class name, that the engine computes as their forward does.
_BLOCKS = {
    "attention": ("BertSelfAttention", "XLMRobertaSelfAttention"),
    "attention_output": ("BertSelfOutput", "XLMRobertaSelfOutput"),
    "intermediate": ("BertIntermediate", "XLMRobertaIntermediate"),
    "output": ("BertOutput", "XLMRobertaOutput"),
}


def packed_bert(
    model: Any, *, prepack: bool | None = None, own_weights: bool = False
) -> PackedBert | None:
    """A packed engine for ``model``, or ``None`` where it is not a model this engine
    computes exactly (then the transformers forward runs). ``prepack``: the layers'
    linears run as oneDNN's prepacked linears (default: where
    :func:`~memos_rerank_integrations._linear.can_prepack`); ``own_weights``: their
    plain weights are then released (the model's own forward refuses to run)."""
    from transformers import BertForSequenceClassification, XLMRobertaForSequenceClassification

    config = model.config
    encoder_model: Any
    first_position: int
    if type(model) is BertForSequenceClassification:
        encoder_model, first_position = model.bert, 0
        if encoder_model.pooler is None:
            return None
    elif type(model) is XLMRobertaForSequenceClassification:
        # RoBERTa numbers positions from padding_idx + 1.
        encoder_model = model.roberta
        first_position = int(encoder_model.embeddings.padding_idx) + 1
    else:
        return None
    if (
        config.is_decoder
        or getattr(config, "add_cross_attention", False)
        or getattr(config, "position_embedding_type", "absolute") != "absolute"
        or model.training
    ):
        return None
    layers: list[Any] = list(encoder_model.encoder.layer)
    if not layers or any(
        type(block).__name__ not in _BLOCKS[name]
        for layer in layers
        for name, block in (
            ("attention", layer.attention.self),
            ("attention_output", layer.attention.output),
            ("intermediate", layer.intermediate),
            ("output", layer.output),
        )
    ):
        return None
    if prepack is None:
        prepack = can_prepack(layers[0].output.dense.weight)
    engine = PackedBert(model, encoder_model, layers, first_position, prepack=prepack)
    if engine.prepacked and own_weights:
        for layer in layers:
            for linear in _linears(layer):
                release(linear, "the packed BERT engine (PackedBert.logits)")
    return engine


def _linears(layer: Any) -> tuple[Any, ...]:
    """A layer's linears: query, key, value, attention output, intermediate, output."""
    attention = layer.attention.self
    return (
        attention.query,
        attention.key,
        attention.value,
        layer.attention.output.dense,
        layer.intermediate.dense,
        layer.output.dense,
    )


class PackedBert:
    """Score rows (token ids, and token type ids where the tokenizer gives them) with
    a loaded BERT-family sequence classifier; see the module docs."""

    def __init__(
        self, model: Any, encoder_model: Any, layers: list[Any], first: int, *, prepack: bool
    ) -> None:
        self.model = model
        self.embeddings = encoder_model.embeddings
        self.pooler = getattr(encoder_model, "pooler", None)
        self.layers = layers
        self.first_position = first
        flat, self.prepacked = linears(
            [module for layer in layers for module in _linears(layer)], prepack=prepack
        )
        self.linears = [tuple(flat[6 * i : 6 * i + 6]) for i in range(len(layers))]

    def logits(
        self, rows: Mapping[str, Sequence[Sequence[int]]], device: torch.device
    ) -> torch.Tensor:
        """The classifier's logits, one row per input row, in input order."""
        import torch

        ids = rows["input_ids"]
        lengths = [len(row) for row in ids]
        flat_ids = torch.tensor([token for row in ids for token in row], device=device)
        types = rows.get("token_type_ids")
        flat_types = (
            torch.tensor([token for row in types for token in row], device=device)
            if types is not None
            else torch.zeros_like(flat_ids)
        )
        positions = (
            torch.cat([torch.arange(length, device=device) for length in lengths])
            + self.first_position
        )
        starts = torch.tensor([0, *itertools.accumulate(lengths)][:-1], device=device)
        groups = [
            _Group(rows_in, lengths, starts, device)
            for rows_in in limit_padding(
                sorted(range(len(lengths)), key=lambda i: -lengths[i]),
                lengths,
                max_padding=_ATTENTION_PADDING,
                min_tokens=_ATTENTION_MIN_TOKENS,
            )
        ]
        hidden = self.embeddings(
            input_ids=flat_ids[None], token_type_ids=flat_types[None], position_ids=positions[None]
        )[0]
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            hidden = self._layer(index, layer, hidden, groups, starts if index == last else None)
        return self._head(hidden[:, None, :])

    def _layer(
        self,
        index: int,
        layer: Any,
        hidden: torch.Tensor,
        groups: list[_Group],
        only: torch.Tensor | None,
    ) -> torch.Tensor:
        """One encoder layer over the packed rows; where ``only`` (the first token of
        each row) is given, the output of those tokens only. As the layer's forward in
        eval mode (dropout is the identity): self-attention, ``LayerNorm(dense(context)
        + input)``, ``act(dense(.))``, ``LayerNorm(dense(.) + attended)``."""
        query, key, value, attention_out, intermediate, output = self.linears[index]
        attention = layer.attention.self
        keys = key(hidden)
        values = value(hidden)
        residual = hidden if only is None else hidden[only]
        queries = query(residual)
        context = queries.new_empty(queries.shape)
        for group in groups:
            group.attend(attention, queries, keys, values, context, first_only=only is not None)
        attended = attention_out(context).add_(residual)
        attended = layer.attention.output.LayerNorm(attended)
        inner = layer.intermediate.intermediate_act_fn(intermediate(attended))
        out = output(inner).add_(attended)
        return layer.output.LayerNorm(out)  # type: ignore[no-any-return]

    def _head(self, first: torch.Tensor) -> torch.Tensor:
        if self.pooler is not None:  # BERT: pooler (dense + tanh), dropout, classifier
            return self.model.classifier(self.model.dropout(self.pooler(first)))  # type: ignore[no-any-return]
        return self.model.classifier(first)  # type: ignore[no-any-return]  # RoBERTa head


class _Group:
    """Rows of similar length whose attention runs as one padded batch."""

    def __init__(
        self, rows: list[int], lengths: Sequence[int], starts: torch.Tensor, device: torch.device
    ) -> None:
        import torch

        self.rows = torch.tensor(rows, device=device)
        own = [lengths[row] for row in rows]
        self.width = width = max(own)
        # Packed position of every (row, column) slot; padded slots read the row's
        # first token and are masked out as keys.
        columns = torch.arange(width, device=device)
        own_lengths = torch.tensor(own, device=device)
        valid = columns[None, :] < own_lengths[:, None]
        first = starts[self.rows][:, None]
        self.gather = (first + columns[None, :]).where(valid, first)
        self.mask = None if min(own) == width else valid[:, None, None, :]
        self.real = valid

    def attend(
        self,
        attention: Any,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        out: torch.Tensor,
        *,
        first_only: bool,
    ) -> None:
        import torch

        heads = attention.num_attention_heads
        size = attention.attention_head_size
        count = len(self.rows)

        def split(packed: torch.Tensor) -> torch.Tensor:
            return packed[self.gather].view(count, self.width, heads, size).transpose(1, 2)

        if first_only:
            query = queries[self.rows].view(count, 1, heads, size).transpose(1, 2)
        else:
            query = split(queries)
        context = torch.nn.functional.scaled_dot_product_attention(
            query, split(keys), split(values), attn_mask=self.mask, scale=attention.scaling
        )
        context = context.transpose(1, 2).reshape(count, -1, heads * size)
        if first_only:
            out[self.rows] = context[:, 0]
        else:
            out[self.gather[self.real]] = context[self.real]
