"""Attention decomposed into explicit steps, so that every method sees its linear maps.

``nn.MultiheadAttention`` keeps Q, K and V in one raw ``in_proj_weight`` (no module is called
for them), never calls ``out_proj.forward``, and in eval mode without gradients runs one fused
kernel (so does ``nn.TransformerEncoderLayer``, which then calls none of its submodules);
``F.scaled_dot_product_attention`` is one opaque function. None of them shows a backward
rule or a statistics hook what it needs. This module is the **one place** where attention is
taken apart, for the fit and for every method of the registry, without changing the user's
model:

- :class:`Decomposition`, a :class:`~torch.overrides.TorchFunctionMode` active around the
  fit's and the explanation's forward passes, catches ``F.multi_head_attention_forward``
  (which ``nn.MultiheadAttention.forward`` calls; any active mode also turns the fused fast
  paths of ``MultiheadAttention`` and ``TransformerEncoderLayer`` off, so their submodules
  run) and ``F.scaled_dot_product_attention``, and computes them step by step:

  1. ``q, k, v = in_proj(x)``: one **virtual** ``nn.Linear`` per ``MultiheadAttention``
     (:class:`InputProjection`, named ``"<attention>.in_proj"``) whose weight and bias *are*
     the module's ``in_proj_weight``/``in_proj_bias`` parameters (the same objects, not
     copies; the module itself is not touched). It is listed with the model's Linear layers
     (:func:`named_linear_layers`), so it gets statistics, patterns and rules like any
     Linear: one ``(3E, E)`` layer whose rows are Q, K and V.
  2. ``scores = q kᵀ · scale`` plus the masks, ``probs = handler.softmax(name, scores)``;
  3. ``out = handler.weighted_sum(name, probs, v)``: the attention's weighted sum over tokens,
     ``out[n, h, i, c] = Σ_j probs[n, h, i, j] · v[n, h, j, c]``;
  4. heads merged, ``out_proj(out)`` **called as a module** (hooks and rules apply).

- **The hook for rules** is the :class:`AttentionHandler` given to the decomposition: its
  :meth:`~AttentionHandler.softmax` and :meth:`~AttentionHandler.weighted_sum` receive every
  attention call of the forward pass, named ``"attention#k"`` (``k``: order of the call in
  the pass, like the nodes of :mod:`patternnet.engine.nodes`), with tensors laid out
  ``(N, H, L, S)`` (probabilities) and ``(N, H, S, C)`` (values). The default handler
  computes the plain operations (the gradient, the full Jacobian); the fit records
  statistics (:mod:`patternnet.patterns.attention_statistics`), the pattern methods pass
  their patterns (:mod:`patternnet.engine.rules.attention`), and an LRP rule for attention
  (AttnLRP) is one more handler returned by a method's ``attention_handler``.

- **Window attention** written out in Python over a module's own Linear layers: torchvision's
  Swin (``ShiftedWindowAttention``, ``ShiftedWindowAttentionV2``: ``shifted_window_attention``
  calls ``F.linear`` on the module's raw ``qkv.weight`` and ``proj.weight``) and MaxViT
  (``RelativePositionalMultiHeadAttention``: ``to_qkv`` and ``merge`` called as modules,
  scores and weighted sum written with ``einsum``). The mode recognises a call by its weights
  (:data:`WINDOW_ATTENTION`): ``F.linear`` on a ``qkv``/``to_qkv`` weight opens the call
  (Swin's functional ``F.linear`` runs as the module ``qkv`` itself, so hooks and rules
  apply), the following ``F.normalize`` (Swin V2's cosine attention, handler
  :meth:`~AttentionHandler.normalize`), score ``einsum`` (run as ``matmul``, so the product
  rules of :mod:`patternnet.engine.backward` see ``q kᵀ``), ``softmax`` and the product of the
  probabilities with the values are the handler's steps (windows × batch as ``N``: the windows
  share their pattern, as a convolution's positions share their weights), and ``F.linear``
  on the ``proj``/``merge`` weight closes it (again as the module). Everything else of these
  functions runs as written: the relative position bias and the shifted windows' mask are
  added to the scores (constants: biases), Swin V2's ``logit_scale`` multiplies them (a
  constant factor), window partitions, ``torch.roll`` and padding are index maps. Swin V2's
  continuous position bias MLP (``cpb_mlp``) reads no input: its Linear layers are no layers
  of the explanation (:func:`constant_modules`).

Both steps compute the same values as PyTorch (the tests compare the gradient of a model with
and without the decomposition in float64).
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..layers import is_linear_layer

__all__ = [
    "WINDOW_ATTENTION",
    "AttentionHandler",
    "Decomposition",
    "InputProjection",
    "UnsupportedAttentionError",
    "attention_projections",
    "attention_support",
    "constant_modules",
    "window_attention",
    "decomposed",
    "named_linear_layers",
]

_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
_SDPA_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
               "enable_gqa")  # fmt: skip
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                  "enable_gqa": False}  # fmt: skip


class UnsupportedAttentionError(TypeError):
    """An attention call that the decomposition does not cover (raised during the forward
    pass: only then are its arguments known, e.g. cross-attention)."""


class InputProjection(nn.Linear):
    """The Q/K/V input projection of a ``MultiheadAttention`` as a Linear layer of its own.

    Its ``weight`` and ``bias`` are the attention module's ``in_proj_weight`` and
    ``in_proj_bias`` parameters themselves (shared, so training, ``load_state_dict`` and
    in-place edits are seen); it is not registered as a child of the attention module (the
    user's model is never changed). Rows ``0:E`` are Q, ``E:2E`` K and ``2E:3E`` V.
    """

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        nn.Module.__init__(self)
        weight = attention.in_proj_weight
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.weight = weight
        self.bias = attention.in_proj_bias
        self.attention = weakref.ref(attention)

    def current(self) -> bool:
        """Whether this projection still holds its attention module's parameters."""
        attention = self.attention()
        return (
            attention is not None
            and self.weight is attention.in_proj_weight
            and self.bias is attention.in_proj_bias
        )


#: Attention modules whose forward is written out over their own Linear layers, recognised
#: by qualified class name: ``{class: (Q/K/V layer, output layer, functional)}``;
#: ``functional``: the forward calls ``F.linear`` on the layers' raw weights instead of the
#: layers (Swin), so the decomposition runs the layers as modules.
WINDOW_ATTENTION: dict[str, tuple[str, str, bool]] = {
    "torchvision.models.swin_transformer.ShiftedWindowAttention": ("qkv", "proj", True),
    "torchvision.models.swin_transformer.ShiftedWindowAttentionV2": ("qkv", "proj", True),
    "torchvision.models.maxvit.RelativePositionalMultiHeadAttention": ("to_qkv", "merge", False),
}


def window_attention(module: nn.Module) -> tuple[str, str, bool] | None:
    """``(Q/K/V layer, output layer, functional)`` when ``module`` is a window attention of
    :data:`WINDOW_ATTENTION` (or a subclass of one), else None."""
    for cls in type(module).__mro__:
        entry = WINDOW_ATTENTION.get(f"{cls.__module__}.{cls.__qualname__}")
        if entry is not None:
            qkv, proj, _ = entry
            if isinstance(getattr(module, qkv, None), nn.Linear) and isinstance(
                getattr(module, proj, None), nn.Linear
            ):
                return entry
    return None


def constant_modules(model: nn.Module) -> set[str]:
    """Names of the modules (and their descendants) whose input depends on no model input.

    Swin V2's continuous position bias MLP ``<attention>.cpb_mlp`` maps a fixed coordinate
    table to the relative position bias: a constant added to the scores, like the bias table
    of Swin V1. Its layers get no statistics, no patterns and no relevance.
    """
    names: set[str] = set()
    for name, module in model.named_modules():
        if window_attention(module) is not None and isinstance(
            getattr(module, "cpb_mlp", None), nn.Module
        ):
            prefix = f"{name}.cpb_mlp" if name else "cpb_mlp"
            names.update(
                f"{prefix}.{sub}" if sub else prefix
                for sub, _ in module.cpb_mlp.named_modules()
            )
    return names


_PROJECTIONS: weakref.WeakKeyDictionary[nn.Module, InputProjection] = weakref.WeakKeyDictionary()


def attention_support(module: nn.Module) -> str | None:
    """Why a ``MultiheadAttention`` cannot be decomposed, or None when it can."""
    if not module._qkv_same_embed_dim:
        return "kdim/vdim differ from embed_dim (separate q/k/v_proj_weight): not decomposed yet"
    if module.bias_k is not None:
        return "add_bias_kv=True (learned key/value biases appended to the sequence)"
    if module.add_zero_attn:
        return "add_zero_attn=True"
    return None


def _projection(attention: nn.MultiheadAttention) -> InputProjection:
    projection = _PROJECTIONS.get(attention)
    if projection is None or not projection.current():
        projection = InputProjection(attention)
        _PROJECTIONS[attention] = projection
    return projection


def attention_projections(model: nn.Module) -> dict[str, InputProjection]:
    """``{"<attention>.in_proj": InputProjection}`` for every decomposable attention module.

    The same projection object is returned on every call while the attention module keeps
    its parameters (rules and caches keyed on modules recognise it).
    """
    return {
        f"{name}.in_proj" if name else "in_proj": _projection(module)
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention) and attention_support(module) is None
    }


