"""
LM2 extended: memory banks that a token activates by relevance, and a sleep phase that moves what the memory
holds into the weights (LoRA). Built on lm2.py, whose single dense bank per block stays the paper-faithful
default; this file subclasses its `Memory` and model and changes nothing there.

The two ideas come from the LM2 fork this collection descends from (hierarchical / multiple memory modules,
and a sleep phase beside short-term memory (the context) and long-term memory (the weights));
benchmarks/lm2_banks_sleep.py measures them (docs/lm2_banks_results.md).

Banks (`BankedMemory`): the block's N = K * S slots are K banks of S slots. Each bank has a key b_k (d):
learned, or the mean of its slots' keys W_K M_i in the current state (mem_bank_keys = "mean": content-addressed). A token's memory query q_t = h_t W_Q scores the banks, r[t, k] = q_t . b_k / sqrt(d),
and
- reads only the slots of its top-m banks (the paper's read restricted to m * S slots, one softmax over them),
  so a read costs 4 m S d + 2 K d FLOPs instead of 4 K S d (scores and weighted sum, plus routing). A segment
  of T >= K tokens at m = 1 is read grouped by bank (`_grouped`: one batched attention over the (row, bank)
  groups, padded to the fullest; the padding also scores unchosen banks, which get no gradient), not gathered
  per token: about 3x the dense read's time per token at d = 64 instead of 10x (docs/lm2_banks_results.md);
- is written, at the end of the segment, only into its top bank: slot i of bank k attends over the tokens
  routed to k (the slot-indexed write of lm2.py with a mask). A bank no token was routed to keeps its state,
  so it does not decay while other banks are written.
Routing is a hard top-m, so the read's output is multiplied by p / stopgrad(p) (p the softmax of r over the
banks, summed over the chosen ones): its value is exactly 1, its gradient d log p moves the bank keys
towards banks whose read lowered the loss (a straight-through gate; Switch Transformer multiplies by p itself,
which would also scale the output by ~1/K at the start). Reading all banks (m = K) is the dense read of
lm2.py, and one bank (K = 1, m = 1) is exactly lm2.py's memory.
That gate only reinforces banks already chosen, and the router collapses onto one or two banks. Three remedies,
each optional and measured in benchmarks/lm2_banks_sleep.py (docs/lm2_banks_results.md): DeepSeek-V3's
bias balancing as nanollm.py does it (a bias buffer that picks banks but never weighs them, moved after each
optimizer step towards underloaded banks: `update_router_biases`); its sequence-wise balance loss
(mem_aux_alpha, through `extra_loss`, finetune.py's hook); and a distillation loss (mem_route_distill) that
trains p towards the dense read's attention mass per bank, the one signal that names the bank holding the
matching slot (it costs the dense scores, in training only).
A third kind of bank key has no weights and cannot collapse (mem_bank_keys = "cluster", after the Routing Transformer,
Roy et al. 2021): the bank keys are K unit centroids c_k, a token goes to the bank whose centroid is nearest its
normalised query q_t / |q_t| (cosine), for the read and the write alike, and after each optimizer step
(`update_centroids`) the centroids move towards the queries of the training reads, shared among the banks by a
balanced assignment (Sinkhorn-Knopp, as SwAV; BASE layers balance their assignment the same way), so the banks
stay equally used. The centroids are fixed during a forward, so the same query reaches the same bank whatever
the memory holds (mean keys move with every write). Nothing trains the route: it follows the geometry of
W_Q that the read learns, and needs the question and its fact's tokens to lie near each other there
(benchmarks/lm2_banks_sleep.py measures whether they do). Without update_centroids the centroids stay random:
an angular LSH of q (a token goes to the nearest of K random directions). In the benchmark both spread the
writes and routed a question to its fact's bank at chance (docs/lm2_banks_results.md, round 3).
Write shift (mem_write_shift, off by default): token t is written to the bank that token t - 1 reads, the one
its predecessor's query, which predicts t, looks in; the read is unchanged. A question "D k ?" then reads the
bank its position routes to, and the fact's value v was stored where the fact's own "D k" position routed: two
tokens of the same kind in the same role, where without the shift a key token's query must find the bank
chosen by a value token's (kNN-LM, Khandelwal et al. 2020, keys a stored token by the context before it too).
In the benchmark it made the learned router consistent and the banked memory recall more than the dense bank.
Slot shift (mem_shift_slots, off by default): within the bank, token t's write is addressed by token t - 1's
query too (the write's scores s[t - 1, i] instead of s[t, i]). With one bank it is the only shift there is: the
dense memory with the write shift and no banks, the control that tells the shift's gain from the banks'.
Departures and limits: the write computes the masked scores of all K S slots against the segment's tokens
(4 K S d FLOPs per token once per segment, as the dense write) instead of grouping tokens by bank; mean bank
keys are recomputed at every read (N d FLOPs per read call: per token when decoding; lm2.py keeps whatever
Memory.write returns as a block's decoding state, so they could be kept beside the bank's keys); with mean
keys the routing softmax sends gradient to every bank's slots, not only the chosen ones.
Progressive read (mem_progressive_threshold, off by default): a token reads its top bank,
and adds its next bank, up to mem_top, only while its best read attention (its largest softmax weight over
the slots read so far, head-averaged) is below the threshold: a confident read stops after one bank, an
unsure one looks deeper. Threshold 0 is the m = 1 read, above 1 the top-m read. The stop is not
differentiable (the threshold is a fixed knob); the balance loss counts all mem_top banks as read.

Sleep (`sleep`): freeze the model, add LoRA adapters (finetune.py's `apply_lora`), and train them so that
the model on a "student" input (the episode with the facts to consolidate removed: the memory never holds
them) gives, at the given positions, what the model with its memory answered: a KL divergence to the full
output distribution of a frozen copy, or a cross-entropy on an answer token (benchmarks/lm2_banks_sleep.py
takes the memory's consensus answer per entity, its most probable answer averaged over the episodes that
state it: one episode's answer of a memory that recalls a third of its facts is mostly noise). The caller
interleaves replay batches (student input = teacher input, memory on), so that what the memory does on
ordinary episodes is kept. What to consolidate is chosen by `token_access`: how much read attention the slots
a token wrote to received later in the sequence (the read and write share one score, so a slot's content is
attributed to the tokens of the segment by the write's softmax; the later rewrites of a slot are ignored).

Run: python benchmarks/lm2_banks_sleep.py  (trains small models from scratch; prints both tables)
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from finetune import apply_lora
from lm2 import Memory, ModelArgs
from lm2 import LM2 as LM2Model  # the one place that names lm2.py's model class


@dataclass
class BankArgs(ModelArgs):
    """lm2.ModelArgs plus banks; mem_slots is the number of slots per bank (S), so a block has K * S."""
    mem_banks: int = 1                  # K banks per memory block
    mem_top: int = 1                    # m: a token reads its m most relevant banks (m = K: the dense read)
    mem_bank_keys: str = "learned"      # "learned": a key per bank; "mean": the mean of its slots' keys W_K M_i;
                                        # "cluster": unit centroids moved by balanced k-means (update_centroids)
    mem_route_distill: float = 0.0      # weight of the router's loss towards the dense read's mass per bank
    mem_aux_alpha: float = 0.0          # weight of the routing balance loss (Switch / DeepSeek-V3 eq. 17); 0: off
    mem_progressive_threshold: float | None = None  # read banks 1..mem_top while best attention < this; None: off
    mem_write_shift: bool = False       # write token t to the top bank of token t - 1 (the query that predicted t)
    mem_shift_slots: bool = False       # and address its slots with token t - 1's query too (with K = 1: the
                                        # only shift a single bank has)

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.mem_top <= self.mem_banks:
            raise ValueError(f"need 1 <= mem_top <= mem_banks, got mem_top={self.mem_top}, mem_banks={self.mem_banks}")
        if self.mem_bank_keys not in ("learned", "mean", "cluster"):
            raise ValueError(f"mem_bank_keys must be 'learned', 'mean' or 'cluster', got {self.mem_bank_keys!r}")
        if self.mem_bank_keys == "cluster" and (self.mem_aux_alpha or self.mem_route_distill):
            raise ValueError("the cluster router has no weights for a routing loss to train: set mem_aux_alpha and "
                             "mem_route_distill to 0, or use learned or mean bank keys")
        if self.mem_progressive_threshold is not None and self.mem_top < 2:
            raise ValueError("a progressive read needs mem_top >= 2 (the most banks a token may read), got mem_top=1")


def read_flops_per_token(args: BankArgs, banks_read: float | None = None) -> float:
    """Multiply-adds x 2 of one token's memory read in one block, past the projections every variant shares
    (W_Q on the token, the output gate): scores and weighted sum over the slots read, plus routing.
    banks_read: the mean number of banks a token read (a progressive read's, measured: BankedMemory.banks_read);
    None: mem_top."""
    slots = (args.mem_top if banks_read is None else banks_read) * args.mem_slots
    routed = args.mem_top < args.mem_banks or args.mem_progressive_threshold is not None
    return 4 * slots * args.dim + (2 * args.mem_banks * args.dim if routed else 0)


def balanced_assignment(scores, eps: float = 0.05, iters: int = 10):
    """Sinkhorn-Knopp as SwAV (Caron et al. 2020) uses it: a soft assignment (n, K) of n queries to K banks, close
    to softmax(scores / eps) per query, rescaled in turn so that every bank receives n / K and every query gives
    1 (SwAV's 3 rounds leave banks 10-30% off their share at these sizes; 10 rounds, about 1%). Balancing the
    k-means (BASE layers, Lewis et al. 2021, balance their assignment too) keeps every centroid among the
    queries; in a plain k-means step a centroid that no query is nearest to never moves."""
    a = ((scores - scores.max()) / eps).exp()
    for _ in range(iters):
        a = a / a.sum(0, keepdim=True) * (a.shape[0] / a.shape[1])  # every bank receives n / K
        a = a / a.sum(1, keepdim=True)  # every query gives 1
    return a


class BankedMemory(Memory):
    """lm2.Memory whose K * S slots form K banks; a token reads its top-m banks and writes to its top bank."""
    def __init__(self, args: BankArgs):
        super().__init__(replace(args, mem_slots=args.mem_banks * args.mem_slots))
        self.n_banks, self.bank_slots, self.top = args.mem_banks, args.mem_slots, args.mem_top
        self.threshold, self.write_shift = args.mem_progressive_threshold, args.mem_write_shift
        self.shift_slots = args.mem_shift_slots
        self.dense = self.top == self.n_banks and self.threshold is None  # every bank read: lm2.py's read
        self.reads = [0, 0]  # progressive reads since banks_read last reset them: banks read, tokens
        self.mean_keys, self.cluster = args.mem_bank_keys == "mean", args.mem_bank_keys == "cluster"
        if self.cluster:
            # a buffer, not a parameter: update_centroids moves it (balanced k-means), gradients never do
            self.register_buffer("centroids", F.normalize(torch.randn(args.mem_banks, args.dim), dim=-1))
            self.centroid_sum = None  # (K, d) balanced sums of the training reads' queries since update_centroids
        elif not self.mean_keys:
            self.bank_keys = nn.Parameter(torch.empty(args.mem_banks, args.dim))
            # unit-scale keys: distinct tokens spread over the banks from the start (0.02 would leave p ~ 1/K flat)
            nn.init.normal_(self.bank_keys)
        # a buffer, not a parameter (as nanollm.py's e_score_correction_bias): update_bias moves it towards
        # underloaded banks, gradients never do; it only picks the banks, never weighs them
        self.register_buffer("bank_bias", torch.zeros(args.mem_banks))
        self.aux_alpha, self.distill = args.mem_aux_alpha, args.mem_route_distill
        self.load = None       # (K,) tokens whose top bank was k, in training reads since the last update_bias
        self.aux_losses = []   # the routing losses of each training read since the model's forward began

    def bank_scores(self, q, state):
        """Routing scores r (B, T, K) of memory queries q = h W_Q (B, T, d) against the bank keys: learned, or
        the mean of each bank's slot keys in state (content-addressed: r is then, up to a constant, the mean over
        the bank's slots of the read's own scores summed over heads, so training the read trains the routing), or
        cluster centroids c_k (cosine: normalised q . c_k)."""
        if self.cluster:
            return F.normalize(q, dim=-1) @ self.centroids.T
        if self.mean_keys:
            k = state[1]  # (B, heads, N, hd)
            B, H, _, hd = k.shape
            keys = k.reshape(B, H, self.n_banks, self.bank_slots, hd).mean(3).transpose(1, 2).reshape(B, self.n_banks, -1)
        else:
            keys = self.bank_keys  # (K, d)
        return q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])

    def route(self, qd, state):
        """Bank probabilities p (B, T, K), the softmax of the scores, and the m banks each token reads (B, T, m),
        best first: the first is the bank it writes to. Chosen by score + bank_bias (DeepSeek-V3 §2.1.2)."""
        r = self.bank_scores(qd, state)
        return r.softmax(-1), (r + self.bank_bias).topk(self.top, dim=-1).indices

    def write_banks(self, qd, state):
        """The bank each token is written to (B, T): its top bank, or with mem_write_shift its predecessor's (a
        segment's first token keeps its own: the previous segment's queries are gone)."""
        top = self.route(qd, state)[1][..., 0]
        return torch.cat([top[:, :1], top[:, :-1]], dim=1) if self.write_shift else top

    def write_queries(self, qd):
        """The queries (B, T, d) that address a token's write among the slots: its own, or with mem_shift_slots
        its predecessor's (a segment's first token keeps its own)."""
        return torch.cat([qd[:, :1], qd[:, :-1]], dim=1) if self.shift_slots else qd

    def state(self, bank):
        bank, k, v = super().state(bank)
        if self.dense:
            return bank, k, v
        # subtle: _heads gives transposed views; a routed read would copy the whole bank (all K banks) to
        # gather from them, on every read. Made contiguous here, once per write, the gather touches m*S slots.
        return bank, k.contiguous(), v.contiguous()

    def _gather(self, x, top):
        """Slots of the chosen banks per token: x (B, heads, K*S, hd), top (B, T, m) -> (B, heads, T, m*S, hd).
        A gather, so the other banks are neither touched nor given a gradient."""
        B, H, _, hd = x.shape
        T, m = top.shape[1:]
        banks = x.view(B, H, self.n_banks, self.bank_slots * hd)  # a view: x is contiguous (see state)
        idx = top.reshape(B, 1, T * m, 1).expand(B, H, T * m, self.bank_slots * hd)
        return banks.gather(2, idx).view(B, H, T, m * self.bank_slots, hd)

    def _grouped(self, q, k, v, top):
        """The m = 1 read grouped by bank, as nanollm.py's MoE dispatch groups tokens by expert: the tokens of a
        row that chose the same bank form a group, padded to the fullest group's size (cap), and one batched
        attention reads every group's queries against its bank's S slots, seen in place (no copy of any bank).
        q (B, heads, T, hd), k, v (B, heads, N, hd), top (B, T, 1) -> (B, T, d), as the gather's read.
        subtle: the padding rows are zero queries; they cost 4 S d FLOPs each (K * cap rows per row of the
        batch, against T tokens: ~2.5x the tokens' own work for random routes at K = 8, T = 32, more if the
        routes crowd one bank) and are dropped, so a bank no token chose is computed but gets no gradient."""
        B, H, T, hd = q.shape
        K, S = self.n_banks, self.bank_slots
        group = (torch.arange(B, device=q.device)[:, None] * K + top[..., 0]).flatten()  # (B*T,): (row, bank)
        size = torch.bincount(group, minlength=B * K)
        # a token's place in its group: its rank among the group's tokens (a stable sort keeps them in order)
        order = group.argsort(stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(B * T, device=q.device) - (size.cumsum(0) - size)[group[order]]
        cap = int(size.max())
        row = group * cap + rank  # (B*T,): each token's row among the B * K * cap padded query rows
        queries = q.new_zeros(B * K * cap, H, hd).index_copy(0, row, q.transpose(1, 2).reshape(B * T, H, hd))
        queries = queries.view(B, K, cap, H, hd).permute(0, 3, 1, 2, 4)  # (B, heads, K, cap, hd)
        k, v = k.view(B, H, K, S, hd), v.view(B, H, K, S, hd)  # views: k, v are contiguous (see state)
        s = queries @ k.transpose(-1, -2) / math.sqrt(hd)  # (B, heads, K, cap, S)
        e = (s.softmax(-1) @ v).permute(0, 2, 3, 1, 4)  # (B, K, cap, heads, hd)
        # back in token order, heads side by side as _merge
        return e.reshape(B * K * cap, H * hd).index_select(0, row).view(B, T, H * hd)

    def read(self, h, state, fresh=None):
        if self.dense:  # every bank is read: lm2.py's dense read, no routing
            return super().read(h, state, fresh)
        qd = self.q_proj(h)
        p, top = self.route(qd, state)  # (B, T, K), (B, T, m)
        q = self._heads(qd).unsqueeze(3)  # (B, heads, T, 1, hd): one query row per token, its own slots
        if fresh is not None and self.mean_keys:  # fresh tokens read the initial bank: route by its keys
            p0, top0 = self.route(qd, self.initial_state(h.shape[0]))
            p, top = torch.where(fresh[..., None], p0, p), torch.where(fresh[..., None], top0, top)
        if self.training:
            self.count(p, top, q, state, fresh)
            if self.cluster:
                self.assign(qd)

        def attend(k, v):
            if self.threshold is not None:
                e, n_read = self.progressive(q, k, v, top)
            else:
                # a segment of at least K tokens: the gather would copy each bank about T / K times per row and
                # attend with one query per matrix; with fewer tokens (decoding: one) the grouped read would be
                # mostly padding, computing every bank, so they keep the gather (and m > 1, one softmax over
                # the union of its banks)
                if self.top == 1 and q.shape[2] >= self.n_banks:
                    e = self._grouped(q.squeeze(3), k, v, top)
                else:
                    e = F.scaled_dot_product_attention(q, self._gather(k, top), self._gather(v, top))
                    e = self._merge(e.squeeze(3))
                n_read = torch.full(top.shape[:2], self.top, device=h.device)
            # e: (B, T, d), one softmax over the slots read
            return torch.sigmoid(self.out_gate(e)) * e, n_read

        out, n_read = attend(*state[1:])
        if fresh is not None:
            out0, n_read0 = attend(*self.initial_state(h.shape[0])[1:])
            out, n_read = torch.where(fresh[..., None], out0, out), torch.where(fresh, n_read0, n_read)
        if self.threshold is not None:
            self.reads = [self.reads[0] + n_read.sum().item(), self.reads[1] + n_read.numel()]
        if self.cluster:  # the routing has no weights: no gate to train
            return out
        # the gate averages over the banks read: value exactly 1, gradient to the bank keys
        p_top = p.gather(-1, top)
        was_read = torch.arange(self.top, device=h.device) < n_read[..., None]  # (B, T, m)
        gate = ((p_top / p_top.detach()) * was_read).sum(-1, keepdim=True) / n_read[..., None]
        return out * gate

    def progressive(self, q, k, v, top):
        """The progressive read: q (B, heads, T, 1, hd), the state's keys and values k, v (B, heads, N, hd), the
        banks top (B, T, m) best first. Round j reads bank j for the tokens still unsure, and folds it into one
        softmax over all the slots they read, incrementally (flash attention's running max and sum), so a
        bank costs 4 S d FLOPs once. A token's largest weight in head h is exp(max - max) / sum = 1 / sum.
        Returns the read (B, T, d), as the top-j read, and the banks each token read (B, T). Only the read
        banks are indexed: the others cost nothing and receive no gradient."""
        B, H, T, _, hd = q.shape
        q = q.squeeze(3).transpose(1, 2).reshape(B * T, H, hd)  # one row per token
        k, v = k.unflatten(2, (self.n_banks, self.bank_slots)), v.unflatten(2, (self.n_banks, self.bank_slots))
        top = top.reshape(B * T, self.top)
        row_batch = torch.arange(B * T, device=q.device) // T
        run_max = q.new_full((B * T, H), -torch.inf)
        run_sum = q.new_zeros(B * T, H)
        acc = q.new_zeros(B * T, H, hd)  # sum of exp(score - run_max) * value
        n_read = torch.zeros(B * T, dtype=torch.long, device=q.device)
        rows = torch.arange(B * T, device=q.device)  # tokens still reading
        for j in range(self.top):
            bank = top[rows, j]
            kj, vj = k[row_batch[rows], :, bank], v[row_batch[rows], :, bank]  # (n, heads, S, hd)
            s = (kj @ q[rows, :, :, None]).squeeze(-1) / math.sqrt(hd)  # (n, heads, S)
            new_max = torch.maximum(run_max[rows], s.amax(-1))
            w, old = (s - new_max[..., None]).exp(), (run_max[rows] - new_max).exp()
            run_max = run_max.index_put((rows,), new_max)
            run_sum = run_sum.index_put((rows,), old * run_sum[rows] + w.sum(-1))
            acc = acc.index_put((rows,), old[..., None] * acc[rows] + (w[:, :, None] @ vj).squeeze(2))
            n_read = n_read.index_put((rows,), n_read[rows] + 1)
            best = (1 / run_sum[rows]).mean(-1)  # head-averaged largest attention weight
            rows = rows[best.detach() < self.threshold]
            if len(rows) == 0:
                break
        e = (acc / run_sum[..., None]).reshape(B, T, H * hd)  # as _merge: heads side by side
        return e, n_read.view(B, T)

    def banks_read(self) -> float:
        """Mean banks a token read in the progressive reads since the last call (resets the count)."""
        mean = self.reads[0] / self.reads[1]
        self.reads = [0, 0]
        return mean

    def bank_mass(self, q, k):
        """The dense read's attention mass on each bank (B, T, K), head-averaged, for queries q (B, heads, T, 1,
        hd) against all K * S slot keys k (B, heads, N, hd): what a router that reads one bank should pick."""
        a = (q.squeeze(3) @ k.transpose(-1, -2) / math.sqrt(k.shape[-1])).softmax(-1).mean(1)  # (B, T, N)
        return a.view(*a.shape[:2], self.n_banks, self.bank_slots).sum(-1)

    def count(self, p, top, q, state, fresh):
        """Training reads: add each token's top bank to the load, and this read's routing losses:
        - balance (aux_alpha; DeepSeek-V3 eqs. 17-20 per sequence and segment): f_k = K / (m T) * #tokens
          reading k, P_k = mean over t of p_k, alpha * sum_k f_k P_k averaged over the batch (alpha when
          balanced, K alpha when collapsed);
        - distillation (distill): cross-entropy of p against the dense read's mass per bank, which puts the
          question on the bank holding the slot that matches it (the read's gate alone only reinforces the
          banks already chosen). It costs the dense read's scores, in training only."""
        with torch.no_grad():
            load = torch.bincount(top[..., 0].flatten(), minlength=self.n_banks)
            self.load = load if self.load is None else self.load + load
        loss = 0.0
        if self.aux_alpha > 0:
            B, T, K = p.shape
            f = torch.zeros_like(p).scatter(-1, top, 1.0).sum(1) * K / (self.top * T)  # (B, K)
            loss = loss + self.aux_alpha * (f * p.mean(1)).sum(-1).mean()
        if self.distill > 0:
            with torch.no_grad():
                target = self.bank_mass(q, state[1])
                if fresh is not None:
                    target = torch.where(fresh[..., None], self.bank_mass(q, self.initial_state(q.shape[0])[1]), target)
            loss = loss - self.distill * (target * p.clamp_min(1e-9).log()).sum(-1).mean()
        if torch.is_tensor(loss):
            self.aux_losses.append(loss)

    @torch.no_grad()
    def assign(self, qd):
        """Cluster router, training reads: add the memory queries qd (B, T, d), normalised, to the centroid sums,
        each query shared among the banks by a balanced assignment (every bank gets the same share)."""
        x = F.normalize(qd.flatten(0, 1), dim=-1)  # (n, d)
        s = balanced_assignment(x @ self.centroids.T).T @ x  # (K, d)
        self.centroid_sum = s if self.centroid_sum is None else self.centroid_sum + s

    @torch.no_grad()
    def update_centroids(self, decay: float):
        """Online k-means (Routing Transformer's): c_k <- normalise(decay c_k + (1 - decay) mean_k), mean_k the
        normalised mean of the queries assigned to bank k since the last call."""
        if self.centroid_sum is not None:
            mean = F.normalize(self.centroid_sum, dim=-1)
            self.centroids.copy_(F.normalize(decay * self.centroids + (1 - decay) * mean, dim=-1))
            self.centroid_sum = None

    @torch.no_grad()
    def update_bias(self, rate: float):
        """DeepSeek-V3 §2.1.2: lower the bias of overloaded banks by rate, raise it for underloaded ones."""
        if self.load is not None:
            self.bank_bias += rate * torch.sign(self.load.float().mean() - self.load)
            self.load = None

    def write(self, h, state, token_mask=None, fresh=None):
        if self.n_banks == 1 and not self.shift_slots:  # every token's top bank is the only one: lm2.py's write
            return super().write(h, state, token_mask, fresh)
        if fresh is not None:
            state = [torch.where(fresh.view(-1, *[1] * (t.dim() - 1)), t0, t)
                     for t0, t in zip(self.initial_state(h.shape[0]), state)]
        mem, k = state[0], state[1]
        qd = self.q_proj(h)
        slot_bank = torch.arange(mem.shape[1], device=h.device) // self.bank_slots  # (N,)
        allowed = self.write_banks(qd, state)[:, None, :] == slot_bank[None, :, None]  # (B, N, T)
        if token_mask is not None:
            allowed = allowed & token_mask[:, None, :]
        # subtle: a finite bias, not -inf: a bank no token chose has rows with every token masked, whose
        # softmax would be NaN (and its gradient too, even where torch.where drops the row below)
        bias = torch.zeros(allowed.shape, dtype=h.dtype, device=h.device).masked_fill(~allowed, -1e9)
        e = self._merge(F.scaled_dot_product_attention(k, self._heads(self.write_queries(qd)), self._heads(h),
                                                       attn_mask=bias[:, None]))
        new = torch.sigmoid(self.in_gate(e)) * torch.tanh(e) + torch.sigmoid(self.forget_gate(e)) * mem
        return self.state(torch.where(allowed.any(-1, keepdim=True), new, mem))

    @torch.no_grad()
    def slot_weights(self, h, state):
        """For analysis: (read, write), head-averaged. read (B, T, N): each token's attention over the slots
        (zero outside its banks); write (B, N, T): each token's share of each slot's write."""
        qd = self.q_proj(h)
        scale = math.sqrt(state[1].shape[-1])
        s = self._heads(qd) @ state[1].transpose(-1, -2) / scale  # (B, heads, T, N)
        s_write = self._heads(self.write_queries(qd)) @ state[1].transpose(-1, -2) / scale
        top = self.route(qd, state)[1]
        slot_bank = torch.arange(s.shape[-1], device=h.device) // self.bank_slots
        read_ok = (top[..., None] == slot_bank).any(-2)  # (B, T, N)
        write_ok = self.write_banks(qd, state)[..., None] == slot_bank
        read = s.masked_fill(~read_ok[:, None], -torch.inf).softmax(-1).mean(1)
        write = s_write.masked_fill(~write_ok[:, None], -torch.inf).softmax(-2).nan_to_num(0.0).mean(1)
        return read, write.transpose(1, 2)


