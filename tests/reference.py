"""Slow, obvious float64 references for the formulas of method.md (tests only)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_patches(module: nn.Module, x: Tensor) -> Tensor:
    """Explicit receptive-field patches of a ConvNd: ``(M, G, D)`` in ``weight.view(O,-1)`` order.

    Every output position of every image is one sample; border patches include the zero (or
    reflect/replicate/circular) padding. Written with ``Tensor.unfold`` per dimension and
    explicit dilation sub-sampling, independent of ``F.unfold`` and of the library.
    """
    n_sp = module.weight.dim() - 2
    k = module.kernel_size
    d = module.dilation
    s = module.stride
    x = x.double()
    if isinstance(module.padding, str):
        if module.padding == "same":
            pads = []
            for i in reversed(range(n_sp)):
                total = d[i] * (k[i] - 1)
                pads += [total // 2, total - total // 2]
        else:
            pads = [0] * (2 * n_sp)
    else:
        pads = [p for p in reversed(module.padding) for _ in range(2)]
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, pads, mode=mode) if any(pads) else x
    # Unfold each spatial dim with the dilated extent, then keep every d-th element.
    for i in range(n_sp):
        extent = d[i] * (k[i] - 1) + 1
        x = x.unfold(2 + i, extent, s[i])
    # x: (N, C, P1..Pn, E1..En)
    idx = tuple(slice(None, None, d[i]) for i in range(n_sp))
    x = x[(Ellipsis, *idx)]  # (N, C, P..., k...)
    N, C = x.shape[:2]
    positions = x.shape[2 : 2 + n_sp]
    # -> (N, P..., C, k...)
    perm = [0, *range(2, 2 + n_sp), 1, *range(2 + n_sp, 2 + 2 * n_sp)]
    x = x.permute(perm).reshape(N * int(torch.tensor(positions).prod()), C, *k)
    G = module.groups
    return x.reshape(x.shape[0], G, C // G * int(torch.tensor(k).prod()))


def layer_samples(module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(X, y, out)``: per-unit input patches ``(M, O, D)``, ``y = wᵀx`` and ``wᵀx + b``."""
    w = module.weight.detach().double()
    O = w.shape[0]
    w2 = w.reshape(O, -1)
    if isinstance(module, nn.Linear):
        X = x.double().reshape(-1, w2.shape[1])[:, None, :].expand(-1, O, -1)
    else:
        P = conv_patches(module, x)  # (M, G, D)
        G = module.groups
        X = P.repeat_interleave(O // G, dim=1)
    y = (X * w2[None]).sum(-1)
    b = module.bias.detach().double() if module.bias is not None else torch.zeros(O).double()
    return X, y, y + b


def linear_pattern(X: Tensor, y: Tensor, w: Tensor) -> Tensor:
    """a = cov[x, y] / (wᵀ cov[x, y]) per unit (rows of ``(O, D)``)."""
    ex = X.mean(0)
    ey = y.mean(0)
    cov = (X * y[..., None]).mean(0) - ex * ey[:, None]
    return cov / (w * cov).sum(1, keepdim=True)


def two_component(X: Tensor, y: Tensor, out: Tensor, w: Tensor, active: bool) -> Tensor:
    """a₊ (or a₋) per unit, E[y] over ALL samples; zero for dead units."""
    O = y.shape[1]
    ey = y.mean(0)
    rows = []
    for j in range(O):
        m = out[:, j] > 0 if active else out[:, j] <= 0
        if m.sum() == 0:
            rows.append(torch.zeros(X.shape[-1], dtype=torch.float64))
            continue
        Xj, yj = X[m, j], y[m, j]
        num = (Xj * yj[:, None]).mean(0) - Xj.mean(0) * ey[j]
        rows.append(num / (w[j] * num).sum())
    return torch.stack(rows)
