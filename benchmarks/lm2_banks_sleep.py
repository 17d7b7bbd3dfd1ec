"""
Test bed of lm2_banks.py: (a) memory banks read by relevance against lm2.py's dense bank, and
(b) a sleep phase that consolidates recurring facts from the memory into LoRA weights. Small models trained
from scratch on a synthetic recall task whose answers are known; everything runs on a 2-core CPU.

Task (token ids, no tokenizer; one episode = 128 tokens = 4 segments of 32):
    segments 0-1  F facts "D k v" (domain D of 32, key k of 16, value v of 10; the entity is (D, k)), then filler
    segment  2    filler
    segment  3    8 questions "? D k v": the model predicts v at the k position (loss and accuracy only there)
Facts are fresh in every episode (random entities, random values), so weights cannot hold them. Attention is a
sliding window of 16 tokens in 2 blocks, so a question sees at most 30 tokens back: a fact stated in
segment 1 (or 0) is two or more segments before its question and only the memory (carried across segments)
can bring it. Memory sits in block 1 only: block 0's normed input is the bare token embedding, which knows
no domain to route by.

Models (dim 64, 2 blocks, 4 heads, memory 4 heads; the same Llama part for all):
    none       no memory (chance: 0.1)
    dense      lm2.py's single bank, N = 128 slots (lm2_banks with K=1, m=1, which is lm2.py exactly)
    K8 m1      8 banks x 16 slots = 128, each token reads its top bank
    K32 m1     32 banks x 16 slots = 512, top bank (scaling)
    K8 prog    8 banks x 16 slots, progressive read: the top bank, and the second while the best read attention
               is below --progressive_threshold (optional: not in the default --models; its read FLOPs are
               counted from the banks its tokens read on the held-out episodes; its read time is timed as
               the others', on untrained weights, so with however many banks those read)
The banks' keys are learned (--bank_keys mean: the mean of their slot keys; cluster: centroids moved by balanced
k-means, --centroid_decay 1 keeps them random), and the router's balancing bias, balance loss, distillation and
the write shift (--write_shift: a token is written to the bank its predecessor reads; --shift_slots: and to the
slots its predecessor's query addresses, which with the dense bank is the shift without banks) are off unless
their flags are given (docs/lm2_banks_results.md says what each did).
Training episodes have F = 8..16 facts (at least one per question: an entity asked twice could be answered
by copying the first answer). (a) recall at F = 8, 12, 16, 21 (21: beyond training;
read FLOPs per token (counted) and read time per
token (timed, one segment of 32 rows, median of repeats), routing precision: the share of questions whose top
bank is the bank the fact's value token was written to, and domain purity: the share of fact writes that go to
their domain's most used bank; closeness: whether a question's key token lies near its own fact's tokens at
the memory block (cosine in h, q and the read's score space), and how much of its read reaches its own fact.
(b) on the trained K8 m1 model: 16 "frequent" entities with fixed values recur across 256 wake episodes (2 per
episode, with 6 fresh facts). Entities are ranked by lm2_banks.token_access (the read attention their slots
received), and the top 16 are consolidated by lm2_banks.sleep (LoRA on the MLP and attention output); so are
the 16 most often stated (a plain count: the baseline the attention ranking must beat) and 16 chosen at random
among those seen. The frequent entities are stated ten times as often as the others, so the count finds them
too; --decoys N adds a second world in which N more recurring entities are stated as often but never asked
about: only a ranking that sees what the memory is read for can tell them from the frequent ones. Half the
batches (one in 1 + --sleep_replay) consolidate: the student sees a wake episode without the chosen facts and
learns, by cross-entropy, the memory model's consensus answer for each (its answer distribution with the facts stated, averaged over
all wake episodes that state the entity, then its most probable token); the others replay fresh episodes with
memory on (KL to the frozen model). Measured:
recall of the frequent facts with the memory on (the teacher) and reset (facts not stated), fresh-episode
recall with memory on, held-out answer loss, each before and after, and how many consensus answers are right.

Run (the tables of docs/lm2_banks_results.md; one full run per seed, each resumable):
    OMP_NUM_THREADS=1 python benchmarks/lm2_banks_sleep.py --out_dir runs/lm2/shift --models "dense,K8 m1,K32 m1" \
        --write_shift --decoys 16 --seeds 1337 1338 1339
Prints both tables over the seeds (mean +- sd [min, max]); writes seed_N/results.json and log.txt, summary.json
and, where matplotlib is installed, lm2_banks_scaling.png into --out_dir.
"""
import copy
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import lm2_banks  # noqa: E402
from lm2_banks import BankArgs, BankLM2, BankedMemory  # noqa: E402
from cli import cli  # noqa: E402

SEG, N_SEG, WINDOW = 32, 4, 16
T = SEG * N_SEG
N_FILL, N_DOM, N_KEY, N_VAL = 4, 32, 16, 10
QMARK = N_FILL
DOM0 = QMARK + 1
KEY0 = DOM0 + N_DOM
VAL0 = KEY0 + N_KEY
VOCAB = VAL0 + N_VAL
FACT_END, Q_START, N_Q = 2 * SEG, 3 * SEG, 8  # facts in segments 0-1, questions fill segment 3
MAX_F = FACT_END // 3
ENTITIES = [(d, k) for d in range(N_DOM) for k in range(N_KEY)]


