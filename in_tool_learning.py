"""
In-weight vs in-tool factual recall, at CPU scale: a tiny Llama (from llama31.py) either memorises facts about
synthetic people, or learns to look them up in a SQLite database.

It reproduces the set-up of Houliston, Odonnat, Arnal and Cabannes, "Provable Benefits of In-Tool Learning for
Large Language Models" (2025; reference code github.com/ambroiseodt/itl, the NanoLlama "Memory and Generalization
in LLMs" codebase), and its headline: the fewest parameters that recall the facts of N people grow linearly with
N in-weight and stay flat in-tool. N people (first x last name) each get four attributes drawn uniformly: a birth
date, a birth place (7 countries), an address (200 cities) and an occupation (100), about 31 bits per person.
- in-weight: `<user>When was Alan Ashby born?<assistant>Alan Ashby was born on 3/7/1962.<eod>`; the answer must
  come from the weights, which hold a bounded number of bits per parameter, so recall falls as N grows;
- in-tool: the assistant writes ```sql\\nFIND birth_date FOR Alan Ashby\\n``` and the <database> token, the tool's
  answer follows, then <assistant> and the same sentence. The model only has to learn to copy a name into a query
  and a value into a sentence, so a fixed small model recalls any N, even for people it never saw.
The loss covers the assistant's tokens only (its <database> / <eod> included), never the user's question, the
tool's answer or the re-inserted <assistant>: finetune.py's `render_chat` builds that mask from our chat format.

Deliberate departures from the reference:
- our own name, city and occupation lists (syllables joined: 128 first x 128 last names). People never seen in
  training are asked about in two splits, both answered through the tool: "unseen names", the reference's split
  (its first_names_ood.txt): the 16 first names of two syllable prefixes (Ir-, Ol-) are never given to a
  training person; and "unseen pairs": a first and a last name that each occur in training, never together;
- a CPU budget: batch 64 for at least 3,000 steps, in-weight also for at least 300 passes over the facts
  (19,200 steps at 1,024 people), where the reference trains 100k steps of batch 128 at every N; 3 seeds (the
  reference: 10); a sample of at most 500 questions per split; and `frontier` searches the widths near the
  threshold instead of running every width (docs/in_tool_learning.md says what that leaves out);
- lr 3e-3, not 1e-3, for that short budget: a pilot (in-tool, d=32, 1024 people, 1500 steps) reached recall
  0.27 (people never trained on: 0.24) at 1e-3 and 0.89 (0.78) at 3e-3; 1e-2 was no faster in-weight (d=32,
  1024 people, 3000 steps: training loss 0.140 against 0.132 at 3e-3);
- a reply is right when it ends with " {value}." (space included): "12/3/1975." also ends with "2/3/1975.";
- training rows are single dialogs padded to the batch's longest (no packing: dialogs are 60-150 bytes), and
  the generation loop is batched: a row that calls the tool is fed the answer one token per step while the
  other rows decode, so every row stays in the same cache slot as in llama31's `generate`.

Usage (every command resumes: rows already in --out are kept, a run cut short continues from its checkpoint;
docs/in_tool_learning.md lists the commands that made its tables):
    python in_tool_learning.py train --setting in_tool --d 32 --people 1024 --steps 3000
    python in_tool_learning.py frontier --out runs/itl/in_weight.csv --setting in_weight --people 64 128 256 512 1024 \\
        --widths 8 12 16 20 24 28 32 --steps 3000 --epochs 300
    python in_tool_learning.py frontier --out runs/itl/in_tool.csv --setting in_tool --people 256 1024 4096 \\
        --widths 16 20 24 28 --steps 3000 --epochs 0
    python in_tool_learning.py grid --out runs/itl/in_tool.csv --runs in_tool:16 --people 4096 --seeds 0
    python in_tool_learning.py plot --csv runs/itl/in_weight.csv runs/itl/in_tool.csv  # figures beside the first CSV
"""

import csv
import math
import os
import random
import re
import sqlite3
import statistics
import sys
import time
from pathlib import Path

# --help answers before torch loads (a second or more): the commands' flags come from the functions below
if __name__ == "__main__" and sys.argv[1:2] in ([], ["-h"], ["--help"]):
    print(f"{__doc__.strip()}\n\nusage: python in_tool_learning.py {{train,frontier,grid,plot}} [--flag value ...]"
          f"  (--help after a command lists its flags)")
    raise SystemExit(0 if sys.argv[1:] else 2)

