"""One stored copy of a tied embedding / LM head in an exported graph.

The exporter writes GPT-2's tied ``wte`` once, as ``W`` (vocab, C), read by the embedding ``Gather(W, ids)`` and by
the LM head as ``MatMul(h, Transpose(W))``. ONNX Runtime then folds ``Transpose(W)`` into a second initializer at
session start (which MLAS prepacks): at GPT-2 124M, 147 MiB more resident memory than the weights, for the same
numbers.

:func:`share_tied_embedding` stores the transpose instead, once, as ``WT`` (1, C, vocab), and points both readers at
it: the LM head is ``MatMul(h, WT)`` (ONNX Runtime flattens the leading 1 and runs one GEMM over the batch; a 3-D
weight is not prepacked, so no copy is made; with logits_to_keep the head runs on one row, where MLAS's
single-row kernel reads ``WT`` as stored), and the embedding is ``Gather(WT, ids, axis=2)`` (1, C, *ids) moved to
(*ids, C) by a Transpose and a Squeeze (C strided reads per token, microseconds). Standard ONNX ops only, so
TensorRT and other runtimes read it too; :mod:`export.validate` checks it against PyTorch like any export.

The alternatives, measured at GPT-2 124M fp32 with external data (``python -m bench.ort_memory FILE [--prepack
off]``: peak RSS over a 512-token prefill and 16 decode steps, 2 threads, ORT 1.32):

    graph                                           prepacking on   prepacking off
    exporter's Gather(W) + MatMul(Transpose(W))     834 MiB         846 MiB
    Gather(W) + Gemm(transB=1) over a 2-D view      845 MiB         698 MiB
    this module: (1, C, vocab) for both             698 MiB         698 MiB

A 2-D weight is prepacked into a second buffer beside the one the Gather reads, whatever the graph says; only
turning prepacking off for the whole session avoids that for a Gemm, and that slows the int4 decode several times
(:mod:`export.ort_session`). A 3-D weight is not prepacked, so this form keeps one copy with prepacking on.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import onnx
    import onnx_ir as ir


def _tied_pair(graph: ir.Graph) -> Optional[tuple[ir.Value, list[ir.Node], list[ir.Node], list[ir.Node]]]:
    """(W, its axis-0 Gathers, its [1, 0] Transposes, the MatMuls reading those as their weight), or None when the
    graph has no such tied weight (untied heads, quantized files, an already rewritten graph)."""
    for value in graph.initializers.values():
        if value.shape is None or len(value.shape) != 2 or value.const_value is None:
            continue
        gathers, transposes, matmuls = [], [], []
        for node, index in value.uses():
            axis = node.attributes.get("axis")
            perm = node.attributes.get("perm")
            if node.domain != "":
                break
            if node.op_type == "Gather" and index == 0 and (axis is None or axis.as_int() == 0):
                gathers.append(node)
            elif node.op_type == "Transpose" and perm is not None and list(perm.as_ints()) == [1, 0]:
                transposes.append(node)
            else:
                break
        else:
            for t in transposes:
                for node, index in t.outputs[0].uses():
                    a = node.inputs[0].shape if node.inputs[0] is not None else None
                    if node.op_type != "MatMul" or node.domain != "" or index != 1 or a is None or len(a) < 3:
                        break  # the flattening rule needs a 3-D+ activation (a 2-D one would gain a batch axis)
                    matmuls.append(node)
                else:
                    continue
                break
            else:
                if gathers and matmuls:
                    return value, gathers, transposes, matmuls
    return None


def share_tied_embedding(model: ir.Model) -> bool:
    """Rewrite `model` in place so that the tied embedding / LM head is stored once (see the module docstring).
    Returns True when it rewrote a tied pair, False when the graph has none."""
    import numpy as np
    import onnx_ir as ir

    graph = model.graph
    found = _tied_pair(graph)
    if found is None:
        return False
    weight, gathers, transposes, matmuls = found
    assert weight.const_value is not None and weight.shape is not None
    stored = np.ascontiguousarray(weight.const_value.numpy().T)[None]  # (1, C, vocab)
    dim, vocab = stored.shape[1:]
    name = f"{weight.name}.transposed"
    shared = ir.Value(name=name, shape=ir.Shape([1, dim, vocab]), type=weight.type,
                      const_value=ir.tensor(stored, name=name))
    graph.register_initializer(shared)
    for mm in matmuls:
        mm.replace_input_with(1, shared)
    for t in transposes:
        graph.remove(t, safe=True)
    for g in gathers:
        ids = g.inputs[1]
        assert ids is not None
        rank = len(ids.shape) if ids.shape is not None else None
        if rank is None:
            raise ValueError(f"the embedding Gather {g.name!r} has indices of unknown rank")
        base = g.name or "embedding"
        picked = ir.node("Gather", [shared, ids], {"axis": 2}, name=f"{base}/tied_gather")  # (1, C, *ids)
        moved = ir.node("Transpose", [picked.outputs[0]], {"perm": [0, *range(2, rank + 2), 1]},
                        name=f"{base}/tied_transpose")  # (1, *ids, C)
        axes = ir.Value(name=f"{base}/tied_axes", shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.INT64),
                        const_value=ir.tensor(np.array([0], dtype=np.int64), name=f"{base}/tied_axes"))
        graph.register_initializer(axes)
        squeezed = ir.node("Squeeze", [moved.outputs[0], axes], name=f"{base}/tied_squeeze")  # (*ids, C)
        out = g.outputs[0]
        squeezed.outputs[0].shape, squeezed.outputs[0].type = out.shape, out.type
        graph.insert_before(g, [picked, moved, squeezed])
        ir.convenience.replace_all_uses_with(out, squeezed.outputs[0])
        if out.is_graph_output():
            raise ValueError(f"the embedding Gather {g.name!r} feeds a graph output directly")
        graph.remove(g, safe=True)
    graph.initializers.pop(weight.name)  # type: ignore[arg-type]
    return True


def _shared_form(graph: ir.Graph) -> Optional[tuple[ir.Value, list[ir.Node], list[tuple[ir.Node, ir.Node, ir.Node]]]]:
    """(WT, the MatMuls reading it, the (Gather, Transpose, Squeeze) embedding lookups) of a graph that
    :func:`share_tied_embedding` rewrote, or None."""
    for value in graph.initializers.values():
        if value.shape is None or len(value.shape) != 3 or value.shape[0] != 1 or value.const_value is None:
            continue
        matmuls, lookups = [], []
        for node, index in value.uses():
            if node.op_type == "MatMul" and index == 1:
                matmuls.append(node)
                continue
            axis = node.attributes.get("axis")
            if node.op_type != "Gather" or index != 0 or axis is None or axis.as_int() != 2:
                break
            nxt = [u for u, _ in node.outputs[0].uses()]
            if len(nxt) != 1 or nxt[0].op_type != "Transpose":
                break
            last = [u for u, _ in nxt[0].outputs[0].uses()]
            if len(last) != 1 or last[0].op_type != "Squeeze":
                break
            lookups.append((node, nxt[0], last[0]))
        else:
            if matmuls and lookups:
                return value, matmuls, lookups
    return None


def untie_embedding(model: ir.Model) -> bool:
    """Undo :func:`share_tied_embedding` in place: ``W`` (vocab, C) read by ``Gather(W, ids)`` and by the LM head
    through ``Transpose(W)``, the form ONNX Runtime's quantization tools know (they quantize a 2-D MatMul weight and
    a row-wise embedding, and the embedding then reads one row per token). Returns True when it rewrote the graph."""
    import numpy as np
    import onnx_ir as ir

    graph = model.graph
    found = _shared_form(graph)
    if found is None:
        return False
    shared, matmuls, lookups = found
    assert shared.const_value is not None and shared.name is not None
    name = shared.name.removesuffix(".transposed")
    weight_np = np.ascontiguousarray(shared.const_value.numpy()[0].T)  # (vocab, C)
    weight = ir.Value(name=name, shape=ir.Shape(list(weight_np.shape)), type=shared.type,
                      const_value=ir.tensor(weight_np, name=name))
    graph.register_initializer(weight)
    for gather, transpose, squeeze in lookups:
        ids = gather.inputs[1]
        assert ids is not None
        lookup = ir.node("Gather", [weight, ids], {"axis": 0}, name=(gather.name or "embedding").removesuffix(
            "/tied_gather"))
        out = squeeze.outputs[0]
        lookup.outputs[0].shape, lookup.outputs[0].type = out.shape, out.type
        graph.insert_before(gather, lookup)
        ir.convenience.replace_all_uses_with(out, lookup.outputs[0])
        axes = squeeze.inputs[1]
        for node in (squeeze, transpose, gather):
            graph.remove(node, safe=True)
        if axes is not None and axes.is_initializer() and not axes.uses() and axes.name:
            graph.initializers.pop(axes.name)
    head = ir.node("Transpose", [weight], {"perm": [1, 0]}, name=f"{name}/lm_head_transpose")
    graph.insert_before(matmuls[0], head)
    for mm in matmuls:
        mm.replace_input_with(1, head.outputs[0])
    graph.initializers.pop(shared.name)
    return True


def untied_proto(model: onnx.ModelProto) -> onnx.ModelProto:
    """The input ONNX Runtime's quantization tools expect: `model` itself when it stores no shared tied embedding,
    else an untied copy (the form :func:`untie_embedding` gives). Weights `model` holds in memory stay there: pass
    the result to their `quant_pre_process` as a ModelProto (it loses external data that lies beside a path)."""
    import onnx_ir as ir

    wrapped = ir.from_proto(model)  # wraps the proto's tensors, no copy
    if not untie_embedding(wrapped):
        return model
    return ir.to_proto(wrapped)
