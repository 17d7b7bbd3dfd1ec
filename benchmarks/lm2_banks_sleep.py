"""
Test bed of lm2_banks.py (issue 19): (a) memory banks read by relevance against lm2.py's dense bank, and
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
the write shift (--write_shift: a token is written to the bank its predecessor reads) are off unless their flags
are given (docs/lm2_banks_results.md: the shift raised recall above the dense bank's; the balancing, mean keys
and the cluster router lowered it).
Training episodes have F = 8..16 facts (at least one per question: an entity asked twice could be answered
by copying the first answer). (a) recall at F = 8, 12, 16, 21 (21: beyond training;
the largest F with recall >= 0.9 is "F held"), read FLOPs per token (counted) and read time per
token (timed, one segment of 32 rows, median of repeats), routing precision: the share of questions whose top
bank is the bank the fact's value token was written to, and domain purity: the share of fact writes that go to
their domain's most used bank; closeness: whether a question's key token lies near its own fact's tokens at
the memory block (cosine in h, q and the read's score space), and how much of its read reaches its own fact.
(b) on the trained K8 m1 model: 16 "frequent" entities with fixed values recur across 256 wake episodes (2 per
episode, with 6 fresh facts). Entities are ranked by lm2_banks.token_access (the read attention their slots
received), the top 16 are consolidated by lm2_banks.sleep (LoRA on the MLP and attention output). Half the
batches (one in 1 + --sleep_replay) consolidate: the student sees a wake episode without the chosen facts and
learns, by cross-entropy, the memory model's consensus answer for each (its answer distribution with the facts stated, averaged over
all wake episodes that state the entity, then its most probable token); the others replay fresh episodes with
memory on (KL to the frozen model). The same with 16 entities chosen at random from those seen. Measured:
recall of the frequent facts with the memory on (the teacher) and reset (facts not stated), fresh-episode
recall with memory on, held-out answer loss, each before and after, and how many consensus answers are right.

Run:  OMP_NUM_THREADS=1 python benchmarks/lm2_banks_sleep.py --out_dir runs/lm2_banks
Pilot: ... --models "K8 m1" --steps 300 --n_eval 128 --bank_keys learned --aux_alpha 0.01
(prints both tables; writes results.json, log lines and lm2_banks_scaling.png into --out_dir)
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
from tokenizer_bpe import cli  # noqa: E402

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
               progressive_threshold: float = 0.5, write_shift: bool = False) -> BankArgs:
    banks = {"none": (1, 1, 1), "dense": (1, 128, 1), "K8 m1": (8, 16, 1), "K32 m1": (32, 16, 1),
             "K8 prog": (8, 16, 2)}[memory]
    return BankArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=16, hidden_dim=128,
                    vocab_size=VOCAB, rope_theta=10000.0, max_seq_len=T, bos_token_id=0, eos_token_ids=(0,),
                    mem_banks=banks[0], mem_slots=banks[1], mem_top=banks[2], mem_heads=4, mem_bank_keys=bank_keys,
                    mem_aux_alpha=aux_alpha, mem_route_distill=route_distill,
                    mem_progressive_threshold=progressive_threshold if memory == "K8 prog" else None,
                    mem_write_shift=write_shift,
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


def wake_world(seed: int, n_frequent=16, n_wake=256, per_episode=2, n_facts=8):
    """The frequent entities with their fixed values, and wake episodes (facts dicts, question lists)."""
    rng = random.Random(seed)
    frequent = {e: rng.randrange(N_VAL) for e in rng.sample(ENTITIES, n_frequent)}
    others = [e for e in ENTITIES if e not in frequent]
    wake = []
    for _ in range(n_wake):
        facts = {e: frequent[e] for e in rng.sample(list(frequent), per_episode)}
        facts.update(fresh_facts(rng, n_facts - per_episode, others))
        facts = dict(rng.sample(list(facts.items()), len(facts)))  # frequent facts anywhere in the list
        wake.append((facts, ask(rng, facts)))
    return frequent, others, wake


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
                asked = mine + [e for e in ask(rng, facts) if e not in mine]  # chosen facts first, all distinct
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


def main(out_dir: str = "runs/lm2_banks", models: str = ",".join(MODELS), steps: int = 700, batch_size: int = 32,
         lr: float = 3e-3,
         bank_keys: str = "learned", bias_rate: float = 0.0, aux_alpha: float = 0.0, route_distill: float = 0.0,
         centroid_decay: float = 0.9, write_shift: bool = False,
         progressive_threshold: float = 0.5,
         sleep_steps: int = 300, sleep_rank: int = 8, sleep_lr: float = 3e-3, sleep_replay: int = 1,
         n_eval: int = 256, repeats: int = 50, read_times_only: bool = False,
         seed: int = 1337):
    """Train the four models, measure (a) and (b), print both tables, write results.json and the plot.
    out_dir: folder for results.json, log.txt and lm2_banks_scaling.png (created; nothing else is written)
    models: comma-separated subset of the four models, or "K8 prog", to train; (b) runs when K8 m1 is among them
    steps: training steps of every model (batches of batch_size episodes)
    bank_keys: "learned" bank keys, "mean" (mean of each bank's slot keys) or "cluster" (centroids moved by balanced
        k-means; lm2_banks.BankArgs.mem_bank_keys)
    centroid_decay: the cluster router's k-means decay per optimizer step (1: fixed random centroids, an LSH)
    write_shift: write each token to the bank its predecessor reads (lm2_banks.BankArgs.mem_write_shift)
    bias_rate: router bias step per optimizer step (DeepSeek-V3's gamma; 0: off)
    aux_alpha: weight of the router's balance loss (0: off)
    route_distill: weight of the router's distillation towards the dense read's mass per bank (0: off)
    progressive_threshold: K8 prog reads its second bank while its best read attention is below this
    sleep_steps: steps of each sleep phase (consolidation and replay batches, see sleep_replay)
    sleep_rank: LoRA rank of the sleep phases
    sleep_lr: learning rate of the sleep phases
    sleep_replay: replay batches per consolidation batch in the sleep phases
    n_eval: held-out episodes per measurement (8 answers each)
    repeats: timed repeats of one read
    read_times_only: only time the models' reads and print them (untrained weights); trains and writes nothing
    seed: seed of the weights, the data and the choices"""
    if steps < 10 or sleep_steps < 10 or n_eval < 8 or sleep_replay < 0:
        raise SystemExit("error: need --steps >= 10, --sleep_steps >= 10, --n_eval >= 8 and --sleep_replay >= 0")
    names = [m.strip() for m in models.split(",")]
    if not names or not set(names) <= set(MODELS + OPTIONAL):
        raise SystemExit(f"error: --models takes a comma-separated subset of {','.join(MODELS + OPTIONAL)}, got {models!r}")
    if read_times_only:
        return print_read_times([m for m in MODELS + OPTIONAL if m in names and m != "none"], repeats)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "log.txt", "a")

    def log(line):
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    results = {"config": dict(models=names, steps=steps, batch_size=batch_size, lr=lr, bank_keys=bank_keys, bias_rate=bias_rate,
                              aux_alpha=aux_alpha, route_distill=route_distill, centroid_decay=centroid_decay,
                              write_shift=write_shift,
                              progressive_threshold=progressive_threshold, sleep_steps=sleep_steps,
                              sleep_rank=sleep_rank, sleep_lr=sleep_lr, sleep_replay=sleep_replay, n_eval=n_eval,
                              seed=seed), "a": {}, "b": {}}

    def save():  # incrementally: a run cut short keeps what it measured (a new file, then a rename)
        (out / "results.json.tmp").write_text(json.dumps(results, indent=1))
        (out / "results.json.tmp").replace(out / "results.json")

    f_grid = [8, 12, 16, MAX_F]
    trained = {}
    for name in [m for m in MODELS + OPTIONAL if m in names]:
        args = model_args(name, bank_keys, aux_alpha, route_distill, progressive_threshold, write_shift)
        model, minutes = train(args, name, steps, batch_size, lr, seed, log, bias_rate, centroid_decay)
        trained[name] = model
        r = {"train_min": minutes, "params": sum(p.numel() for p in model.parameters()), "recall": {}}
        progressive = args.mem_progressive_threshold is not None
        if progressive:
            model.banked()[0].banks_read()  # count the held-out reads only
        for nf in f_grid:
            acc, loss = evaluate(model, [e[:2] for e in test_episodes(random.Random(seed + nf), nf, n_eval)])
            r["recall"][nf] = acc
            r.setdefault("loss", {})[nf] = loss
        if name != "none":
            r["banks_read"] = model.banked()[0].banks_read() if progressive else args.mem_top
            r["read_flops"] = lm2_banks.read_flops_per_token(args, r["banks_read"])
            r["read_us"] = time_read(args, SEG, repeats) * 1e6
            r["read_us_decode"] = time_read(args, 1, repeats) * 1e6
        if name != "none":
            r["closeness"] = closeness(model, test_episodes(random.Random(seed), 8, n_eval))
        if args.mem_top < args.mem_banks:
            r["routing_precision"], r["domain_purity"], r["banks_used"] = routing(model, test_episodes(random.Random(seed), 8, n_eval))
        results["a"][name] = r
        log(f"{name}: " + json.dumps(r))
        save()

    if "K8 m1" not in trained:
        return report(results, out, log)
    # (b) sleep on the K8 m1 model
    base = trained["K8 m1"]
    frequent, others, wake = wake_world(seed)
    ranked = rank_by_access(base, wake, seed)
    picks = {"frequency": ranked[:len(frequent)],
             "random": random.Random(seed + 1).sample(sorted(ranked), len(frequent))}
    before = sleep_eval(base, frequent, others, seed + 7, n_eval)
    results["b"]["before"] = dict(zip(("consolidated", "fresh_recall", "heldout_loss", "frequent_memory_on"), before))
    log(f"sleep before: {results['b']['before']}")
    teacher = copy.deepcopy(base)  # sleep trains adapters into its model in place
    for how, chosen in picks.items():
        answers = consensus(teacher, wake, set(chosen), seed)
        model = BankLM2(model_args("K8 m1", bank_keys, aux_alpha, route_distill, write_shift=write_shift))
        model.load_state_dict(base.state_dict())
        t0 = time.time()
        batches = sleep_batches(teacher, answers, wake, others, seed, batch_size, sleep_replay)
        first, last = lm2_banks.sleep(model, batches, sleep_steps, rank=sleep_rank, lr=sleep_lr)
        after = sleep_eval(model.eval(), frequent, others, seed + 7, n_eval)
        right = sum(answers[e] == VAL0 + frequent[e] for e in answers if e in frequent)
        results["b"][how] = dict(zip(("consolidated", "fresh_recall", "heldout_loss", "frequent_memory_on"), after),
                                 overlap=len(set(chosen) & set(frequent)), consensus_right=right,
                                 loss_first=first, loss_last=last, sleep_min=(time.time() - t0) / 60)
        log(f"sleep {how}: {results['b'][how]}")
        save()
    report(results, out, log)


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


def report(results, out, log):
    a, b = results["a"], results["b"]
    dense_recall = a["dense"]["recall"][8] if "dense" in a else float("nan")
    dense_flops = lm2_banks.read_flops_per_token(model_args("dense"))
    log(f"\n(a) memory banks ({results['config']['steps']} steps x {results['config']['batch_size']} episodes each;"
        f" recall = answer accuracy on {results['config']['n_eval']} held-out episodes x 8 questions)")
    log(f"{'memory':8} {'slots':>5} {'params':>7} {'recall F=8':>10} {'vs dense':>8} {'read FLOPs':>10} "
        f"{'x fewer':>7} {'us/tok seg':>10} {'us/tok dec':>10} {'routing':>7} {'domain':>6} {'banks used':>10} "
        f"{'F held >=0.9':>12}")
    for name, r in a.items():
        args = model_args(name)
        slots = 0 if name == "none" else args.mem_banks * args.mem_slots
        held = max([int(f) for f, v in r["recall"].items() if v >= 0.9], default=0)
        flops = r.get("read_flops")
        log(f"{name:8} {slots:5d} {r['params']:7,d} {r['recall'][8]:10.3f} "
            f"{(r['recall'][8] - dense_recall) * 100:+7.1f}p "
            f"{flops or 0:10,.0f} {(dense_flops / flops) if flops else 0:7.1f} {r.get('read_us', 0):10.3f} "
            f"{r.get('read_us_decode', 0):10.3f} "
            f"{r.get('routing_precision', float('nan')):7.3f} {r.get('domain_purity', float('nan')):6.3f} "
            f"{r.get('banks_used', float('nan')):10.2f} {held:12d}")
    for name, r in a.items():
        if model_args(name).mem_progressive_threshold is not None:
            log(f"{name}: threshold {results['config']['progressive_threshold']}, a token read "
                f"{r['banks_read']:.2f} banks on average (held-out episodes)")
    log("recall by facts per episode F: " + "; ".join(
        f"{name}: " + " ".join(f"{f}:{v:.3f}" for f, v in r["recall"].items()) for name, r in a.items()))
    log("closeness at the memory block, F = 8 (benchmark's closeness): a question's key token against each token"
        " of its own fact / of the other facts: mean cosine, and the share of questions whose own fact is the"
        " closest (chance 0.125); read: the question's read mass reaching its own fact's tokens / another fact's")
    for name, r in a.items():
        if "closeness" in r:
            c = r["closeness"]
            own, other, top1 = c["read"]
            log(f"  {name:8} read mass {own:.4f} / {other:.4f}, own fact the most read {top1:.3f}")
            for space in ("h", "q", "q.k"):
                log(f"  {'':8} {space:3} " + "   ".join(f"{t}: {own:+.3f} / {other:+.3f}, closest {top1:.3f}"
                                                     for t, (own, other, top1) in c[space].items()))
    if "K8 m1" in a and "K32 m1" in a:
        k8, k32 = a["K8 m1"], a["K32 m1"]
        log(f"K8 -> K32 at m=1: read time x{k32['read_us'] / k8['read_us']:.2f} (segment), "
            f"x{k32['read_us_decode'] / k8['read_us_decode']:.2f} (decode), read FLOPs "
            f"x{k32['read_flops'] / k8['read_flops']:.2f}")
    if "before" not in b:
        return plot(results, out)
    c = results["config"]
    log(f"\n(b) sleep on K8 m1 ({c['sleep_steps']} steps, LoRA rank {c['sleep_rank']}, lr {c['sleep_lr']}, "
        f"{c.get('sleep_replay', 1)} replay per consolidation batch): "
        f"16 frequent entities, 256 wake episodes")
    log(f"{'':16} {'frequent recall, memory reset':>29} {'frequent recall, memory on':>26} "
        f"{'fresh recall, memory on':>23} {'held-out loss':>13} {'chosen = frequent':>17} {'consensus right':>15}")
    for how in ("before", "frequency", "random"):
        if how in b:
            r = b[how]
            chosen = f"{r['overlap']:14d}/16" if "overlap" in r else ""
            right = f"{r['consensus_right']:12d}/{r['overlap']}" if "overlap" in r else ""
            log(f"{'after ' + how if how != 'before' else how:16} {r['consolidated']:29.3f} "
                f"{r['frequent_memory_on']:26.3f} {r['fresh_recall']:23.3f} {r['heldout_loss']:13.4f} "
                f"{chosen:>17} {right:>15}")
    plot(results, out)


def plot(results, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    a = results["a"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in a.items():
        ax1.plot([int(f) for f in r["recall"]], list(r["recall"].values()), marker="o", label=name)
    ax1.axhline(0.9, color="gray", ls="--", lw=0.8)
    ax1.set(xlabel="facts per episode F", ylabel="recall (answer accuracy)", title="recall vs memory load", ylim=(0, 1))
    ax1.legend()
    names = [n for n in a if n != "none"]
    xs = range(len(names))
    ax2.bar([i - 0.2 for i in xs], [a[n]["read_us"] for n in names], 0.4, label="segment of 32 rows")
    ax2.bar([i + 0.2 for i in xs], [a[n]["read_us_decode"] for n in names], 0.4, label="decode step (1 row)")
    ax2.set_xticks(list(xs), names)
    ax2.legend(loc="upper left")
    ax2.set(ylabel="read time per token (us)", title="memory read cost per token")
    twin = ax2.twinx()
    twin.plot(names, [a[n]["read_flops"] for n in names], color="tab:red", marker="s", label="FLOPs (counted)")
    twin.set_ylabel("read FLOPs per token", color="tab:red")
    fig.tight_layout()
    fig.savefig(out / "lm2_banks_scaling.png", dpi=110)

# -----------------------------------------------------------------------------
# CLI


if __name__ == "__main__":
    cli(main)
