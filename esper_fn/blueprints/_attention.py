"""Self-attention seeds on "sequence" slots ([B, T, d]).

- ``attention_mhsa``: pre-norm multi-head self-attention, heads = the largest of 4/2/1 dividing d.
- ``attention_split_qkv``: split Q/KV capacity (grouped-query attention): Q has d features in H heads,
  K and V only kv_dim = d / 2 features in H / 2 heads, each shared by two query heads.
- ``flash_attention@2.0.0`` (needs "cuda" and "flash_attention", i.e. an sm80+ GPU; falls back to
  ``attention_mhsa@1.0.0``): the same design and parameters as ``attention_mhsa``, with the attention
  itself run by the fused FlashAttention kernel: `F.scaled_dot_product_attention` pinned to
  ``SDPBackend.FLASH_ATTENTION`` on CUDA tensors in float16/bfloat16 (float32 slots are cast to
  bfloat16 for the kernel and back). It never runs another kernel: on CPU tensors it raises
  `CapabilityError` (where CUDA is absent, `get` resolves it to ``attention_mhsa``), and it fits only
  slots whose head size the kernel takes (at most 256). Version 1.0.0 fell back to ordinary
  attention silently and was removed.
- ``attention_int8_kv`` (pure PyTorch, no capability): quantisation-aware attention, ``attention_mhsa``
  with K and V fake-quantised to int8 (symmetric absmax scale per token and head, rounded to the
  int8 grid and back) and a straight-through gradient. It trains a seed that tolerates an int8 K/V
  cache at inference; it keeps no cache itself. (It replaces ``kv_cache_int8@1.0.0``, which claimed
  a CUDA-only int8 KV cache it did not have.)

Every design normalises its input (LayerNorm without affine) and zero-initialises its output
projection, so the delta is 0 at germination; Q/K/V projections are random, so the output projection
gets a gradient at once. No biases.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .._blueprint import Blueprint, BlueprintMeta, register
from .._errors import CapabilityError
from ._common import uniform

SEQUENCE_KINDS = ("sequence",)


def heads(d: int) -> int:
    """Number of attention heads for a model width d: the largest of 4, 2, 1 dividing d."""
    return next(h for h in (4, 2, 1) if d % h == 0)


def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """`F.scaled_dot_product_attention` on [..., H, T, hd].

    On CPU it is pinned to the math backend: the CPU flash kernel has no vmap batching rule (vmapping
    it warns and falls back to a slow per-example loop), and stacked hosts run seeds under vmap.
    """
    if q.device.type == "cpu":
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def _split_heads(z: Tensor, n: int) -> Tensor:
    """[..., T, n * hd] -> [..., n, T, hd]."""
    return z.unflatten(-1, (n, -1)).transpose(-2, -3)


def _merge_heads(z: Tensor) -> Tensor:
    """[..., n, T, hd] -> [..., T, n * hd]."""
    return z.transpose(-2, -3).flatten(-2)


def _quant_int8(z: Tensor) -> Tensor:
    """Round-trip through int8 with one absmax scale per row of the last dim; straight-through grad."""
    scale = z.detach().abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127.0
    q = torch.round(z.detach() / scale).clamp(-127, 127).to(torch.int8)
    deq = q.to(z.dtype) * scale
    return z + (deq - z).detach()


def _mhsa_count(spec) -> int:
    d = spec.features
    return 4 * d * d


def _mhsa_flops(spec) -> int:
    t, d = spec.shape
    return 4 * t * d * d + 2 * t * t * d


def _mhsa_init(spec, g):
    d = spec.features
    return {"w_qkv": uniform((3 * d, d), d, g), "w_o": torch.zeros(d, d)}, {}


def flash_sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """`F.scaled_dot_product_attention` on [..., H, T, hd] CUDA tensors, run by the FlashAttention
    kernel and nothing else (float32 inputs are cast to bfloat16 for the kernel, the output back).

    Raises:
        CapabilityError: the tensors are not on a CUDA device.
    """
    if not q.is_cuda:
        raise CapabilityError(
            f"flash_attention@2.0.0 runs the fused FlashAttention kernel on CUDA tensors, and the slot tensor "
            f"is on {q.device.type!r}. Where CUDA is absent `esper_fn.blueprints.get` resolves it to "
            "attention_mhsa@1.0.0; on a CUDA machine keep the state and the inputs on the GPU, or germinate "
            "attention_mhsa@1.0.0."
        )
    dt = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q.to(dt), k.to(dt), v.to(dt)).to(q.dtype)


def _mhsa(variant: str):
    """apply of the full multi-head designs; variant is "plain", "flash" or "int8"."""

    def apply(p, h, x_in, spec, train):
        d = spec.features
        n = heads(d)
        a = F.layer_norm(h, (d,))
        q, k, v = (_split_heads(z, n) for z in F.linear(a, p["w_qkv"]).chunk(3, dim=-1))
        if variant == "int8":
            k, v = _quant_int8(k), _quant_int8(v)
        att = flash_sdpa(q, k, v) if variant == "flash" else sdpa(q, k, v)
        return F.linear(_merge_heads(att), p["w_o"])

    return apply


def _attention_mhsa() -> Blueprint:
    meta = BlueprintMeta(
        name="attention_mhsa", version="1.0.0", slot_kinds=SEQUENCE_KINDS, risk_score=0.3,
        description="residual pre-norm multi-head self-attention (heads = largest of 4/2/1 dividing d), output "
                    "projection zero-initialised",
    )
    return Blueprint(meta, _mhsa_init, _mhsa("plain"), _mhsa_count, _mhsa_flops)


def _attention_split_qkv() -> Blueprint:
    """Q: d -> d in H heads; K, V: d -> d/2 each in H/2 heads (grouped-query attention)."""

    def shape(spec):
        d = spec.features
        n = heads(d)
        return d, n, n // 2, d // 2

    def init(spec, g):
        d, _, _, kv = shape(spec)
        return {"w_q": uniform((d, d), d, g), "w_kv": uniform((2 * kv, d), d, g), "w_o": torch.zeros(d, d)}, {}

    def apply(p, h, x_in, spec, train):
        d, n, n_kv, _ = shape(spec)
        a = F.layer_norm(h, (d,))
        q = _split_heads(F.linear(a, p["w_q"]), n)
        k, v = (_split_heads(z, n_kv).repeat_interleave(n // n_kv, dim=-3)
                for z in F.linear(a, p["w_kv"]).chunk(2, dim=-1))
        return F.linear(_merge_heads(sdpa(q, k, v)), p["w_o"])

    def count(spec):
        d, _, _, kv = shape(spec)
        return 2 * d * d + 2 * kv * d

    def flops(spec):
        t, _ = spec.shape
        d, _, _, kv = shape(spec)
        return t * (2 * d * d + 2 * kv * d) + 2 * t * t * d

    def check(spec):
        if spec.features % 2:
            return f"split Q/KV attention needs an even feature size (kv_dim = d / 2), and d = {spec.features}"
        return None

    meta = BlueprintMeta(
        name="attention_split_qkv", version="1.0.0", slot_kinds=SEQUENCE_KINDS, risk_score=0.3,
        description="residual pre-norm grouped-query self-attention: Q d -> d in H heads, K/V d -> d/2 in H/2 "
                    "heads, output projection zero-initialised",
        hyperparams={"kv_ratio": 0.5},
    )
    return Blueprint(meta, init, apply, count, flops, check=check)


def _flash_attention() -> Blueprint:
    def check(spec):
        hd = spec.features // heads(spec.features)
        if hd > 256:
            return (f"the FlashAttention kernel takes head sizes up to 256, and d = {spec.features} in "
                    f"{heads(spec.features)} heads gives {hd}")
        return None

    meta = BlueprintMeta(
        name="flash_attention", version="2.0.0", slot_kinds=SEQUENCE_KINDS, risk_score=0.3,
        requires_capability=("cuda", "flash_attention"), fallback="attention_mhsa@1.0.0",
        description="attention_mhsa (same parameters) with the attention run by the fused FlashAttention kernel "
                    "only (CUDA sm80+, bfloat16, head size <= 256); falls back to attention_mhsa",
    )
    return Blueprint(meta, _mhsa_init, _mhsa("flash"), _mhsa_count, _mhsa_flops, check=check)


def _attention_int8_kv() -> Blueprint:
    meta = BlueprintMeta(
        name="attention_int8_kv", version="1.0.0", slot_kinds=SEQUENCE_KINDS, risk_score=0.35,
        description="quantisation-aware attention_mhsa: K/V fake-quantised to int8 (absmax scale per token and "
                    "head) with a straight-through gradient; pure PyTorch, keeps no cache",
        hyperparams={"kv_bits": 8},
    )
    return Blueprint(meta, _mhsa_init, _mhsa("int8"), _mhsa_count, _mhsa_flops)


for _bp in (_attention_mhsa(), _attention_split_qkv(), _flash_attention(), _attention_int8_kv()):
    register(_bp)
