"""fast_decode.py against the plain model files. fast(model): every fast path computes what nn.Linear computes
(fp32 within 1e-6 per product and identical greedy tokens; bf16 within bf16 rounding) and keeps names,
state_dict, tied weights, copies, saving, training and LoRA. weights="int8" / "int4": each product is the
product with the dequantized weights (within bf16 rounding of the activations), the quantized weights replace
the float ones, and a model loaded from its checkpoint (fast_decode.load) is the model quantized in memory.

    python -m pytest -q tests/test_fast_decode.py
"""

import copy
import inspect
import io
import json
import operator
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fast_decode  # noqa: E402
import finetune  # noqa: E402
import llama31  # noqa: E402
import lm2  # noqa: E402
import nanollm  # noqa: E402
import smollm2  # noqa: E402
from fast_decode import (A8W8Linear, FastLinear, Int4Linear, Int6Linear, Int8Linear, Sibling, Stack,  # noqa: E402
                         TiedEmbedding, dequantize_int4, fast, quantize_int4, quantize_int8)

MODELS = {"smollm2": smollm2, "llama31": llama31, "nanollm": nanollm, "lm2": lm2}
needs_onednn = pytest.mark.skipif(not fast_decode.BF16_ONEDNN, reason="this CPU has no oneDNN bf16 kernels: "
                                  "bf16 products stay with F.linear")
needs_int4 = pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"),
                                reason="this torch build has no CPU int4 kernel (_weight_int4pack_mm_for_cpu)")


pytestmark = pytest.mark.usefixtures("one_thread")  # unless a test asks for two (see fast_decode.decode_threads)


@pytest.fixture
def two_threads(one_thread):
    """Two threads, so that the fp32 one-row split runs (it needs more than one)."""
    torch.set_num_threads(2)


def model_class(mod):
    """The file's model class: the one with from_pretrained and generate."""
    return next(v for v in vars(mod).values() if isinstance(v, type) and issubclass(v, nn.Module)
                and hasattr(v, "from_pretrained") and hasattr(v, "generate"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny random HF checkpoint per file: Llama for smollm2, llama31 and lm2; DeepseekV3 for nanollm. Widths are
    multiples of 32, as real models' are, so that the int4 kernel takes most layers (nanollm's kv_a_proj, 40
    rows, takes int8) and the 6-bit one an int4 model's output head."""
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=160,
        vocab_size=320, max_position_embeddings=128, rope_theta=100000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2))
    dsv3 = DeepseekV3ForCausalLM(DeepseekV3Config(
        vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2, n_routed_experts=8,
        num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=32,
        qk_rope_head_dim=8, qk_nope_head_dim=24, v_head_dim=16, max_position_embeddings=64, eos_token_id=1,
        bos_token_id=0))
    paths = {}
    for name, hf in (("llama", llama), ("dsv3", dsv3)):
        with torch.no_grad():  # weights of O(1/sqrt(fan_in)), so every product matters to the logits
            for p in hf.parameters():
                p.copy_(torch.randn_like(p) / p.size(-1) ** 0.5 if p.dim() > 1 else 1 + 0.1 * torch.randn_like(p))
        paths[name] = tmp_path_factory.mktemp(name)
        hf.save_pretrained(paths[name])
    return {k: paths["dsv3" if k == "nanollm" else "llama"] for k in MODELS}


def routed_alike(ref: nn.Module, model: nn.Module, tokens: torch.Tensor):
    """Both models' logits on tokens (1, T), and where both routed each token alike: nanollm's MoE sends a token to
    its top experts, and a nearly tied router score may flip between two models' roundings and move that position's
    logits far, so their bounds hold where every layer chose the same experts for it (all positions elsewhere), at
    more than half of them."""
    routes = {ref: [], model: []}  # each layer's chosen experts per token
    hooks = [m.register_forward_hook(lambda _, args, out, key=key: routes[key].append(out[1].sort(-1).values))
             for key in routes for m in key.modules() if type(m).__name__ == "Gate"]
    try:
        with torch.no_grad():
            want, got = ref(tokens), model(tokens)
    finally:
        for h in hooks:
            h.remove()
    alike = torch.ones(tokens.shape[1], dtype=torch.bool)
    for a, b in zip(routes[ref], routes[model]):
        alike &= (a == b).all(-1)
    assert alike.float().mean() > 0.5
    return want, got, alike


def linear_kinds(model) -> dict:
    """{path: type} of every linear layer and stacked sibling, under each name it goes by (a tied head twice)."""
    return {n: type(m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, (nn.Linear, Sibling))}


def load(name, checkpoints, dtype=torch.float32):
    return model_class(MODELS[name]).from_pretrained(checkpoints[name], dtype=dtype)


# -----------------------------------------------------------------------------
# FastLinear: float weights, same parameters


@pytest.mark.parametrize("n", [2, 3])
def test_one_row_product_split_across_threads(n):
    """The fp32 decode path (one row, a block of output rows per thread, bmm) computes F.linear's product; other
    shapes, and an output width the threads do not divide, take F.linear itself."""
    torch.set_num_threads(n)
    layer = fast(nn.Sequential(nn.Linear(48, 96)))[0]
    odd = fast(nn.Sequential(nn.Linear(48, 97, bias=False)))[0]
    layer.split = odd.split = True  # (fast() sets it only where the split measured faster)
    with torch.no_grad():
        for x in (torch.randn(48), torch.randn(1, 1, 48), torch.randn(3, 5, 48)):  # split, split, plain
            y = layer(x)
            assert y.shape == x.shape[:-1] + (96,)
            torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=1e-6, atol=1e-6)
        x = torch.randn(1, 1, 48)
        assert torch.equal(odd(x), F.linear(x, odd.weight))


@pytest.mark.parametrize("slow", ["split", "F.linear"])
def test_fp32_split_is_set_where_it_measured_faster(slow, monkeypatch):
    """fast() on fp32 layers with more than one thread times F.linear and the split alternately on each weight
    shape's layers and sets `split` on that shape's layers where the split was faster (a clock that the routes
    advance, 1 s for the slow one, 1 ms for the other: on a busy machine a real one may rank them either way);
    with one thread nothing is timed."""
    torch.set_num_threads(2)
    now = [0.0]
    monkeypatch.setattr(fast_decode.time, "perf_counter", lambda: now[0])
    split, linear = FastLinear.split_product, F.linear

    def timed(route, fn):
        def run(*args):
            now[0] += 1.0 if route == slow else 1e-3
            return fn(*args)
        return run

    monkeypatch.setattr(FastLinear, "split_product", timed("split", split))
    monkeypatch.setattr(fast_decode.F, "linear", timed("F.linear", linear))
    layers = fast(nn.Sequential(nn.Linear(48, 96, bias=False), nn.Linear(48, 96, bias=False),
                                nn.Linear(96, 48, bias=False)))
    assert [m.split for m in layers] == [slow == "F.linear"] * 3
    torch.set_num_threads(1)
    assert not any(m.split for m in fast(layers))


@needs_onednn
def test_bf16_product_keeps_a_reordered_weight(monkeypatch):
    """The bf16 inference path (the weight reordered once into oneDNN's layout) computes F.linear's product, is
    remade when the weight changes, is not used with autograd on, for fp32 weights (autocast) or without memory
    for it, and stays out of copies of the module."""
    layer = fast(nn.Sequential(nn.Linear(64, 96, bias=False))).to(torch.bfloat16)[0]
    xs = [torch.randn(shape + (64,), dtype=torch.bfloat16) for shape in [(1,), (1, 1), (3, 5)]]
    bf16_close = lambda m, x: torch.testing.assert_close(m(x), F.linear(x, m.weight))  # noqa: E731 bf16 tolerances
    with torch.no_grad():
        for x in xs:
            bf16_close(layer, x)
        reordered = layer.reordered.weight
        assert reordered is not None and reordered.is_mkldnn
        layer.weight.mul_(-2)  # an in-place update
        bf16_close(layer, xs[2])
        assert layer.reordered.weight is not reordered
        reordered = layer.reordered.weight
        layer.load_state_dict({"weight": torch.randn(96, 64)})  # a copy into the same tensor
        bf16_close(layer, xs[2])
        assert layer.reordered.weight is not reordered
        layer.weight = nn.Parameter(torch.randn(96, 64, dtype=torch.bfloat16))  # a new tensor
        bf16_close(layer, xs[2])
    assert layer(xs[0]).requires_grad  # training takes F.linear
    clone = copy.deepcopy(layer)  # an mkldnn tensor held by the module itself would make this raise
    assert clone.reordered.weight is None
    torch.save(layer, io.BytesIO())  # so would saving the whole module
    fp32 = fast(nn.Sequential(nn.Linear(64, 96, bias=False)))[0]  # autocast evaluation: bf16 input, fp32 weights
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(fp32(xs[2]), F.linear(xs[2], fp32.weight))
        assert fp32.reordered.weight is None
    monkeypatch.setattr(fast_decode, "free_memory", lambda: 0)  # no room for a second copy: plain F.linear
    with torch.no_grad():
        bf16_close(clone, xs[1])
        assert clone.reordered.weight is None


