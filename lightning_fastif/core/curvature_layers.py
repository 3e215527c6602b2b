"""The layers K-FAC factors, and their per-example inputs and output gradients captured by hooks in one backward.

A layer's per-example gradient has the factored form ``G_i = Σ_t g_it a_itᵀ``: ``a_it`` is the layer's input at
position ``t`` (a token, a spatial patch of a convolution; a column of ones appended for a selected bias) and
``g_it`` the gradient of example ``i``'s loss w.r.t. the layer's output (pre-activation) at that position. One
forward pass with module hooks and one backward pass of ``Σ_i ℓ_i`` give both for a whole batch: in eval mode an
example's loss depends only on its own outputs, so the gradient of the sum w.r.t. row ``i`` of an output is the
gradient of ``ℓ_i``.

Supported modules (exact types; a subclass may use its weight differently in ``forward``):

* ``nn.Linear``: ``a`` = the input features (any leading shape ``[B, ..., in]``, the middle dims are positions);
* ``nn.Conv2d`` with ``groups=1``: ``a`` = the unfolded input patch at each output position (KFC);
* ``nn.Embedding`` without ``scale_grad_by_freq``: ``a`` is a one-hot token vector, kept as the token id; positions
  holding ``padding_idx`` carry no gradient and are dropped.

**Padding.** When the batch is a mapping with an ``"attention_mask"`` ``[B, T]`` (the convention of tokenised text),
the positions it marks 0 are left out of a layer over those ``T`` positions, provided they carry no gradient there
(``g_it = 0``, as for padding that attention and pooling mask out): their inputs then neither enter ``A`` nor count
as positions, so the factors do not depend on how much padding a batch has. A layer whose masked positions do carry
gradient keeps them (the mask does not describe it).

A layer is the weight of such a module, with its bias when the bias is selected too. Every other selected
parameter is *unsupported*: a bias selected without its weight, a weight shared by two modules (tied), a parameter
of any other module. This module imports no Lightning.
"""

from __future__ import annotations

import glob
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_fastif.core.batches import Batch, batch_size_of
from lightning_fastif.core.grads import FunctionalLoss, check_losses

KINDS = {nn.Linear: "linear", nn.Conv2d: "conv2d", nn.Embedding: "embedding"}
"""Module type -> layer kind, matched by exact type."""


@dataclass(frozen=True)
class LayerSpec:
    """One factored layer: which module and parameters, and the shape of its gradient matrix ``[rows, cols]``.

    ``rows`` is the output side (the factor ``S``), ``cols`` the input side (the factor ``A``; one more column for
    a bias). An embedding's gradient matrix is its weight transposed: ``[embedding_dim, num_embeddings]``.
    """

    name: str
    kind: str
    weight: str
    bias: str | None
    rows: int
    cols: int
    weight_shape: tuple[int, ...]

    @property
    def diagonal_input(self) -> bool:
        """Whether ``A`` is diagonal (embeddings: one-hot inputs), stored as a vector."""
        return self.kind == "embedding"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "weight_shape": list(self.weight_shape)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerSpec:
        return cls(**{**data, "weight_shape": tuple(data["weight_shape"])})

    def matrices(self, vectors: Tensor, offsets: dict[str, tuple[int, int]]) -> Tensor:
        """``[V, rows, cols]``: this layer's blocks of flat vectors ``[V, P]`` as gradient-shaped matrices."""
        count = vectors.shape[0]
        start, size = offsets[self.weight]
        weight = vectors[:, start : start + size]
        if self.kind == "embedding":
            return weight.reshape(count, self.cols, self.rows).transpose(1, 2)
        parts = [weight.reshape(count, self.rows, -1)]
        if self.bias is not None:
            start, size = offsets[self.bias]
            parts.append(vectors[:, start : start + size].reshape(count, self.rows, 1))
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    def scatter(self, matrices: Tensor, out: Tensor, offsets: dict[str, tuple[int, int]]) -> None:
        """Write ``[V, rows, cols]`` matrices back into this layer's blocks of ``out`` ``[V, P]``."""
        count = matrices.shape[0]
        start, size = offsets[self.weight]
        if self.kind == "embedding":
            out[:, start : start + size] = matrices.transpose(1, 2).reshape(count, size)
            return
        if self.bias is None:
            out[:, start : start + size] = matrices.reshape(count, size)
            return
        out[:, start : start + size] = matrices[..., :-1].reshape(count, size)
        start, size = offsets[self.bias]
        out[:, start : start + size] = matrices[..., -1]


