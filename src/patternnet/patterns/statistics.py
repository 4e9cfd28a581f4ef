"""Streaming float64 sums and counts per Linear/Conv layer (method.md §2).

A pattern is a ratio of moments, and moments are sums divided by counts. This module keeps
only the sums, so that they stream over any number of batches, merge exactly (``+``) across
partial fits and processes (one all-reduce), and never hold more than one batch of data.

For an output unit ``j`` with input patch ``x`` (a row of a Linear input, or a receptive field
of a convolution, border zeros included), ``y = wⱼᵀx`` and the mask ``m = [wⱼᵀx + bⱼ > 0]``:

==================  ===========================  ===========================
sum                 shape                        needed by
==================  ===========================  ===========================
``count``           ``()``                        all
``sum_y``           ``(O,)``                      all (E[y] over ALL samples)
``sum_x``           ``(G, D)``                    linear, a₋
``sum_xy``          ``(O, D)``                    linear, a₋
``count_plus``      ``(O,)``                      a₊, a₋
``sum_x_plus``      ``(O, D)``                    a₊, a₋
``sum_xy_plus``     ``(O, D)``                    a₊, a₋
``sum_x_minus``     ``(O, D)``                    a₋ in old float32 statistics
``sum_xy_minus``    ``(O, D)``                    a₋ in old float32 statistics
==================  ===========================  ===========================

``G`` is the number of convolution groups and ``D = weight[0].numel()``. The inactive sums of
a₋ are ``all − plus``. The default fit (``negative="auto"``, :func:`layer_sums`) gives layers
read only through ReLU gates the a₊ sums alone: no method reads their a₋. The products are
computed by :meth:`LayerGeometry.weight_product`, the layer's own weight-gradient kernel, with
the stacked output gradient ``[y·m, m, y, 1]``.

With ``precision="float32"`` (the default fit) a convolution's products are formed in float32
of *shifted* data (see :class:`_Shift`; method.md §11) with the stacked gradient
``[y'·m, m, y'·(1−m), 1]`` (a 1×1 convolution's as one matrix product of channel-major data,
:meth:`LayerStatistics._pointwise_product`): the inactive product directly, since
``all − plus`` of two float32-rounded products cancels where most positions are active. The
flush undoes the shift in float64 and adds into the same float64 sums as a float64 fit (a₋'s
as ``all − plus`` in float64, where the difference is exact enough).
``sum_x_minus``/``sum_xy_minus`` are the layout of float32 fits before the shift (still read
from old statistics).

Speed and memory (method.md §9). A product is either formed per batch (convolutions with big
activations, a few images at a time so that one chunk, not one batch, is stacked at once) or
held back: layers whose inputs are smaller than their sums (Linear layers, late
convolutions) keep their inputs and stacked gradients for a few batches and form one large
product at :meth:`LayerStatistics.flush`. With ``precision="float32"`` the per-batch products
are summed in a float32 staging buffer and added into the float64 sums at the flush (the
shift undone there).
:func:`~patternnet.patterns.fit.collect_statistics` flushes every ``DEFAULT_FLUSH_EVERY``
batches and at the end; every reader of the sums (``stats[name]``, merging, all-reduce,
checkpoints) flushes first.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..layers import LayerGeometry

__all__ = [
    "DEFAULT_FLUSH_EVERY", "NEGATIVE_CHOICES", "SUM_NAMES", "LayerStatistics", "Statistics",
    "check_negative", "layer_sums", "required_sums",
]

#: A layer flushes its held-back inputs once they hold this many values (64 MB in float32):
#: large enough that a dense layer's product is one big matrix multiplication, small enough to
#: stay a small part of one batch's memory.
HOLD_ELEMENTS = 1 << 24
#: A convolution with big activations stacks its output gradient for at most this many values
#: at a time (a few images): the memory of one chunk, not of one batch.
_CHUNK_ELEMENTS = 1 << 24
#: ``collect_statistics`` flushes all held-back products every this many batches.
DEFAULT_FLUSH_EVERY = 8


class _Scratch:
    """Buffers reused by every chunk of every layer during a pass (the stacked output gradient
    and the shifted input of a per-batch product), released by :func:`release_scratch`.

    A fresh buffer of tens of MB is mapped afresh by the allocator at every call, and its first
    touch costs a page fault per 4 kB (0.26 s per GB on the quiet test machine): on VGG16 the
    stacked gradients alone are ~1.7 GB of fresh memory per batch of 16. Reused, they stay
    mapped. Only products formed at once may use them (held-back ones keep their tensors).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def __call__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> Tensor:
        """A buffer of ``shape`` (contents undefined) that later calls may overwrite."""
        key = (name, dtype, torch.device(device))
        numel = math.prod(shape)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(max(numel, 1), dtype=dtype, device=device)
            self._buffers[key] = buffer
        return buffer[:numel].view(shape)

    def clear(self) -> None:
        self._buffers.clear()


def _pointwise(geometry: LayerGeometry, weight_shape: torch.Size) -> bool:
    """A 1×1 convolution without groups or padding (any stride): its product is one matrix
    product of channel-major data (:meth:`LayerStatistics._pointwise_product`)."""
    return (geometry.kind == "conv" and geometry.groups == 1 and geometry.pre_pad is None
            and not any(geometry.padding) and all(k == 1 for k in weight_shape[2:]))


_SCRATCH = _Scratch()


def release_scratch() -> None:
    """Free the buffers the per-batch products reuse (:class:`_Scratch`); called after a pass."""
    _SCRATCH.clear()

