"""
GRPO: Group Relative Policy Optimization of the model files of this collection, small enough to run on a CPU.

For every prompt the policy samples a group of G completions; plain Python functions score them; each reward
minus its group's mean, divided by the group's standard deviation, is the advantage of every token of that
completion (no value model); the policy then maximises the PPO clipped-ratio objective, optionally minus a KL
penalty to a frozen reference model. Paper: Shao et al. 2024, "DeepSeekMath" (arXiv 2402.03300), §4.1, eq. 3
and Algorithm 1. Reference code: TRL's `GRPOTrainer` (trl/trainer/grpo_trainer.py), whose names we keep:
num_generations = G, epsilon / epsilon_high, beta, loss_type grpo | dr_grpo | dapo, scale_rewards,
num_iterations. Built-in tasks are arithmetic word problems generated in code with a checked numeric answer,
as the minimal single-file GRPO scripts that show GSM8K accuracy rising; a GSM8K-style JSONL also works.

Departures from the paper, as nanochat's chat_rl.py lists its own:
1. beta = 0 by default: no KL term and no reference model in memory (TRL's default, after DAPO and Dr. GRPO).
   With beta > 0 the k3 estimator of eq. 4 is used; under LoRA the reference is the same model with its
   adapters switched off, so it costs no copy.
2. The default loss_type is "dapo" (TRL's default): token losses summed over the whole generation batch and
   divided by its number of completion tokens, instead of the paper's mean over each completion, then over
   completions ("grpo", kept as an option), under which a token of a long wrong answer is penalised less than
   one of a short one (the length bias of Dr. GRPO, arXiv 2503.20783).
3. Optional clip-higher: epsilon_high > epsilon lets rare good tokens grow faster (DAPO, arXiv 2503.14476).
4. Outcome rewards only, one policy, one round: no process supervision and no reward-model retraining (§4.1.3).
5. Groups whose rewards are all equal have zero advantage. With beta = 0 they give exactly zero gradient, so
   their forward and backward passes are skipped (the loss normalisers still count them: the update is the
   one of the full batch, only cheaper).
6. The completion's end-of-turn token is part of it (as TRL's completion mask), so stopping is learned too.

Demonstration (SmolLM2-135M-Instruct, 2 CPU cores, LoRA, the defaults below; docs/training.md has the curve):
    python download.py
    python grpo.py --steps 0                     # the base model on the 100 held-out problems: accuracy 0.21
    python grpo.py --out_dir out/grpo-add        # 30 steps, about 20 minutes: held-out accuracy 0.21 -> 0.87
Other uses:
    python grpo.py --task data/gsm8k_train.jsonl --eval_file data/gsm8k_test.jsonl --max_new_tokens 256
    python grpo.py --model llama31 --ckpt_dir checkpoints/Llama-3.2-1B-Instruct --device cuda --mode full
    python grpo.py --out_dir out/grpo-add --resume      # continue after a crash
"""

import contextlib
import copy
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# LoRA, the optimizer and its schedule, loading a model file and the flag checks are finetune.py's; the run's folder
# (lock, marker, checkpoints, export, metrics) is run_folder.py's, as for finetune.py
from finetune import LoRALinear, apply_lora, build_optimizer, build_scheduler, check_device, check_flags, open_model
from run_folder import (TOKENIZER_FILES, MetricsLog, RunFolder, checkpoint_keys, export_hf, export_sources,
                        load_checkpoint, nonfinite_count, save_checkpoint)
from cli import checkpoint_folder, cli

# -----------------------------------------------------------------------------
# Config: every field is a command-line flag (python grpo.py --name value)


