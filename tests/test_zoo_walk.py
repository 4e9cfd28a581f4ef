"""Walk torchvision's classification models: which build, fit, and explain with every method.

Each architecture is built with random weights (:func:`test_model_zoo.lively`, which also
re-initialises zero-initialised heads so that gradients are not zero), fitted on four random
images of the smallest size it accepts, and explained by every method of the registry. A
model that patternnet cannot explain must be refused before any data is read with the clear
:class:`~patternnet.engine.support.UnsupportedModuleError`, and must be listed in the README's
"Refused models" section: the test reads that list, so the README cannot fall behind.

The fast test walks the smallest model of each family (ResNet, RegNetX, RegNetY,
EfficientNet, ViT ...) that has at most :data:`FAST_PARAMS` parameters or is refused (a
refusal costs no fit); the ``slow`` test walks all the others (VGG's 25088×4096 layer alone
needs 0.8 GB of float64 statistics). Both print their count.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import torch

import patternnet as pn
from every_method import explain_with_every_method
from patternnet.engine.support import UnsupportedModuleError, check_supported
from patternnet.methods.registry import methods
from test_model_zoo import lively

torchvision = pytest.importorskip("torchvision")
tvm = torchvision.models

#: The smallest model of a family with more parameters than this is fitted by the slow test.
FAST_PARAMS = 15_000_000

#: The smallest square input each family accepts (default 32). MaxViT partitions every stage
#: into 7 × 7 windows and grids (stages at 1/4 ... 1/32 of the input): 224 = 32 · 7. Swin pads
#: its stages to its 7 × 7 (V2: 8 × 8) windows and runs at 32: its first stage (8 × 8 padded
#: to 14 × 14 or 16 × 16) still shifts its windows, so the attention masks are used.
MIN_SIZE = {"alexnet": 63, "inception_v3": 75, "googlenet": 32, "squeezenet1_0": 33,
            "squeezenet1_1": 33, "maxvit_t": 224}
#: Builder options a random, small-input model needs.
OPTIONS = {
    "googlenet": dict(aux_logits=False, init_weights=True),
    "inception_v3": dict(aux_logits=False, init_weights=True),
}

README = Path(__file__).resolve().parents[1] / "README.md"


def classification_models() -> list[tuple[str, int]]:
    """``[(name, parameter count)]`` of every torchvision classification builder."""
    names = tvm.list_models(module=tvm)
    return [(n, tvm.get_model_weights(n).DEFAULT.meta["num_params"]) for n in names]


def family(name: str) -> str:
    """``resnet``, ``regnet_y``, ``mobilenet_v3``, ``efficientnet_v2``, ``vit`` ..."""
    return re.match(r"[a-z]+(_v\d|_[xy](?=_))?", name).group(0)  # type: ignore[union-attr]


def refused_on_meta(name: str) -> bool:
    """Whether the support check refuses ``name`` (built on the meta device: no memory)."""
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = tvm.get_model(name, num_classes=10)
    try:
        check_supported(model)
    except UnsupportedModuleError:
        return True
    return False


#: The models issue #14 names (and Swin V2, whose attention differs from Swin's): always
#: walked by the fast test.
TARGETS = {"vit_b_16", "swin_t", "swin_v2_t", "convnext_tiny", "efficientnet_b0",
           "mobilenet_v3_small", "regnet_y_400mf", "maxvit_t"}

#: Models the fast test checks more cheaply: ``(methods, explanation dtype, fit images)``.
#: MaxViT needs 224² inputs (every stage is partitioned into 7 × 7 windows and grids): its
#: fit alone takes about 20 s under load, and every method in float64 took minutes. CI fits
#: it on two images and explains one with PatternNet and PatternAttribution in float32; the
#: slow walk takes every method in float64, and tests/test_window_attention.py explains a
#: small MaxViT (same blocks) with every method.
CHEAP = {"maxvit_t": (("pattern_net", "pattern_attribution"), torch.float32, 2)}


def fast_selection() -> list[tuple[str, int]]:
    """The smallest model of each family, if small or refused, and :data:`TARGETS`."""
    smallest: dict[str, tuple[str, int]] = {}
    for name, params in classification_models():
        key = family(name)
        if key not in smallest or params < smallest[key][1]:
            smallest[key] = (name, params)
    return [
        (name, params) for name, params in sorted(smallest.values())
        if params <= FAST_PARAMS or name in TARGETS
        or (not name.startswith("regnet") and refused_on_meta(name))
    ]


def slow_selection() -> list[tuple[str, int]]:
    """The models the fast test leaves out, and those it checks only cheaply, smallest first."""
    fast = {name for name, _ in fast_selection()} - set(CHEAP)
    return sorted((m for m in classification_models() if m[0] not in fast), key=lambda m: m[1])


def readme_refused() -> set[str]:
    """Model names listed under the README's "Refused models" heading."""
    text = README.read_text()
    match = re.search(r"^### Refused torchvision models\n(.*?)(?=^#)", text, re.S | re.M)
    assert match, "README.md lacks the '### Refused torchvision models' section"
    known = set(tvm.list_models(module=tvm))
    return set(re.findall(r"`([a-z0-9_]+)`", match.group(1))) & known