import torch  # noqa: E402

from finetune import IGNORE, build_optimizer, build_scheduler, init_weights, loss_sum, render_chat  # noqa: E402
from llama31 import Llama, ModelArgs  # noqa: E402
from cli import cli  # noqa: E402

# -----------------------------------------------------------------------------
# Tokens and facts

USER, ASSISTANT, DATABASE, EOD = 256, 257, 258, 259  # after the 256 byte values
VOCAB = 260
SPECIAL = {USER: "<user>", ASSISTANT: "<assistant>", DATABASE: "<database>", EOD: "<eod>"}

FIRST_NAMES = [a + b for a in ("Al", "Be", "Cor", "Da", "El", "Fa", "Gil", "Ha", "Ir", "Jo", "Ka", "Lu", "Mi",
                               "Ner", "Ol", "Pa") for b in ("an", "bert", "da", "ena", "ia", "lin", "o", "ric")]
UNSEEN_PREFIXES = ("Ir", "Ol")  # first names that never reach training: the "unseen names" split
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
LR = 3e-3
TARGET = 0.95  # the recall a width must reach to "hold" N people (the paper's threshold)


def make_people(seed: int) -> tuple[list[dict], list[dict]]:
    """Every first x last name pair, each with uniform attributes, in a seeded order, as two lists:
    pool: the 14,336 people whose first name training may use; the first N are the training people of any N (so
    the sets are nested), the others are never trained on; new_names: the 2,048 whose first name starts with an
    UNSEEN_PREFIXES syllable, never given to a training person (the reference's unseen split)."""
    rng = random.Random(seed)
    names = [f"{f} {l}" for f in FIRST_NAMES for l in LAST_NAMES]
    rng.shuffle(names)
    people = [{"name": name, "birth_date": f"{rng.randint(1, 28)}/{rng.randint(1, 12)}/{rng.randint(1950, 2000)}",
               "birth_place": rng.choice(COUNTRIES), "address": rng.choice(CITIES),
               "occupation": rng.choice(OCCUPATIONS)} for name in names]
    new = [p for p in people if p["name"].startswith(UNSEEN_PREFIXES)]
    return [p for p in people if not p["name"].startswith(UNSEEN_PREFIXES)], new


def unseen_pairs(pool: list[dict], n_people: int) -> list[dict]:
    """The people of the pool never trained on whose first name and last name each occur among the n_people
    trained: a known first and last name, never seen together."""
    firsts = {p["name"].split()[0] for p in pool[:n_people]}
    lasts = {p["name"].split()[1] for p in pool[:n_people]}
    return [p for p in pool[n_people:] if p["name"].split()[0] in firsts and p["name"].split()[1] in lasts]


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
                     rope_theta=10000.0, rope_factor=None, max_seq_len=max_seq_len,
                     tie_embeddings=False, stop_tokens=(EOD,))
    torch.manual_seed(seed)
    model = Llama(args)
    init_weights(model)
    return model


def n_params(d: int) -> int:
    return 32 * d * d + 525 * d


def budget(steps: int, epochs: float, n_people: int, batch_size: int) -> int:
    """Optimizer steps of a run: at least `steps`, and at least `epochs` passes over the 4N facts."""
    return max(steps, math.ceil(epochs * 4 * n_people / batch_size))


def to_rows(dialogs: list[tuple[list[int], list[int]]]):
    """(ids, loss_mask) pairs -> inputs, targets (n, longest) and lengths; a target is IGNORE unless masked in."""
    longest = max(len(ids) for ids, _ in dialogs) - 1
    x = torch.zeros(len(dialogs), longest, dtype=torch.long)
    y = torch.full((len(dialogs), longest), IGNORE, dtype=torch.long)
    for i, (ids, mask) in enumerate(dialogs):
        x[i, :len(ids) - 1] = torch.tensor(ids[:-1])
        y[i, :len(ids) - 1] = torch.tensor([t if m else IGNORE for t, m in zip(ids[1:], mask[1:])])
    return x, y, torch.tensor([len(ids) - 1 for ids, _ in dialogs])


def check_run(setting: str, d: int, n_people: int, steps: int, n_eval: int = 500):
    if setting not in ("in_weight", "in_tool"):
        raise SystemExit(f"error: a setting is in_weight or in_tool, not {setting!r}")
    if d < 4 or d % 4 or n_people < 1 or steps < 1:
        raise SystemExit("error: need d a multiple of 4 (2 heads whose RoPE turns pairs), people >= 1, steps >= 1")
    pool = 128 * (128 - 8 * len(UNSEEN_PREFIXES))
    if n_people + n_eval > pool:
        raise SystemExit(f"error: at most {pool - n_eval} people leave {n_eval} never trained on to ask about")


