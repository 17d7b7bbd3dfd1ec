"""lm2_banks.py: one bank is lm2.py's memory; routed reads touch only the chosen banks; sleep trains only LoRA."""
import sys
from pathlib import Path

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lm2  # noqa: E402
import lm2_banks  # noqa: E402
from lm2_banks import BankArgs, BankLM2, BankedMemory  # noqa: E402


def tiny(**kw) -> BankArgs:
    return BankArgs(**{**dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64,
                              vocab_size=50, max_seq_len=64, mem_slots=4, mem_heads=4, segment_len=8,
                              attn_window=6), **kw})


def trained_like(model):
    """Random weights everywhere (fresh memory has W_V = 0, which would make any read output zero)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("keys", ["learned", "cluster"])
def test_one_bank_equals_dense_memory(keys):
    args = tiny(mem_banks=1, mem_top=1, mem_bank_keys=keys)
    bank = trained_like(BankLM2(args)).eval()
    dense_args = lm2.ModelArgs(**{f: getattr(args, f) for f in lm2.ModelArgs.__dataclass_fields__})
    dense = lm2.LM2(dense_args).eval()
    state = {k: v for k, v in bank.state_dict().items() if not k.endswith(("bank_keys", "bank_bias", "centroids"))}
    dense.load_state_dict(state, strict=True)
    tokens = torch.randint(0, 50, (3, 40))
    assert torch.equal(bank(tokens), dense(tokens))


def routed_setup(K=4, S=3, m=1, T=5, keys="learned"):
    args = tiny(mem_banks=K, mem_slots=S, mem_top=m, mem_bank_keys=keys)
    torch.manual_seed(0)
    mem = trained_like(BankedMemory(args))
    bank0 = torch.randn(2, K * S, 32, requires_grad=True)
    h = torch.randn(2, T, 32)
    return mem, h, bank0


@pytest.mark.parametrize("m, keys", [(1, "learned"), (2, "learned"), (1, "cluster"), (2, "cluster")])
def test_routed_read_touches_only_chosen_banks(m, keys, monkeypatch):
    K, S, T = 6, 3, 2  # two tokens reach at most 2 m < K banks of a row
    mem, h, bank0 = routed_setup(K, S, m, T, keys)
    chosen = mem.route(mem.q_proj(h), mem.state(bank0))[1]  # (B, T, m)
    seen = []
    real = lm2_banks.F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((k.shape, k.detach().clone()))
        return real(q, k, v, **kw)

    monkeypatch.setattr(lm2_banks.F, "scaled_dot_product_attention", spy)
    out = mem.read(h, mem.state(bank0))
    # compute: the attention's keys are m*S slots per token, not K*S, and they are the chosen banks' keys
    (shape, keys), = seen
    assert shape == (2, 4, T, m * S, 8)
    _, k_all, _ = mem.state(bank0)
    for b in range(2):
        for t in range(T):
            want = torch.cat([k_all[b, :, j * S:(j + 1) * S] for j in chosen[b, t].tolist()], dim=1)
            assert torch.equal(keys[b, :, t], want)
    # gradient: only the chosen banks' slots receive one (per row: each row has its own bank state)
    out.square().sum().backward()
    for b in range(2):
        used = set(chosen[b].flatten().tolist())
        assert len(used) < K
        for j in range(K):
            assert (bank0.grad[b, j * S:(j + 1) * S].abs().sum() > 0) == (j in used), (b, j)


def test_routed_read_equals_masked_dense_read():
    mem, h, bank0 = routed_setup(4, 3, 2)
    state = mem.state(bank0)
    read, _ = mem.slot_weights(h, state)  # nonzero exactly on the chosen banks' slots
    qd = mem.q_proj(h)
    s = mem._heads(qd) @ state[1].transpose(-1, -2) / 8 ** 0.5
    mask = read > 0
    p = s.masked_fill(~mask[:, None], -torch.inf).softmax(-1)
    e = mem._merge(p @ state[2])
    ref = torch.sigmoid(mem.out_gate(e)) * e
    torch.testing.assert_close(mem.read(h, state), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("K, T", [(4, 9), (3, 40)])
def test_grouped_read_equals_gathered_read(K, T):
    """A segment of T >= K tokens at m = 1 is read grouped by bank (BankedMemory._grouped): the same values and
    gradients as the per-token gather, with groups of unequal sizes (padding rows) in every row."""
    mem, h, bank0 = routed_setup(K, 3, 1, T)
    h.requires_grad_(True)
    results = []
    for grouped in (True, False):
        state = mem.state(bank0)
        q = mem._heads(mem.q_proj(h))
        top = mem.route(mem.q_proj(h), state)[1]
        if grouped:
            e = mem._grouped(q, state[1], state[2], top)
        else:
            e = mem._merge(F.scaled_dot_product_attention(q.unsqueeze(3), mem._gather(state[1], top),
                                                          mem._gather(state[2], top)).squeeze(3))
        h.grad = bank0.grad = None
        e.square().sum().backward()
        results.append((e.detach(), h.grad.clone(), bank0.grad.clone()))
    for b in range(2):
        sizes = torch.bincount(top[b, :, 0], minlength=K)
        assert sizes.min() < sizes.max()
    for new, old in zip(*results):
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5)
    # and read() takes this path: it equals the masked dense read (test above) through the grouped one
    state = mem.state(bank0)
    e = mem._grouped(mem._heads(mem.q_proj(h)), state[1], state[2], mem.route(mem.q_proj(h), state)[1])
    assert torch.equal(mem.read(h, state), torch.sigmoid(mem.out_gate(e)) * e)


def test_write_goes_to_top_bank_only():
    mem, h, bank0 = routed_setup(4, 3, 1)
    new = mem.write(h, mem.state(bank0))[0]
    top = mem.route(mem.q_proj(h), mem.state(bank0))[1][..., 0]  # (B, T)
    for b in range(2):
        for j in range(4):
            same = torch.equal(new[b, j * 3:(j + 1) * 3], bank0[b, j * 3:(j + 1) * 3])
            assert same == (j not in top[b].tolist()), (b, j)


def test_all_banks_read_is_dense_read():
    mem, h, bank0 = routed_setup(4, 3, 4)
    state = mem.state(bank0)
    assert torch.equal(mem.read(h, state), lm2.Memory.read(mem, h, state))


@pytest.mark.parametrize("keys", ["learned", "cluster"])
def test_sleep_changes_only_lora(keys):
    model = trained_like(BankLM2(tiny(mem_banks=2, mem_slots=2, mem_top=1, mem_bank_keys=keys)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, 50, (2, 24))
    pos = torch.zeros(2, 24, dtype=torch.bool)
    pos[:, -4:] = True
    student = tokens.clone()
    student[:, :8] = 0
    with torch.no_grad():
        teacher = model(tokens)[pos].log_softmax(-1)
    batches = iter([(student, pos, teacher), (tokens, pos, teacher.argmax(-1))] * 2)  # KL and cross-entropy
    lm2_banks.sleep(model, batches, steps=4, rank=2)
    after = model.state_dict()
    lora = [k for k in after if ".lora_" in k]
    assert lora and all(".memory." not in k for k in lora)
    assert set(after) - set(lora) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert any(not torch.equal(after[k], torch.zeros_like(after[k])) for k in lora if k.endswith("lora_B"))


def test_token_access_shape_and_segments():
    model = trained_like(BankLM2(tiny(mem_banks=2, mem_slots=2, mem_top=1))).eval()
    tokens = torch.randint(0, 50, (2, 24))
    access = lm2_banks.token_access(model, tokens)
    assert access.shape == (2, 24)
    assert (access[:, :16] > 0).any() and (access[:, 16:] == 0).all()  # the last segment is never read back


def test_bad_top_is_one_line_error():
    with pytest.raises(ValueError, match="mem_top"):
        BankArgs(mem_banks=2, mem_top=3)


def test_bias_balancing_picks_banks_and_moves_towards_underloaded():
    mem, h, bank0 = routed_setup(4, 3, 1)
    p, top = mem.route(mem.q_proj(h), mem.state(bank0))
    mem.bank_bias[2] = 100.0  # picks bank 2 for every token, without changing the weights p
    p2, top2 = mem.route(mem.q_proj(h), mem.state(bank0))
    assert (top2 == 2).all() and torch.equal(p, p2)
    new = mem.write(h, mem.state(bank0))[0]
    for j in range(4):
        assert torch.equal(new[:, j * 3:(j + 1) * 3], bank0[:, j * 3:(j + 1) * 3]) == (j != 2)
    mem.eval()
    mem.read(h, mem.state(bank0))
    assert mem.load is None  # evaluation never moves the biases
    mem.train()
    mem.read(h, mem.state(bank0))
    assert mem.load.tolist() == [0, 0, 10, 0]
    mem.update_bias(0.5)
    assert mem.bank_bias.tolist() == [0.5, 0.5, 99.5, 0.5] and mem.load is None


def test_balance_loss_is_deepseek_sequence_wise_loss():
    model = trained_like(BankLM2(tiny(mem_banks=4, mem_slots=2, mem_top=2, mem_aux_alpha=0.1, mem_layers=(1,))))
    tokens = torch.randint(0, 50, (2, 24))
    model.eval()
    model(tokens)
    assert model.extra_loss() == 0.0  # evaluation adds no loss
    model.train()
    model(tokens)
    mem, = model.banked()
    assert len(mem.aux_losses) == 3  # one per segment read
    _, traced = lm2_banks.trace_memory(model.eval(), tokens)
    want = []
    for h, state in traced[0][1]:
        p, top = mem.route(mem.q_proj(h), state)
        f = torch.stack([(top == k).any(-1).float().mean(1) * 4 / 2 for k in range(4)], -1)  # (B, K)
        want.append(0.1 * (f * p.mean(1)).sum(-1).mean())
    model.train()
    model(tokens)
    loss = model.extra_loss()
    torch.testing.assert_close(loss, torch.stack(want).mean())
    loss.backward()
    assert mem.bank_keys.grad.abs().sum() > 0


def test_mean_keys_route_by_the_reads_own_scores():
    args = tiny(mem_banks=4, mem_slots=3, mem_top=1, mem_bank_keys="mean")
    torch.manual_seed(0)
    mem = trained_like(BankedMemory(args))
    assert not hasattr(mem, "bank_keys")
    h, bank0 = torch.randn(2, 5, 32), torch.randn(2, 12, 32)
    state = mem.state(bank0)
    qd = mem.q_proj(h)
    s = (mem._heads(qd) @ state[1].transpose(-1, -2)).sum(1)  # (B, T, N) read scores summed over heads, unscaled
    want = s.view(2, 5, 4, 3).mean(-1) / 32 ** 0.5
    torch.testing.assert_close(mem.bank_scores(qd, state), want, rtol=1e-5, atol=1e-5)


def test_route_distillation_targets_the_dense_mass_per_bank():
    args = tiny(mem_banks=4, mem_slots=3, mem_top=1, mem_route_distill=1.0)
    _, h, bank0 = routed_setup(4, 3, 1)
    mem = trained_like(BankedMemory(args)).train()
    state = mem.state(bank0)
    q = mem._heads(mem.q_proj(h)).unsqueeze(3)
    mass = mem.bank_mass(q, state[1])
    dense = (q.squeeze(3) @ state[1].transpose(-1, -2) / 8 ** 0.5).softmax(-1).mean(1)  # (B, T, N)
    torch.testing.assert_close(mass, dense.view(2, 5, 4, 3).sum(-1))
    mem.read(h, state)
    (loss,) = mem.aux_losses
    p, _ = mem.route(mem.q_proj(h), state)
    torch.testing.assert_close(loss, -(mass * p.log()).sum(-1).mean())
    loss.backward()
    assert mem.bank_keys.grad.abs().sum() > 0


def progressive_pair(K, S, m, threshold, T=5):
    """A progressive memory (mem_top = m, threshold) and the plain routed top-m memory, with the same weights."""
    mem, h, bank0 = routed_setup(K, S, m, T)
    prog = BankedMemory(tiny(mem_banks=K, mem_slots=S, mem_top=m, mem_progressive_threshold=threshold))
    prog.load_state_dict(mem.state_dict())
    return prog, mem, h, bank0


def test_progressive_threshold_zero_is_top_one_read():
    prog, _, h, bank0 = progressive_pair(4, 3, 3, 0.0)
    one = BankedMemory(tiny(mem_banks=4, mem_slots=3, mem_top=1))
    one.load_state_dict(prog.state_dict())
    torch.testing.assert_close(prog.read(h, prog.state(bank0)), one.read(h, one.state(bank0)), rtol=1e-5, atol=1e-6)
    assert prog.banks_read() == 1.0
    args = tiny(mem_banks=4, mem_slots=3, mem_top=3, mem_progressive_threshold=0.0)
    assert lm2_banks.read_flops_per_token(args, 1.0) == 4 * 3 * 32 + 2 * 4 * 32  # one bank of S d-vectors, routing
    assert lm2_banks.read_flops_per_token(args) == 4 * 9 * 32 + 2 * 4 * 32  # unmeasured: all mem_top banks


@pytest.mark.parametrize("K", [4, 3])  # K = m: progressive still routes (the plain m = K read is the dense one)
def test_progressive_threshold_above_one_is_top_m_read(K):
    prog, plain, h, bank0 = progressive_pair(K, 3, 3, 1.5)
    b1 = bank0.detach().clone().requires_grad_()
    out = prog.read(h, prog.state(bank0))
    want = plain.read(h, plain.state(b1))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    assert prog.banks_read() == 3.0
    out.square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(bank0.grad, b1.grad, rtol=1e-4, atol=1e-5)


def test_progressive_read_stops_confident_tokens():
    K, S, T = 8, 3, 3  # three tokens reach at most 6 < K banks of a row
    one, h, bank0 = routed_setup(K, S, 1, T)
    two = BankedMemory(tiny(mem_banks=K, mem_slots=S, mem_top=2))
    two.load_state_dict(one.state_dict())
    state = one.state(bank0)
    # each token's largest attention weight per head over its top bank's slots, head-averaged
    qd = one.q_proj(h)
    top = one.route(qd, state)[1]  # (B, T, 1)
    s = one._heads(qd) @ state[1].transpose(-1, -2) / 8 ** 0.5  # (B, heads, T, N)
    in_top = (torch.arange(K * S) // S == top)[:, None]  # (B, 1, T, N)
    best = s.masked_fill(~in_top, -torch.inf).softmax(-1).amax(-1).mean(1)  # (B, T)
    low = best.flatten().sort().values
    threshold = (low[0] + low[1]).item() / 2  # the least confident token reads deeper
    deeper = best < threshold  # (B, T): these read a second bank
    assert deeper.sum() == 1
    prog = BankedMemory(tiny(mem_banks=K, mem_slots=S, mem_top=2, mem_progressive_threshold=threshold))
    prog.load_state_dict(one.state_dict())
    out = prog.read(h, prog.state(bank0))
    want = torch.where(deeper[..., None], two.read(h, two.state(bank0)), one.read(h, state))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    assert prog.banks_read() == pytest.approx(1 + deeper.float().mean().item())
    # gradient: only the banks actually read receive one; a stopped token's second bank is not read
    banks2 = two.route(qd, state)[1]  # (B, T, 2)
    out.square().sum().backward()
    skipped = 0
    for b in range(2):
        used = {banks2[b, t, j].item() for t in range(T) for j in range(1 + int(deeper[b, t]))}
        skipped += len({banks2[b, t, 1].item() for t in range(T) if not deeper[b, t]} - used)
        for j in range(K):
            assert (bank0.grad[b, j * S:(j + 1) * S].abs().sum() > 0) == (j in used), (b, j)
    assert skipped > 0  # the test sees a bank that only a stopped token would have read


def test_progressive_needs_room_to_grow():
    with pytest.raises(ValueError, match="mem_top >= 2"):
        BankArgs(mem_banks=4, mem_top=1, mem_progressive_threshold=0.5)


def test_cluster_router_is_the_nearest_centroid_whatever_the_memory_holds():
    mem, h, bank0 = routed_setup(4, 3, 1, keys="cluster")
    assert not hasattr(mem, "bank_keys") and "centroids" in dict(mem.named_buffers())
    qd = mem.q_proj(h)
    want = (F.normalize(qd, dim=-1) @ mem.centroids.T).argmax(-1)  # (B, T): the nearest centroid by cosine
    for state in (mem.state(bank0), mem.initial_state(2), mem.write(h, mem.state(bank0))):
        assert torch.equal(mem.route(qd, state)[1][..., 0], want)  # a write does not move a later read's bank
    new = mem.write(h, mem.state(bank0))[0]
    for b in range(2):
        for j in range(4):
            assert torch.equal(new[b, j * 3:(j + 1) * 3], bank0[b, j * 3:(j + 1) * 3]) == (j not in want[b].tolist())
    out = mem.read(h, mem.state(bank0))
    out.sum().backward()
    assert mem.q_proj.weight.grad is not None and not any(b.requires_grad for b in mem.buffers())


def test_cluster_router_error_names_the_fix():
    with pytest.raises(ValueError, match="mem_aux_alpha and mem_route_distill"):
        BankArgs(mem_banks=4, mem_bank_keys="cluster", mem_aux_alpha=0.01)


def test_balanced_assignment_gives_every_bank_its_share():
    torch.manual_seed(0)
    scores = 0.2 * torch.randn(64, 4) + torch.tensor([0.5, 0.0, 0.0, 0.0])  # cosines; most queries prefer bank 0
    assert (scores.argmax(1) == 0).sum() > 48
    a = lm2_banks.balanced_assignment(scores)
    torch.testing.assert_close(a.sum(1), torch.ones(64))
    torch.testing.assert_close(a.sum(0), torch.full((4,), 16.0), rtol=0.02, atol=0.0)
    assert (a.argmax(1) == 0).sum() < 24


def test_update_centroids_spreads_the_banks_over_the_queries():
    """Two groups of queries, both centroids start near the first group: the k-means steps give each group its
    own bank, and keep the centroids on the unit sphere."""
    args = tiny(mem_banks=2, mem_slots=3, mem_top=1, mem_bank_keys="cluster")
    model = BankLM2(replace(args, mem_layers=(1,)))
    mem, = model.banked()
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(2, 32), dim=-1)
    groups = torch.stack([a + 0.05 * torch.randn(20, 32), b + 0.05 * torch.randn(20, 32)])  # (2, 20, d)
    with torch.no_grad():
        mem.q_proj.weight.copy_(torch.eye(32))  # queries = the inputs
        mem.centroids.copy_(F.normalize(torch.stack([a + 0.1 * b, a - 0.1 * b]), dim=-1))

    def separated():
        top = mem.route(groups, None)[1][..., 0]  # (2, 20)
        return bool((top[0] == top[0, 0]).all() and (top[1] == top[1, 0]).all() and top[0, 0] != top[1, 0])

    assert not separated()
    mem.train()
    for _ in range(20):
        mem.assign(groups.reshape(1, 40, 32))
        model.update_centroids(0.5)
    torch.testing.assert_close(mem.centroids.norm(dim=-1), torch.ones(2))
    assert separated()
    model.update_centroids(0.5)  # nothing read since: the centroids stay
    assert mem.centroid_sum is None


def test_write_shift_stores_a_token_where_its_predecessor_reads():
    mem, h, bank0 = routed_setup(4, 3, 1, T=6)
    shifted = BankedMemory(tiny(mem_banks=4, mem_slots=3, mem_top=1, mem_write_shift=True))
    shifted.load_state_dict(mem.state_dict())
    state = mem.state(bank0)
    top = mem.route(mem.q_proj(h), state)[1][..., 0]  # (B, T): the bank each token reads
    want = torch.cat([top[:, :1], top[:, :-1]], dim=1)  # token t goes where t - 1 reads; the first keeps its own
    assert not torch.equal(want, top)  # the test sees a token whose write moves
    assert torch.equal(shifted.write_banks(shifted.q_proj(h), state), want)
    new = shifted.write(h, state)[0]
    for b in range(2):
        for j in range(4):
            assert torch.equal(new[b, j * 3:(j + 1) * 3], bank0[b, j * 3:(j + 1) * 3]) == (j not in want[b].tolist())
    # the write's attention: each token's share goes only to the slots of the bank it is written to
    write = shifted.slot_weights(h, state)[1]  # (B, N, T)
    assert torch.equal(write > 0, (torch.arange(12) // 3)[None, :, None] == want[:, None, :])
    torch.testing.assert_close(shifted.read(h, state), mem.read(h, state))  # the read is unchanged


def test_slot_shift_addresses_a_tokens_write_with_its_predecessors_query():
    """With one bank the slot shift is the write shift without banks: slot i is written by softmax over tokens of
    s[t - 1, i] (the predecessor's query against the slot's key) times h_t, the gates as lm2.py's write."""
    args = tiny(mem_banks=1, mem_slots=4, mem_top=1, mem_shift_slots=True)
    torch.manual_seed(0)
    mem = trained_like(BankedMemory(args))
    bank0, h = torch.randn(2, 4, 32), torch.randn(2, 6, 32)
    state = mem.state(bank0)
    qd = mem.q_proj(h)
    prev = torch.cat([qd[:, :1], qd[:, :-1]], dim=1)
    e = mem._merge(F.scaled_dot_product_attention(state[1], mem._heads(prev), mem._heads(h)))
    want = torch.sigmoid(mem.in_gate(e)) * torch.tanh(e) + torch.sigmoid(mem.forget_gate(e)) * bank0
    torch.testing.assert_close(mem.write(h, state)[0], want)
    plain = BankedMemory(replace(args, mem_shift_slots=False))
    plain.load_state_dict(mem.state_dict())
    assert not torch.allclose(plain.write(h, state)[0], want)  # the shift changes the write...
    torch.testing.assert_close(plain.write(h, state)[0], lm2.Memory.write(plain, h, state)[0])
    torch.testing.assert_close(mem.read(h, state), plain.read(h, state))  # ...and never the read
    # the analysis weights follow the shifted write: a slot's write shares are softmax over t of s[t - 1, i]
    write = mem.slot_weights(h, state)[1]  # (B, N, T)
    s = mem._heads(prev) @ state[1].transpose(-1, -2) / math.sqrt(state[1].shape[-1])  # (B, heads, T, N)
    torch.testing.assert_close(write, s.softmax(-2).mean(1).transpose(1, 2))