def named_linear_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The model's Linear/Conv layers with the virtual input projections of its attention.

    In ``named_modules`` order; an attention module's ``in_proj`` comes right before its
    ``out_proj``. Layers that read no input (:func:`constant_modules`) are left out.
    """
    constant = constant_modules(model)
    for name, module in model.named_modules():
        if name in constant:
            continue
        if is_linear_layer(module):
            yield name, module
        elif isinstance(module, nn.MultiheadAttention) and attention_support(module) is None:
            yield (f"{name}.in_proj" if name else "in_proj"), _projection(module)


class AttentionHandler:
    """What a method does at the two non-linear steps of attention (the documented hook).

    Subclasses override either method; the defaults compute the plain operations, so the
    backward pass is the gradient (the full Jacobian of softmax and of the product).

    Both receive the call's name (``"attention#k"``) and ``(N, H, L, S)`` scores or
    probabilities: ``N`` samples, ``H`` heads, ``L`` queries, ``S`` keys.
    """

    def softmax(self, name: str, scores: Tensor) -> Tensor:
        """The attention probabilities from the masked, scaled scores (softmax over keys)."""
        return torch.softmax(scores, dim=-1)

    def weighted_sum(self, name: str, probs: Tensor, values: Tensor) -> Tensor:
        """``out[n, h, i, c] = Σ_j probs[n, h, i, j] · values[n, h, j, c]``."""
        return torch.matmul(probs, values)

    def normalize(self, name: str, t: Tensor, eps: float = 1e-12) -> Tensor:
        """Cosine attention's ``t / max(‖t‖, eps)`` over the last dimension (Swin V2's
        queries and keys, before ``q kᵀ``); the default is ``F.normalize``, its full
        Jacobian."""
        return F.normalize(t, dim=-1, eps=eps)


def _additive_mask(mask: Tensor | None, like: Tensor, allowed_if_true: bool) -> Tensor | None:
    """A float mask to add to the scores (−inf where attention is not allowed)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        blocked = ~mask if allowed_if_true else mask
        return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(
            blocked, float("-inf")
        )
    return mask.to(like.dtype)


