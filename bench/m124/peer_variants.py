"""The peers' rows of the 124M table: each peer's own converter run on the same weights, the way its docs say, in
the peers' environment (`make bench-peers`). A converter that fails, or a peer that is not installed, becomes a row
with the reason; the run goes on.

- CTranslate2 float32 / int8: `ct2-transformers-converter --quantization ...` on the transformers folder;
- onnxruntime-genai fp32 / int4: hotpath's own model.onnx and model.int4-weight.onnx, each in a folder with the
  `genai_config.json` hotpath writes (`export.genai_config`), its session threads set there;
- Optimum: `optimum-cli export onnx --task text-generation-with-past`, run by `ORTModelForCausalLM`;
- llama.cpp F32 / Q8_0: `convert_hf_to_gguf.py` from the llama.cpp tree vendored in the llama-cpp-python sdist
  (see `gguf_convert` for the tokenizer); Q4_0: llama.cpp's own quantizer (`llama_model_quantize`) on the F32 file;
- transformers eager fp32: the folder itself.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Callable, Optional, Sequence

from .model import M124, is_stale
from .rounds import Variant
from .variants import prepared

PEER_PACKAGES = {"transformers": "transformers", "ctranslate2": "ctranslate2", "onnxruntime_genai": "onnxruntime-genai",
                 "optimum.onnxruntime": "optimum-onnx", "llama_cpp": "llama-cpp-python"}


def install_failures() -> dict[str, str]:
    """{pip requirement: reason} from bench/peers_install.py's record in this environment."""
    record = Path(sys.prefix) / "peers-install.json"
    if not record.exists():
        return {}
    return {k: v for k, v in json.loads(record.read_text()).items() if v}


def need(module: str) -> None:
    """Raise with the install failure's reason (or 'not installed') when a peer's package cannot be imported."""
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if found:
        return
    dist = PEER_PACKAGES.get(module, module)
    reason = next((v for k, v in install_failures().items() if k.startswith(dist)), None)
    raise RuntimeError(reason or f"{dist} is not installed (run make bench-peers, which installs the peers extra)")


def _tool(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _run(argv: list[str], progress: Callable[[str], None], env: Optional[dict] = None) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()] or ["no output"]
        raise RuntimeError(f"{Path(argv[0]).name} {' '.join(argv[1:3])} failed: {lines[-1][:300]}")
    shown = ["-c ..." if a.startswith("import ") else a for a in argv[1:4]]  # not the inline script's lines
    progress(f"ran {Path(argv[0]).name} {' '.join(shown)}")


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _made(out: Path, make: Callable[[Path], None], sources: Sequence[Path] = ()) -> Path:
    """`out` made once: written by `make(tmp)` under a temporary name, then renamed (a second run reuses it unless
    one of `sources` is newer)."""
    if not is_stale(out, list(sources)):
        return out
    _remove(out)
    tmp = out.with_name(out.name + ".tmp")
    _remove(tmp)
    make(tmp)
    tmp.rename(out)
    return out


