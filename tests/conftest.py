import os
import secrets
import shutil
import tempfile

# Tests never read or write state outside the checkout and the temp folder: every cache a library keeps in the
# home folder points at a folder of this session, removed at its end. A warm Triton cache in ~/.triton once hid a
# compile error (the compiler never ran). Set before torch, triton or transformers are imported; subprocesses
# started by tests inherit these.
_CACHE_ROOT = tempfile.mkdtemp(prefix="hotpath-test-caches-")
for _var, _sub in (("TRITON_CACHE_DIR", "triton"), ("TRITON_HOME", "triton-home"),
                   ("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("HF_HOME", "huggingface"),
                   ("XDG_CACHE_HOME", "xdg"), ("MPLCONFIGDIR", "matplotlib")):
    os.environ[_var] = os.path.join(_CACHE_ROOT, _sub)
os.environ["HF_HUB_OFFLINE"] = "1"  # no hub downloads, ever
# Ray's local test cluster authenticates with this session's token instead of creating ~/.ray/auth_token
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(16)

# Without a GPU, run hotpath's Triton kernels in Triton's interpreter; must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import TINY_CORPUS_BYTES  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE_ROOT, ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_flush_denormal_leak():
    """A CLI `main` run in-process under common.cli.run turns on flush-to-zero for the whole process; undo it after
    each test so it cannot leak into the next (hypothesis refuses to generate floats under FTZ)."""
    yield
    torch.set_flush_denormal(False)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A `tiny` checkpoint trained for a few seconds on the built-in corpus; shared by the whole session."""
    from model.train import main

    out = tmp_path_factory.mktemp("tiny") / "ckpt.pt"
    main(["--preset", "tiny", "--steps", "80", "--eval-every", "80", "--corpus-bytes", str(TINY_CORPUS_BYTES),
          "--vocab-size", "512", "--batch-size", "16", "--out", str(out), "--quiet"])
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    from model import load_checkpoint

    return load_checkpoint(tiny_ckpt)


@pytest.fixture(scope="session")
def tiny_onnx(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint's generic export (fp32, KV-cache decoder, standard ONNX ops), made once per session through
    `python -m export.to_onnx`'s main(), validated against PyTorch; the export report (JSON) lies beside it as
    tiny.json. Every package's ONNX tests use this one file (exporting takes seconds)."""
    from export.to_onnx import main

    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    assert main([str(tiny_ckpt), "--out", str(out), "--target", "generic",
                 "--json", str(out.with_suffix(".json"))]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_ort_onnx(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint's ort-target export (the CLI's default: GroupQueryAttention, a cache shared between past and
    present, FastGelu), made once per session through `python -m export.to_onnx`'s main()
    and validated; its report lies beside it as tiny.ort.json."""
    from export.to_onnx import main

    out = tmp_path_factory.mktemp("onnx_ort") / "tiny.ort.onnx"
    assert main([str(tiny_ckpt), "--out", str(out), "--json", str(out.with_suffix(".json"))]) == 0
    return out
