"""Non-parity tests for lm2.py: CLI errors, training through finetune.py and reloading with the memory,
and the recall benchmark's data. Run: python -m pytest tests/test_lm2.py -q"""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import lm2  # noqa: E402


def cli(*args):
    return subprocess.run([sys.executable, "lm2.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cli_user_errors_are_one_line(tmp_path):
    for args, words in ((["--prompt", "hi", "--ckpt_dir", str(tmp_path)], "download.py"),
                        (["--prompt", "hi", "--top_p", "2"], "top_p"),
                        (["--prompt", "hi", "--device", "cuda"] if not torch.cuda.is_available() else
                         ["--prompt", "hi", "--dtype", "float8"], "--d")):
        r = cli(*args)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], r.stderr


def test_finetune_from_scratch_saves_memory(tmp_path):
    """finetune.py trains an LM2 preset from scratch and exports it; lm2.py reloads it, memory included."""
    import lm2_recall
    lm2_recall.prepare(str(tmp_path), n_train=40, n_val=8, n_test=4)
    r = subprocess.run([sys.executable, "finetune.py", "--model", "lm2", "--preset", str(tmp_path / "lm2.json"),
                        "--tokenizer", str(tmp_path), "--data", str(tmp_path / "train.jsonl"), "--mode", "full",
                        "--seq_len", "128", "--batch_size", "4", "--max_steps", "2", "--val_frac", str(8 / 48),
                        "--save_dtype", "float32", "--out_dir", str(tmp_path / "out")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    model = lm2.LM2.from_pretrained(tmp_path / "out")
    assert model.args.attn_window == 24 and len(model.args.memory_layers()) == 2
    assert model.model.layers[0].memory.v_proj.weight.abs().max() > 0  # trained, not the fresh W_V = 0
    result = lm2_recall.evaluate(str(tmp_path / "out"), str(tmp_path / "test.jsonl"))
    assert 0 <= result["answer_acc"] <= 1


def test_recall_examples_fill_one_row_each(tmp_path):
    import random

    import lm2_recall
    from tokenizer_bpe import Tokenizer
    lm2_recall.prepare(str(tmp_path), n_train=2, n_val=1, n_test=1)
    tok = Tokenizer.from_file(str(tmp_path))
    rng = random.Random(0)
    for _ in range(20):
        messages = lm2_recall.example(rng, tok, 4)
        ids = lm2.encode_chat(tok, messages, add_generation_prompt=False)
        assert len(ids) + 1 == lm2_recall.SEQ_LEN  # + end-of-text: finetune.py's rows align with examples
        user, answer = messages[1]["content"], messages[2]["content"]
        facts = dict(f.split("=") for f in user.split()[:4])
        assert answer == "".join(facts[k] for k in user.split("?")[1])
    cfg = json.loads((tmp_path / "vanilla.json").read_text())
    assert cfg["lm2"]["mem_layers"] == [] and json.loads((tmp_path / "lm2.json").read_text())["lm2"]["mem_layers"] is None
