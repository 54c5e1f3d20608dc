"""ONNX translations of the `hotpath::` ops, for `torch.onnx.export(..., dynamo=True, custom_translation_table=...)`.

    onnx_program = torch.onnx.export(model, args, dynamo=True,
                                     custom_translation_table=kernels.onnx_translation_table())

A model patched with the fused kernels calls `torch.ops.hotpath.*`; torch.export keeps those ops opaque (they are
`torch.library.custom_op`s with fake implementations), and this table tells the ONNX exporter how to write each one
with standard ONNX operators. The translations are onnxscript functions traced by the exporter: they build the
same math as the `*_ref` references (no fusion; ONNX Runtime or TensorRT fuse what they can).

To add an op: write `<op>_onnx(...)` below with the op's argument list and one line in `onnx_translation_table()`.
onnxscript is imported only when a translation runs, so `import kernels` stays light.
"""
from __future__ import annotations

from typing import Any, Callable

__all__ = ["onnx_translation_table", "attention_fwd_onnx", "softmax_onnx"]

# The exporter reads the annotations of a translation: float/bool parameters become ONNX attributes, and a tensor
# parameter must stay an input of any type, which `Any` (like no annotation) gives.
OnnxValue = Any


def _op() -> Any:
    from onnxscript import opset18  # imported lazily on purpose

    return opset18


def attention_fwd_onnx(q: OnnxValue, k: OnnxValue, v: OnnxValue, causal: bool = True,
                       scale: float = 1.0) -> tuple[OnnxValue, OnnxValue]:
    """hotpath::attention_fwd(q, k, v, causal, scale) -> (o, lse) with standard ONNX ops (opset 18).

    q (B, H, T, D), k/v (B, H_kv, S, D). Grouped heads by a reshape to (B, H_kv, G, T, D) and broadcasting MatMul,
    causal mask bottom-right from runtime shapes (dynamic T, S work), fp32 math, rows attending nothing -> 0.
    """
    op = _op()
    f32 = 1  # onnx.TensorProto.FLOAT
    qf, kf, vf = op.Cast(q, to=f32), op.Cast(k, to=f32), op.Cast(v, to=f32)
    q_shape = op.Shape(q)  # [B, H, T, D]
    k_shape = op.Shape(k)  # [B, H_kv, S, D]
    B = op.Slice(q_shape, [0], [1])
    H = op.Slice(q_shape, [1], [2])
    T = op.Slice(q_shape, [2], [3])
    D = op.Slice(q_shape, [3], [4])
    Hkv = op.Slice(k_shape, [1], [2])
    S = op.Slice(k_shape, [2], [3])
    G = op.Div(H, Hkv)
    q5 = op.Reshape(qf, op.Concat(B, Hkv, G, T, D, axis=0))  # (B, H_kv, G, T, D)
    k5 = op.Unsqueeze(kf, [2])  # (B, H_kv, 1, S, D)
    v5 = op.Unsqueeze(vf, [2])
    s = op.Mul(op.MatMul(q5, op.Transpose(k5, perm=[0, 1, 2, 4, 3])), op.Constant(value_float=float(scale)))
    neg_inf = op.Constant(value_float=float("-inf"))
    zero = op.Constant(value_float=0.0)
    if causal:
        t0 = op.Constant(value_int=0)
        one = op.Constant(value_int=1)
        t_s, s_s = op.Squeeze(T, [0]), op.Squeeze(S, [0])
        rows = op.Unsqueeze(op.Add(op.Range(t0, t_s, one), op.Sub(s_s, t_s)), [1])  # (T, 1): i + S - T
        cols = op.Unsqueeze(op.Range(t0, s_s, one), [0])  # (1, S)
        keep = op.LessOrEqual(cols, rows)  # (T, S)
        s = op.Where(keep, s, neg_inf)
    # safe softmax: a row of all -inf gives p = 0 and lse = -inf
    m = op.ReduceMax(s, [-1], keepdims=1)
    m = op.Where(op.IsInf(m), zero, m)
    e = op.Exp(op.Sub(s, m))
    l = op.ReduceSum(e, [-1], keepdims=1)  # noqa: E741
    is_empty = op.Equal(l, zero)
    p = op.Div(e, op.Where(is_empty, op.Constant(value_float=1.0), l))
    o5 = op.MatMul(p, v5)  # (B, H_kv, G, T, D)
    o = op.CastLike(op.Reshape(o5, op.Concat(B, H, T, D, axis=0)), q)
    lse = op.Reshape(op.Add(op.Log(l), m), op.Concat(B, H, T, axis=0))  # (B, H, T) fp32
    return o, lse


def softmax_onnx(x: OnnxValue, scale: float = 1.0, causal: bool = False) -> OnnxValue:
    """hotpath::softmax(x, scale, causal) with standard ONNX ops (opset 18).

    Same semantics as the kernel: fp32 math, bottom-right causal mask from runtime shapes (dynamic T and S work),
    rows with nothing visible give zeros.
    """
    op = _op()
    f32 = 1  # onnx.TensorProto.FLOAT
    z = op.Mul(op.Cast(x, to=f32), op.Constant(value_float=float(scale)))
    if causal:
        t = op.Squeeze(op.Shape(x, start=-2, end=-1), [0])
        s = op.Squeeze(op.Shape(x, start=-1), [0])
        zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
        rows = op.Unsqueeze(op.Add(op.Range(zero, t, one), op.Sub(s, t)), [1])  # (T, 1): i + S - T
        cols = op.Unsqueeze(op.Range(zero, s, one), [0])  # (1, S)
        z = op.Where(op.LessOrEqual(cols, rows), z, op.Constant(value_float=float("-inf")))
    m = op.ReduceMax(z, [-1], keepdims=1)
    m = op.Where(op.IsInf(m), op.Constant(value_float=0.0), m)
    p = op.Exp(op.Sub(z, m))
    d = op.ReduceSum(p, [-1], keepdims=1)
    empty = op.Equal(d, op.Constant(value_float=0.0))
    y = op.Div(p, op.Where(empty, op.Constant(value_float=1.0), d))
    return op.CastLike(y, x)


def onnx_translation_table() -> dict[object, Callable]:
    """{op overload: onnxscript translation} for every `hotpath::` op, to pass as custom_translation_table."""
    import torch

    from . import flash_attention, fused_softmax  # noqa: F401 - they register torch.ops.hotpath.*

    return {
        torch.ops.hotpath.attention_fwd.default: attention_fwd_onnx,
        torch.ops.hotpath.softmax.default: softmax_onnx,
        # one line per op, e.g. torch.ops.hotpath.softmax_fwd.default: softmax_fwd_onnx,
    }
