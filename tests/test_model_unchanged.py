"""The user's model is borrowed, never changed (issue 8).

Every public entry point is run on a model with awkward state of its own (train mode mixed
with eval mode, a frozen parameter, a stale ``.grad``, BatchNorm buffers that would move in
train mode, user hooks of every kind) and a full snapshot of the model is compared before and
after: on success, on an exception raised midway (in the forward pass, in the data iterator, in
a rule's backward) and on ``KeyboardInterrupt``. After a failure the same call must work again
and give the same result as before (nothing left installed).
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import patternnet
from patternnet import (
    Gradient,
    GradientXInput,
    PatternAttribution,
    PatternNet,
    collect_statistics,
    compute_patterns,
    fit_patterns,
)
from patternnet.engine.rules import WeightSwap
from patternnet.methods.base import Attribution

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


class InjectedError(RuntimeError):
    """The failure injected midway."""


class Tripwire(nn.Module):
    """Identity, until armed: then it raises in the forward or the backward pass.

    ``armed`` is ``None``, ``"forward"``, ``"backward"``, ``"interrupt"`` (KeyboardInterrupt in
    forward) or ``"interrupt_backward"``; ``after`` calls pass before it fires.
    """

    def __init__(self) -> None:
        super().__init__()
        self.armed: str | None = None
        self.after = 0
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        if self.armed is None:
            return x
        self.calls += 1
        if self.calls <= self.after:
            return x
        error: BaseException = (
            KeyboardInterrupt() if self.armed.startswith("interrupt") else InjectedError("injected")
        )
        if self.armed in ("forward", "interrupt"):
            raise error
        if x.requires_grad:
            x = x * 1.0

            def hook(grad: Tensor) -> Tensor:
                raise error

            x.register_hook(hook)
        return x


class Net(nn.Module):
    """Conv/BN/grouped conv/max-pool/dropout/Linear with nn.ReLU, F.relu, torch.relu, relu_."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout(0.5)
        self.fc1 = nn.Linear(4 * 4 * 4, 8)
        self.trip = Tripwire()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = self.act(x)  # the ReLU module, used twice
        x = self.fc1(self.drop(x.flatten(1))).relu_()
        x = self.act(self.trip(x))
        return self.fc2(x)


def make_model() -> tuple[Net, list[str]]:
    """The model in an awkward state of its own, and a log its user hooks write to."""
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    model.train()
    model.fc2.eval()  # mixed modes
    model.conv1.weight.requires_grad_(False)  # a frozen parameter
    model.fc2.weight.grad = torch.full_like(model.fc2.weight, 7.0)  # a stale gradient
    log: list[str] = []
    model.fc1.register_forward_hook(lambda m, i, o: log.append("fwd"))
    model.fc1.register_forward_pre_hook(lambda m, i: log.append("pre"))
    model.conv2.register_forward_hook(lambda m, a, k, o: None, with_kwargs=True)
    model.fc2.register_full_backward_hook(lambda m, gi, go: log.append("bwd"))
    model.conv1.register_full_backward_pre_hook(lambda m, go: None)
    return model, log


def data(n: int = 12) -> Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------- snapshot
def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything about ``model`` a borrowing library could change."""
    modules = dict(model.named_modules(remove_duplicate=False))
    return {
        "modules": [(name, id(m)) for name, m in modules.items()],
        "attributes": {name: sorted(vars(m)) for name, m in modules.items()},
        "training": {name: m.training for name, m in modules.items()},
        "parameters": {
            name: (
                id(p),
                p.detach().clone(),
                p._version,
                p.requires_grad,
                p.dtype,
                p.device,
                None if p.grad is None else p.grad.clone(),
            )
            for name, p in model.named_parameters(remove_duplicate=False)
        },
        "buffers": {
            name: (id(b), b.clone(), b._version)
            for name, b in model.named_buffers(remove_duplicate=False)
        },
        "hooks": {
            name: {attr: list(getattr(m, attr, {}).items()) for attr in HOOK_DICTS}
            for name, m in modules.items()
        },
        "global_hooks": [
            len(getattr(torch.nn.modules.module, attr, {}))
            for attr in dir(torch.nn.modules.module)
            if attr.startswith("_global_") and attr.endswith("hooks")
        ],
        "grad_enabled": torch.is_grad_enabled(),
        "function_modes": len(torch.overrides._get_current_function_mode_stack()),
    }


def differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Human-readable list of what changed between two snapshots."""
    found = []
    for key in ("modules", "attributes", "training", "hooks", "global_hooks"):
        if before[key] != after[key]:
            found.append(f"{key}: {before[key]} -> {after[key]}")
    for key in ("grad_enabled", "function_modes"):
        if before[key] != after[key]:
            found.append(f"{key}: {before[key]} -> {after[key]}")
    for kind in ("parameters", "buffers"):
        if before[kind].keys() != after[kind].keys():
            found.append(f"{kind} names changed")
            continue
        for name, old in before[kind].items():
            new = after[kind][name]
            for i, (a, b) in enumerate(zip(old, new)):
                same = (
                    (a is None and b is None)
                    if a is None or b is None
                    else torch.equal(a, b)
                    if isinstance(a, Tensor)
                    else a == b
                )
                if not same:
                    found.append(f"{kind} {name}: field {i} changed")
    return found


