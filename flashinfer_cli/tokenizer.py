"""Tokenizer and chat template.

A model's tokenizer is a `tokenizers`-library JSON document (tokenizer.json in the model dir) plus a
few facts kept in the manifest (TokenizerSpec.manifest_entry). For Hugging Face checkpoints the JSON is
the checkpoint's own; for GGUF files it is built from the file's metadata so that it splits text
exactly as llama.cpp does on that file (same pre-tokenizer regexes, merges, special tokens).
Chat templates are rendered with jinja2 the way transformers' apply_chat_template does.
"""
from __future__ import annotations

import codecs
import json
import math
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache, wraps
from pathlib import Path
from typing import Any


class TokenizerError(ValueError):
    """A tokenizer, or one of its files, that fic cannot use; the message is one line."""


class ChatTemplateError(TokenizerError):
    """A chat template that does not compile, fails while rendering, or breaks one of the
    sandbox's limits (TEMPLATE_LIMITS); the message is one line."""


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _library_fault(exc: BaseException) -> bool:
    """An error of the tokenizers library about its input: its own exception types, or a Rust
    panic (pyo3's PanicException, a BaseException); not MemoryError, KeyboardInterrupt..."""
    if isinstance(exc, Exception):
        return not isinstance(exc, MemoryError)
    return type(exc).__name__ == "PanicException"

# ---------------------------------------------------------------------------------------------
# llama.cpp facts (src/llama-vocab.cpp): pre-tokenizer regexes per tokenizer.ggml.pre, and the
# token texts it treats specially. Each pre-tokenizer is a list of regexes applied in turn, every
# match and every gap between matches becoming its own piece (tokenizers' Split "Isolated").

# GPT-2's regex. llama.cpp runs it through a hand-written splitter that also ends with `|\s+`.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class _PreTok:
    regexes: tuple[str, ...]
    ignore_merges: bool = False     # a piece that is itself a token is not split by merges (Llama 3)
    add_bos: bool = False           # llama.cpp's default when the file has no add_bos_token


_PRE_LLAMA3 = _PreTok((_LLAMA3,), ignore_merges=True, add_bos=True)
_PRE_QWEN2 = _PreTok((_QWEN2,))
_PRE_SMOLLM = _PreTok((r"\p{N}", _GPT2))   # digits one by one, then GPT-2
_PRE_GPT2 = _PreTok((_GPT2,))
_PRE_DEFAULT = _PreTok((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))

_PRE_TOKENIZERS: dict[str, _PreTok] = {
    "default": _PRE_DEFAULT,
    **{n: _PRE_LLAMA3 for n in ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx",
                                "smaug-bpe")},
    **{n: _PRE_QWEN2 for n in ("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2")},
    **{n: _PRE_SMOLLM for n in ("smollm", "starcoder", "refact", "codeshell", "command-r",
                                "exaone", "minerva-7b")},
    **{n: _PRE_GPT2 for n in ("gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "exaone4")},
}

# Token texts llama.cpp treats as control tokens whatever their GGUF type (so "<|im_end|>" in a
# prompt maps to its id), and the subset that ends generation.
_EOG_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
)
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>",
              "<end_of_utterance>")
