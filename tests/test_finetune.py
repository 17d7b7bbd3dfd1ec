"""Tests of finetune.py on a tiny SmolLM2-shaped model and a tokenizer trained here (vocab ~300), CPU only.

Data handling (chat masks, packing, shards), LoRA merging, trainable sets, the HF export (loaded by smollm2.py
and by transformers), exact resume after SIGKILL, DDP/FSDP2 on gloo vs one process, and one-line user errors.
Run: python -m pytest tests/test_finetune.py -q
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import finetune as ft  # noqa: E402
import run_folder  # noqa: E402
import smollm2  # noqa: E402
from tokenizer_bpe import Tokenizer  # noqa: E402

WORDS = ("the cat sat on a mat while dogs ran far from home and birds sang in tall green trees "
         "near one quiet river under blue skies").split()
TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=320, max_seq_len=128)


pytestmark = pytest.mark.usefixtures("one_thread")


def sentences(rng, n):
    return [" ".join(rng.choice(WORDS, size=rng.integers(8, 40))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tokenizer, a random tiny 'pretrained' checkpoint in HF layout, and text / chat data."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    d = tmp_path_factory.mktemp("assets")
    rng = np.random.default_rng(0)
    texts = sentences(rng, 80)
    hf_tok = HFTokenizer(models.BPE())
    hf_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tok.decoder = decoders.ByteLevel()
    hf_tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=TINY["vocab_size"], special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    base = d / "base"
    base.mkdir()
    hf_tok.save(str(base / "tokenizer.json"))
    torch.manual_seed(0)
    args = smollm2.ModelArgs(**TINY)
    model = smollm2.SmolLM2(args)
    ft.init_weights(model)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})
    (base / "config.json").write_text(json.dumps(args.to_hf_config()))
    (d / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    chats = []
    for _ in range(60):
        a, b = (int(x) for x in rng.integers(0, 20, 2))
        chats.append({"messages": [{"role": "user", "content": f"what is {a} and {b}?"},
                                   {"role": "assistant", "content": f"{a} and {b} is {a + b}."}]})
    (d / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    return d


def flags(assets, out, *extra):
    return ["--ckpt_dir", str(assets / "base"), "--data", str(assets / "text.jsonl"), "--out_dir", str(out),
            "--seq_len", "32", "--batch_size", "4", "--eval_rows", "8", "--warmup_steps", "2", *extra]


def losses(out):
    return [r["loss"] for r in map(json.loads, open(Path(out) / "metrics.jsonl")) if "loss" in r]


def val_losses(out):
    return [r["val_loss"] for r in map(json.loads, open(Path(out) / "metrics.jsonl")) if "val_loss" in r]


def tiny_model():
    torch.manual_seed(0)
    model = smollm2.SmolLM2(smollm2.ModelArgs(**TINY))
    ft.init_weights(model)
    return model


# -----------------------------------------------------------------------------
# Data


def test_render_chat_trains_only_on_assistant_turns(assets):
    tok = Tokenizer.from_file(assets / "base")
    messages = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat on a mat"},
                {"role": "user", "content": "and dogs"}, {"role": "assistant", "content": "ran far"}]
    ids, mask = ft.render_chat(tok, smollm2.encode_chat, messages)
    assert ids == smollm2.encode_chat(tok, messages, add_generation_prompt=False)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "sat on a mat<|im_end|>\nran far<|im_end|>\n"


def test_packed_rows_mask_boundary_targets_and_number_documents():
    eot, T = 0, 8
    stream = np.array([5, 6, 7, eot, 8, 9, eot, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], dtype=np.uint32)
    keep = np.ones(len(stream), dtype=bool)
    keep[2] = False  # e.g. a user turn
    rows = ft.PackedRows([stream], [keep], T, eot)
    assert len(rows) == 2  # 17 tokens = 2 rows of 8 inputs (+1 shared target)
    x, y, d = rows.row(0)
    assert x.tolist() == [5, 6, 7, eot, 8, 9, eot, 10]
    # 7 masked by `keep`; 8 and 10 begin new documents, so nothing before them may predict them
    assert y.tolist() == [6, ft.IGNORE, eot, ft.IGNORE, 9, eot, ft.IGNORE, 11]
    assert d.tolist() == [0, 0, 0, 0, 1, 1, 1, 2]
    x, y, d = rows.row(1)
    assert x.tolist() == list(range(11, 19)) and y.tolist() == list(range(12, 20)) and d.max() == 0
    assert rows.batch([1, 1])[2] is None  # single-document rows take the plain causal path


def test_packed_documents_do_not_see_each_other_in_the_model():
    """A document's logits inside a packed row equal its logits alone (attention and RoPE positions)."""
    model = tiny_model().eval()
    eot, T = 0, 24
    doc_a, doc_b = list(range(10, 19)) + [eot], list(range(40, 55))
    rows = ft.PackedRows([np.array(doc_a + doc_b, dtype=np.uint32)], [None], T, eot)
    x, y, d = rows.batch([0])
    with torch.no_grad():
        packed = model(x, doc_ids=d)
        alone = model(torch.tensor([doc_b[:T - len(doc_a)]]))
    torch.testing.assert_close(packed[:, len(doc_a):], alone, atol=1e-5, rtol=1e-5)
    assert y[0, len(doc_a) - 1] == ft.IGNORE