def train(setting: str, d: int, n_people: int, steps: int, batch_size: int = 64, lr: float = LR,
          warmup: int = 100, seed: int = 0, n_eval: int = 500, log_every: int = 500, ckpt: Path | None = None,
          ckpt_every: int = 1000) -> dict:
    """Train one model on the 4N facts of the first n_people people; score it; return one results row.
    ckpt: a file to save the run's state to every ckpt_every steps and to continue from if it holds this run's
    state (the continued run is the one that was cut short, step for step); removed once the row is made."""
    check_run(setting, d, n_people, steps, n_eval)
    t0 = time.time()
    tool = setting == "in_tool"
    pool, new_names = make_people(seed)
    people = pool[:n_people]
    facts = [(p, a) for p in people for a in QA]
    x_all, y_all, lengths = to_rows([render_chat(None, encode_chat, dialog(p, a, tool)) for p, a in facts])
    model = make_model(d, seed)
    # finetune.py's AdamW (decay on matrices only) and warmup + cosine schedule, the paper's settings but lr. Its
    # train() loop is not reused: it reads files through a model file's tokenizer, we sample facts in memory.
    optimizer = build_optimizer(model, lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    scheduler = build_scheduler(optimizer, warmup_steps=warmup, max_steps=steps, min_lr_frac=0.1)
    gen = torch.Generator().manual_seed(seed)
    order, losses, start, spent = torch.empty(0, dtype=torch.long), [], 0, 0.0
    run = [setting, d, n_people, steps, batch_size, lr, warmup, seed]
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)  # a checkpoint is data: it cannot run code
        if state["run"] == run:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            gen.set_state(state["generator"])
            order, losses, start, spent = state["order"], state["losses"].tolist(), state["step"], state["seconds"]
            print(f"{setting} d={d} N={n_people} seed {seed}: continuing at step {start} from {ckpt}", flush=True)
    for step in range(start, steps):
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
            print(f"{setting} d={d} N={n_people} seed {seed} step {step}: loss {loss.item():.4f} "
                  f"({spent + time.time() - t0:.0f}s)", flush=True)
        if ckpt is not None and (step + 1) % ckpt_every == 0 and step + 1 < steps:
            save_atomic(ckpt, {"run": run, "step": step + 1, "model": model.state_dict(),
                               "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                               "generator": gen.get_state(), "order": order, "losses": torch.tensor(losses),
                               "seconds": spent + time.time() - t0})
    model.eval()
    rng = random.Random(seed + 1)  # the same questions for every setting and width at a given N and seed
    seen = rng.sample(facts, min(n_eval, len(facts)))
    pairs = unseen_pairs(pool, n_people)
    asked_pairs = [(p, rng.choice(list(QA))) for p in rng.sample(pairs, min(n_eval, len(pairs)))]
    asked_names = [(p, rng.choice(list(QA))) for p in rng.sample(new_names, min(n_eval, len(new_names)))]
    db = Database(pool + new_names)  # the tool knows everyone, also the people the model never saw
    row = {"setting": setting, "d": d, "params": sum(p.numel() for p in model.parameters()), "people": n_people,
           "facts": len(facts), "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
           "recall": round(recall(model, seen, tool, db), 4),
           "unseen_names": round(recall(model, asked_names, tool, db), 4),
           "unseen_pairs": round(recall(model, asked_pairs, tool, db), 4),
           "loss": round(sum(losses[-100:]) / len(losses[-100:]), 4),
           "seconds": round(spent + time.time() - t0, 1)}
    if ckpt is not None:
        ckpt.unlink(missing_ok=True)
    return row


