"""in_tool_learning.py: the facts, the loss mask, the SQLite tool and the tool-in-the-loop generation."""

import pytest
import torch

import in_tool_learning as itl
from in_tool_learning import ASSISTANT, DATABASE, EOD, IGNORE, USER


def test_people_are_deterministic_distinct_and_in_range():
    a, b = itl.make_people(0), itl.make_people(0)
    assert a == b and a != itl.make_people(1)
    assert len({p["name"] for p in a}) == len(a) == 128 * 128
    for p in a[:2000]:
        day, month, year = map(int, p["birth_date"].split("/"))
        assert 1 <= day <= 28 and 1 <= month <= 12 and 1950 <= year <= 2000
        assert p["birth_place"] in itl.COUNTRIES and p["address"] in itl.CITIES and p["occupation"] in itl.OCCUPATIONS
    assert len(itl.COUNTRIES) == 7 and len(set(itl.CITIES)) == 200 and len(set(itl.OCCUPATIONS)) == 100
    assert 31 < itl.BITS_PER_PERSON < 31.2


@pytest.mark.parametrize("tool", [False, True])
def test_loss_mask_covers_exactly_the_assistant_tokens(tool):
    person = itl.make_people(0)[3]
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
    people = itl.make_people(0)[:5] + [{"name": "D'Arcy O'Neil", "birth_date": "1/2/1960", "birth_place": "Kenya",
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
    assert itl.Database(itl.make_people(0)[:10]).answer(query) == itl.NO_RESULT


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
    people = itl.make_people(0)[:3]
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
    db = itl.Database(itl.make_people(0)[:4])
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
    assert sum(p.numel() for p in itl.make_model(16, 0).parameters()) == 32 * 16 ** 2 + 525 * 16
    row = itl.train("in_tool", 16, n_people=8, steps=3, batch_size=8, n_eval=4, log_every=0)
    assert list(row) == itl.FIELDS and row["facts"] == 32 and 0 <= row["recall"] <= 1 and row["loss"] > 0
    with pytest.raises(SystemExit):
        itl.train("in_weight", 16, n_people=128 * 128, steps=1)  # no unseen people would be left
    with pytest.raises(SystemExit):
        itl.train("in_weight", 18, n_people=8, steps=1)  # 2 heads of 9: RoPE needs even head widths
