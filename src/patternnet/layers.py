"""Linear and convolution layers seen as linear maps ``x -> W x``.

Everything the rest of the package needs to know about a ``Linear`` or ``Conv1d/2d/3d``
lives here: which modules count as such layers, how a batch of inputs is padded the way the
layer pads it, the transposed map ``g -> Wᵀ g`` with any weight put in the place of ``W``
(the backward pass of PatternNet and of every rule), and the weight-gradient product
``Σ_positions patch ⊗ g`` that turns the sums of method.md §2 into one kernel call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LINEAR_LAYERS", "LayerGeometry", "geometry", "is_linear_layer"]

#: The module types that have a weight to learn a pattern for.
LINEAR_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_linear_layer(module: nn.Module) -> bool:
    """Return True for ``nn.Linear`` and ``nn.Conv1d/2d/3d`` (not transposed convolutions)."""
    return isinstance(module, LINEAR_LAYERS)


@dataclass(frozen=True)
class LayerGeometry:
    """How a Linear/Conv layer maps its input to its output.

    Attributes
    ----------
    kind:
        ``"linear"`` or ``"conv"``.
    spatial_dims:
        0 for Linear, 1/2/3 for ConvNd.
    stride, padding, dilation:
        Convolution arguments after explicit pre-padding (``padding`` is then all zeros when
        ``pre_pad`` is set).
    groups:
        Number of convolution groups (1 for Linear).
    pre_pad:
        ``F.pad`` amounts applied to the input before the convolution, or None. Used for
        ``padding='same'`` and for padding modes other than zeros.
    pad_mode:
        ``F.pad`` mode of ``pre_pad`` (``"constant"``, ``"reflect"``, ``"replicate"``,
        ``"circular"``).
    """

    kind: str
    spatial_dims: int
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    pre_pad: tuple[int, ...] | None = None
    pad_mode: str = "constant"

    # ------------------------------------------------------------------ inputs
    def prepare_input(self, x: Tensor) -> Tensor:
        """Apply the layer's explicit padding (if any) to a batch of inputs."""
        if self.pre_pad is None:
            return x
        return F.pad(x, self.pre_pad, mode=self.pad_mode)

    def flatten_linear(self, x: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
        """Rows ``(M, D)`` and ``(M, O)`` of a Linear layer's inputs and outputs."""
        return x.reshape(-1, x.shape[-1]), out.reshape(-1, out.shape[-1])

    # ------------------------------------------------------------------ maps
    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """The layer's map with ``weight`` (and ``bias``) in the place of its own."""
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.spatial_dims - 1]
        return conv(self.prepare_input(x), weight, bias, self.stride, self.padding,
                    self.dilation, self.groups)

    def transpose(self, grad_out: Tensor, weight: Tensor, input_shape: torch.Size) -> Tensor:
        """``Wᵀ g``: the input-gradient of the layer with ``weight`` put in place of ``W``.

        Parameters
        ----------
        grad_out:
            Gradient (or relevance) arriving at the layer's output.
        weight:
            Any tensor shaped like the layer's weight (a pattern, ``W ⊙ A``, ``W⁺`` ...).
        input_shape:
            Shape of the layer's (unpadded) input.
        """
        if self.kind == "linear":
            return grad_out.matmul(weight.to(grad_out.dtype))
        padded_shape = input_shape
        if self.pre_pad is not None:
            padded_shape = self._padded_shape(input_shape)
        # The kernel reads only the input's shape, but makes it contiguous first: an untouched
        # buffer costs nothing, an expanded scalar a full copy (5-25% of the map on CPU).
        grad = self._convolution_backward(
            grad_out, grad_out.new_empty(padded_shape), weight.to(grad_out.dtype), 0
        )
        if self.pre_pad is None:
            return grad
        return self._unpad_grad(grad, input_shape)

    def weight_product(self, x: Tensor, grad_out: Tensor, weight_shape: torch.Size) -> Tensor:
        """``Σ_samples g ⊗ patch``: the weight-gradient of the layer for output gradient ``g``.

        For a conv layer every output position of every image is a sample and its patch is the
        (zero-padded) receptive field in the ``(C, k...)`` order of ``weight.view(O, -1)``; the
        product is computed by the convolution's own weight-gradient kernel, so the unfolded
        patches are never materialised (method.md §2).

        Parameters
        ----------
        x:
            The layer's input batch (unpadded).
        grad_out:
            ``(N, K, *out_spatial)`` for conv, ``(M, K)`` for linear.
        weight_shape:
            ``(K, C/groups, *kernel)``; ``K`` may differ from the layer's output channels
            (stacked statistics) but must be divisible by ``groups``.
        """
        if self.kind == "linear":
            return grad_out.transpose(0, 1).matmul(x)
        return self._convolution_backward(
            grad_out, self.prepare_input(x), grad_out.new_empty(1).expand(weight_shape), 1
        )

    # ------------------------------------------------------------------ helpers
    def _convolution_backward(self, grad_out: Tensor, x: Tensor, weight: Tensor, which: int):
        """The convolution's own backward kernel: input-gradient (0) or weight-gradient (1)."""
        mask = (which == 0, which == 1, False)
        return torch.ops.aten.convolution_backward(
            grad_out,
            x,
            weight,
            None,
            list(self.stride),
            list(self.padding),
            list(self.dilation),
            False,
            [0] * self.spatial_dims,
            self.groups,
            mask,
        )[which]

    def _padded_shape(self, input_shape: torch.Size) -> torch.Size:
        shape = list(input_shape)
        pads = self.pre_pad or ()
        for i in range(self.spatial_dims):
            # F.pad lists the last dimension first.
            left, right = pads[2 * i], pads[2 * i + 1]
            shape[-1 - i] += left + right
        return torch.Size(shape)

    def _unpad_grad(self, grad: Tensor, input_shape: torch.Size) -> Tensor:
        if self.pad_mode == "constant":
            index = [slice(None), slice(None)]
            for i in range(self.spatial_dims):
                dim = 2 + i
                left = self.pre_pad[2 * (self.spatial_dims - 1 - i)]
                index.append(slice(left, left + input_shape[dim]))
            return grad[tuple(index)]
        # Reflect/replicate/circular: the adjoint of F.pad, through autograd (cheap, rare).
        with torch.enable_grad():
            probe = grad.new_zeros(input_shape, requires_grad=True)
            padded = F.pad(probe, self.pre_pad, mode=self.pad_mode)
            (result,) = torch.autograd.grad(padded, probe, grad)
        return result


