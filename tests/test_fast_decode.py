"""fast_decode.py against the plain model files: every fast path computes what nn.Linear computes (fp32 within
1e-6 per product and identical greedy tokens; bf16 within bf16 rounding and as close to fp32 as plain bf16;
int8 what the same model computes with its weights rounded to int8, within bf16 rounding of the activations),
and `fast(model)` keeps names, state_dict, tied weights, copies, saving, training and LoRA as they were.

    python -m pytest -q tests/test_fast_decode.py
"""

import copy
import io
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
from fast_decode import A8W8Linear, FastLinear, Int8Linear, fast, quantize_int8  # noqa: E402

MODELS = {"smollm2": smollm2, "llama31": llama31, "nanollm": nanollm, "lm2": lm2}
needs_onednn = pytest.mark.skipif(not fast_decode.BF16_ONEDNN, reason="this CPU has no oneDNN bf16 kernels: "
                                  "bf16 products stay with F.linear")


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
    """A tiny random HF checkpoint per file: Llama for smollm2, llama31 and lm2; DeepseekV3 for nanollm."""
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=160,
        vocab_size=300, max_position_embeddings=128, rope_theta=100000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2))
    dsv3 = DeepseekV3ForCausalLM(DeepseekV3Config(
        vocab_size=96, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2, n_routed_experts=8,
        num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
        qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10, max_position_embeddings=64, eos_token_id=1,
        bos_token_id=0))
    paths = {}
    for name, hf in (("llama", llama), ("dsv3", dsv3)):
        with torch.no_grad():  # weights of O(1/sqrt(fan_in)), so every product matters to the logits
            for p in hf.parameters():
                p.copy_(torch.randn_like(p) / p.size(-1) ** 0.5 if p.dim() > 1 else 1 + 0.1 * torch.randn_like(p))
        paths[name] = tmp_path_factory.mktemp(name)
        hf.save_pretrained(paths[name])
    return {k: paths["dsv3" if k == "nanollm" else "llama"] for k in MODELS}


def load(name, checkpoints, dtype=torch.float32):
    return model_class(MODELS[name]).from_pretrained(checkpoints[name], dtype=dtype)


# -----------------------------------------------------------------------------
# FastLinear alone


@pytest.mark.parametrize("n", [2, 3])
def test_one_row_product_split_across_threads(n):
    """The fp32 decode path (one row, a block of output rows per thread, bmm) computes F.linear's product; other
    shapes, and an output width the threads do not divide, take F.linear itself."""
    torch.set_num_threads(n)
    layer = fast(nn.Sequential(nn.Linear(48, 96, bias=False)))[0]
    odd = fast(nn.Sequential(nn.Linear(48, 97, bias=False)))[0]
    with torch.no_grad():
        for x in (torch.randn(48), torch.randn(1, 1, 48), torch.randn(3, 5, 48)):  # split, split, plain
            y = layer(x)
            assert y.shape == x.shape[:-1] + (96,)
            torch.testing.assert_close(y, F.linear(x, layer.weight), rtol=1e-6, atol=1e-6)
        x = torch.randn(1, 1, 48)
        assert torch.equal(odd(x), F.linear(x, odd.weight))


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