def model_args(memory: str, bank_keys: str = "learned", aux_alpha: float = 0.0, route_distill: float = 0.0,
               progressive_threshold: float = 0.5, write_shift: bool = False, shift_slots: bool = False) -> BankArgs:
    banks = {"none": (1, 1, 1), "dense": (1, 128, 1), "K8 m1": (8, 16, 1), "K32 m1": (32, 16, 1),
             "K8 prog": (8, 16, 2)}[memory]
    return BankArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=16, hidden_dim=128,
                    vocab_size=VOCAB, rope_theta=10000.0, max_seq_len=T, bos_token_id=0, stop_tokens=(0,),
                    mem_banks=banks[0], mem_slots=banks[1], mem_top=banks[2], mem_heads=4, mem_bank_keys=bank_keys,
                    mem_aux_alpha=aux_alpha, mem_route_distill=route_distill,
                    mem_progressive_threshold=progressive_threshold if memory == "K8 prog" else None,
                    mem_write_shift=write_shift, mem_shift_slots=shift_slots,
                    mem_layers=() if memory == "none" else (1,), segment_len=SEG, attn_window=WINDOW)

# -----------------------------------------------------------------------------
# episodes


def render(rng, facts: dict, asked: list, hidden=()):
    """Tokens (T,) and the question positions (N_Q,) (where v is predicted) of an episode; facts {entity: value}
    are stated in order (those in hidden are not: filler takes their place), asked is the question list."""
    toks = [rng.randrange(N_FILL) for _ in range(T)]
    for i, (e, v) in enumerate(facts.items()):
        if e not in hidden:
            toks[3 * i:3 * i + 3] = [DOM0 + e[0], KEY0 + e[1], VAL0 + v]
    pos = []
    for j, e in enumerate(asked):
        p = Q_START + 4 * j
        toks[p:p + 4] = [QMARK, DOM0 + e[0], KEY0 + e[1], VAL0 + facts[e]]
        pos.append(p + 2)
    return toks, pos


def fresh_facts(rng, n: int, pool=ENTITIES) -> dict:
    return {e: rng.randrange(N_VAL) for e in rng.sample(pool, n)}


def ask(rng, facts, n=N_Q):
    """n distinct entities of facts: never one twice, whose second answer could be copied from the first
    through attention (needs len(facts) >= n)."""
    return rng.sample(list(facts), n)


def batch(episodes):
    """[(tokens, positions)] -> tokens (B, T), positions (B, N_Q), answers (B, N_Q)."""
    x = torch.tensor([e[0] for e in episodes])
    pos = torch.tensor([e[1] for e in episodes])
    return x, pos, x.gather(1, pos + 1) - VAL0


def question_logits(model, x, pos):
    """(B, N_Q, vocab): the logits at the question positions, which predict the answers."""
    logits = model(x)  # (B, T, vocab); logits[:, p] predicts token p + 1
    return logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1]))


def answer_logits(model, x, pos):
    """(B, N_Q, N_VAL): the logits of the ten values, among which recall picks."""
    return question_logits(model, x, pos)[..., VAL0:VAL0 + N_VAL]


@torch.no_grad()
def evaluate(model, episodes, batch_size=64):
    """Answer accuracy and mean answer cross-entropy over episodes."""
    right = loss = n = 0
    for i in range(0, len(episodes), batch_size):
        x, pos, ans = batch(episodes[i:i + batch_size])
        lg = answer_logits(model, x, pos)
        right += int((lg.argmax(-1) == ans).sum())
        loss += float(F.cross_entropy(lg.flatten(0, 1), ans.flatten(), reduction="sum"))
        n += ans.numel()
    return right / n, loss / n

# -----------------------------------------------------------------------------
# (a) training and measurements