def save_atomic(path: Path, state: dict):
    """torch.save to a temporary file, then a rename: a run killed while saving keeps its previous checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


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
    """Fraction of (person, attribute) questions whose final sentence ends with " {value}."; nan for none."""
    right = 0
    for i in range(0, len(questions), batch_size):
        chunk = questions[i:i + batch_size]
        prompts = [encode_chat(None, dialog(p, a, tool)[:1]) for p, a in chunk]  # <user>question<assistant>
        for (p, a), reply in zip(chunk, chat_with_tool(model, prompts, db)):
            # subtle: the space matters, "12/3/1975." ends with "2/3/1975." too
            right += final_sentence(reply).endswith(f" {p[a]}.")
    return right / len(questions) if questions else float("nan")


# -----------------------------------------------------------------------------
# Results files: one CSV row per finished run, so an interrupted sweep resumes where it stopped

FIELDS = ["setting", "d", "params", "people", "facts", "steps", "batch_size", "lr", "seed", "recall",
          "unseen_names", "unseen_pairs", "loss", "seconds"]
KEY = ["setting", "d", "people", "steps", "batch_size", "lr", "seed"]  # what makes two rows the same run


def run_key(row: dict) -> tuple:
    return (row["setting"], int(row["d"]), int(row["people"]), int(row["steps"]), int(row["batch_size"]),
            float(row["lr"]), int(row["seed"]))


def check_out(path: str) -> Path:
    """A results CSV to append to, checked before any work: a file (or nothing yet) in a folder we can write,
    and if it exists, a results file of this script."""
    out = Path(path)
    if out.is_dir():
        raise SystemExit(f"error: --out {path} is a folder; give a CSV file, e.g. --out {out / 'results.csv'}")
    if out.exists() and not out.is_file():
        raise SystemExit(f"error: --out {path} is not a regular file")
    if out.is_file():
        with open(out, newline="") as f:
            header = next(csv.reader(f), None)
        if header != FIELDS:
            raise SystemExit(f"error: {path} is not a results CSV of this script (its header is not "
                             f"{','.join(FIELDS)}); give a new --out")
    folder = out.parent
    if folder.exists() and not folder.is_dir():
        raise SystemExit(f"error: --out {path}: {folder} is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: cannot create {folder} for --out ({e.strerror})")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SystemExit(f"error: cannot write into {folder}; give an --out in a folder you can write")
    return out


def read_rows(paths) -> list[dict]:
    rows = []
    for path in paths:
        if Path(path).is_file():
            with open(path, newline="") as f:
                rows += list(csv.DictReader(f))
    return rows


def append_row(out: Path, row: dict):
    new = not out.exists()
    with open(out, "a", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)
        f.flush()
        os.fsync(f.fileno())


def run_once(out: Path, done: dict, setting: str, d: int, n: int, seed: int, steps: int, batch_size: int,
             lr: float) -> dict:
    """The row of one run: from `done` (rows of out by run_key) if it ran already, else trained and appended."""
    key = (setting, d, n, steps, batch_size, float(lr), seed)
    if key not in done:
        ckpt = out.with_name(f"{out.stem}.{setting}.d{d}.N{n}.s{seed}.steps{steps}.ckpt")
        row = train(setting, d, n, steps, batch_size, lr, seed=seed, ckpt=ckpt)
        print(row, flush=True)
        append_row(out, row)
        done[key] = row
    return done[key]


def grid(out: Path, runs: list[str], people: list[int], seeds: list[int], steps: int, epochs: float,
         batch_size: int, lr: float):
    """Each run ("in_weight:16") at each N and seed; rows already in out are kept, not run again."""
    done = {run_key(r): r for r in read_rows([out])}
    for run in runs:
        setting, d = run.split(":")
        for n in people:
            for seed in seeds:
                run_once(out, done, setting, int(d), n, seed, budget(steps, epochs, n, batch_size), batch_size, lr)


def frontier(out: Path, setting: str, people: list[int], widths: list[int], seeds: list[int], steps: int,
             epochs: float, batch_size: int, lr: float):
    """The smallest width whose recall, averaged over the seeds, reaches TARGET, for each N in increasing order.
    The search starts at the previous N's answer and moves down while a width holds, up while it fails, so the
    width below each answer is measured at that N too (the bracket). Seeds run one after another and stop as soon
    as the mean can no longer reach TARGET (with 3 seeds: a first seed under 0.85), so a width far below the
    threshold costs one run."""
    done = {run_key(r): r for r in read_rows([out])}
    widths, found, i = sorted(widths), {}, 0

    def holds(d: int, n: int) -> bool:
        s, total = budget(steps, epochs, n, batch_size), 0.0
        for k, seed in enumerate(seeds):
            total += float(run_once(out, done, setting, d, n, seed, s, batch_size, lr)["recall"])
            if total + (len(seeds) - k - 1) < TARGET * len(seeds):  # even perfect recall from the rest misses
                return False
        return True

    for n in sorted(people):
        if holds(widths[i], n):
            while i > 0 and holds(widths[i - 1], n):
                i -= 1
        else:
            while i + 1 < len(widths) and not holds(widths[i + 1], n):
                i += 1
            i += 1
            if i == len(widths):
                print(f"{setting}: no width of {widths} holds {n} people; stopping the search", flush=True)
                return found
        found[n] = widths[i]
        print(f"{setting}: {n} people need d = {widths[i]} ({n_params(widths[i]):,} parameters)", flush=True)
    return found


# -----------------------------------------------------------------------------
# Tables and figures from the results CSVs, beside the reference's own results

REFERENCE = Path(__file__).resolve().parent / "docs" / "in_tool_reference.csv"
REF_KEY = {"in_weight": "qa", "in_tool": "qatool"}


def seed_cells(rows: list[dict], field: str = "recall") -> dict:
    """{(setting, d, people): {seed: value}} of the runs with the most steps at that cell."""
    most = {}
    for r in rows:
        k = (r["setting"], int(r["d"]), int(r["people"]))
        most[k] = max(most.get(k, 0), int(r["steps"]))
    out = {}
    for r in rows:
        k = (r["setting"], int(r["d"]), int(r["people"]))
        if int(r["steps"]) == most[k] and r[field] not in ("", "nan"):
            out.setdefault(k, {})[int(r["seed"])] = float(r[field])
    return out


def cells(rows: list[dict], field: str = "recall") -> dict:
    """{(setting, d, people): [values over seeds]} of the runs with the most steps at that cell."""
    return {k: list(v.values()) for k, v in seed_cells(rows, field).items()}


def reference_seed_cells(path: Path, grid: str) -> dict:
    """{(setting, d, people): {seed: accuracy}} of one of the reference's result files (docs/...)."""
    out = {}
    for r in read_rows([path]):
        if r["grid"] == grid:
            setting = {v: k for k, v in REF_KEY.items()}[r["key"]]
            out.setdefault((setting, int(r["d"]), int(r["people"])), {})[int(r["seed"])] = float(r["accuracy"])
    return out