@pytest.mark.parametrize("slow", ["split", "F.linear"])
def test_fp32_route_is_the_one_measured_faster(slow, monkeypatch):
    """fp32 one-row products on more than one thread: the first calls of a shape alternate between the split and
    F.linear, timed; the faster route takes every later call of that shape (and thread count). Each route
    computes F.linear's product. (A clock that the routes advance, 1 s for the slow one, 1 ms for the other: on
    a busy machine a real one may rank them either way.)"""
    torch.set_num_threads(2)
    monkeypatch.setattr(fast_decode, "SPLIT_WINS", {})
    monkeypatch.setattr(fast_decode, "TRIALS", {})
    now = [0.0]
    monkeypatch.setattr(fast_decode, "clock", lambda: now[0])
    calls = {"split": 0, "F.linear": 0}
    split, linear = FastLinear.split_product, F.linear

    def counted(route, fn):
        def run(*args):
            calls[route] += 1
            now[0] += 1.0 if route == slow else 1e-3
            return fn(*args)
        return run

    monkeypatch.setattr(FastLinear, "split_product", counted("split", split))
    monkeypatch.setattr(fast_decode.F, "linear", counted("F.linear", linear))
    layers = fast(nn.Sequential(nn.Linear(48, 96, bias=False), nn.Linear(48, 96, bias=False)))
    x = torch.randn(1, 1, 48)
    with torch.no_grad():
        for i in range(2 * fast_decode.TRIAL_CALLS):  # the trial, on both layers of the shape
            assert not fast_decode.SPLIT_WINS
            torch.testing.assert_close(layers[i % 2](x), linear(x, layers[i % 2].weight), rtol=1e-6, atol=1e-6)
        assert calls == {"split": fast_decode.TRIAL_CALLS, "F.linear": fast_decode.TRIAL_CALLS}
        assert fast_decode.SPLIT_WINS == {(96, 48, 2): slow == "F.linear"}
        for i in range(4):
            torch.testing.assert_close(layers[i % 2](x), linear(x, layers[i % 2].weight), rtol=1e-6, atol=1e-6)
    fast_route = "split" if slow == "F.linear" else "F.linear"
    assert calls[fast_route] == fast_decode.TRIAL_CALLS + 4 and calls[slow] == fast_decode.TRIAL_CALLS