_FIM_TEXTS = {  # key suffix -> texts; pad/rep/sep also end generation
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>",
                "▁<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>",
                "▁<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>",
                "▁<MID>", "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
_ALWAYS_SPECIAL = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")  # gpt-oss

# GGUF token types (gguf.TokenType)
_TT_UNKNOWN, _TT_CONTROL, _TT_USER_DEFINED = 2, 3, 4

# Used when a model has no chat template: plain ChatML, the fallback transformers used to apply.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (byte-level BPE)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in _byte_to_unicode().items()}


# ---------------------------------------------------------------------------------------------
# Spec: what a converter stores with a model

@dataclass
class TokenizerSpec:
    tokenizer_json: str            # a tokenizers-library JSON document
    chat_template: str | None
    bos_id: int | None
    eos_ids: list[int]             # every id that stops generation; the model's main EOS first
    add_bos: bool                  # prepend bos when encoding a prompt

    def manifest_entry(self) -> dict:
        return {"chat_template": self.chat_template, "bos_id": self.bos_id,
                "eos_ids": list(self.eos_ids), "add_bos": self.add_bos}


def _read_json(path: Path) -> dict:
    """A JSON object from path ({} if there is no such file); TokenizerError if unreadable."""
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as e:
        raise TokenizerError(f"{path}: unreadable JSON ({_one_line(e)})") from None
    if not isinstance(raw, dict):
        raise TokenizerError(f"{path}: not a JSON object")
    return raw


def _token_text(value: Any) -> str | None:
    """tokenizer_config's special tokens are strings or AddedToken dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _load_hf(text: str, where: Any):
    """A tokenizers-library Tokenizer from its JSON document; TokenizerError if it is not one."""
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return HFTokenizer.from_str(text)
    except BaseException as e:  # tokenizers raises its own exception type, or panics
        if not _library_fault(e):
            raise
        raise TokenizerError(f"{where}: not a tokenizers document ({_one_line(e)})") from None


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: {what} is not UTF-8 ({e})") from None


def spec_from_hf_dir(path: Path) -> TokenizerSpec:
    """Tokenizer of a Hugging Face layout dir: tokenizer.json, tokenizer_config.json and, for the
    ids that end generation, generation_config.json. TokenizerError names what is wrong."""
    path = Path(path)
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise TokenizerError(f"{path}: no tokenizer.json")
    tokenizer_json = _read_text(tok_file, "tokenizer.json")
    hf = _load_hf(tokenizer_json, tok_file)
    config = _read_json(path / "tokenizer_config.json")
    gen = _read_json(path / "generation_config.json")

    def token_id(key: str) -> int | None:
        text = _token_text(config.get(key))
        return hf.token_to_id(text) if text is not None else None

    def an_id(value: Any) -> bool:
        return type(value) is int and 0 <= value < 1 << 32

    bos_id = token_id("bos_token")
    if bos_id is None and an_id(gen.get("bos_token_id")):
        bos_id = gen["bos_token_id"]
    eos_ids: list[int] = []
    main_eos = token_id("eos_token")
    if main_eos is not None:
        eos_ids.append(main_eos)
    gen_eos = gen.get("eos_token_id")
    for i in gen_eos if isinstance(gen_eos, list) else [gen_eos]:
        if an_id(i) and i not in eos_ids:
            eos_ids.append(i)

    if isinstance(config.get("add_bos_token"), bool):
        add_bos = config["add_bos_token"] and bos_id is not None
    else:  # no explicit flag: whatever the document's post-processor does
        try:
            with_special = hf.encode("a", add_special_tokens=True).ids
            plain = hf.encode("a", add_special_tokens=False).ids
        except BaseException as e:
            if not _library_fault(e):
                raise
            raise TokenizerError(f"{tok_file}: cannot encode with it ({_one_line(e)})") from None
        add_bos = bos_id is not None and with_special[:1] == [bos_id] != plain[:1]
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: take the default one
        named = {t.get("name"): t.get("template") for t in template
                 if isinstance(t, dict) and isinstance(t.get("name"), str)}
        template = named.get("default")
    if template is None and (path / "chat_template.jinja").is_file():
        template = _read_text(path / "chat_template.jinja", "the chat template")
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{path / 'tokenizer_config.json'}: chat_template is not a string")
    return TokenizerSpec(tokenizer_json=tokenizer_json, chat_template=template, bos_id=bos_id,
                         eos_ids=eos_ids, add_bos=bool(add_bos))


# ---------------------------------------------------------------------------------------------
# GGUF: rebuild llama.cpp's tokenizer as a tokenizers document

def _gguf_value(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    try:
        return field.contents()
    except (ValueError, IndexError) as e:  # a string that is not UTF-8
        raise TokenizerError(f"GGUF metadata {key!r} is unreadable ({_one_line(e)})") from None


def _gguf_id(reader: Any, key: str) -> int | None:
    """A token id of the metadata (any integer: range checks are the caller's), or None."""
    v = _gguf_value(reader, key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
        raise TokenizerError(f"GGUF metadata {key} is {_short(v)}, not a token id")
    return v


def _gguf_list(reader: Any, key: str, item: type) -> list | None:
    v = _gguf_value(reader, key)
    if v is not None and (not isinstance(v, list) or not all(isinstance(x, item) and not isinstance(x, bool)
                                                              for x in v)):
        raise TokenizerError(f"GGUF metadata {key} is not a list of {item.__name__}")
    return v


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _special_token_ids(tokens: list[str], types: list[int] | None, reader: Any) -> set[int]:
    """Ids llama.cpp matches in text before BPE when special tokens are parsed: tokens typed
    control, user-defined or unknown, plus the ones it promotes to control by their text."""
    special = set()
    if types is not None:
        special = {i for i, t in enumerate(types) if t in (_TT_UNKNOWN, _TT_CONTROL, _TT_USER_DEFINED)}
    promoted = set(_EOG_TEXTS) | set(_ALWAYS_SPECIAL)
    if _gguf_id(reader, "tokenizer.ggml.eot_token_id") is None:
        promoted |= set(_EOT_TEXTS)
    for kind, texts in _FIM_TEXTS.items():
        if _gguf_id(reader, f"tokenizer.ggml.{kind}_token_id") is None:
            promoted |= set(texts)
    special |= {i for i, t in enumerate(tokens) if t in promoted}
    return special


def _eog_ids(tokens: list[str], reader: Any, eos_id: int | None) -> list[int]:
    """The ids llama.cpp stops generation at (llama_vocab_is_eog), main EOS first."""
    n = len(tokens)
    index = {t: i for i, t in enumerate(tokens)}

    def key_id(name: str) -> int | None:
        v = _gguf_id(reader, f"tokenizer.ggml.{name}_token_id")
        return v if v is not None and 0 <= v < n else None

    def first_present(texts: tuple[str, ...]) -> int | None:
        return next((index[t] for t in texts if t in index), None)

    eog: set[int] = set()
    for kind in ("fim_pad", "fim_rep", "fim_sep"):
        i = key_id(kind)
        if i is None:
            i = first_present(_FIM_TEXTS[kind])
        if i is not None:
            eog.add(i)
    eog |= {index[t] for t in _EOG_TEXTS if t in index}
    for i in (eos_id, key_id("eot"), key_id("eom")):
        if i is not None:
            eog.add(i)
    texts = {tokens[i] for i in eog}
    # llama.cpp's workarounds: for gpt-oss / solar-open "<|end|>" does not end generation, and
    # with "<|tool_response>" (gemma 4) "</s>" does not.
    if "<|end|>" in texts and (("<|return|>" in texts and "<|call|>" in texts)
                               or ("<|calls|>" in texts and "<|flush|>" in texts)):
        eog.discard(index["<|end|>"])
    if "<|tool_response>" in texts and "</s>" in texts:
        eog.discard(index["</s>"])
    return ([eos_id] if eos_id in eog else []) + sorted(eog - {eos_id})


def spec_from_gguf(reader: "gguf.GGUFReader") -> TokenizerSpec:  # noqa: F821
    """The tokenizer of a GGUF file, built to tokenize exactly as llama.cpp does on that file.
    Supports byte-level BPE ("gpt2") vocabularies; raises TokenizerError for others, and for
    metadata of the wrong types."""
    model = _gguf_value(reader, "tokenizer.ggml.model")
    if model is None:
        raise TokenizerError("GGUF file has no tokenizer (tokenizer.ggml.model missing)")
    if model != "gpt2":
        raise TokenizerError(f"unsupported GGUF tokenizer model {_short(model)} (only byte-level BPE 'gpt2' "
                             "is supported)")
    pre_name = _gguf_value(reader, "tokenizer.ggml.pre") or "default"
    pre = _PRE_TOKENIZERS.get(pre_name) if isinstance(pre_name, str) else None
    if pre is None:
        raise TokenizerError(f"unsupported GGUF pre-tokenizer {_short(pre_name)} (supported: "
                             f"{', '.join(sorted(_PRE_TOKENIZERS))})")
    tokens = _gguf_list(reader, "tokenizer.ggml.tokens", str)
    merges = _gguf_list(reader, "tokenizer.ggml.merges", str)
    if not tokens or merges is None:
        raise TokenizerError("GGUF tokenizer lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]  # as llama.cpp names them
    if len(set(tokens)) != len(tokens):
        raise TokenizerError("GGUF tokenizer.ggml.tokens lists a token twice")
    types = _gguf_list(reader, "tokenizer.ggml.token_type", int)
    n = len(tokens)
    if types is not None and len(types) != n:
        raise TokenizerError(f"GGUF tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
    template = _gguf_value(reader, "tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise TokenizerError("GGUF metadata tokenizer.chat_template is not a string")

    def id_key(name: str, default: int | None) -> int | None:
        v = _gguf_id(reader, f"tokenizer.ggml.{name}_token_id")
        if v is not None and 0 <= v < n:
            return v
        return default if default is not None and default < n else None

    bos_id = id_key("bos", 11)  # 11: llama.cpp's default for BPE vocabularies
    eos_id = id_key("eos", 11)
    add_bos = _gguf_value(reader, "tokenizer.ggml.add_bos_token")
    if add_bos is not None and not isinstance(add_bos, (bool, int)):
        raise TokenizerError("GGUF metadata tokenizer.ggml.add_bos_token is not a boolean")
    add_bos = pre.add_bos if add_bos is None else bool(add_bos)
    special = _special_token_ids(tokens, types, reader)

    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": types is None or types[i] != _TT_USER_DEFINED}
            for i in sorted(special)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            *({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False}
              for r in pre.regexes),
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
             "use_regex": False},
        ]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                    "use_regex": False},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": pre.ignore_merges,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": _merge_pairs(merges, set(tokens)),
        },
    }
    return TokenizerSpec(tokenizer_json=json.dumps(doc, ensure_ascii=False), chat_template=template,
                         bos_id=bos_id, eos_ids=_eog_ids(tokens, reader, eos_id), add_bos=add_bos)


def _merge_pairs(merges: list[str], vocab: set[str]) -> list[list[str]]:
    """GGUF merges are "left right" strings split at the first space after the first character
    (as llama.cpp does). Merges whose parts or result are not tokens are dropped: tokenizers
    refuses them, and llama.cpp could only ever end such a merge in byte tokens."""
    pairs = []
    for m in merges:
        pos = m.find(" ", 1)
        if pos < 0:
            continue
        left, right = m[:pos], m[pos + 1:]
        if left in vocab and right in vocab and left + right in vocab:
            pairs.append([left, right])
    return pairs


# ---------------------------------------------------------------------------------------------
# Runtime tokenizer

class StreamDecoder:
    """Incremental detokenizer: add(id) returns only text that is complete (never a partial
    UTF-8 character); the concatenation of all add() results and flush() equals decode(ids)."""

    def add(self, token_id: int) -> str:
        raise NotImplementedError

    def flush(self) -> str:
        raise NotImplementedError


class _ByteStreamDecoder(StreamDecoder):
    """Byte-level vocabularies: every token is a byte string, so an incremental UTF-8 decoder
    gives exactly the text of the whole sequence, character by character."""

    def __init__(self, tok: "Tokenizer", skip_special: bool):
        self._tok, self._skip = tok, skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        return self._utf8.decode(self._tok._token_bytes(token_id, self._skip))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class _WindowStreamDecoder(StreamDecoder):
    """Other vocabularies (e.g. SentencePiece-style, where decode drops the first leading space):
    decode a window of recent ids and emit what the newest ids add to it, holding text back while
    it ends in an incomplete character. The window starts at an already emitted token, so a rule
    for the first token of a decode applies to both texts compared, and cancels out."""

    def __init__(self, tok: "Tokenizer", skip_special: bool):
        self._tok, self._skip = tok, skip_special
        self._ids: list[int] = []
        self._prefix = 0      # window start
        self._read = 0        # ids before this index have been emitted

    def _texts(self) -> tuple[str, str]:
        window = self._ids[self._prefix:]
        done = self._tok.decode(window[:self._read - self._prefix], skip_special=self._skip)
        return done, self._tok.decode(window, skip_special=self._skip)

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        done, text = self._texts()
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done):]

    def flush(self) -> str:
        done, text = self._texts()
        self._prefix = self._read = len(self._ids)
        return text[len(done):]