class BankLM2(LM2Model):
    """lm2.py's model with a BankedMemory in every memory block (K = 1, m = 1: exactly lm2.py's)."""
    def __init__(self, args: BankArgs):
        super().__init__(args)
        for layer in self.model.layers:
            if layer.memory is not None:
                layer.memory = BankedMemory(args)

    def banked(self):
        return [l.memory for l in self.model.layers if isinstance(l.memory, BankedMemory)]

    def forward(self, tokens, doc_ids=None):
        for mem in self.banked():
            mem.aux_losses = []
        return super().forward(tokens, doc_ids)

    def extra_loss(self):
        """finetune.py's hook: the routing balance loss of the last training forward, mean over its reads and
        memory blocks (0.0 when off)."""
        losses = [l for mem in self.banked() for l in mem.aux_losses]
        return torch.stack(losses).mean() if losses else 0.0

    @torch.no_grad()
    def update_router_biases(self, rate: float = 1e-3) -> list[list[float]]:
        """Auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2), as nanollm.py's: call after each optimizer step.
        Returns, per memory block, the share of tokens whose top bank was each bank since the last call."""
        load = [(mem.load / mem.load.sum()).tolist() for mem in self.banked() if mem.load is not None]
        for mem in self.banked():
            mem.update_bias(rate)
        return load

    @torch.no_grad()
    def update_centroids(self, decay: float = 0.9):
        """The cluster router's k-means step (mem_bank_keys = "cluster"): call after each optimizer step;
        decay = 1 keeps the random centroids (angular LSH: a token goes to the nearest of K random directions)."""
        for mem in self.banked():
            if mem.cluster:
                mem.update_centroids(decay)