class SiblingsParent(nn.Module):
    """An attention's q/k/v and an MLP's gate/up, as the model files name them, and a lone o_proj."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(64, 96, bias=False), nn.Linear(64, 32, bias=False), \
            nn.Linear(64, 32, bias=False)
        self.o_proj = nn.Linear(96, 64, bias=False)
        self.gate_proj, self.up_proj = nn.Linear(64, 160, bias=False), nn.Linear(64, 160, bias=False)

    def forward(self, x):  # the call order of the model files: q, k, v on one input; gate, up on one input
        return [getattr(self, n)(x) for n in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")]


def test_siblings_are_grouped_by_name():
    """fast() groups q/k/v and gate/up of one parent (FastLinear, no bias, one input width); a lone layer, a
    biased one or a LoRALinear stays out; applying fast again regroups."""
    outer = fast(nn.Sequential(SiblingsParent()))  # (apply_lora wraps layers below a parent module)
    model = outer[0]
    qkv, gate_up = model.q_proj.siblings, model.gate_proj.siblings
    assert qkv.members == [model.q_proj, model.k_proj, model.v_proj] and qkv.bounds == [0, 96, 128, 160]
    assert gate_up.members == [model.gate_proj, model.up_proj] and model.up_proj.siblings is gate_up
    assert "siblings" not in vars(model.o_proj)
    model.v_proj.bias = nn.Parameter(torch.zeros(32))
    finetune.apply_lora(outer, 4, 8.0, 0.0, ["k_proj"])
    fast(outer)
    assert not any("siblings" in vars(getattr(model, n)) for n in ("q_proj", "k_proj", "v_proj"))
    assert model.up_proj.siblings is not gate_up and model.up_proj.siblings.members == [model.gate_proj,
                                                                                        model.up_proj]


@needs_onednn
def test_bf16_siblings_share_one_stacked_product():
    """bf16, one row: once q/k/v (gate/up) were seen called with one input, the first of them computes one product
    through a stacked reordered copy of their weights and the others take their slices; the products are
    F.linear's; the layers' own reordered copies go; a weight updated in place (an optimizer step) remakes the
    stacked copy; copies, saving and the state_dict are as before; with autograd on, F.linear."""
    torch.manual_seed(0)
    model = fast(SiblingsParent()).to(torch.bfloat16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")

    def check(x):
        for n, y in zip(names, model(x)):
            torch.testing.assert_close(y, F.linear(x, getattr(model, n).weight))

    with torch.no_grad():
        for _ in range(3):  # the first round is seen, then stacked
            check(torch.randn(1, 1, 64, dtype=torch.bfloat16))
        qkv, gate_up = model.q_proj.siblings, model.gate_proj.siblings
        assert qkv.on and gate_up.on and qkv.weight.is_mkldnn and gate_up.weight.is_mkldnn
        assert all(m.reordered.weight is None for m in qkv.members + gate_up.members)
        assert model.o_proj.reordered_weight() is not None  # a lone layer keeps its own
        x = torch.randn(1, 64, dtype=torch.bfloat16)
        q = model.q_proj(x)
        assert qkv.pending[0]() is x and qkv.left == {1, 2}
        assert torch.equal(model.q_proj(x), q)  # called twice: its slice again
        model.k_proj.weight.mul_(2)  # updated in place between two siblings' calls: k's own product
        torch.testing.assert_close(model.k_proj(x), F.linear(x, model.k_proj.weight))
        check(x)
        check(torch.randn(64, dtype=torch.bfloat16))
        check(torch.randn(3, 64, dtype=torch.bfloat16))  # more than one row: each layer's own product
        assert qkv.on
    held = qkv.weight
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    ys = model(x)
    assert all(y.requires_grad for y in ys)  # autograd on: F.linear
    sum(y.float().sum() for y in ys).backward()
    opt.step()  # every weight updated in place
    with torch.no_grad():
        check(torch.randn(1, 1, 64, dtype=torch.bfloat16))
    assert qkv.weight is not held and qkv.on
    assert model.state_dict().keys() == state.keys()
    clone = copy.deepcopy(model)  # the stacked oneDNN copy stays behind: the clone observes afresh
    assert not clone.q_proj.siblings.on and clone.q_proj.siblings.members[0] is clone.q_proj
    torch.save(model, io.BytesIO())
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(1, 1, 64, dtype=torch.bfloat16)
            for n, y, want in zip(names, clone(x), model(x)):
                assert torch.equal(y, want)


@needs_onednn
def test_bf16_siblings_called_apart_take_their_own_products():
    """Stacking turns off, and every product stays right, when the members are not called with one input: a layer
    called alone with another input (lm2.py's memory: q_proj reads tokens, k_proj and v_proj its bank), or a
    member that a LoRA wrapper replaced after fast() (never called again)."""
    torch.manual_seed(0)
    outer = fast(nn.Sequential(SiblingsParent())).to(torch.bfloat16)
    model = outer[0]
    qkv = model.q_proj.siblings
    xs = [torch.randn(1, 64, dtype=torch.bfloat16) for _ in range(8)]
    with torch.no_grad():
        for x in xs[:2]:
            model(x)
        assert qkv.on
        model.q_proj(xs[2])  # a stacked product, then k and v are called with other inputs
        for x in xs[3:5]:
            for n in ("k_proj", "v_proj"):
                torch.testing.assert_close(getattr(model, n)(x), F.linear(x, getattr(model, n).weight))
        assert not qkv.on and qkv.weight is None
        for x in xs[5:]:  # q on one input, k and v on another: never seen together, never stacked
            torch.testing.assert_close(model.q_proj(x), F.linear(x, model.q_proj.weight))
            for n in ("k_proj", "v_proj"):
                torch.testing.assert_close(getattr(model, n)(xs[0]), F.linear(xs[0], getattr(model, n).weight))
        assert not qkv.on
    finetune.apply_lora(outer, 4, 8.0, 0.0, ["v_proj"])  # after fast(): the old v_proj is no longer called
    outer.to(torch.bfloat16)
    with torch.no_grad():
        for x in xs:
            for n, y in zip(("q_proj", "k_proj", "v_proj"), model(x)):
                lora = getattr(model, n)
                torch.testing.assert_close(y, lora(x) if n == "v_proj" else F.linear(x, lora.weight))
    assert not qkv.on


def test_int8_quantization_and_product():
    """quantize_int8 rounds each row to its nearest step of a bf16 scale; Int8Linear's product is the fp32 product
    of the bf16-rounded input with those int8 weights, rounded to bf16, for one row and for many, with a bias;
    the int8 copy is remade when the weight changes, stays out of deep copies, and training takes F.linear."""
    torch.manual_seed(0)
    w = torch.randn(96, 64)
    w[3] = 0  # an all-zero row must not divide by zero
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and q.abs().max() <= 127
    step = scale.float()[:, None]
    assert ((q * step - w).abs() <= step / 2 + w.abs() / 256).all()  # half a step (a clipped maximum: 1/256)
    assert (q[3] == 0).all() and (q.abs().amax(1)[torch.arange(96) != 3] >= 126).all()  # each row uses its range
    layer = fast(nn.Sequential(nn.Linear(64, 96)), weights="int8")[0]
    assert type(layer) is Int8Linear
    with torch.no_grad():
        for x in (torch.randn(64), torch.randn(1, 1, 64), torch.randn(3, 5, 64)):
            q, scale = quantize_int8(layer.weight)
            want = (F.linear(x.bfloat16().float(), q.float()) * scale.float()).bfloat16().float() + layer.bias
            y = layer(x)
            assert y.shape == x.shape[:-1] + (96,) and y.dtype == x.dtype
            torch.testing.assert_close(y, want, rtol=2 ** -8, atol=1e-5)
        held = layer.int8.weight
        layer.weight.mul_(-1)  # an in-place update: the copy follows
        torch.testing.assert_close(layer(x), -want + 2 * layer.bias, rtol=2 ** -8, atol=1e-5)
        assert layer.int8.weight is not held
    assert copy.deepcopy(layer).int8.weight is None  # remade at first use
    x = torch.randn(2, 64, requires_grad=True)
    layer(x).sum().backward()  # with autograd on: nn.Linear's own product, gradients to weight and input
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(2, -1))
    assert layer.weight.grad is not None
    with pytest.raises(ValueError, match="int8"):
        fast(nn.Sequential(nn.Linear(4, 4)), weights="int4")



# -----------------------------------------------------------------------------
# fast(model) on each model file


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
    """fp32: logits within 1e-5 of the plain model's (the split sums in another order) and the same greedy
    tokens, batched and ragged, with and without a stream."""
    plain = load(name, checkpoints)
    quick = fast(copy.deepcopy(plain))  # (lm2's fresh memory is random: one draw for both)
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
    for smollm2.py against HF); its greedy tokens are the plain bf16 model's for as long as both agree with fp32."""
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


@needs_onednn
@pytest.mark.parametrize("name", MODELS)
def test_fast_bf16_decodes_with_stacked_siblings(name, checkpoints, monkeypatch):
    """bf16 decoding: q/k/v and gate/up take stacked products (nanollm's MLA has no k_proj/v_proj: its MLPs do),
    and give the tokens of the same fast model with every layer on its own product; the state_dict is the
    plain model's."""
    plain = load(name, checkpoints, torch.bfloat16)
    state = plain.state_dict()
    stacked = fast(copy.deepcopy(plain))
    monkeypatch.setattr(fast_decode, "SIBLINGS", ())
    alone = fast(copy.deepcopy(plain))
    prompt = [[5, 7, 11, 13, 17, 19, 23]]
    assert stacked.generate(prompt, 16, stop_tokens=[]) == alone.generate(prompt, 16, stop_tokens=[])
    groups = {id(m.siblings): m.siblings for m in stacked.modules() if "siblings" in vars(m)}
    used = [g for g in groups.values() if g.weight is not None]
    assert used and {len(g.members) for g in used} == ({2} if name == "nanollm" else {2, 3})
    assert stacked.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in stacked.state_dict().items())