class Tokenizer:
    """Encode, decode, stream-decode and render chats for one model."""

    def __init__(self, tokenizer_json: str, *, bos_id: int | None, eos_ids: list[int],
                 add_bos: bool, chat_template: str | None, where: Any = "tokenizer"):
        def an_id(v: Any) -> bool:
            return type(v) is int and 0 <= v < 1 << 32

        if not (bos_id is None or an_id(bos_id)) or not isinstance(eos_ids, list) \
                or not all(an_id(i) for i in eos_ids) or not isinstance(add_bos, bool) \
                or not (chat_template is None or isinstance(chat_template, str)):
            raise TokenizerError(f"{where}: bad tokenizer entry (bos_id {_short(bos_id)}, eos_ids {_short(eos_ids)}, "
                                 f"add_bos {_short(add_bos)}, chat_template of type {type(chat_template).__name__})")
        self._hf = _load_hf(tokenizer_json, where)
        # from the loaded tokenizer, not json.loads of the document: that would hold the whole
        # vocabulary twice more, as Python objects, at the engine's peak memory
        added = self._hf.get_added_tokens_decoder()
        decoder = self._hf.decoder
        self.bos_id = bos_id
        self.eos_ids = list(eos_ids)
        self.add_bos = bool(add_bos)
        self.chat_template = chat_template
        self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
        self._special = {i for i, t in added.items() if t.special}
        self._added = {i: t.content for i, t in added.items()}
        self._byte_level = _is_byte_level(json.loads(decoder.__getstate__()) if decoder is not None else None)
        # byte-level vocabularies: each token's bytes, filled as tokens are decoded (the whole table of a
        # 152k vocabulary took 0.3-0.7 s at every start)
        self._bytes: dict[int, bytes] | None = {} if self._byte_level else None
        self._template: ChatTemplate | None = None
        if bos_id is not None and bos_id >= self.vocab_size:
            raise TokenizerError(f"{where}: bos_id {bos_id} is outside the vocabulary of {self.vocab_size}")

    @classmethod
    def from_spec(cls, spec: TokenizerSpec) -> "Tokenizer":
        return cls(spec.tokenizer_json, bos_id=spec.bos_id, eos_ids=spec.eos_ids,
                   add_bos=spec.add_bos, chat_template=spec.chat_template)

    @classmethod
    def from_model_dir(cls, model_dir: Path, entry: dict) -> "Tokenizer":
        """The tokenizer of a fic model: its tokenizer.json and the manifest's tokenizer entry.
        TokenizerError names what is wrong."""
        path = Path(model_dir) / "tokenizer.json"
        text = _read_text(path, "tokenizer")
        if not isinstance(entry, dict):
            raise TokenizerError(f"{path}: the manifest's tokenizer entry is not an object")
        return cls(text, bos_id=entry.get("bos_id"), eos_ids=entry.get("eos_ids") or [],
                   add_bos=entry.get("add_bos", False), chat_template=entry.get("chat_template"), where=path)

    # -- encode / decode --------------------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of text. Special tokens written in the text (e.g. "<|im_start|>") become
        their ids, as llama.cpp does for chat prompts."""
        try:
            ids = self._hf.encode(text, add_special_tokens=False).ids
        except BaseException as e:  # the tokenizers library's own errors, or a panic
            if not _library_fault(e):
                raise
            raise TokenizerError(f"cannot encode the text ({_one_line(e)})") from None
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int], *, skip_special: bool = False) -> str:
        """Text of ids; special tokens are written out unless skip_special."""
        if self._bytes is not None:
            return b"".join(self._token_bytes(i, skip_special) for i in ids).decode(
                "utf-8", errors="replace")
        for i in ids:
            self._check_id(i)
        try:
            return self._hf.decode(list(ids), skip_special_tokens=skip_special)
        except BaseException as e:  # the tokenizers library's own errors, or a panic
            if not _library_fault(e):
                raise
            raise TokenizerError(f"cannot decode the ids ({_one_line(e)})") from None

    def stream_decoder(self, *, skip_special: bool = False) -> StreamDecoder:
        if self._bytes is not None:
            return _ByteStreamDecoder(self, skip_special)
        return _WindowStreamDecoder(self, skip_special)

    def token_text(self, token_id: int) -> str:
        """The vocabulary's spelling of a token (e.g. "<|im_end|>", "Ġthe")."""
        self._check_id(token_id)
        return self._hf.id_to_token(token_id)

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} out of range (vocabulary of {self.vocab_size})")

    def _token_bytes(self, token_id: int, skip_special: bool) -> bytes:
        self._check_id(token_id)
        if skip_special and token_id in self._special:
            return b""
        piece = self._bytes.get(token_id)
        if piece is None:
            piece = self._bytes[token_id] = self._piece_bytes(token_id)
        return piece

    def _piece_bytes(self, token_id: int) -> bytes:
        """A token's bytes: an added token is its text, any other byte-level decoded (a character
        outside the byte alphabet stands for itself, in UTF-8)."""
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        u2b = _unicode_to_byte()
        piece = self._hf.id_to_token(token_id) or ""
        return b"".join(bytes([u2b[c]]) if c in u2b else c.encode("utf-8") for c in piece)

    # -- chat --------------------------------------------------------------------------------

    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation, rendered with the model's chat template like
        transformers' apply_chat_template (ChatML when the model has no template), inside the
        sandbox's limits (ChatTemplate). ChatTemplateError says what went wrong, in one line."""
        if self._template is None:
            self._template = ChatTemplate(self.chat_template or CHATML_TEMPLATE)
        return self._template.render(messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self._text_or_empty(self.bos_id),
                                     eos_token=self._text_or_empty(self.eos_ids[0] if self.eos_ids else None))

    def encode_chat(self, messages: list[dict], *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a rendered conversation. BOS is added per add_bos unless the template
        already wrote it (Llama 3's does), so a prompt never starts with two."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt)
        bos_text = self._text_or_empty(self.bos_id)
        return self.encode(text, add_bos=self.add_bos and not (bos_text and text.startswith(bos_text)))

    def _text_or_empty(self, token_id: int | None) -> str:
        if token_id is None or not 0 <= token_id < self.vocab_size:
            return ""
        return self._hf.id_to_token(token_id) or ""


def _is_byte_level(decoder: dict | None) -> bool:
    if not decoder:
        return False
    if decoder.get("type") == "ByteLevel":
        return True
    if decoder.get("type") == "Sequence":
        parts = decoder.get("decoders") or []
        return len(parts) == 1 and _is_byte_level(parts[0])
    return False


# ---------------------------------------------------------------------------------------------
# Chat templates: jinja2's sandbox, bounded
#
# A chat template is code from the model's files. jinja2's ImmutableSandboxedEnvironment (as
# transformers uses) keeps it from Python's internals; jinja2 has no bounds on time or memory, so
# fic adds them: every loop iteration, call, filter, attribute lookup and output chunk counts
# against a deadline; range() is capped; an operation that would build a string or list longer
# than the output limit (*, +, %, ~, the padding filters, str's padding methods, format widths)
# is refused before it allocates; output is streamed and counted. Each limit's error says which.

@dataclass(frozen=True)
class TemplateLimits:
    seconds: float = 2.0          # of rendering; real templates take milliseconds
    output_chars: int = 1 << 20   # of the rendered prompt, plus twice the messages' own text
    range_items: int = 100_000    # of one range()
    source_chars: int = 1 << 20   # of the template itself
    number_arg: int = 1 << 16     # largest exponent of a power


TEMPLATE_LIMITS = TemplateLimits()


class _Budget:
    """What one render may still spend; checked at every step the sandbox sees."""

    __slots__ = ("deadline", "chars", "steps", "limits")

    def __init__(self, limits: TemplateLimits, chars: int):
        self.limits = limits
        self.deadline = time.monotonic() + limits.seconds
        self.chars = chars
        self.steps = 0

    def tick(self) -> None:
        self.steps += 1
        if self.steps & 255 == 0 and time.monotonic() > self.deadline:
            raise ChatTemplateError(f"chat template: rendering took more than {self.limits.seconds:g} s "
                                    "(a loop without end?)")

    def size(self, n: int, what: str) -> None:
        if n > self.chars:
            raise ChatTemplateError(f"chat template: {what} of {n:,} items is more than the limit of "
                                    f"{self.chars:,}")


_MAX_INT_BITS = 1 << 16  # of an integer a product or power makes
_CURRENT = threading.local()
_STATIC = _Budget(TEMPLATE_LIMITS, TEMPLATE_LIMITS.output_chars)  # compile-time constant folding


def _budget() -> _Budget:
    b = getattr(_CURRENT, "budget", None)
    if b is None:
        b = _STATIC
        b.deadline = math.inf
    return b


# a width or precision of a million or more, or one given as an argument ('*', '{}'), in
# %-formatting (and strftime) and in str.format
_PERCENT_WIDTH = re.compile(r"%[^a-zA-Z%]*?(?:\*|\d{7,})")
_BRACE_WIDTH = re.compile(r"\{[^{}]*:[^{}]*(?:\{|\d{7,})")


def _check_format(fmt: Any, braces: bool = False) -> None:
    if isinstance(fmt, str) and (_BRACE_WIDTH if braces else _PERCENT_WIDTH).search(fmt):
        raise ChatTemplateError("chat template: a format string with a huge width, or a width given as an argument")


def _check_numbers(args: tuple, kwargs: dict, limit: int, what: str) -> None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > limit:
            raise ChatTemplateError(f"chat template: {what} was given {v}, more than the limit of {limit}")


def _text_size(x: Any, limit: int, depth: int = 0) -> int:
    """How long str(x) is at least, counting no further than past `limit` (strings, and the
    containers whose repr would hold them); what a template converts to text is checked with
    this before the conversion allocates it."""
    if isinstance(x, (str, bytes, bytearray)):
        return len(x)
    if not isinstance(x, (list, tuple, set, frozenset, dict)) or depth > 64:
        return 0
    if len(x) > limit:
        return len(x)
    total = 2
    for item in (x.items() if isinstance(x, dict) else x):
        total += 2 + _text_size(item, limit - total, depth + 1)
        if total > limit:
            break
    return total


def _check_text(x: Any, what: str) -> None:
    b = _budget()
    b.size(_text_size(x, b.chars), what)


def _finalize(value: Any) -> Any:
    """Every {{ expression }}'s value, before jinja2 makes it text."""
    _check_text(value, "an output")
    return value


def _sized(value: Any, what: str) -> Any:
    if isinstance(value, (str, list, tuple)):
        _budget().size(len(value), what)
    return value


def _replace_size(text: str, old: Any, new: Any) -> int:
    """The longest str.replace(old, new) can make text."""
    old, new = str(old), str(new)
    if not old:
        return len(text) + (len(text) + 1) * len(new)
    return len(text) + len(text) // len(old) * max(0, len(new) - len(old))


def _check_growth(name: str, subject: Any, args: tuple, kwargs: dict) -> None:
    """Before a filter or str method that builds from its arguments runs: what it would build
    must fit the budget. subject: the string (or sequence) filtered, or the method's str."""
    b = _budget()
    widths = _WIDTH_ARGS.get(name)
    if widths is not None:
        _check_numbers(args, kwargs, widths, f"{name}()")
    if name in ("format", "format_map"):
        _check_format(subject, braces=True)
    elif name == "format_filter":
        _check_format(subject)
    elif name == "replace" and isinstance(subject, str) and len(args) >= 2:
        b.size(_replace_size(subject, args[0], args[1]), "replace()'s result")
    elif name == "join" and isinstance(subject, str) and args and hasattr(args[0], "__len__"):
        b.size(len(subject) * len(args[0]) + _text_size(args[0], b.chars), "join()'s result")
    elif name == "join_filter" and hasattr(subject, "__len__"):
        sep = args[0] if args else kwargs.get("d", "")
        b.size(len(str(sep)) * len(subject) + _text_size(subject, b.chars), "join's result")
    elif name in ("string", "tojson", "pprint"):
        _check_text(subject, f"{name}'s result")
    elif name == "indent" and isinstance(subject, str):
        width = args[0] if args else kwargs.get("width", 4)
        if isinstance(width, str):
            b.size(len(subject) + (subject.count("\n") + 1) * len(width), "indent's result")


# the largest number a width or count argument may be
_WIDTH_ARGS = {"center": 4096, "ljust": 4096, "rjust": 4096, "zfill": 4096, "expandtabs": 4096, "indent": 4096,
               "batch": 4096, "slice": 4096, "tojson": 64}
_FILTER_CHECKS = {"format": "format_filter", "join": "join_filter"}


def _bounded_filter(name: str, f):
    """A filter that counts as a step, is checked before it builds, and whose result must fit."""
    @wraps(f)
    def bounded(*args, **kwargs):
        _budget().tick()
        values = [a for a in args if not isinstance(a, _jinja_internals())]
        if values:
            _check_growth(_FILTER_CHECKS.get(name, name), values[0], tuple(values[1:]), kwargs)
        return _sized(f(*args, **kwargs), f"the {name} filter's result")
    return bounded


@lru_cache(maxsize=1)
def _jinja_internals() -> tuple:
    """What jinja2 passes a filter before its value (pass_context, pass_environment...)."""
    import jinja2
    from jinja2.nodes import EvalContext
    from jinja2.runtime import Context

    return (Context, EvalContext, jinja2.Environment)


def _ticking(iterable: Any):
    """Every for loop iterates through this (the template's AST is rewritten to call it)."""
    b = _budget()
    for item in iterable:
        b.tick()
        yield item


def _concat(items: list) -> str:
    """The ~ operator (the AST is rewritten to call this instead of jinja2's str_join)."""
    _check_text(items, "a ~ concatenation")
    parts = [str(x) for x in items]
    _budget().size(sum(len(p) for p in parts), "a ~ concatenation")
    return "".join(parts)


def _range(*args: Any) -> range:
    r = range(*args)
    limit = _budget().limits.range_items
    if len(r) > limit:
        raise ChatTemplateError(f"chat template: range() of {len(r):,} items is more than the limit of {limit:,}")
    return r


@lru_cache(maxsize=1)
def _sandbox_class():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "+", "%", "**"])

        def call_binop(self, context, operator, left, right):
            b = _budget()
            b.tick()
            ints = isinstance(left, int) and isinstance(right, int)
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                        b.size(len(seq) * max(n, 0), "a * product")
                if ints and left.bit_length() + right.bit_length() > _MAX_INT_BITS:
                    raise ChatTemplateError("chat template: a product of integers too large")
            elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                b.size(len(left) + len(right), "a + sum")
            elif operator == "%" and isinstance(left, str):
                _check_format(left)
                b.size(len(left) + _text_size(right, b.chars), "a % formatting")
            elif operator == "**" and isinstance(right, (int, float)) and isinstance(left, (int, float)) \
                    and abs(left) > 1 and (abs(right) > b.limits.number_arg
                                           or ints and right > 0 and left.bit_length() * right > _MAX_INT_BITS):
                raise ChatTemplateError(f"chat template: a power too large ({right} as the exponent)")
            return _sized(super().call_binop(context, operator, left, right), f"a {operator} result")

        def getattr(self, obj, attribute):
            _budget().tick()
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            _budget().tick()
            return super().getitem(obj, argument)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's own signature)
            _budget().tick()
            method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
            owner = getattr(method, "__self__", None)
            if isinstance(owner, str):  # str's methods that build from their arguments
                _check_growth(getattr(method, "__name__", ""), owner, args, kwargs)
            return _sized(super().call(__context, __obj, *args, **kwargs), "a call's result")

    return Sandbox


