"""Bad input gets a clear error naming the problem and what to do (issue 8).

Each case checks the exception type, a phrase of its message, and that it is raised by
patternnet itself (the last frame of the traceback is in ``src/patternnet``), not a raw error
from deep inside torch. Inputs that are accepted on purpose (tuples from a DataLoader, float64
inputs, inputs on another device, a model in train mode) have their documented behaviour tested
too. docs/reliability.md lists every case.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import patternnet
from patternnet import (
    Gradient,
    GradientXInput,
    PatternAttribution,
    PatternNet,
    Patterns,
    collect_statistics,
    fit_patterns,
)

SRC = os.path.dirname(patternnet.__file__)


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    ).eval()


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).eval()


X = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def fit(model: nn.Module, data: Any, **options: Any) -> Patterns:
    return fit_patterns(model, data, progress=False, **options)


def raises_clear(
    error: type[BaseException] | tuple[type[BaseException], ...],
    match: str,
    call: Callable[[], Any],
) -> str:
    """``call()`` raises ``error`` matching ``match``, from patternnet's own code."""
    with pytest.raises(error, match=match) as info:
        call()
    origin = info.traceback[-1].path
    assert str(origin).startswith(SRC), f"raised from {origin}, not patternnet: {info.value}"
    message = str(info.value)
    assert len(message) > 30, message  # a sentence, not a bare token
    return message


# ---------------------------------------------------------------------- data for fitting
class DictDataset(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"image": X[i], "label": torch.tensor(0)}


def with_nan(index: int, value: float) -> Tensor:
    data = X.clone()
    data[index, 0, 3, 3] = value
    return data


FIT_CASES: dict[str, tuple[Callable[[], Any], type[BaseException], str]] = {
    "nan in data": (lambda: fit(cnn(), with_nan(0, float("nan"))), ValueError, "NaN or Inf"),
    "inf in a later batch": (
        lambda: fit(cnn(), with_nan(9, float("inf")), batch_size=4),
        ValueError,
        "batch 2 holds NaN or Inf",
    ),
    "uint8 images": (
        lambda: fit(cnn(), (X.abs() * 50).to(torch.uint8)),
        TypeError,
        r"uint8.*float\(\) / 255",
    ),
    "int64 data": (lambda: fit(mlp(), torch.ones(4, 3, dtype=torch.long)), TypeError, "int64"),
    "empty tensor": (lambda: fit(cnn(), X[:0]), ValueError, "empty"),
    "scalar tensor": (lambda: fit(cnn(), torch.tensor(1.0)), ValueError, "empty"),
    "empty list": (lambda: fit(cnn(), []), ValueError, "no samples"),
    "empty batch in a loader": (lambda: fit(cnn(), [X[:4], X[:0]]), ValueError, "batch 1 is empty"),
    "empty tuple batch": (lambda: fit(cnn(), [()]), ValueError, "empty tuple"),
    "DataLoader of dicts": (
        lambda: fit(cnn(), DataLoader(DictDataset(), batch_size=2)),
        TypeError,
        r"dict \(keys \['image', 'label'\]\).*b\['image'\]",
    ),
    "numpy array": (lambda: fit(cnn(), X.numpy()), TypeError, "ndarray, not a tensor"),
    "a string": (lambda: fit(cnn(), "images/"), TypeError, "DataLoader or an iterable"),
    "an int": (lambda: fit(cnn(), 3), TypeError, "DataLoader or an iterable"),
    "no data, estimator needs it": (lambda: fit(cnn(), None), ValueError, "needs data"),
    "wrong channel count": (
        lambda: fit(cnn(), torch.randn(4, 3, 8, 8)),
        ValueError,
        r"forward pass failed on inputs of shape \(4, 3, 8, 8\).*channels",
    ),
    "wrong feature count": (
        lambda: fit(mlp(), torch.randn(4, 7)),
        ValueError,
        r"forward pass failed on inputs of shape \(4, 7\)",
    ),
    "missing batch dimension": (
        lambda: fit(mlp(), torch.randn(3)),
        ValueError,
        r"shape \(3,\), without a batch dimension",
    ),
    "batch_size 0": (lambda: fit(cnn(), X, batch_size=0), ValueError, "batch_size"),
    "batch_size negative": (lambda: fit(cnn(), X, batch_size=-1), ValueError, "batch_size"),
    "batch_size float": (lambda: fit(cnn(), X, batch_size=2.5), ValueError, "batch_size"),
    "limit 0": (lambda: fit(cnn(), X, limit=0), ValueError, "limit"),
    "limit negative": (lambda: fit(cnn(), X, limit=-3), ValueError, "limit"),
    "unknown estimator": (lambda: fit(cnn(), X, estimator="lin"), ValueError, "unknown estimator"),
    "unknown precision": (lambda: fit(cnn(), X, precision="float16"), ValueError, "precision"),
    "device other than the model's": (
        lambda: fit(cnn(), X, device="meta"),
        ValueError,
        "move the model first",
    ),
    "data on the meta device": (lambda: fit(cnn(), X.to("meta")), ValueError, "meta device"),
    "model on the meta device": (
        lambda: fit(cnn().to("meta"), X),
        ValueError,
        "meta device.*to_empty",
    ),
    "model is None": (lambda: fit(None, X), TypeError, "torch.nn.Module"),
    "model without Linear/Conv": (lambda: fit(nn.ReLU(), X), ValueError, "no Linear or Conv"),
    "NaN weights": (lambda: fit(nan_weight(mlp()), torch.randn(6, 3)), ValueError, "layer '0'"),
    "continue statistics of another estimator": (
        lambda: collect_statistics(
            mlp(),
            torch.randn(4, 3),
            estimator="linear",
            statistics=collect_statistics(mlp(), torch.randn(4, 3), progress=False),
            progress=False,
        ),
        ValueError,
        "cannot continue",
    ),
}