def assert_unchanged(before: dict[str, Any], model: nn.Module) -> None:
    found = differences(before, snapshot(model))
    assert not found, "the model was changed:\n" + "\n".join(found)


# ---------------------------------------------------------------------- entry points
def _fitted(model: nn.Module, estimator: str = "two_component") -> patternnet.Patterns:
    return fit_patterns(model, data(), estimator=estimator, batch_size=4, progress=False)


def _identity_available() -> bool:
    try:
        from patternnet.engine.rules import identity_estimator_rules  # noqa: F401
    except ImportError:
        return False
    return True


KNOWN = {Attribution, PatternNet, PatternAttribution, Gradient, GradientXInput}


def _discovered_methods() -> list[type[Attribution]]:
    """Attribution classes of ``patternnet.methods.*`` beyond the core ones (as they land)."""
    import patternnet.methods as methods

    found: dict[str, type[Attribution]] = {}
    for info in pkgutil.iter_modules(methods.__path__):
        try:
            module = importlib.import_module(f"patternnet.methods.{info.name}")
        except Exception:  # a module being written right now
            continue
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if (
                issubclass(obj, Attribution)
                and obj not in KNOWN
                and not obj.__name__.startswith("_")
                and not inspect.isabstract(obj)
            ):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [found[key] for key in sorted(found)]


def _construct(cls: type[Attribution], model: nn.Module) -> Attribution | None:
    """Build a discovered method with its defaults (patterns if it asks for them)."""
    params = inspect.signature(cls.__init__).parameters
    try:
        if "patterns" in params and params["patterns"].default is inspect.Parameter.empty:
            return cls(model, _fitted(model))
        return cls(model)
    except (TypeError, ValueError):
        return None


def attribute_calls() -> dict[str, Callable[[nn.Module], Callable[[Tensor], Tensor]]]:
    """name -> (model -> explain(inputs)) for every method."""
    calls: dict[str, Callable[[nn.Module], Callable[[Tensor], Tensor]]] = {
        "Gradient": lambda m: Gradient(m).attribute,
        "GradientXInput": lambda m: GradientXInput(m).attribute,
        "PatternNet/two_component": lambda m: PatternNet(m, _fitted(m)).attribute,
        "PatternNet/linear": lambda m: PatternNet(m, _fitted(m, "linear")).attribute,
        "PatternNet/filter": lambda m: PatternNet(m, estimator="filter").attribute,
        "PatternAttribution/two_component": lambda m: PatternAttribution(m, _fitted(m)).attribute,
        "PatternAttribution/linear": lambda m: PatternAttribution(
            m, _fitted(m, "linear")
        ).attribute,
        "PatternAttribution/filter": lambda m: PatternAttribution(
            m, estimator="filter"
        ).attribute,
    }
    if _identity_available():
        calls["PatternAttribution/identity"] = lambda m: PatternAttribution(
            m, estimator="identity"
        ).attribute
    for cls in _discovered_methods():

        def factory(m: nn.Module, cls: type[Attribution] = cls) -> Callable[[Tensor], Tensor]:
            method = _construct(cls, m)
            if method is None:
                pytest.skip(f"{cls.__name__} cannot be built with defaults on this model")
            return method.attribute

        calls[cls.__name__] = factory
    return calls