def test_bf16_one_row_product_on_fast_decode_cpp():
    """A model that fast() finds in bf16 multiplies one row at a time (decoding) on fast_decode.cpp's bf16 product:
    F.linear's product in fp64 to float rounding, then rounded to bf16; more rows take oneDNN's reordered copy,
    autograd F.linear, and a layer whose width the kernel does not take (32 does not divide it) F.linear."""
    if not fast_decode.kernels():
        pytest.skip("fast_decode.cpp's kernels need an x86 CPU with AVX2 and a C++ compiler")
    torch.manual_seed(0)
    model = fast(nn.Sequential(nn.Linear(64, 96), nn.Linear(40, 96, bias=False)).to(torch.bfloat16))
    assert model[0].bf16_kernel and not model[1].bf16_kernel
    with torch.no_grad():
        for layer, k in ((model[0], 64), (model[1], 40)):
            for x in (torch.randn(k, dtype=torch.bfloat16), torch.randn(1, 1, k, dtype=torch.bfloat16)):
                bias = None if layer.bias is None else layer.bias.double()
                want = F.linear(x.double(), layer.weight.double(), bias).to(torch.bfloat16)
                torch.testing.assert_close(layer(x), want, rtol=2 ** -7, atol=1e-3)  # (one bf16 step)
                calls = product_calls(lambda: layer(x))
                assert calls == ({"fast_decode::bf16_linear": 1} if layer.bf16_kernel else {})
        assert product_calls(lambda: model[0](torch.randn(3, 64, dtype=torch.bfloat16))) == {}
    assert model[0](torch.randn(1, 64, dtype=torch.bfloat16)).requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_is_sdpa_for_one_query_row(dtype):
    """fast_decode.cpp's decode_attention (what compiled steps attend with) gives SDPA's output in fp64 to float
    rounding (bf16: to its own rounding of the output): one query row a head, grouped kv heads (enable_gqa), keys
    and values read strided from a longer cache (more slots than a block of exponentials, and a remainder), a mask
    of 0 and -inf per batch row; a fully masked row gives zeros (as the flash kernel does) and a NaN in a query
    makes its head NaN. The decode step's pass swaps it in for the flash kernel only where it applies: one query
    row, float32 or bf16, a mask of the query's dtype, no causal flag."""
    if not fast_decode.kernels():
        pytest.skip("fast_decode.cpp's kernels need an x86 CPU with AVX2 and a C++ compiler")
    torch.manual_seed(0)
    B, H, Hkv, S, D = 2, 6, 2, 37, 64
    q = torch.randn(B, H, 1, D)
    cache = torch.randn(2, B, Hkv, S + 11, D)  # keys and values: the first S slots of a longer cache
    k, v = cache[0, :, :, :S], cache[1, :, :, :S]
    mask = torch.zeros(B, 1, 1, S)
    mask[0, ..., 30:] = float("-inf")  # row 0: slots not yet written
    mask[1, ..., :4] = float("-inf")  # row 1: left padding
    q[1, 3, 0, 5] = float("nan")
    q, k, v, mask = (t.to(dtype) for t in (q, k, v, mask))
    got = torch.ops.fast_decode.decode_attention(q, k, v, mask, D ** -0.5)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask.double(),
                                          enable_gqa=True).to(dtype)
    assert got.shape == (B, H, 1, D) and got.dtype == dtype and got[1, 3].isnan().all()
    assert not got[[0, 1], [3, 2]].isnan().any()
    tol = 1e-5 if dtype == torch.float32 else 2 ** -8
    torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True)
    assert (torch.ops.fast_decode.decode_attention(q, k, v, torch.full_like(mask, float("-inf")), 0.1)[0] == 0).all()

    def flash_graph(T, dtype, causal):
        g = torch.fx.Graph()
        fake = torch._subclasses.FakeTensorMode()
        vals = [fake.from_tensor(t.to(dtype)) for t in (q.expand(B, H, T, D), k, v, mask.expand(B, 1, T, S))]
        nodes = [g.placeholder(n) for n in "qkvm"]
        for n, val in zip(nodes, vals):
            n.meta["val"] = val
        out = g.call_function(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
                              tuple(nodes[:3]) + (0.0, causal), {"attn_mask": nodes[3]})
        g.output(g.call_function(operator.getitem, (out, 0)))
        fast_decode.use_decode_attention(g)
        return {n.target for n in g.nodes if n.op == "call_function"} - {operator.getitem}
    assert flash_graph(1, dtype, False) == {torch.ops.fast_decode.decode_attention.default}
    for args in ((7, dtype, False), (1, torch.float16, False), (1, dtype, True)):
        assert flash_graph(*args) == {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default}


def test_decode_attention_pass_keys_the_compiled_step_by_cpu_capability():
    """The pass's uuid (part of inductor's cache key for the compiled step) differs between PyTorch's AVX-512 and
    AVX2 code: a bf16 step compiled under one and read back under the other gave wrong logits."""
    if "avx512f" not in fast_decode.cpu_flags():
        pytest.skip("needs a CPU with AVX-512 to compare its key with AVX2's")
    code = "import sys; sys.path.insert(0, %r); import fast_decode; print(fast_decode.decode_attention_pass().uuid())"
    keys = {cap: subprocess.run([sys.executable, "-c", code % str(ROOT)], capture_output=True, text=True,
                                env=dict(os.environ, ATEN_CPU_CAPABILITY=cap)).stdout for cap in ("avx2", "avx512")}
    assert keys["avx2"] and keys["avx512"] and keys["avx2"] != keys["avx512"]


@pytest.mark.parametrize("name", MODELS)
def test_fast_keeps_parameters_names_and_state_dict(name, checkpoints):
    """The same parameter objects under the same names (a tied head stays tied), the same state_dict, every
    plain nn.Linear swapped and nothing else; applying it twice changes nothing."""
    model = load(name, checkpoints)
    params, state = dict(model.named_parameters()), model.state_dict()
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert fast(model) is model and fast(model) is model
    assert dict(model.named_parameters()) == params
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [n for n, m in model.named_modules() if type(m) is FastLinear] == linears and linears
    assert not any(type(m) is nn.Linear for m in model.modules())  # (named_parameters lists a tied matrix once)


@pytest.mark.parametrize("name", MODELS)
def test_fast_fp32_generates_the_plain_tokens(name, checkpoints, two_threads):
    """fp32, every layer on the split: logits within 1e-5 of the plain model's (the split sums in another order)
    and the same greedy tokens, batched and ragged, with and without a stream."""
    plain = load(name, checkpoints)
    quick = fast(copy.deepcopy(plain))  # (lm2's fresh memory is random: one draw for both)
    for m in quick.modules():
        if type(m) is FastLinear:
            m.split = True
    prompts = [[5, 7, 11, 13, 17, 19, 23], [3, 29, 31]]
    with torch.no_grad():
        tokens = torch.tensor([prompts[0]])
        torch.testing.assert_close(quick(tokens), plain(tokens), rtol=1e-5, atol=1e-5)
    want = plain.generate(prompts, 24, stop_tokens=[])
    assert quick.generate(prompts, 24, stop_tokens=[]) == want
    assert quick.generate(prompts[:1], 24, stop_tokens=[]) == want[:1]


@needs_onednn
@pytest.mark.parametrize("name", MODELS)
def test_fast_bf16_is_as_close_to_fp32_as_plain_bf16(name, checkpoints):
    """bf16: the reordered products round as F.linear's do, so the fast model's logits are within bf16 rounding of
    the plain bf16 model's, and on average no further from the fp32 logits (1.1x, as test_parity.py allows
    for smollm2.py against HF)."""
    want = load(name, checkpoints)
    plain = copy.deepcopy(want).to(torch.bfloat16)
    quick = fast(copy.deepcopy(plain))
    tokens = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = want(tokens)
        plain_err = (plain(tokens).float() - ref).abs().mean()
        assert (quick(tokens).float() - ref).abs().mean() <= 1.1 * plain_err
        torch.testing.assert_close(quick(tokens).float(), plain(tokens).float(), rtol=0.05, atol=0.05)
    assert any("reordered" in vars(m) and m.reordered.weight is not None for m in quick.modules())