def test_shards_roundtrip_and_prepare(assets, tmp_path):
    tokens = np.arange(1000, dtype=np.uint32)
    for vocab, version, dtype in ((320, 1, np.uint16), (100_000, 2, np.uint32)):
        path = str(tmp_path / f"v{version}.bin")
        ft.write_shard(path, tokens, vocab)
        header = np.fromfile(path, dtype=np.int32, count=256)
        assert header[:3].tolist() == [20240520, version, 1000]
        assert os.path.getsize(path) == 1024 + 1000 * np.dtype(dtype).itemsize
        np.testing.assert_array_equal(ft.read_shard(path), tokens)

    docs = [json.loads(line)["text"] for line in open(assets / "text.jsonl")]
    ft.prepare(str(assets / "text.jsonl"), tokenizer=str(assets / "base"), out_dir=str(tmp_path / "shards"),
               val_frac=0.1)
    tok = Tokenizer.from_file(assets / "base")
    expected = [t for doc in docs for t in [0] + tok.encode(doc)]  # llm.c: end-of-text before each document
    train, val = (ft.read_shard(str(tmp_path / f"shards/{split}_000000.bin")) for split in ("train", "val"))
    assert list(train) + list(val) == expected and 0.05 < len(val) / len(expected) < 0.15


def test_validation_holds_out_whole_documents(assets, tmp_path):
    """Text files and shards hold out the last documents whole; a single document gives up its end."""
    tok = Tokenizer.from_file(assets / "base")
    eot = tok.special_tokens["<|endoftext|>"]
    n = len(ft.tokenize_files([str(assets / "text.jsonl")], tok, None)[0])
    cfg = ft.TrainConfig(data=str(assets / "text.jsonl"), seq_len=32, val_frac=0.1)
    train, val = (rows.streams[0][rows.masks[0]] for rows in ft.load_data(cfg, tok, None))  # padding dropped
    assert train[-1] == eot and len(train) + len(val) == n and 0.05 < len(val) / n < 0.15
    ft.prepare(str(assets / "text.jsonl"), tokenizer=str(assets / "base"), out_dir=str(tmp_path / "shards"),
               val_frac=0.1)
    assert ft.read_shard(str(tmp_path / "shards/val_000000.bin"))[0] == eot  # llm.c: a document starts with it
    (tmp_path / "book.txt").write_text(" ".join(sentences(np.random.default_rng(1), 40)))
    train, val = (rows.streams[0][rows.masks[0]]
                  for rows in ft.load_data(ft.TrainConfig(data=str(tmp_path / "book.txt"), seq_len=32), tok, None))
    assert len(val) == int((len(train) + len(val)) * 0.05)  # one document: the end of it, as before


