"""
In-weight vs in-tool factual recall, at CPU scale: a tiny Llama (from llama31.py) either memorises facts about
synthetic people, or learns to look them up in a SQLite database.

It reproduces the set-up of Houliston, Odonnat, Arnal and Cabannes, "Provable Benefits of In-Tool Learning for
Large Language Models" (2025; reference code github.com/ambroiseodt/itl, the NanoLlama "Memory and Generalization
in LLMs" codebase). N people (first x last name) each get four attributes drawn uniformly: a birth date, a birth
place (7 countries), an address (200 cities) and an occupation (100), about 31 bits per person, 4N facts.
- in-weight: `<user>When was Alan Ashby born?<assistant>Alan Ashby was born on 3/7/1962.<eod>`; the answer must
  come from the weights, which hold a bounded number of bits per parameter, so recall falls as N grows;
- in-tool: the assistant writes ```sql\\nFIND birth_date FOR Alan Ashby\\n``` and the <database> token, the tool's
  answer follows, then <assistant> and the same sentence. The model only has to learn to copy a name into a query
  and a value into a sentence, so a fixed small model recalls any N, even for people it never saw.
The loss covers the assistant's tokens only (its <database> / <eod> included), never the user's question, the
tool's answer or the re-inserted <assistant>: finetune.py's `render_chat` builds that mask from our chat format.

Deliberate departures from the reference:
- our own name, city and occupation lists (syllables joined, so 128 x 128 = 16384 distinct names); the people
  never seen in training (out-of-distribution recall) are new first/last-name pairs, not new names;
- a CPU budget: the grid trains for a few thousand steps of batch 64 (the reference: 100k steps of batch 128,
  10 seeds), one seed, and scores a fixed sample of at most 500 questions per run (seen and unseen);
- lr 3e-3, not 1e-3, for that short budget: a pilot (in-tool, d=32, 1024 people, 1500 steps) reached recall
  0.27 (unseen people 0.24) at 1e-3 and 0.89 (0.78) at 3e-3;
- a reply is right when it ends with " {value}." (space included): "12/3/1975." also ends with "2/3/1975.";
- training rows are single dialogs padded to the batch's longest (no packing: dialogs are 60-150 bytes), and
  the generation loop is batched: a row that calls the tool is fed the answer one token per step while the
  other rows decode, so every row stays in the same cache slot as in llama31's `generate`.

Usage:
    python in_tool_learning.py train --setting in_tool --d 32 --people 1024 --steps 3000
    python in_tool_learning.py grid --out docs/in_tool_results.csv   # the sweep in README.md (68 min on one core)
    python in_tool_learning.py plot --csv docs/in_tool_results.csv --png docs/in_tool_recall.png  # matplotlib
"""

import csv
import math
import random
import re
import sqlite3
import sys
import time
from pathlib import Path

import torch

from finetune import IGNORE, build_optimizer, build_scheduler, init_weights, loss_sum, render_chat
from llama31 import Llama, ModelArgs
from tokenizer_bpe import cli

# -----------------------------------------------------------------------------
# Tokens and facts

USER, ASSISTANT, DATABASE, EOD = 256, 257, 258, 259  # after the 256 byte values
VOCAB = 260
SPECIAL = {USER: "<user>", ASSISTANT: "<assistant>", DATABASE: "<database>", EOD: "<eod>"}

FIRST_NAMES = [a + b for a in ("Al", "Be", "Cor", "Da", "El", "Fa", "Gil", "Ha", "Ir", "Jo", "Ka", "Lu", "Mi",
                               "Ner", "Ol", "Pa") for b in ("an", "bert", "da", "ena", "ia", "lin", "o", "ric")]
LAST_NAMES = [a + b for a in ("Ash", "Black", "Brook", "Crane", "Dun", "Fair", "Gold", "Hart", "Kel", "Lang",
                              "Mor", "Nor", "Pem", "Rad", "Stan", "Wes")
              for b in ("by", "cott", "field", "ford", "ham", "ley", "more", "ton")]
COUNTRIES = ["France", "Japan", "Brazil", "Kenya", "Canada", "India", "Norway"]
CITIES = [a + b for a in ("Amber", "Bell", "Cedar", "Dover", "Elm", "Fox", "Glen", "High", "Iron", "Kings", "Lake",
                          "Mill", "North", "Oak", "Pine", "Red", "Silver", "Stone", "West", "Wolf")
          for b in ("bridge", "burg", "dale", "field", "haven", "mouth", "port", "stead", "ton", "wick")]