def trace_memory(model, tokens):
    """Run the model on tokens (B, T) and return its logits and, per memory block, the (h, state) of every
    segment's read, in order: the block's normed inputs and the memory state the segment read."""
    reads = {}
    mems = [l.memory for l in model.model.layers if l.memory is not None]
    for i, mem in enumerate(mems):
        def spy(h, state, fresh=None, _i=i, _read=mem.read):
            reads.setdefault(_i, []).append((h.detach(), tuple(t.detach() for t in state)))
            return _read(h, state, fresh)
        mem.read = spy  # instance attribute: shadows the method for this run only
    try:
        with torch.no_grad():
            logits = model(tokens)
    finally:
        for mem in mems:
            del mem.read
    return logits, [(mem, reads[i]) for i, mem in enumerate(mems)]


def token_access(model, tokens):
    """(B, T): for every token, the read attention that the slots it wrote to received from the tokens of
    all later segments, summed over memory blocks (a slot's content is shared among its writers by the write
    softmax; later rewrites of the slot are not followed)."""
    _, traced = trace_memory(model, tokens)
    S = model.args.segment_len
    access = torch.zeros(tokens.shape, dtype=torch.float)
    for mem, segs in traced:
        weights = [mem.slot_weights(h, state) for h, state in segs]
        for s, (_, write) in enumerate(weights[:-1]):  # the last segment is never written
            later = torch.cat([read for read, _ in weights[s + 1:]], dim=1).sum(1)  # (B, N) attention received
            access[:, s * S:s * S + write.shape[2]] += torch.einsum("bn,bnt->bt", later, write).float()
    return access


def sleep(model, batches, steps: int, rank: int = 8, alpha: float = 16.0, lr: float = 3e-3,
          targets=("gate_proj", "up_proj", "down_proj", "o_proj")):
    """Consolidate into LoRA adapters: freeze the model, add adapters to the linears named in targets (the
    defaults exclude the memory's own q/k/v projections), and train them for `steps` batches. batches yields
    (tokens, positions, target): the student's tokens (B, T), a bool mask (B, T), and the target at the n
    masked positions: log-probabilities (n, vocab) of what a frozen copy of the model with its memory
    answered, matched by KL(target || model), or answer token ids (n,), by cross-entropy. Returns the mean
    loss of the first and last 10 steps."""
    apply_lora(model, rank, alpha, 0.0, list(targets))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        tokens, pos, target = next(batches)
        logits = model(tokens)[pos]  # (n, vocab)
        if target.is_floating_point():
            loss = F.kl_div(logits.log_softmax(-1), target, log_target=True, reduction="batchmean")
        else:
            loss = F.cross_entropy(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return sum(losses[:10]) / len(losses[:10]), sum(losses[-10:]) / len(losses[-10:])