SUM_NAMES = ("count", "sum_y", "sum_x", "sum_xy", "count_plus", "sum_x_plus", "sum_xy_plus",
             "sum_x_minus", "sum_xy_minus")

#: Which sums each estimator needs.
_NEEDS = {
    "linear": {"count", "sum_y", "sum_x", "sum_xy"},
    "positive": {"count", "sum_y", "count_plus", "sum_x_plus", "sum_xy_plus"},
    "negative": {"count", "sum_y", "sum_x", "sum_xy", "count_plus", "sum_x_plus", "sum_xy_plus"},
    "negative_direct": {"count", "sum_y", "count_plus", "sum_x_plus", "sum_xy_plus",
                        "sum_x_minus", "sum_xy_minus"},
}


def _compute_dtype(precision: str) -> torch.dtype:
    if precision == "float64":
        return torch.float64
    if precision == "float32":
        return torch.float32
    raise ValueError(f"precision must be 'float64' or 'float32', not {precision!r}")


@contextmanager
def full_float32() -> Iterator[None]:
    """Within the block, float32 matrix products and convolutions are IEEE float32 on GPUs.

    PyTorch lets cuDNN convolutions (and, if the user asked, cuBLAS products) use TF32, whose
    10-bit mantissa made a float32 fit on an H100 off by 0.3% (a₊, median over VGG16's layers)
    instead of ~1e-6. Fitting turns TF32 off for its duration and restores the user's settings.
    """
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


#: The values of ``negative`` (:class:`~patternnet.patterns.fit.FitOptions`).
NEGATIVE_CHOICES = (True, False, "auto")


def check_negative(negative: object) -> bool | str:
    """``negative`` validated: ``True``, ``False`` or ``"auto"`` (a clear error otherwise)."""
    if negative is True or negative is False or negative == "auto":
        return negative  # type: ignore[return-value]
    raise ValueError(
        f"negative must be True (a₋ for every layer), False (a₊ only) or 'auto' (a₋ where an "
        f"inactive unit can receive a signal; the default), not {negative!r}"
    )


def required_sums(
    estimator: str, negative: bool | str = True, precision: str = "float64"
) -> frozenset[str]:
    """The sums an estimator needs (``"identity"`` and ``"filter"`` need none).

    Parameters
    ----------
    estimator:
        ``"linear"``, ``"two_component"``, ``"filter"`` or ``"identity"``.
    negative:
        For ``"two_component"``: also collect what the inactive pattern a₋ needs (``True``),
        or not (``False``). ``"auto"`` gives what a layer that needs a₋ needs (the most); a
        fit with ``"auto"`` gives the layers whose inactive units never receive a signal the
        sums of ``False`` (:func:`layer_sums`).
    precision:
        Validated only: both precisions keep the same float64 sums (the module's docstring).
    """
    _compute_dtype(precision)  # validates
    check_negative(negative)
    if estimator == "linear":
        return frozenset(_NEEDS["linear"])
    if estimator == "two_component":
        if not negative:
            return frozenset(_NEEDS["positive"])
        return frozenset(_NEEDS["negative"])
    if estimator in ("filter", "identity"):
        return frozenset()
    raise ValueError(
        f"unknown estimator {estimator!r}; choose 'two_component', 'linear', 'filter' or "
        "'identity'"
    )


def layer_sums(
    estimator: str, negative: bool | str, precision: str, gated: bool
) -> frozenset[str]:
    """The sums one layer collects: :func:`required_sums`, without a₋'s where it is not read.

    Parameters
    ----------
    estimator, negative, precision:
        As for :func:`required_sums`.
    gated:
        The layer's output is read only through ReLU gates
        (:meth:`~patternnet.engine.graph.ModelGraph.relu_gates` says :data:`RELU`): the gate
        zeroes what reaches its inactive units, so no method reads its a₋. With
        ``negative="auto"`` such a layer collects the sums of ``negative=False``.
    """
    if estimator == "two_component" and negative == "auto" and gated:
        return required_sums(estimator, False, precision)
    return required_sums(estimator, negative, precision)


