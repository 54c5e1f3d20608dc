"""genai_config.json beside every KV-cache export: ONNX Runtime GenAI's format, the graph's real I/O names, written
whole, and run by GenAI's own Generator when onnxruntime_genai is installed."""
import json
import pathlib
import shutil

import onnx
import pytest

from common.files import OUTPUT_MODE
from export.genai_config import FILENAME, write_genai_config
from export.onnx_meta import LOGITS_TO_KEEP

from tests.helpers import genai_greedy

pytestmark = pytest.mark.slow  # every test needs an ONNX export


def _expand(pattern, layers):
    return [pattern % i for i in range(layers)]


def test_names_and_shape_match_the_graph(onnx_export, tiny_model):
    path, report = onnx_export
    cfg_path = path.with_name(FILENAME)
    assert report["genai_config"] == str(cfg_path)
    assert cfg_path.stat().st_mode & 0o777 == OUTPUT_MODE
    config = json.loads(cfg_path.read_text())
    model, tokenizer, _ = tiny_model
    m, dec = config["model"], config["model"]["decoder"]
    assert dec["filename"] == path.name
    c = model.config
    assert (m["context_length"], m["vocab_size"]) == (c.block_size, c.vocab_size)
    assert (dec["num_hidden_layers"], dec["num_attention_heads"], dec["num_key_value_heads"], dec["head_size"],
            dec["hidden_size"]) == (c.n_layer, c.n_head, c.n_kv_head, c.head_dim, c.n_embd)
    assert m["eos_token_id"] == tokenizer.token_to_id("<|endoftext|>")
    assert config["search"]["max_length"] == c.block_size and config["search"]["do_sample"] is False
    graph = onnx.load(str(path), load_external_data=False).graph
    ins, outs = dec["inputs"], dec["outputs"]
    named_in = [ins["input_ids"], ins["attention_mask"], ins["position_ids"]]
    named_in += [n for k, v in zip(_expand(ins["past_key_names"], c.n_layer), _expand(ins["past_value_names"],
                                                                                          c.n_layer)) for n in (k, v)]
    named_out = [outs["logits"]]
    named_out += [n for k, v in zip(_expand(outs["present_key_names"], c.n_layer),
                                    _expand(outs["present_value_names"], c.n_layer)) for n in (k, v)]
    # logits_to_keep has a default (an initializer of the same name): GenAI does not feed it and gets every position
    assert named_in == [i.name for i in graph.input if i.name != LOGITS_TO_KEEP]
    assert LOGITS_TO_KEEP in {t.name for t in graph.initializer}
    assert named_out == [o.name for o in graph.output]


def test_written_whole_or_not_at_all(onnx_export, tmp_path, monkeypatch):
    """A write that dies half-way leaves the previous genai_config.json as it was, and no temporary file."""
    src = onnx_export[0]
    model = tmp_path / src.name
    shutil.copy(src, model)
    old = tmp_path / FILENAME
    old.write_text('{"old": true}\n')
    real_write_text = pathlib.Path.write_text

    def dies_half_way(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(pathlib.Path, "write_text", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        write_genai_config(model)
    monkeypatch.undo()
    assert old.read_text() == '{"old": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, FILENAME])
    assert write_genai_config(model) == old and json.loads(old.read_text())["model"]["decoder"]["filename"] == src.name


def test_onnxruntime_genai_generator_runs_the_export(onnx_export, tiny_model, tmp_path):
    """GenAI's own Generator, on the folder as export wrote it: the same greedy tokens as model.generate."""
    pytest.importorskip("onnxruntime_genai")
    from model.generate import generate

    model, tokenizer, _ = tiny_model
    path = onnx_export[0]
    for f in (path, path.with_name(FILENAME)):  # just the model and its config: nothing else helps GenAI
        shutil.copy(f, tmp_path / f.name)
    prompt = tokenizer.encode("def main():\n    return").ids
    assert genai_greedy(tmp_path, prompt, 16) == generate(model, prompt, 16)


def test_onnxruntime_genai_runs_the_ort_export_with_a_shared_buffer(tiny_ort_onnx, tiny_model, tmp_path):
    """The ort-target export's config says past_present_share_buffer (GroupQueryAttention writes into GenAI's
    max-length buffer), and GenAI's Generator gives the same greedy tokens as model.generate."""
    config = json.loads(tiny_ort_onnx.with_name(FILENAME).read_text())
    assert config["search"]["past_present_share_buffer"] is True
    pytest.importorskip("onnxruntime_genai")
    from model.generate import generate

    model, tokenizer, _ = tiny_model
    for f in (tiny_ort_onnx, tiny_ort_onnx.with_name(FILENAME)):
        shutil.copy(f, tmp_path / f.name)
    prompt = tokenizer.encode("def main():\n    return").ids
    assert genai_greedy(tmp_path, prompt, 16) == generate(model, prompt, 16)
