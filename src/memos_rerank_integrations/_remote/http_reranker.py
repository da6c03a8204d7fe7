"""Any ``/rerank`` server: vLLM, infinity, Jina-compatible, or text-embeddings-inference."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from .._exceptions import InvalidInputError
from .._qwen_prompt import DEFAULT_INSTRUCTION, PROMPT_PREFIX, PROMPT_SUFFIX
from .._types import check_text, nonempty_text
from .base import read_scored_results
from .http import HTTPBackend, HTTPOptions, join_url

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["HTTPReranker"]

APIFormat = Literal["cohere", "tei"]
Template = Literal["qwen3"]


class HTTPReranker(HTTPBackend):
    """Rerank with a self-hosted server, the way to scale past one machine.

    ``api_format="cohere"`` (vLLM, infinity, Jina-compatible servers) posts
    ``{model, query, documents, top_n}`` and reads
    ``{"results": [{"index", "relevance_score"}]}``; ``api_format="tei"``
    (Hugging Face text-embeddings-inference) posts
    ``{query, texts, raw_scores, truncate}`` and reads a bare
    ``[{"index", "score"}]`` list (TEI has no ``top_n``: the cut happens here).
    The request goes to ``{base_url}/{path}``; vLLM also serves ``path="v1/rerank"``.
    With ``api_key`` every request carries ``Authorization: Bearer <key>``.
    ``truncate`` and ``raw_scores`` are passed to TEI as they are.

    ``template="qwen3"`` is for an original Qwen3-Reranker (or a model fine-tuned
    from it, like MemOS's) served by vLLM with its ``hf_overrides``: the server
    scores the concatenation of query and document, so the query is sent as the
    model card's prompt prefix plus ``<Instruct>: {instruction}\n<Query>: {query}\n``
    and each document as ``<Document>: {document}`` plus the prompt suffix.
    Without the template such a model's scores are close to random. The
    length limits apply to your text, before the template is added.
    Retries, limits, splitting and validation are those of every remote backend
    (see :class:`~memos_rerank_integrations._remote.http.HTTPOptions`).
    """

    backend_name = "http"

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        api_format: APIFormat = "cohere",
        path: str = "rerank",
        truncate: bool = True,
        raw_scores: bool = False,
        template: Template | None = None,
        instruction: str | None = None,
        **options: Unpack[HTTPOptions],
    ) -> None:
        if api_format not in ("cohere", "tei"):
            raise InvalidInputError(f"api_format must be 'cohere' or 'tei', got {api_format!r}.")
        if model is not None:
            model = nonempty_text("model", model)
        if not isinstance(base_url, str):
            raise InvalidInputError(f"base_url must be a str, got {type(base_url).__name__}.")
        if not isinstance(path, str):
            raise InvalidInputError(f"path must be a str, got {type(path).__name__}.")
        if template not in (None, "qwen3"):
            raise InvalidInputError(f"template must be None or 'qwen3', got {template!r}.")
        if instruction is not None and (template is None or not isinstance(instruction, str)):
            raise InvalidInputError(
                "instruction must be a str, and applies only with template='qwen3'."
            )
        if instruction is not None:
            check_text("instruction", instruction)
        self.template: Template | None = template
        self.instruction = DEFAULT_INSTRUCTION if instruction is None else instruction
        self.api_format: APIFormat = api_format
        self.truncate = bool(truncate)
        self.raw_scores = bool(raw_scores)
        url = join_url(base_url, path)
        super().__init__(url, model=model, api_key=api_key, key_required=False, **options)

    def __repr__(self) -> str:
        return (
            f"HTTPReranker(url={self.url!r}, model={self.model!r}, api_format={self.api_format!r})"
        )

    def _sends_top_n(self) -> bool:
        return self.api_format == "cohere"

    def _body(self, query: str, documents: list[str], top_n: int | None) -> dict[str, object]:
        if self.template == "qwen3":
            query = f"{PROMPT_PREFIX}<Instruct>: {self.instruction}\n<Query>: {query}\n"
            documents = [f"<Document>: {document}{PROMPT_SUFFIX}" for document in documents]
        if self.api_format == "tei":
            return {
                "query": query,
                "texts": documents,
                "raw_scores": self.raw_scores,
                "truncate": self.truncate,
            }
        return super()._body(query, documents, top_n)

    def _read_results(self, payload: object) -> list[tuple[object, object]]:
        if self.api_format == "tei":
            return read_scored_results(
                payload, backend=self.backend_name, score_key="score", bare_list=True
            )
        return super()._read_results(payload)