def train(args: BankArgs, name: str, steps: int, batch_size: int, lr: float, seed: int, log, bias_rate: float = 0.0,
          centroid_decay: float = 0.9):
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = BankLM2(args)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = 20
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.1 + 0.45 * (1 + math.cos(math.pi * s / steps))))
    t0, recent = time.time(), []
    for step in range(steps):
        eps = []
        for _ in range(batch_size):
            facts = fresh_facts(rng, rng.randint(N_Q, 16))  # F = 21 in the evaluation is beyond training
            eps.append(render(rng, facts, ask(rng, facts)))
        x, pos, ans = batch(eps)
        loss = F.cross_entropy(answer_logits(model, x, pos).flatten(0, 1), ans.flatten())
        opt.zero_grad(set_to_none=True)
        (loss + model.extra_loss()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        model.update_router_biases(bias_rate)
        model.update_centroids(centroid_decay)
        recent.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0:
            log(f"  {name} step {step + 1}/{steps} loss {statistics.mean(recent):.3f} "
                f"({(time.time() - t0) / (step + 1):.2f} s/step)")
            recent = []
    return model.eval(), (time.time() - t0) / 60


def test_episodes(rng, n_facts: int, n: int, pool=ENTITIES):
    out = []
    for _ in range(n):
        facts = fresh_facts(rng, n_facts, pool)
        out.append(render(rng, facts, ask(rng, facts)) + (facts,))
    return out


@torch.no_grad()
def routing(model, episodes):
    """Routing precision (question's top bank == the bank its fact's value token was written to), domain
    purity (share of fact writes in their domain's most used bank) and the banks used: exp(entropy) of the
    share of fact writes per bank (K if spread evenly, 1 if every fact goes to one bank: then precision and
    purity are 1 and say nothing), from the memory block's routing scores."""
    x, pos, _ = batch(episodes)
    _, traced = lm2_banks.trace_memory(model, x)
    (mem, segs), = traced
    top = torch.cat([mem.route(mem.q_proj(h), state)[1][..., 0] for h, state in segs], dim=1)  # (B, T): read
    wrote = torch.cat([mem.write_banks(mem.q_proj(h), state) for h, state in segs], dim=1)  # (B, T): written to
    hits = total = 0
    by_domain = {}
    for b, (toks, qpos, facts) in enumerate(episodes):
        where = {e: 3 * i + 2 for i, e in enumerate(facts)}  # value token of each fact
        for e, p in where.items():
            by_domain.setdefault(e[0], []).append(int(wrote[b, p]))
        for p in qpos:
            e = (toks[p - 1] - DOM0, toks[p] - KEY0)
            hits += int(top[b, p] == wrote[b, where[e]])
            total += 1
    writes = sum(by_domain.values(), [])
    pure = sum(max(map(banks.count, set(banks))) for banks in by_domain.values())
    share = torch.bincount(torch.tensor(writes), minlength=mem.n_banks).float() / len(writes)
    used = math.exp(-float((share * share.clamp_min(1e-12).log()).sum()))
    return hits / total, pure / len(writes), used


@torch.no_grad()
def closeness(model, episodes):
    """Can any router be consistent, and is the read content-addressed? At the memory block, for each question's
    reading token (its key k, which predicts v) and the episode's facts "D k v":
    - cosine to each fact token (D, k, v), in three spaces: the block's normed input h; the memory query q = h W_Q,
      on which the routers here route both the read and the write; and the read's score space (q of the question
      against W_K h of the fact token). {"h" | "q" | "q.k": {"D" | "k" | "v": (own, other, closest)}}: mean cosine
      to its own fact's token, to the other facts' same token, and the share of questions whose own fact's token
      is the closest (1/F by chance);
    - "read": the question's read mass that reaches each fact's three tokens, through the slots' write shares
      (lm2_banks.token_access's attribution: later rewrites of a slot are not followed): (own, other, closest) as
      above, mass per fact instead of cosine."""
    x, pos, _ = batch(episodes)
    _, traced = lm2_banks.trace_memory(model, x)
    (mem, segs), = traced
    h = torch.cat([h for h, _ in segs], dim=1)  # (B, T, d)
    q, k = mem.q_proj(h), mem.k_proj(h)
    weights = [mem.slot_weights(h_s, state) for h_s, state in segs]  # per segment: read (B, S, N), write (B, N, S)
    read = weights[-1][0]  # the questions' segment
    written = torch.cat([write for _, write in weights[:-1]], dim=2)  # (B, N, T - S): the segments written
    mass = (read @ written).unflatten(2, (-1, 3))[:, :, :MAX_F].sum(-1)  # (B, S, MAX_F): read mass per fact slot

    def own_other(sim, own_index):  # sim (questions, F) -> (own, mean other, own is the largest)
        other = (sim.sum() - sim[own_index]) / (len(sim) - 1)
        return float(sim[own_index]), float(other), int(sim.argmax() == own_index)

    spaces = {"h": (h, h), "q": (q, q), "q.k": (q, k)}
    sums = {(sp, t): [0.0, 0.0, 0] for sp in spaces for t in "Dkv"} | {("read", ""): [0.0, 0.0, 0]}
    n = 0
    for i, (toks, qpos, facts) in enumerate(episodes):
        fact_of = {e: j for j, e in enumerate(facts)}
        for p in qpos:
            j = fact_of[(toks[p - 1] - DOM0, toks[p] - KEY0)]
            rows = [((sp, t), F.normalize(b[i, off:3 * len(facts):3], dim=-1) @ F.normalize(a[i, p], dim=-1))
                    for sp, (a, b) in spaces.items() for off, t in enumerate("Dkv")]
            rows.append((("read", ""), mass[i, p - Q_START, :len(facts)]))
            for key, sim in rows:
                for m, v in enumerate(own_other(sim, j)):
                    sums[key][m] += v
            n += 1
    out = {}
    for (sp, t), vals in sums.items():
        out.setdefault(sp, {})[t] = tuple(v / n for v in vals)
    out["read"] = out["read"][""]
    return out


def time_read(args: BankArgs, rows: int, repeats: int) -> float:
    """Seconds per token of one block's memory read (BankedMemory.read, projections included) for 32 sequences
    of `rows` tokens each against filled banks (rows = 32: a segment, as in training and prefill; rows = 1:
    one decoding step); median of repeats."""
    torch.manual_seed(0)
    mem = BankedMemory(args)
    h = torch.randn(32, rows, args.dim)
    with torch.no_grad():
        state = mem.state(torch.randn(32, args.mem_banks * args.mem_slots, args.dim))
        for _ in range(3):
            mem.read(h, state)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            mem.read(h, state)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) / h.shape[0] / h.shape[1]