ATTRIBUTE = attribute_calls()
TARGETS = torch.tensor([0, 1, 2, 0])


def fit_calls() -> dict[str, Callable[[nn.Module, Any], Any]]:
    """name -> (model, data) -> result, for the fitting entry points."""

    def compute(model: nn.Module, batches: Any) -> Any:
        stats = collect_statistics(model, batches, batch_size=4, progress=False)
        return compute_patterns(model, stats)

    calls: dict[str, Callable[[nn.Module, Any], Any]] = {
        "fit_patterns/two_component": lambda m, d: fit_patterns(
            m, d, batch_size=4, progress=False
        ),
        "fit_patterns/linear": lambda m, d: fit_patterns(
            m, d, estimator="linear", batch_size=4, progress=False
        ),
        "fit_patterns/float32": lambda m, d: fit_patterns(
            m, d, precision="float32", negative=False, batch_size=4, progress=False
        ),
        "collect_statistics+compute_patterns": compute,
    }
    if "checkpoint" in inspect.signature(fit_patterns).parameters:

        def checkpointed(model: nn.Module, batches: Any) -> Any:
            folder = tempfile.mkdtemp(prefix="patternnet-test-")
            return fit_patterns(
                model,
                batches,
                batch_size=4,
                progress=False,
                checkpoint=os.path.join(folder, "fit.ckpt"),
                checkpoint_every=1,
            )

        calls["fit_patterns/checkpointed"] = checkpointed
    return calls


FIT = fit_calls()


def evaluate_calls() -> dict[str, Callable[[nn.Module], Any]]:
    """name -> model -> result, for the evaluation entry points (as they land)."""
    calls: dict[str, Callable[[nn.Module], Any]] = {}
    try:
        from patternnet.evaluate.perturbation import region_perturbation
    except ImportError:
        pass
    else:
        calls["region_perturbation"] = lambda m: region_perturbation(
            m, data(4), torch.randn(4, 1, 8, 8), k=4, steps=3
        )
        calls["region_perturbation/random"] = lambda m: region_perturbation(
            m, data(4), "random", k=4, steps=2, replacement="blur"
        )
    try:
        from patternnet.evaluate import estimator_quality
    except ImportError:
        pass
    else:
        calls["estimator_quality"] = lambda m: estimator_quality(
            m, data(8), data(8) * 0.5, data(8) * 2, max_neurons=2, max_dims=8, positions=2
        )
    return calls


EVALUATE = evaluate_calls()


def batches_then(error: BaseException, n: int = 1) -> Iterator[Tensor]:
    """A data iterator that yields ``n`` batches, then raises ``error``."""
    x = data()
    for i in range(n):
        yield x[4 * i : 4 * i + 4]
    raise error


