"""Tests of grpo.py: the loss pieces on hand-computed cases, the gradient direction on a toy policy, rollout
log-probs against the recomputed ones on a tiny random SmolLM2, and a tiny end-to-end run with resume.

    python -m pytest tests/test_grpo.py -q
"""

import json
import math
import os
import random
import re
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import grpo  # noqa: E402
import smollm2  # noqa: E402



# -----------------------------------------------------------------------------
# Advantages


def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])  # two groups of G = 4
    adv = grpo.group_advantages(rewards, 4, "group")
    # group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3); group 2: all equal -> exactly zero
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([a, -a, -a, a, 0, 0, 0, 0]))
    torch.testing.assert_close(grpo.group_advantages(rewards, 4, "none"), torch.tensor([.5, -.5, -.5, .5, 0, 0, 0, 0]))
    b = 1 / (rewards.std().item() + 1e-4)  # batch scale: one std for every group
    torch.testing.assert_close(grpo.group_advantages(rewards, 4, "batch"),
                               torch.tensor([.5, -.5, -.5, .5, 0, 0, 0, 0]) * b)


def test_zero_variance_groups_give_zero_not_nan():
    adv = grpo.group_advantages(torch.zeros(6), 3)
    assert torch.equal(adv, torch.zeros(6))


# -----------------------------------------------------------------------------
# Clipped objective and KL


@pytest.mark.parametrize("ratio, adv, eps_high, loss, grad", [
    (1.5, 1.0, 0.2, -1.2, 0.0),    # A > 0, ratio above 1 + eps: clipped, no gradient
    (0.5, 1.0, 0.2, -0.5, -0.5),   # A > 0, ratio below 1 - eps: the unclipped term is the min, gradient flows
    (0.5, -1.0, 0.2, 0.8, 0.0),    # A < 0, ratio below 1 - eps: clipped
    (1.5, -1.0, 0.2, 1.5, 1.5),    # A < 0, ratio above 1 + eps: unclipped, pushed down
    (1.25, 1.0, 0.28, -1.25, -1.25),  # clip-higher: 1.25 is inside [0.8, 1.28]
    (1.25, 1.0, 0.2, -1.2, 0.0),   # ... but clipped with the symmetric 0.2
])
def test_clipped_surrogate_both_sides(ratio, adv, eps_high, loss, grad):
    old = torch.tensor([[math.log(0.4)]])
    logp = (old + math.log(ratio)).requires_grad_(True)
    out = grpo.clipped_surrogate(logp, old, torch.tensor([adv]), 0.2, eps_high)
    out.sum().backward()
    torch.testing.assert_close(out, torch.tensor([[loss]]))
    # d/dlogp of -ratio * A is -ratio * A (ratio = exp(logp - old)); zero where the clipped term is chosen
    torch.testing.assert_close(logp.grad, torch.tensor([[grad]]))


def test_ratio_one_is_reinforce():
    """One update per batch: old = logp.detach(), and the gradient is -A * grad log pi (REINFORCE)."""
    logp = torch.log(torch.tensor([[0.3, 0.6]])).requires_grad_(True)
    grpo.clipped_surrogate(logp, logp.detach(), torch.tensor([2.0]), 0.2, 0.2).sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.0, -2.0]]))


def test_k3_kl_values_and_unbiased():
    # pi = 0.5, pi_ref = 0.25: 0.5 - log 0.5 - 1
    kl = grpo.k3_kl(torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25)))
    torch.testing.assert_close(kl, torch.tensor(0.5 + math.log(2) - 1))
    assert grpo.k3_kl(torch.tensor(-1.3), torch.tensor(-1.3)).item() == 0
    # its expectation over tokens drawn from pi is exactly KL(pi || pi_ref)
    pi, ref = torch.softmax(torch.randn(50, generator=torch.Generator().manual_seed(0)), 0), torch.rand(50)
    ref = ref / ref.sum()
    expected = (pi * (pi.log() - ref.log())).sum()
    torch.testing.assert_close((pi * grpo.k3_kl(pi.log(), ref.log())).sum(), expected)
    assert (grpo.k3_kl(pi.log(), ref.log()) >= 0).all()


# -----------------------------------------------------------------------------
# Loss normalisations (TRL's grpo / dr_grpo / dapo)

PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [5.0, 7.0, 9.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)