def walk(
    name: str,
    *,
    only: Iterable[str] | None = None,
    dtype: torch.dtype = torch.float64,
    images: int = 4,
    record: Callable[[str], None] | None = None,
) -> str:
    """Build, fit and explain one model; return ``"explained"`` or ``"refused"``.

    The fit reads ``images`` random images, the explanation half of them. ``only``
    restricts the explanation to these registry methods (default: every one); ``dtype`` is
    the precision of the explanation; ``record`` is told each stage as it starts
    (``build``, ``check``, ``fit``, ``explain <method>``), for the report of the full walk.
    """
    note = record or (lambda stage: None)
    options = dict(OPTIONS.get(name, {}), num_classes=10)
    size = MIN_SIZE.get(name, 32)
    if name.startswith("vit_"):
        patch = int(name.rsplit("_", 1)[1])
        size = 2 * patch
        options["image_size"] = size
    note("build")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's init-weights FutureWarnings
        model = lively(tvm.get_model(name, **options)).eval()
    note("check")
    try:
        check_supported(model)
    except UnsupportedModuleError as error:
        # The clear error names what to do and every module it refuses.
        assert "register_passthrough" in str(error) and error.modules
        with pytest.raises(UnsupportedModuleError):
            pn.fit_patterns(model, torch.randn(2, 3, size, size), progress=False)
        return "refused"
    data = torch.randn(images, 3, size, size)
    note("fit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # smooth-activation notices
        patterns = pn.fit_patterns(model, data, batch_size=images, progress=False)
    # Explanations run in float64 by default: four fitting images leave deep patterns
    # ill-conditioned (see test_model_zoo), and the product over many layers can leave
    # float32's range.
    model = model.to(dtype)
    x = data[: max(1, images // 2)].to(dtype)
    for method in methods() if only is None else only:
        note(f"explain {method}")
        explain_with_every_method(model, patterns, x, name, only=[method])
    return "explained"


def _walk_all(selected: list[tuple[str, int]], cheap: bool = False) -> dict[str, list[str]]:
    outcome: dict[str, list[str]] = {"explained": [], "refused": []}
    for name, _ in selected:
        start = time.perf_counter()
        only, dtype, images = CHEAP[name] if cheap and name in CHEAP else (None, torch.float64, 4)
        outcome[walk(name, only=only, dtype=dtype, images=images)].append(name)
        print(f"  {name:24s} {time.perf_counter() - start:6.1f} s")
    return outcome


def _report(selected: list[tuple[str, int]], outcome: dict[str, list[str]],
            cheap: bool = False) -> None:
    reduced = sorted(set(CHEAP) & set(outcome["explained"])) if cheap else []
    print(
        f"\nmodel-zoo walk: {len(selected)} torchvision classification models, "
        f"{len(outcome['explained'])} build, fit and explain with all {len(methods())} "
        f"methods" + "".join(f" (but {n}: {', '.join(CHEAP[n][0])} in {CHEAP[n][1]})"
                             for n in reduced)
        + f"; {len(outcome['refused'])} refused: {', '.join(outcome['refused'])}"
    )
    listed = readme_refused()
    missing = set(outcome["refused"]) - listed
    assert not missing, f"refused but not listed in README.md: {sorted(missing)}"
    wrongly = listed & set(outcome["explained"])
    assert not wrongly, f"listed as refused in README.md but explained: {sorted(wrongly)}"


def test_model_zoo_walk_one_per_family() -> None:
    assert len(classification_models()) >= 80
    selected = fast_selection()
    assert TARGETS <= {name for name, _ in selected}
    outcome = _walk_all(selected, cheap=True)
    _report(selected, outcome, cheap=True)
    assert len(outcome["explained"]) + len(outcome["refused"]) == len(selected)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("PATTERNNET_ZOO_ALL") != "1",
    reason="the walk of the 65 other torchvision models needs tens of GB and far more than CI's "
    "time on 2 cores; run it with PATTERNNET_ZOO_ALL=1",
)
def test_model_zoo_walk_all_others() -> None:
    selected = slow_selection()
    outcome = _walk_all(selected)
    _report(selected, outcome)
