"""in_tool_learning.py: the facts and the two unseen splits, the loss mask, the SQLite tool, the tool-in-the-loop
generation, resumable runs and sweeps, the frontier search, the output checks and the command line."""

import builtins
import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import in_tool_learning as itl
from in_tool_learning import ASSISTANT, DATABASE, EOD, IGNORE, USER

ROOT = Path(__file__).resolve().parents[1]


def everyone(seed=0):
    pool, new = itl.make_people(seed)
    return pool + new


def test_people_are_deterministic_distinct_and_in_range():
    a, b = itl.make_people(0), itl.make_people(0)
    assert a == b and a != itl.make_people(1)
    pool, new = a
    assert len(pool) == 112 * 128 and len(new) == 16 * 128
    assert len({p["name"] for p in pool + new}) == 128 * 128
    for p in pool[:2000]:
        day, month, year = map(int, p["birth_date"].split("/"))
        assert 1 <= day <= 28 and 1 <= month <= 12 and 1950 <= year <= 2000
        assert p["birth_place"] in itl.COUNTRIES and p["address"] in itl.CITIES and p["occupation"] in itl.OCCUPATIONS
    assert len(itl.COUNTRIES) == 7 and len(set(itl.CITIES)) == 200 and len(set(itl.OCCUPATIONS)) == 100
    assert 31 < itl.BITS_PER_PERSON < 31.2


def test_unseen_names_never_share_a_first_name_with_training_and_pairs_recombine_seen_names():
    pool, new = itl.make_people(0)
    trained_first = {p["name"].split()[0] for p in pool}  # any N trains on a prefix of the pool
    assert not trained_first & {p["name"].split()[0] for p in new}  # the reference's split: new first names
    assert {p["name"].split()[0] for p in new} == {f for f in itl.FIRST_NAMES if f.startswith(("Ir", "Ol"))}
    n = 64
    trained = {p["name"] for p in pool[:n]}
    firsts, lasts = {t.split()[0] for t in trained}, {t.split()[1] for t in trained}
    pairs = itl.unseen_pairs(pool, n)
    assert len(pairs) > 500
    for p in pairs:
        first, last = p["name"].split()
        assert p["name"] not in trained and first in firsts and last in lasts