@pytest.mark.parametrize("loss_type, expected", [
    ("grpo", (6 / 3 + 4 / 1 + 12 / 2) / 3),  # mean over completions of each one's token mean
    ("dr_grpo", 22 / (3 * 5)),  # token sum / (completions * max_new_tokens)
    ("dapo", 22 / 6),  # token sum / completion tokens
])
def test_aggregate_normalisation(loss_type, expected):
    got = grpo.aggregate(PER_TOKEN, MASK, loss_type, n_seqs=3, n_tokens=6, max_new_tokens=5)
    torch.testing.assert_close(got, torch.tensor(expected))
    # micro-batches of any size add up to the loss of the whole batch (gradient accumulation)
    parts = [grpo.aggregate(PER_TOKEN[s], MASK[s], loss_type, 3, 6, 5) for s in (slice(0, 1), slice(1, 3))]
    torch.testing.assert_close(sum(parts), got)


def test_skipping_zero_advantage_rows_keeps_the_gradient():
    """Departure 5: with beta = 0, rows of zero advantage contribute nothing, so leaving them out (with the
    normalisers of the full batch) gives the very same gradient."""
    torch.manual_seed(0)
    logp = torch.randn(4, 3).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 0.0, 0.0])
    mask = torch.ones(4, 3, dtype=torch.bool)
    for loss_type in ("grpo", "dr_grpo", "dapo"):
        full = grpo.aggregate(grpo.clipped_surrogate(logp, logp.detach(), adv, .2, .2), mask, loss_type, 4, 12, 3)
        g_full, = torch.autograd.grad(full, logp)
        part = grpo.aggregate(grpo.clipped_surrogate(logp[:2], logp[:2].detach(), adv[:2], .2, .2), mask[:2],
                              loss_type, 4, 12, 3)
        g_part, = torch.autograd.grad(part, logp)
        torch.testing.assert_close(g_part, g_full)


# -----------------------------------------------------------------------------
# Gradient direction on a toy policy: a softmax over 4 "answers", one of them rewarded


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_toy_policy_moves_towards_reward(loss_type, beta):
    logits = torch.zeros(4, requires_grad=True)
    ref_logp = torch.log_softmax(torch.zeros(4), 0)
    opt = torch.optim.SGD([logits], lr=0.5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        probs = torch.softmax(logits.detach(), 0)
        tokens = torch.multinomial(probs, 8, replacement=True, generator=gen)  # one group of G = 8
        rewards = (tokens == 2).float()
        adv = grpo.group_advantages(rewards, 8)
        logp = torch.log_softmax(logits, 0)[tokens][:, None]  # (8, 1): one-token completions
        per_token = grpo.clipped_surrogate(logp, logp.detach(), adv, 0.2, 0.2) + beta * grpo.k3_kl(logp, ref_logp[tokens][:, None])
        loss = grpo.aggregate(per_token, torch.ones(8, 1, dtype=torch.bool), loss_type, 8, 8, 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.softmax(logits, 0)[2] > 0.9


# -----------------------------------------------------------------------------
# Rewards and tasks


def test_rewards_and_parsing():
    assert grpo.parse_number("so 7 + 5 = 12.") == 12 and grpo.parse_number("1,234 coins") == 1234
    assert grpo.parse_number("no digits") is None
    assert grpo.correct_reward("q", "The answer is 12", answer=12) == 1.0
    assert grpo.correct_reward("q", "12 or 13", answer=12) == 0.0
    assert grpo.format_reward("q", "Sam has 3 + 4 = 7 pens. ") == 1.0
    assert grpo.format_reward("q", "Sam has 3 + 4 = 7 pens.\nSam") == 0.0  # a second line
    assert grpo.format_reward("q", "Sam has 3 + 4 = 7") == 0.0  # cut off: no full stop
    assert grpo.format_reward("q", "Sam has seven.") == 0.0  # no number


def test_reward_that_raises_is_reported_and_skipped(capsys):
    def broken(prompt, completion, **_):
        raise KeyError("boom")
    total, per_fn = grpo.score([grpo.correct_reward, broken], [1.0, 0.5], ["q", "q"], ["3", "4"],
                               [{"question": "q", "answer": 3}] * 2)
    torch.testing.assert_close(total, torch.tensor([1.0, 0.0]))
    assert per_fn[:, 1].isnan().all()
    out = capsys.readouterr().out
    assert "broken raised KeyError('boom')" in out and "'answer': 3" in out


def test_builtin_task_answers_are_right():
    rng = random.Random(0)
    for _ in range(200):
        ex = grpo.TASKS["arith"](rng)
        a, b = map(int, re.findall(r"\d+", ex["question"]))
        assert ex["answer"] in (a + b, a - b, a * b, a / b) and ex["answer"] > 0


def test_gsm8k_jsonl_and_held_out_split(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"work\n#### 1,00{i}"}) + "\n"
                            for i in range(5)))
    rows = grpo.load_jsonl(str(path))
    assert [r["answer"] for r in rows] == [1000, 1001, 1002, 1003, 1004]
    sample, held_out = grpo.task_data(grpo.GRPOConfig(task=str(path), eval_n=2))
    assert [r["question"] for r in held_out] == ["q3", "q4"]
    assert {r["question"] for r in sample(random.Random(0), 10)} == {"q0", "q1", "q2"}


