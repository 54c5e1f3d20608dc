"""Checks an `.onnx` file before anything reads its weights: the one gate every hotpath command that loads ONNX
passes through (:func:`export.ort_session.open_session`, :func:`export.onnx_meta.read_metadata_props`, quantize's
loader).

An ONNX file may keep its weights in "external data": each such tensor names a ``location`` (a file path relative
to the model's folder), an ``offset`` and a ``length``. A hostile file can point that location anywhere
(``../../etc/passwd``, ``/etc/shadow``, a symlink to a file elsewhere) and have its bytes read into a tensor, then
served or written out. Recent onnx and ONNX Runtime refuse such paths too, each with its own message and rules;
this check makes the rule hotpath's own, version-independent, and the error one line naming the file, the tensor
and the location.

The rule: the graph parses (read with ``load_external_data=False``, so no weight is read), and every tensor with
``data_location == EXTERNAL`` (initializers, sparse initializers, Constant and other attribute tensors, in
subgraphs and functions too) has a relative location that resolves (``os.path.realpath``, following symlinks)
to a regular file inside the model's folder, with ``offset + length`` inside that file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from common.errors import UserError

if TYPE_CHECKING:
    import onnx

REEXPORT = "export a checkpoint with python -m export.to_onnx"


def load_graph(path: str | os.PathLike) -> onnx.ModelProto:
    """The graph of an .onnx file, weights kept external (not read); a missing, cut or foreign file is a
    one-line UserError."""
    import onnx

    path = Path(os.fspath(path))
    if not path.exists():
        raise UserError(f"ONNX model {path} does not exist (check the path)")
    if not path.is_file():
        raise UserError(f"ONNX model {path} is not a file (pass the .onnx file)")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends for a cut or foreign file
        raise UserError(f"{path} is not a hotpath export (truncated or not an ONNX model: {type(e).__name__}; "
                        f"{REEXPORT})") from e


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:  # Constant's value, ConstantOfShape's value, any TENSOR(S) attribute
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield attr.sparse_tensor.values
            yield attr.sparse_tensor.indices
        if attr.HasField("g"):  # If / Loop / Scan bodies
            yield from _graph_tensors(attr.g)
        for sub in attr.graphs:
            yield from _graph_tensors(sub)


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto a model holds: graph, subgraphs, node attributes, local functions."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def check_external_data(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Refuse (UserError, one line) any external-data tensor of `model` (read from `path`) whose location is
    absolute, escapes the model's folder (``..``, or a symlink to a file elsewhere), is missing, or is shorter
    than its offset + length."""
    import onnx

    path = Path(os.fspath(path))
    folder = os.path.realpath(path.parent)
    for tensor in all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")

        def refuse(why: str) -> UserError:
            return UserError(f"{path}: tensor {tensor.name!r} has external data at {location!r}, which {why} "
                             f"(only load ONNX files you trust; {REEXPORT} to get one whose weights lie beside it)")

        if not location or "\0" in location:
            raise refuse("is not a file name")
        if os.path.isabs(location) or location.startswith(("/", "\\")):
            raise refuse("is an absolute path; external data must lie in the model's folder")
        resolved = os.path.realpath(os.path.join(path.parent, location))
        if os.path.commonpath([folder, resolved]) != folder:
            raise refuse(f"resolves to {resolved}, outside the model's folder {folder}")
        if not os.path.isfile(resolved):
            raise refuse("does not exist beside the model")
        try:
            offset, length = int(info.get("offset", "0")), int(info.get("length", "-1"))
        except ValueError:
            raise refuse(f"has a non-integer offset or length ({info.get('offset')!r}, "
                         f"{info.get('length')!r})") from None
        size = os.path.getsize(resolved)
        if offset < 0 or offset > size or (length >= 0 and offset + length > size):
            raise refuse(f"is {size} bytes, too short for offset {offset} + length {length} (truncated?)")


def check_onnx_file(path: str | os.PathLike) -> onnx.ModelProto:
    """:func:`load_graph` then :func:`check_external_data`: the graph (weights not read) of a file safe to hand to
    onnx.load or ONNX Runtime."""
    model = load_graph(path)
    check_external_data(model, path)
    return model
