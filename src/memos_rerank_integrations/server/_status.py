"""``GET /health`` (and ``HEAD``): whether the model can serve. No key needed, and it never waits
for the model. (``/info`` is :mod:`._tei`'s, ``/v1/models`` :mod:`._vllm`'s and
``/metrics`` :mod:`._metrics`'s.)"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from starlette.responses import JSONResponse, Response

from ._core import Router, ServiceDep

__all__ = ["HealthResponse", "health", "router"]


class HealthResponse(BaseModel):
    status: str
    reason: str | None = None
    model: str
    busy: bool
    queued_requests: int
    model_workers: int


router = Router()


@router.status(
    "/health",
    response_model=HealthResponse,
    responses={503: {"model": HealthResponse, "description": "The model cannot serve."}},
    summary="Whether the model can serve (no key needed; never waits for the model)",
    head=True,
)
async def health(service: ServiceDep) -> Response:
    batcher = service.batcher
    state = batcher.health()
    if not state.ok:
        batcher.probe()  # finds out, in the background, whether the model recovered
    body: dict[str, Any] = {
        "status": "ok" if state.ok else "unavailable",
        "reason": state.reason,
        "model": service.model_name,
        "busy": batcher.busy,
        "queued_requests": batcher.queued,
        "model_workers": batcher.workers,
    }
    return JSONResponse(body, 200 if state.ok else 503)