@dataclass
class GRPOConfig:
    """GRPO-train a chat model on a verifiable task; --steps 0 only evaluates it (the module docstring has examples).

    model: model file: smollm2 | llama31
    ckpt_dir: the HF checkpoint folder to start from
    out_dir: this run's folder: model.safetensors, config.json, tokenizer files, ckpt.pt, metrics.jsonl
    overwrite: let a new run replace the run already in --out_dir (its files stay until this run saves)
    task: built-in task (add | addsub | arith) or a GSM8K-style .jsonl file
    eval_file: held-out .jsonl for a file task (default: its last eval_n lines)
    eval_n: held-out problems, answered greedily
    steps: generation batches; 0 = only evaluate the model
    time_limit: minutes of training after which the run stops early (0 = none)
    prompts_per_step: prompts per generation batch
    num_generations: G, completions per prompt (TRL: 8)
    max_new_tokens: most tokens per completion
    temperature: of the rollouts; log-probs are of this tempered distribution
    loss_type: grpo | dr_grpo | dapo
    epsilon: ratio clipped to [1 - epsilon, 1 + epsilon_high]
    epsilon_high: 0 = epsilon (symmetric, as the paper)
    beta: KL weight; the paper uses 0.04
    scale_rewards: divide advantages by the std of the group | batch | none (Dr. GRPO)
    num_iterations: policy updates per generation batch (mu in Algorithm 1)
    reward_weights: comma-separated weights of the reward functions (correct answer, answer format)
    mode: lora | full
    lora_rank: rank r of the adapters
    lora_alpha: adapter output is scaled by alpha / rank
    lr: peak learning rate
    warmup_steps: linear warmup, in optimizer updates
    min_lr_frac: cosine decays to lr * min_lr_frac; 1 = constant after warmup
    weight_decay: AdamW decay on matrices
    grad_clip: gradient norm clip; 0 = off
    micro_batch: completions per forward/backward; the rest of the batch is accumulated
    eval_every: steps between held-out evaluations; 0 = only before and after training
    ckpt_every: steps between checkpoints (and one at the end)
    resume: continue the run in --out_dir from its ckpt.pt, with the same task and schedule flags
    device: cpu, cuda or cuda:N; empty = cuda if available, else cpu
    save_dtype: dtype of the exported model.safetensors: bfloat16, float16 or float32
    threads: torch CPU threads, 0 = torch's default
    seed: seeds the prompts drawn and the sampling
    """
    model: str = "smollm2"
    ckpt_dir: str = "checkpoints/SmolLM2-135M-Instruct"
    out_dir: str = "out/grpo"
    overwrite: bool = False
    task: str = "add"
    eval_file: str = ""
    eval_n: int = 100
    steps: int = 30
    time_limit: float = 30.0
    prompts_per_step: int = 4
    num_generations: int = 6
    max_new_tokens: int = 32
    # below TRL's 1.0: at 1.0 a 135M model's samples of these problems are rarely right, and a group whose
    # rewards are all 0 has no advantage to learn from
    temperature: float = 0.7
    loss_type: str = "dapo"
    epsilon: float = 0.2
    epsilon_high: float = 0.0
    beta: float = 0.0
    scale_rewards: str = "group"
    # on a CPU generation costs as much as an update, so a second update on the same batch is the cheapest way to
    # learn faster
    num_iterations: int = 2
    reward_weights: str = "1.0,0.2"
    mode: str = "lora"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lr: float = 2e-4
    warmup_steps: int = 2
    min_lr_frac: float = 1.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch: int = 16
    eval_every: int = 10
    ckpt_every: int = 20
    resume: bool = False
    device: str = ""
    save_dtype: str = "bfloat16"
    threads: int = 0
    seed: int = 1337


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # as finetune.py
# flags a resume may change: how often to evaluate and save, where to run, and how long (the schedule is recomputed);
# the others fix the task, the prompts drawn, the model and the optimisation, which the checkpoint continues
RESUMABLE_CHANGES = {"out_dir", "resume", "overwrite", "steps", "time_limit", "eval_every", "ckpt_every", "device",
                     "save_dtype", "threads"}
OUTPUTS = ("ckpt.pt", "metrics.jsonl", "model.safetensors", "config.json", "generation_config.json", "rewards.png",
           *TOKENIZER_FILES)  # what a run writes into --out_dir (and the lock and the marker: run_folder.py)

# -----------------------------------------------------------------------------
# Tasks and rewards. An example is a dict with a "question" and an "answer"; reward functions are called as
# fn(prompt, completion, **example) -> float, TRL's convention for extra dataset columns.

NAMES = ["Sam", "Mia", "Leo", "Ava", "Ben", "Zoe", "Max", "Ivy", "Tom", "Eva", "Noah", "Lily"]
ITEMS = ["apples", "pens", "stickers", "marbles", "books", "cards", "coins", "shells", "cookies", "stamps"]


def word_problem(rng: random.Random, ops: str, hi: int) -> dict:
    """One arithmetic word problem, operation drawn from ops ("+-*/"), operands up to hi; integer answer."""
    name, item, op = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(ops)
    a, b = rng.randint(2, hi), rng.randint(2, hi)
    if op == "+":  # three phrasings of a sum
        q = rng.choice([f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
                        f"{name} has {a} red {item} and {b} blue {item}. How many {item} does {name} have in all?",
                        f"There are {a} {item} in a box and {b} on the table. How many {item} are there altogether?"])
        ans = a + b
    elif op == "-":
        a, b = a + b, b  # keeps the answer positive
        q, ans = f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?", a - b
    elif op == "*":
        a = rng.randint(2, 9)
        q, ans = f"{name} buys {a} boxes with {b} {item} in each box. How many {item} is that in total?", a * b
    else:
        a = rng.randint(2, 9)
        q, ans = f"{name} shares {a * b} {item} equally among {a} friends. How many {item} does each get?", b
    return {"question": q, "answer": ans}


TASKS = {  # name -> problem generator
    "add": lambda rng: word_problem(rng, "+", 20),
    "addsub": lambda rng: word_problem(rng, "+-", 20),
    "arith": lambda rng: word_problem(rng, "+-*/", 20),
}


def load_jsonl(path: str) -> list[dict]:
    """GSM8K-style lines {"question": ..., "answer": "...#### 42"} (or a plain number as the answer)."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    rows.append(task_row(line, f"{path}:{n}"))
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not rows:
        raise SystemExit(f"error: {path} holds no problems")
    return rows


def task_row(line: str, where: str) -> dict:
    """One JSONL line -> {"question": str, "answer": float, ...}; a malformed line ends the run naming file:line."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {where}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise SystemExit(f"error: {where}: not valid JSON (nested too deep)") from None
    if not isinstance(row, dict) or not isinstance(row.get("question"), str) or "answer" not in row:
        raise SystemExit(f"error: {where} needs 'question' and 'answer' fields")
    row["answer"] = parse_number(str(row["answer"]).split("####")[-1])
    if row["answer"] is None:
        raise SystemExit(f"error: {where}: the answer has no number (GSM8K style: '... #### 42')")
    return row


