"""Models by name: torchvision, ``module.path:factory``, and saved ``torch.export`` files.

:func:`load` is the one entry point (used by the command line's ``--model``/``--weights``)::

    load("torchvision:vgg16", weights="~/models/vgg16-397923af.pth")   # ImageNet weights on disk
    load("torchvision:resnet50")                  # random weights (no download)
    load("torchvision:resnet50", weights="DEFAULT")   # torchvision's own download/cache
    load("mypackage.nets:build_net", weights="net.safetensors", num_classes=10)
    load("model.pt2")                             # a torch.export program (torch.export.save)

Weights files are state dicts read without executing code: ``torch.load(weights_only=True)``
for ``.pt``/``.pth`` (also a checkpoint dict holding ``"state_dict"``/``"model"``, and keys
prefixed ``module.`` by ``DataParallel``), or safetensors. torchvision is optional
(``pip install patternnet[torchvision]``).

An exported program is a graph of ATen operations without modules; :func:`from_exported`
turns its convolutions, linear layers and batch norms back into ``nn.Conv*``/``nn.Linear``/
``nn.BatchNorm*`` modules named like the original model's (sharing the same tensors) and its
``relu``/``add`` calls into ``torch.relu``/``torch.add``, so that patterns can be fitted and
the backward rules applied. TorchScript archives cannot be explained (a scripted model runs
no Python hooks); loading one raises an error that says how to export the model instead.
"""

from __future__ import annotations

import importlib
import operator
import os
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

__all__ = ["load", "load_state_dict", "read_state_dict", "from_exported"]

_TORCHVISION_HINT = "torchvision: models need torchvision (pip install 'patternnet[torchvision]')"