def reference_cells(path: Path, grid: str) -> dict:
    """{(setting, d, people): [accuracy over seeds]} of one of the reference's result files (docs/...)."""
    return {k: list(v.values()) for k, v in reference_seed_cells(path, grid).items()}


def seed_frontiers(sc: dict, setting: str, n: int) -> dict:
    """{seed: (sign, d)}: each seed's own smallest width with recall >= TARGET at N. sign "=" when that seed also
    ran the next smaller width run at N and missed (exact), "<=" when it did not (frontier stops a hopeless width
    after its first seeds) or no smaller width ran, ">" (d: its largest width run) when it holds at none."""
    ds = sorted(d for (s, d, m) in sc if s == setting and m == n)
    out = {}
    for seed in sorted({seed for d in ds for seed in sc[(setting, d, n)]}):
        ran = [d for d in ds if seed in sc[(setting, d, n)]]
        hold = next((d for d in ran if sc[(setting, d, n)][seed] >= TARGET), None)
        if hold is None:
            out[seed] = (">", ran[-1])
            continue
        smaller = [d for d in ds if d < hold]
        out[seed] = ("=" if smaller and smaller[-1] in ran else "<=", hold)
    return out


def fmt_frontiers(fr: dict) -> str:
    """Per-seed smallest widths as parameters: mean +- sd and min-max when every seed's is exact, else the list."""
    if not fr:
        return "-"
    if all(sign == "=" for sign, _ in fr.values()):
        p = [n_params(d) for _, d in fr.values()]
        sd = f" +- {statistics.stdev(p):,.0f}" if len(p) > 1 else ""
        return f"{statistics.mean(p):,.0f}{sd} ({min(p):,}-{max(p):,}; {len(p)} seed{'s' * (len(p) > 1)})"
    return ", ".join(f"{'' if sign == '=' else sign}{n_params(d):,}" for sign, d in fr.values()) + " (per seed)"


def smallest_holding(c: dict, setting: str, n: int):
    """(smallest width whose mean recall reaches TARGET, largest width below it that was run and failed)."""
    ds = sorted(d for (s, d, m) in c if s == setting and m == n)
    hold = next((d for d in ds if statistics.mean(c[(setting, d, n)]) >= TARGET), None)
    below = max((d for d in ds if hold is None or d < hold), default=None)
    return hold, below