@pytest.mark.parametrize("name", MODELS)
def test_fast_int8_keeps_parameters_and_computes_the_rounded_model(name, checkpoints):
    """weights="int8": the same parameters, names and state_dict (the float weights stay; the int8 copies are
    not in it), every linear layer an Int8Linear; logits within bf16 rounding of the plain fp32 model whose
    weights are replaced by their int8 roundings, and greedy tokens that model would pick. fast(model) again
    goes back to FastLinear and drops the int8 copies."""
    model = load(name, checkpoints)
    rounded = copy.deepcopy(model)
    state = model.state_dict()
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    fast(model, weights="int8")
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [n for n, m in model.named_modules() if type(m) is Int8Linear] == linears and linears
    with torch.no_grad():
        for m in rounded.modules():
            if type(m) is nn.Linear:
                q, scale = quantize_int8(m.weight)
                m.weight.copy_(q * scale.float()[:, None])
    tokens = torch.tensor([[5, 7, 11, 13, 17, 19, 23]])
    with torch.no_grad():
        want, got = rounded(tokens), model(tokens)
    torch.testing.assert_close(got, want, rtol=0.02, atol=0.02 * want.abs().max().item())
    # greedy: every token the int8 model picks is, on the same prefix, the rounded model's best token or within
    # twice the largest difference seen above of it (a near tie, which bf16 activations may break either way)
    tol = (got - want).abs().max().item()
    prompt = [5, 7, 11, 13, 17, 19, 23]
    # (nanollm's absorbed MLA decode multiplies with kv_b_proj.weight itself, the float weight: decode naively)
    picked = model.generate([prompt], 16, stop_tokens=[], **({"absorb": False} if name == "nanollm" else {}))[0]
    with torch.no_grad():
        logits = rounded(torch.tensor([prompt + picked]))[0, len(prompt) - 1:-1]  # (16, vocab): each step's
    chosen = logits.gather(1, torch.tensor(picked)[:, None])[:, 0]
    assert (chosen >= logits.max(1).values - 2 * tol).all()
    fast(model)
    assert not any(type(m) is Int8Linear or "int8" in vars(m) for m in model.modules())


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
# Threads


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


