"""The ``--target ort`` graph: a hotpath decoder written with ONNX Runtime's contrib ops.

Attention is exported straight to ``com.microsoft.GroupQueryAttention`` (GQA; with kv_heads == heads it is plain
multi-head attention): :class:`OrtKVDecoder` runs the model's own modules (embeddings, norms, projections, MLP, LM
head) and calls the opaque op :func:`group_query_attention`, which the exporter writes as one GQA node through
:func:`translation_table`. Pattern-matching the decomposed SDPA afterwards (onnxscript's ``fuse_sdpa``/``fuse_gqa``)
depends on the exact node sequence torch emits for masks and padding; exporting the op directly does not.

GQA brings:

- one node for Q·Kᵀ, mask, softmax, ·V and the KV cache update, with *packed QKV* (one MatMul for q, k, v) when
  positions are learned (rotary models rotate q and k with the model's own ops first, then pass them separately);
- a cache that may be shared between past and present: when ``past_key_values.i.*`` and ``present.i.*`` are bound
  to the same (batch, kv_heads, max_len, head_dim) buffer, ORT's CPU kernel sees the same pointer and writes only
  the new columns (:class:`export.onnx_runtime.KVCache`);
- right-padding semantics: row b's tokens occupy cache columns [0, len_b). The graph keeps the generic inputs
  (``attention_mask`` (B, total) with row b = 1 on [0, len_b + T), 0 after) and derives GQA's
  ``seqlens_k = sum(mask) - 1`` and ``total_sequence_length = mask width`` from it, as ONNX Runtime GenAI's own
  GQA models do.

After export, :func:`fuse_for_ort` applies onnxscript's ORT fusion rules that are exact for this model and measured
faster: tanh ``FastGelu`` (with its bias) and RMSNorm -> ``SimplifiedLayerNormalization``. The erf
``Gelu``/``BiasGelu`` rules are not applied: GPT-2's GELU is the tanh approximation and erf drifts logits ~8e-4 at
124M (validation catches it). Nor is ``SkipLayerNormalization`` (residual Add + LayerNorm in one node): ONNX Runtime
1.32's CPU kernel for it is slower than the LayerNormalization + Add it replaces. GPT-2 124M, 2 threads, one process
interleaving both files (`python -m export.ort_profile` for the per-op split): a 512-token prefill 329 -> 301 ms
(its 24 SkipLayerNormalization nodes took 21.8 ms, the 25 LayerNormalization + residual Adds ~7 ms), decode b1
12.51 -> 12.24 ms/token, a batch-8 step 26.7 -> 25.5 ms. ``SkipSimplifiedLayerNormalization`` runs on the same CPU
kernel and is left out with it. SwiGLU and rotary stay standard ops (ORT fuses MatMul+Add and the elementwise ops
itself at load).

GQA constraints from ONNX Runtime's CPU kernel: a run with past context and more than one new token takes batch 1
(:class:`export.onnx_runtime.OnnxDecoder` splits such steps by row); fp16 GQA has a CPU kernel.
"""
from __future__ import annotations

import functools
import math
from collections import Counter
from typing import TYPE_CHECKING, Any, Optional, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.gpt import GPT, Block, apply_rope, last_positions, rope_cos_sin

if TYPE_CHECKING:
    import onnx_ir as ir

TARGETS = ("ort", "generic")
CONTRIB_DOMAIN = "com.microsoft"