def test_builtin_training_never_draws_a_held_out_problem():
    sample, held_out = grpo.task_data(grpo.GRPOConfig(task="add", eval_n=100))
    seen = {ex["question"] for ex in held_out}
    assert not seen & {ex["question"] for ex in sample(random.Random(1), 500)}


# -----------------------------------------------------------------------------
# Rollout log-probs on a tiny random SmolLM2

TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=96, max_seq_len=128)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    model = smollm2.SmolLM2(smollm2.ModelArgs(**{**TINY, **kw}))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def test_sampling_logprobs_match_recomputed():
    """The log-prob of every sampled token, read from the KV-cached decoding logits, equals the one recomputed
    by a plain forward pass over ragged prompt + completion rows: the rollout trains on what it sampled."""
    model, T = tiny_model(), 0.7
    prompts = [[1, 7, 9, 11, 3], [1, 4], [1, 20, 21, 22, 23, 24, 25, 8]]
    # take as end-of-turn a token the first row samples early, so that rows stop at different lengths
    eot = grpo.rollout(model, prompts, 2, 10, T, eot=-1, seed=3)[0][3]
    step_logits = []
    decode = model.forward_cached

    def recording(*args, **kw):
        out = decode(*args, **kw)
        step_logits.append(out.float())
        return out
    model.forward_cached = recording  # instance attribute: generate calls it for the prefill and every step
    completions = grpo.rollout(model, prompts, 2, 10, T, eot, seed=3)
    del model.forward_cached
    assert any(c[-1] == eot for c in completions) and any(len(c) == 10 for c in completions)
    sampled = torch.stack(step_logits, 1)  # (B, steps, vocab)
    logp, mask = grpo.completion_logprobs(model, [p for p in prompts for _ in range(2)], completions, T)
    for i, c in enumerate(completions):
        ref = torch.log_softmax(sampled[i, :len(c)] / T, -1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
        torch.testing.assert_close(logp[i, :len(c)], ref, atol=1e-5, rtol=1e-5)
        assert mask[i].sum() == len(c) and (logp[i, len(c):] == 0).all()


def test_adapters_off_is_the_base_model():
    """Under LoRA the reference policy costs no copy: adapters scaled by 0 give back the base model exactly."""
    model, x = tiny_model(), torch.randint(0, 96, (2, 7))
    base = model(x)
    grpo.apply_lora(model, 4, 8.0, 0.0, list(grpo.LORA_TARGETS))
    for n, p in model.named_parameters():
        if n.endswith("lora_B"):
            torch.nn.init.normal_(p, std=0.5)  # a trained adapter
    assert not torch.allclose(model(x), base, atol=1e-3)
    with grpo.adapters_off(model):
        torch.testing.assert_close(model(x), base)
    assert not torch.allclose(model(x), base, atol=1e-3)  # and back on afterwards


# -----------------------------------------------------------------------------
# A tiny end-to-end run: two steps straight equal one step, a resume, and one more step


def write_tiny_checkpoint(tmp_path, tokenizer_dir):
    """A tiny random SmolLM2 in the HF layout, with the real tokenizer of tokenizer_dir (49152 tokens)."""
    from safetensors.torch import save_file
    ckpt = tmp_path / "tiny"
    ckpt.mkdir()
    model = tiny_model(vocab_size=49152, dim=32, hidden_dim=64)
    save_file({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text(json.dumps(model.args.to_hf_config()))
    shutil.copy(os.path.join(tokenizer_dir, "tokenizer.json"), ckpt / "tokenizer.json")
    return ckpt


def length_reward(prompt, completion, **_):
    """Random weights never answer right: reward something that varies within a group instead."""
    return float(len(completion) % 3)


def test_train_and_resume_tiny(tmp_path, capsys, smollm2_dir):
    ckpt = write_tiny_checkpoint(tmp_path, smollm2_dir)
    common = dict(ckpt_dir=str(ckpt), task="add", steps=2, prompts_per_step=2, num_generations=3,
                  max_new_tokens=4, eval_n=2, ckpt_every=1, micro_batch=4, beta=0.04, num_iterations=2,
                  lr=1e-2, threads=1)
    rewards = [length_reward, grpo.format_reward]
    grpo.train(grpo.GRPOConfig(out_dir=str(tmp_path / "a"), **common), rewards)
    grpo.train(grpo.GRPOConfig(out_dir=str(tmp_path / "b"), **{**common, "steps": 1}), rewards)
    grpo.train(grpo.GRPOConfig(out_dir=str(tmp_path / "b"), resume=True, **common), rewards)
    logs = [[json.loads(line) for line in open(tmp_path / d / "metrics.jsonl")] for d in "ab"]
    assert [r["step"] for r in logs[0]] == [0, 1, 2, 2]  # eval, two steps, final eval
    assert all(r["equal_groups"] < 2 and r["grad_norm"] > 0 for r in logs[0] if "reward" in r)  # it trained
    logs[1] = [r for r in logs[1] if r["step"] != 1 or "reward" in r]  # drop the eval ending the 1-step run
    assert [r["step"] for r in logs[1]] == [r["step"] for r in logs[0]]
    for a, b in zip(*logs):  # the resumed run redoes exactly the same rollouts and updates
        assert a.keys() == b.keys()
        for k in a:
            if not k.endswith("_s"):
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    assert (tmp_path / "a" / "model.safetensors").is_file()
    assert "held-out accuracy" in capsys.readouterr().out
    # as finetune.py: saved in --save_dtype (bfloat16 unless told), readable by all as the umask allows
    from safetensors.torch import load_file
    assert {v.dtype for v in load_file(tmp_path / "a" / "model.safetensors").values()} == {torch.bfloat16}
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_full_update_with_reference_copy(tmp_path, smollm2_dir):
    """mode full with beta > 0 keeps a frozen copy as reference: its KL is 0 before the first update only."""
    ckpt = write_tiny_checkpoint(tmp_path, smollm2_dir)
    cfg = grpo.GRPOConfig(ckpt_dir=str(ckpt), out_dir=str(tmp_path / "full"), mode="full", beta=0.1, steps=2,
                          prompts_per_step=2, num_generations=3, max_new_tokens=4, eval_n=2, lr=1e-2,
                          loss_type="grpo", threads=1, save_dtype="float32")
    grpo.train(cfg, [length_reward, grpo.format_reward])
    from safetensors.torch import load_file
    assert {v.dtype for v in load_file(tmp_path / "full" / "model.safetensors").values()} == {torch.float32}
    steps = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    steps = [r for r in steps if "reward" in r]
    assert steps[0]["kl"] > 0 and steps[1]["kl"] > 0  # second update of step 1, then step 2: moved off the copy
    assert steps[0]["grad_norm"] > 0


def test_device_default_is_cuda_when_available(tmp_path, monkeypatch, smollm2_dir):
    """--device '' (the default) is cuda where a GPU is, as the help says, else cpu; --device cpu is the CPU."""
    ckpt, seen = write_tiny_checkpoint(tmp_path, smollm2_dir), []

    def stop(name, device, **kw):
        seen.append(device)
        raise SystemExit("stop")
    monkeypatch.setattr(grpo, "open_model", stop)
    for i, (available, device) in enumerate([(True, ""), (False, ""), (True, "cpu")]):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        with pytest.raises(SystemExit, match="stop"):
            grpo.train(grpo.GRPOConfig(ckpt_dir=str(ckpt), out_dir=str(tmp_path / f"run{i}"), device=device))
    assert seen == [torch.device("cuda"), torch.device("cpu"), torch.device("cpu")]
    assert grpo.GRPOConfig().device == "" and "empty = cuda if available, else cpu" in grpo.GRPOConfig.__doc__


def test_llama31_one_step(tmp_path, llama_tokenizer_dir):
    """grpo.py drives llama31.py too: Llama 3 chat prompts, <|eot_id|> ends a turn, the trained model exports."""
    import llama31
    from safetensors.torch import save_file
    ckpt = tmp_path / "tiny-llama"
    ckpt.mkdir()
    args = llama31.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=256,
                             tie_embeddings=True)
    torch.manual_seed(0)
    model = llama31.Llama(args)
    for p in model.parameters():  # as tiny_model: random enough that the samples of a group differ
        torch.nn.init.normal_(p, std=0.2)
    save_file({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text(json.dumps(args.to_hf_config()))
    # tokenizer.model: the 128256-token text vocabulary (the wheel's tokenizer.json is the Vision one, 128257)
    shutil.copy(os.path.join(llama_tokenizer_dir, "tokenizer.model"), ckpt / "tokenizer.model")
    cfg = grpo.GRPOConfig(model="llama31", ckpt_dir=str(ckpt), out_dir=str(tmp_path / "out"), steps=1,
                          prompts_per_step=2, num_generations=3, max_new_tokens=4, eval_n=2, lr=1e-2, threads=1)
    grpo.train(cfg, [length_reward, grpo.format_reward])
    steps = [r for r in map(json.loads, open(tmp_path / "out" / "metrics.jsonl")) if "reward" in r]
    assert len(steps) == 1 and steps[0]["grad_norm"] > 0
    assert llama31.Llama.from_pretrained(tmp_path / "out").lm_head.weight.shape == (args.vocab_size, 32)