# -----------------------------------------------------------------------------
# (b) sleep


def wake_world(seed: int, decoys: int = 0, n_frequent=16, n_wake=256, per_episode=2, n_facts=8):
    """The frequent entities with their fixed values, the decoys, the entities left for fresh facts, and wake
    episodes (facts dicts, question lists). Every wake episode states per_episode frequent entities among n_facts
    and asks about all its facts; with decoys > 0 it also states per_episode of `decoys` other recurring entities
    (fixed values too) that are never asked about: as frequent as the frequent ones, but the memory is never read
    for them by a question."""
    rng = random.Random(seed)
    frequent = {e: rng.randrange(N_VAL) for e in rng.sample(ENTITIES, n_frequent)}
    rest = [e for e in ENTITIES if e not in frequent]
    decoy = {e: rng.randrange(N_VAL) for e in rng.sample(rest, decoys)}
    others = [e for e in rest if e not in decoy]
    wake = []
    for _ in range(n_wake):
        facts = {e: frequent[e] for e in rng.sample(list(frequent), per_episode)}
        facts.update(fresh_facts(rng, n_facts - per_episode, others))
        asked = ask(rng, facts)
        if decoy:
            facts.update({e: decoy[e] for e in rng.sample(list(decoy), per_episode)})
        facts = dict(rng.sample(list(facts.items()), len(facts)))  # frequent facts anywhere in the list
        wake.append((facts, asked))
    return frequent, decoy, others, wake


@torch.no_grad()
def rank_by_access(model, wake, seed: int):
    """Summed token_access at the three tokens of each stated fact, over all wake episodes."""
    rng = random.Random(seed)
    mass = {}
    for i in range(0, len(wake), 64):
        chunk = wake[i:i + 64]
        x = torch.tensor([render(rng, f, q)[0] for f, q in chunk])
        acc = lm2_banks.token_access(model, x)
        for b, (facts, _) in enumerate(chunk):
            for j, e in enumerate(facts):
                mass[e] = mass.get(e, 0.0) + float(acc[b, 3 * j:3 * j + 3].sum())
    return sorted(mass, key=mass.get, reverse=True)


def rank_by_count(wake, seed: int):
    """The entities of the wake episodes, most often stated first (ties in a seeded random order): the baseline
    that a ranking by the memory's read attention has to beat."""
    count = {}
    for facts, _ in wake:
        for e in facts:
            count[e] = count.get(e, 0) + 1
    order = sorted(count)
    random.Random(seed + 2).shuffle(order)
    return sorted(order, key=count.get, reverse=True)  # stable: ties keep the shuffled order


@torch.no_grad()
def consensus(teacher, wake, chosen, seed: int):
    """{entity: answer token} for the chosen entities: the memory model's most probable answer averaged over
    every wake episode that states and asks it (what the memory says about it most often)."""
    rng = random.Random(seed)
    mass = {}
    for i in range(0, len(wake), 64):
        chunk = wake[i:i + 64]
        eps = [render(rng, f, q) for f, q in chunk]
        x, pos, _ = batch(eps)
        # subtle: over the ten values, as recall: the models train on those logits only, so the argmax over the
        # whole vocabulary can be a token the question never takes
        probs = answer_logits(teacher, x, pos).softmax(-1)  # (B, N_Q, N_VAL)
        for b, (_, asked) in enumerate(chunk):
            for j, e in enumerate(asked):
                if e in chosen:
                    mass[e] = mass.get(e, 0) + probs[b, j]
    return {e: VAL0 + int(m.argmax()) for e, m in mass.items()}