def _rewrite(ast):
    """Route every for loop through _ticking and every ~ through _concat."""
    from jinja2 import nodes

    for node in ast.find_all(nodes.For):
        node.iter = nodes.Filter(node.iter, "fic_ticking", [], [], None, None, lineno=node.lineno)
    for node in list(ast.find_all(nodes.Concat)):
        items = nodes.List(list(node.nodes), lineno=node.lineno)
        node.nodes = [nodes.Filter(items, "fic_concat", [], [], None, None, lineno=node.lineno)]
    return ast


@lru_cache(maxsize=1)
def _environment():
    """The one sandbox every chat template compiles in: as transformers' apply_chat_template
    builds it (trim_blocks and lstrip_blocks, loop controls, tojson without ASCII escaping,
    raise_exception and strftime_now), every filter bounded, range() capped."""
    import jinja2
    import jinja2.ext

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        _check_format(fmt)
        return datetime.now().strftime(fmt)

    env = _sandbox_class()(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols],
                           finalize=_finalize)
    env.optimized = False  # no constant folding: all a template computes, it computes while rendering, in bounds
    env.filters["tojson"] = tojson
    for name, f in list(env.filters.items()):
        env.filters[name] = _bounded_filter(name, f)
    env.filters["fic_ticking"] = _ticking
    env.filters["fic_concat"] = _concat
    lipsum = env.globals["lipsum"]

    def bounded_lipsum(*args, **kwargs):  # jinja2's lorem ipsum: n paragraphs of up to max words
        _check_numbers(args, kwargs, 100, "lipsum()")
        return lipsum(*args, **kwargs)

    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["range"] = _range
    env.globals["lipsum"] = bounded_lipsum
    return env