OCCUPATIONS = """accountant actor architect astronomer baker banker barber biologist blacksmith bookkeeper brewer
butcher carpenter cartographer cashier chef chemist choreographer cleaner coach composer courier dancer dentist
designer detective diplomat doctor driver economist editor electrician engineer farmer firefighter fisher florist
gardener geologist goldsmith guard historian illustrator interpreter jeweler journalist judge librarian lifeguard
linguist locksmith machinist magician manager mason mathematician mechanic midwife miner musician nurse optician
painter paramedic pharmacist philosopher photographer physicist pilot plumber poet potter programmer psychologist
publisher ranger receptionist reporter researcher sailor salesperson scientist sculptor secretary singer soldier
statistician surgeon surveyor tailor teacher therapist translator tutor veterinarian waiter weaver welder writer
zoologist""".split()

# attribute (also the SQL column) -> (question, final sentence)
QA = {
    "birth_date": ("When was {name} born?", "{name} was born on {value}."),
    "birth_place": ("Where was {name} born?", "{name} was born in {value}."),
    "address": ("Where does {name} live?", "{name} lives in {value}."),
    "occupation": ("What is {name}'s occupation?", "{name}'s occupation is {value}."),
}
# Entropy of one person's attributes: what an in-weight model must store per person (dates: 28 x 12 x 51).
BITS_PER_PERSON = math.log2(28 * 12 * 51) + math.log2(len(COUNTRIES)) + math.log2(len(CITIES)) \
    + math.log2(len(OCCUPATIONS))
QUERY = "```sql\nFIND {attr} FOR {name}\n```"
QUERY_RE = re.compile(r"```sql\nFIND (\w+) FOR (.+)\n```")
NO_RESULT = "No result found"


def make_people(seed: int) -> list[dict]:
    """Every first x last name pair in a seeded order, each with uniform attributes. The first N are the training
    people of any N (so the sets are nested), and the last ones are kept for out-of-distribution questions."""
    rng = random.Random(seed)
    names = [f"{f} {l}" for f in FIRST_NAMES for l in LAST_NAMES]
    rng.shuffle(names)
    return [{"name": name, "birth_date": f"{rng.randint(1, 28)}/{rng.randint(1, 12)}/{rng.randint(1950, 2000)}",
             "birth_place": rng.choice(COUNTRIES), "address": rng.choice(CITIES),
             "occupation": rng.choice(OCCUPATIONS)} for name in names]


def dialog(person: dict, attr: str, tool: bool) -> list[dict]:
    """One question and its answer, as chat messages; in-tool, a query and the tool's reply come between."""
    question, sentence = QA[attr]
    messages = [{"role": "user", "content": question.format(name=person["name"])}]
    if tool:
        messages += [{"role": "assistant", "content": QUERY.format(attr=attr, name=person["name"])},
                     {"role": "tool", "content": person[attr]}]
    return messages + [{"role": "assistant", "content": sentence.format(name=person["name"], value=person[attr])}]


