import os

# Without a GPU, run hotpath's Triton kernels in Triton's interpreter; must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_CORPUS_BYTES = 400_000


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


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