def nan_weight(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        model[0].weight[1, 2] = float("nan")
    return model


@pytest.mark.parametrize("case", sorted(FIT_CASES))
def test_fit_rejects_bad_input_clearly(case: str) -> None:
    call, error, match = FIT_CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raises_clear(error, match, call)


def test_fit_accepts_tuples_lists_generators_and_loaders() -> None:
    """(inputs, labels) batches, lists and generators all give the tensor fit's patterns."""
    model = cnn()
    reference = fit(model, X, batch_size=4)
    labels = torch.zeros(len(X), dtype=torch.long)
    sources = {
        "DataLoader of (x, y)": DataLoader(TensorDataset(X, labels), batch_size=5),
        "list of [x, y] lists": [[X[i : i + 3], labels[i : i + 3]] for i in range(0, 12, 3)],
        "generator of tensors": (X[i : i + 2] for i in range(0, 12, 2)),
        "float64 data": X.double(),
    }
    for name, source in sources.items():
        patterns = fit(model, source)
        for layer in reference:
            for key, tensor in reference[layer].items():
                torch.testing.assert_close(patterns[layer][key], tensor, msg=name)


def test_fit_in_train_mode_warns_fits_in_eval_mode_and_restores() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.ReLU(), nn.Linear(6, 2)
    )
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    data = torch.randn(16, 3)
    model.eval()
    expected = fit(model, data)
    model.train()
    running = model[1].running_mean.clone()
    with pytest.warns(UserWarning, match="train mode.*eval mode"):
        patterns = fit(model, data)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model[1].running_mean, running)  # BatchNorm statistics untouched
    for layer in expected:  # dropout off, running statistics used: the eval-mode fit
        for key, tensor in expected[layer].items():
            torch.testing.assert_close(patterns[layer][key], tensor)


# ---------------------------------------------------------------------- explaining
class TupleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = cnn()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.net(x), x.mean()