def parse_number(text: str) -> float | None:
    """The last number in the text (commas as thousands separators allowed), as GSM8K graders take it."""
    found = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    return float(found[-1].replace(",", "")) if found else None


def correct_reward(prompt, completion, answer, **_) -> float:
    return float(parse_number(completion) == float(answer))


def format_reward(prompt, completion, **_) -> float:
    """The requested format (SYSTEM_PROMPT): one sentence, on one line, ending in a full stop, with a number."""
    s = completion.strip()
    return float("\n" not in s and s.endswith(".") and parse_number(s) is not None)


REWARDS = [correct_reward, format_reward]
# the keys of a step's record in metrics.jsonl, beside one per reward function: a reward may not take their name
RECORD_KEYS = {"step", "reward", "reward_errors", "reward_std", "equal_groups", "completion_len", "stopped", "loss",
               "kl", "clip_low", "clip_high", "grad_norm", "lr", "gen_s", "step_s", "elapsed_s", "eval_accuracy",
               "eval_format"}
SYSTEM_PROMPT = "Answer in one short sentence."


def score(reward_fns, weights, prompts, completions, examples) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (weighted reward (N,), each function's reward (N, n_fns)). A reward function that raises is reported
    with its example and scored NaN; the weighted sum skips NaNs (TRL's nansum), so the run goes on."""
    per_fn = torch.full((len(completions), len(reward_fns)), float("nan"))
    for i, (p, c, ex) in enumerate(zip(prompts, completions, examples)):
        for j, fn in enumerate(reward_fns):
            try:
                per_fn[i, j] = float(fn(p, c, **ex))
            except Exception as e:  # a user's reward function must not end a long run
                print(f"warning: reward {fn.__name__} raised {e!r} on example {ex} with completion {c!r}")
    return (per_fn * torch.tensor(weights)).nansum(dim=1), per_fn


def check_rewards(per_fn: torch.Tensor, reward_fns, step: int):
    """A reward function that raised on every completion of a batch is broken, not unlucky: stop rather than
    train on the 0 that nansum would make of it (the warnings above name its error)."""
    for j, fn in enumerate(reward_fns):
        if per_fn[:, j].isnan().all():
            raise SystemExit(f"error: reward function {fn.__name__} raised on all {len(per_fn)} completions of "
                             f"step {step} (see the warnings above); fix it and run again")


# -----------------------------------------------------------------------------
# Rollout: sample G completions per prompt with the model's KV-cached generate, then recompute log-probs


def end_of_turn_id(tok) -> int:
    """The token that ends an assistant turn: ChatML's <|im_end|> (SmolLM2) or Llama 3's <|eot_id|>."""
    sp = tok.special_tokens
    eot = sp.get("<|im_end|>", sp.get("<|eot_id|>"))
    if eot is None:
        raise SystemExit("error: the tokenizer has no <|im_end|> or <|eot_id|>: GRPO here needs a chat model")
    return eot


def encode_prompts(mod, tok, examples) -> list[list[int]]:
    return [mod.encode_chat(tok, [{"role": "system", "content": SYSTEM_PROMPT},
                                  {"role": "user", "content": ex["question"]}]) for ex in examples]


def rollout(model, prompts: list[list[int]], G: int, max_new_tokens: int, temperature: float, eot: int,
            seed: int | None, stream=None) -> list[list[int]]:
    """G completions of each prompt (prompt-major order). A completion that stopped keeps its end-of-turn
    token: the policy is trained to stop where it stopped. Temperature 0 is greedy (evaluation).
    stream(row, token) is called for each token as it is sampled (progress bars)."""
    # one batched, KV-cached call for all N * G rows: the model file left-pads the ragged prompts
    outs = model.generate([p for p in prompts for _ in range(G)], max_new_tokens, temperature=temperature,
                          stop_tokens=[eot], seed=seed, stream=stream)
    # generate drops the stop token, so a row shorter than max_new_tokens is one that stopped
    return [c + [eot] if len(c) < max_new_tokens else c for c in outs]


def completion_logprobs(model, prompts, completions, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (log-prob of every completion token (B, C), mask of the real ones (B, C)), by one forward pass.

    Rows are prompt + completion, right-padded: causal attention never lets a real token see the padding, so
    no attention mask is needed. Log-probs are those of the tempered distribution the tokens were drawn from.
    """
    device = next(model.parameters()).device
    lens = [len(p) + len(c) for p, c in zip(prompts, completions)]
    B, T, C = len(prompts), max(lens), max(len(c) for c in completions)
    x = torch.zeros(B, T, dtype=torch.long)
    targets = torch.zeros(B, C, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        x[i, :lens[i]] = torch.tensor(p + c)
        targets[i, :len(c)] = torch.tensor(c)
    mask = torch.arange(C)[None, :] < torch.tensor([len(c) for c in completions])[:, None]  # (B, C) real tokens
    # logits at position t predict token t + 1: completion token k of row i is predicted at len(p_i) - 1 + k
    pos = (torch.tensor([len(p) - 1 for p in prompts])[:, None] + torch.arange(C)[None, :]).clamp(max=T - 1)
    logits = model(x.to(device))  # (B, T, vocab)
    logits = logits.gather(1, pos.to(device)[:, :, None].expand(-1, -1, logits.size(-1)))  # (B, C, vocab)
    # as TRL: the ratio and the KL are of the distribution that was sampled, logits / temperature, in fp32
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp.gather(-1, targets.to(device)[:, :, None]).squeeze(-1)  # (B, C)
    mask = mask.to(device)
    return logp * mask, mask  # padding positions hold garbage log-probs: zero them so no later sum sees them


# -----------------------------------------------------------------------------
# Advantages and loss: one small pure function per concept


def group_advantages(rewards: torch.Tensor, G: int, scale: str = "group") -> torch.Tensor:
    """rewards (N*G,) in prompt-major order -> advantages (N*G,): reward minus its group's mean, divided by the
    group's std (paper §4.1.2), the whole batch's std, or nothing (Dr. GRPO). A group of equal rewards gets
    zero advantages: its mean is its every reward, and the 1e-4 (as TRL) keeps 0 / 0 away."""
    r = rewards.view(-1, G)  # (N, G): one row per prompt
    adv = r - r.mean(dim=1, keepdim=True)  # the group mean is the baseline that replaces PPO's value model
    if scale == "group":
        adv = adv / (r.std(dim=1, keepdim=True) + 1e-4)
    elif scale == "batch":
        adv = adv / (rewards.std() + 1e-4)
    return adv.flatten()


def clipped_surrogate(logp, old_logp, advantages, eps_low: float, eps_high: float) -> torch.Tensor:
    """PPO's per-token loss -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A), logp (B, C), A (B,).
    Clipping removes the incentive to move a token's ratio further than the clip range in the advantage's
    direction; with old_logp = logp.detach() (one update per batch) the ratio is 1 and this is REINFORCE."""
    ratio = torch.exp(logp - old_logp)  # (B, C) pi_theta / pi_old per token
    A = advantages[:, None]  # (B, 1): broadcast over the tokens of each completion
    return -torch.min(ratio * A, ratio.clamp(1 - eps_low, 1 + eps_high) * A)


def k3_kl(logp, ref_logp) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate pi_ref/pi - log(pi_ref/pi) - 1 (paper eq. 4, Schulman's k3):
    unbiased on tokens sampled from pi, and never negative."""
    d = ref_logp - logp  # log(pi_ref / pi)
    return torch.exp(d) - d - 1  # >= 0 since e^d >= 1 + d; its gradient pulls pi towards pi_ref


def aggregate(per_token, mask, loss_type: str, n_seqs: int, n_tokens: int, max_new_tokens: int) -> torch.Tensor:
    """This micro-batch's share of the step loss. n_seqs and n_tokens count the whole generation batch, so the
    shares of any split into micro-batches add up to the loss of the full batch (TRL divides per micro-batch
    and by the accumulation steps instead: the same when micro-batches are equal).
      grpo:    mean over completions of each completion's token mean (paper eq. 3)
      dr_grpo: token sum / (completions * max_new_tokens), a constant normaliser (Dr. GRPO)
      dapo:    token sum / completion tokens in the batch (DAPO eq. 8)"""
    per_token = per_token * mask  # padding never counts
    if loss_type == "grpo":
        return (per_token.sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seqs
    if loss_type == "dr_grpo":
        return per_token.sum() / (n_seqs * max_new_tokens)
    if loss_type == "dapo":
        return per_token.sum() / n_tokens
    raise ValueError(f"unknown loss_type {loss_type!r}")


# -----------------------------------------------------------------------------
# Evaluation


def token_bar(rows: int, max_new_tokens: int, desc: str):
    """A progress bar of the tokens generated, up to max_new_tokens per row: generation is the slow part of every
    step and evaluation on a CPU (minutes for 100 problems), and it should not pass in silence."""
    return tqdm(total=rows * max_new_tokens, desc=desc, unit="tok", leave=False, dynamic_ncols=True)


@torch.no_grad()
def evaluate(model, mod, tok, examples, cfg: GRPOConfig, eot: int, batch_size: int = 50) -> dict:
    """Greedy accuracy and format rate on held-out examples (one completion each)."""
    model.eval()
    correct = fmt = 0
    samples = []
    with token_bar(len(examples), cfg.max_new_tokens, f"evaluating {len(examples)} problems") as bar:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            outs = rollout(model, encode_prompts(mod, tok, chunk), 1, cfg.max_new_tokens, 0.0, eot, None,
                           stream=lambda _row, _token: bar.update())
            bar.update((i + len(chunk)) * cfg.max_new_tokens - bar.n)  # rows that stopped early: the rest at once
            for ex, out in zip(chunk, outs):
                text = tok.decode([t for t in out if t != eot])
                correct += correct_reward(ex["question"], text, **ex)
                fmt += format_reward(ex["question"], text, **ex)
                samples.append(text)
    return {"accuracy": correct / len(examples), "format": fmt / len(examples), "samples": samples[:5]}


# -----------------------------------------------------------------------------
# Training


def task_data(cfg: GRPOConfig):
    """-> (sample(rng, n) -> n training examples, held-out examples). Built-in held-out problems come from a
    fixed stream, the same for every seed, and training never draws one of them."""
    if cfg.task in TASKS:
        gen, rng = TASKS[cfg.task], random.Random("held-out")
        held_out = [gen(rng) for _ in range(cfg.eval_n)]
        seen = {ex["question"] for ex in held_out}

        def sample(rng, n):
            out = []
            while len(out) < n:
                ex = gen(rng)
                if ex["question"] not in seen:
                    out.append(ex)
            return out
        return sample, held_out
    if not os.path.isfile(cfg.task):
        raise SystemExit(f"error: --task {cfg.task!r} is neither a built-in task ({', '.join(TASKS)}) nor a file")
    rows = load_jsonl(cfg.task)
    held_out = load_jsonl(cfg.eval_file)[:cfg.eval_n] if cfg.eval_file else rows[-cfg.eval_n:]
    train_rows = rows if cfg.eval_file else rows[:-cfg.eval_n]
    if not train_rows:
        raise SystemExit(f"error: {cfg.task} has no rows left for training after holding out {cfg.eval_n}")
    return (lambda rng, n: rng.sample(train_rows, min(n, len(train_rows)))), held_out


@contextlib.contextmanager
def adapters_off(model):
    """Under LoRA the reference policy is the frozen base model: the same modules with B A scaled by 0."""
    loras = [m for m in model.modules() if isinstance(m, LoRALinear)]
    scales = [m.scale for m in loras]
    for m in loras:
        m.scale = 0.0
    try:
        yield
    finally:
        for m, s in zip(loras, scales):
            m.scale = s


def policy_and_reference(model, cfg: GRPOConfig):
    """Make the policy trainable; -> the reference policy pi_ref: under LoRA the model itself, whose adapters
    `adapters_off` switches off; with full training a frozen copy taken before any update (and before a resume
    loads trained weights), or none when beta = 0 (no KL term)."""
    if cfg.mode == "lora":
        # no dropout: the policy that samples (eval mode) must be the one whose log-probs are trained
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, 0.0, list(LORA_TARGETS))
        return model
    model.requires_grad_(True)
    return copy.deepcopy(model).requires_grad_(False) if cfg.beta > 0 else None


def resume(cfg: GRPOConfig, ckpt_path: str, model, optimizer, scheduler, ckpt_keys: set[str]) -> int:
    """--resume: restore ckpt_path (refused if the task, model or schedule flags changed); -> its step."""
    meta = load_checkpoint(ckpt_path, model, optimizer, scheduler, ckpt_keys, asdict(cfg), RESUMABLE_CHANGES)
    before = meta.get("config", {}).get("steps", cfg.steps)
    if before != cfg.steps:
        print(f"note: --steps {cfg.steps} (the checkpoint's run had {before}): the learning-rate schedule "
              f"continues as one of the new length")
    return meta["step"]


def evaluate_and_log(model, mod, tok, held_out, cfg: GRPOConfig, eot: int, metrics: MetricsLog, step: int):
    """Held-out accuracy and format rate, to metrics.jsonl and the console."""
    t = time.time()
    res = evaluate(model, mod, tok, held_out, cfg, eot)
    metrics.write({"step": step, "eval_accuracy": res["accuracy"], "eval_format": res["format"]})
    tqdm.write(f"step {step}: held-out accuracy {res['accuracy']:.3f} ({len(held_out)} problems, greedy), "
               f"format {res['format']:.2f}, {time.time() - t:.0f}s; e.g. {res['samples'][:2]}")


@dataclass
class Batch:
    """One generation batch: G completions of each prompt, prompt-major, with their rewards and advantages."""
    prompts: list[list[int]]  # the prompt of each completion (each prompt G times)
    completions: list[list[int]]
    texts: list[str]  # the completions decoded, as the reward functions read them
    rewards: torch.Tensor  # (N,) weighted sum over the reward functions
    per_fn: torch.Tensor  # (N, n_fns) each function's reward, NaN where it raised
    advantages: torch.Tensor  # (N,)

    def rows(self, idx: list[int]) -> tuple[list, list]:
        return [self.prompts[i] for i in idx], [self.completions[i] for i in idx]


def sample_batch(model, mod, tok, examples, cfg: GRPOConfig, eot: int, step: int, reward_fns, weights) -> Batch:
    """Rollout: G samples of each prompt from the current policy (also pi_old of Algorithm 1), scored, and their
    advantages. The sampling seed is a function of (seed, step): a resumed run redoes exactly the same batch."""
    G, prompts = cfg.num_generations, encode_prompts(mod, tok, examples)
    model.eval()  # (no dropout anywhere; eval/train only mark the two phases)
    with token_bar(len(prompts) * G, cfg.max_new_tokens, f"step {step + 1}/{cfg.steps}: sampling") as bar:
        completions = rollout(model, prompts, G, cfg.max_new_tokens, cfg.temperature, eot,
                              cfg.seed * 10**6 + step, stream=lambda _row, _token: bar.update())
    prompts, examples = [p for p in prompts for _ in range(G)], [e for e in examples for _ in range(G)]
    texts = [tok.decode([t for t in c if t != eot]) for c in completions]  # rewards read text, not ids
    rewards, per_fn = score(reward_fns, weights, [e["question"] for e in examples], texts, examples)
    check_rewards(per_fn, reward_fns, step + 1)
    advantages = group_advantages(rewards, G, cfg.scale_rewards).to(next(model.parameters()).device)
    return Batch(prompts, completions, texts, rewards, per_fn, advantages)


def update_policy(model, ref_model, optimizer, scheduler, batch: Batch, cfg: GRPOConfig, step: int,
                  good_ckpt: str | None) -> tuple[torch.Tensor, float, float]:
    """num_iterations clipped-ratio updates on one batch, each accumulated over micro-batches; -> (the last
    update's loss, KL sum, low- and high-clipped token counts; its gradient norm; its learning rate)."""
    eps_high = cfg.epsilon_high or cfg.epsilon
    n_seqs, n_tokens = len(batch.completions), sum(len(c) for c in batch.completions)
    # Only rows with a non-zero advantage carry gradient when beta = 0 (departure 5); the normalisers count all
    rows = [i for i in range(n_seqs) if cfg.beta > 0 or batch.advantages[i] != 0]
    micro = [rows[i:i + cfg.micro_batch] for i in range(0, len(rows), cfg.micro_batch)]
    ref_logps = None
    if cfg.beta > 0:  # pi_ref's log-probs are fixed for the whole batch: one no-grad pass, before any update
        with torch.no_grad(), adapters_off(ref_model):  # (a frozen full copy has no adapters to switch off)
            ref_logps = [completion_logprobs(ref_model, *batch.rows(idx), cfg.temperature)[0] for idx in micro]
    model.train()
    old_logps = [None] * len(micro)
    for it in range(cfg.num_iterations):
        stats = torch.zeros(4)  # loss, kl sum, low-clipped tokens, high-clipped tokens
        for m, idx in enumerate(micro):
            logp, mask = completion_logprobs(model, *batch.rows(idx), cfg.temperature)  # (b, C)
            if it == 0:  # pi_old is the policy that sampled: pi_theta itself until the first update
                old_logps[m] = logp.detach()
            adv = batch.advantages[idx]  # one advantage per completion, shared by all its tokens (outcome reward)
            per_token = clipped_surrogate(logp, old_logps[m], adv, cfg.epsilon, eps_high)
            if cfg.beta > 0:
                kl = k3_kl(logp, ref_logps[m])
                per_token = per_token + cfg.beta * kl
                stats[1] += (kl * mask).sum().item()
            loss = aggregate(per_token, mask, cfg.loss_type, n_seqs, n_tokens, cfg.max_new_tokens)
            loss.backward()  # micro-batch shares add up to the batch loss, so gradients accumulate exactly
            ratio = torch.exp(logp - old_logps[m]).detach()  # TRL's clip metrics: clipped where it matters
            stats[0] += loss.item()
            stats[2] += ((ratio < 1 - cfg.epsilon) & (adv[:, None] < 0) & mask).sum().item()
            stats[3] += ((ratio > 1 + eps_high) & (adv[:, None] > 0) & mask).sum().item()
        if not math.isfinite(stats[0].item()):  # checked before the update: the weights are still good
            raise SystemExit(f"error: loss is {stats[0].item()} at step {step + 1}; stopped without updating. "
                             f"Last good checkpoint: {good_ckpt or 'none yet'} (lower --lr)")
        grad_norm = nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                             cfg.grad_clip or float("inf"))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()  # parameters without a gradient (no rows this step) are left untouched
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return stats, grad_norm.item(), lr


def step_record(step: int, batch: Batch, stats: torch.Tensor, reward_fns, G: int, eot: int) -> dict:
    """A step's line of metrics.jsonl: rewards and their spread, lengths, the loss terms of the last update."""
    n_seqs, n_tokens = len(batch.completions), sum(len(c) for c in batch.completions)
    groups = batch.rewards.view(-1, G)
    return {"step": step, "reward": batch.rewards.mean().item(),
            **{fn.__name__: batch.per_fn[:, j].nanmean().item() for j, fn in enumerate(reward_fns)},
            "reward_errors": int(batch.per_fn.isnan().sum()), "reward_std": groups.std(dim=1).mean().item(),
            "equal_groups": int((groups.max(dim=1).values == groups.min(dim=1).values).sum()),
            "completion_len": n_tokens / n_seqs,
            "stopped": sum(c[-1] == eot for c in batch.completions) / n_seqs, "loss": stats[0].item(),
            "kl": stats[1].item() / n_tokens, "clip_low": stats[2].item() / n_tokens,
            "clip_high": stats[3].item() / n_tokens}


def finish(model, mod, tok, held_out, cfg: GRPOConfig, eot: int, metrics: MetricsLog, step: int, hf_config: dict,
           tok_path: str, folder: RunFolder):
    """The last evaluation; the model exported with its adapters merged (`python smollm2.py --ckpt_dir OUT_DIR`
    chats with it); the reward plot."""
    evaluate_and_log(model, mod, tok, held_out, cfg, eot, metrics, step)
    written = export_hf(model, cfg.out_dir, hf_config, tok_path, cfg.lora_alpha / cfg.lora_rank, cfg.save_dtype,
                        cfg.ckpt_dir)
    png = plot_rewards(metrics.path, os.path.join(cfg.out_dir, "rewards.png"))
    folder.mark_written(written + (["rewards.png"] if png else []))
    evals = [r for r in (json.loads(line) for line in open(metrics.path)) if "eval_accuracy" in r]
    print(f"held-out accuracy {evals[0]['eval_accuracy']:.3f} at step {evals[0]['step']} -> "
          f"{evals[-1]['eval_accuracy']:.3f} at step {step}; model in {cfg.out_dir}/model.safetensors")


def train(cfg: GRPOConfig, reward_fns=REWARDS):
    """GRPO-train cfg.model on cfg.task; reward_fns are weighted by cfg.reward_weights."""
    weights = check_config(cfg, reward_fns)
    task_files = [cfg.task if cfg.task not in TASKS else "", cfg.eval_file]
    memory_fix = "lower --micro_batch, --prompts_per_step x --num_generations or --max_new_tokens, or use --mode lora"
    with RunFolder(cfg, "grpo.py", [cfg.ckpt_dir, *task_files], OUTPUTS, memory_fix) as folder:
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        sample_examples, held_out = task_data(cfg)
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        mod, model, hf_config, tok, tok_path = open_model(cfg.model, device, ckpt_dir=cfg.ckpt_dir)
        eot = end_of_turn_id(tok)
        ref_model = policy_and_reference(model, cfg)
        ckpt_keys = checkpoint_keys(model, everything=False)  # trainable tensors only: the rest is the checkpoint
        optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
        # the schedule counts optimizer updates: num_iterations of them per generation batch
        scheduler = build_scheduler(optimizer, cfg.warmup_steps, cfg.steps * cfg.num_iterations, cfg.min_lr_frac)
        ckpt_path, step = os.path.join(cfg.out_dir, "ckpt.pt"), 0
        if cfg.resume:
            step = resume(cfg, ckpt_path, model, optimizer, scheduler, ckpt_keys)
            folder.saved(ckpt_path, step)
        metrics = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), keep_until=step if cfg.resume else None)
        print(f"{cfg.model} {cfg.ckpt_dir}: task {cfg.task}, {cfg.prompts_per_step} prompts x {cfg.num_generations} "
              f"completions per step, {cfg.steps} steps, {cfg.mode}, loss {cfg.loss_type}, beta {cfg.beta}, {device}")
        if step == 0:
            evaluate_and_log(model, mod, tok, held_out, cfg, eot, metrics, step)
        t_start = time.time()
        while step < cfg.steps:
            t0 = time.time()
            # the prompts are a function of (seed, step), as the sampling: a resumed run redoes exactly the same batch
            examples = sample_examples(random.Random(f"{cfg.seed}-{step}"), cfg.prompts_per_step)
            batch = sample_batch(model, mod, tok, examples, cfg, eot, step, reward_fns, weights)
            t_gen = time.time() - t0
            stats, grad_norm, lr = update_policy(model, ref_model, optimizer, scheduler, batch, cfg, step,
                                                 folder.checkpoint)
            step += 1
            record = step_record(step, batch, stats, reward_fns, cfg.num_generations, eot) | {
                "grad_norm": grad_norm, "lr": lr, "gen_s": t_gen, "step_s": time.time() - t0,
                "elapsed_s": time.time() - t_start}
            metrics.write(record)
            tqdm.write(f"step {step}/{cfg.steps} | reward {record['reward']:.3f} ("
                       + " ".join(f"{fn.__name__} {record[fn.__name__]:.2f}" for fn in reward_fns)
                       + f") len {record['completion_len']:.1f} | loss {record['loss']:+.4f} kl {record['kl']:.4f} | "
                       f"{record['step_s']:.0f}s (generation {t_gen:.0f}s) | e.g. {batch.texts[0]!r}")
            out_of_time = cfg.time_limit and time.time() - t_start > 60 * cfg.time_limit
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps and not out_of_time:
                evaluate_and_log(model, mod, tok, held_out, cfg, eot, metrics, step)  # (the last one: in finish)
            if step % cfg.ckpt_every == 0 or step == cfg.steps or out_of_time:
                check_usable(model, step, batch.prompts, batch.completions, cfg.temperature, folder.checkpoint)
                save_checkpoint(ckpt_path, model, optimizer, scheduler, ckpt_keys, step=step, config=asdict(cfg))
                metrics.commit()
                folder.saved(ckpt_path, step)
            if out_of_time:
                print(f"stopping after {step} steps: the time limit of {cfg.time_limit} minutes is reached")
                break
        metrics.commit()  # an evaluation-only run (--steps 0), or a resume with nothing left to do
        if cfg.steps > 0:
            finish(model, mod, tok, held_out, cfg, eot, metrics, step, hf_config, tok_path, folder)


