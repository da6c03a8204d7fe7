"""Linear layers the packed engines run: ``F.linear`` on a module's own weight, or
oneDNN's linear on a copy of it prepacked into oneDNN's blocked layout (as vLLM-CPU
and IPEX run them).

The weight is reordered once, at load, into the blocked layout oneDNN's kernels read,
instead of on every call; bfloat16 results match ``F.linear``'s. It is used on CPU
only, in float32 or bfloat16, where torch was built with oneDNN (:func:`can_prepack`).

Prepacked, an elementwise step that follows a projection can run inside it as a
oneDNN post-op (:meth:`Linear.silu`, :meth:`Linear.times`, :meth:`Linear.plus`): the
result is computed from the float32 accumulator and written once. Unprepacked, the
same methods run the step as a separate torch op.

An engine that prepacks may release the module's plain weight (:func:`release`), so
the model is held once; the module then refuses to run.

torch is imported inside functions only, so importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["Linear", "can_prepack", "linears", "release"]


def can_prepack(weight: torch.Tensor) -> bool:
    """Whether oneDNN's prepacked linear serves this weight (CPU, float32/bfloat16, a
    torch built with oneDNN)."""
    import torch

    return (
        weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and bool(torch.backends.mkldnn.is_available())  # type: ignore[no-untyped-call]
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class Linear:
    """One ``nn.Linear``'s ``x @ weight.T + bias``: ``F.linear`` on the module's own
    weight, or (``prepack``) oneDNN's linear on a prepacked copy."""

    __slots__ = ("bias", "packed", "weight")

    def __init__(self, module: Any, *, prepack: bool) -> None:

        self.bias: torch.Tensor | None = module.bias
        self.packed = prepack
        self.weight: torch.Tensor = _reorder(module.weight.detach()) if prepack else module.weight

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
        """oneDNN's linear on ``weight`` prepacked (``x @ weight.T + bias``): for a
        weight its caller prepared (output rows reordered, a norm's weight folded
        in, several projections stacked into one). Raises ``RuntimeError`` where
        oneDNN refuses it."""
        linear = cls.__new__(cls)
        linear.bias = bias
        linear.packed = True
        linear.weight = _reorder(weight.detach())
        return linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        if self.packed:
            out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
                x, self.weight, self.bias, "none", [], ""
            )
            return out
        return torch.nn.functional.linear(x, self.weight, self.bias)

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        """``silu(x @ weight.T + bias)``; prepacked, the activation runs inside the
        matmul (oneDNN's ``swish`` post-op: no second pass over the output)."""
        import torch

        if self.packed:
            out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
                x, self.weight, self.bias, "swish", [], ""
            )
            return out
        return torch.nn.functional.silu(self(x), inplace=True)

    def times(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """``(x @ weight.T + bias) * other`` (``other`` of the output's shape: no
        broadcasting); prepacked, the product runs inside the matmul (oneDNN's binary
        ``mul`` post-op); otherwise ``other`` is multiplied in place and returned."""
        import torch

        if self.packed:
            out: torch.Tensor = torch.ops.mkldnn._linear_pointwise.binary(
                x, other, self.weight, self.bias, "mul"
            )
            return out
        return other.mul_(self(x))

    def plus(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """``other + x @ weight.T + bias`` (``other`` of the output's shape); prepacked,
        a new tensor with the sum done inside the matmul (oneDNN's binary ``add``
        post-op: no second pass), otherwise added to ``other`` in place (one
        ``addmm_``) and returned."""
        import torch

        if self.packed:
            out: torch.Tensor = torch.ops.mkldnn._linear_pointwise.binary(
                x, other, self.weight, self.bias, "add"
            )
            return out
        if self.bias is not None:
            other.add_(self.bias)
        return other.addmm_(x, self.weight.t())


def linears(modules: Sequence[Any], *, prepack: bool) -> tuple[list[Linear], bool]:
    """``Linear`` for each module, prepacked if asked and oneDNN takes every weight;
    where it refuses one (``RuntimeError``), all stay plain. Returns them and whether
    they are prepacked."""
    if prepack:
        try:
            return [Linear(module, prepack=True) for module in modules], True
        except RuntimeError:
            pass
    return [Linear(module, prepack=False) for module in modules], False


def _reorder(weight: torch.Tensor) -> torch.Tensor:
    import torch

    packed: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(weight, None)
    return packed


def release(module: Any, owner: str) -> None:
    """Drop a module's plain weight (``owner`` holds it prepacked); running the module
    afterwards raises instead of computing with an empty weight."""
    import torch

    module.weight.data = torch.empty(0, dtype=module.weight.dtype, device=module.weight.device)

    def refuse(*_: Any) -> None:
        raise RuntimeError(
            f"this layer's weight is held prepacked by {owner}; run the model through it"
        )

    module.register_forward_pre_hook(refuse)