class DictModel(TupleModel):
    def forward(self, x: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        return {"logits": self.net(x), "features": x}


class Wrapped(nn.Module):
    """A model whose forward does something the attribution cannot explain."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.net = mlp()
        self.what = what

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        if self.what == "detach":
            return self.net(x.detach())
        if self.what == "argmax":
            return out.argmax(1, keepdim=True).expand(-1, 2)
        if self.what == "log":  # NaN for negative logits
            return out.log()
        if self.what == "image":
            return out[:, :, None, None].expand(-1, -1, 2, 2)
        if self.what == "pooled":  # one row for the whole batch
            return out.sum(0, keepdim=True)
        raise AssertionError(self.what)


V = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
X4 = X[:4]

ATTRIBUTE_CASES: dict[str, tuple[Callable[[], Any], type[BaseException], str]] = {
    "nan in inputs": (
        lambda: Gradient(cnn()).attribute(with_nan(0, float("nan"))[:2]),
        ValueError,
        "NaN or Inf",
    ),
    "inf in inputs": (
        lambda: GradientXInput(cnn()).attribute(with_nan(1, float("-inf"))[:2]),
        ValueError,
        "NaN or Inf",
    ),
    "uint8 images": (
        lambda: Gradient(cnn()).attribute((X4.abs() * 50).to(torch.uint8)),
        TypeError,
        r"uint8.*float\(\) / 255",
    ),
    "bool inputs": (lambda: Gradient(mlp()).attribute(V > 0), TypeError, "torch.bool"),
    "one sample without batch dim": (
        lambda: Gradient(mlp()).attribute(V[0]),
        ValueError,
        r"unsqueeze\(0\)",
    ),
    "empty batch": (lambda: Gradient(cnn()).attribute(X[:0]), ValueError, "empty batch"),
    "numpy inputs": (lambda: Gradient(cnn()).attribute(X4.numpy()), TypeError, "ndarray"),
    "list of tensors": (lambda: Gradient(cnn()).attribute([X4]), TypeError, "list"),
    "wrong channel count": (
        lambda: Gradient(cnn()).attribute(torch.randn(2, 3, 8, 8)),
        ValueError,
        r"inputs of shape \(2, 3, 8, 8\).*channels",
    ),
    "wrong feature count": (
        lambda: PatternNet(mlp(), estimator="filter").attribute(torch.randn(2, 4)),
        ValueError,
        r"inputs of shape \(2, 4\)",
    ),
    "inputs on the meta device": (
        lambda: Gradient(cnn()).attribute(X4.to("meta")),
        ValueError,
        "meta device",
    ),
    "model on the meta device": (
        lambda: Gradient(cnn().to("meta")).attribute(X4),
        ValueError,
        "meta device",
    ),
    "model is not a Module": (lambda: Gradient(lambda x: x), TypeError, "torch.nn.Module"),
    "target out of range": (
        lambda: Gradient(cnn()).attribute(X4, target=3),
        ValueError,
        r"target 3 is out of range.*3 outputs",
    ),
    "negative target": (
        lambda: Gradient(cnn()).attribute(X4, target=[0, -1, 0, 0]),
        ValueError,
        "target -1 is out of range",
    ),
    "target of the wrong length": (
        lambda: Gradient(cnn()).attribute(X4, target=[0, 1, 2]),
        ValueError,
        "3 entries but the batch has 4",
    ),
    "float target": (
        lambda: Gradient(cnn()).attribute(X4, target=1.0),
        TypeError,
        "integers",
    ),
    "float target tensor": (
        lambda: Gradient(cnn()).attribute(X4, target=torch.zeros(4)),
        TypeError,
        "integers",
    ),
    "bool target": (lambda: Gradient(cnn()).attribute(X4, target=True), TypeError, "bool"),
    "string target": (lambda: Gradient(cnn()).attribute(X4, target="cat"), TypeError, "str"),
    "tuple output": (
        lambda: Gradient(TupleModel()).attribute(X4),
        TypeError,
        "returned a tuple.*output_selector",
    ),
    "dict output": (
        lambda: PatternAttribution(DictModel(), estimator="filter").attribute(X4),
        TypeError,
        "returned a dict.*output_selector",
    ),
    "image-shaped output": (
        lambda: Gradient(Wrapped("image")).attribute(V),
        ValueError,
        r"output has shape \(4, 2, 2, 2\)",
    ),
    "one output row for the batch": (
        lambda: Gradient(Wrapped("pooled")).attribute(V),
        ValueError,
        "1 rows but the batch has 4",
    ),
    "integer output": (lambda: Gradient(Wrapped("argmax")).attribute(V), TypeError, "int64"),
    "NaN output": (lambda: Gradient(Wrapped("log")).attribute(V), ValueError, "NaN or Inf"),
    "output detached from the input": (
        lambda: GradientXInput(Wrapped("detach")).attribute(V),
        ValueError,
        "does not depend differentiably",
    ),
    "NaN weights": (lambda: Gradient(nan_weight(mlp())).attribute(V), ValueError, "NaN or Inf"),
    "PatternNet without patterns": (lambda: PatternNet(cnn()), ValueError, "fit_patterns"),
    "patterns given as a path": (
        lambda: PatternNet(cnn(), "cnn.safetensors"),
        TypeError,
        r"Patterns.load",
    ),
    "patterns of another architecture": (
        lambda: PatternAttribution(mlp(), fit(cnn(), X)),
        ValueError,
        "layer '0'.*another architecture",
    ),
    "patterns of another estimator": (
        lambda: PatternNet(cnn(), fit(cnn(), X), estimator="linear"),
        ValueError,
        "fitted with estimator 'two_component'",
    ),
    "unknown estimator": (
        lambda: PatternNet(cnn(), estimator="wx"),
        ValueError,
        "unknown estimator",
    ),
    "PatternNet with the identity estimator": (
        lambda: PatternNet(cnn(), estimator="identity"),
        ValueError,
        "identity estimator has none",
    ),
    "overflowing patterns (silent Inf)": (
        lambda: PatternAttribution(mlp(), huge_patterns(mlp())).attribute(V),
        ValueError,
        "produced NaN or Inf",
    ),
}


def huge_patterns(model: nn.Module) -> Patterns:
    """Finite patterns whose products overflow float32 in the backward pass."""
    layers = {
        name: {"a": torch.full_like(module.weight, 1e30)}
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }
    return Patterns(layers, estimator="linear")


@pytest.mark.parametrize("case", sorted(ATTRIBUTE_CASES))
def test_attribute_rejects_bad_input_clearly(case: str) -> None:
    call, error, match = ATTRIBUTE_CASES[case]
    raises_clear(error, match, call)


def test_output_selector_explains_tuple_and_dict_outputs() -> None:
    plain = Gradient(TupleModel().net).attribute(X4, target=1)
    picked = Gradient(TupleModel(), output_selector=lambda out: out[0]).attribute(X4, target=1)
    keyed = Gradient(DictModel(), output_selector=lambda out: out["logits"]).attribute(
        X4, target=1
    )
    torch.testing.assert_close(picked, plain)
    torch.testing.assert_close(keyed, plain)
    model = DictModel()
    patterns = fit(model, X)  # fitting ignores the output: no selector needed
    plain = Patterns(
        {name[len("net.") :]: tensors for name, tensors in patterns.items()},
        estimator=patterns.estimator,
    )
    torch.testing.assert_close(plain["0"]["a_plus"], fit(cnn(), X)["0"]["a_plus"])
    signal = PatternNet(model, patterns, output_selector=lambda out: out["logits"])
    torch.testing.assert_close(
        signal.attribute(X4, target=2), PatternNet(cnn(), plain).attribute(X4, target=2)
    )


def test_targets_accepted_in_every_documented_form() -> None:
    method = Gradient(cnn())
    expected = method.attribute(X4, target=torch.tensor([2, 2, 2, 2]))
    for target in (2, [2, 2, 2, 2], (2, 2, 2, 2), np.int64(2), torch.tensor(2),
                   torch.full((4, 1), 2), np.full(4, 2)):
        torch.testing.assert_close(method.attribute(X4, target=target), expected)
    argmax = cnn()(X4).argmax(1)
    torch.testing.assert_close(method.attribute(X4), method.attribute(X4, target=argmax))


def test_inputs_of_another_dtype_are_cast_and_returned_in_theirs() -> None:
    model = cnn()
    reference = Gradient(model).attribute(X4)
    result = Gradient(model).attribute(X4.double())
    assert result.dtype == torch.float64
    torch.testing.assert_close(result.float(), reference)
    half = cnn().half()
    result = PatternNet(half, estimator="filter").attribute(X4)  # float32 in, float16 model
    assert result.dtype == torch.float32 and torch.isfinite(result).all()


def test_attribute_in_train_mode_explains_the_eval_model_and_restores() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.9), nn.ReLU(), nn.Linear(8, 2))
    model.eval()
    expected = Gradient(model).attribute(V, target=0)
    model.train()
    for _ in range(3):  # dropout would make these differ
        torch.testing.assert_close(Gradient(model).attribute(V, target=0), expected)
    assert all(m.training for m in model.modules())


def test_functional_relu_and_inplace_relu_inputs() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.b(F.relu(self.a(x), inplace=True))

    model = Functional()
    patterns = fit(model, torch.randn(32, 3))
    result = PatternNet(model, patterns).attribute(V)
    assert torch.isfinite(result).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_inputs_on_another_device_are_moved_and_returned_on_theirs() -> None:
    model = cnn().cuda()
    reference = Gradient(cnn()).attribute(X4)
    result = Gradient(model).attribute(X4)  # CPU inputs, CUDA model
    assert result.device.type == "cpu"
    torch.testing.assert_close(result, reference, atol=1e-5, rtol=1e-4)
    patterns = fit(model, X)  # CPU data for a CUDA model: batches are moved
    assert next(iter(patterns.values()))["a_plus"].device.type == "cuda"


# ---------------------------------------------------------------------- every registered method
def registered_methods() -> list[str]:
    try:
        from patternnet.methods.registry import methods
    except ImportError:
        return []
    return sorted(methods())


def build(name: str, model: nn.Module) -> Any:
    from patternnet.methods.registry import get_method

    options: dict[str, Any] = {}
    if name in ("pattern_net", "pattern_attribution"):
        options["patterns"] = fit(model, X)
    if name == "smoothgrad":
        options.update(n_samples=2, seed=0)
    if name == "integrated_gradients":
        options["n_steps"] = 3
    return get_method(name, model, **options)


BAD_FOR_EVERY_METHOD: dict[str, tuple[Callable[[], Tensor], type[BaseException], str, Any]] = {
    "nan inputs": (lambda: with_nan(0, float("nan"))[:2], ValueError, "NaN or Inf", None),
    "uint8 inputs": (lambda: (X4.abs() * 9).to(torch.uint8), TypeError, "uint8", None),
    "wrong channels": (lambda: torch.randn(2, 3, 8, 8), ValueError, "forward pass failed", None),
    "no batch dimension": (lambda: X4[0, 0, 0], ValueError, r"unsqueeze\(0\)", None),
    "target out of range": (lambda: X4, ValueError, "out of range", 5),
    "target of the wrong length": (lambda: X4, ValueError, "3 entries", [0, 1, 2]),
    "float target": (lambda: X4, TypeError, "integers", [0.0, 1.0, 2.0, 0.0]),
}


@pytest.mark.parametrize("case", sorted(BAD_FOR_EVERY_METHOD))
@pytest.mark.parametrize("name", registered_methods())
def test_every_registered_method_rejects_bad_input_clearly(name: str, case: str) -> None:
    inputs, error, match, target = BAD_FOR_EVERY_METHOD[case]
    method = build(name, cnn())
    raises_clear(error, match, lambda: method.attribute(inputs(), target=target))


def test_wrapper_options_are_checked() -> None:
    from patternnet.methods.gradient import IntegratedGradients, SmoothGrad

    raises_clear(ValueError, "baseline holds NaN", lambda: IntegratedGradients(
        Gradient(cnn()), baseline=float("nan"), n_steps=2).attribute(X4))
    raises_clear(ValueError, "does not broadcast", lambda: IntegratedGradients(
        Gradient(cnn()), baseline=torch.zeros(3, 3), n_steps=2).attribute(X4))
    raises_clear(ValueError, "n_steps", lambda: IntegratedGradients(Gradient(cnn()), n_steps=0))
    raises_clear(ValueError, "noise_level", lambda: SmoothGrad(
        Gradient(cnn()), noise_level=float("nan")))


# ---------------------------------------------------------------------- evaluation
def perturbation_cases() -> dict[str, tuple[Callable[[], Any], type[BaseException], str]]:
    try:
        from patternnet.evaluate.perturbation import region_perturbation
    except ImportError:
        return {}

    def run(inputs: Tensor = X4, attributions: Any = None, **options: Any) -> Any:
        options = {"k": 4, "steps": 2, **options}
        attr = torch.randn_like(inputs.float()) if attributions is None else attributions
        return region_perturbation(cnn(), inputs, attr, **options)

    return {
        "nan images": (lambda: run(with_nan(0, float("nan"))[:4]), ValueError, "inputs holds NaN"),
        "nan attributions": (
            lambda: run(attributions=with_nan(1, float("inf"))[:4]),
            ValueError,
            "attributions holds NaN",
        ),
        "uint8 images": (lambda: run((X4.abs() * 9).to(torch.uint8)), TypeError, "uint8"),
        "attributions of another size": (
            lambda: run(attributions=torch.randn(4, 1, 4, 4)),
            ValueError,
            "do not match",
        ),
        "not images": (lambda: run(torch.randn(4, 64), torch.randn(4, 64)), ValueError, "images"),
        "target out of range": (lambda: run(target=9), ValueError, "target 9 is out of range"),
        "float target": (lambda: run(target=1.5), TypeError, "integers"),
        "region size 0": (lambda: run(k=0), ValueError, "at least 1"),
        "no steps": (lambda: run(steps=0), ValueError, "positive"),
        "unknown replacement": (lambda: run(replacement="noise"), ValueError, "replacement"),
    }


PERTURBATION = perturbation_cases()


@pytest.mark.parametrize("case", sorted(PERTURBATION))
def test_region_perturbation_rejects_bad_input_clearly(case: str) -> None:
    call, error, match = PERTURBATION[case]
    raises_clear(error, match, call)


def test_estimator_quality_rejects_bad_data_clearly() -> None:
    quality = pytest.importorskip("patternnet.evaluate").estimator_quality
    model = cnn()
    raises_clear(ValueError, "empty", lambda: quality(model, X[:0], X, X))
    raises_clear(ValueError, "NaN or Inf", lambda: quality(model, X, with_nan(2, float("nan")), X))
    raises_clear(ValueError, "unknown", lambda: quality(model, X, X, X, estimators=["x"]))
