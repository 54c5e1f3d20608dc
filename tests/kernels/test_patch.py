"""kernels.patch / unpatch / patched on the reference GPT and on Hugging Face models; convergence of the tiny
model with patch() + FusedAdamW against the eager reference with torch.optim.AdamW.

All kernels run in Triton's interpreter on CPU (TRITON_INTERPRET=1 from tests/kernels/conftest.py).
"""
import copy
import importlib
import os
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")  # normally set by tests/kernels/conftest.py

import pytest
import torch
from torch import nn

import kernels
from model.gpt import GPT, GPTConfig
from tests.tolerances import assert_close_fp32

P = importlib.import_module("kernels.patch")  # the module (`kernels.patch` is the function)


def _gen(key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _tiny(seed=0, **overrides):
    """The tiny preset with a 128-token vocabulary and 2 heads: the interpreter's cost is per program and per
    tensor, so this keeps the 30-step convergence run affordable on 2 cores."""
    torch.manual_seed(seed)
    return GPT(GPTConfig.preset("tiny", **{"vocab_size": 128, "n_head": 2, **overrides}))


def _ids(model, B, T, key):
    return torch.randint(0, model.config.vocab_size, (B, T), generator=_gen(key))


def _attn_modules(model):
    return [m for m in model.modules() if "attn_fn" in m.__dict__]


@pytest.fixture
def counting_attention(monkeypatch):
    """Count calls that reach kernels.attention through patch()."""
    calls = []
    real = P.attention

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(P, "attention", counted)
    return calls


# ---------------------------------------------------------------------------------------------------------------
# Reference model: the attn_fn hook
# ---------------------------------------------------------------------------------------------------------------
def test_patch_is_instance_scoped_reversible_and_keeps_the_state_dict(counting_attention):
    model, other = _tiny(), _tiny()
    originals = [m.attn_fn for m in _attn_modules(model)]
    class_attrs = {k: v for k, v in vars(type(_attn_modules(model)[0])).items()}
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _ids(model, 2, 19, "scope")
    want = model(ids)

    assert kernels.patch(model) is model
    kernels.patch(model)  # idempotent: no double wrapping
    assert all(isinstance(m.attn_fn, P.KernelAttnFn) and m.attn_fn.original is o
               for m, o in zip(_attn_modules(model), originals))
    assert not any(isinstance(m.attn_fn, P.KernelAttnFn) for m in _attn_modules(other))  # other instance untouched
    assert vars(type(_attn_modules(model)[0])) == class_attrs  # no class changed
    assert list(model.state_dict()) == list(sd) and all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    assert P.is_patched(model) and not P.is_patched(other)
    got = model(ids)
    assert len(counting_attention) == model.config.n_layer
    assert_close_fp32(got, want)

    assert kernels.unpatch(model) is model
    assert [m.attn_fn for m in _attn_modules(model)] == originals and not P.is_patched(model)
    assert all("attn_fn" in m.__dict__ for m in _attn_modules(model))

    with kernels.patched(model) as m:
        assert m is model and P.is_patched(model)
    assert not P.is_patched(model)
    kernels.patch(model)
    with kernels.patched(model):  # already patched on entry: left patched on exit
        pass
    assert P.is_patched(model)
    kernels.unpatch(model)


def test_patched_model_forward_and_gradients_match():
    model = _tiny(pos="rope", n_head=4, n_kv_head=2)  # rotary + grouped-query attention
    ref = copy.deepcopy(model)
    ids = _ids(model, 2, 23, "grads")
    kernels.patch(model)
    for m in (model, ref):
        m(ids).float().square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close_fp32(p.grad, q.grad)


def test_attn_mask_falls_back_to_the_original_function(counting_attention):
    model = _tiny()
    ref = copy.deepcopy(model)
    ids = _ids(model, 2, 12, "mask")
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :5] = 0  # left padding
    kernels.patch(model)
    assert_close_fp32(model(ids, attention_mask=mask), ref(ids, attention_mask=mask))
    assert counting_attention == []  # masked attention never reached the kernel
    # KV-cache decode (T = 1, no mask) does use the kernel, bottom-right aligned
    logits, past = model(ids[:, :8], use_cache=True)
    ref_logits, ref_past = ref(ids[:, :8], use_cache=True)
    step, _ = model(ids[:, 8:9], past_key_values=past, use_cache=True)
    ref_step, _ = ref(ids[:, 8:9], past_key_values=ref_past, use_cache=True)
    assert_close_fp32(step, ref_step)
    assert len(counting_attention) == 2 * model.config.n_layer