# -----------------------------------------------------------------------------
# A8W8 (weights="a8w8": SmoothQuant, int8 activations and weights)


def test_a8w8_calibration_and_product():
    """weights="a8w8": the calibration run records each layer's largest |input| per channel (a plain attribute,
    not in state_dict); the one-row product (fbgemm's kernel) and the many-row one (rowwise_a8w8) round alike, so
    several rows give what each row gives alone; the product is within 0.5% of the float one even with an outlier
    channel 30x the others (measured 0.17%; 0.78% with the smoothing alone, no float outlier channels); the copy
    follows in-place updates and stays out of deep copies; training takes F.linear; weights="a8w8" without
    calibration (or calibration without it) is a clear error."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96))
    cal = torch.randn(32, 64)
    cal[:, 5] *= 30  # an outlier channel, as the inputs of transformer layers have
    state = model.state_dict()
    layer = fast(model, weights="a8w8", calibration=cal)[0]
    assert type(layer) is A8W8Linear
    torch.testing.assert_close(layer.act_absmax, cal.abs().amax(0))
    assert model.state_dict().keys() == state.keys() and all(torch.equal(v, state[k]) for k, v in
                                                             model.state_dict().items())
    x = torch.randn(3, 5, 64)
    x[..., 5] *= 30
    with torch.no_grad():
        y = layer(x)
        rows = torch.cat([layer(r) for r in x.reshape(-1, 1, 64)]).view(3, 5, 96)  # one row per call
        torch.testing.assert_close(y, rows, rtol=1e-5, atol=1e-5)
        want = F.linear(x, layer.weight, layer.bias)
        assert (y - want).abs().max() <= 0.005 * want.abs().max()
        layer.weight.mul_(-1)  # in place: the copy follows (s depends on |w| only: the exact negation)
        torch.testing.assert_close(layer(x) - layer.bias, -(y - layer.bias), rtol=1e-5, atol=1e-5)
        twin = copy.deepcopy(layer)
        assert twin.a8w8.weight is None and torch.equal(twin(x), layer(x))  # remade at first use
        bf16 = copy.deepcopy(layer).to(torch.bfloat16)
        torch.testing.assert_close(bf16(x.bfloat16()).float(), layer(x), rtol=0.02, atol=0.02 * want.abs().max())
    xg = torch.randn(2, 64, requires_grad=True)
    layer(xg).sum().backward()
    torch.testing.assert_close(xg.grad, layer.weight.sum(0).expand(2, -1))
    fresh = nn.Sequential(nn.Linear(64, 96))
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():  # a new calibration remakes the A8W8 copy: as on a model never calibrated before
        again = fast(model, weights="a8w8", calibration=cal * 3)[0](x)
        assert torch.equal(again, fast(fresh, weights="a8w8", calibration=cal * 3)[0](x))
    with pytest.raises(ValueError, match="calibration"):
        fast(nn.Sequential(nn.Linear(4, 4)), weights="a8w8")
    with pytest.raises(ValueError, match="calibration"):
        fast(nn.Sequential(nn.Linear(4, 4)), weights="int8", calibration=torch.randn(2, 4))


@pytest.mark.parametrize("name", MODELS)
def test_fast_a8w8_keeps_parameters_and_stays_close(name, checkpoints):
    """weights="a8w8" on each model file: the same parameters, names and state_dict; every linear layer the
    calibration reached an A8W8Linear, any other (an expert no token was routed to) an Int8Linear; logits within
    5% of the largest fp32 logit (measured 1.9%; nanollm on average, 1.5%); greedy decoding (one row per
    product, fbgemm) picks, at each step, the token the same model's many-row product (rowwise_a8w8) ranks
    first, but for a near tie. fast(model) again goes back to FastLinear and drops the copies and the ranges."""
    model = load(name, checkpoints)
    ref = copy.deepcopy(model)
    params, state = dict(model.named_parameters()), model.state_dict()
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    cal = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    fast(model, weights="a8w8", calibration=cal)
    assert dict(model.named_parameters()) == params and model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(type(m) is (Int8Linear if m.act_absmax is None else A8W8Linear) for m in linears)
    assert sum(type(m) is A8W8Linear for m in linears) >= len(linears) // 2
    prompt = [5, 7, 11, 13, 17, 19, 23]
    with torch.no_grad():
        want, got = ref(torch.tensor([prompt])), model(torch.tensor([prompt]))
    # (nanollm's MoE routes each token to its top experts: a nearly tied router score may flip and move a
    # position's logits far; its bound holds on average)
    diff = (got - want).abs()
    assert (diff.mean() if name == "nanollm" else diff.max()) <= 0.05 * want.abs().max()
    picked = model.generate([prompt], 12, stop_tokens=[], **({"absorb": False} if name == "nanollm" else {}))[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + picked]))[0, len(prompt) - 1:-1]  # (12, vocab), many rows at once
    chosen = logits.gather(1, torch.tensor(picked)[:, None])[:, 0]
    assert (chosen >= logits.max(1).values - 1e-3 * logits.abs().max()).all()
    fast(model)
    assert not any(type(m) in (A8W8Linear, Int8Linear) or {"a8w8", "int8", "act_absmax"} & set(vars(m))
                   for m in model.modules())


def test_real_smollm2_a8w8_stays_close_to_fp32(smollm2_dir):
    """Real SmolLM2-135M-Instruct, calibrated on one text (the repo's README) and scored on another (this
    file's source): the mean |logit difference| from fp32 within 0.3 and the top token the same at 92% of the
    positions (measured 0.24 and 95.7%; weights="int8", weight-only, 0.22 and 94.9%; without the outlier channels
    in float it was 0.44 and 87%), and the cross-entropy within 1.5% of fp32's (measured +0.6%);
    benchmarks/bench_int8_quality.py has the perplexity."""
    from tokenizer_bpe import Tokenizer
    tok = Tokenizer.from_file(smollm2_dir)
    cal = torch.tensor([tok.encode((ROOT / "README.md").read_text())[:256]])
    text = torch.tensor([tok.encode(Path(__file__).read_text())[:256]])
    fp32 = smollm2.SmolLM2.from_pretrained(smollm2_dir)
    with torch.no_grad():
        want = fp32(text)[0, :-1]
        got = fast(fp32, weights="a8w8", calibration=cal)(text)[0, :-1]
    assert (got - want).abs().mean() <= 0.3
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.92
    assert F.cross_entropy(got, text[0, 1:]) <= 1.015 * F.cross_entropy(want, text[0, 1:])