def plot_rewards(metrics_path: str, png_path: str) -> bool:
    """Training reward per step (and its 5-step mean) with the held-out accuracy, if matplotlib is installed;
    -> whether it was written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot; the curves are in {metrics_path}")
        return False
    recs = [json.loads(line) for line in open(metrics_path)]
    steps, rewards = zip(*[(r["step"], r["reward"]) for r in recs if "reward" in r])
    smooth = [sum(rewards[max(0, i - 4):i + 1]) / len(rewards[max(0, i - 4):i + 1]) for i in range(len(rewards))]
    evals = [(r["step"], r["eval_accuracy"]) for r in recs if "eval_accuracy" in r]
    plt.figure(figsize=(7, 4))
    plt.plot(steps, rewards, alpha=0.3, label="train reward")
    plt.plot(steps, smooth, label="train reward, 5-step mean")
    plt.plot(*zip(*evals), marker="o", label="held-out accuracy (greedy)")
    plt.xlabel("step"), plt.legend(), plt.grid(alpha=0.3)
    try:
        plt.savefig(png_path, dpi=120, bbox_inches="tight")
        return True
    except OSError as e:  # the model is saved by now: the plot is optional, the run still succeeded
        print(f"warning: could not write {png_path} ({e}); the curves are in {metrics_path}")
        return False
    finally:
        plt.close()


# -----------------------------------------------------------------------------
# Command line


def check_config(c: GRPOConfig, reward_fns) -> list[float]:
    """User errors end in one line naming the fix, before anything is loaded; -> the reward weights."""
    check_flags(c, {
        "model": (c.model in ("smollm2", "llama31"), "one of 'smollm2', 'llama31'"), "eval_n": (c.eval_n >= 1, ">= 1"),
        "steps": (c.steps >= 0, ">= 0"), "time_limit": (c.time_limit >= 0, ">= 0"),
        "prompts_per_step": (c.prompts_per_step >= 1, ">= 1"),
        "num_generations": (c.num_generations >= 2, ">= 2: advantages compare completions of one prompt"),
        "max_new_tokens": (c.max_new_tokens >= 1, ">= 1"), "temperature": (c.temperature > 0, "> 0"),
        "loss_type": (c.loss_type in ("grpo", "dr_grpo", "dapo"), "one of 'grpo', 'dr_grpo', 'dapo'"),
        "epsilon": (0 <= c.epsilon < 1, "in [0, 1)"), "epsilon_high": (c.epsilon_high >= 0, ">= 0"),
        "beta": (c.beta >= 0, ">= 0"),
        "scale_rewards": (c.scale_rewards in ("group", "batch", "none"), "one of 'group', 'batch', 'none'"),
        "num_iterations": (c.num_iterations >= 1, ">= 1"),
        "mode": (c.mode in ("lora", "full"), "one of 'lora', 'full'"),
        "lora_rank": (c.lora_rank >= 1, ">= 1"), "lora_alpha": (c.lora_alpha > 0, "> 0"), "lr": (c.lr > 0, "> 0"),
        "warmup_steps": (c.warmup_steps >= 0, ">= 0"), "min_lr_frac": (0 <= c.min_lr_frac <= 1, "in [0, 1]"),
        "weight_decay": (c.weight_decay >= 0, ">= 0"), "grad_clip": (c.grad_clip >= 0, ">= 0"),
        "micro_batch": (c.micro_batch >= 1, ">= 1"), "eval_every": (c.eval_every >= 0, ">= 0"),
        "ckpt_every": (c.ckpt_every >= 1, ">= 1"), "threads": (c.threads >= 0, ">= 0"),
        "save_dtype": (c.save_dtype in ("float32", "bfloat16", "float16"), "one of 'float32', 'bfloat16', 'float16'"),
        "seed": (0 <= c.seed < 2**32, "in [0, 2**32)")})
    check_device(c.device)
    try:
        weights = [float(w) for w in c.reward_weights.split(",")]
    except ValueError:
        weights = []
    if len(weights) != len(reward_fns) or not all(map(math.isfinite, weights)):
        raise SystemExit(f"error: --reward_weights needs {len(reward_fns)} comma-separated numbers, one per reward "
                         f"function ({', '.join(fn.__name__ for fn in reward_fns)}), got {c.reward_weights!r}")
    names = [fn.__name__ for fn in reward_fns]
    clash = next((n for i, n in enumerate(names) if n in names[:i] or n in RECORD_KEYS), None)
    if clash:
        raise SystemExit(f"error: two reward functions, or a reward and a logged value, are named {clash!r}: "
                         f"their columns in metrics.jsonl would overwrite each other; rename one")
    if c.task not in TASKS and not os.path.isfile(c.task):
        raise SystemExit(f"error: --task {c.task!r} is neither a built-in task ({', '.join(TASKS)}) nor a file")
    if c.eval_file and not os.path.isfile(c.eval_file):
        raise SystemExit(f"error: --eval_file {c.eval_file} not found")
    c.ckpt_dir = checkpoint_folder(c.ckpt_dir)
    if not os.path.isfile(os.path.join(c.ckpt_dir, "config.json")):
        raise SystemExit(f"error: no checkpoint at {c.ckpt_dir}: run `python download.py`")
    export_sources(c.ckpt_dir, c.ckpt_dir)  # a file the export could not copy: refused now, not at the end
    return weights


@torch.no_grad()
def check_usable(model, step: int, prompts, completions, temperature: float, good_ckpt: str | None):
    """Only finite weights with finite log-probs are saved or exported: an update can overflow into huge but
    finite weights, which only the next forward pass shows. The last batch's first rows are that pass."""
    logp, _ = completion_logprobs(model, prompts[:8], completions[:8], temperature)
    bad = nonfinite_count(model)
    if bad or not torch.isfinite(logp).all():
        raise SystemExit(f"error: weights became unusable at step {step} ({bad} non-finite values, non-finite "
                         f"log-probs: {not torch.isfinite(logp).all()}); stopped without saving. Last good "
                         f"checkpoint: {good_ckpt or 'none yet'} (lower --lr)")


def main(argv: list[str] | None = None):
    """GRPO-train a chat model on a verifiable task (--steps 0: only evaluate it). Flags: the GRPOConfig fields."""
    try:
        train(cli(GRPOConfig, argv))
    except KeyboardInterrupt:  # (during training the run's folder answers it, naming the checkpoint to resume)
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