@lru_cache(maxsize=16)
def _compiled(source: str):
    """A template compiled once (a model's tokenizer is made again for each engine, a test's
    again and again); rendering shares nothing between calls but the code."""
    env = _environment()
    try:
        return env.from_string(_rewrite(env.parse(source)))
    except Exception as e:  # TemplateSyntaxError, or RecursionError from a deeply nested source
        raise ChatTemplateError(f"chat template does not compile: {_one_line(e)}") from None


class ChatTemplate:
    """A chat template compiled as transformers' apply_chat_template does (sandboxed,
    trim_blocks and lstrip_blocks, loop controls, tojson without ASCII escaping,
    raise_exception and strftime_now), rendered within TEMPLATE_LIMITS."""

    def __init__(self, source: str, limits: TemplateLimits = TEMPLATE_LIMITS):
        self.limits = limits
        if not isinstance(source, str):
            raise ChatTemplateError(f"chat template is a {type(source).__name__}, not text")
        if len(source) > limits.source_chars:
            raise ChatTemplateError(f"chat template of {len(source):,} characters is more than the limit of "
                                    f"{limits.source_chars:,}")
        self._template = _compiled(source)

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True, **variables: Any) -> str:
        """The rendered prompt; ChatTemplateError (one line) when the template fails or breaks a
        limit: more than `seconds` of work, output beyond `output_chars` plus twice the
        messages' text, a range() or an intermediate value beyond its limit, or recursion."""
        own = sum(len(str(m.get("content", ""))) for m in messages if isinstance(m, dict)) \
            if isinstance(messages, list) else 0
        budget = _Budget(self.limits, self.limits.output_chars + 2 * own)
        outer = getattr(_CURRENT, "budget", None)
        _CURRENT.budget = budget
        out: list[str] = []
        try:
            n = 0
            for chunk in self._template.generate(messages=messages, tools=None, documents=None,
                                                 add_generation_prompt=add_generation_prompt, **variables):
                budget.tick()
                n += len(chunk)
                if n > budget.chars:
                    raise ChatTemplateError(f"chat template: the prompt grew past {budget.chars:,} characters")
                out.append(chunk)
        except (ChatTemplateError, MemoryError):
            raise
        except RecursionError:
            raise ChatTemplateError("chat template: recursion too deep") from None
        except Exception as e:  # the template's own failure (raise_exception, a type error, ...)
            raise ChatTemplateError(f"chat template: {_one_line(e)}") from None
        finally:
            _CURRENT.budget = outer
        return "".join(out)

