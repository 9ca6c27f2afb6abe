"""The GPU side, checked on CPU: the flash-attn interface the kernel wrapper calls, the version
check at start-up, and the Dockerfile, pyproject.toml and README agreeing (no image builds here).
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import tomllib
import torch
from packaging.requirements import Requirement

from longvila_mcore.parallel.local_attention import FlashAttnKernel, TorchKernel, segments
from longvila_mcore.runtime import device

REPO = Path(__file__).resolve().parents[1]

# --- a fake flash_attn with the exact 2.7 / 2.8 signatures ---------------------------------------


def _reference(q, k, v, cu_q, cu_k, causal, scale):
    """Attention per packed sample, K/V heads shared by groups of query heads: (out, lse)."""
    outs, lses = [], []
    group = q.shape[1] // k.shape[1]
    for i in range(len(cu_q) - 1):
        qi = q[cu_q[i] : cu_q[i + 1]].transpose(0, 1)
        ki = k[cu_k[i] : cu_k[i + 1]].repeat_interleave(group, 1).transpose(0, 1)
        vi = v[cu_k[i] : cu_k[i + 1]].repeat_interleave(group, 1).transpose(0, 1)
        scores = qi @ ki.transpose(1, 2) * scale
        if causal:
            scores = scores.masked_fill(
                torch.ones(scores.shape[1:], dtype=torch.bool).triu(1), float("-inf")
            )
        lses.append(scores.logsumexp(-1))
        outs.append((scores.softmax(-1) @ vi).transpose(0, 1))
    return torch.cat(outs), torch.cat(lses, dim=1)


def _forward(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p,
    softmax_scale,
    causal,
    window_size_left,
    window_size_right,
    alibi_slopes,
):
    for cu in (cu_seqlens_q, cu_seqlens_k):
        assert cu.dtype == torch.int32 and cu.device == q.device
    assert max_seqlen_q == int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    assert max_seqlen_k == int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
    assert dropout_p == 0.0 and (window_size_left, window_size_right) == (-1, -1)
    assert alibi_slopes is None
    out, lse = _reference(
        q, k, v, cu_seqlens_q.tolist(), cu_seqlens_k.tolist(), causal, softmax_scale
    )
    return out, lse, None, torch.zeros(2, dtype=torch.int64)  # out, softmax_lse, S_dmask, rng_state


def _backward(dout, q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, dq, dk, dv):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, _ = _reference(
        q, k, v, cu_seqlens_q.tolist(), cu_seqlens_k.tolist(), causal, softmax_scale
    )
    for buffer, grad in zip((dq, dk, dv), torch.autograd.grad(out, (q, k, v), dout)):
        buffer.copy_(grad)  # flash-attn writes the gradients into the buffers it is given
    return torch.zeros(q.shape[1], q.shape[0])  # softmax_d


# The parameter lists of flash_attn/flash_attn_interface.py, written out by hand: 2.7.0 ...
def varlen_forward_27(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p,
    softmax_scale,
    causal,
    window_size_left=-1,
    window_size_right=-1,
    softcap=0.0,
    alibi_slopes=None,
    return_softmax=False,
    block_table=None,
    leftpad_k=None,
    seqused_k=None,
):
    return _forward(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p,
        softmax_scale,
        causal,
        window_size_left,
        window_size_right,
        alibi_slopes,
    )


def varlen_backward_27(
    dout,
    q,
    k,
    v,
    out,
    softmax_lse,
    dq,
    dk,
    dv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p,
    softmax_scale,
    causal,
    window_size_left,
    window_size_right,
    softcap,
    alibi_slopes,
    deterministic,
    rng_state=None,
):
    assert (window_size_left, window_size_right, softcap, alibi_slopes) == (-1, -1, 0.0, None)
    return _backward(dout, q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, dq, dk, dv)


# ... and 2.7.4 to 2.8.3, which append `zero_tensors`.
def varlen_forward_28(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p,
    softmax_scale,
    causal,
    window_size_left=-1,
    window_size_right=-1,
    softcap=0.0,
    alibi_slopes=None,
    return_softmax=False,
    block_table=None,
    leftpad_k=None,
    seqused_k=None,
    zero_tensors=False,
):
    return _forward(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p,
        softmax_scale,
        causal,
        window_size_left,
        window_size_right,
        alibi_slopes,
    )


def varlen_backward_28(
    dout,
    q,
    k,
    v,
    out,
    softmax_lse,
    dq,
    dk,
    dv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p,
    softmax_scale,
    causal,
    window_size_left,
    window_size_right,
    softcap,
    alibi_slopes,
    deterministic,
    rng_state=None,
    zero_tensors=False,
):
    assert (window_size_left, window_size_right, softcap, alibi_slopes) == (-1, -1, 0.0, None)
    return _backward(dout, q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, dq, dk, dv)


FAKES = {
    "2.7.0": (varlen_forward_27, varlen_backward_27),
    "2.8.3": (varlen_forward_28, varlen_backward_28),
}


@pytest.fixture(params=sorted(FAKES))
def fake_flash_attn(request, monkeypatch):
    forward, backward = FAKES[request.param]
    package = types.ModuleType("flash_attn")
    interface = types.ModuleType("flash_attn.flash_attn_interface")
    interface._flash_attn_varlen_forward = forward
    interface._flash_attn_varlen_backward = backward
    package.flash_attn_interface = interface
    package.__version__ = request.param
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", interface)
    return request.param


@pytest.mark.parametrize("causal", [True, False])
def test_flash_attn_wrapper_calls_the_27_28_interface(fake_flash_attn, causal):
    """FlashAttnKernel through flash-attn's varlen signatures (names, defaults, 4 return values;
    a 2.6-style `window_size=` or 8-value unpacking fails here) gives TorchKernel's out, lse and
    gradients on packed GQA samples of unequal lengths."""
    g = torch.Generator().manual_seed(0)
    cu = segments((0, 5, 12, 16), torch.device("cpu"))  # what the dispatcher hands the kernels
    q, k, v = (torch.randn(16, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    dout = torch.randn(16, 4, 8, generator=g, dtype=torch.float64)
    scale = 8**-0.5
    out, lse = FlashAttnKernel.forward(q, k, v, cu, cu, causal, scale)
    ref_out, ref_lse = TorchKernel.forward(q, k, v, cu, cu, causal, scale)
    grads = FlashAttnKernel.backward(dout, q, k, v, out, lse, cu, cu, causal, scale)
    ref_grads = TorchKernel.backward(dout, q, k, v, ref_out, ref_lse, cu, cu, causal, scale)
    assert lse.shape == ref_lse.shape == (4, 16)
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-9, atol=1e-9)
    for got, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


# --- the version check at start-up -----------------------------------------------------------------


def _installed(monkeypatch, versions: dict[str, str]):
    def version(name: str) -> str:
        if name not in versions:
            raise device.importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(device.importlib.metadata, "version", version)
    device.check_flash_attn.cache_clear()


def test_flash_attn_version_is_checked_with_one_clear_error(monkeypatch):
    for good in ("2.7.0", "2.7.4.post1", "2.8.3"):
        _installed(monkeypatch, {"flash-attn": good})
        assert device.check_flash_attn() == good
    for bad in ("2.6.3", "2.9.0", "3.0.0b1"):
        _installed(monkeypatch, {"flash-attn": bad})
        with pytest.raises(
            RuntimeError, match=rf"flash-attn {re.escape(bad)} is installed.*>=2\.7"
        ):
            device.check_flash_attn()
    _installed(monkeypatch, {})
    with pytest.raises(RuntimeError, match="not installed.*NGC image"):
        device.check_flash_attn()
    _installed(monkeypatch, {"flash-attn": "2.8.3", "transformer-engine": "2.4.0+3cd6870c"})
    with pytest.raises(RuntimeError, match=r"Transformer Engine 2\.4\.0\+3cd6870c"):
        device.check_gpu_stack()
    _installed(monkeypatch, {"flash-attn": "2.8.3", "transformer-engine": "2.10.0+769ed778"})
    assert device.check_gpu_stack()["transformer-engine"] == "2.10.0+769ed778"
    device.check_flash_attn.cache_clear()


# --- Dockerfile, pyproject.toml and README agree ------------------------------------------------

NGC_PYTORCH = {
    # tag: what NVIDIA's PyTorch release notes for that tag state (docs.nvidia.com, deeplearning/
    # frameworks/pytorch-release-notes/rel-25-12.html). Transformer Engine and flash-attn are
    # not stated there; the image build checks them (runtime.device.check_gpu_stack).
    "25.12-py3": {"torch": "2.10.0a0+b4e4ee81d3", "cuda": "13.1.0", "python": "3.12"},
}


def _gpu_requirements() -> tuple[dict[str, Requirement], dict[str, Requirement]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = {Requirement(r).name: Requirement(r) for r in project["dependencies"]}
    gpu = {Requirement(r).name: Requirement(r) for r in project["optional-dependencies"]["gpu"]}
    return base, gpu


def test_dockerfile_and_pyproject_agree():
    dockerfile = (REPO / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", dockerfile, re.MULTILINE)
    assert len(froms) == 1 and froms[0].startswith("nvcr.io/nvidia/pytorch:"), froms
    tag = froms[0].split(":", 1)[1]
    assert tag in NGC_PYTORCH, f"unknown NGC PyTorch tag {tag}: add its release notes' versions"
    image = NGC_PYTORCH[tag]
    base, gpu = _gpu_requirements()

    # pip keeps the image's torch only if it already satisfies the requirement (pip accepts an
    # installed pre-release build such as 2.10.0a0 when the range contains it).
    assert base["torch"].specifier.contains(image["torch"], prereleases=True), base["torch"]
    requires_python = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "requires-python"
    ]
    assert Requirement(f"python{requires_python}").specifier.contains(image["python"])
    # the extra and the start-up checks name the same ranges
    assert str(gpu["flash-attn"].specifier) == str(
        Requirement(f"x{device.FLASH_ATTN_SUPPORTED}").specifier
    )
    assert str(gpu["transformer-engine"].specifier) == str(
        Requirement(f"x{device.TRANSFORMER_ENGINE_SUPPORTED}").specifier
    )
    # what the Dockerfile says about its base is what the release notes say
    for version in (image["torch"], image["cuda"], f"Python {image['python']}"):
        assert version in dockerfile, version
    # installed under the image's constraints, nothing of the GPU stack itself, then checked
    installs = [line for line in dockerfile.splitlines() if "pip install" in line]
    assert installs and all("--constraint /etc/pip/constraint.txt" in line for line in installs)
    assert not re.search(r"pip install[^\n]*(torch|flash|transformer.engine|\[gpu\])", dockerfile)
    assert "check_gpu_stack()" in dockerfile

    readme = (REPO / "README.md").read_text()
    assert froms[0] in readme and image["torch"] in readme