def fmt(values: list[float]) -> str:
    """mean +- standard deviation (seeds), or the one value."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f} (1 seed)"
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}"


def tables(rows: list[dict], reference: Path | None):
    """Markdown tables: the headline (smallest width holding each N, ours and the reference's), every cell beside
    the reference's same cell, and the unseen-people splits beside the reference's unseen-names grid."""
    ours, ours_seeds = cells(rows), seed_cells(rows)
    ref_seeds = reference_seed_cells(reference, "grid4") if reference else {}
    ref = {k: list(v.values()) for k, v in ref_seeds.items()}
    ood = reference_cells(reference, "grid_ood_data_transition") if reference else {}
    print(f"\nSmallest width whose mean recall reaches {TARGET} (the paper's headline; parameters P = 32d^2 + 525d), "
          "the recall there and at the width below (mean +- sd over seeds), and each seed's own smallest width as "
          "parameters (mean +- sd (min-max) when every seed's is exact; '<=': that seed did not run the width "
          "below)\n")
    print("| setting | people | d (ours) | parameters | recall at d | width below | recall below | per seed (ours) | "
          "bits/param | reference d | reference parameters | reference per seed (10 seeds) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for setting, n in sorted({(s, n) for s, _, n in ours}):
        hold, below = smallest_holding(ours, setting, n)
        rhold, _ = smallest_holding(ref, setting, n)
        bits = f"{n * BITS_PER_PERSON / n_params(hold):.3f}" if hold and setting == "in_weight" else "-"
        print(f"| {setting} | {n:,} | {hold or f'> {below}'} | {f'{n_params(hold):,}' if hold else '-'} | "
              f"{fmt(ours[(setting, hold, n)]) if hold else '-'} | {below or '-'} | "
              f"{fmt(ours[(setting, below, n)]) if below else '-'} | "
              f"{fmt_frontiers(seed_frontiers(ours_seeds, setting, n))} | {bits} | "
              f"{rhold or ('-' if not ref else 'none <= 128')} | {f'{n_params(rhold):,}' if rhold else '-'} | "
              f"{fmt_frontiers(seed_frontiers(ref_seeds, setting, n))} |")
    print("\nEvery cell: recall over our seeds (mean +- sd) beside the reference's 10 seeds at the same setting, "
          "d and N (grid4.csv; '-': not in its grid)\n")
    print("| setting | d | people | steps | seeds | recall | reference recall | unseen names | unseen pairs |")
    print("|---|---|---|---|---|---|---|---|---|")
    names, pairs = cells(rows, "unseen_names"), cells(rows, "unseen_pairs")
    steps = {(r["setting"], int(r["d"]), int(r["people"])): int(r["steps"]) for r in rows}
    for k in sorted(ours):
        setting, d, n = k
        print(f"| {setting} | {d} | {n:,} | {steps[k]:,} | {len(ours[k])} | {fmt(ours[k])} | {fmt(ref.get(k, []))} "
              f"| {fmt(names.get(k, []))} | {fmt(pairs.get(k, []))} |")
    if any(k in ood for k in names):
        print("\nUnseen names (the reference's split) beside the reference's unseen-people grid "
              "(grid_ood_data_transition.csv: one seed, 40 questions; widths 24, 36, 56, 96, 128)\n")
        print("| setting | d | people | unseen names (ours) | reference (same d) |")
        print("|---|---|---|---|---|")
        for k in sorted(names):
            if k in ood:
                print(f"| {k[0]} | {k[1]} | {k[2]:,} | {fmt(names[k])} | {fmt(ood[k])} |")


def plot(rows: list[dict], reference: Path | None, out_dir: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figures (pip install matplotlib); the tables above hold the numbers")
        return
    ours = cells(rows)
    ref_seeds = reference_seed_cells(reference, "grid4") if reference else {}
    ref = {k: list(v.values()) for k, v in ref_seeds.items()}
    colors = {"in_weight": "tab:blue", "in_tool": "tab:orange"}
    # The headline: fewest parameters that hold N people
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for setting in ("in_weight", "in_tool"):
        ns = sorted({n for s, _, n in ours if s == setting})
        pts = [(n, *smallest_holding(ours, setting, n)) for n in ns]
        pts = [(n, hold, below) for n, hold, below in pts if hold]
        if pts:
            y = [n_params(h) for _, h, _ in pts]
            low = [n_params(h) - n_params(b) if b else 0 for _, h, b in pts]  # no bar: no smaller width ran
            ax.errorbar([n for n, _, _ in pts], y, yerr=[low, [0] * len(y)], fmt="o-", capsize=3,
                        color=colors[setting], label=f"{setting} (ours, 3 seeds; bar down to the width below, which failed)")
        rns = sorted({n for s, _, n in ref if s == setting})
        rpts = [(n, smallest_holding(ref, setting, n)[0]) for n in rns]
        rpts = [(n, h) for n, h in rpts if h]
        if rpts:
            ax.plot([n for n, _ in rpts], [n_params(h) for _, h in rpts], "s--", color=colors[setting], alpha=0.5,
                    label=f"{setting} (reference, grid4.csv, 10 seeds, 100k steps)")
            # the spread of the reference's own seeds: each seed's smallest width holding N (its grid runs every
            # width at every seed, so each is exact)
            spread = [[n_params(d) for _, d in seed_frontiers(ref_seeds, setting, n).values()] for n, _ in rpts]
            ax.fill_between([n for n, _ in rpts], [min(p) for p in spread], [max(p) for p in spread],
                            color=colors[setting], alpha=0.12, lw=0,
                            label=f"{setting} (reference, min-max of its seeds' own smallest size)")
    ax.set(xscale="log", yscale="log", xlabel="people N (4 facts each)",
           ylabel=f"fewest parameters with mean recall >= {TARGET}",
           title="The smallest model that recalls N people: in-weight vs in-tool")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out_dir / "in_tool_frontier.png", dpi=120)
    # Recall against N for every width run, mean and standard deviation over seeds; the unseen splits for in-tool
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    unseen = {"unseen names": (cells(rows, "unseen_names"), "s:"),
              "unseen pairs": (cells(rows, "unseen_pairs"), "^--")}
    for ax, setting in zip(axes, ("in_weight", "in_tool")):
        for d in sorted({d for s, d, _ in ours if s == setting}):
            ks = sorted((k for k in ours if k[0] == setting and k[1] == d), key=lambda k: k[2])
            mean = [statistics.mean(ours[k]) for k in ks]
            sd = [statistics.stdev(ours[k]) if len(ours[k]) > 1 else 0 for k in ks]
            line = ax.errorbar([k[2] for k in ks], mean, yerr=sd, fmt="o-", capsize=3, label=f"d={d}")
            for split, (c, style) in unseen.items():
                kn = [k for k in ks if k in c]
                if setting == "in_tool" and kn:
                    ax.errorbar([k[2] for k in kn], [statistics.mean(c[k]) for k in kn],
                                yerr=[statistics.stdev(c[k]) if len(c[k]) > 1 else 0 for k in kn], fmt=style,
                                capsize=3, color=line[0].get_color(), alpha=0.6, label=f"d={d}, {split}")
        ax.axhline(TARGET, color="gray", lw=0.8, ls="--")
        ax.set(xscale="log", xlabel="people N", title=setting, ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0].set_ylabel("recall (mean +- sd over seeds)")
    fig.tight_layout()
    fig.savefig(out_dir / "in_tool_recall.png", dpi=120)
    print(f"wrote {out_dir / 'in_tool_frontier.png'} and {out_dir / 'in_tool_recall.png'}")


# -----------------------------------------------------------------------------
# The command line


def set_threads(threads: int):
    if threads < 0:
        raise SystemExit("error: --threads is a number >= 1, or 0 for torch's default")
    if threads:
        torch.set_num_threads(threads)  # tiny models: one thread each, two runs at once, beat two threads


def train_command(setting: str = "in_tool", d: int = 32, people: int = 256, steps: int = 3000,
                  batch_size: int = 64, lr: float = LR, seed: int = 0, threads: int = 1):
    """Train and score one model.

    setting: in_weight (answer from the weights) or in_tool (query the database)
    d: model width
    people: N people, 4N facts
    steps: optimizer steps
    batch_size: dialogs per step
    lr: peak learning rate
    seed: seeds the people, the data order and the initial weights
    threads: torch CPU threads (0: torch's default)
    """
    check_run(setting, d, people, steps)
    set_threads(threads)
    print(train(setting, d, people, steps, batch_size, lr, seed=seed))


def check_sweep(people, seeds, steps, epochs, batch_size, threads):
    if not people or min(people) < 1 or not seeds or steps < 1 or epochs < 0 or batch_size < 1:
        raise SystemExit("error: need --people >= 1, at least one --seeds, --steps >= 1, --epochs >= 0 and "
                         "--batch_size >= 1")
    set_threads(threads)


def grid_command(out: str = "runs/itl/grid.csv", runs: list[str] = ("in_tool:32", "in_weight:32"),
                 people: list[int] = (64, 256, 1024), seeds: list[int] = (0, 1, 2), steps: int = 3000,
                 epochs: float = 0.0, batch_size: int = 64, lr: float = LR, threads: int = 1):
    """Sweep runs x people x seeds, one CSV row per finished run; rows already in --out are not run again.

    out: the results CSV that rows are appended to (created with its folder)
    runs: SETTING:D pairs, e.g. in_tool:32 in_weight:16
    people: the numbers of people (4 facts each)
    seeds: one run per seed (the people, the data order and the initial weights)
    steps: optimizer steps of every run (at least)
    epochs: at least this many passes over the facts (steps grow with N; 0: --steps alone)
    batch_size: dialogs per step
    lr: peak learning rate
    threads: torch CPU threads per run (0: torch's default)
    """
    for run in runs:
        if not re.fullmatch(r"in_(weight|tool):\d+", run):
            raise SystemExit(f"error: a run is SETTING:D, e.g. in_tool:32, not {run!r}")
        setting, d = run.split(":")
        check_run(setting, int(d), max(people, default=1), steps)
    check_sweep(people, seeds, steps, epochs, batch_size, threads)
    grid(check_out(out), list(runs), list(people), list(seeds), steps, epochs, batch_size, lr)


def frontier_command(out: str = "runs/itl/frontier.csv", setting: str = "in_weight",
                     people: list[int] = (64, 128, 256, 512, 1024), widths: list[int] = (8, 12, 16, 20, 24, 28, 32),
                     seeds: list[int] = (0, 1, 2), steps: int = 1000, epochs: float = 300.0, batch_size: int = 64,
                     lr: float = LR, threads: int = 1):
    """For each N, the smallest width whose recall over the seeds reaches 0.95, and the width below it.

    out: the results CSV that rows are appended to (created with its folder); rows in it are not run again
    setting: in_weight or in_tool
    people: the numbers of people, searched in increasing order
    widths: the widths d to choose from (multiples of 4)
    seeds: the seeds whose mean recall decides
    steps: optimizer steps of every run (at least)
    epochs: at least this many passes over the facts (steps grow with N; 0: --steps alone)
    batch_size: dialogs per step
    lr: peak learning rate
    threads: torch CPU threads per run (0: torch's default)
    """
    for d in widths:
        check_run(setting, d, max(people, default=1), steps)
    check_sweep(people, seeds, steps, epochs, batch_size, threads)
    frontier(check_out(out), setting, list(people), list(widths), list(seeds), steps, epochs, batch_size, lr)


def plot_command(csv: list[str] = ("runs/itl/results.csv",), out_dir: str = "", reference: str = str(REFERENCE)):
    """Tables (markdown) and figures from results CSVs, beside the reference's results; figures need matplotlib.

    csv: the results CSVs of grid / frontier runs
    out_dir: where in_tool_frontier.png and in_tool_recall.png go (default: the first CSV's folder)
    reference: the reference's results (docs/in_tool_reference.csv); empty: none
    """
    missing = [c for c in csv if not Path(c).is_file()]
    if missing:
        raise SystemExit(f"error: no {missing[0]}: run grid or frontier first")
    folder = Path(out_dir) if out_dir else Path(csv[0]).parent
    if folder.exists() and not folder.is_dir():
        raise SystemExit(f"error: --out_dir {folder} is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK):
        raise SystemExit(f"error: cannot write into {folder}; give another --out_dir")
    ref = Path(reference) if reference else None
    if ref and not ref.is_file():
        raise SystemExit(f"error: no reference results at {ref}; give --reference '' to leave them out")
    rows = read_rows(csv)
    tables(rows, ref)
    plot(rows, ref, folder)


COMMANDS = {"train": train_command, "frontier": frontier_command, "grid": grid_command, "plot": plot_command}

if __name__ == "__main__":
    if sys.argv[1] not in COMMANDS:
        raise SystemExit(f"error: unknown command {sys.argv[1]!r}; the commands are {', '.join(COMMANDS)} "
                         f"(python in_tool_learning.py --help)")
    cli(COMMANDS[sys.argv[1]], sys.argv[2:], prog=f"in_tool_learning.py {sys.argv[1]}")