# ------------------------------------------------------------------------------------------------ the op
@torch.library.custom_op("hotpath_ort::group_query_attention", mutates_args=())
def group_query_attention(query: torch.Tensor, key: Optional[torch.Tensor], value: Optional[torch.Tensor],
                          past_key: torch.Tensor, past_value: torch.Tensor, seqlens_k: torch.Tensor,
                          total_sequence_length: torch.Tensor, num_heads: int, kv_num_heads: int,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GQA as ONNX Runtime defines it, for tracing. query (B, T, H*D), or packed (B, T, (H + 2 H_kv) * D) with key
    and value None; key/value (B, T, H_kv*D); past_* (B, H_kv, P, D) -> (out (B, T, H*D), present_key,
    present_value (B, H_kv, P + T, D)).

    This eager body covers the unpadded case only (every row's P past columns real, seqlens_k = P + T - 1): the
    export never runs it (torch.export traces the fake below); it documents the math and lets the wrapper run eagerly
    in tests."""
    q, k, v = _split(query, key, value, num_heads, kv_num_heads)
    B, T, _ = q.shape
    D = past_key.shape[-1]
    q = q.view(B, T, num_heads, D).transpose(1, 2)
    k = torch.cat([past_key, k.view(B, T, kv_num_heads, D).transpose(1, 2)], dim=2)
    v = torch.cat([past_value, v.view(B, T, kv_num_heads, D).transpose(1, 2)], dim=2)
    rep = num_heads // kv_num_heads
    S = k.shape[2]
    mask = torch.arange(S).unsqueeze(0) <= torch.arange(T).unsqueeze(1) + (S - T)
    y = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                       attn_mask=mask, scale=scale)
    return y.transpose(1, 2).reshape(B, T, num_heads * D), k, v


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, num_heads, kv_num_heads, scale):
    B, T = query.shape[0], query.shape[1]
    Hkv, P, D = past_key.shape[1], past_key.shape[2], past_key.shape[3]
    out = query.new_empty((B, T, num_heads * D))
    return out, past_key.new_empty((B, Hkv, P + T, D)), past_value.new_empty((B, Hkv, P + T, D))


def _split(query, key, value, num_heads, kv_num_heads):
    if key is not None:
        return query, key, value
    D = query.shape[-1] // (num_heads + 2 * kv_num_heads)
    return query.split([num_heads * D, kv_num_heads * D, kv_num_heads * D], dim=-1)


def group_query_attention_onnx(query: Any, key: Any, value: Any, past_key: Any, past_value: Any, seqlens_k: Any,
                               total_sequence_length: Any, num_heads: int, kv_num_heads: int,
                               scale: float) -> tuple[Any, Any, Any]:
    """The op as one ``com.microsoft.GroupQueryAttention`` node (key/value None: packed QKV)."""
    from onnxscript import values

    gqa = values.Op(values.Opset(CONTRIB_DOMAIN, 1), "GroupQueryAttention", _gqa_schema())
    return gqa(query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
                                    num_heads=num_heads, kv_num_heads=kv_num_heads, scale=scale, _outputs=3)


@functools.lru_cache(maxsize=1)
def _gqa_schema() -> Any:
    """The subset of ONNX Runtime's GroupQueryAttention signature the export uses (onnx knows no contrib schemas;
    onnxscript needs one to build the node)."""
    from onnx.defs import OpSchema

    opt = OpSchema.FormalParameterOption.Optional
    inputs = [OpSchema.FormalParameter("query", "T"), OpSchema.FormalParameter("key", "T", param_option=opt),
              OpSchema.FormalParameter("value", "T", param_option=opt),
              OpSchema.FormalParameter("past_key", "T", param_option=opt),
              OpSchema.FormalParameter("past_value", "T", param_option=opt),
              OpSchema.FormalParameter("seqlens_k", "M"), OpSchema.FormalParameter("total_sequence_length", "M")]
    outputs = [OpSchema.FormalParameter(n, "T") for n in ("output", "present_key", "present_value")]
    attrs = [OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, ""),
             OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, ""),
             OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "")]
    types = [("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""), ("M", ["tensor(int32)"], "")]
    return OpSchema("GroupQueryAttention", CONTRIB_DOMAIN, 1, inputs=inputs, outputs=outputs,
                    type_constraints=types, attributes=attrs)


def translation_table() -> dict[Any, Any]:
    return {torch.ops.hotpath_ort.group_query_attention.default: group_query_attention_onnx}


# ------------------------------------------------------------------------------------------------ the module
class OrtKVDecoder(nn.Module):
    """The exported forward of an ort-target decoder: the same inputs and outputs as ``export.to_onnx.KVDecoder``,
    with right padding, and each layer's attention one GQA op.

    It runs the model's own submodules in Block/GPT order (embeddings, ln_1, projections, o_proj, ln_2, mlp,
    ln_f, lm_head); only the attention core and the cache update differ from ``GPT.forward``, which is why the
    layer loop is written out here instead of swapping ``attn_fn`` (that hook sees k/v already concatenated with
    the past)."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model
        cfg = model.config
        assert cfg.n_kv_head is not None and cfg.head_dim is not None
        self.H, self.Hkv, self.D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.packed = cfg.pos == "learned"  # rotary: q and k are rotated between the projection and GQA
        if self.packed:  # one (H + 2 H_kv) * D projection per layer: constants of the export, not new parameters
            for i, block in enumerate(_blocks(model)):
                a = block.attn
                self.register_buffer(f"qkv_weight_{i}", torch.cat([a.q_proj.weight, a.k_proj.weight,
                                                                   a.v_proj.weight]).detach(), persistent=False)
                bias = (torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]).detach()
                        if a.q_proj.bias is not None else None)
                self.register_buffer(f"qkv_bias_{i}", bias, persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past_key_values: list[tuple[torch.Tensor, torch.Tensor]],
                logits_to_keep: int) -> tuple[torch.Tensor, Any]:
        m, cfg = self.model, self.model.config
        B, T = input_ids.shape
        seqlens_k = (attention_mask.sum(-1) - 1).to(torch.int32)  # (B,): row b's total length - 1
        total = torch.full((), attention_mask.shape[1], dtype=torch.int32)
        x = m.wte(input_ids)
        rope = None
        if m.wpe is not None:
            x = x + m.wpe(position_ids)
        else:
            rope = rope_cos_sin(position_ids, self.D, cfg.rope_theta, x.dtype)
        presents = []
        scale = 1.0 / math.sqrt(self.D)
        for i, block in enumerate(_blocks(m)):
            a = block.attn
            h = block.ln_1(x)
            if self.packed:
                qkv = F.linear(h, getattr(self, f"qkv_weight_{i}"), getattr(self, f"qkv_bias_{i}"))
                q, k, v = qkv, None, None
            else:
                q, k, v = a.q_proj(h), a.k_proj(h), a.v_proj(h)
                if rope is not None:
                    q = apply_rope(q.view(B, T, self.H, self.D).transpose(1, 2), *rope).transpose(1, 2)
                    k = apply_rope(k.view(B, T, self.Hkv, self.D).transpose(1, 2), *rope).transpose(1, 2)
                    q, k = q.reshape(B, T, self.H * self.D), k.reshape(B, T, self.Hkv * self.D)
            pk, pv = past_key_values[i]
            y, nk, nv = group_query_attention(q, k, v, pk, pv, seqlens_k, total, self.H, self.Hkv, scale)
            presents.append((nk, nv))
            x = x + a.o_proj(y)
            x = x + block.mlp(block.ln_2(x))
        logits = m.lm_head(m.ln_f(last_positions(x, logits_to_keep)))
        return logits.float(), presents