class PeerFiles:
    def __init__(self, m: M124, progress: Callable[[str], None], threads: int):
        self.m, self.progress, self.threads = m, progress, threads
        self.work = m.folder / "peers"
        self.work.mkdir(parents=True, exist_ok=True)

    def ct2(self, quantization: str) -> str:
        need("ctranslate2")
        return str(_made(self.work / f"ct2-{quantization}", lambda tmp: _run(
            [_tool("ct2-transformers-converter"), "--model", str(self.m.hf), "--output_dir", str(tmp),
             "--quantization", quantization, "--copy_files", "tokenizer.json"], self.progress)))

    def optimum(self) -> str:
        need("optimum.onnxruntime")
        return str(_made(self.work / "optimum", lambda tmp: _run(
            [_tool("optimum-cli"), "export", "onnx", "--model", str(self.m.hf), "--task",
             "text-generation-with-past", str(tmp)], self.progress)))

    def genai(self, mode: Optional[str]) -> str:
        need("onnxruntime_genai")
        src = self.m.onnx(mode)

        def make(tmp: Path) -> None:
            from export.genai_config import config_path, write_genai_config

            tmp.mkdir()
            # copies, not hard links: onnx refuses to load external data that has several links (a "hardlink
            # attack"), which broke quantizing the shared model.onnx after this ran
            shutil.copyfile(src, tmp / "model.onnx")  # the same file, beside its own genai_config.json
            if Path(str(src) + ".data").exists():
                shutil.copyfile(str(src) + ".data", tmp / f"{src.name}.data")
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(self.m.hf / name, tmp / name)
            if write_genai_config(tmp / "model.onnx") is None:
                raise RuntimeError(f"export.genai_config wrote no genai_config.json for {src.name}")
            path = config_path(tmp / "model.onnx")
            cfg = json.loads(path.read_text())
            cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = self.threads
            path.write_text(json.dumps(cfg, indent=2) + "\n")

        return str(_made(self.work / f"genai-{mode or 'fp32'}", make, sources=[src]))

    def llama_cpp_source(self) -> Path:
        """convert_hf_to_gguf.py and gguf-py from the llama-cpp-python sdist of the installed version."""
        need("llama_cpp")
        from importlib.metadata import version

        ver = version("llama-cpp-python")

        def make(tmp: Path) -> None:
            sdist = self.work / "sdist"
            _run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={ver}", "--no-deps", "--no-binary",
                  ":all:", "-d", str(sdist)], self.progress)
            [archive] = sorted(sdist.glob(f"llama_cpp_python-{ver}.tar.gz"))
            with tarfile.open(archive) as tar:
                # the script, its `conversion` package (newer trees) and gguf-py, the version it was written for
                keep = [t for t in tar.getmembers() if "/vendor/llama.cpp/" in t.name and (
                    t.name.endswith("/convert_hf_to_gguf.py") and t.name.count("/") == 3
                    or "/vendor/llama.cpp/gguf-py/" in t.name or "/vendor/llama.cpp/conversion/" in t.name)]
                tar.extractall(tmp, members=keep, filter="data")
            [script] = list(tmp.rglob("convert_hf_to_gguf.py"))
            top = script.relative_to(tmp).parts[0]
            for child in list(script.parent.iterdir()):
                shutil.move(str(child), tmp / child.name)
            shutil.rmtree(tmp / top)

        return _made(self.work / f"llama.cpp-{ver}-converter", make)

    def gguf(self, kind: str) -> str:
        src = self.llama_cpp_source()
        if kind == "q4_0":
            f32 = Path(self.gguf("f32"))
            code = ("import ctypes, sys, llama_cpp as L\np = L.llama_model_quantize_default_params()\n"
                    "p.ftype = L.LLAMA_FTYPE_MOSTLY_Q4_0\np.nthread = int(sys.argv[3])\n"
                    "sys.exit(L.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))")
            return str(_made(self.work / "model-q4_0.gguf", lambda tmp: _run(
                [sys.executable, "-c", code, str(f32), str(tmp), str(self.threads)], self.progress)))
        return str(_made(self.work / f"model-{kind}.gguf", lambda tmp: _run(
            [sys.executable, "-m", "bench.m124.gguf_convert", str(src), str(self.m.hf), str(tmp), kind],
            self.progress)))

    def transformers(self) -> str:
        need("transformers")
        return str(self.m.hf)


def peer_variants(m: M124, progress: Callable[[str], None], threads: int) -> list[Variant]:
    f = PeerFiles(m, progress, threads)
    table: tuple[tuple[str, str, str, Callable[[], str], dict], ...] = (
        ("transformers eager fp32", "transformers_eager", "fp32", f.transformers, {}),
        ("Optimum ONNX + ORT fp32", "transformers_eager", "fp32", f.optimum, {"ort": True}),
        ("onnxruntime-genai fp32", "genai", "fp32", lambda: f.genai(None), {}),
        ("onnxruntime-genai int4", "genai", "int4", lambda: f.genai("int4-weight"), {}),
        ("CTranslate2 float32", "ctranslate2_generator", "fp32", lambda: f.ct2("float32"), {}),
        ("CTranslate2 int8", "ctranslate2_generator", "int8", lambda: f.ct2("int8"), {}),
        ("llama.cpp F32", "llamacpp", "fp32", lambda: f.gguf("f32"), {}),
        ("llama.cpp Q8_0", "llamacpp", "int8", lambda: f.gguf("q8_0"), {}),
        ("llama.cpp Q4_0", "llamacpp", "int4", lambda: f.gguf("q4_0"), {}),
    )
    out = []
    for name, runner, precision, make, extra in table:
        v = prepared(name, runner, precision, make, sys.executable, kind="peer")
        v.options.update(extra)
        progress(f"{name}: {'ready' if not v.error else v.error}")
        out.append(v)
    return out