def load(
    spec: str | os.PathLike[str],
    *,
    weights: str | os.PathLike[str] | None = None,
    strict: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """Build (or read) the model ``spec`` names, in eval mode, on the CPU.

    Parameters
    ----------
    spec:
        ``"torchvision:NAME"`` (any name of ``torchvision.models.list_models()``),
        ``"module.path:factory"`` (a function or class returning an ``nn.Module``; the current
        folder is importable), or the path of a ``torch.export`` file (``.pt2``).
    weights:
        A state-dict file (``.pt``/``.pth``/``.safetensors``) to load into the model; for
        torchvision models also a torchvision weights name (``"DEFAULT"``,
        ``"IMAGENET1K_V1"`` ...), which torchvision downloads or takes from its cache. None:
        the factory's own initialisation (random for torchvision).
    strict:
        Passed to ``load_state_dict``: every key must match.
    **kwargs:
        Passed to the factory (e.g. ``num_classes=10``).

    Returns
    -------
    nn.Module
        The model, in eval mode.

    Raises
    ------
    ImportError
        torchvision is missing, or the factory's module cannot be imported.
    ValueError
        Unknown model name, a malformed spec, or weights that do not fit the model.
    TypeError
        The factory did not return an ``nn.Module``.
    FileNotFoundError
        The weights file or the model file does not exist.
    """
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if text.startswith("torchvision:"):
        model = _torchvision(text.split(":", 1)[1], weights, kwargs)
        if weights is not None and _is_file_spec(weights):
            load_state_dict(model, weights, strict=strict)
    elif path.is_file():
        if kwargs:
            raise TypeError(f"options {sorted(kwargs)} only apply to factories, not to a file")
        model = _from_file(path)
        if weights is not None:
            load_state_dict(model, weights, strict=strict)
    elif ":" in text:
        model = _factory(text, kwargs)
        if weights is not None:
            load_state_dict(model, weights, strict=strict)
    elif text.endswith((".pt2", ".pt", ".pth", ".ts")):
        raise FileNotFoundError(f"model file {text!r} does not exist")
    else:
        raise ValueError(
            f"cannot tell what model {text!r} is: give 'torchvision:NAME', "
            "'module.path:factory' or the path of a torch.export (.pt2) file"
        )
    return model.eval()


# ---------------------------------------------------------------------- sources


_WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin", ".ckpt", ".tar")


def _is_file_spec(weights: str | os.PathLike[str]) -> bool:
    """A path (existing, with a folder, or with a weights suffix), not a torchvision name."""
    text = os.fspath(weights)
    return (
        isinstance(weights, os.PathLike)
        or os.sep in text
        or text.endswith(_WEIGHT_SUFFIXES)
        or Path(text).expanduser().exists()
    )


def _torchvision(name: str, weights: Any, kwargs: dict[str, Any]) -> nn.Module:
    try:
        import torchvision
    except ImportError as error:
        raise ImportError(_TORCHVISION_HINT) from error
    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        known = sorted(torchvision.models.list_models())
        close = [m for m in known if name.lower().rstrip("0123456789_") in m][:8]
        raise ValueError(
            f"torchvision has no model {name!r}"
            + (f"; did you mean {', '.join(close)}?" if close else "")
            + " (torchvision.models.list_models() lists them)"
        ) from None
    named = None if weights is None or _is_file_spec(weights) else os.fspath(weights)
    try:
        return builder(weights=named, **kwargs)
    except (ValueError, KeyError) as error:
        raise ValueError(f"torchvision:{name} with weights={named!r}: {error}") from error


def _factory(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"model {spec!r}: expected 'module.path:factory'")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module = importlib.import_module(module_name)
    factory: Any = module
    for part in attribute.split("."):
        try:
            factory = getattr(factory, part)
        except AttributeError:
            raise ValueError(f"module {module_name!r} has no {attribute!r}") from None
    if not callable(factory):
        raise TypeError(f"{spec} is a {type(factory).__name__}, not a function or class")
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _from_file(path: Path) -> nn.Module:
    names: list[str] = []
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    if any(name.endswith("serialized_exported_program.json") or "/models/" in name
           for name in names):
        return from_exported(torch.export.load(str(path)))
    if any(name.endswith(("constants.pkl", "/code/__torch__.py")) or "/code/" in name
           for name in names):
        raise ValueError(
            f"{path} is a TorchScript archive: a scripted model runs no Python hooks, so its "
            "layers cannot be given patterns. Save the model with torch.export.save("
            "torch.export.export(model.eval(), (example,)), 'model.pt2') instead, or give "
            "its 'module.path:factory' and a state-dict file (--weights)"
        )
    if any(name.endswith("data.pkl") for name in names):
        raise ValueError(
            f"{path} holds pickled tensors (a state dict or a whole pickled model), not a "
            "model patternnet can build: give the model as 'torchvision:NAME' or "
            "'module.path:factory' and pass this file as weights="
        )
    raise ValueError(f"{path} is not a torch.export (.pt2) file")


# ---------------------------------------------------------------------- weights


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a ``torch.save`` file, executing no code.

    A checkpoint dict whose tensors sit under ``"state_dict"``, ``"model"`` or
    ``"model_state_dict"`` is unwrapped, and a ``module.`` prefix on every key (from
    ``DataParallel``/DDP) is removed.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        try:
            state: Any = load_file(str(path))
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error type
            raise ValueError(
                f"cannot read weights {str(path)!r}: not a valid safetensors file "
                f"(truncated or corrupted?): {error}"
            ) from error
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - unpickling errors have many types
            raise ValueError(
                f"cannot read weights {str(path)!r} as a state dict ({type(error).__name__}: "
                f"{error}); save them with torch.save(model.state_dict(), path)"
            ) from error
    if isinstance(state, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = state.get(key)
            if isinstance(inner, Mapping) and inner and all(
                isinstance(v, Tensor) for v in inner.values()
            ):
                state = inner
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"{str(path)!r} does not hold a state dict (name → tensor); save the weights with "
            "torch.save(model.state_dict(), path)"
        )
    state = dict(state)
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def load_state_dict(
    model: nn.Module, weights: str | os.PathLike[str] | Mapping[str, Tensor], *, strict: bool = True
) -> nn.Module:
    """Load weights (a file or a state dict) into ``model`` with a clear error on mismatch."""
    state = read_state_dict(weights) if not isinstance(weights, Mapping) else dict(weights)
    try:
        result = model.load_state_dict(state, strict=strict)
    except RuntimeError as error:
        own = model.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        shapes = [
            f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            for k in own
            if k in state and state[k].shape != own[k].shape
        ]
        details = []
        if missing:
            details.append(f"missing {len(missing)} (e.g. {', '.join(missing[:3])})")
        if unexpected:
            details.append(f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            details.append(f"{len(shapes)} shape mismatch(es) (e.g. {shapes[0]})")
        raise ValueError(
            f"the weights do not fit {type(model).__name__}: {'; '.join(details) or error}. "
            "Are they for this architecture (and number of classes)?"
        ) from error
    del result
    return model


# ---------------------------------------------------------------------- torch.export


def _aten(name: str, overload: str) -> Any:
    packet = getattr(torch.ops.aten, name, None)
    return getattr(packet, overload, None) if packet is not None else None


_CONVS = {
    op: dims
    for op, dims in (
        (_aten("conv1d", "default"), 1),
        (_aten("conv2d", "default"), 2),
        (_aten("conv3d", "default"), 3),
    )
    if op is not None
}
_LINEAR = _aten("linear", "default")
_BATCH_NORMS = {
    op for op in (_aten("batch_norm", "default"),
                  _aten("_native_batch_norm_legit_no_training", "default")) if op is not None
}
_FUNCTIONS = {
    op: func
    for op, func in (
        (_aten("relu", "default"), torch.relu),
        (_aten("relu_", "default"), torch.relu_),
        (_aten("add", "Tensor"), torch.add),
        (_aten("add_", "Tensor"), operator.iadd),  # Tensor.add_ itself cannot be fx-traced
    )
    if op is not None
}


def _owner(node: Any) -> tuple[str, str] | None:
    """``(owner module path, attribute)`` of a ``get_attr`` node, or None."""
    if getattr(node, "op", None) != "get_attr":
        return None
    owner, _, attribute = str(node.target).rpartition(".")
    return owner, attribute


def _replace_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def _ints(value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    values = tuple(int(v) for v in value)
    return values * n if len(values) == 1 else values


def from_exported(program: Any) -> nn.Module:
    """An ``nn.Module`` with real Linear/Conv/BatchNorm modules from an exported program.

    Parameters
    ----------
    program:
        A ``torch.export.ExportedProgram`` (e.g. from ``torch.export.load``), exported in eval
        mode.

    Returns
    -------
    nn.Module
        ``program.module()`` with each ``aten.conv*d``/``aten.linear``/``aten.batch_norm``
        call replaced by a module call. The modules keep the original model's names (so
        patterns fitted on the original apply) and share the program's tensors.
    """
    gm = program.module()
    # torch.export forbids train()/eval() on the program's module (its graph is fixed); with
    # real BatchNorm modules the ordinary flags are right again (patternnet borrows the model
    # in eval mode).
    for name in ("train", "eval"):
        if name in vars(gm):
            delattr(gm, name)
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _FUNCTIONS:
            node.target = _FUNCTIONS[node.target]
            continue
        is_conv, is_linear = node.target in _CONVS, node.target == _LINEAR
        if is_conv or is_linear:
            args = list(node.args) + [None] * 7
            weight_at, bias_at = _owner(args[1]), _owner(args[2])
            if weight_at is None or (args[2] is not None and bias_at is None):
                continue
            if bias_at is not None and bias_at[0] != weight_at[0]:
                continue
            path = weight_at[0]
            if not path:
                continue
            weight = gm.get_parameter(str(args[1].target))
            bias = gm.get_parameter(str(args[2].target)) if bias_at is not None else None
            if is_linear:
                module: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias is not None)
            else:
                dims = _CONVS[node.target]
                options = {**dict(zip(("stride", "padding", "dilation", "groups"), args[3:7])),
                           **node.kwargs}
                groups = int(options.get("groups") or 1)
                padding = options.get("padding") or 0
                module = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](
                    weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                    stride=_ints(options.get("stride") or 1, dims),
                    padding=padding if isinstance(padding, str) else _ints(padding, dims),
                    dilation=_ints(options.get("dilation") or 1, dims),
                    groups=groups, bias=bias is not None,
                )
            module.weight = weight
            if bias is not None:
                module.bias = bias
            _replace_module(gm, path, module)
            with graph.inserting_before(node):
                call = graph.call_module(path, (node.args[0],))
            call.meta = dict(node.meta)
            node.replace_all_uses_with(call)
            graph.erase_node(node)
        elif node.target in _BATCH_NORMS:
            _module_batch_norm(gm, graph, node)
    graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _module_batch_norm(gm: Any, graph: Any, node: Any) -> None:
    x, weight, bias, mean, var = node.args[:5]
    owner = _owner(mean)
    if owner is None or getattr(node.args[0], "meta", {}).get("val") is None:
        return
    path = owner[0]
    if not path:
        return
    legit = "legit" in str(node.target)
    momentum, eps = (node.args[5], node.args[6]) if legit else (node.args[6], node.args[7])
    if not legit and node.args[5]:
        return  # training-mode batch norm: leave it (the support check names it)
    dims = node.args[0].meta["val"].dim()
    kind = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(dims)
    if kind is None:
        return
    running_mean = gm.get_buffer(str(mean.target))
    module = kind(running_mean.shape[0], eps=float(eps), momentum=float(momentum),
                  affine=weight is not None)
    if weight is not None:
        module.weight = gm.get_parameter(str(weight.target))
        module.bias = gm.get_parameter(str(bias.target))
    module.running_mean = running_mean
    module.running_var = gm.get_buffer(str(var.target))
    tracked = f"{path}.num_batches_tracked" if path else "num_batches_tracked"
    try:
        module.num_batches_tracked = gm.get_buffer(tracked)
    except AttributeError:
        pass
    _replace_module(gm, path, module)
    with graph.inserting_before(node):
        call = graph.call_module(path, (x,))
    call.meta = dict(node.meta)
    if legit:  # returns (out, mean, invstd): only item 0 is used in eval mode
        for user in list(node.users):
            if user.target.__name__ == "getitem" and user.args[1] == 0:
                user.replace_all_uses_with(call)
                graph.erase_node(user)
        if node.users:
            graph.erase_node(call)
            return
    else:
        node.replace_all_uses_with(call)
    graph.erase_node(node)