# -----------------------------------------------------------------------------
# LoRA and modes


def test_lora_merged_weights_reproduce_the_adapted_model():
    model = tiny_model()
    wrapped = ft.apply_lora(model, rank=4, alpha=8.0, dropout=0.1, targets=["q_proj", "v_proj", "down_proj"])
    assert len(wrapped) == 6
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"{n}.lora_{ab}" for n in wrapped for ab in "AB"}
    for n in wrapped:
        torch.nn.init.normal_(model.get_submodule(n).lora_B, std=0.1)  # B starts at 0: give the adapter an effect
    model.eval()
    x = torch.randint(0, TINY["vocab_size"], (2, 16))
    merged = smollm2.SmolLM2(smollm2.ModelArgs(**TINY)).eval()
    merged.load_state_dict(run_folder.merge_lora_state_dict(model.state_dict(), 8.0 / 4), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(merged(x), tiny_model().eval()(x), atol=1e-3)  # the adapters did change it


def test_lora_on_lm2_trains_the_new_memory_in_full():
    """LM2's memory is randomly initialised on a pretrained Llama: no adapters, every parameter trains."""
    import lm2
    model = lm2.LM2(lm2.ModelArgs(**{k: v for k, v in TINY.items() if k != "hidden_dim"}, head_dim=8,
                                  hidden_dim=64, mem_slots=8, segment_len=16))
    ft.set_trainable(model, ft.TrainConfig(model="lm2", mode="lora"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    memory = {n for n, _ in model.named_parameters() if ".memory." in n}
    assert memory and memory <= trainable and not any(".memory." in n and ".lora_" in n for n in trainable)
    assert all(n.endswith((".lora_A", ".lora_B")) for n in trainable - memory)
    assert any(".self_attn.q_proj.lora_A" in n for n in trainable)  # the pretrained layers still get adapters


@pytest.mark.parametrize("mode", ["full", "norm", "frozen_embed"])
def test_modes_choose_trainable_parameters(mode):
    model = tiny_model()
    ft.set_trainable(model, ft.TrainConfig(mode=mode))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    names = {n for n, _ in model.named_parameters()}
    expected = {"full": names, "norm": {n for n in names if n.endswith("norm.weight")},
                "frozen_embed": names - {"model.embed_tokens.weight"}}[mode]
    assert trainable == expected and len(trainable) > 0


@pytest.mark.parametrize("layout", ["folder", "renamed_file"])
def test_export_copies_the_tokenizer_the_run_loaded(assets, tmp_path, layout):
    """--tokenizer may be a folder or any file Tokenizer.from_file reads: the export holds that tokenizer as
    tokenizer.json, which our loader and transformers both read (a different tokenizer.json beside it is not it)."""
    from tokenizer_bpe import train
    from transformers import AutoTokenizer
    src = tmp_path / "tok"
    src.mkdir()
    if layout == "folder":
        (src / "tokenizer.json").write_bytes((assets / "base/tokenizer.json").read_bytes())
        tok_path = src
    else:
        train(WORDS * 3, vocab_size=270, special_tokens=["<|endoftext|>"]).save(str(src / "tokenizer.json"))
        tok_path = src / "mine.json"
        tok_path.write_bytes((assets / "base/tokenizer.json").read_bytes())
    out = tmp_path / "out"
    out.mkdir()
    (src / "generation_config.json").write_text('{"eos_token_id": 2}')  # another model's: must not travel along
    ft.export_hf(tiny_model(), str(out), smollm2.ModelArgs(**TINY).to_hf_config(), str(tok_path), 1.0, "float32")
    text = "the cat sat on a mat<|endoftext|>"
    expected = Tokenizer.from_file(assets / "base").encode(text, allowed_special="all")
    assert Tokenizer.from_file(out).encode(text, allowed_special="all") == expected
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == expected
    assert not (out / "generation_config.json").exists()
    # fine-tuning a checkpoint: its generation config (end-of-turn ids, sampling defaults) is the model's own
    ft.export_hf(tiny_model(), str(out), smollm2.ModelArgs(**TINY).to_hf_config(), str(tok_path), 1.0, "float32",
                 ckpt_dir=str(src))
    assert json.loads((out / "generation_config.json").read_text()) == {"eos_token_id": 2}


# -----------------------------------------------------------------------------
# Training runs (in-process)


def test_train_export_loads_in_smollm2_and_transformers(assets, tmp_path):
    from transformers import LlamaForCausalLM
    out = tmp_path / "full"
    ft.main(flags(assets, out, "--mode", "full", "--lr", "1e-2", "--max_steps", "12", "--eval_every", "6",
                  "--save_dtype", "float32"))
    vals = val_losses(out)
    assert len(vals) == 3 and vals[-1] < vals[0] - 0.5
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "ckpt.pt", "metrics.jsonl"):
        # every file as the umask makes it (0644 under the usual 022): safetensors alone would write 0600
        assert (out / name).is_file() and (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    ours = smollm2.SmolLM2.from_pretrained(out)
    hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.randint(0, TINY["vocab_size"], (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=1e-4)
    assert not any("cache" in n for n, _ in ours.named_buffers())  # training never allocated a KV cache


def test_lora_on_chat_learns_and_exports_merged(assets, tmp_path):
    from safetensors import safe_open
    out = tmp_path / "lora"
    ft.main(flags(assets, out, "--data", str(assets / "chat.jsonl"), "--mode", "lora", "--lora_rank", "4",
                  "--lora_alpha", "16", "--lr", "3e-2", "--max_steps", "10", "--eval_every", "10", "--seq_len", "64"))
    vals = val_losses(out)
    assert vals[-1] < vals[0] - 0.2
    with safe_open(out / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    assert keys == set(smollm2.SmolLM2.from_pretrained(assets / "base").state_dict()) - {"lm_head.weight"}
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert all(".lora_" in k for k in ckpt["model"])  # the frozen base comes back from --ckpt_dir on resume


def test_bf16_lora_keeps_trainable_weights_in_fp32(assets, tmp_path):
    """--dtype bfloat16 (the CUDA default): autocast, frozen weights stored in bf16, adapters and AdamW in fp32."""
    out = tmp_path / "bf16"
    ft.main(flags(assets, out, "--mode", "lora", "--dtype", "bfloat16", "--lr", "3e-2", "--max_steps", "4",
                  "--eval_every", "4"))
    vals = val_losses(out)
    assert all(map(np.isfinite, losses(out))) and vals[-1] < vals[0]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert {v.dtype for v in ckpt["model"].values()} == {torch.float32}


def test_pretrain_moe_from_shards_balances_experts(assets, tmp_path):
    """From scratch on prepared shards with nanollm (MoE): router biases move after each step, loads are logged."""
    import nanollm
    config = {**nanollm.ModelArgs.from_name("nano-tiny").to_hf_config(), "vocab_size": TINY["vocab_size"]}
    (tmp_path / "nano.json").write_text(json.dumps(config))
    ft.prepare(str(assets / "text.jsonl"), tokenizer=str(assets / "base"), out_dir=str(tmp_path / "shards"),
               val_frac=0.2)
    out = tmp_path / "nano"
    ft.main(["--model", "nanollm", "--preset", str(tmp_path / "nano.json"), "--tokenizer", str(assets / "base"),
             "--data", str(tmp_path / "shards"), "--out_dir", str(out), "--mode", "full", "--seq_len", "32",
             "--batch_size", "4", "--max_steps", "3", "--eval_rows", "4", "--lr", "1e-2"])
    records = [r for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]
    assert all(r["expert_load"] and all(abs(sum(v) - 1) < 1e-5 for v in r["expert_load"].values()) for r in records)
    biases = {k: v for k, v in torch.load(out / "ckpt.pt", weights_only=True)["model"].items()
              if k.endswith("e_score_correction_bias")}
    assert biases and any(v.abs().sum() > 0 for v in biases.values())  # started at 0, moved by the balancing


def test_router_bias_rate_sets_the_balancing_step(assets, tmp_path):
    """--router_bias_rate reaches nanollm's update_router_biases: each step moves a bias by exactly that much."""
    import nanollm
    config = {**nanollm.ModelArgs.from_name("nano-tiny").to_hf_config(), "vocab_size": TINY["vocab_size"]}
    (tmp_path / "nano.json").write_text(json.dumps(config))
    ft.main(["--model", "nanollm", "--preset", str(tmp_path / "nano.json"), "--tokenizer", str(assets / "base"),
             "--data", str(assets / "text.jsonl"), "--out_dir", str(tmp_path / "out"), "--mode", "full",
             "--seq_len", "32", "--max_steps", "2", "--eval_rows", "4", "--router_bias_rate", "0.25"])
    biases = torch.cat([v for k, v in torch.load(tmp_path / "out/ckpt.pt", weights_only=True)["model"].items()
                        if k.endswith("e_score_correction_bias")])
    assert set((biases.abs() / 0.25).tolist()) <= {0.0, 1.0, 2.0} and biases.abs().max() > 0


def test_from_scratch_config_stops_at_the_tokenizers_end_of_text(assets, tmp_path):
    """nanollm presets leave eos to the tokenizer: the exported config.json takes its end-of-text id."""
    import nanollm
    (tmp_path / "nano.json").write_text(json.dumps(nanollm.ModelArgs(vocab_size=TINY["vocab_size"]).to_hf_config()))
    *_, hf_config, tok, _ = ft.open_model("nanollm", torch.device("cpu"), preset=str(tmp_path / "nano.json"),
                                          tokenizer=str(assets / "base"))
    assert hf_config["eos_token_id"] == tok.special_tokens["<|endoftext|>"]


def test_tokens_per_second_count_training_time_only(assets, tmp_path, monkeypatch):
    """A clock that ticks 1 s per reading and 1000 s per evaluation or save: every step must report one speed."""
    now = [0.0]

    def tick(seconds):
        now[0] += seconds
        return now[0]

    def slow(f):
        return lambda *args, **kw: (tick(1000.0), f(*args, **kw))[1]
    monkeypatch.setattr(ft, "time", SimpleNamespace(time=lambda: tick(1.0)))
    monkeypatch.setattr(ft, "evaluate", slow(ft.evaluate))
    monkeypatch.setattr(ft, "save_checkpoint", slow(ft.save_checkpoint))
    ft.main(flags(assets, tmp_path / "out", "--mode", "norm", "--max_steps", "5", "--eval_every", "2",
                  "--ckpt_every", "3"))
    speeds = [r["tok_per_s"] for r in map(json.loads, open(tmp_path / "out/metrics.jsonl")) if "loss" in r]
    assert len(speeds) == 5 and len(set(speeds)) == 1


def test_grad_checkpointing_gives_the_same_losses(assets, tmp_path):
    for name, extra in (("plain", []), ("ckpt", ["--grad_checkpointing"])):
        ft.main(flags(assets, tmp_path / name, "--mode", "full", "--max_steps", "3", *extra))
    torch.testing.assert_close(losses(tmp_path / "ckpt"), losses(tmp_path / "plain"), rtol=1e-6, atol=1e-6)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(assets, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(SystemExit, match=r"error: (loss is|weights became) .*ckpt\.pt"):
        ft.main(flags(assets, out, "--mode", "full", "--lr", "1e30", "--warmup_steps", "1", "--max_steps", "6",
                      "--ckpt_every", "1", "--grad_clip", "0"))
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert 1 <= ckpt["meta"]["step"] <= len(losses(out)) < 6


@pytest.mark.parametrize("extra, message", [
    (["--model", "gpt5"], "unknown --model"),
    (["--data", "/nonexistent/data.txt"], "data file not found"),
    (["--data", "EMPTY"], "empty dataset"),
    (["--seq_len", "1024"], "exceeds the model's context of 128"),
    (["--batch_size", "1000"], "does not fit"),
])
def test_bad_input_is_one_clear_error(assets, tmp_path, extra, message):
    if "EMPTY" in extra:
        (tmp_path / "empty.jsonl").write_text("")
        extra = ["--data", str(tmp_path / "empty.jsonl")]
    with pytest.raises(SystemExit, match=f"^error: .*{message}"):
        ft.main(flags(assets, tmp_path / "out", *extra))


# -----------------------------------------------------------------------------
# Subprocesses: the CLI, SIGKILL + resume, torchrun


def cli(*args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_cli_error_is_one_line_without_traceback(tmp_path):
    p = cli("finetune.py", "--model", "gpt5", "--data", "x.txt", "--preset", "x")
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and err.strip() == "error: unknown --model 'gpt5'; choose one of " \
        "smollm2, llama31, nanollm, lm2"


def test_resume_after_sigkill_repeats_the_uninterrupted_loss_curve(assets, tmp_path):
    # LoRA with dropout: the resumed run must also restore the RNG stream, not only weights and data position
    args = flags(assets, "OUT", "--mode", "lora", "--lora_rank", "4", "--lora_dropout", "0.2", "--lr", "1e-2",
                 "--max_steps", "40", "--ckpt_every", "5", "--eval_every", "1000")
    run = lambda out, *extra: cli("finetune.py", *[str(out) if a == "OUT" else a for a in args], *extra)  # noqa: E731
    killed = run(tmp_path / "killed")
    ft.main([str(tmp_path / "ref") if a == "OUT" else a for a in args])  # the uninterrupted run, meanwhile
    metrics = tmp_path / "killed" / "metrics.jsonl"
    steps_logged = lambda: sum('"loss"' in line for line in metrics.read_text().splitlines(keepends=True)  # noqa: E731
                               if line.endswith("\n")) if metrics.exists() else 0  # a line may be half-written
    while steps_logged() < 12:
        assert killed.poll() is None, killed.stderr.read()
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    resumed = run(tmp_path / "killed", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert losses(tmp_path / "killed") == losses(tmp_path / "ref")  # bit for bit, all 40 steps
    assert len(losses(tmp_path / "ref")) == 40


def test_torchrun_ddp_and_fsdp_match_one_process(assets, tmp_path):
    """The same global batch of 4 rows: 1 process x 4, 2 DDP processes x (1 row x 2 accumulation steps), 2 FSDP2
    processes x 2 rows. The loss is normalised over the global batch, so all three take the same steps."""
    base = flags(assets, "OUT", "--mode", "full", "--lr", "1e-2", "--max_steps", "4", "--eval_every", "1000")
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "finetune.py"]
    runs = {"ddp": [*torchrun, "--batch_size", "1", "--grad_accum", "2"],
            "fsdp": [*torchrun, "--batch_size", "2", "--fsdp"]}
    ft.main([str(tmp_path / "single") if a == "OUT" else a for a in base])
    for name, launch in runs.items():
        cmd = launch[:launch.index("finetune.py") + 1] + [str(tmp_path / name) if a == "OUT" else a for a in base] \
            + launch[launch.index("finetune.py") + 1:]
        p = cli(*cmd)
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    for name in ("ddp", "fsdp"):
        torch.testing.assert_close(losses(tmp_path / name), losses(tmp_path / "single"), rtol=1e-5, atol=1e-5)