def _causal(length: int, source: int, like: Tensor) -> Tensor:
    blocked = torch.ones(length, source, dtype=torch.bool, device=like.device).triu(1)
    return torch.zeros(length, source, dtype=like.dtype, device=like.device).masked_fill(
        blocked, float("-inf")
    )


_SOFTMAX = frozenset({F.softmax, torch.softmax, Tensor.softmax})
_MATMUL = frozenset({torch.matmul, Tensor.matmul, Tensor.__matmul__})


class _Window:
    """One window attention call in progress (between its two projections)."""

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module
        self.stage = "open"  # → "softmax" → "summed"
        self.probs: Tensor | None = None


class Decomposition(TorchFunctionMode):
    """Run ``MultiheadAttention`` and ``scaled_dot_product_attention`` step by step.

    See the module docstring. Enter it around one forward pass, *after* (inside) every other
    torch-function mode whose rules should see the steps (the node tracker, the rules of
    :func:`~patternnet.engine.backward.rules_applied`): the steps run with this mode
    suspended and pass through the modes below it.

    Parameters
    ----------
    model:
        The model whose ``MultiheadAttention`` modules are recognised (by their
        ``in_proj_weight``).
    handler:
        The :class:`AttentionHandler` of the softmax and the weighted sum (default: plain).
    """

    def __init__(self, model: nn.Module, handler: AttentionHandler | None = None) -> None:
        super().__init__()
        self.handler = handler or AttentionHandler()
        self.count = 0
        self._modules: dict[int, nn.MultiheadAttention] = {
            id(m.in_proj_weight): m
            for m in model.modules()
            if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None
        }
        # window attention: the weight of its Q/K/V or output layer → (role, module)
        self._weights: dict[int, tuple[str, nn.Module]] = {}
        for m in model.modules():
            entry = window_attention(m)
            if entry is not None:
                self._weights[id(getattr(m, entry[0]).weight)] = ("qkv", m)
                self._weights[id(getattr(m, entry[1]).weight)] = ("proj", m)
        self._window: _Window | None = None

    def _open_window(self, module: nn.Module) -> None:
        if self._window is not None:
            raise UnsupportedAttentionError(
                f"patternnet cannot explain this {type(self._window.module).__name__} call: its "
                "output projection never ran (the attention is not the torchvision forward "
                "the decomposition knows)"
            )
        self._window = _Window(self._name(), module)

    def _name(self) -> str:
        name = f"attention#{self.count}"
        self.count += 1
        return name

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        if func is F.multi_head_attention_forward:
            return self._multi_head(args, kwargs)
        if func is F.scaled_dot_product_attention:
            return self._scaled_dot_product(args, kwargs)
        if func is F.linear and self._weights:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            role = self._weights.get(id(weight))
            if role is not None:
                return self._linear(role[0], role[1], args, kwargs)
        if self._window is not None:
            return self._window_step(func, args, kwargs)
        return func(*args, **kwargs)

    # ------------------------------------------------------------------ window attention
    def _linear(self, role: str, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """``F.linear`` on the Q/K/V or output weight of a window attention ``module``."""
        qkv_name, proj_name, functional = window_attention(module)  # type: ignore[misc]
        if role == "qkv":
            self._open_window(module)
        else:
            window = self._window
            if window is None or window.module is not module or window.stage != "summed":
                self._window = None
                raise UnsupportedAttentionError(
                    f"patternnet cannot explain this {type(module).__name__} call: its output "
                    "projection ran before a softmax and a weighted sum over the values were "
                    "seen (not the torchvision forward the decomposition knows)"
                )
            self._window = None
        if not functional:
            return F.linear(*args, **kwargs)  # inside the layer's own forward: hooks apply
        layer = getattr(module, qkv_name if role == "qkv" else proj_name)
        x = args[0] if args else kwargs["input"]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        out = layer(x)  # called as a module: hooks and rules apply
        if bias is not layer.bias:
            # Swin V2 zeroes the key rows of the bias (a copy): the difference is a constant
            # added to the layer's output (a bias; with the parameters' gradients as PyTorch's)
            own = layer.bias if layer.bias is not None else torch.zeros_like(bias)
            given = bias if bias is not None else torch.zeros_like(own)
            out = out + (given - own)
        return out

    def _window_step(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """The steps between a window attention's two projections."""
        window = self._window
        assert window is not None
        first = args[0] if args else None
        if window.stage == "open":
            if func is F.normalize:
                p = args[1] if len(args) > 1 else kwargs.get("p", 2.0)
                dim = args[2] if len(args) > 2 else kwargs.get("dim", 1)
                eps = args[3] if len(args) > 3 else kwargs.get("eps", 1e-12)
                if p == 2.0 and dim in (-1, first.dim() - 1) and kwargs.get("out") is None:
                    return self.handler.normalize(window.name, first, eps)
            if func is torch.einsum and len(args) == 3:
                if args[0].replace(" ", "") == "BGHID,BGHJD->BGHIJ":
                    return torch.matmul(args[1], args[2].transpose(-2, -1))
            if func in _SOFTMAX and isinstance(first, Tensor):
                dim = args[1] if len(args) > 1 else kwargs.get("dim")
                if dim in (-1, first.dim() - 1) and kwargs.get("dtype") is None:
                    shape = first.shape
                    probs = self.handler.softmax(window.name, first.reshape(-1, *shape[-3:]))
                    window.probs = probs.reshape(shape)
                    window.stage = "softmax"
                    return window.probs
        elif window.stage == "softmax":
            if func in (F.dropout, torch.dropout) and first is window.probs:
                window.probs = func(*args, **kwargs)
                return window.probs
            values = None
            if func in _MATMUL and len(args) == 2 and not kwargs and first is window.probs:
                values = args[1]
            elif func is torch.einsum and len(args) == 3 and args[1] is window.probs and \
                    args[0].replace(" ", "") == "BGHIJ,BGHJD->BGHID":  # fmt: skip
                values = args[2]
            if values is not None:
                probs = window.probs
                lead = probs.shape[:-1]
                out = self.handler.weighted_sum(
                    window.name,
                    probs.reshape(-1, *probs.shape[-3:]),
                    values.reshape(-1, *values.shape[-3:]),
                )
                window.stage = "summed"
                return out.reshape(*lead, out.shape[-1])
        return func(*args, **kwargs)

    # ------------------------------------------------------------------ the two steps
    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                scale: float, dropout: float) -> tuple[Tensor, Tensor]:  # fmt: skip
        """``(N, H, L, d)`` queries etc. → ``(out (N, H, L, dv), probs (N, H, L, S))``."""
        name = self._name()
        scores = torch.matmul(q * scale, k.transpose(-2, -1))
        if mask is not None:
            scores = scores + mask
        probs = self.handler.softmax(name, scores)
        if dropout > 0.0:
            probs = F.dropout(probs, p=dropout)
        return self.handler.weighted_sum(name, probs, v), probs

    # ------------------------------------------------------------------ MultiheadAttention
    def _multi_head(self, args: tuple, kwargs: dict) -> Any:
        bound = _MHA_SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        query, key, value = a["query"], a["key"], a["value"]
        module = self._modules.get(id(a["in_proj_weight"]))
        reason = None
        if module is None:
            reason = "called with an in_proj_weight of no nn.MultiheadAttention of the model"
        elif attention_support(module) is not None:
            reason = attention_support(module)
        elif a["use_separate_proj_weight"] or a["static_k"] is not None or \
                a["static_v"] is not None:  # fmt: skip
            reason = "separate projection weights or static keys/values"
        elif not (query is key and key is value):
            reason = (
                "cross-attention (query, key and value are different tensors): patternnet "
                "decomposes self-attention, where one input feeds Q, K and V"
            )
        if reason is not None:
            raise UnsupportedAttentionError(
                f"patternnet cannot explain this nn.MultiheadAttention call: {reason}. Explain "
                "a model whose attention is self-attention on one input (ViT, "
                "TransformerEncoderLayer)"
            )
        assert module is not None
        unbatched = query.dim() == 2
        x = query.unsqueeze(1) if unbatched else query  # (L, N, E)
        length, batch, embed = x.shape
        heads = a["num_heads"]
        head_dim = embed // heads
        # The projections run on the input as it is stored. A batch-first module (ViT) hands
        # over a transposed view (L, N, E) of its (N, L, E) tensor, and F.linear on such a
        # view runs one product per token with the weight expanded (a batched matmul, 2-2.5×
        # slower on CPU than the one matrix product; the transposed products on the way back
        # likewise): project the (N, L, E) tensor and hand the output back transposed.
        batch_first = x.dim() == 3 and not x.is_contiguous() and x.transpose(0, 1).is_contiguous()
        if batch_first:
            qkv = _projection(module)(x.transpose(0, 1))  # (N, L, 3E); hooks and rules apply
        else:
            qkv = _projection(module)(x.contiguous())  # the virtual Linear: hooks, rules apply

        def split(t: Tensor) -> Tensor:  # (L, N, E) or (N, L, E) → (N, H, L, d)
            if batch_first:
                return t.reshape(batch, length, heads, head_dim).permute(0, 2, 1, 3)
            return t.reshape(length, batch, heads, head_dim).permute(1, 2, 0, 3)

        q, k, v = (split(t) for t in qkv.chunk(3, dim=-1))
        mask = _additive_mask(a["attn_mask"], q, allowed_if_true=False)
        if mask is None and a["is_causal"]:
            mask = _causal(length, length, q)
        if mask is not None:
            mask = mask.reshape(batch, heads, length, length) if mask.dim() == 3 else mask
        padding = _additive_mask(a["key_padding_mask"], q, allowed_if_true=False)
        if padding is not None:
            padding = padding.reshape(batch, 1, 1, length)
            mask = padding if mask is None else mask + padding
        dropout = a["dropout_p"] if a["training"] else 0.0
        out, probs = self._attend(q, k, v, mask, 1.0 / math.sqrt(head_dim), dropout)
        if batch_first:  # (N, L, E), handed back as the (L, N, E) view the module expects
            merged = out.permute(0, 2, 1, 3).reshape(batch, length, embed)
            result = module.out_proj(merged).transpose(0, 1)  # as a module: hooks and rules
        else:
            merged = out.permute(2, 0, 1, 3).reshape(length, batch, embed)
            result = module.out_proj(merged)  # called as a module: hooks and rules apply
        weights = None
        if a["need_weights"]:
            weights = probs.mean(1) if a["average_attn_weights"] else probs
            weights = weights.detach() if not torch.is_grad_enabled() else weights
        if unbatched:
            result = result.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        return result, weights

    # ------------------------------------------------------------------ scaled dot product
    def _scaled_dot_product(self, args: tuple, kwargs: dict) -> Tensor:
        a = dict(_SDPA_DEFAULTS)
        a.update(zip(_SDPA_NAMES, args))
        a.update(kwargs)
        query, key, value = a["query"], a["key"], a["value"]
        lead = query.shape[:-2]
        if query.dim() < 2 or lead != key.shape[:-2] and not a["enable_gqa"]:
            raise UnsupportedAttentionError(
                "scaled_dot_product_attention with broadcast batch dimensions is not "
                f"decomposed (query {tuple(query.shape)}, key {tuple(key.shape)})"
            )

        def four(t: Tensor) -> Tensor:  # (..., L, d) → (N, H, L, d)
            if t.dim() == 2:
                return t[None, None]
            if t.dim() == 3:
                return t[:, None]
            return t.reshape(t.shape[0], -1, *t.shape[-2:])

        q, k, v = four(query), four(key), four(value)
        if a["enable_gqa"] and k.shape[1] != q.shape[1]:
            repeat = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
        length, source = q.shape[-2], k.shape[-2]
        scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
        mask = _additive_mask(a["attn_mask"], q, allowed_if_true=True)
        if a["is_causal"]:
            causal = _causal(length, source, q)
            mask = causal if mask is None else mask + causal
        if mask is not None and mask.dim() > 4:
            mask = mask.reshape(mask.shape[0], -1, length, source)
        out, _ = self._attend(q, k, v, mask, scale, float(a["dropout_p"]))
        return out.reshape(*lead, length, value.shape[-1])


@contextmanager
def decomposed(
    model: nn.Module, handler: AttentionHandler | None = None
) -> Iterator[Decomposition]:
    """Within this block, attention in ``model`` runs decomposed (see :class:`Decomposition`)."""
    mode = Decomposition(model, handler)
    with mode:
        yield mode