def encode_chat(_tok, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Messages -> token ids, with the signature finetune.render_chat expects of a model file (no tokenizer: bytes).
    An assistant turn that is a query ends with <database> (the tool's answer follows), any other with <eod>."""
    ids = []
    for m in messages:
        text = list(m["content"].encode("utf-8"))
        if m["role"] == "user":
            ids += [USER] + text
        elif m["role"] == "tool":
            ids += text  # the answer goes straight after <database>; the next turn opens with <assistant>
        else:
            ids += [ASSISTANT] + text + [DATABASE if QUERY_RE.fullmatch(m["content"]) else EOD]
    return ids + [ASSISTANT] if add_generation_prompt else ids


def decode(ids: list[int]) -> str:
    """Token ids -> text, special tokens spelled out; bytes that are not UTF-8 become U+FFFD."""
    # chr(byte) is latin-1's character for that byte, so encoding as latin-1 gives back the bytes exactly
    return "".join(SPECIAL.get(t) or chr(t) for t in ids).encode("latin-1").decode("utf-8", errors="replace")


# -----------------------------------------------------------------------------
# The tool: a real SQLite table, queried with bound parameters


class Database:
    def __init__(self, people: list[dict]):
        self.conn = sqlite3.connect(":memory:")
        self.conn.execute(f"CREATE TABLE people (name TEXT PRIMARY KEY, {', '.join(QA)})")
        self.conn.executemany(f"INSERT INTO people VALUES (?, {', '.join('?' for _ in QA)})",
                              [[p["name"]] + [p[a] for a in QA] for p in people])

    def answer(self, query: str) -> str:
        """"```sql\\nFIND occupation FOR Alan Ashby\\n```" -> "baker"; anything else -> "No result found"."""
        m = QUERY_RE.fullmatch(query)
        if m is None or m[1] not in QA:
            return NO_RESULT
        # A column cannot be a bound parameter: the whitelist check above is what makes this f-string safe.
        # The name is bound (?), so "O'Brien" is looked up, never spliced into the SQL.
        row = self.conn.execute(f"SELECT {m[1]} FROM people WHERE name = ?", (m[2],)).fetchone()
        return row[0] if row else NO_RESULT


# -----------------------------------------------------------------------------
# Model and training


def make_model(d: int, seed: int, max_seq_len: int = 256) -> Llama:
    """The paper's tiny Llama: 2 layers, 2 heads, SwiGLU hidden 4d, untied embeddings; P = 32d^2 + 525d."""
    # Untied: P counts both 260 x d matrices (525d = 2 * 260d + five RMSNorm gains). Plain RoPE (rope_factor
    # None): llama3's stretching is for contexts past 8k, our dialogs are under 256 tokens.
    args = ModelArgs(dim=d, n_layers=2, n_heads=2, n_kv_heads=2, hidden_dim=4 * d, vocab_size=VOCAB,
                     rope_theta=10000.0, rope_factor=None, context_len=max_seq_len, max_seq_len=max_seq_len,
                     tie_embeddings=False, stop_tokens=(EOD,))
    torch.manual_seed(seed)
    model = Llama(args)
    init_weights(model)
    return model


def to_rows(dialogs: list[tuple[list[int], list[int]]]):
    """(ids, loss_mask) pairs -> inputs, targets (n, longest) and lengths; a target is IGNORE unless masked in."""
    longest = max(len(ids) for ids, _ in dialogs) - 1
    x = torch.zeros(len(dialogs), longest, dtype=torch.long)
    y = torch.full((len(dialogs), longest), IGNORE, dtype=torch.long)
    for i, (ids, mask) in enumerate(dialogs):
        x[i, :len(ids) - 1] = torch.tensor(ids[:-1])
        y[i, :len(ids) - 1] = torch.tensor([t if m else IGNORE for t, m in zip(ids[1:], mask[1:])])
    return x, y, torch.tensor([len(ids) - 1 for ids, _ in dialogs])


def train(setting: str, d: int, n_people: int, steps: int, batch_size: int = 64, lr: float = 3e-3,
          warmup: int = 100, seed: int = 0, n_eval: int = 500, log_every: int = 500) -> dict:
    """Train one model on the 4N facts of the first n_people people; score it; return one results row."""
    t0 = time.time()
    if d < 4 or d % 4 or n_people < 1 or steps < 1:
        raise SystemExit("error: need d a multiple of 4 (2 heads whose RoPE turns pairs), people >= 1, steps >= 1")
    tool = setting == "in_tool"
    everyone = make_people(seed)
    if n_people + n_eval > len(everyone):
        raise SystemExit(f"error: at most {len(everyone) - n_eval} people leave {n_eval} unseen ones to ask about")
    people = everyone[:n_people]
    facts = [(p, a) for p in people for a in QA]
    x_all, y_all, lengths = to_rows([render_chat(None, encode_chat, dialog(p, a, tool)) for p, a in facts])
    model = make_model(d, seed)
    # finetune.py's AdamW (decay on matrices only) and warmup + cosine schedule, the paper's settings but lr. Its
    # train() loop is not reused: it reads files through a model file's tokenizer, we sample facts in memory.
    optimizer = build_optimizer(model, lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    scheduler = build_scheduler(optimizer, warmup_steps=warmup, max_steps=steps, min_lr_frac=0.1)
    gen = torch.Generator().manual_seed(seed)
    order, losses = torch.empty(0, dtype=torch.long), []
    for step in range(steps):
        if len(order) < batch_size:  # shuffled epochs: every fact is seen equally often
            order = torch.cat([order, torch.randperm(len(facts), generator=gen)])
        idx, order = order[:batch_size], order[batch_size:]
        T = lengths[idx].max()  # trim the padding this batch does not need; right padding leaves causality intact
        x, y = x_all[idx, :T], y_all[idx, :T]
        loss = loss_sum(model, x, y, None) / (y != IGNORE).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"{setting} d={d} N={n_people} step {step}: loss {loss.item():.4f} ({time.time() - t0:.0f}s)",
                  flush=True)
    model.eval()
    rng = random.Random(seed + 1)  # the same questions for every setting and width at a given N
    seen = rng.sample(facts, min(n_eval, len(facts)))
    unseen = [(p, rng.choice(list(QA))) for p in everyone[-n_eval:]]
    db = Database(everyone)  # the tool knows everyone, also the people the model never saw
    return {"setting": setting, "d": d, "params": sum(p.numel() for p in model.parameters()), "people": n_people,
            "facts": len(facts), "steps": steps, "recall": round(recall(model, seen, tool, db), 4),
            "ood_recall": round(recall(model, unseen, tool, db), 4),
            "loss": round(sum(losses[-100:]) / len(losses[-100:]), 4), "seconds": round(time.time() - t0, 1)}


# -----------------------------------------------------------------------------
# Generation with the tool in the loop, and scoring


@torch.inference_mode()
def chat_with_tool(model, prompts: list[list[int]], db: Database, max_new_tokens: int = 128) -> list[list[int]]:
    """Greedy, KV-cached and batched: each row decodes until <eod>. When a row emits <database>, its query (the
    text since its last <assistant>) runs on db, and the answer bytes and <assistant> are fed to that row, one
    per step, instead of its own predictions. Returns each row's tokens after its prompt, answers included."""
    B, longest = len(prompts), max(len(p) for p in prompts)
    pad = torch.tensor([longest - len(p) for p in prompts])
    tokens = torch.tensor([[0] * (longest - len(p)) + list(p) for p in prompts])  # left-padded, as generate
    out, forced, done = [[] for _ in range(B)], [[] for _ in range(B)], [False] * B
    model.setup_cache(B, longest + max_new_tokens)
    try:
        logits = model.forward_cached(tokens, torch.arange(longest), pad)  # (B, vocab)
        for step in range(max_new_tokens):
            nxt = logits.argmax(-1).tolist()
            # A tool answer goes in one token per step rather than as one prefill: every row then stays at the
            # same cache slot, so one batched step serves all rows, as in llama31's generate.
            for b in range(B):
                if forced[b]:
                    nxt[b] = forced[b].pop(0)
                elif not done[b] and nxt[b] == DATABASE:
                    start = max((i + 1 for i, t in enumerate(out[b]) if t == ASSISTANT), default=0)
                    forced[b] = list(db.answer(decode(out[b][start:])).encode("utf-8")) + [ASSISTANT]
                if not done[b]:
                    out[b].append(nxt[b])
                    done[b] = nxt[b] == EOD
            if all(done):
                break
            logits = model.forward_cached(torch.tensor(nxt)[:, None], torch.tensor([longest + step]), pad)
    finally:
        model.clear_cache()
    return out


def final_sentence(reply: list[int]) -> str:
    """The text after the reply's last <assistant> (in-tool) or all of it (in-weight), without <eod>."""
    start = max((i + 1 for i, t in enumerate(reply) if t == ASSISTANT), default=0)
    return decode([t for t in reply[start:] if t != EOD])


def recall(model, questions: list[tuple[dict, str]], tool: bool, db: Database, batch_size: int = 250) -> float:
    """Fraction of (person, attribute) questions whose final sentence ends with " {value}."."""
    right = 0
    for i in range(0, len(questions), batch_size):
        chunk = questions[i:i + batch_size]
        prompts = [encode_chat(None, dialog(p, a, tool)[:1]) for p, a in chunk]  # <user>question<assistant>
        for (p, a), reply in zip(chunk, chat_with_tool(model, prompts, db)):
            # subtle: the space matters, "12/3/1975." ends with "2/3/1975." too
            right += final_sentence(reply).endswith(f" {p[a]}.")
    return right / max(1, len(questions))


# -----------------------------------------------------------------------------
# The grid, the plot, and the command line

FIELDS = ["setting", "d", "params", "people", "facts", "steps", "recall", "ood_recall", "loss", "seconds"]


def grid(out: str, runs: list[str], people: list[int], steps: int, batch_size: int, lr: float, seed: int):
    """Each run ("in_weight:16") at each N, one row appended to `out` as soon as it finishes."""
    for run in runs:
        setting, d = run.split(":")
        for n in people:
            row = train(setting, int(d), n, steps, batch_size=batch_size, lr=lr, seed=seed)
            print(row, flush=True)
            new = not Path(out).exists()
            with open(out, "a", newline="") as f:
                writer = csv.DictWriter(f, FIELDS)
                if new:
                    writer.writeheader()
                writer.writerow(row)


def plot(csv_path: str, png_path: str):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: the plot needs matplotlib: pip install matplotlib")
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in dict.fromkeys((r["setting"], r["d"]) for r in rows):
        rs = sorted((r for r in rows if (r["setting"], r["d"]) == key), key=lambda r: int(r["facts"]))
        facts = [int(r["facts"]) for r in rs]
        line, = ax.plot(facts, [float(r["recall"]) for r in rs], "o-", label=f"{key[0]} d={key[1]}")
        if key[0] == "in_tool":  # unseen people are only answerable through the tool
            ax.plot(facts, [float(r["ood_recall"]) for r in rs], "s--", color=line.get_color(),
                    label=f"{key[0]} d={key[1]}, unseen people")
    ax.set(xscale="log", xlabel="facts (4 per person)", ylabel="recall", ylim=(-0.02, 1.02),
           title="In-weight vs in-tool factual recall")
    ticks = sorted({int(r["facts"]) for r in rows})
    ax.set_xticks(ticks, [str(t) for t in ticks])  # the grid's sizes, not powers of ten
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    for key in dict.fromkeys((r["setting"], r["d"]) for r in rows if r["setting"] == "in_weight"):
        held = [r for r in rows if (r["setting"], r["d"]) == key and float(r["recall"]) >= 0.95]
        if held:  # the bits of attribute entropy stored per parameter, at the largest N still recalled
            r = max(held, key=lambda r: int(r["people"]))
            print(f"in_weight d={key[1]}: recall >= 0.95 up to {r['people']} people, "
                  f"{int(r['people']) * BITS_PER_PERSON / int(r['params']):.3f} bits per parameter")
        else:
            print(f"in_weight d={key[1]}: recall below 0.95 at every N")


def train_command(setting: str = "in_tool", d: int = 32, people: int = 256, steps: int = 3000,
                  batch_size: int = 64, lr: float = 3e-3, seed: int = 0):
    """Train and score one model.

    setting: in_weight (answer from the weights) or in_tool (query the database)
    d: model width
    people: N people, 4N facts
    steps: optimizer steps
    batch_size: dialogs per step
    lr: peak learning rate
    seed: seeds the people, the data order and the initial weights
    """
    if setting not in ("in_weight", "in_tool"):
        raise SystemExit(f"error: --setting is in_weight or in_tool, not {setting!r}")
    print(train(setting, d, people, steps, batch_size, lr, seed=seed))


def grid_command(out: str = "results.csv", runs: list[str] = ("in_tool:32", "in_weight:16", "in_weight:32"),
                 people: list[int] = (64, 256, 1024, 4096), steps: int = 3000, batch_size: int = 64,
                 lr: float = 3e-3, seed: int = 0):
    """Sweep runs x people, appending one CSV row per finished run.

    out: the CSV that rows are appended to
    runs: SETTING:D pairs, e.g. in_tool:32 in_weight:16
    people: the numbers of people (4 facts each)
    steps: optimizer steps of every run
    batch_size: dialogs per step
    lr: peak learning rate
    seed: seeds every run alike
    """
    for run in runs:
        if not re.fullmatch(r"in_(weight|tool):\d+", run):
            raise SystemExit(f"error: a run is SETTING:D, e.g. in_tool:32, not {run!r}")
    grid(out, list(runs), list(people), steps, batch_size, lr, seed)


def plot_command(csv: str = "results.csv", png: str = "docs/in_tool_recall.png"):
    """Recall against facts from a grid's CSV (needs matplotlib); prints bits per parameter.

    csv: the grid's results
    png: where the plot goes
    """
    if not Path(csv).is_file():
        raise SystemExit(f"error: no {csv}: run the grid first")
    plot(csv, png)


COMMANDS = {"train": train_command, "grid": grid_command, "plot": plot_command}

if __name__ == "__main__":
    if sys.argv[1:2] and sys.argv[1] in COMMANDS:
        cli(COMMANDS[sys.argv[1]], sys.argv[2:], prog=f"in_tool_learning.py {sys.argv[1]}")
    else:
        raise SystemExit(f"{__doc__.split(chr(10) * 2)[0].strip()}\n\nusage: python in_tool_learning.py "
                         f"{{{','.join(COMMANDS)}}} [--flag value ...]  (--help after a command lists its flags)")
