"""export.tied_weights: the export stores a tied embedding / LM head once, as (1, C, vocab), read by the LM head's
MatMul and by the embedding's Gather along axis 2; untie_embedding gives back the exporter's own form (what
ONNX Runtime's quantizers expect) with the same logits."""
import numpy as np
import onnx
import onnx_ir as ir
import pytest

from export.onnx_runtime import OnnxDecoder
from export.tied_weights import share_tied_embedding, untie_embedding, untied_proto


def _vocab_initializers(model: onnx.ModelProto, vocab: int) -> list[onnx.TensorProto]:
    return [i for i in model.graph.initializer if vocab in i.dims]


def _consumers(model: onnx.ModelProto, name: str) -> list[str]:
    return sorted(n.op_type for n in model.graph.node if name in n.input)


@pytest.mark.slow
def test_export_stores_the_tied_embedding_once(onnx_export, tiny_model):
    cfg = tiny_model[0].config
    assert cfg.tie_embeddings
    model = onnx.load(str(onnx_export[0]))
    (stored,) = _vocab_initializers(model, cfg.vocab_size)
    assert list(stored.dims) == [1, cfg.n_embd, cfg.vocab_size]
    assert _consumers(model, stored.name) == ["Gather", "MatMul"]
    wte = tiny_model[0].wte.weight.detach().numpy()  # the stored matrix is the embedding, transposed
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(stored)[0], wte.T)


@pytest.mark.slow
def test_untie_gives_the_exporters_form_and_the_same_logits(onnx_export, decoder, tiny_model, tmp_path):
    cfg = tiny_model[0].config
    model = untied_proto(onnx.load(str(onnx_export[0])))
    untied = tmp_path / "untied.onnx"
    onnx.save(model, str(untied))
    (weight,) = _vocab_initializers(model, cfg.vocab_size)
    assert list(weight.dims) == [cfg.vocab_size, cfg.n_embd]
    assert _consumers(model, weight.name) == ["Gather", "Transpose"]
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9))
    other = OnnxDecoder(untied, threads=1)
    np.testing.assert_allclose(other.forward(ids)[0], decoder.forward(ids)[0], rtol=1e-6, atol=1e-6)
    assert untied_proto(model) is model  # nothing to undo: the model itself

    # and back: sharing the untied graph gives the export's graph again
    shared = ir.load(str(untied))
    assert share_tied_embedding(shared) and not share_tied_embedding(shared)
    assert not untie_embedding(ir.load(str(untied)))
    back = ir.to_proto(shared)
    assert sorted(n.op_type for n in back.graph.node) == sorted(
        n.op_type for n in onnx.load(str(onnx_export[0])).graph.node)