def test_slot_shift_with_banks_keeps_the_bank_choice():
    mem, h, bank0 = routed_setup(4, 3, 1, T=6)
    shifted = BankedMemory(tiny(mem_banks=4, mem_slots=3, mem_top=1, mem_shift_slots=True))
    shifted.load_state_dict(mem.state_dict())
    state = mem.state(bank0)
    assert torch.equal(shifted.write_banks(shifted.q_proj(h), state), mem.write_banks(mem.q_proj(h), state))
    changed = ~torch.isclose(shifted.write(h, state)[0], mem.write(h, state)[0]).all(-1)  # (B, N) slots
    touched = (torch.arange(12) // 3)[None, :] == mem.write_banks(mem.q_proj(h), state)[:, :, None]  # (B, T, N)
    assert changed.any() and not (changed & ~touched.any(1)).any()  # only slots of the banks written to move


def load_benchmark():
    import importlib.util
    spec = importlib.util.spec_from_file_location("lm2_banks_sleep", Path(__file__).resolve().parents[1]
                                                  / "benchmarks" / "lm2_banks_sleep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_decoys_recur_as_often_as_the_frequent_entities_and_are_never_asked():
    bench = load_benchmark()
    frequent, decoy, others, wake = bench.wake_world(7, decoys=16)
    assert len(frequent) == len(decoy) == 16 and not set(frequent) & set(decoy)
    assert not (set(frequent) | set(decoy)) & set(others)
    stated = lambda group: sum(e in group for facts, _ in wake for e in facts)  # noqa: E731
    assert stated(frequent) == stated(decoy) == 2 * len(wake)
    for facts, asked in wake:
        assert len(asked) == bench.N_Q and set(asked) <= set(facts) and not set(asked) & set(decoy)
        assert len(facts) == 10 and all(facts[e] == decoy[e] for e in facts if e in decoy)
    # without decoys, every stated fact is asked; the count finds the frequent entities (2 per episode, ~32 each)
    frequent, decoy, others, wake = bench.wake_world(7)
    assert not decoy and all(set(asked) == set(facts) for facts, asked in wake)
    assert set(bench.rank_by_count(wake, 7)[:16]) == set(frequent)


def test_count_ranking_orders_by_occurrences_and_breaks_ties_by_seed():
    bench = load_benchmark()
    wake = [({(0, 0): 1, (0, 1): 1, (0, 2): 1}, []), ({(0, 0): 1, (0, 3): 1}, []), ({(0, 0): 1, (0, 1): 1}, [])]
    ranks = [bench.rank_by_count(wake, seed) for seed in range(20)]
    assert all(r[:2] == [(0, 0), (0, 1)] and set(r[2:]) == {(0, 2), (0, 3)} for r in ranks)
    assert len({tuple(r) for r in ranks}) == 2  # the tie between (0, 2) and (0, 3) goes either way


def test_benchmark_resumes_its_seeds_refuses_other_settings_and_needs_no_matplotlib(tmp_path, monkeypatch, capsys):
    bench = load_benchmark()
    real_import = __import__

    def no_matplotlib(name, *args, **kw):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kw)

    monkeypatch.setattr("builtins.__import__", no_matplotlib)
    kw = dict(out_dir=str(tmp_path / "run"), models="none", steps=10, n_eval=8, seeds=[1, 2])
    bench.main(**kw)
    text = capsys.readouterr().out
    assert "| none | 0 |" in text and text.strip().splitlines()[-1].startswith("matplotlib is not installed")
    saved = {p.name for p in (tmp_path / "run").iterdir()}
    assert saved == {"seed_1", "seed_2", "summary.json"}
    monkeypatch.setattr(bench, "train", lambda *a, **k: pytest.fail("a finished seed was trained again"))
    bench.main(**kw)
    assert "| none | 0 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="other settings"):
        bench.main(**dict(kw, steps=11))