@dataclass
class LayerStatistics:
    """Float64 sums of one Linear/Conv layer over every sample seen so far.

    Parameters
    ----------
    out_features:
        ``O``: output units (channels).
    groups:
        ``G``: convolution groups (1 for Linear).
    patch_size:
        ``D``: inputs per unit, ``weight[0].numel()``.
    sums:
        Names from :data:`SUM_NAMES` to collect.
    device:
        Where the sums live (the model's device: no host copies per batch).
    """

    out_features: int
    groups: int
    patch_size: int
    sums: frozenset[str]
    device: torch.device | str = "cpu"
    tensors: dict[str, Tensor] = field(default_factory=dict)
    # Held-back products (see ``flush``): inputs with their stacked output gradients (whose
    # product is formed at the flush), and a float32 staging sum of convolution products.
    _held: list[tuple[Tensor, Tensor]] = field(default_factory=list, init=False, repr=False)
    _held_names: list[str] = field(default_factory=list, init=False, repr=False)
    _held_elements: int = field(default=0, init=False, repr=False)
    _held_product: tuple[LayerGeometry, torch.Size] | None = field(
        default=None, init=False, repr=False
    )
    _stage: Tensor | None = field(default=None, init=False, repr=False)
    _stage_names: list[str] = field(default_factory=list, init=False, repr=False)
    # Shifted float32 products (see ``_Shift``): the shifts, and the float64 sums over the
    # samples whose products are staged or held, which the flush needs to undo the shift.
    _shift: _Shift | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.tensors:
            shapes = {
                "count": (),
                "sum_y": (self.out_features,),
                "sum_x": (self.groups, self.patch_size),
                "sum_xy": (self.out_features, self.patch_size),
                "count_plus": (self.out_features,),
                "sum_x_plus": (self.out_features, self.patch_size),
                "sum_xy_plus": (self.out_features, self.patch_size),
                "sum_x_minus": (self.out_features, self.patch_size),
                "sum_xy_minus": (self.out_features, self.patch_size),
            }
            self.tensors = {
                name: torch.zeros(shapes[name], dtype=torch.float64, device=self.device)
                for name in SUM_NAMES
                if name in self.sums
            }

    # ------------------------------------------------------------------ access
    def __getitem__(self, name: str) -> Tensor:
        self.flush()
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(
                f"sum {name!r} was not collected (collected: {sorted(self.tensors)}); fit again "
                "with an estimator that needs it"
            ) from None

    @property
    def count(self) -> int:
        """Number of samples (rows, or output positions × images) accumulated."""
        self.flush()
        return int(self.tensors["count"].item())

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(
        self,
        geometry: LayerGeometry,
        x: Tensor,
        out: Tensor,
        bias: Tensor | None,
        weight_shape: torch.Size,
        precision: str = "float64",
    ) -> None:
        """Add one batch: the layer's input ``x`` and its output ``out`` (bias included).

        Products may be held back (see :meth:`flush`): read the sums through ``stats[name]``,
        :meth:`flush` first, or use a finished :func:`~patternnet.patterns.fit.collect_statistics`.

        Parameters
        ----------
        geometry:
            The layer's geometry (see :func:`patternnet.layers.geometry`).
        x, out:
            Input and output of one forward call of the layer.
        bias:
            The layer's bias or None; ``y = out − bias`` and the mask is ``out > 0``.
        weight_shape:
            Shape of the layer's weight.
        precision:
            ``"float32"``: convolution products of *shifted* data in float32, summed into the
            float64 sums (the module's docstring); Linear products in float64.
            ``"float64"``: every product in float64, the reference.

        Notes
        -----
        Layers whose inputs and stacked output gradients are smaller than their product (all
        Linear layers, and convolutions with little spatial extent such as the last blocks of
        a ResNet) hold them back (a few batches, at most ``HOLD_ELEMENTS`` values) and form the
        product of all of them at :meth:`flush`: with small batches the per-batch product of
        a dense layer is a rank-``batch`` update of a huge ``(O, D)`` matrix whose cost is
        reading and writing that matrix (method.md §9), so fewer, larger products are several
        times faster. Other convolutions form their product per batch.
        """
        dtype = _compute_dtype(precision)
        given = x
        x, out = x.detach(), out.detach()
        bias = None if bias is None else bias.detach().to(dtype)
        O = self.out_features
        need = self.tensors
        names: list[str] = []
        if "count_plus" in need:
            names += ["sum_xy_plus", "sum_x_plus"]
        if "sum_xy" in need:
            names.append("sum_xy")
        need["count"] += out.numel() // O

        if geometry.kind == "linear" and precision == "float32" and x.dim() > 2:
            # A Linear over tokens (transformers): thousands of rows per batch make its
            # product compute-bound, where float64 costs 2× float32. Such a layer is a 1×1
            # convolution over its rows: the shifted float32 product of the convolutions
            # below (geometry "linear": rows are the samples, ``weight_product`` a matmul).
            x, out = geometry.flatten_linear(x, out)
        elif geometry.kind == "linear":
            # Products in float64 at the flush (few rows: memory-bound, exact, no shift).
            x, out = x.to(dtype), out.to(dtype)
            y = out if bias is None else out - bias
            dims = list(range(y.dim() - 1))
            m = (out > 0).to(dtype) if "count_plus" in need else None
            x2, _ = geometry.flatten_linear(x, out)
            if names:
                parts = {"sum_xy_plus": lambda: y * m, "sum_x_plus": lambda: m,
                         "sum_xy": lambda: y}
                rows = torch.cat([parts[name]().reshape(-1, O) for name in names], dim=1)
                if x2.untyped_storage().data_ptr() == given.untyped_storage().data_ptr():
                    x2 = x2.clone()  # held across batches: never alias the model's tensors
                self._hold(x2, rows, names, None)
            if "sum_x" in need:
                need["sum_x"] += x2.sum(0, dtype=torch.float64).view(1, -1)
            need["sum_y"] += y.sum(dims, dtype=torch.float64)
            if m is not None:
                need["count_plus"] += m.sum(dims, dtype=torch.float64)
            return

        # Convolution: the stacked output gradient [y·m, m, y, 1] per group (see _stack); in
        # float32 [y'·m, m, y'·(1−m), 1] of the shifted y' = y − y₀, with the shifted input.
        shift = None
        pointwise = _pointwise(geometry, weight_shape)  # before the padding moves to the input
        if precision == "float32":
            if self._shift is None:
                self._shift = _Shift.first(x, out, bias, self.groups, self.patch_size)
            shift = self._shift
            if "sum_xy" in names and "sum_xy_plus" in names:  # a₋: direct inactive block
                names[names.index("sum_xy")] = "sum_xy_minus"
            geometry, prepare = shift.unpadded(geometry), shift.shifted_input(geometry)
        else:
            prepare = None
        G = self.groups
        n = out.shape[0]
        k = (O // G) * len(names) + (1 if "sum_x" in need else 0)
        stack_names = names + (["sum_x"] if "sum_x" in need else [])
        product_shape = torch.Size((G * k, *weight_shape[1:]))
        positions = out[0, 0].numel()
        if shift is not None:
            shift.count += n * positions
        if x.numel() + n * G * k * positions < product_shape.numel():
            # Small activations, big product (late convolutions): form it at the flush.
            grad = self._stack(out.to(dtype), bias, names, shift)
            x = x.to(dtype) if prepare is None else prepare(x)
            if x.untyped_storage().data_ptr() == given.untyped_storage().data_ptr():
                x = x.clone()  # held across batches: never alias the model's tensors
            self._hold(x, grad, stack_names, (geometry, product_shape))
            return
        # Big activations: a few images at a time, so that the stacked gradient of the whole
        # batch never exists at once (memory: one chunk, not one batch).
        step = max(1, _CHUNK_ELEMENTS // max(1, G * k * positions))
        if shift is not None and pointwise and shift.single_y0:
            for start in range(0, n, step):
                self._pointwise_product(x[start : start + step], out[start : start + step],
                                        geometry, names, stack_names, shift)
            return
        for start in range(0, n, step):
            chunk_x = x[start : start + step]
            chunk_x = chunk_x.to(dtype) if prepare is None else prepare(chunk_x, True)
            grad = self._stack(out[start : start + step].to(dtype), bias, names, shift,
                               scratch=True)
            product = geometry.weight_product(chunk_x, grad, product_shape).reshape(G, k, -1)
            if precision == "float64":
                self._add_stacked(product, stack_names)
            elif self._stage is None:
                self._stage, self._stage_names = product, stack_names
            else:
                self._stage += product

    def _pointwise_product(self, x: Tensor, out: Tensor, geometry: LayerGeometry,
                           names: list[str], stack_names: list[str], shift: _Shift) -> None:
        """One chunk of a 1×1 convolution (groups 1, no padding) as ONE float32 matrix product.

        The shifted input ``x'`` and the stacked gradient are written channel-major,
        ``(C + 1, N·P)`` and ``(K, N·P)``, so that ``Σ_samples g ⊗ x'`` is a single
        ``(K, N·P) × (N·P, C + 1)`` product (1.2-2.4× faster than the convolution's
        weight-gradient kernel on ResNet-50's 1×1 layers, 2 threads). The extra row of ones
        makes the last column the per-unit sums of every stacked channel (``Σ y'·m``, ``Σ m``,
        ``Σ y'·(1 − m)``), which the generic path reduces separately.
        """
        C = x.shape[1]
        stride = geometry.stride
        x = x[(slice(None), slice(None), *(slice(None, None, s) for s in stride))]
        n, spatial = x.shape[0], x.shape[2:]
        samples = n * math.prod(spatial)
        k = self.out_features * len(names) + (1 if "sum_x" in stack_names else 0)
        inputs = _SCRATCH("pointwise_input", (C + 1, n, *spatial), torch.float32, x.device)
        torch.sub(x.to(torch.float32), shift.channel.view(1, C, *([1] * len(spatial))),
                  out=inputs[:C].movedim(0, 1))
        inputs[C].fill_(1.0)
        grad = _SCRATCH("stacked", (k, n, *spatial), torch.float32, x.device)
        self._stack(out.to(torch.float32), None, names, shift,
                    layout=grad.movedim(0, 1).unsqueeze(1), product_sums=True)
        product = torch.mm(grad.view(k, samples), inputs.view(C + 1, samples).t())
        sums = product[:, C].to(torch.float64)  # per stacked channel, summed over samples
        product = product[:, :C].unsqueeze(0)  # (1, K, D)
        O = self.out_features
        need = self.tensors
        y0 = shift.y0[""]
        if "sum_xy_plus" in names:  # two-component (else: linear, Σ y' reduced by _stack)
            active, count_plus = sums[:O], sums[O : 2 * O]  # Σ y'·m, Σ m
            need["count_plus"] += count_plus
            shift.count_plus += count_plus
            shift.sum_y_plus += active + count_plus * y0
            if "sum_xy_minus" in names:  # Σ y' = Σ y'·m + Σ y'·(1 − m)
                sum_y = active + sums[2 * O : 3 * O] + samples * y0
                shift.sum_y += sum_y
                need["sum_y"] += sum_y
        if self._stage is None:
            self._stage, self._stage_names = product, stack_names
        else:
            self._stage += product

    def _stack(
        self, out: Tensor, bias: Tensor | None, names: list[str], shift: _Shift | None = None,
        *, scratch: bool = False, layout: Tensor | None = None, product_sums: bool = False,
    ) -> Tensor:
        """The stacked output gradient ``[y·m, m, y, 1]`` (or ``[y'·m, m, y'·(1−m), 1]``).

        Shaped ``(N, G·K, ...)``.

        Written in place per group, so that the grouped weight-gradient keeps groups aligned:
        ``(N, G, K, *spatial)`` with ``K = len(names)·O/G (+1 for the ones of sum_x)``. Also
        adds the batch's ``sum_y`` and ``count_plus`` (float64), and with a ``shift`` the
        float64 sums of ``y`` and ``y·m`` that its flush needs. With ``scratch`` the result
        lives in a reused buffer (:class:`_Scratch`): use it before the next call. ``layout``
        is a ``(N, G, K, *spatial)`` view to write into instead (channel-major, see
        :meth:`_pointwise_product`); with ``product_sums`` the caller takes ``count_plus``,
        the active side's sums and, where the inactive block is stacked, ``sum_y`` from the
        product (``shift`` with one ``y₀`` for every side), and they are not reduced here.
        """
        need = self.tensors
        O, G = self.out_features, self.groups
        og = O // G
        n, spatial = out.shape[0], out.shape[2:]
        ones = "sum_x" in need
        k = og * len(names) + (1 if ones else 0)
        shape_ = (n, G, k, *spatial)
        if layout is not None:
            stacked = layout
        else:
            stacked = (_SCRATCH("stacked", shape_, out.dtype, out.device) if scratch
                       else out.new_empty(shape_))  # fmt: skip
        out_g = out.reshape(n, G, og, *spatial)
        offset = bias if shift is None else shift.offsets[""]
        shape = (1, G, og, *([1] * len(spatial)))
        bias_g = None if offset is None else offset.view(shape)
        dims = [0, *range(3, 3 + len(spatial))]
        positions = n * math.prod(spatial)

        def write_y(block: Tensor, offset_g: Tensor | None = bias_g) -> Tensor:
            if offset_g is None:
                return block.copy_(out_g)
            return torch.sub(out_g, offset_g, out=block)

        def side_sum(block: Tensor) -> Tensor:
            # Summed in the block's dtype (float32 sums of shifted values per chunk), added in
            # float64: a float64-accumulating reduction of float32 data took 20× longer here.
            return block.sum(dims).reshape(O).to(torch.float64)

        first = write_y(stacked[:, :, :og])
        if not (product_sums and "sum_xy_minus" in names):
            sum_y = side_sum(first)
            if shift is not None:
                sum_y += positions * shift.y0[""]
                shift.sum_y += sum_y
            need["sum_y"] += sum_y
        slot = 0
        for name in names:
            block = stacked[:, :, slot : slot + og]
            if name == "sum_xy_plus":  # always first: the block holds y
                mask = stacked[:, :, slot + og : slot + 2 * og]
                torch.gt(out_g, 0, out=mask)  # [out > 0] as 0/1, one pass (heaviside: 9× slower)
                if product_sums:
                    block.mul_(mask)
                    slot += og
                    continue
                # Sums of 0/1 below 2**24 are exact in float32 (a chunk holds fewer samples).
                count_plus = mask.sum(dims).reshape(O).to(torch.float64)
                need["count_plus"] += count_plus
                if shift is not None and not shift.same_plus:  # y − y₀₊ on the active side
                    write_y(block, shift.offsets["_plus"].view(shape))
                block.mul_(mask)
                if shift is not None:
                    shift.count_plus += count_plus
                    shift.sum_y_plus += side_sum(block) + count_plus * shift.y0["_plus"]
            elif name == "sum_xy" and slot:
                write_y(block)
            elif name == "sum_xy_minus":  # after sum_xy_plus: (y − y₀₋)·(1 − m)
                mask = stacked[:, :, og : 2 * og]
                write_y(block, bias_g if shift is None else shift.offsets["_minus"].view(shape))
                block.addcmul_(block, mask, value=-1.0)
            slot += og
        if ones:
            stacked[:, :, slot].fill_(1.0)
        return stacked.view(n, G * k, *spatial)

    # ------------------------------------------------------------------ held-back products
    @property
    def pending(self) -> bool:
        """True while some products are held back (see :meth:`flush`)."""
        return bool(self._held) or self._stage is not None

    @torch.no_grad()
    def flush(self) -> LayerStatistics:
        """Add every held-back product into the float64 sums (in place) and return self."""
        product, names = self._stage, self._stage_names
        self._stage, self._stage_names = None, []
        if self._held:
            held, held_names, conv = self._held, self._held_names, self._held_product
            xs = torch.cat([h[0] for h in held]) if len(held) > 1 else held[0][0]
            gs = torch.cat([h[1] for h in held]) if len(held) > 1 else held[0][1]
            self._held, self._held_elements, self._held_product = [], 0, None
            if conv is None:
                # One float64 product straight into the sums, for float32 rows too: with a
                # few hundred rows at most it is memory-bound, and 5× faster than a float32
                # product followed by its conversion into float64 (VGG16's fc6).
                xs, gs = xs.to(torch.float64), gs.to(torch.float64)
                O = self.out_features
                for i, name in enumerate(held_names):
                    self.tensors[name].addmm_(gs[:, i * O : (i + 1) * O].t(), xs)
            else:
                geometry, shape = conv
                held_product = geometry.weight_product(xs, gs, shape)
                held_product = held_product.reshape(self.groups, -1, held_product[0].numel())
                if product is None:
                    product, names = held_product, held_names
                else:
                    product += held_product
        if product is not None:
            if self._shift is not None and product.dtype != torch.float64:
                self._shift.undo(product, names, self.tensors, self.out_features)
            else:
                self._add_stacked(product, names)
        return self

    def _hold(self, x: Tensor, grad: Tensor, names: list[str],
              conv: tuple[LayerGeometry, torch.Size] | None) -> None:
        """Keep ``x`` and ``grad`` for the product at the next flush."""
        if self._held and (self._held_names != names or self._held[0][0].shape[1:] != x.shape[1:]):
            self.flush()  # a reused module called on inputs of another shape
        self._held.append((x, grad))
        self._held_names, self._held_product = names, conv
        self._held_elements += x.numel() + grad.numel()
        if self._held_elements >= HOLD_ELEMENTS:
            self.flush()

    def _add_stacked(self, product: Tensor, names: list[str]) -> None:
        """Add a ``(G, K, D)`` stacked conv product (blocks of ``O/G`` rows per name)."""
        G, O = self.groups, self.out_features
        start = 0
        for name in names:
            width = 1 if name == "sum_x" else O // G
            block = product[:, start : start + width]
            start += width
            target = self.tensors[name]
            if name == "sum_x":
                target += block.reshape(G, -1)
            else:
                target.view(G, O // G, -1).add_(block)

    def rows(self, start: int, stop: int) -> LayerStatistics:
        """The sums of units ``start:stop`` (views, no copies; one group only)."""
        if self.groups != 1:
            raise ValueError("rows() of grouped statistics: take whole groups instead")
        self.flush()
        per_unit = {"sum_y", "count_plus", "sum_xy", "sum_x_plus", "sum_xy_plus",
                    "sum_x_minus", "sum_xy_minus"}
        tensors = {k: (t[start:stop] if k in per_unit else t) for k, t in self.tensors.items()}
        return LayerStatistics(stop - start, 1, self.patch_size, self.sums, self.device, tensors)

    # ------------------------------------------------------------------ merge
    def merge_(self, other: LayerStatistics) -> LayerStatistics:
        """Add another partial fit's sums into these (in place) and return self."""
        if (self.out_features, self.groups, self.patch_size) != (
            other.out_features,
            other.groups,
            other.patch_size,
        ) or set(self.tensors) != set(other.tensors):
            raise ValueError(
                "cannot merge statistics of different layers or estimators: "
                f"{(self.out_features, self.groups, self.patch_size, sorted(self.tensors))} vs "
                f"{(other.out_features, other.groups, other.patch_size, sorted(other.tensors))}"
            )
        self.flush()
        other.flush()
        for name, tensor in self.tensors.items():
            tensor += other.tensors[name].to(tensor.device)
        return self

    def all_reduce_(self, group: object | None = None) -> LayerStatistics:
        """Sum these statistics over all processes of ``torch.distributed`` (in place)."""
        self.flush()
        for name in SUM_NAMES:
            if name in self.tensors:
                dist.all_reduce(self.tensors[name], op=dist.ReduceOp.SUM, group=group)
        return self



class _Shift:
    """The shifts of one convolution's float32 products, and the sums that undo them.

    A float32 product ``Σ x·y`` over many samples loses ``E[xy] − E[x]E[y]`` when the means
    are large against the spreads (ImageNet-normalised images, post-ReLU activations; method.md
    §11). The products are therefore formed of shifted data ``x' = x − x₀`` and
    ``y' = y − y₀``: ``x₀`` is the per-channel mean of the layer's first input batch (the same
    for every kernel offset), ``y₀`` the per-unit mean of its first ``y`` over the samples of
    the product's side (active ``m = 1``, inactive, or all). At the flush they are turned back
    into the float64 sums of ``x`` and ``y``::

        Σ m x y = Σ m x'y' + y₀ Σ m x' + x₀ Σ m y        Σ m x = Σ m x' + x₀ Σ m

    The correction terms are float64 outer products of ``(O,)`` and ``(D,)`` vectors; ``Σ m y``
    and ``Σ m`` are summed in float64 over the same samples as the staged product. Zero
    padding belongs to ``x``, not ``x'``: the input is padded first and shifted after, so a
    padded border holds ``−x₀``.
    """

    #: What :meth:`state` holds (what a checkpoint keeps of the shift): the input channels'
    #: shift, and per side (all, active, inactive) ``bias + y₀`` in float32 and ``y₀``.
    STATE = ("channel", "offset", "y0", "offset_plus", "y0_plus", "offset_minus", "y0_minus")
    SIDES = ("", "_plus", "_minus")

    def __init__(self, state: Mapping[str, Tensor], groups: int, patch_size: int) -> None:
        self.channel = state["channel"].to(torch.float32)
        self.offsets = {side: state["offset" + side].to(torch.float32) for side in self.SIDES}
        self.y0 = {side: state["y0" + side].to(torch.float64) for side in self.SIDES}
        # the active side's y − y₀₊ is the y − y₀ already written (one y₀ for all sides)
        self.same_plus = bool(torch.equal(self.offsets["_plus"], self.offsets[""]))
        # one y₀ for both sides (as :meth:`first` gives): the flush skips their difference
        self.same_sides = bool(torch.equal(self.y0["_plus"], self.y0["_minus"]))
        #: one shift ``y₀`` (and offset) for every side, as :meth:`first` gives
        self.single_y0 = (self.same_plus and self.same_sides
                          and bool(torch.equal(self.y0["_plus"], self.y0[""]))
                          and bool(torch.equal(self.offsets["_minus"], self.offsets[""])))
        C = self.channel.numel()
        per_group = C // groups
        self.x0 = (self.channel.to(torch.float64).view(groups, per_group, 1)
                   .expand(groups, per_group, patch_size // per_group)
                   .reshape(groups, patch_size))  # fmt: skip
        zeros = torch.zeros_like(self.y0[""])
        self.count = 0
        self.count_plus, self.sum_y, self.sum_y_plus = zeros.clone(), zeros.clone(), zeros

    def state(self) -> dict[str, Tensor]:
        """The shifts (the float64 sums of the interval are empty after a flush)."""
        state = {"channel": self.channel}
        for side in self.SIDES:
            state["offset" + side], state["y0" + side] = self.offsets[side], self.y0[side]
        return state

    @classmethod
    def first(cls, x: Tensor, out: Tensor, bias: Tensor | None, groups: int,
              patch_size: int) -> _Shift:
        """Shifts from a layer's first batch: the means of its input channels and of ``y``."""
        # Any shift near the means serves (it is undone exactly): float32 means, one pass each
        # (a float64 copy of the batch, or a float64-accumulating reduction of float32 data,
        # took several times longer).
        dims = [0, *range(2, x.dim())]
        state = {"channel": x.mean(dims, dtype=torch.float32)}
        out_dims = [0, *range(2, out.dim())]
        b = None if bias is None else bias.to(torch.float32)
        mean = out.mean(out_dims, dtype=torch.float32).to(torch.float64)
        if b is not None:
            mean = mean - b.to(torch.float64)
        # One y₀ for both sides: a pattern's numerator is Σ m x (y − E[y]), so with y₀ ≈ E[y]
        # the float32 rounding of Σ m x' is multiplied by E[y] − y₀ ≈ 0. Shifting each side
        # by its own mean multiplies it by E±[y] − E[y] instead (measured: 10× less exact).
        means = {"": mean, "_plus": mean, "_minus": mean}
        for side, y0 in means.items():
            if b is None:
                offset = y0.to(torch.float32)
                exact = offset.to(torch.float64)
            else:  # what out − offset subtracts beyond the bias, exactly
                offset = b + y0.to(torch.float32)
                exact = offset.to(torch.float64) - b.to(torch.float64)
            state["offset" + side], state["y0" + side] = offset, exact
        return cls(state, groups, patch_size)

    @staticmethod
    def unpadded(geometry: LayerGeometry) -> LayerGeometry:
        """The geometry of the product with an input padded (and shifted) beforehand."""
        n = geometry.spatial_dims
        return replace(geometry, padding=(0,) * n, pre_pad=None, pad_mode="constant")

    def shifted_input(self, geometry: LayerGeometry):
        """A function: (input chunk, scratch) → padded, then shifted, float32 input.

        With ``scratch`` the result lives in a reused buffer (:class:`_Scratch`), written once:
        the border ``−x₀`` strips, the inside ``x − x₀``; otherwise a new tensor.
        """
        n = geometry.spatial_dims
        pads = [p for p in reversed(geometry.padding) for _ in range(2)]
        shift = self.channel.view(1, -1, *([1] * n))

        def prepare(x: Tensor, scratch: bool = False) -> Tensor:
            x = geometry.prepare_input(x.to(torch.float32))
            if not scratch:
                if any(pads):
                    return F.pad(x, pads).sub_(shift)
                return torch.sub(x, shift)
            padded = [*x.shape[:2], *(s + 2 * p for s, p in zip(x.shape[2:], geometry.padding))]
            out = _SCRATCH("input", tuple(padded), torch.float32, x.device)
            inside = out
            for d, p in enumerate(geometry.padding):
                if p:
                    dim, size = 2 + d, padded[2 + d]
                    out.narrow(dim, 0, p).copy_(shift.neg().expand_as(out.narrow(dim, 0, p)))
                    end = out.narrow(dim, size - p, p)
                    end.copy_(shift.neg().expand_as(end))
                    inside = inside.narrow(dim, p, size - 2 * p)
            torch.sub(x, shift, out=inside)
            return out

        return prepare

    @torch.no_grad()
    def undo(self, product: Tensor, names: list[str], tensors: dict[str, Tensor],
             out_features: int) -> None:
        """Add a float32 ``(G, K, D)`` product of shifted data into the float64 sums."""
        G, D = product.shape[0], product.shape[2]
        og = out_features // G
        blocks, start = {}, 0
        for name in names:
            width = 1 if name == "sum_x" else og
            blocks[name] = product[:, start : start + width]
            start += width
        x0 = self.x0.view(G, 1, D)
        y0 = {side: value.view(G, og, 1) for side, value in self.y0.items()}
        sum_x = blocks.get("sum_x")  # Σ x' (G, 1, D): the ones channel
        # In place, mixed float32/float64 operands (promoted per element): no temporary of
        # the sums' size (a fresh (O, D) float64 buffer pays its page faults at every flush).
        if "sum_xy_plus" in blocks:
            A, B = blocks["sum_xy_plus"], blocks["sum_x_plus"]
            target = tensors["sum_xy_plus"].view(G, og, D)
            target += A
            target.addcmul_(B, y0["_plus"])
            target.baddbmm_(self.sum_y_plus.view(G, og, 1), x0)
            target = tensors["sum_x_plus"].view(G, og, D)
            target += B
            target.baddbmm_(self.count_plus.view(G, og, 1), x0)
        if "sum_xy" in tensors:
            target = tensors["sum_xy"].view(G, og, D)
            if "sum_xy" in blocks:  # one block of all samples
                target += blocks["sum_xy"]
                target.addcmul_(sum_x, y0[""])
            else:  # active and inactive blocks, each shifted by its own y₀
                A, B, C = blocks["sum_xy_plus"], blocks["sum_x_plus"], blocks["sum_xy_minus"]
                target += A
                target += C
                if not self.same_sides:
                    target.addcmul_(B, y0["_plus"] - y0["_minus"])
                target.addcmul_(sum_x, y0["_minus"])
            target.baddbmm_(self.sum_y.view(G, og, 1), x0)
        if sum_x is not None:
            tensors["sum_x"] += sum_x.reshape(G, D)
            tensors["sum_x"] += self.count * self.x0
        self.count = 0
        for vector in (self.count_plus, self.sum_y, self.sum_y_plus):
            vector.zero_()


class Statistics(Mapping[str, LayerStatistics]):
    """The :class:`LayerStatistics` of every fitted layer of a model, by qualified name.

    ``Statistics`` are what a fit accumulates; :func:`patternnet.patterns.estimators`
    turns them into patterns. They merge with ``+``/:meth:`merge_` (partial fits over disjoint
    data) and :meth:`all_reduce_` (``torch.distributed``).
    """

    def __init__(
        self,
        layers: Mapping[str, LayerStatistics],
        *,
        estimator: str,
        negative: bool | str = True,
        images: int = 0,
        batches: int = 0,
    ) -> None:
        self.layers = dict(layers)
        self.estimator = estimator
        self.negative = negative
        self.images = images
        self.batches = batches

    def __getitem__(self, name: str) -> LayerStatistics:
        return self.layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def merge_(self, other: Statistics) -> Statistics:
        """Add the sums of a partial fit over other data (in place) and return self."""
        if set(self.layers) != set(other.layers) or self.estimator != other.estimator:
            raise ValueError(
                "cannot merge statistics of different models or estimators "
                f"({self.estimator!r} over {len(self)} layers vs {other.estimator!r} over "
                f"{len(other)} layers)"
            )
        for name, layer in self.layers.items():
            layer.merge_(other.layers[name])
        self.images += other.images
        self.batches += other.batches
        return self

    def __add__(self, other: Statistics) -> Statistics:
        result = self.copy()
        return result.merge_(other)

    @property
    def pending(self) -> bool:
        """True while some layer holds back products (see :meth:`LayerStatistics.flush`)."""
        return any(layer.pending for layer in self.layers.values())

    def flush(self) -> Statistics:
        """Add every held-back product into the float64 sums (in place) and return self."""
        for layer in self.layers.values():
            layer.flush()
        return self

    def copy(self) -> Statistics:
        """A deep copy (held-back products are flushed first)."""
        self.flush()
        layers = {
            name: LayerStatistics(
                layer.out_features,
                layer.groups,
                layer.patch_size,
                layer.sums,
                layer.device,
                {k: v.clone() for k, v in layer.tensors.items()},
            )
            for name, layer in self.layers.items()
        }
        for name, layer in self.layers.items():
            if layer._shift is not None:
                layers[name]._shift = _Shift(
                    {k: v.clone() for k, v in layer._shift.state().items()},
                    layer.groups, layer.patch_size,
                )
        return Statistics(
            layers,
            estimator=self.estimator,
            negative=self.negative,
            images=self.images,
            batches=self.batches,
        )

    def all_reduce_(self, group: object | None = None) -> Statistics:
        """Sum over all ``torch.distributed`` processes (in place); counts included."""
        self.flush()
        for name in sorted(self.layers):
            self.layers[name].all_reduce_(group)
        counts = torch.tensor(
            [self.images, self.batches],
            dtype=torch.float64,
            device=next(iter(self.layers.values())).tensors["count"].device
            if self.layers
            else "cpu",
        )
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        self.images, self.batches = int(counts[0].item()), int(counts[1].item())
        return self

    # ------------------------------------------------------------------ flat form
    def state_tensors(self) -> dict[str, Tensor]:
        """All sums as one flat ``{"layer::sum": tensor}`` dict (for checkpoints).

        The shifts of a float32 fit come along as ``"layer::shift::channel"``, ``…::offset``
        and ``…::y0``, so that a resumed fit forms the same products as an uninterrupted one.
        """
        self.flush()
        state = {}
        for name, layer in self.layers.items():
            for key, tensor in layer.tensors.items():
                state[f"{name}::{key}"] = tensor
            if layer._shift is not None:
                # copies (a few O-sized vectors): a node's sides may share one tensor, which
                # safetensors refuses to write
                for key, tensor in layer._shift.state().items():
                    state[f"{name}::shift::{key}"] = tensor.clone()
        return state

    def describe(self) -> dict[str, object]:
        """JSON-able description of the layout (without the numbers)."""
        return {
            "estimator": self.estimator,
            "negative": self.negative,
            "images": self.images,
            "batches": self.batches,
            "layers": {
                name: [layer.out_features, layer.groups, layer.patch_size, sorted(layer.sums)]
                for name, layer in self.layers.items()
            },
        }

    @classmethod
    def from_state(
        cls, description: Mapping[str, object], tensors: Mapping[str, Tensor]
    ) -> Statistics:
        """Rebuild from :meth:`describe` and :meth:`state_tensors` output."""
        layers = {}
        for name, (out_features, groups, patch_size, sums) in description["layers"].items():
            layers[name] = LayerStatistics(
                int(out_features),
                int(groups),
                int(patch_size),
                frozenset(sums),
                "cpu",
                {key: tensors[f"{name}::{key}"].to(torch.float64) for key in sums},
            )
            shift = {key: tensors.get(f"{name}::shift::{key}") for key in _Shift.STATE}
            if all(t is not None for t in shift.values()):
                layers[name]._shift = _Shift(shift, int(groups), int(patch_size))
        return cls(
            layers,
            estimator=str(description["estimator"]),
            negative=_negative_of(description["negative"]),
            images=int(description["images"]),
            batches=int(description["batches"]),
        )

    def to(self, device: torch.device | str) -> Statistics:
        """Move all sums to ``device`` (in place) and return self."""
        self.flush()
        for layer in self.layers.values():
            layer.device = device
            layer.tensors = {k: v.to(device) for k, v in layer.tensors.items()}
            if layer._shift is not None:
                layer._shift = _Shift(
                    {k: v.to(device) for k, v in layer._shift.state().items()},
                    layer.groups, layer.patch_size,
                )
        return self


def _negative_of(value: object) -> bool | str:
    """``negative`` as a checkpoint's description holds it (``"auto"`` or a boolean)."""
    return "auto" if value == "auto" else bool(value)