def _ntuple(value: int | tuple[int, ...] | list[int], n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    return tuple(int(v) for v in value)


def geometry(module: nn.Module) -> LayerGeometry:
    """Describe a ``Linear``/``ConvNd`` module as a :class:`LayerGeometry`.

    Raises
    ------
    TypeError
        If ``module`` is not a Linear or Conv1d/2d/3d layer.
    """
    if isinstance(module, nn.Linear):
        return LayerGeometry(kind="linear", spatial_dims=0)
    if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        raise TypeError(
            f"{type(module).__name__} is not a Linear or Conv1d/2d/3d layer; patterns exist only "
            "for those."
        )
    n = module.weight.dim() - 2
    stride = _ntuple(module.stride, n)
    dilation = _ntuple(module.dilation, n)
    kernel = _ntuple(module.kernel_size, n)
    pre_pad: tuple[int, ...] | None = None
    if isinstance(module.padding, str):
        if module.padding == "valid":
            padding = (0,) * n
        else:  # 'same': asymmetric when the dilated kernel has an even extent
            amounts = []
            for d, k in zip(reversed(dilation), reversed(kernel)):
                total = d * (k - 1)
                amounts += [total // 2, total - total // 2]
            pre_pad = tuple(amounts)
            padding = (0,) * n
    else:
        padding = _ntuple(module.padding, n)
    mode = "constant"
    if module.padding_mode != "zeros":
        if pre_pad is None:
            pre_pad = tuple(p for p in reversed(padding) for _ in range(2))
        padding = (0,) * n
        mode = module.padding_mode
    elif pre_pad is not None and not any(pre_pad):
        pre_pad = None
    return LayerGeometry(
        kind="conv",
        spatial_dims=n,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=module.groups,
        pre_pad=pre_pad,
        pad_mode=mode,
    )
