"""docs/how-to-custom-rule.md: its example runs as written and is right (float64 formula)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from patternnet.engine.rules import ZPlus
from patternnet.methods import registry
from patternnet.methods.lrp import LRP

HOWTO = Path(__file__).resolve().parents[1] / "docs" / "how-to-custom-rule.md"


def example_code() -> str:
    """The Python blocks of section 2 (the example), in order."""
    text = HOWTO.read_text()
    section = text[text.index("## 2."):text.index("## 3.")]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 2, "the how-to's example is two Python blocks"
    return "\n".join(blocks)


def test_the_howto_example_runs_and_matches_the_formula() -> None:
    namespace: dict = {}
    torch.manual_seed(0)
    try:
        exec(compile(example_code(), str(HOWTO), "exec"), namespace)  # noqa: S102
        model, x = namespace["model"], namespace["x"]
        relevance, same = namespace["relevance"], namespace["same"]
        assert "lrp_my_zplus" in registry.methods()
    finally:
        registry._REGISTRY.pop("lrp_my_zplus", None)
    torch.testing.assert_close(relevance, same, rtol=0, atol=0)

    # z⁺ written out: R_i = Σ_j x_i w⁺_ij / (Σ_i' x_i' w⁺_i'j + ε) R_j, through the ReLU gate
    eps = 1e-9
    w1, w2 = model[0].weight.detach().clamp(min=0), model[2].weight.detach().clamp(min=0)
    pre = model[0](x).detach()
    h = pre.relu()
    logits = model(x).detach()
    r_out = torch.zeros_like(logits)
    r_out[:, 2] = logits[:, 2]

    def zplus(inputs: torch.Tensor, w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        z = inputs @ w.T + eps
        return torch.stack([
            sum(inputs[n, i] * w[j, i] / z[n, j] * r[n, j] for j in range(w.shape[0]))
            for n in range(inputs.shape[0]) for i in range(w.shape[1])
        ]).reshape(inputs.shape)

    r_h = zplus(h, w2, r_out) * (pre > 0)
    expected = zplus(x, w1, r_h)
    torch.testing.assert_close(relevance, expected)
    # and the library's fused z⁺ without bias gives the same
    fused = LRP(model, ZPlus(stabilizer=eps, bias=False)).attribute(x, target=2)
    torch.testing.assert_close(relevance, fused)