def test_deepcopy_of_a_patched_model_is_patched_and_unpatches():
    model = kernels.patch(_tiny())
    twin = copy.deepcopy(model)
    assert P.is_patched(twin)
    kernels.unpatch(twin)
    assert not P.is_patched(twin) and P.is_patched(model)


# ---------------------------------------------------------------------------------------------------------------
# Same results through the functional API, the modules and patch()
# ---------------------------------------------------------------------------------------------------------------
class _ExplicitSoftmaxNet(nn.Module):
    """Attention written out with an nn.Softmax module (the 'explicit softmax' patch() also covers)."""

    def __init__(self):
        super().__init__()
        self.softmax = nn.Softmax(dim=-1)
        self.softmax_dim1 = nn.Softmax(dim=1)  # not over the last dim: keeps torch's softmax

    def forward(self, s):
        return self.softmax(s), self.softmax_dim1(s)


def test_functional_module_and_patch_agree():
    g = _gen("agree")
    s = torch.randn(2, 3, 7, 9, generator=g)
    functional = kernels.softmax(s)
    module = P.Softmax()(s)
    net = _ExplicitSoftmaxNet()
    want_last, want_dim1 = net(s)
    with kernels.patched(net):
        assert isinstance(net.softmax.__dict__.get("forward"), P._SoftmaxForward)
        patched_last, patched_dim1 = net(s)
    assert "forward" not in net.softmax.__dict__  # unpatched
    assert torch.equal(functional, module) and torch.equal(functional, patched_last)
    assert_close_fp32(patched_last, want_last)
    assert torch.equal(patched_dim1, want_dim1)
    # causal + scale through the module wrapper
    assert torch.equal(P.Softmax(scale=0.5, causal=True)(s), kernels.softmax(s, scale=0.5, causal=True))

    q, k, v = (torch.randn(1, 4, 6, 16, generator=g) for _ in range(3))
    a = kernels.attention(q, k, v, causal=True, scale=0.25)
    b = P.Attention(causal=True, scale=0.25)(q, k, v)
    c = P.KernelAttnFn(lambda *a, **k: None)(q, k, v, causal=True, attn_mask=None, scale=0.25)
    assert torch.equal(a, b) and torch.equal(a, c)


# ---------------------------------------------------------------------------------------------------------------
# Convergence: tiny model, 30 steps, patch() + FusedAdamW vs eager + torch.optim.AdamW
# ---------------------------------------------------------------------------------------------------------------
# Tolerances. Both runs do the same math in fp32 and differ only in rounding (the fused attention's online softmax
# and block-wise reductions vs SDPA, the optimizer's fused expressions), ~1e-7 relative per operation; observed
# here: per-step losses within ~2e-7 relative, parameters within ~2e-5. We allow 1e-5 relative on every step's
# loss (the loss falls by ~1.3 from ~4.9 over the run, 10^4 x the allowed gap) and 1e-4 absolute on the final
# parameters (the run moves them by up to lr x steps = 9e-2): a wrong mask, bias correction or weight decay shows
# up at the 1e-3..1e-2 level within a few steps. One exception, by the math: the key bias. Softmax is invariant
# to adding q.b_k to every score of a row, so its gradient is zero up to rounding, and Adam normalises that noise
# into updates of size ~lr whatever its magnitude: it is only held to lr x steps.
CONV_STEPS = 30
CONV_LR = 3e-3
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-4


def _groups(model):
    params = list(model.parameters())
    return [dict(params=[p for p in params if p.dim() >= 2], weight_decay=0.1),
            dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]


