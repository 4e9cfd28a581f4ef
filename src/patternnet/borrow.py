"""The user's model is borrowed, never changed.

:func:`borrowed` puts a model in eval mode for the duration of a block and restores every
module's ``training`` flag and every parameter's ``requires_grad`` flag afterwards, whether the
block returns, raises or is interrupted. Hooks are the callers' business: each registers its
handles inside a ``try``/``finally``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["borrowed", "forward_checked", "model_device", "model_dtype"]


@contextmanager
def borrowed(model: nn.Module, *, warn_train: str | None = None) -> Iterator[nn.Module]:
    """Eval mode and frozen parameters inside the block; the exact previous state after.

    Parameters
    ----------
    model:
        The user's model.
    warn_train:
        If given and the model is in train mode, warn once with this text (what the caller
        does about it).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    if model_device(model).type == "meta":
        raise ValueError(
            "the model's parameters are on the meta device (no values); materialise it first, "
            "e.g. model.to_empty(device='cpu') then load_state_dict(...)"
        )
    # Only what eval() and freezing change is recorded and restored (ResNet-50 has ~160
    # parameters and ~150 modules; this runs twice per explanation).
    training = [module for module in model.modules() if module.training]
    frozen = [param for param in model.parameters() if param.requires_grad]
    if warn_train and model.training:
        warnings.warn(warn_train, stacklevel=3)
    try:
        if training:
            model.eval()  # (not the flags directly: a module may override train())
        for param in frozen:
            param.requires_grad_(False)
        yield model
    finally:
        for module in training:
            module.training = True
        for param in frozen:
            param.requires_grad_(True)


def forward_checked(call: Callable[[Tensor], Any], inputs: Tensor) -> Any:
    """Run ``call(inputs)`` (a forward pass); a failure names the inputs and what to check.

    A shape, channel or dtype mismatch otherwise surfaces as a raw error from deep inside
    torch. Out-of-memory errors and non-``RuntimeError`` exceptions pass through unchanged.
    """
    try:
        return call(inputs)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as error:
        raise ValueError(
            f"the model's forward pass failed on inputs of shape {tuple(inputs.shape)} "
            f"({inputs.dtype}, {inputs.device}): {error}. Check that the inputs have the shape, "
            "channel count and layout the model expects"
        ) from error


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with none)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of the model's first floating parameter (float32 if none)."""
    for tensor in model.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32