@dataclass
class LayerBatch:
    """One batch of one layer: inputs ``a [B, T, cols]`` (or token ids ``[B, T]``, -1 where dropped) and output
    gradients ``g [B, T, rows]``."""

    g: Tensor
    a: Tensor | None = None
    ids: Tensor | None = None
    mask: Tensor | None = None
    """``[B, T]`` bool: the positions that count (``a`` is zero elsewhere); ``None``: all of them."""

    def positions(self) -> int:
        """Positions that carry gradient (all of them, or the tokens and positions that are not padding)."""
        if self.ids is not None:
            return int((self.ids >= 0).sum())
        return int(self.mask.sum()) if self.mask is not None else self.g.shape[0] * self.g.shape[1]

    def magnitude(self) -> float:
        """``Σ_it ‖g_it‖ ‖a_it‖``: a bound on the gradient's norm, the scale of its rounding errors."""
        if self.ids is not None:
            return float(self.g[self.ids >= 0].norm(dim=-1).sum())
        return float((self.g.norm(dim=-1) * self.a.norm(dim=-1)).sum())

    def gradient_sum(self, spec: LayerSpec) -> Tensor:
        """``Σ_i G_i`` ``[rows, cols]``: the layer's gradient of the summed loss, rebuilt from the capture."""
        if self.ids is None:
            return torch.einsum("bto,btk->ok", self.g, self.a)
        keep = self.ids >= 0
        out = self.g.new_zeros(spec.cols, spec.rows)
        return out.index_add_(0, self.ids[keep], self.g[keep]).T


def discover_layers(
    model: nn.Module, selected: dict[str, Tensor]
) -> tuple[list[LayerSpec], dict[str, nn.Module], dict[str, str]]:
    """Find the factored layers among the selected parameters.

    Args:
        model: the model.
        selected: the selected parameters by name, in selection order (as ``FunctionalLoss.primals``).

    Returns:
        ``(layers, modules, unsupported)``: the layer specs in module order, the module of each layer by name, and
        ``{parameter name: reason}`` for every selected parameter no layer covers.
    """
    name_of = {id(p): n for n, p in model.named_parameters()}
    chosen = {id(p) for n, p in model.named_parameters() if n in selected}
    owners = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    layers: list[LayerSpec] = []
    modules: dict[str, nn.Module] = {}
    unsupported: dict[str, str] = {}
    for mname, module in model.named_modules():
        kind = KINDS.get(type(module))
        if kind is None:
            continue
        weight, bias = module.weight, getattr(module, "bias", None)
        has_bias = bias is not None and id(bias) in chosen
        if id(weight) not in chosen:
            if has_bias:
                unsupported[name_of[id(bias)]] = f"the bias of {mname} is selected without its weight"
            continue
        own = [name_of[id(weight)]] + ([name_of[id(bias)]] if has_bias else [])
        reason = _unsupported_reason(module, owners[id(weight)])
        if reason is not None:
            unsupported.update(dict.fromkeys(own, f"{mname}: {reason}"))
            continue
        if kind == "linear":
            rows, cols = module.out_features, module.in_features + int(has_bias)
        elif kind == "conv2d":
            rows, cols = module.out_channels, weight[0].numel() + int(has_bias)
        else:
            rows, cols = module.embedding_dim, module.num_embeddings
        spec = LayerSpec(mname, kind, own[0], own[1] if has_bias else None, rows, cols, tuple(weight.shape))
        layers.append(spec)
        modules[mname] = module
    covered = {n for spec in layers for n in (spec.weight, spec.bias) if n is not None} | set(unsupported)
    for pname in selected:
        if pname not in covered:
            owner = model.get_submodule(pname.rpartition(".")[0]) if "." in pname else model
            unsupported[pname] = (
                f"a parameter of {type(owner).__name__}, which K-FAC does not factor (factored: Linear, Conv2d, "
                "Embedding)"
            )
    ordered = {n: unsupported[n] for n in selected if n in unsupported}
    return layers, modules, ordered


