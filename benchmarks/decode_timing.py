"""Decode timing shared by the bench_*.py decode benchmarks: tokens/s of a model file's generate and of HF
`generate`, each timed from its first new token to its last (prefill excluded), the memory read bandwidth that
bounds batch-1 decoding, the bytes a model holds and reads per token, peak resident memory of a fresh process,
and a competing CPU-bound process for the "busy machine" rows."""

import contextlib
import os
import subprocess
import sys
import time
from collections import Counter

import torch


def load_average() -> str:
    """The 1-minute load average: how busy the machine was (2 on 2 cores means both were taken)."""
    return f"load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "load average unknown"


def machine_line(where: str, bw: float, extra: str = "") -> str:
    """The header every decode benchmark prints: where it ran, the measured read bandwidth, torch and the
    instruction set its CPU kernels dispatch to (ATEN_CPU_CAPABILITY can lower it), the load."""
    return (f"machine: {where}, read bandwidth {bw:.1f} GB/s, torch {torch.__version__} "
            f"({torch.backends.cpu.get_cpu_capability()} kernels), {extra}{load_average()}")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def read_bandwidth_gbs(device="cpu", nbytes=1 << 30, repeats=5) -> float:
    """Best-of-n time to sum a 1 GiB fp32 tensor: the rate at which this machine streams weights from memory."""
    x = torch.ones(nbytes // 4, device=device)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    x.sum(), sync()
    best = min(timed(lambda: (x.sum(), sync())) for _ in range(repeats))
    return nbytes / best / 1e9


def ours_decode_tps(model, ids, n) -> float:
    """A model file's generate, batch 1, exactly n new tokens; stream() stamps each as it is sampled."""
    stamps = []
    model.generate([ids], max_new_tokens=n, stop_tokens=[], stream=lambda row, tok: stamps.append(time.perf_counter()))
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def interleaved_best(runs: dict, n: int, repeats: int) -> dict:
    """Best tokens/s of each run(n) over `repeats` rounds, the runs interleaved so that a change in machine
    load hits all alike (after one short warm-up run each)."""
    for run in runs.values():
        run(4)
    results = {k: [] for k in runs}
    for _ in range(repeats):
        for k, run in runs.items():
            results[k].append(run(n))
    return {k: max(v) for k, v in results.items()}


def tensors(model) -> dict:
    """{id: tensor} of every tensor model holds: parameters, buffers, and fast_decode's quantized weights and
    reordered copies (plain attributes of its modules)."""
    found = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    for m in model.modules():
        for v in list(vars(m).values()) + [getattr(vars(m).get("reordered"), "weight", None)]:
            if isinstance(v, torch.Tensor):
                found[id(v)] = v
    return found


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()  # (a oneDNN tensor has no storage to ask)


def packed_bytes(model) -> int:
    """Bytes of fbgemm's packed int8 weights (A8W8Linear: an opaque object, no tensor): a byte a weight, a scale
    a row."""
    from fast_decode import A8W8Linear
    return sum(m.out_features * (m.in_features + 4) for m in model.modules() if type(m) is A8W8Linear)


def held_bytes(model) -> int:
    """Bytes of every tensor the model holds (a tied or stacked one once)."""
    return sum(nbytes(t) for t in tensors(model).values()) + packed_bytes(model)


def streamed_bytes(model) -> int:
    """Weight bytes one decode step reads: every tensor the model holds once (a tied matrix is the output head),
    but of an embedding table only the row it looks up, and of a reordered copy's weight only one of the two."""
    from fast_decode import TiedEmbedding
    found = tensors(model)
    # how many places hold each module: a TiedEmbedding's matrix is read whole only where it is the head too
    holders = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    for m in model.modules():
        if type(m) is torch.nn.Embedding and id(m.weight) not in {id(h.weight) for h in model.modules()
                                                                if isinstance(h, torch.nn.Linear)
                                                                and "weight" in h._parameters}:
            found.pop(id(m.weight), None)
        if type(m) is TiedEmbedding:
            if holders[id(m.head)] == 1:  # its own copy (a8w8 models: the head is fbgemm's): one row a token
                for t in vars(m.head).values():
                    if isinstance(t, torch.Tensor):
                        found.pop(id(t), None)
            continue
        held = vars(m).get("reordered")
        if held is not None and held.weight is not None:
            found.pop(id(held.weight), None)
    return sum(nbytes(t) for t in found.values()) + packed_bytes(model)


def peak_rss_gib(code: str) -> float:
    """Peak resident memory (VmHWM) of a fresh Python process that runs code from the repository root: file pages
    mapped and read count, as they do for llama.cpp's mapped GGUF."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    probe = (f"import sys; sys.path.insert(0, {root!r})\n{code}\n"
             "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=root)
    if out.returncode:
        raise SystemExit(f"error: the memory probe failed:\n{out.stderr[-2000:]}")
    return int(out.stdout.split()[-1]) * 1024 / 2**30


def model_class(module):
    """A model file's model class: the one with from_pretrained and generate (SmolLM2, Llama, ...), found by what
    it offers rather than by a name."""
    return next(v for v in vars(module).values() if isinstance(v, type) and issubclass(v, torch.nn.Module)
                and hasattr(v, "from_pretrained") and hasattr(v, "generate"))


def shared_copy(model):
    """A second module tree of model's class holding the very same parameter and buffer tensors (no memory)."""
    with torch.device("meta"):
        twin = type(model)(model.args)
    state = model.state_dict()
    twin.load_state_dict(state, strict=True, assign=True)
    for name, buf in model.named_buffers():  # non-persistent buffers (RoPE tables) are not in the state_dict
        if name not in state:
            owner, _, leaf = name.rpartition(".")
            twin.get_submodule(owner).register_buffer(leaf, buf, persistent=False)
    for (name, p), (_, q) in zip(model.named_parameters(remove_duplicate=False),
                                 twin.named_parameters(remove_duplicate=False)):
        if p is not q:  # a tied matrix: assign=True gave each name its own Parameter
            owner, _, leaf = name.rpartition(".")
            setattr(twin.get_submodule(owner), leaf, p)
    return twin.eval()


def hf_decode_tps(model, ids, n) -> float:
    """HF generate, greedy, exactly n new tokens, stamped by a streamer."""
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.t = []

        def put(self, value):  # first call carries the prompt, then one call per new token
            self.t.append(time.perf_counter())

        def end(self):
            pass

    s = Stamps()
    model.generation_config.eos_token_id = None  # exactly n tokens, as ours
    device = next(model.parameters()).device
    model.generate(torch.tensor([ids], device=device), max_new_tokens=n, do_sample=False, pad_token_id=0, streamer=s)
    t = s.t[1:]
    return (len(t) - 1) / (t[-1] - t[0])


@contextlib.contextmanager
def competing_process():
    """One CPU-bound job on the machine while the block runs (a Python busy loop, not pinned: the scheduler
    places it as it would a user's other work), as a laptop running something else besides the chat."""
    job = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let it start spinning
        yield
    finally:
        job.kill()
        job.wait()


@contextlib.contextmanager
def num_threads(n: int):
    """torch.set_num_threads(n) for the block only."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
