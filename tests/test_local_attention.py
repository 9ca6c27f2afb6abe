"""The single-rank attention kernel against attention written out in float64."""

import pytest
import torch

from longvila_mcore.parallel.local_attention import attention_forward, local_attention


def reference(q, k, v, cu_q, cu_k, causal, scale):
    """Per sample: softmax(q k^T * scale + mask) v, K/V heads repeated for their query heads."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    outs, lses = [], []
    for i in range(len(cu_q) - 1):
        qi, ki, vi = q[cu_q[i] : cu_q[i + 1]], k[cu_k[i] : cu_k[i + 1]], v[cu_k[i] : cu_k[i + 1]]
        scores = torch.einsum("qhd,khd->hqk", qi, ki) * scale
        if causal:
            mask = torch.ones(len(qi), len(ki), dtype=torch.bool).tril()
            scores = scores.masked_fill(~mask, float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vi))
        lses.append(scores.logsumexp(-1))
    return torch.cat(outs), torch.cat(lses, dim=1)


CASES = {
    "packed_causal_gqa": ([0, 6, 10, 10 + 12], None, True, 4, 2),
    "equal_runs_bidirectional": ([0, 5, 10, 15, 23, 31], None, False, 4, 4),
    "cross_lengths_mqa": ([0, 4, 12], [0, 8, 10], False, 4, 1),
    # one run over the whole input: the kernel's outputs are returned without a gather buffer
    "single_causal_gqa": ([0, 16], None, True, 4, 2),
    "equal_samples_one_run": ([0, 8, 16, 24], None, True, 4, 1),
    # one run covers every query row but not every key row: dk/dv of the rest stay zero
    "empty_query_sample": ([0, 0, 6], [0, 4, 10], False, 4, 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_match_float64(case):
    cu_q, cu_k, causal, hq, hkv = CASES[case]
    cu_k = cu_k or cu_q
    torch.manual_seed(0)
    q = torch.randn(cu_q[-1], hq, 8, dtype=torch.float64)
    k = torch.randn(cu_k[-1], hkv, 8, dtype=torch.float64)
    v = torch.randn(cu_k[-1], hkv, 8, dtype=torch.float64)
    grad = torch.randn_like(q)
    scale = 8**-0.5

    ref_out, ref_lse = reference(q, k, v, cu_q, cu_k, causal, scale)
    ref_grads = torch.autograd.grad(
        (
            reference(*(t.requires_grad_() for t in (q, k, v)), cu_q, cu_k, causal, scale)[0] * grad
        ).sum(),
        (q, k, v),
    )
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    out = local_attention(*leaves, cu_q, cu_k, causal, scale)
    (out * grad.float()).sum().backward()
    _, lse = attention_forward(*(t.detach() for t in leaves), cu_q, cu_k, causal, scale)

    def rel(a, b):
        return ((a.double() - b).abs().max() / b.abs().max()).item()

    assert rel(out, ref_out) <= 1e-5
    assert rel(lse, ref_lse) <= 1e-5
    for leaf, ref_grad in zip(leaves, ref_grads):
        assert rel(leaf.grad, ref_grad) <= 1e-5


def test_causal_needs_equal_lengths():
    q = torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match="causal"):
        local_attention(q, q[:3], q[:3], [0, 4], [0, 3], True)


def test_runtime_imports_nothing_from_parallel():
    """runtime/ names the kernel for a device and parallel/ maps the name to it: parallel/ imports
    runtime/, never the other way round (no import cycle, not even inside a function)."""
    import ast
    from pathlib import Path

    import longvila_mcore

    runtime = Path(longvila_mcore.__file__).parent / "runtime"
    imports = {}
    for path in sorted(runtime.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                imports.setdefault(path.name, []).append(node.module or "")
            elif isinstance(node, ast.Import):
                imports.setdefault(path.name, []).extend(a.name for a in node.names)
    assert "device.py" in imports
    cycles = {
        name: [m for m in modules if m.startswith("longvila_mcore.parallel")]
        for name, modules in imports.items()
    }
    assert not any(cycles.values()), cycles