def _unsupported_reason(module: nn.Module, owners: int) -> str | None:
    if owners > 1:
        return "its weight is shared with another module (tied weights)"
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"a grouped convolution (groups={module.groups})"
    if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
        return "scale_grad_by_freq=True rescales its gradient by token frequency"
    return None


def escaped_names(names: list[str]) -> list[str]:
    """Parameter names as ``select_parameters`` patterns that match exactly those names."""
    return [glob.escape(n) for n in names]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of per-batch products: the model's, at least float32 (half-precision sums lose too much)."""
    return torch.promote_types(dtype, torch.float32)


class LayoutError(RuntimeError):
    """A layer's input does not have the batch's examples along its first dimension."""


class LayerCapture:
    """Hooks on the layers' modules that record inputs and output gradients during one forward and backward.

    Use :meth:`run` for each batch; the hooks exist only inside it.
    """

    def __init__(self, function: FunctionalLoss, layers: list[LayerSpec], modules: dict[str, nn.Module]) -> None:
        self.function = function
        self.layers = layers
        self.modules = modules
        self.dtype = compute_dtype(function.dtype)

    def run(self, batch: Batch) -> tuple[dict[str, LayerBatch], dict[str, Tensor], dict[str, str]]:
        """Forward and backward one batch.

        Returns:
            ``(layers, grads, problems)``: each layer's :class:`LayerBatch` (layers whose module did not run are
            absent), the gradients of the summed loss w.r.t. every selected parameter (zeros where unused), and
            ``{layer: message}`` for layers whose input does not carry the examples along its first dimension.
        """
        batch = self.function.prepare(batch)
        size = batch_size_of(batch)
        mask = position_mask(batch, size)
        inputs: dict[str, list[Tensor]] = {spec.name: [] for spec in self.layers}
        grads: dict[str, dict[int, Tensor]] = {spec.name: {} for spec in self.layers}

        def forward_hook(name: str) -> Any:
            def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
                if not (isinstance(output, Tensor) and output.requires_grad):
                    return  # called without gradient: its weight gets none from this call
                call = len(inputs[name])
                inputs[name].append(args[0].detach() if args and isinstance(args[0], Tensor) else None)
                # A tensor hook, not autograd.grad on the output: an in-place op after the layer (ReLU(inplace=True))
                # rebases the output tensor, and only a hook registered before it sees the pre-activation gradient.
                output.register_hook(lambda g: grads[name].__setitem__(call, g.detach()))

            return hook

        handles = [self.modules[spec.name].register_forward_hook(forward_hook(spec.name)) for spec in self.layers]
        leaves = {n: p.detach().requires_grad_(True) for n, p in self.function.primals.items()}
        try:
            with torch.enable_grad():
                losses = check_losses(self.function(leaves, batch), size)
                if losses.requires_grad:
                    found = torch.autograd.grad(losses.sum(), list(leaves.values()), allow_unused=True)
                else:
                    found = (None,) * len(leaves)
        finally:
            for handle in handles:
                handle.remove()
        param_grads = {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(leaves.items(), found)}
        captured, problems = {}, {}
        for spec in self.layers:
            calls = [(x, grads[spec.name][i]) for i, x in enumerate(inputs[spec.name]) if i in grads[spec.name]]
            try:
                if calls:
                    captured[spec.name] = _concat([self._layer_batch(spec, x, g, size, mask) for x, g in calls])
            except LayoutError as exc:
                problems[spec.name] = str(exc)
        return captured, param_grads, problems

    def _layer_batch(
        self, spec: LayerSpec, x: Tensor | None, g: Tensor, size: int, mask: Tensor | None = None
    ) -> LayerBatch:
        module = self.modules[spec.name]
        dims = {"linear": (2, None), "conv2d": (4, 4), "embedding": (1, None)}[spec.kind]
        if x is None or x.shape[0:1] != (size,) or x.dim() < dims[0] or (dims[1] is not None and x.dim() > dims[1]):
            shape = "no positional tensor" if x is None else f"shape {tuple(x.shape)}"
            raise LayoutError(
                f"{spec.name}: its input has {shape}; K-FAC needs the batch's {size} examples along the first "
                "dimension of the first positional input"
            )
        if spec.kind == "embedding":
            ids = x.reshape(size, -1)
            if module.padding_idx is not None:
                ids = torch.where(ids == module.padding_idx, torch.full_like(ids, -1), ids)
            g = g.reshape(size, -1, spec.rows)
            if _applies(mask, g):
                ids = torch.where(mask, ids, torch.full_like(ids, -1))
            return LayerBatch(g=g.to(self.dtype), ids=ids)
        if spec.kind == "conv2d":
            a = _patches(module, x.to(self.dtype)).transpose(1, 2)
            g = g.reshape(size, spec.rows, -1).transpose(1, 2)
        else:
            a = x.to(self.dtype).reshape(size, -1, module.in_features)
            g = g.reshape(size, -1, spec.rows)
        if spec.bias is not None:
            a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=-1)
        if spec.kind == "linear" and _applies(mask, g):
            return LayerBatch(g=g.to(self.dtype), a=a * mask.unsqueeze(-1).to(a), mask=mask)
        return LayerBatch(g=g.to(self.dtype), a=a)