def _blocks(model: GPT) -> list[Block]:
    return [cast(Block, b) for b in model.blocks]


# ------------------------------------------------------------------------------------------------ fusions
def fuse_for_ort(model: ir.Model) -> dict[str, int]:
    """Apply onnxscript's exact ORT fusions that are faster on ONNX Runtime's CPU kernels in place (RMSNorm, tanh
    FastGelu); returns {fusion: count}. The erf GELU rules and the Skip*LayerNormalization fusions are left out on
    purpose (module docstring)."""
    import onnx_ir.passes.common as common_passes
    from onnxscript import optimizer
    from onnxscript.rewriter.ort_fusions import gelu
    from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization

    common_passes.ShapeInferencePass()(model)
    optimizer.optimize(model)
    counts = {
        "rms_normalization": fuse_rms_normalization(model),
        # torch writes GELU as one opset-20 Gelu(approximate="tanh"); older graphs as its tanh formula
        "fast_gelu": _fast_gelu_rules().apply_to_model(model) + gelu.GeluTanhFusion.rule().apply_to_model(model),
    }
    optimizer.optimize(model)
    return counts


def _fast_gelu_rules() -> Any:
    """Gelu(approximate="tanh") -> com.microsoft.FastGelu (the same tanh formula), with a preceding 1-D bias Add
    folded into FastGelu's bias input. Gelu without the tanh attribute (erf) is not touched."""
    from onnxscript.rewriter import _ir_utils, pattern

    def is_tanh(context: Any, gelu: Any, **_: Any) -> Any:
        result = pattern.MatchResult()
        if gelu.producer().attributes.get_string("approximate") != "tanh":
            return result.fail("not the tanh approximation")
        return result

    def biased(op: Any, x: Any, bias: Any) -> Any:
        return op.Gelu(op.Add(x, bias), _outputs=["gelu"])

    def biased_check(context: Any, gelu: Any, bias: Any, **_: Any) -> Any:
        result = is_tanh(context, gelu)
        if result and not (_ir_utils.has_rank(bias, 1) and bias.const_value is not None):
            return result.fail("bias is not a constant 1-D tensor")
        return result

    return pattern.RewriteRuleSet([
        pattern.RewriteRule(biased, lambda op, x, bias, **_: op.FastGelu(x, bias, _domain=CONTRIB_DOMAIN),
                            biased_check),
        pattern.RewriteRule(lambda op, x: op.Gelu(x, _outputs=["gelu"]),
                            lambda op, x, **_: op.FastGelu(x, _domain=CONTRIB_DOMAIN), is_tanh),
    ])


def op_histogram(graph: Any) -> Counter:
    """{op type (domain-qualified for contrib ops): count} over the top-level nodes of an onnx or onnx_ir graph."""
    hist: Counter = Counter()
    nodes = graph if callable(getattr(graph, "node", None)) else graph.node  # ir.Graph iterates; GraphProto has .node
    for node in nodes:
        domain = node.domain
        hist[f"{domain}.{node.op_type}" if domain not in ("", "ai.onnx") else node.op_type] += 1
    return hist
