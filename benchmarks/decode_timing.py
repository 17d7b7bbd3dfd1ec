"""Decode timing shared by bench_smollm2.py and bench_llama31.py: tokens/s of a model file's generate and of HF
`generate`, each timed from its first new token to its last (prefill excluded), and the memory read bandwidth
that bounds batch-1 decoding."""

import time

import torch


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