def _run(model, opt, batches):
    losses = []
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.slow  # ~30-50 s: 30 training steps with the attention and optimizer kernels in the interpreter
def test_convergence_patch_and_fused_adamw_track_the_reference():
    ref = _tiny(seed=1)
    fused_model = kernels.patch(copy.deepcopy(ref))
    g = _gen("convergence")
    data = torch.randint(0, 32, (CONV_STEPS, 2, 17), generator=g)  # a vocabulary slice: learnable fast
    batches = [(d[:, :-1], d[:, 1:]) for d in data]
    ref_losses = _run(ref, torch.optim.AdamW(_groups(ref), lr=CONV_LR, betas=(0.9, 0.95)), batches)
    fused_losses = _run(fused_model, kernels.FusedAdamW(_groups(fused_model), lr=CONV_LR, betas=(0.9, 0.95)), batches)
    assert ref_losses[-1] < ref_losses[0] - 0.5  # it learns
    for step, (a, b) in enumerate(zip(fused_losses, ref_losses)):
        assert abs(a - b) <= LOSS_RTOL * abs(b), f"step {step}: loss {a} vs reference {b}"
    kernels.unpatch(fused_model)
    for (name, p), q in zip(fused_model.named_parameters(), ref.parameters()):
        atol = CONV_LR * CONV_STEPS if name.endswith("k_proj.bias") else PARAM_ATOL
        torch.testing.assert_close(p, q, rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------------------------
# torch.compile, torch.export and ONNX on a patched model
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_torch_compile_patched_model():
    torch._dynamo.reset()
    model = _tiny()
    ref = copy.deepcopy(model)
    kernels.patch(model)
    ids = _ids(model, 1, 10, "compile")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(ids)
    out.float().square().mean().backward()
    ref_out = ref(ids)
    ref_out.float().square().mean().backward()
    assert_close_fp32(out, ref_out)
    assert_close_fp32(model.wte.weight.grad, ref.wte.weight.grad)


@pytest.mark.slow
def test_torch_export_and_onnx_of_a_patched_model(tmp_path):
    import onnxruntime as ort

    model = _tiny().eval()
    ref = copy.deepcopy(model)
    kernels.patch(model)
    ids = _ids(model, 2, 11, "export")
    ep = torch.export.export(model, (ids,))
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert torch.ops.hotpath.attention_fwd.default in targets
    assert_close_fp32(ep.module()(ids), ref(ids))

    prog = torch.onnx.export(model, (ids,), dynamo=True, custom_translation_table=kernels.onnx_translation_table(),
                             verbose=False)
    path = tmp_path / "patched.onnx"
    prog.save(str(path))
    assert not any(n.domain.startswith("hotpath") for n in prog.model_proto.graph.node)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})
    assert_close_fp32(torch.from_numpy(logits), ref(ids))


@pytest.mark.slow
def test_onnx_export_of_a_patched_explicit_softmax(tmp_path):
    import onnxruntime as ort

    net = kernels.patch(_ExplicitSoftmaxNet().eval())
    s = torch.randn(2, 5, 8, generator=_gen("onnx-softmax"))
    prog = torch.onnx.export(net, (s,), dynamo=True, custom_translation_table=kernels.onnx_translation_table(),
                             verbose=False)
    path = tmp_path / "softmax_net.onnx"
    prog.save(str(path))
    outs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"s": s.numpy()})
    assert_close_fp32(torch.from_numpy(outs[0]), torch.softmax(s.double(), -1))


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face transformers models (random, built here; no downloads)
# ---------------------------------------------------------------------------------------------------------------
def _hf_gpt2(config=None):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = config or GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                  attn_implementation="sdpa")
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval(), config


def _hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation="eager")
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_model_patch(arch, counting_attention):
    model = _hf_gpt2()[0] if arch == "gpt2" else _hf_llama()
    ref = copy.deepcopy(model)
    original_impl = model.config._attn_implementation
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 97, (2, 13), generator=_gen(arch))
    want = ref(ids).logits

    kernels.patch(model)
    assert model.config._attn_implementation == P.HF_ATTN_IMPLEMENTATION
    got = model(ids).logits
    assert len(counting_attention) == 2  # both layers ran the kernel
    assert_close_fp32(got, want)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items()) and list(model.state_dict()) == list(sd)
    # a padded batch gets a mask: falls back to the model's original attention, same numbers
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :4] = 0
    # (padded query rows are garbage and differ between eager and SDPA: compare the real tokens)
    real = mask.bool()
    assert_close_fp32(model(ids, attention_mask=mask).logits[real], ref(ids, attention_mask=mask).logits[real])
    assert len(counting_attention) == 2
    # gradients flow through the kernel
    model(ids).logits.square().mean().backward()
    ref(ids).logits.square().mean().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert_close_fp32(p.grad, q.grad)

    kernels.unpatch(model)
    assert model.config._attn_implementation == original_impl and not P.is_patched(model)
    assert_close_fp32(model(ids).logits, want)
    assert len(counting_attention) == 2 + 2  # (the backward pass ran the patched forward once more)


def test_hf_patch_leaves_models_sharing_the_config_alone():
    model, config = _hf_gpt2()
    other, _ = _hf_gpt2(config)  # built from the same config object: transformers shares it
    assert other.config is model.config
    kernels.patch(model)
    assert other.config._attn_implementation == "sdpa" and config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == P.HF_ATTN_IMPLEMENTATION
    kernels.unpatch(model)
    assert model.config is config