def sleep_batches(teacher, answers, wake, others, seed: int, batch_size: int, replay: int = 1):
    """(tokens, positions, target) batches, one consolidation batch then `replay` replay batches, repeated.
    Consolidation: wake episodes that state chosen facts,
    with those facts omitted, asked about them; target: the consensus answer (cross-entropy). Replay: fresh
    episodes, memory on; target: the teacher's output distribution (KL)."""
    rng = random.Random(seed)
    with_chosen = [(f, [e for e in f if e in answers]) for f, _ in wake if any(e in answers for e in f)]
    step = 0
    while True:
        rows, masks, targets = [], [], []
        for _ in range(batch_size):
            if step % (1 + replay) == 0:
                facts, mine = rng.choice(with_chosen)
                asked = (mine + [e for e in ask(rng, facts) if e not in mine])[:N_Q]  # chosen first, all distinct
                toks, pos = render(rng, facts, asked, hidden=set(mine))
                keep = pos[:len(mine)]
                targets += [answers[e] for e in mine]
            else:
                facts = fresh_facts(rng, 8, others)
                toks, keep = render(rng, facts, ask(rng, facts))
            m = torch.zeros(T, dtype=torch.bool)
            m[keep] = True
            rows.append(toks)
            masks.append(m)
        x, pos = torch.tensor(rows), torch.stack(masks)
        if step % (1 + replay) == 0:
            target = torch.tensor(targets)
        else:
            with torch.no_grad():  # subtle: not around the yield, which would run the consumer without grad
                target = teacher(x)[pos].log_softmax(-1)
        step += 1
        yield x, pos, target


def sleep_eval(model, frequent, others, seed: int, n=256):
    """Recall of 4 frequent facts per episode (among 4 fresh ones asked) with the memory on (the frequent facts
    stated with 8 fresh ones: what the teacher knows) and with it reset (the same episode, the frequent facts
    not stated); fresh-episode recall (memory on) and held-out answer loss."""
    rng = random.Random(seed)
    stated, reset = [], []
    for _ in range(n):
        facts = {e: frequent[e] for e in rng.sample(list(frequent), 4)}
        asked = list(facts)
        facts.update(fresh_facts(rng, 8, others))
        asked += rng.sample(list(facts)[4:], 4)
        facts = dict(rng.sample(list(facts.items()), len(facts)))
        tok_seed = rng.random()
        for out, hidden in ((stated, ()), (reset, set(frequent))):
            toks, pos = render(random.Random(tok_seed), facts, asked, hidden)
            out.append((toks, pos[:4]))
    memory_on, _ = evaluate(model, stated)
    consolidated, _ = evaluate(model, reset)
    fresh_acc, fresh_loss = evaluate(model, [e[:2] for e in test_episodes(rng, 8, n, others)])
    return consolidated, fresh_acc, fresh_loss, memory_on

# -----------------------------------------------------------------------------
# the run


MODELS = ("none", "dense", "K8 m1", "K32 m1")
OPTIONAL = ("K8 prog",)
# the flags a seed's saved results must share with the command that continues them
SETTINGS = ("steps", "batch_size", "lr", "bank_keys", "bias_rate", "aux_alpha", "route_distill", "centroid_decay",
            "write_shift", "shift_slots", "progressive_threshold", "sleep", "sleep_steps", "sleep_rank", "sleep_lr",
            "sleep_replay", "decoys", "n_eval")