def test_real_smollm2_fast_greedy_tokens_match_plain(two_threads, smollm2_dir):
    """Real SmolLM2-135M-Instruct weights, fp32: 32 greedy tokens of a chat prompt, fast = plain."""
    ckpt = smollm2_dir
    from tokenizer_bpe import Tokenizer
    ids = smollm2.encode_chat(Tokenizer.from_file(ckpt), [{"role": "user", "content": "What is gravity?"}])
    plain = smollm2.SmolLM2.from_pretrained(ckpt)
    want = plain.generate([ids], 32, stop_tokens=[])
    assert fast(plain).generate([ids], 32, stop_tokens=[]) == want


@needs_onednn
def test_generate_uses_weights_updated_between_calls(checkpoints):
    """A weight updated in place between two generate calls (also after a call that failed in its stream
    callback, and inside another generate's stream callback) is what the next call multiplies with."""
    model = fast(load("smollm2", checkpoints, torch.bfloat16))
    prompt = [[5, 7, 11, 13, 17]]
    first = model.generate(prompt, 8, stop_tokens=[])

    def fail(row, token):
        raise RuntimeError("a stream callback failed")

    with pytest.raises(RuntimeError):
        model.generate(prompt, 8, stop_tokens=[], stream=fail)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) / p.size(-1) ** 0.5)  # in place: the data pointers stay the same
    fresh = fast(copy.deepcopy(model))  # no reordered copies yet
    want = fresh.generate(prompt, 8, stop_tokens=[])
    nested = []
    fresh.generate(prompt, 2, stop_tokens=[], stream=lambda row, token: nested.append(
        model.generate(prompt, 8, stop_tokens=[])))
    assert nested[0] == want and want != first
    assert model.generate(prompt, 8, stop_tokens=[]) == want


@pytest.mark.parametrize("order", ["fast, then LoRA", "LoRA, then fast"])
def test_training_and_lora_are_those_of_the_plain_model(order, checkpoints, two_threads):
    """finetune.py's apply_lora before or after fast(): the same wrapped layers, the same loss and gradients as
    on the plain model, and the same generations afterwards (fp32)."""
    def build(use_fast):
        model = load("smollm2", checkpoints)
        if use_fast and order == "fast, then LoRA":
            fast(model)
        torch.manual_seed(1)
        names = finetune.apply_lora(model, 4, 8.0, 0.0, ["q_proj", "v_proj", "down_proj"])
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("lora_B"):
                    p.normal_()  # a non-zero adapter, so that a skipped adapter shows
        if use_fast and order == "LoRA, then fast":
            fast(model)
        return model.train(), names

    (plain, names), (quick, quick_names) = build(False), build(True)
    assert names == quick_names and any(type(m) is FastLinear for m in quick.modules())
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for model in (plain, quick):
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    assert grads and all(torch.equal(p.grad, grads[n]) for n, p in quick.named_parameters() if p.requires_grad)
    prompt = [[5, 7, 11, 13]]
    assert quick.eval().generate(prompt, 12, stop_tokens=[]) == plain.eval().generate(prompt, 12, stop_tokens=[])


# -----------------------------------------------------------------------------
# Quantized layers