def position_mask(batch: Batch, size: int) -> Tensor | None:
    """The batch's ``"attention_mask"`` as ``[B, T]`` bool when it is a mapping holding one of that shape, else
    ``None`` (see the module's note on padding)."""
    if not isinstance(batch, Mapping):
        return None
    mask = batch.get("attention_mask")
    if not isinstance(mask, Tensor) or mask.dim() != 2 or mask.shape[0] != size:
        return None
    return mask != 0


def _applies(mask: Tensor | None, g: Tensor) -> bool:
    """Whether ``mask`` describes a layer's positions: the same ``T`` (more than one), some position masked, and no
    gradient at the masked ones (padding that the model masks out)."""
    if mask is None or g.shape[1] != mask.shape[1] or g.shape[1] == 1 or bool(mask.all()):
        return False
    return not bool(g[~mask].any())


def _patches(module: nn.Conv2d, x: Tensor) -> Tensor:
    """``[B, C·kh·kw, L]``: the input patch of every output position, in the order of ``weight.reshape(out, -1)``."""
    padding: Any = module.padding
    if module.padding_mode != "zeros" or isinstance(padding, str):
        # The module pads this way itself for non-zero modes; for padding="same" it holds the (possibly
        # asymmetric) amounts that unfold's symmetric padding cannot express.
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        padding = 0
    return F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)


def _concat(parts: list[LayerBatch]) -> LayerBatch:
    """Several calls of one module in a forward pass: their positions add up (one gradient sums over all calls)."""
    if len(parts) == 1:
        return parts[0]
    g = torch.cat([p.g for p in parts], dim=1)
    if parts[0].ids is not None:
        return LayerBatch(g=g, ids=torch.cat([p.ids for p in parts], dim=1))
    a = torch.cat([p.a for p in parts], dim=1)
    if all(p.mask is None for p in parts):
        return LayerBatch(g=g, a=a)
    masks = [p.mask if p.mask is not None else p.g.new_ones(p.g.shape[:2], dtype=torch.bool) for p in parts]
    return LayerBatch(g=g, a=a, mask=torch.cat(masks, dim=1))


def explained(spec: LayerSpec, captured: LayerBatch | None, grads: dict[str, Tensor]) -> bool:
    """Whether the captured inputs and output gradients rebuild the layer's actual gradient of the summed loss.

    They do not when the weight is also used outside the module's ``forward`` (``F.linear(x, layer.weight)``).
    """
    weight = grads[spec.weight].to_dense() if grads[spec.weight].is_sparse else grads[spec.weight]
    parts = [weight.reshape(spec.rows, -1) if spec.kind != "embedding" else weight.T]
    if spec.bias is not None:
        parts.append(grads[spec.bias].reshape(spec.rows, 1))
    actual = torch.cat(parts, dim=-1)
    rebuilt = torch.zeros_like(actual) if captured is None else captured.gradient_sum(spec).to(actual.dtype)
    # Relative to the sum of the per-position terms, not to the total: near a minimum the examples' gradients
    # cancel, and the total is small beside the rounding errors of adding them up.
    scale = max(float(actual.norm()), 0.0 if captured is None else captured.magnitude(), torch.finfo(actual.dtype).tiny)
    tolerance = min(4 * torch.finfo(actual.dtype).eps ** 0.5, 0.05)
    return float((rebuilt - actual).norm()) <= tolerance * scale