def main(out_dir: str = "runs/lm2_banks", models: str = ",".join(MODELS), steps: int = 700, batch_size: int = 32,
         lr: float = 3e-3,
         bank_keys: str = "learned", bias_rate: float = 0.0, aux_alpha: float = 0.0, route_distill: float = 0.0,
         centroid_decay: float = 0.9, write_shift: bool = False, shift_slots: bool = False,
         progressive_threshold: float = 0.5, sleep: bool = True,
         sleep_steps: int = 300, sleep_rank: int = 8, sleep_lr: float = 3e-3, sleep_replay: int = 1, decoys: int = 0,
         n_eval: int = 256, repeats: int = 50, read_times_only: bool = False,
         seeds: list[int] = (1337,)):
    """Train the models, measure (a) and (b) for every seed, print both tables over the seeds, write the results.
    out_dir: the run's folder: seed_N/results.json and log.txt per seed, summary.json and (with matplotlib)
        lm2_banks_scaling.png; a seed already in it is not run again, an unfinished one continues at its next model
    models: comma-separated subset of the four models, or "K8 prog", to train; (b) runs when K8 m1 is among them
    steps: training steps of every model (batches of batch_size episodes)
    bank_keys: "learned" bank keys, "mean" (mean of each bank's slot keys) or "cluster" (centroids moved by balanced
        k-means; lm2_banks.BankArgs.mem_bank_keys)
    centroid_decay: the cluster router's k-means decay per optimizer step (1: fixed random centroids, an LSH)
    write_shift: write each token to the bank its predecessor reads (lm2_banks.BankArgs.mem_write_shift)
    shift_slots: address a token's write among the slots with its predecessor's query (mem_shift_slots; with the
        dense bank: the write shift without banks)
    bias_rate: router bias step per optimizer step (DeepSeek-V3's gamma; 0: off)
    aux_alpha: weight of the router's balance loss (0: off)
    route_distill: weight of the router's distillation towards the dense read's mass per bank (0: off)
    progressive_threshold: K8 prog reads its second bank while its best read attention is below this
    sleep: run (b), the sleep phases, on the trained K8 m1
    sleep_steps: steps of each sleep phase (consolidation and replay batches, see sleep_replay)
    sleep_rank: LoRA rank of the sleep phases
    sleep_lr: learning rate of the sleep phases
    sleep_replay: replay batches per consolidation batch in the sleep phases
    decoys: also run (b) in a world with this many decoys: recurring entities stated as often as the frequent
        ones and never asked about, so that counting cannot tell them apart (0: only the plain world)
    n_eval: held-out episodes per measurement (8 answers each)
    repeats: timed repeats of one read
    read_times_only: only time the models' reads and print them (untrained weights); trains and writes nothing
    seeds: the seeds of the weights, the data and the choices: one full run each"""
    if steps < 10 or sleep_steps < 10 or n_eval < 8 or sleep_replay < 0 or decoys < 0 or not seeds:
        raise SystemExit("error: need --steps >= 10, --sleep_steps >= 10, --n_eval >= 8, --sleep_replay >= 0, "
                         "--decoys >= 0 and at least one seed")
    if decoys > len(ENTITIES) // 2:
        raise SystemExit(f"error: --decoys takes at most {len(ENTITIES) // 2} of the {len(ENTITIES)} entities")
    names = [m.strip() for m in models.split(",")]
    if not names or not set(names) <= set(MODELS + OPTIONAL):
        raise SystemExit(f"error: --models takes a comma-separated subset of {','.join(MODELS + OPTIONAL)}, got {models!r}")
    if read_times_only:
        return print_read_times([m for m in MODELS + OPTIONAL if m in names and m != "none"], repeats)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out_dir {out_dir} is a file; give a folder")
    config = dict(models=names, steps=steps, batch_size=batch_size, lr=lr, bank_keys=bank_keys, bias_rate=bias_rate,
                  aux_alpha=aux_alpha, route_distill=route_distill, centroid_decay=centroid_decay,
                  write_shift=write_shift, shift_slots=shift_slots, progressive_threshold=progressive_threshold,
                  sleep=sleep, sleep_steps=sleep_steps, sleep_rank=sleep_rank, sleep_lr=sleep_lr,
                  sleep_replay=sleep_replay, decoys=decoys, n_eval=n_eval, repeats=repeats)
    for seed in seeds:  # before any work: every seed already saved must have been made with these settings
        saved = out / f"seed_{seed}" / "results.json"
        if saved.is_file():
            old = json.loads(saved.read_text())["config"]
            diff = [k for k in SETTINGS if old.get(k) != config[k]]
            if diff:
                raise SystemExit(f"error: {saved} was made with other settings ({', '.join(diff)}); give another "
                                 f"--out_dir, or the same flags to continue it")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: cannot create --out_dir {out_dir} ({e.strerror})")
    per_seed = {seed: run_seed(out / f"seed_{seed}", names, config, seed, bias_rate, centroid_decay)
                for seed in seeds}
    summary = {"config": config, "seeds": list(seeds), "per_seed": {str(k): v for k, v in per_seed.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    report(per_seed, config, out)


def run_seed(folder: Path, names: list[str], config: dict, seed: int, bias_rate: float, centroid_decay: float):
    """One seed's models, (a) measures and (b) sleep phases, saved to folder/results.json after every model and
    every sleep phase; a model already in it is not trained again (K8 m1 keeps its weights for (b))."""
    folder.mkdir(exist_ok=True)
    path = folder / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {"a": {}, "b": {}}
    results["config"] = dict(config, seed=seed, models=sorted(set(names) | set(results["a"])))
    logf = open(folder / "log.txt", "a")

    def log(line):
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    def save():  # a new file, then a rename: a run cut short keeps what it measured
        (folder / "results.json.tmp").write_text(json.dumps(results, indent=1))
        (folder / "results.json.tmp").replace(path)

    c = config
    margs = dict(bank_keys=c["bank_keys"], aux_alpha=c["aux_alpha"], route_distill=c["route_distill"],
                 progressive_threshold=c["progressive_threshold"], write_shift=c["write_shift"],
                 shift_slots=c["shift_slots"])
    f_grid = [8, 12, 16, MAX_F]
    base = None
    for name in [m for m in MODELS + OPTIONAL if m in names]:
        args = model_args(name, **margs)
        weights = folder / f"{name.replace(' ', '_')}.pt"
        if name in results["a"]:
            if name == "K8 m1" and c["sleep"] and set(results["b"]) != set(worlds(c["decoys"])):
                base = BankLM2(args)
                base.load_state_dict(torch.load(weights, weights_only=True))  # data only: it cannot run code
                base.eval()
            continue
        log(f"seed {seed}: {name}")
        model, minutes = train(args, name, c["steps"], c["batch_size"], c["lr"], seed, log, bias_rate, centroid_decay)
        r = {"train_min": minutes, "params": sum(p.numel() for p in model.parameters()), "recall": {}}
        progressive = args.mem_progressive_threshold is not None
        if progressive:
            model.banked()[0].banks_read()  # count the held-out reads only
        for nf in f_grid:
            acc, loss = evaluate(model, [e[:2] for e in test_episodes(random.Random(seed + nf), nf, c["n_eval"])])
            r["recall"][str(nf)] = acc  # str: the keys JSON gives back
            r.setdefault("loss", {})[str(nf)] = loss
        if name != "none":
            r["banks_read"] = model.banked()[0].banks_read() if progressive else args.mem_top
            r["read_flops"] = lm2_banks.read_flops_per_token(args, r["banks_read"])
            r["read_us"] = time_read(args, SEG, c["repeats"]) * 1e6
            r["read_us_decode"] = time_read(args, 1, c["repeats"]) * 1e6
            r["closeness"] = closeness(model, test_episodes(random.Random(seed), 8, c["n_eval"]))
        if args.mem_top < args.mem_banks:
            r["routing_precision"], r["domain_purity"], r["banks_used"] = routing(
                model, test_episodes(random.Random(seed), 8, c["n_eval"]))
        if name == "K8 m1":
            torch.save(model.state_dict(), weights)
            base = model
        results["a"][name] = r
        log(f"{name}: " + json.dumps(r))
        save()
    if base is not None and c["sleep"]:
        for world, n_decoys in worlds(c["decoys"]).items():
            if world not in results["b"]:
                results["b"][world] = sleep_world(base, n_decoys, c, seed, margs, log)
                save()
    logf.close()
    return results


def worlds(decoys: int) -> dict:
    """The (b) worlds of a run: name -> number of decoys."""
    return {"plain": 0} | ({"decoys": decoys} if decoys else {})


def sleep_world(base, decoys: int, c: dict, seed: int, margs: dict, log) -> dict:
    """(b) in one world: the 16 entities ranked first by read attention, by count and (plain world) at random are
    each consolidated into fresh adapters on the K8 m1 model; before and after, the sleep_eval measures. A pick
    that chose the same entities as an earlier one is that one's result (same adapters, same seed)."""
    frequent, decoy, others, wake = wake_world(seed, decoys)
    n = len(frequent)
    ranked = rank_by_access(base, wake, seed)
    picks = {"attention": ranked[:n], "count": rank_by_count(wake, seed)[:n]}
    if not decoys:  # among decoys a random pick is as uninformative as in the plain world
        picks["random"] = random.Random(seed + 1).sample(sorted(ranked), n)
    before = sleep_eval(base, frequent, others, seed + 7, c["n_eval"])
    fields = ("consolidated", "fresh_recall", "heldout_loss", "frequent_memory_on")
    res = {"before": dict(zip(fields, before))}
    log(f"sleep ({decoys} decoys) before: {res['before']}")
    teacher = copy.deepcopy(base)  # sleep trains adapters into its model in place
    for how, chosen in picks.items():
        same = next((h for h in picks if h in res and set(map(tuple, res[h]["chosen"])) == set(chosen)), None)
        if same:
            res[how] = dict(res[same], same_as=same)
            log(f"sleep ({decoys} decoys) {how}: the same entities as {same}")
            continue
        answers = consensus(teacher, wake, set(chosen), seed)  # decoys are never asked: they get no answer
        right = sum(answers[e] == VAL0 + frequent[e] for e in answers if e in frequent)
        r = dict(chosen=[list(e) for e in chosen], overlap=len(set(chosen) & set(frequent)),
                 decoys_chosen=len(set(chosen) & set(decoy)), taught=len(answers), consensus_right=right)
        if answers:
            model = BankLM2(model_args("K8 m1", **margs))
            model.load_state_dict(base.state_dict())
            t0 = time.time()
            batches = sleep_batches(teacher, answers, wake, others, seed, c["batch_size"], c["sleep_replay"])
            torch.manual_seed(seed)  # the adapters' initial weights: the same for every pick
            r["loss_first"], r["loss_last"] = lm2_banks.sleep(model, batches, c["sleep_steps"], rank=c["sleep_rank"],
                                                             lr=c["sleep_lr"])
            r.update(zip(fields, sleep_eval(model.eval(), frequent, others, seed + 7, c["n_eval"])),
                     sleep_min=(time.time() - t0) / 60)
        else:  # nothing it chose was ever answered by the memory: nothing to consolidate
            r.update(res["before"])
        res[how] = r
        log(f"sleep ({decoys} decoys) {how}: " + json.dumps({k: v for k, v in r.items() if k != "chosen"}))
    return res


def print_read_times(names, repeats):
    """The read columns of table (a) alone: us per token for a segment and a decoding step, and K8 -> K32."""
    us = {name: (time_read(model_args(name), SEG, repeats) * 1e6, time_read(model_args(name), 1, repeats) * 1e6)
          for name in names}
    print(f"{'memory':8} {'us/tok seg':>10} {'us/tok dec':>10}")
    for name, (seg, dec) in us.items():
        print(f"{name:8} {seg:10.3f} {dec:10.3f}")
    if "K8 m1" in us and "K32 m1" in us:
        print(f"K8 -> K32 at m=1: read time x{us['K32 m1'][0] / us['K8 m1'][0]:.2f} (segment), "
              f"x{us['K32 m1'][1] / us['K8 m1'][1]:.2f} (decode)")


def spread(values) -> str:
    """mean +- sample standard deviation over seeds, [min, max]; the value alone for one seed."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def report(per_seed: dict, config: dict, out: Path):
    """Both tables over the seeds: each figure as mean +- standard deviation [min, max] of the seeds' values."""
    seeds = list(per_seed)
    runs = list(per_seed.values())
    names = [m for m in MODELS + OPTIONAL if all(m in r["a"] for r in runs)]
    print(f"\n(a) memory banks: {config['steps']} steps x {config['batch_size']} episodes, seeds {seeds}; recall = "
          f"answer accuracy on {config['n_eval']} held-out episodes x 8 questions; mean +- sd [min, max] over seeds")
    print("| memory | slots | params | recall F=8 | vs dense (same seed) | F=12 | F=16 | F=21 | read FLOPs | "
          "routing precision | domain purity | banks used | read own/other | own most read |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        args = model_args(name)
        rs = [r["a"][name] for r in runs]
        rec = lambda f: [r["recall"][str(f)] for r in rs]  # noqa: E731
        vs = [x - r["a"]["dense"]["recall"]["8"] for r, x in zip(runs, rec(8))] \
            if "dense" in names and name != "dense" else []
        close = [r.get("closeness", {}).get("read") for r in rs]
        print(f"| {name} | {0 if name == 'none' else args.mem_banks * args.mem_slots} | {rs[0]['params']:,} | "
              f"{spread(rec(8))} | {spread(vs) if vs else '-'} | {spread(rec(12))} | {spread(rec(16))} | "
              f"{spread(rec(MAX_F))} | {rs[0].get('read_flops', 0):,.0f} | "
              f"{spread([r.get('routing_precision') for r in rs])} | {spread([r.get('domain_purity') for r in rs])} | "
              f"{spread([r.get('banks_used') for r in rs])} | "
              f"{spread([c[0] for c in close if c])} / {spread([c[1] for c in close if c])} | "
              f"{spread([c[2] for c in close if c])} |")
    timed = [n for n in names if n != "none"]
    if timed:
        print("read us/token per seed (segment of 32 rows; decoding step), timed during the run on a shared machine: "
              + "; ".join(f"{n}: " + ", ".join(f"{r['a'][n]['read_us']:.2f}/{r['a'][n]['read_us_decode']:.2f}"
                                               for r in runs) for n in timed))
    for world in worlds(config["decoys"]) if config["sleep"] else []:
        bs = [r["b"][world] for r in runs if world in r["b"]]
        if not bs:
            continue
        print(f"\n(b) sleep on K8 m1, {world} world ({config['sleep_steps']} steps, LoRA rank {config['sleep_rank']}, "
              f"lr {config['sleep_lr']}, {config['sleep_replay']} replay per consolidation batch; "
              f"{len(bs)} seeds): 16 frequent entities, 256 wake episodes"
              + (f", {config['decoys']} decoys (stated as often, never asked)" if world == "decoys" else ""))
        print("| pick | frequent recall, memory reset | frequent recall, memory on | fresh recall, memory on | "
              "held-out loss | chosen = frequent | decoys chosen | consensus right |")
        print("|---|---|---|---|---|---|---|---|")
        for how in ("before", "attention", "count", "random"):
            rs = [b[how] for b in bs if how in b]
            if not rs:
                continue
            pick = [f"{r['overlap']}" for r in rs if "overlap" in r]
            print(f"| {how} | {spread([r['consolidated'] for r in rs])} | "
                  f"{spread([r['frequent_memory_on'] for r in rs])} | {spread([r['fresh_recall'] for r in rs])} | "
                  f"{spread([r['heldout_loss'] for r in rs])} | {'/'.join(pick) or '-'} | "
                  f"{'/'.join(str(r['decoys_chosen']) for r in rs if 'decoys_chosen' in r) or '-'} | "
                  f"{'/'.join(str(r['consensus_right']) for r in rs if 'consensus_right' in r) or '-'} |")
    flags = [f"--{k}" for k in ("write_shift", "shift_slots") if config[k]] + \
        ([f"--bank_keys {config['bank_keys']}"] if config["bank_keys"] != "learned" else [])
    plot(runs, names, out, f"recall vs memory load ({len(runs)} seeds{', ' if flags else ''}{' '.join(flags)})")


def plot(runs, names, out, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no lm2_banks_scaling.png (pip install matplotlib); the tables above "
              "hold the numbers")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        fs = sorted(int(f) for f in runs[0]["a"][name]["recall"])
        vals = [[r["a"][name]["recall"][str(f)] for r in runs] for f in fs]
        ax.errorbar(fs, [statistics.mean(v) for v in vals],
                    yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in vals], marker="o", capsize=3, label=name)
    ax.axhline(0.1, color="gray", ls=":", lw=0.8)
    ax.set(xlabel="facts per episode F", ylabel="recall (mean +- sd over seeds)", title=title, ylim=(0, 1))
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "lm2_banks_scaling.png", dpi=110)
    print(f"wrote {out / 'lm2_banks_scaling.png'}")

# -----------------------------------------------------------------------------
# CLI


if __name__ == "__main__":
    cli(main)