def rounded_in_blocks(x: torch.Tensor) -> torch.Tensor:
    """x as fast_decode.cpp multiplies it: each block of 32 along a row rounded to an int8 step of max |x| / 127."""
    b = x.float().reshape(-1, x.size(-1) // 32, 32)
    d = b.abs().amax(-1, keepdim=True) / 127
    return ((b * torch.where(d > 0, 1 / d, 0)).round() * d).view(x.shape)


KERNELS = ["fast_decode.cpp", "PyTorch's"]


def use_kernel(kernel: str, monkeypatch):
    """Quantized layers made from here on multiply on `kernel` (skips where fast_decode.cpp cannot run)."""
    if kernel == "PyTorch's":
        monkeypatch.setattr(fast_decode, "integer_kernel", lambda *shape: False)
    elif not fast_decode.kernels():
        pytest.skip("fast_decode.cpp's kernels need an x86 CPU with AVX2 and a C++ compiler")


@pytest.mark.parametrize("kernel", KERNELS)
def test_int8_quantization_and_product(kernel, monkeypatch):
    """quantize_int8 rounds each row to its nearest step of a bf16 scale. Int8Linear's product on fast_decode.cpp
    is the fp32 product of the input rounded in blocks of 32 to int8 with those int8 weights; on PyTorch's kernel
    (and for an input width fast_decode.cpp does not take) the product of the bf16-rounded input, rounded to bf16;
    for one row and for many, with a bias, and for an input width PyTorch's kernel does not take (not a multiple
    of 16); a NaN in a row makes its products NaN; its `weight` is the dequantized weight."""
    use_kernel(kernel, monkeypatch)
    torch.manual_seed(0)
    w = torch.randn(96, 64)
    w[3] = 0  # an all-zero row must not divide by zero
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and q.abs().max() <= 127
    step = scale.float()[:, None]
    assert ((q * step - w).abs() <= step / 2 + w.abs() / 256).all()  # half a step (a clipped maximum: 1/256)
    assert (q[3] == 0).all() and (q.abs().amax(1)[torch.arange(96) != 3] >= 126).all()  # each row uses its range
    for k in (128, 64, 40):
        bias = torch.randn(96)
        q, scale = quantize_int8(torch.randn(96, k))
        layer = Int8Linear(q, scale, torch.float32, bias)
        assert layer.integer == (kernel == "fast_decode.cpp" and k % 64 == 0)
        torch.testing.assert_close(layer.weight, q * scale.float()[:, None])
        for x in (torch.randn(k), torch.randn(1, 1, k), torch.randn(3, 5, k), torch.zeros(2, k)):
            y = layer(x)
            assert y.shape == x.shape[:-1] + (96,) and y.dtype == x.dtype
            assert layer(x.clone().index_fill_(-1, torch.tensor([k // 2]), float("nan"))).isnan().all()
            if layer.integer:
                want = F.linear(rounded_in_blocks(x).double(), q.double()) * scale.double() + bias.double()
                torch.testing.assert_close(y, want.float(), rtol=1e-5, atol=1e-5)
            else:
                want = (F.linear(x.bfloat16().float(), q.float()) * scale.float()).bfloat16().float() + bias
                torch.testing.assert_close(y, want, rtol=2 ** -8, atol=1e-5)


@needs_int4
@pytest.mark.parametrize("kernel", KERNELS)
def test_int4_quantization_and_product(kernel, monkeypatch):
    """quantize_int4: each group's minimum and maximum are its first and last step, every weight is within half a
    step (and the rounding of scale and zero to their grid) of its dequantized value; a row's scales are whole
    multiples 1..255 of one power of two and its zeros -127..127 of another (what fast_decode.cpp's tiles hold:
    packed and unpacked, they come back exactly); scales off that grid are refused. Int4Linear's product on
    fast_decode.cpp (groups of 32, 64 and 128) is the fp32 product of the input rounded in blocks of 32 to int8 with
    the dequantized weights; on PyTorch's kernel that of the bf16-rounded input, rounded to bf16;
    for one row and for the kernels' row blocks and more, with a bias; a NaN in a row makes its products NaN. Its
    `weight` is the dequantized weight
    (rounded to bf16 on PyTorch's kernel); packing 256 rows at a time packs as the whole does (a last block of
    fewer rows included)."""
    use_kernel(kernel, monkeypatch)
    torch.manual_seed(0)
    w = torch.randn(80, 128)
    w[5, :64] = 0.25  # a constant group (of 32 and of 64): no step at all
    for group in (32, 64, 128):
        q, sz = quantize_int4(w, group)
        assert q.shape == (80, 64) and q.dtype == torch.uint8 and sz.shape == (80, 128 // group, 2)
        v = fast_decode.unpack_int4(q).view(80, -1, group)
        assert v.min() == 0 and v.max() == 15
        deq = dequantize_int4(q, sz)
        step = sz[..., 0].float().repeat_interleave(group, 1)
        grid = sz[..., 0].float().amax(1, keepdim=True) / 255 + sz[..., 1].float().abs().amax(1, keepdim=True) / 127
        assert ((deq - w).abs() <= step / 2 + 8 * grid + 1e-6).all()
        for part, codes in ((sz[..., 0].float(), 255), (sz[..., 1].float(), 127)):
            unit = 2.0 ** torch.log2(part.abs().amax(1, keepdim=True) / codes).ceil()
            assert torch.equal(part / unit, (part / unit).round()) and (part / unit).abs().max() <= codes
        assert (sz[..., 0] > 0).all()
        for got, sent in zip(fast_decode.unpack_int4_tiles(*fast_decode.pack_int4_tiles(q, sz)), (q, sz)):
            assert torch.equal(got, sent)
        if group < 128:
            torch.testing.assert_close(deq[5, :32], w[5, :32], rtol=2 ** -8, atol=0)
        bias = torch.randn(80)
        layer = Int4Linear(q, sz, group, torch.float32, bias)
        assert layer.integer == (kernel == "fast_decode.cpp")
        if layer.integer:
            torch.testing.assert_close(layer.weight, deq, rtol=0, atol=0)
        else:
            torch.testing.assert_close(layer.weight, deq.bfloat16().float(), rtol=2 ** -7, atol=1e-6)
        for x in (torch.randn(128), torch.randn(1, 1, 128), torch.randn(3, 7, 128), torch.zeros(2, 128)):
            y = layer(x)
            assert y.shape == x.shape[:-1] + (80,) and y.dtype == x.dtype
            assert layer(x.clone().index_fill_(-1, torch.tensor([100]), float("nan"))).isnan().all()
            if layer.integer:
                want = F.linear(rounded_in_blocks(x).double(), deq.double()) + bias.double()
                torch.testing.assert_close(y, want.float(), rtol=1e-5, atol=1e-5)
            else:
                want = (F.linear(x.bfloat16().float(), deq)).bfloat16().float() + bias
                torch.testing.assert_close(y, want, rtol=2 ** -7, atol=1e-4)
    q, sz = quantize_int4(w, 32)
    off_grid = sz.clone()
    off_grid[3, 0, 0] = 2.5 * fast_decode.grid_unit(sz[3, :, 0].float(), 255)  # (the row's largest is >= 128 units)
    with pytest.raises(ValueError, match="grid"):
        fast_decode.pack_int4_tiles(q, off_grid)
    q = torch.randint(0, 256, (336, 48), dtype=torch.uint8)
    assert torch.equal(fast_decode.pack_int4_cpu(q), torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        fast_decode.unpack_int4(q), 1))


def test_int6_head_quantization_product_and_rows():
    """quantize_groups(w, 6): q in 0..63 spanning each group, every weight within half a step (and the grid's
    rounding) of its dequantized value. Int6Linear (an int4 model's output head on fast_decode.cpp) computes the
    fp32 product of the input rounded in blocks of 32 with those weights (groups of 32 and 64, one row and more, a
    bias), reads any rows back exactly (what a tied embedding looks up), and is refused where the kernels are not."""
    if not fast_decode.kernels():
        pytest.skip("fast_decode.cpp's kernels need an x86 CPU with AVX2 and a C++ compiler")
    torch.manual_seed(0)
    w = torch.randn(96, 256)
    for group in (32, 64):
        q, sz = fast_decode.quantize_groups(w, 6, group)
        assert q.shape == (96, 256) and q.max() == 63 and q.min() == 0
        deq = ((q.view(96, -1, group).float() - 32) * sz[..., :1].float() + sz[..., 1:].float()).view(96, 256)
        grid = sz[..., 0].float().amax(1, keepdim=True) / 255 + sz[..., 1].float().abs().amax(1, keepdim=True) / 127
        step = sz[..., 0].float().repeat_interleave(group, 1)
        assert ((deq - w).abs() <= step / 2 + 32 * grid + 1e-6).all()
        bias = torch.randn(96)
        layer = Int6Linear(q, sz, torch.float32, bias)
        assert layer.group_size == group and torch.equal(layer.weight, deq)
        ids = torch.tensor([[5, 17, 95], [0, 16, 31]])
        assert torch.equal(layer.rows(ids), deq[ids])
        for x in (torch.randn(256), torch.randn(3, 7, 256)):
            want = F.linear(rounded_in_blocks(x).double(), deq.double()) + bias.double()
            torch.testing.assert_close(layer(x), want.float(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="int8"):
        Int6Linear(*fast_decode.quantize_groups(torch.randn(40, 256), 6), torch.float32)  # (40 rows: not in 16s)


def test_weights_of_2mb_or_more_are_held_on_huge_pages():
    """huge(): a tensor of 2 MB or more is copied, value for value, to memory of its own that starts on a 2 MB
    boundary (asked to be huge pages); a smaller one stays itself. A large int4 layer's tiles and a bf16 model's
    large weights (the same Parameter, its values unchanged) are so held."""
    if not fast_decode.kernels():
        pytest.skip("fast_decode.cpp's kernels need an x86 CPU with AVX2 and a C++ compiler")
    t = torch.randn(1024, 1024)
    held = fast_decode.huge(t)
    assert torch.equal(held, t) and held.data_ptr() % 2 ** 21 == 0 and held.data_ptr() != t.data_ptr()
    small = torch.randn(16, 16)
    assert fast_decode.huge(small) is small
    assert Int4Linear(*quantize_int4(torch.randn(4096, 1024)), 32, torch.float32).packed.data_ptr() % 2 ** 21 == 0
    model = nn.Sequential(nn.Linear(1024, 2048, bias=False)).bfloat16()
    weight, values = model[0].weight, model[0].weight.detach().clone()
    fast(model)
    assert model[0].weight is weight and weight.data_ptr() % 2 ** 21 == 0 and torch.equal(weight, values)


@needs_int4
def test_integer_products_without_avx512():
    """PyTorch's CPU int4 kernel and fast_decode.cpp pack and multiply differently on AVX-512, AVX2 and plain CPUs:
    held to AVX2 (ATEN_CPU_CAPABILITY forces it here) fast_decode.cpp's AVX2 build computes the products of the
    block-rounded input with the dequantized weights (4-bit groups of 32 and 64, 6 and 8 bits), and a bf16 row's
    product, as its AVX-512 build does; held to plain code, the layers take PyTorch's kernels and compute the
    product of the bf16-rounded input."""
    code = ("import sys, torch; sys.path.insert(0, %r); from fast_decode import *\n"
            + inspect.getsource(rounded_in_blocks) +
            "torch.manual_seed(0); w, x = torch.randn(80, 128), torch.randn(5, 128)\n"
            "q, sz = quantize_int4(w); q64, sz64 = quantize_int4(w, 64); q8, s8 = quantize_int8(w)\n"
            "int4, int8 = Int4Linear(q, sz, 32, torch.float32), Int8Linear(q8, s8, torch.float32)\n"
            "rounded, g64 = rounded_in_blocks(x), Int4Linear(q64, sz64, 64, torch.float32)\n"
            "int6 = [Int6Linear(*quantize_groups(w, 6), torch.float32)] if int4.integer else []\n"
            "for layer, deq in ((int4, dequantize_int4(q, sz)), (g64, dequantize_int4(q64, sz64)),\n"
            "                   (int8, q8 * s8.float()[:, None]), *((m, m.weight) for m in int6)):\n"
            "    want = F.linear(rounded if layer.integer else x.bfloat16().float(), deq)\n"
            "    tol = 1e-5 if layer.integer else 2 ** -7\n"
            "    assert (layer(x) - want).abs().max() <= tol * want.abs().max(), (layer(x) - want).abs().max()\n"
            "bf16 = fast(nn.Sequential(nn.Linear(128, 80, bias=False)).bfloat16())[0]; x1 = x[:1].bfloat16()\n"
            "with torch.no_grad(): y, want = bf16(x1).float(), F.linear(x1.double(), bf16.weight.double())\n"
            "assert (y - want).abs().max() <= 2 ** -7 * want.abs().max(), (y - want).abs().max()\n"
            "print(torch.backends.cpu.get_cpu_capability(), int4.integer, int8.integer, bf16.bf16_kernel)") % str(ROOT)
    for capability in ("avx2", "default"):
        if capability == "avx2" and "avx2" not in Path("/proc/cpuinfo").read_text():
            continue
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=dict(os.environ, ATEN_CPU_CAPABILITY=capability))
        assert out.returncode == 0, out.stderr[-2000:]
        ran, int4, int8, bf16 = out.stdout.split()[-4:]
        assert ran.lower() in (capability, "default"), out.stdout
        integer = ran == "AVX2" and fast_decode.kernels()  # (where the AVX-512 build compiles, the AVX2 one does)
        assert int4 == int8 == bf16 == str(integer), out.stdout


def test_without_a_compiler_the_layers_say_so_once_and_use_pytorchs_kernels(tmp_path):
    """Where fast_decode.cpp cannot be compiled (here: no C++ compiler, and no earlier build to reuse), kernels()
    says why in one line on stderr, once, and the int4 and int8 layers multiply on PyTorch's kernels."""
    code = ("import sys, torch; sys.path.insert(0, %r); from fast_decode import *\n"
            "q, sz = quantize_int4(torch.randn(32, 64)); layer = Int4Linear(q, sz, 32, torch.float32)\n"
            "head = Int8Linear(*quantize_int8(torch.randn(32, 64)), torch.float32)\n"
            "print(kernels(), layer.integer, head.integer, tuple(layer(torch.randn(2, 64)).shape))") % str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, CXX=str(tmp_path / "no-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path)))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "False False False (2, 32)"
    said = [line for line in out.stderr.splitlines() if "fast_decode" in line]
    assert len(said) == 1 and said[0].startswith("fast_decode: could not compile fast_decode.cpp"), out.stderr


def test_hqq_zeros_lower_the_error():
    """rounding="hqq" moves each group's zero to lower the rounding error: a lower mean |error| than round to
    nearest on Gaussian weights, each weight still one of the 16 steps of its group's scale and zero."""
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.02
    errors = {}
    for rounding in ("nearest", "hqq"):
        q, sz = quantize_int4(w, 32, rounding)
        errors[rounding] = (dequantize_int4(q, sz) - w).abs().mean()
    assert errors["hqq"] < 0.98 * errors["nearest"], errors
    with pytest.raises(ValueError, match="rounding"):
        quantize_int4(w, 32, "gptq")


def test_stack_hands_each_sibling_its_rows_of_one_product():
    """A Stack computes the stacked product once for the siblings called one after another on one input; a
    sibling called with another input, or with the same tensor changed in place, gets a fresh product; one called
    twice with the same input gets it again; copies start with nothing held."""
    calls = []
    torch.manual_seed(0)
    inner = nn.Linear(16, 12, bias=False)
    stack = Stack(inner)
    inner.register_forward_hook(lambda m, args, out: calls.append(1))
    a, b, c = Sibling(stack, 0, 4, 16), Sibling(stack, 4, 8, 16), Sibling(stack, 8, 12, 16)
    with torch.no_grad():
        x = torch.randn(1, 1, 16)
        for s, rows in ((a, slice(0, 4)), (b, slice(4, 8)), (c, slice(8, 12))):
            torch.testing.assert_close(s(x), F.linear(x, inner.weight[rows]))
        assert len(calls) == 1 and a.weight.shape == (4, 16) and c.out_features == 4
        y = torch.randn(3, 2, 16)
        torch.testing.assert_close(b(y), F.linear(y, inner.weight[4:8]))
        assert b(y).is_contiguous() and len(calls) == 2  # (b called twice with y: one product)
        x.mul_(2)
        torch.testing.assert_close(a(x), F.linear(x, inner.weight[:4]))
        assert len(calls) == 3
    assert copy.deepcopy(stack).last is None


def naive_generate(model, prompt, n):
    """n greedy tokens; nanollm's MLA decoding naively (its `absorb` switch), other models as they decode."""
    if type(model) is not nanollm.NanoLLM:
        return model.generate([prompt], n, stop_tokens=[])[0]
    model.absorb = False
    try:
        return model.generate([prompt], n, stop_tokens=[])[0]
    finally:
        model.absorb = True


def rounded_copy(plain, quick):
    """plain's fp32 copy with each linear weight replaced by its dequantized weight as quick holds it (int8 or
    int4, as quantize_layers chose), and its input rounded in blocks of 32 where quick multiplies on
    fast_decode.cpp."""
    rounded = copy.deepcopy(plain)
    with torch.no_grad():
        for path, m in list(rounded.named_modules()):
            if type(m) is not nn.Linear:
                continue
            held = quick.get_submodule(path)
            held = held.stack.layer if type(held) is Sibling else held
            if type(held) is Int8Linear:
                q, scale = quantize_int8(m.weight)
                m.weight.copy_(q * scale.float()[:, None])
            elif type(held) is Int6Linear:
                m.weight.copy_(fast_decode.dequantize_groups(*fast_decode.quantize_groups(m.weight, 6), 6))
            else:
                m.weight.copy_(dequantize_int4(*quantize_int4(m.weight, held.group_size)))
            if held.integer:
                m.register_forward_pre_hook(lambda _, args: (rounded_in_blocks(args[0]),))
    return rounded


@needs_int4
@pytest.mark.parametrize("weights", ["int8", "int4"])
@pytest.mark.parametrize("name", MODELS)
def test_quantized_model_holds_only_the_quantized_weights_and_computes_them(name, weights, checkpoints):
    """weights="int8" / "int4": no linear layer's parameter is left (those left are the norms', lm2's memory bank
    and embedding, nanollm's router: of no linear layer), q/k/v and gate/up are each one Stack, the output head is
    int8 and a tied embedding reads its rows; int4 models have int4 layers. The logits are within bf16 rounding of
    the fp32 model whose weights are replaced by their dequantized roundings (and whose inputs are rounded as
    fast_decode.cpp rounds them), and every greedy token is that model's best on the same prefix, or within twice
    the largest logit difference of it (a near tie; nanollm: three in four, its routing flips on near ties)."""
    plain = load(name, checkpoints)
    quick = fast(copy.deepcopy(plain), weights=weights)
    assert not any(type(m) in (nn.Linear, FastLinear) for m in quick.modules())
    linear_ids = {id(p) for m in plain.modules() if type(m) is nn.Linear for p in m.parameters()}
    kept = {n for n, p in plain.named_parameters() if id(p) not in linear_ids}
    embedding = plain.model.embed_tokens
    tied = getattr(plain, "lm_head", None) is not None and plain.lm_head.weight is embedding.weight
    assert {n for n, _ in quick.named_parameters()} == kept - ({"model.embed_tokens.weight"} if tied else set())
    stacks = {id(m.stack): m.stack for m in quick.modules() if type(m) is Sibling}
    assert stacks and all(len([s for s in quick.modules() if type(s) is Sibling and s.stack is st]) in (2, 3)
                          for st in stacks.values())
    if getattr(quick, "lm_head", None) is not None:
        assert type(quick.lm_head) is (Int6Linear if weights == "int4" else Int8Linear)
    if tied:
        assert type(quick.model.embed_tokens) is TiedEmbedding and quick.model.embed_tokens.head is quick.lm_head
    if weights == "int4":
        assert any(type(m) is Int4Linear for m in quick.modules())
    rounded = rounded_copy(plain, quick)
    tokens = torch.tensor([[5, 7, 11, 13, 17, 19, 23]])
    want, got, alike = routed_alike(rounded, quick, tokens)
    diff = (got - want).abs()[0, alike]
    assert (diff.mean() if name == "nanollm" else diff.max()) <= 0.02 * want.abs().max()
    tol = diff.max().item()
    prompt = [5, 7, 11, 13, 17, 19, 23]
    # (nanollm's absorbed MLA decode multiplies with kv_b_proj.weight itself, dequantized as the kernel rounds it to
    # bf16: decode naively, through the quantized layer, and absorbed only to see that it runs)
    picked = naive_generate(quick, prompt, 16)
    if name == "nanollm":
        assert len(quick.generate([prompt], 4, stop_tokens=[])[0]) == 4
    with torch.no_grad():
        logits = rounded(torch.tensor([prompt + picked]))[0, len(prompt) - 1:-1]  # (16, vocab): each step's
    chosen = logits.gather(1, torch.tensor(picked)[:, None])[:, 0]
    near_best = chosen >= logits.max(1).values - 2 * tol
    # (nanollm: a routing flip at one position moves its logits far, as above: most positions hold)
    assert near_best.float().mean() >= 0.75 if name == "nanollm" else near_best.all()


def test_a8w8_calibration_and_product():
    """weights="a8w8": the calibration measures each layer's largest |input| per channel; the one-row product
    (fbgemm's kernel) and the many-row one (rowwise_a8w8) round alike, so several rows give what each row gives
    alone; the product is within 0.5% of the float one even with an outlier channel 30x the others (measured
    0.17%); `weight` is the weight (its int8 rounding); a8w8 without calibration, or calibration without it, and
    load() of a8w8 are one-line errors."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96))
    w, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    cal = torch.randn(32, 64)
    cal[:, 5] *= 30  # an outlier channel, as the inputs of transformer layers have
    layer = fast(model, weights="a8w8", calibration=cal)[0]
    assert type(layer) is A8W8Linear and not list(model.parameters())
    x = torch.randn(3, 5, 64)
    x[..., 5] *= 30
    with torch.no_grad():
        y = layer(x)
        rows = torch.cat([layer(r) for r in x.reshape(-1, 1, 64)]).view(3, 5, 96)  # one row per call
        torch.testing.assert_close(y, rows, rtol=1e-5, atol=1e-5)
        want = F.linear(x, w, b)
        assert (y - want).abs().max() <= 0.005 * want.abs().max()
    torch.testing.assert_close(layer.weight, w, rtol=0.02, atol=0.02 * w.abs().max().item())
    with pytest.raises(ValueError, match="calibration"):
        fast(nn.Sequential(nn.Linear(4, 4)), weights="a8w8")
    with pytest.raises(ValueError, match="calibration"):
        fast(nn.Sequential(nn.Linear(4, 4)), weights="int8", calibration=torch.randn(2, 4))
    with pytest.raises(ValueError, match="calibrated on the float model"):
        fast_decode.load(smollm2.SmolLM2, "nowhere", weights="a8w8")


@pytest.mark.parametrize("name", MODELS)
def test_fast_a8w8_holds_no_float_linear_weight_and_stays_close(name, checkpoints):
    """weights="a8w8" on each model file: every linear layer the calibration reached an A8W8Linear, any other (an
    expert no token was routed to) an Int8Linear, no linear layer's float parameter left; a tied embedding reads
    an int8 copy of its own; logits within 5% of the largest fp32 logit (nanollm: on average, where it routes alike:
    routed_alike)."""
    model = load(name, checkpoints)
    ref = copy.deepcopy(model)
    cal = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    fast(model, weights="a8w8", calibration=cal)
    kinds = [type(m) for m in model.modules() if isinstance(m, nn.Linear)]
    assert kinds.count(A8W8Linear) >= len(kinds) // 2 and set(kinds) <= {A8W8Linear, Int8Linear}
    assert not any(type(m) is nn.Linear for m in model.modules())
    if getattr(ref, "lm_head", None) is not None and ref.lm_head.weight is ref.model.embed_tokens.weight:
        assert type(model.model.embed_tokens) is TiedEmbedding
    prompt = [5, 7, 11, 13, 17, 19, 23]
    want, got, alike = routed_alike(ref, model, torch.tensor([prompt]))
    diff = (got - want).abs()[0, alike]
    assert (diff.mean() if name == "nanollm" else diff.max()) <= 0.05 * want.abs().max()
    assert len(model.generate([prompt], 4, stop_tokens=[])[0]) == 4


@needs_int4
@pytest.mark.parametrize("name", MODELS)
def test_fast_int4_with_calibration_puts_its_head_alone_on_a8w8(name, checkpoints):
    """weights="int4" with calibration: the output head becomes an A8W8Linear and every other layer is what plain
    int4 makes it; a tied embedding reads a 6-bit copy of its own (fbgemm's packed head has no rows); logits
    within 5% of the largest fp32 logit of plain int4's (whose own distance from fp32 on these tiny random models
    is 18-67% of it)."""
    model = load(name, checkpoints)
    ref, plain = copy.deepcopy(model), fast(copy.deepcopy(model), weights="int4")
    cal = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    fast(model, weights="int4", calibration=cal)
    kinds = linear_kinds(plain)
    assert linear_kinds(model) == {**kinds, "lm_head": A8W8Linear} and kinds["lm_head"] is Int6Linear
    if ref.lm_head.weight is ref.model.embed_tokens.weight:
        assert type(model.model.embed_tokens) is TiedEmbedding and model.model.embed_tokens.head is not model.lm_head
    prompt = torch.tensor([[5, 7, 11, 13, 17, 19, 23]])
    with torch.no_grad():
        want, int4, got = ref(prompt), plain(prompt), model(prompt)
    assert (got - int4).abs().max() <= 0.05 * want.abs().max()  # (the head's rounding alone: 1% here)
    assert len(model.generate(prompt.tolist(), 4, stop_tokens=[])[0]) == 4


def test_streamed_bytes_reads_an_embedding_copy_one_row_a_token(checkpoints):
    """The benchmarks' bytes per token (decode_timing.streamed_bytes): an int4 model's tied embedding is its int8
    output head, read whole every token; an a8w8 model's embedding is an int8 copy of its own, of which a token
    reads one row, so its matrix is not counted."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from decode_timing import nbytes, packed_bytes, streamed_bytes, tensors
    held = lambda m: sum(nbytes(t) for t in tensors(m).values()) + packed_bytes(m)  # noqa: E731
    int4 = fast(load("smollm2", checkpoints), weights="int4")
    assert int4.model.embed_tokens.head is int4.lm_head and streamed_bytes(int4) == held(int4)
    cal = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    a8w8 = fast(load("smollm2", checkpoints), weights="a8w8", calibration=cal)
    copy_ = a8w8.model.embed_tokens.head
    assert type(a8w8.lm_head) is A8W8Linear and streamed_bytes(a8w8) == held(a8w8) - nbytes(copy_.q) - nbytes(
        copy_.scale)


def test_fast_refuses_bad_weights_arguments():
    for kwargs, match in (({"weights": "int2"}, "weights"), ({"weights": "int4", "group_size": 16}, "group_size"),
                          ({"weights": "int4", "rounding": "gptq"}, "rounding")):
        with pytest.raises(ValueError, match=match):
            fast(nn.Sequential(nn.Linear(64, 64)), **kwargs)


# -----------------------------------------------------------------------------
# Loading quantized: fast_decode.load and python fast_decode.py quantize


@needs_int4
@pytest.mark.parametrize("weights", ["int8", "int4"])
@pytest.mark.parametrize("name", MODELS)
def test_load_quantizes_as_it_reads_and_from_a_quantized_file(name, weights, checkpoints, tmp_path, monkeypatch):
    """load(cls, dir, weights=...) builds the model on the meta device and reads its layers one by one: its logits
    are those of fast(cls.from_pretrained(dir), weights=...) exactly, as are those of a model loaded from the file
    `fast_decode.py quantize` writes (which load then reads: no float linear weight is read). A quantized file made
    from other weights, or one of another weights kind, is refused in one line."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    cls = model_class(MODELS[name])
    for f in checkpoints[name].iterdir():
        (ckpt / f.name).symlink_to(f)
    if name == "lm2":  # an LM2 checkpoint, memory included (a Llama one has none: load() refuses to make it up)
        from safetensors.torch import save_file
        model = cls.from_pretrained(checkpoints[name])
        (ckpt / "config.json").unlink()
        (ckpt / "config.json").write_text(json.dumps(model.args.to_hf_config()))
        (ckpt / "model.safetensors").unlink()
        tied = getattr(model, "lm_head", None) is not None and model.lm_head.weight is model.model.embed_tokens.weight
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")},
                  ckpt / "model.safetensors")  # (a tied head is stored once, as HF stores it)
        with pytest.raises(ValueError, match="has no tensor model.layers.0.memory"):
            fast_decode.load(cls, checkpoints[name], weights=weights)
    tokens = torch.tensor([[5, 7, 11, 13, 17, 19, 23]])
    with torch.no_grad():
        want = fast(cls.from_pretrained(ckpt), weights=weights)(tokens)
        model = fast_decode.load(cls, ckpt, weights=weights)
        assert torch.equal(model(tokens), want)
    held = [t for m in model.modules() for t in list(m.parameters(recurse=False)) + list(vars(m).values())
            if isinstance(t, torch.Tensor)]
    assert held and not any(t.is_meta for t in held)  # (lm2's biased gates: read too)
    fast_decode.main("quantize", ckpt_dir=str(ckpt), weights=weights, model=name)
    umask = os.umask(0)
    os.umask(umask)
    assert fast_decode.quantized_path(ckpt, weights).stat().st_mode & 0o777 == 0o666 & ~umask  # (not 0600)
    read = []
    original = fast_decode.Reader.__getitem__
    monkeypatch.setattr(fast_decode.Reader, "__getitem__", lambda self, n: read.append(n) or original(self, n))
    with torch.no_grad():
        model = fast_decode.load(cls, ckpt, weights=weights)
        assert torch.equal(model(tokens), want)
    linear_names = {f"{n}.weight" for n, m in cls.from_pretrained(ckpt, "meta").named_modules()
                    if type(m) is nn.Linear}
    assert read and not set(read) & linear_names
    if weights == "int4":  # a file an earlier fast_decode wrote (free bf16 scales, an int8 head) says so
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file
        path = fast_decode.quantized_path(ckpt, weights)
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        save_file(load_file(path), path, metadata={k: v for k, v in meta.items() if k != "form"})
        with pytest.raises(ValueError, match="earlier fast_decode"):
            fast_decode.load(cls, ckpt, weights=weights)
    other = "int8" if weights == "int4" else "int4"
    fast_decode.quantized_path(ckpt, weights).rename(fast_decode.quantized_path(ckpt, other))
    with pytest.raises(ValueError, match="make it again"):
        fast_decode.load(cls, ckpt, weights=other)
    (ckpt / "model.safetensors").unlink()  # the float weights replaced: the quantized file is stale
    (ckpt / "model.safetensors").symlink_to(checkpoints["nanollm" if name != "nanollm" else "smollm2"]
                                            / "model.safetensors")
    with pytest.raises(ValueError, match="other weights"):
        fast_decode.load(cls, ckpt, weights=other)


@needs_int4
@pytest.mark.parametrize("name", ["smollm2", "nanollm"])  # a head tied to the embedding, and one of its own
def test_load_int4_calibrates_its_head_as_it_reads_and_from_a_quantized_file(name, checkpoints, tmp_path):
    """load(int4, calibration=ids): the output head an A8W8Linear, calibrated on the quantized model itself, every
    other layer what plain load makes it, the tied embedding reading the int8 head as its own copy; logits within
    5% of plain int4's largest. save_quantized(calibration=) writes that head's A8W8 tensors, and load() without
    calibration reads them back into the same model."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in checkpoints[name].iterdir():
        (ckpt / f.name).symlink_to(f)
    cls, tokens = model_class(MODELS[name]), torch.tensor([[5, 7, 11, 13, 17, 19, 23]])
    cal = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    plain, made = fast_decode.load(cls, ckpt, "int4"), fast_decode.load(cls, ckpt, "int4", calibration=cal)
    kinds = linear_kinds(plain)
    assert linear_kinds(made) == {**kinds, "lm_head": A8W8Linear} and kinds["lm_head"] is Int6Linear
    if type(plain.model.embed_tokens) is TiedEmbedding:
        assert type(made.model.embed_tokens.head) is Int6Linear
    with torch.no_grad():
        want, got = plain(tokens), made(tokens)
        assert (got - want).abs().max() <= 0.05 * want.abs().max()
        fast_decode.save_quantized(cls, ckpt, "int4", calibration=cal)
        keys = fast_decode.safe_keys(fast_decode.quantized_path(ckpt, "int4"))
        tied = type(plain.model.embed_tokens) is TiedEmbedding  # (its int8 head is kept only as the embedding)
        assert "lm_head.a8w8_qweight" in keys and ("lm_head.qweight" in keys) == tied
        stored = fast_decode.load(cls, ckpt, "int4")
        assert linear_kinds(stored) == linear_kinds(made) and torch.equal(stored(tokens), got)
    with pytest.raises(ValueError, match="calibration"):
        fast_decode.load(cls, ckpt, "int8", calibration=cal)


def test_quantize_command_calibrates_the_head_on_a_text(smollm2_dir, tmp_path):
    """`python fast_decode.py quantize --calibration FILE` on the real SmolLM2: its tokenizer reads the text, the
    file holds the head's A8W8 form, and the CLIs' load reads it; a file it cannot read is one line."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in smollm2_dir.iterdir():
        (ckpt / f.name).symlink_to(f)
    with pytest.raises(SystemExit, match="error: .*missing.txt") as e:
        fast_decode.command_line(["quantize", "--ckpt_dir", str(ckpt), "--calibration", str(tmp_path / "missing.txt")])
    assert "\n" not in str(e.value)
    fast_decode.command_line(["quantize", "--ckpt_dir", str(ckpt), "--calibration", str(ROOT / "README.md")])
    model = fast_decode.load(smollm2.SmolLM2, ckpt, "int4")
    assert type(model.lm_head) is A8W8Linear and model.model.embed_tokens.head is not model.lm_head
    assert len(model.generate([[1, 504, 3158]], 8, stop_tokens=[])[0]) == 8


def test_quantize_command_says_what_is_wrong_in_one_line(checkpoints, tmp_path, capsys):
    """`python fast_decode.py quantize`: a wrong command, a folder without a checkpoint, an unknown weights kind or
    model file is one line and a non-zero exit; --help exits 0."""
    for argv, match in ((["quantise"], "one command is `quantize`"),
                        (["quantize", "--ckpt_dir", str(tmp_path)], "no checkpoint"),
                        (["quantize", "--ckpt_dir", str(checkpoints["smollm2"]), "--weights", "int3"],
                         "weights='int3'"),
                        (["quantize", "--ckpt_dir", str(checkpoints["smollm2"]), "--model", "gpt2"], "--model gpt2")):
        with pytest.raises(SystemExit, match=match) as e:
            fast_decode.command_line(argv)
        assert "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        fast_decode.command_line(["--help"])
    assert e.value.code == 0 and "--weights" in capsys.readouterr().out


@needs_int4
def test_real_smollm2_int4_stays_close_to_fp32(smollm2_dir):
    """Real SmolLM2-135M-Instruct, int4 (group 32, round to nearest; the head int8) on an fp32 model, scored on this
    file's source: the cross-entropy within 2% of fp32's and the top token the same at 90% of the positions
    (measured: -0.06% and 96.1%; these weights were 4-bit already, see docs/speed.md); benchmarks/bench_quality.py
    has the perplexity against llama.cpp's."""
    from tokenizer_bpe import Tokenizer
    text = torch.tensor([Tokenizer.from_file(smollm2_dir).encode(Path(__file__).read_text())[:256]])
    fp32 = smollm2.SmolLM2.from_pretrained(smollm2_dir)
    with torch.no_grad():
        want = fp32(text)[0, :-1]
        got = fast(fp32, weights="int4")(text)[0, :-1]
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    assert F.cross_entropy(got, text[0, 1:]) <= 1.02 * F.cross_entropy(want, text[0, 1:])


# -----------------------------------------------------------------------------
# Threads


# -----------------------------------------------------------------------------
# compile_decode: the decode step under torch.compile


PRODUCTS = ("aten::_weight_int4pack_mm_for_cpu", "aten::_weight_int8pack_mm", "quantized::linear_dynamic",
            "fast_decode::int4_linear", "fast_decode::int6_linear", "fast_decode::int8_linear",
            "fast_decode::bf16_linear")


def product_calls(step, kernels=PRODUCTS) -> dict:
    """{kernel: calls} of the weight products (or other kernels) that running step() makes, as the profiler sees
    them."""
    from torch.profiler import profile
    with profile() as prof:
        step()
    return {e.key: e.count for e in prof.key_averages() if e.key in kernels}


@needs_int4
@pytest.mark.parametrize("weights", [None, "int4", "bf16"])
@pytest.mark.parametrize("name", ["smollm2", "llama31"])
def test_compile_decode_steps_as_the_eager_model(name, weights, checkpoints):
    """compile_decode: every one-token step of the compiled model gives the eager model's logits (fp32: within
    1e-4 of the largest; int4: 2%, the bf16 rounding of the products' input, which a fused loop's other order of
    sums moves; a bf16 model: 3%, its rounding); a stacked product runs once per step, not once per sibling, as in
    eager; attention runs on fast_decode.cpp's decode_attention, once a layer, where it builds (else on the flash
    kernel); and a second request, whose cache has another length, compiles no new graph."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    bf16 = weights == "bf16"
    eager = fast(load(name, checkpoints).to(torch.bfloat16) if bf16 else load(name, checkpoints),
                 weights=None if bf16 else weights)
    compiled = fast_decode.compile_decode(copy.deepcopy(eager))
    with torch.inference_mode():  # (tensors made inside it, as generate() makes them: dynamo guards on the kind)
        prompt, pad, tol = torch.tensor([[5, 7, 11, 13, 17, 19, 23]]), torch.zeros(1, dtype=torch.long), None
        for model in (eager, compiled):
            model.setup_cache(1, 20)
            model.forward_cached(prompt, torch.arange(7), pad)  # the prefill, eager in both (pad: as generate())
        for pos in range(7, 12):
            token, slot = torch.tensor([[pos * 3 % 50 + 1]]), torch.tensor([pos])
            want, got = eager.forward_cached(token, slot, pad), compiled.forward_cached(token, slot, pad)
            tol = tol or {None: 1e-4, "int4": 0.02, "bf16": 0.03}[weights] * want.abs().max().item()
            torch.testing.assert_close(got, want, rtol=0, atol=tol)
        slot = torch.tensor([12])
        calls = product_calls(lambda: eager.forward_cached(token, slot, pad))
        assert product_calls(lambda: compiled.forward_cached(token, slot, pad)) == calls
        assert bool(calls) == (weights == "int4" or bf16 and fast_decode.kernels())  # (bf16: its one-row product)
        attention = ("fast_decode::decode_attention", "aten::_scaled_dot_product_flash_attention_for_cpu")
        n = compiled.args.n_layers
        assert product_calls(lambda: compiled.forward_cached(token, slot, pad), attention) == (
            {attention[0]: n} if fast_decode.kernels() else {attention[1]: n})
    for model in (eager, compiled):
        model.clear_cache()
    frames = counters["frames"]["ok"]
    assert len(compiled.generate([[3, 4, 5]], 9, stop_tokens=[])[0]) == 9  # a cache of 12 slots, not 20
    assert counters["frames"]["ok"] == frames


def one_call_against_own(name: str, weights: str) -> tuple:
    """A tiny random model of smollm2.py or llama31.py (every width a multiple of 64, as fast_decode.cpp's tiles take;
    norms not ones), fast(weights=...) ("bf16": the model in bf16, fast(model)), decoding two left-padded rows, one
    step at a time after a prefill: the largest difference of its logits and of its caches' new slots from the
    model's own step (its own trunk), each relative to the largest value; and {kernel: calls} of a step of each."""
    import llama31, smollm2  # noqa: E401 (also when run alone in a subprocess)
    from fast_decode import fast, one_call
    from tests.test_fast_decode import product_calls
    module = {"smollm2": smollm2, "llama31": llama31}[name]
    cls = module.SmolLM2 if name == "smollm2" else module.Llama
    torch.manual_seed(0)
    args = module.ModelArgs.from_hf_config(dict(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, intermediate_size=192,
        vocab_size=320, max_position_embeddings=64, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True))
    model = cls(args).eval()
    with torch.no_grad():
        for norm in [p for p in model.parameters() if p.dim() == 1]:
            norm.uniform_(0.5, 1.5)
    model = fast(model.to(torch.bfloat16)) if weights == "bf16" else fast(model, weights=weights)
    assert one_call(model)
    own = copy.deepcopy(model)
    del own.trunk
    assert one_call(model) and not one_call(own) and copy.deepcopy(model).trunk.model is not model
    prompt, pad, logits, caches = torch.randint(3, 300, (2, 6)), torch.tensor([0, 2]), 0.0, 0.0
    with torch.inference_mode():
        for m in (model, own):
            m.setup_cache(2, 16)
            m.forward_cached(prompt, torch.arange(6), pad)
        for pos in range(6, 12):
            token, slot = torch.randint(3, 300, (2, 1)), torch.tensor([pos])
            got, want = model.forward_cached(token, slot, pad), own.forward_cached(token, slot, pad)
            logits = max(logits, ((got - want).abs().max() / want.abs().max()).float().item())
            for a, b in zip(model.modules(), own.modules()):
                if type(a).__name__ == "KVCache":
                    for k in ("k", "v"):
                        new, old = getattr(a, k)[:, :, pos].float(), getattr(b, k)[:, :, pos].float()
                        caches = max(caches, ((new - old).abs().max() / old.abs().max()).item())
        kernels = ("fast_decode::llama_layers", "fast_decode::int4_linear", "fast_decode::int6_linear",
                   "fast_decode::int8_linear")
        calls = [product_calls(lambda: m.forward_cached(token, torch.tensor([12]), pad), kernels)
                 for m in (model, own)]
    return logits, caches, calls


@pytest.mark.parametrize("weights", ["int4", "int8", "bf16"])
@pytest.mark.parametrize("name", ["smollm2", "llama31"])
def test_one_call_step_is_the_models_own_step(name, weights):
    """A smollm2.py or llama31.py model whose products fast_decode.cpp's llama_layers takes (4- and 8-bit tiles in
    float32, bf16 weights in bf16) decodes a step in one call of it (and its output head): its logits and the keys
    and values it writes are the model's own step's, with GQA, RoPE, left padding and two rows; and so on the AVX2
    build (held to AVX2 in a subprocess). Quantized: to 2e-3 of the largest (the same products, whose block
    rounding of a norm's output summed in another order may land one step apart; 1e-7 here), and the model's own
    step makes one product call per stack and layer. bf16: to 2e-2 (each value rounded to bf16 where the model
    rounds it; attention summed in another order than the flash kernel's moves a rounding by one bf16 step, 2^-8)."""
    if not fast_decode.kernels():
        pytest.skip("fast_decode.cpp's kernels need an x86 CPU with AVX2 and a C++ compiler")
    logits, caches, (one, own) = one_call_against_own(name, weights)
    tol = 2e-2 if weights == "bf16" else 2e-3
    assert logits < tol and caches < tol, (logits, caches)
    if weights == "bf16":
        assert one == {"fast_decode::llama_layers": 1} and "fast_decode::llama_layers" not in own
    else:
        product = f"fast_decode::{weights}_linear"
        head = "fast_decode::int6_linear" if weights == "int4" else product  # (the output head: 6- or 8-bit)
        assert one == {"fast_decode::llama_layers": 1, head: 1}
        assert own == ({product: 8, head: 1} if weights == "int4" else {product: 8 + 1})
    if "avx512f" not in Path("/proc/cpuinfo").read_text():
        return
    code = (f"import sys, torch; sys.path.insert(0, {str(ROOT)!r})\n"
            f"from tests.test_fast_decode import one_call_against_own\n"
            f"print(torch.backends.cpu.get_cpu_capability(), *one_call_against_own({name!r}, {weights!r})[:2])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, ATEN_CPU_CAPABILITY="avx2"))
    assert out.returncode == 0, out.stderr[-2000:]
    ran, logits, caches = out.stdout.split()[-3:]
    assert ran == "AVX2" and float(logits) < tol and float(caches) < tol, out.stdout


def test_one_call_step_only_where_every_product_is_on_the_tiles(checkpoints):
    """Where a layer is not on fast_decode.cpp's tiles (here: a down projection 160 wide, not a multiple of 64), the
    model is in bf16 with quantized weights or in float32 with float ones, or its class is not smollm2.py's or
    llama31.py's, the step stays the model's own."""
    for model in (fast(load("smollm2", checkpoints), weights="int4"),
                  fast(load("smollm2", checkpoints).to(torch.bfloat16)),
                  fast(load("llama31", checkpoints).to(torch.bfloat16), weights="int8"),
                  fast(load("llama31", checkpoints)), fast(load("nanollm", checkpoints), weights="int8")):
        assert not fast_decode.one_call(model)


@pytest.mark.parametrize("name", ["nanollm", "lm2"])
def test_compile_decode_refuses_a_step_that_reads_lengths_from_tensors(name, checkpoints):
    """nanollm.py's and lm2.py's steps would compile again whenever a length read from a tensor changes: compile_decode
    and the CLIs' --compile say so in one line (the CLI before it loads anything) and leave the model as it was."""
    model = load(name, checkpoints)
    with pytest.raises(ValueError, match="smollm2.py's and llama31.py's models") as e:
        fast_decode.compile_decode(model)
    assert "\n" not in str(e.value) and "forward_cached" not in vars(model)
    with pytest.raises(SystemExit, match="error: compiling the decode step") as e:
        MODELS[name].main(prompt="hi", ckpt_dir="no/such/folder", compile=True)
    assert "\n" not in str(e.value)


def test_decode_threads_leaves_busy_cores_to_their_jobs(monkeypatch):
    """One thread per core that other jobs leave idle, at least one, at most what torch would use."""
    monkeypatch.setattr(fast_decode, "MAX_THREADS", 4)  # on a machine of 4 cores that this process may use
    monkeypatch.setattr(fast_decode.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    for busy, want in ((0.0, 4), (0.4, 4), (1.0, 3), (2.6, 1), (7.0, 1)):
        monkeypatch.setattr(fast_decode, "busy_cpus", lambda seconds=0.1, busy=busy: busy)
        assert fast_decode.decode_threads() == want
    assert 0 <= fast_decode.busy_cpus(0.05)  # a real sample of /proc/stat (0 where there is none)


def test_fast_sets_decode_threads_only_when_asked(monkeypatch):
    """fast(model) leaves torch's thread count alone; fast(model, threads=True), as the CLIs call it, sets it."""
    monkeypatch.setattr(fast_decode, "decode_threads", lambda: 1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        fast_decode.fast(nn.Sequential(nn.Linear(4, 4)))
        assert torch.get_num_threads() == 2
        fast_decode.fast(nn.Sequential(nn.Linear(4, 4)), threads=True)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