def seeded(explain: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """One call with a fixed seed (SmoothGrad and other sampling methods repeat exactly)."""
    torch.manual_seed(5)
    return explain(data(4), TARGETS)


# ---------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", sorted(ATTRIBUTE))
def test_attribute_success_leaves_model_unchanged(name: str) -> None:
    model, log = make_model()
    explain = ATTRIBUTE[name](model)
    before = snapshot(model)
    result = seeded(explain)
    assert_unchanged(before, model)
    assert result.shape == (4, 1, 8, 8)
    assert torch.isfinite(result).all()
    assert "fwd" in log  # the user's hooks still ran: the real model was used


@pytest.mark.parametrize("mode", ["forward", "backward", "interrupt", "interrupt_backward"])
@pytest.mark.parametrize("name", sorted(ATTRIBUTE))
def test_attribute_failure_leaves_model_unchanged(name: str, mode: str) -> None:
    model, _ = make_model()
    explain = ATTRIBUTE[name](model)
    reference = seeded(explain)
    before = snapshot(model)
    model.trip.armed = mode
    expected = KeyboardInterrupt if mode.startswith("interrupt") else (InjectedError, ValueError)
    with pytest.raises(expected):
        seeded(explain)
    model.trip.armed = None
    assert_unchanged(before, model)
    torch.testing.assert_close(seeded(explain), reference)  # nothing left installed


@pytest.mark.parametrize("name", sorted(ATTRIBUTE))
def test_attribute_bad_target_after_forward_leaves_model_unchanged(name: str) -> None:
    # The target is checked against the logits, i.e. after the forward pass with rules on.
    model, _ = make_model()
    explain = ATTRIBUTE[name](model)
    before = snapshot(model)
    with pytest.raises(ValueError, match="out of range"):
        explain(data(4), 3)
    assert_unchanged(before, model)


@pytest.mark.parametrize("error", [InjectedError("rule"), KeyboardInterrupt()])
@pytest.mark.parametrize("method", [PatternNet, PatternAttribution])
def test_rule_raising_in_backward_leaves_model_unchanged(
    method: type[Attribution], error: BaseException, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _ = make_model()
    explain = method(model, _fitted(model)).attribute
    reference = seeded(explain)
    before = snapshot(model)

    def broken(self: WeightSwap, module: Any, state: Any, grad_output: Tensor) -> Tensor:
        raise error

    with monkeypatch.context() as patch:
        patch.setattr(WeightSwap, "backward", broken)
        with pytest.raises(type(error)):
            seeded(explain)
    assert_unchanged(before, model)
    torch.testing.assert_close(seeded(explain), reference)


@pytest.mark.parametrize("name", sorted(FIT))
def test_fit_success_leaves_model_unchanged(name: str) -> None:
    model, _ = make_model()
    before = snapshot(model)
    with pytest.warns(UserWarning, match="train mode"):
        FIT[name](model, data())
    assert_unchanged(before, model)


@pytest.mark.parametrize(
    "failure", ["data_error", "data_interrupt", "forward_error", "forward_interrupt"]
)
@pytest.mark.parametrize("name", sorted(FIT))
def test_fit_failure_leaves_model_unchanged(name: str, failure: str) -> None:
    model, _ = make_model()
    model.eval()
    reference = FIT[name](model, data())
    model, _ = make_model()
    model.eval()
    before = snapshot(model)
    interrupt = failure.endswith("interrupt")
    expected = KeyboardInterrupt if interrupt else (InjectedError, ValueError)
    if failure.startswith("data"):
        source: Any = batches_then(KeyboardInterrupt() if interrupt else InjectedError("data"))
    else:
        source = data()
        model.trip.armed, model.trip.after = ("interrupt" if interrupt else "forward"), 1
    with pytest.raises(expected):
        FIT[name](model, source)
    model.trip.armed, model.trip.calls = None, 0
    model.trip.after = 0
    assert_unchanged(before, model)
    again = FIT[name](model, data())
    for layer in reference:
        for key, tensor in reference[layer].items():
            torch.testing.assert_close(again[layer][key], tensor)


@pytest.mark.parametrize("name", sorted(EVALUATE))
def test_evaluate_success_leaves_model_unchanged(name: str) -> None:
    model, _ = make_model()
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        EVALUATE[name](model)
    assert_unchanged(before, model)


@pytest.mark.parametrize("mode", ["forward", "interrupt"])
@pytest.mark.parametrize("name", sorted(EVALUATE))
def test_evaluate_failure_leaves_model_unchanged(name: str, mode: str) -> None:
    model, _ = make_model()
    before = snapshot(model)
    model.trip.armed, model.trip.after = mode, 1
    expected = KeyboardInterrupt if mode == "interrupt" else (InjectedError, ValueError)
    with warnings.catch_warnings(), pytest.raises(expected):
        warnings.simplefilter("ignore")
        EVALUATE[name](model)
    model.trip.armed, model.trip.calls, model.trip.after = None, 0, 0
    assert_unchanged(before, model)


def test_snapshot_detects_changes() -> None:
    """The snapshot is not blind: each kind of change it guards against is reported."""
    changes: list[Callable[[Net], Any]] = [
        lambda m: m.eval(),
        lambda m: m.conv1.weight.requires_grad_(True),
        lambda m: m.fc1.weight.detach().mul_(1.0),  # same values, in-place write
        lambda m: m.bn.running_mean.add_(1.0),
        lambda m: m.fc1.register_forward_hook(lambda *a: None),
        lambda m: m.fc1.register_full_backward_hook(lambda *a: None),
        lambda m: setattr(m.fc1, "rule", "epsilon"),
        lambda m: setattr(m.fc2.weight, "grad", None),
        lambda m: m(data(2)),  # train-mode BatchNorm updates its running statistics
    ]
    for change in changes:
        model, _ = make_model()
        before = snapshot(model)
        change(model)
        assert differences(before, snapshot(model)), change