@pytest.mark.parametrize("tool", [False, True])
def test_loss_mask_covers_exactly_the_assistant_tokens(tool):
    person = itl.make_people(0)[0][3]
    name, value = person["name"], person["birth_date"]
    ids, mask = itl.render_chat(None, itl.encode_chat, itl.dialog(person, "birth_date", tool))
    question = [USER] + list(f"When was {name} born?".encode()) + [ASSISTANT]
    sentence = list(f"{name} was born on {value}.".encode()) + [EOD]
    if tool:
        query = list(f"```sql\nFIND birth_date FOR {name}\n```".encode()) + [DATABASE]
        answer = list(value.encode()) + [ASSISTANT]  # the tool's bytes and the re-inserted <assistant>
        assert ids == question + query + answer + sentence
        assert mask == [0] * len(question) + [1] * len(query) + [0] * len(answer) + [1] * len(sentence)
    else:
        assert ids == question + sentence
        assert mask == [0] * len(question) + [1] * len(sentence)
    # the training rows: the target of position t is token t+1 where it is masked in, IGNORE elsewhere
    x, y, lengths = itl.to_rows([(ids, mask), ([USER, 65, ASSISTANT, 66, EOD], [0, 0, 0, 1, 1])])
    assert lengths.tolist() == [len(ids) - 1, 4]
    assert x[0, :len(ids) - 1].tolist() == ids[:-1]
    assert y[0, :len(ids) - 1].tolist() == [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
    assert y[1].tolist()[:4] == [IGNORE, IGNORE, 66, EOD] and (y[1, 4:] == IGNORE).all()


def test_query_is_answered_from_sqlite_with_bound_parameters():
    people = everyone()[:5] + [{"name": "D'Arcy O'Neil", "birth_date": "1/2/1960", "birth_place": "Kenya",
                                "address": "Oakport", "occupation": "poet"}]
    db = itl.Database(people)
    for p in people:
        for attr in itl.QA:
            assert db.answer(itl.QUERY.format(attr=attr, name=p["name"])) == p[attr]
    # an injection attempt is a name like any other: no person has it, and the table is left intact
    assert db.answer("```sql\nFIND occupation FOR x' OR '1'='1\n```") == itl.NO_RESULT
    assert db.answer("```sql\nFIND occupation FOR x'; DROP TABLE people; --\n```") == itl.NO_RESULT
    assert db.answer(itl.QUERY.format(attr="occupation", name="D'Arcy O'Neil")) == "poet"


@pytest.mark.parametrize("query", [
    "",
    "FIND birth_date FOR Alan Ashby",  # no fence
    "```sql\nFIND salary FOR Alan Ashby\n```",  # not a column
    "```sql\nFIND name FROM people --\n```",
    "```sql\nFIND birth_date FOR Nobody Atall\n```",  # nobody of that name
    "```sql\nFIND birth_date FOR <assistant>\n```",
])
def test_malformed_query_yields_no_result(query):
    assert itl.Database(everyone()[:10]).answer(query) == itl.NO_RESULT


class ScriptedModel:
    """Stands in for Llama in chat_with_tool: each row writes its fixed query, and after the tool's answer and
    <assistant> it writes "It is " + whatever it was fed between <database> and <assistant> + "." + <eod>."""

    def __init__(self, queries: list[str]):
        self.queries = [list(q.encode()) + [DATABASE] for q in queries]

    def setup_cache(self, batch_size, max_seq_len):
        self.fed = [[] for _ in range(batch_size)]  # what each row was fed after its prompt

    def clear_cache(self):
        self.cleared = True

    def forward_cached(self, tokens, input_pos, pad):
        if len(input_pos) == 1:  # a decode step (the first call is the prefill)
            for b, t in enumerate(tokens[:, 0].tolist()):
                self.fed[b].append(t)
        logits = torch.zeros(len(self.fed), itl.VOCAB)
        for b, fed in enumerate(self.fed):
            if DATABASE not in fed:
                nxt = self.queries[b][len(fed)]
            elif ASSISTANT not in fed[fed.index(DATABASE):]:
                nxt = USER  # ignored: the tool's answer is being fed
            else:
                d, a = fed.index(DATABASE), len(fed) - 1 - fed[::-1].index(ASSISTANT)
                reply = list(b"It is ") + fed[d + 1:a] + list(b".") + [EOD]
                nxt = reply[min(len(fed) - a - 1, len(reply) - 1)]  # a finished row keeps decoding
            logits[b, nxt] = 1.0
        return logits


def test_tool_loop_splices_the_answer_into_generation():
    people = everyone()[:3]
    db = itl.Database(people)
    queries = [itl.QUERY.format(attr="address", name=people[1]["name"]), "```sql\nFIND it\n```"]
    model = ScriptedModel(queries)
    prompts = [[USER] + list(b"Where does she live?") + [ASSISTANT], [USER, 72, 105, ASSISTANT]]  # ragged
    out = itl.chat_with_tool(model, prompts, db)
    city = people[1]["address"]
    assert out[0] == (list(queries[0].encode()) + [DATABASE] + list(city.encode()) + [ASSISTANT]
                      + list(f"It is {city}.".encode()) + [EOD])
    assert itl.final_sentence(out[0]) == f"It is {city}."
    assert itl.final_sentence(out[1]) == f"It is {itl.NO_RESULT}."
    assert model.cleared


def test_batched_cached_tool_loop_matches_one_row_without_cache():
    """Left padding and the cache change nothing: each row decodes as it would alone, recomputed from scratch,
    tool call included (this random model happens to emit <database> in the first row)."""
    model = itl.make_model(16, seed=0).eval()
    torch.manual_seed(0)
    for p in model.parameters():  # larger weights than the init's: no near-ties in the argmax
        torch.nn.init.normal_(p, std=0.5)
    db = itl.Database(everyone()[:4])
    prompts = [[USER] + list(b"Where was Alan Ashby born?") + [ASSISTANT], [USER, 72, 105, ASSISTANT]]
    out = itl.chat_with_tool(model, prompts, db, max_new_tokens=16)
    assert DATABASE in out[0] and out[0][out[0].index(DATABASE) + 1] == ord("N")  # "No result found"
    for prompt, row in zip(prompts, out):
        ids, forced = list(prompt), []
        with torch.no_grad():
            while len(ids) - len(prompt) < len(row):
                t = forced.pop(0) if forced else model(torch.tensor([ids]))[0, -1].argmax().item()
                if t == DATABASE and not forced:
                    forced = list(db.answer(itl.decode(ids[len(prompt):])).encode()) + [ASSISTANT]
                ids.append(t)
        assert ids[len(prompt):] == row


def test_train_returns_a_scored_row_and_tiny_models_have_the_papers_size():
    assert sum(p.numel() for p in itl.make_model(16, 0).parameters()) == itl.n_params(16) == 32 * 16 ** 2 + 525 * 16
    row = itl.train("in_tool", 16, n_people=8, steps=3, batch_size=8, n_eval=4, log_every=0)
    assert list(row) == itl.FIELDS and row["facts"] == 32 and row["loss"] > 0
    assert all(0 <= row[k] <= 1 for k in ("recall", "unseen_names", "unseen_pairs"))
    with pytest.raises(SystemExit):
        itl.train("in_weight", 16, n_people=128 * 112, steps=1)  # no unseen people would be left
    with pytest.raises(SystemExit):
        itl.train("in_weight", 18, n_people=8, steps=1)  # 2 heads of 9: RoPE needs even head widths
    assert itl.budget(1000, 300, 64, 64) == 1200 and itl.budget(1000, 300, 32, 64) == 1000
    assert itl.budget(3000, 0, 4096, 64) == 3000


def test_a_run_cut_short_continues_from_its_checkpoint_step_for_step(tmp_path, monkeypatch):
    kw = dict(setting="in_weight", d=8, n_people=4, steps=6, batch_size=4, n_eval=4, log_every=0)
    whole = itl.train(**kw)
    ckpt = tmp_path / "run.ckpt"
    real = itl.save_atomic

    def save_then_die(path, state):
        real(path, state)
        raise KeyboardInterrupt  # killed right after its first checkpoint (step 3)

    monkeypatch.setattr(itl, "save_atomic", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        itl.train(**kw, ckpt=ckpt, ckpt_every=3)
    assert torch.load(ckpt, weights_only=True)["step"] == 3
    monkeypatch.setattr(itl, "save_atomic", real)
    resumed = itl.train(**kw, ckpt=ckpt, ckpt_every=3)
    assert {k: v for k, v in resumed.items() if k != "seconds"} == {k: v for k, v in whole.items() if k != "seconds"}
    assert not ckpt.exists()  # removed once the row is made
    other = dict(kw, seed=1)  # a checkpoint of another run is not continued
    monkeypatch.setattr(itl, "save_atomic", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        itl.train(**kw, ckpt=ckpt, ckpt_every=3)
    monkeypatch.setattr(itl, "save_atomic", real)
    assert itl.train(**other, ckpt=ckpt)["loss"] == itl.train(**other)["loss"]


def fake_train(recall_of):
    """A stand-in for train: a row whose recall is recall_of(d, n, seed); records the runs it was asked for."""
    calls = []

    def train(setting, d, n, steps, batch_size, lr, seed=0, ckpt=None):
        calls.append((d, n, seed))
        return dict(setting=setting, d=d, params=itl.n_params(d), people=n, facts=4 * n, steps=steps,
                    batch_size=batch_size, lr=lr, seed=seed, recall=recall_of(d, n, seed), unseen_names=0.5,
                    unseen_pairs=0.5, loss=0.1, seconds=1.0)
    return train, calls


def test_grid_appends_a_row_per_run_and_resumes_without_rerunning(tmp_path, monkeypatch):
    train, calls = fake_train(lambda d, n, seed: 1.0)
    monkeypatch.setattr(itl, "train", train)
    out = itl.check_out(str(tmp_path / "sweep" / "grid.csv"))
    itl.grid(out, ["in_weight:8", "in_tool:16"], [4, 8], [0, 1], steps=5, epochs=0, batch_size=4, lr=1e-3)
    assert len(calls) == 8
    itl.grid(out, ["in_weight:8", "in_tool:16", "in_tool:24"], [4, 8], [0, 1], steps=5, epochs=0, batch_size=4,
             lr=1e-3)
    assert len(calls) == 12  # only the new width ran
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and list(rows[0]) == itl.FIELDS


def test_frontier_finds_the_smallest_width_per_n_with_its_bracket_and_stops_hopeless_seeds(tmp_path, monkeypatch):
    need = {16: 12, 32: 16, 64: 16, 128: 24}  # the true smallest width per N
    train, calls = fake_train(lambda d, n, seed: 1.0 if d >= need[n] else (0.9 if seed == 0 else 0.5))
    monkeypatch.setattr(itl, "train", train)
    out = itl.check_out(str(tmp_path / "f.csv"))
    found = itl.frontier(out, "in_weight", [16, 32, 64, 128], [8, 12, 16, 20, 24], [0, 1, 2], steps=5, epochs=0,
                         batch_size=4, lr=1e-3)
    assert found == need
    ran = set(calls)
    for n, d in need.items():
        assert {(d, n, s) for s in (0, 1, 2)} <= ran  # the answer: all seeds
        assert (d - 4, n, 0) in ran  # the width below, measured at the same N
    # a width below the threshold stops once the mean cannot reach 0.95: 0.9 + 0.5 + 1.0 < 2.85 after two seeds
    assert (8, 16, 1) in ran and (8, 16, 2) not in ran
    assert len(calls) == len(ran)
    calls.clear()
    assert itl.frontier(out, "in_weight", [16, 32, 64, 128], [8, 12, 16, 20, 24], [0, 1, 2], steps=5, epochs=0,
                        batch_size=4, lr=1e-3) == need
    assert calls == []  # every run read back from the CSV


def test_every_output_path_is_checked_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="is a folder"):
        itl.check_out(str(tmp_path))
    foreign = tmp_path / "mine.csv"
    foreign.write_text("name,value\nx,1\n")
    with pytest.raises(SystemExit, match="not a results CSV"):
        itl.check_out(str(foreign))
    assert foreign.read_text() == "name,value\nx,1\n"
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match="not a folder"):
        itl.check_out(str(blocker / "out.csv"))
    assert itl.check_out(str(tmp_path / "new" / "out.csv")) == tmp_path / "new" / "out.csv"


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "in_tool_learning.py"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_command_line_help_and_a_folder_as_out_answer_at_once(tmp_path, capsys):
    r = run_cli("--help")
    assert r.returncode == 0 and "usage: python in_tool_learning.py" in r.stdout
    r = run_cli("grid", "--out", str(tmp_path), "--people", "4")
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "is a folder" in r.stderr
    assert list(tmp_path.iterdir()) == []
    for command in itl.COMMANDS.values():  # each command's --help: exit 0, every flag listed
        with pytest.raises(SystemExit) as e:
            itl.cli(command, ["--help"])
        assert e.value.code == 0
    assert capsys.readouterr().out.count("torch CPU threads") == 3  # --threads of train, frontier, grid


def test_threads_flag_sets_torch_threads_and_is_checked():
    before = torch.get_num_threads()
    try:
        itl.set_threads(1)
        assert torch.get_num_threads() == 1
        with pytest.raises(SystemExit, match="threads"):
            itl.set_threads(-1)
    finally:
        torch.set_num_threads(before)


def test_plot_prints_the_tables_beside_the_reference_and_says_in_one_line_without_matplotlib(tmp_path, monkeypatch,
                                                                                             capsys):
    out = tmp_path / "r.csv"
    rows = [dict(setting="in_weight", d=d, params=itl.n_params(d), people=64, facts=256, steps=1200, batch_size=64,
                 lr=0.003, seed=s, recall=1.0 if d == 16 else 0.3, unseen_names=0.0, unseen_pairs=0.0, loss=0.1,
                 seconds=1) for d in (12, 16) for s in (0, 1, 2)]
    for r in rows:
        itl.append_row(out, r)
    ref = tmp_path / "ref.csv"
    ref.write_text("grid,people,key,seed,d,params,accuracy\n" + "".join(
        f"grid4,64,qa,{s},{d},{itl.n_params(d)},{a}\n" for s in range(10) for d, a in ((12, 0.9), (16, 1.0))))
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kw):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    itl.plot_command([str(out)], reference=str(ref))
    text = capsys.readouterr().out
    assert ("| in_weight | 64 | 16 | 16,592 | 1.000 +- 0.000 | 12 | 0.300 +- 0.000 | 16,592 +- 0 (16,592-16,592; "
            "3 seeds) | 0.120 | 16 | 16,592 | 16,592 +- 0 (16,592-16,592; 10 seeds) |") in text
    assert "| in_weight | 12 | 64 | 1,200 | 3 | 0.300 +- 0.000 | 0.900 +- 0.000 |" in text
    assert text.strip().splitlines()[-1].startswith("matplotlib is not installed: no figures")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv", "ref.csv"]


def test_each_seeds_smallest_width_is_exact_only_where_that_seed_ran_the_width_below():
    sc = {("in_weight", 8, 64): {1: 0.1}, ("in_weight", 12, 64): {0: 0.4, 1: 0.97},
          ("in_weight", 16, 64): {0: 1.0, 1: 1.0, 2: 0.99}, ("in_weight", 16, 128): {0: 0.5}}
    fr = itl.seed_frontiers(sc, "in_weight", 64)
    assert fr == {0: ("=", 16), 1: ("=", 12), 2: ("<=", 16)}  # seed 2 never ran d=12: only a bound
    assert itl.seed_frontiers(sc, "in_weight", 128) == {0: (">", 16)}
    assert itl.fmt_frontiers(fr) == "16,592, 10,908, <=16,592 (per seed)"
    exact = {0: ("=", 16), 1: ("=", 12)}
    assert itl.fmt_frontiers(exact) == "13,750 +- 4,019 (10,908-16,592; 2 seeds)"
    assert itl.fmt_frontiers({}) == "-"
