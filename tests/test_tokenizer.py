"""Tokenizer and chat template against independent references: llama.cpp (llama-cpp-python) on
GGUF files, transformers on Hugging Face layout dirs and chat templates."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from flashinfer_cli.tokenizer import (CHATML_TEMPLATE, Tokenizer, TokenizerSpec, spec_from_gguf,
                                      spec_from_hf_dir)

gguf = pytest.importorskip("gguf")
from conftest import need_llama_cpp  # noqa: E402

# Strings that exercise the pre-tokenizers: unicode, code, runs of whitespace and digits,
# contractions, special tokens.
TEXTS = [
    "Hello world",
    "What is the capital of Germany?",
    "\n\n   1.",
    "12345678",
    "  \t x",
    "3.14159 and 1,000,000 or 0x1F; 2024-05-17 12:30",
    "a   ",
    "   ",
    "\n",
    "\r\n\r\n",
    " \n \n",
    "I'm sure you'll see they've done it, didn't they? It's JOHN'S and I'D say WE'LL",
    "héllo café naïve Ünïcödé façade",
    "日本語のテキスト、中文字符和한국어",
    "emoji 🎉🎉 family 👨‍👩‍👧 flag 🇩🇪 👍🏽",
    "def f(x):\n    return x**2  # square\n\n\tif x>=10: print(f'{x:>4}')\n",
    "for (int i = 0; i < 10; ++i) { a[i] = i * 2; }",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    "<|im_start|>assistant\n",
    "text<|endoftext|>more text <|im_end|>x",
    "<|im_start <|im_end|><|im_end|>",
    "Ελληνικά и русский текст, עברית, العربية",
    "tabs\t\tand\u00a0non-breaking\u2003spaces\u3000here",
    "   leading and trailing   ",
    "$100 + 50% = ~?!... «quotes» “curly” — dash",
    "x" * 200 + " " + "9" * 50,
    "combining e\u0301 a\u0308, नमस्ते दुनिया, สวัสดีครับ, ²³ ½ Ⅻ ٣",
    "\x00\x01\x7f\u200d\ufeff\U0001d400 math 𝐀𝐁 \u2028 line sep",
]

_PALETTE = (list("abcdefgXYZ") + list("0123456789") + [" ", "  ", "\t", "\n", "\r\n", "   "]
            + list(".,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`") + ["'s", "'ll", "n't"]
            + list("éüßñçøΩжЖ中文字日本한") + ["🎉", "👍🏽", "\u00a0", "\u2003", "\u200b"]
            + ["<|im_start|>", "<|im_end|>", "<|endoftext|>"])


def _random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(_PALETTE) for _ in range(rng.randint(1, 30))) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# fixtures

# smollm2_gguf: conftest.py (the catalog's pip source, downloaded once)

@pytest.fixture(scope="session")
def smollm2_reader(smollm2_gguf):
    return gguf.GGUFReader(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_spec(smollm2_reader) -> TokenizerSpec:
    return spec_from_gguf(smollm2_reader)


@pytest.fixture(scope="session")
def smollm2(smollm2_spec) -> Tokenizer:
    return Tokenizer.from_spec(smollm2_spec)


def _llama(path: Path):
    llama_cpp = need_llama_cpp()
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def _llama_eog(llm) -> list[int]:
    import llama_cpp
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]


@pytest.fixture(scope="session")
def smollm2_llama(smollm2_gguf):
    return _llama(smollm2_gguf)


# ---------------------------------------------------------------------------------------------
# SmolLM2 GGUF against llama.cpp

def _assert_same_tokens(tok: Tokenizer, llm, texts: list[str]) -> None:
    mismatches = []
    for text in texts:
        ours = tok.encode(text, add_bos=False)
        ref = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if ours != ref:
            mismatches.append((text, ours, ref))
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, first: {mismatches[0]!r}"


def test_smollm2_tokens_equal_llama_cpp(smollm2, smollm2_llama):
    _assert_same_tokens(smollm2, smollm2_llama, TEXTS)


def test_smollm2_random_texts_equal_llama_cpp(smollm2, smollm2_llama):
    _assert_same_tokens(smollm2, smollm2_llama, _random_texts(400, seed=3))


def test_smollm2_spec_facts(smollm2_spec, smollm2_llama, smollm2):
    assert smollm2.vocab_size == smollm2_llama.n_vocab() == 49152
    assert smollm2_spec.bos_id == smollm2_llama.token_bos() == 1
    assert smollm2_spec.eos_ids[0] == smollm2_llama.token_eos() == 2  # main EOS first
    assert sorted(smollm2_spec.eos_ids) == _llama_eog(smollm2_llama)
    assert smollm2_spec.add_bos is False
    # llama-cpp-python's add_bos=True means "add what the model adds", here nothing
    assert smollm2.encode("hi") == smollm2_llama.tokenize(b"hi", add_bos=True, special=True)
    assert smollm2.encode("hi", add_bos=True) == [1] + smollm2.encode("hi")
    entry = smollm2_spec.manifest_entry()
    assert set(entry) == {"chat_template", "bos_id", "eos_ids", "add_bos"}
    json.dumps(entry)  # goes into the JSON manifest
    assert "<|im_start|>" in entry["chat_template"]


def test_smollm2_decode_matches_llama_cpp_pieces(smollm2, smollm2_llama):
    for text in TEXTS:
        ids = smollm2.encode(text)
        # llama.cpp's detokenize renders control tokens only with special=True
        ref = smollm2_llama.detokenize(ids, special=True).decode("utf-8", errors="replace")
        assert smollm2.decode(ids) == ref == text


def test_from_model_dir_round_trip(tmp_path, smollm2_spec, smollm2):
    (tmp_path / "tokenizer.json").write_text(smollm2_spec.tokenizer_json, encoding="utf-8")
    entry = json.loads(json.dumps(smollm2_spec.manifest_entry()))
    tok = Tokenizer.from_model_dir(tmp_path, entry)
    for text in TEXTS:
        assert tok.encode(text) == smollm2.encode(text)
    assert tok.eos_ids == smollm2.eos_ids and tok.bos_id == smollm2.bos_id


def test_from_model_dir_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_model_dir(tmp_path, {"bos_id": None, "eos_ids": [], "add_bos": False})


# ---------------------------------------------------------------------------------------------
# decode and streaming

def test_decode_round_trips(smollm2):
    for text in TEXTS + _random_texts(200, seed=5):
        assert smollm2.decode(smollm2.encode(text)) == text


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    dec = tok.stream_decoder()
    return [dec.add(i) for i in ids] + [dec.flush()]


def test_stream_decoder_equals_decode(smollm2):
    for text in TEXTS + _random_texts(200, seed=7):
        ids = smollm2.encode(text)
        pieces = _stream(smollm2, ids)
        assert "".join(pieces) == smollm2.decode(ids) == text
        for piece in pieces:  # each piece is whole characters: it survives a UTF-8 round trip
            assert "\ufffd" not in piece


def test_stream_decoder_holds_back_split_characters(smollm2):
    ids = smollm2.encode("🎉")
    assert len(ids) > 1  # the emoji is split into byte tokens
    pieces = _stream(smollm2, ids)
    assert pieces[:-2] == [""] * (len(ids) - 1) and pieces[-2] == "🎉" and pieces[-1] == ""


def test_stream_decoder_invalid_utf8_matches_decode(smollm2):
    # a truncated character at the end: decode and the stream both end in a replacement char
    ids = smollm2.encode("ab🎉")[:-1]
    assert "".join(_stream(smollm2, ids)) == smollm2.decode(ids) == "ab\ufffd"


def test_decode_skip_special(smollm2):
    ids = smollm2.encode("<|im_start|>user\nhi<|im_end|>")
    assert smollm2.decode(ids, skip_special=True) == "user\nhi"
    with pytest.raises(ValueError, match="out of range"):
        smollm2.decode([smollm2.vocab_size])


# ---------------------------------------------------------------------------------------------
# chat template against transformers and llama-cpp-python

CHATS = [
    [{"role": "user", "content": "What is the capital of Germany?"}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris."},
     {"role": "user", "content": "And Germany? «ü» 🎉"}],
]


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_spec, smollm2_reader):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as HFTokenizer
    field = smollm2_reader.fields["tokenizer.chat_template"]
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=HFTokenizer.from_str(smollm2_spec.tokenizer_json),
        bos_token="<|im_start|>", eos_token="<|im_end|>", chat_template=field.contents())


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_render_chat_equals_transformers(smollm2, hf_smollm2, chat, add_generation_prompt):
    ours = smollm2.render_chat(CHATS[chat], add_generation_prompt=add_generation_prompt)
    ref = hf_smollm2.apply_chat_template(CHATS[chat], tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    assert ours == ref
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt


@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_render_chat_equals_llama_cpp_python(smollm2, smollm2_reader, chat):
    need_llama_cpp()
    from llama_cpp import llama_chat_format as fmt
    template = smollm2_reader.fields["tokenizer.chat_template"].contents()
    ref = fmt.Jinja2ChatFormatter(template, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                  add_generation_prompt=True)(messages=CHATS[chat]).prompt
    assert smollm2.render_chat(CHATS[chat]) == ref


def _tiny_chat_tokenizer(template: str | None) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer, models
    hf = HFTokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    return Tokenizer(hf.to_str(), bos_id=0, eos_ids=[1], add_bos=False, chat_template=template)


def test_render_chat_template_features_as_transformers():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as HFTokenizer
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}"
        "{{ raise_exception('no tools') }}{% endif %}\n"
        "  {{ m['role'] | upper }}: {{ m['content'] | tojson }}{{ eos_token }}\n"
        "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
        "{% set d = strftime_now('%Y') %}{% if d | length != 4 %}bad{% endif %}")
    tok = _tiny_chat_tokenizer(template)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=HFTokenizer.from_str(tok._hf.to_str()),
                                              bos_token="<s>", eos_token="</s>", chat_template=template)
    msgs = [{"role": "user", "content": "héllo \"q\" 日本"}]
    for agp in (True, False):
        assert tok.render_chat(msgs, add_generation_prompt=agp) == hf.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=agp)
    with pytest.raises(ValueError, match="no tools"):
        tok.render_chat([{"role": "tool", "content": "x"}])


# Templates written the way real ones are (Llama 2, Mistral, Qwen, Gemma): {% %} tags indented on
# lines of their own, so the output depends on lstrip_blocks (the whitespace before a block tag
# at the start of a line is removed) and trim_blocks (the newline after a block tag is removed).
# Rendered without either, every one of them gains spaces or newlines.
INDENTED_TEMPLATES = {
    "spaces": (
        "{{ bos_token }}\n"
        "{% for message in messages %}\n"
        "    {% if message['role'] == 'system' %}\n"
        "<<SYS>>{{ message['content'] }}<</SYS>>\n"
        "    {% elif message['role'] == 'user' %}\n"
        "[INST] {{ message['content'] }} [/INST]\n"
        "    {% else %}\n"
        "  {{ message['content'] }}{{ eos_token }}\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
        "  {% if add_generation_prompt %}\n"
        "ASSISTANT:\n"
        "  {% endif %}"),
    "tabs_comments_and_minus": (
        "{#- a comment on a line of its own -#}\n"
        "\t{% set sep = ' | ' %}\n"
        "{% for m in messages %}\n"
        "\t\t{%- if loop.first %}START{% endif %}\n"
        "\t{% if m.role == 'user' %}U{{ sep }}{{ m.content | trim }}\n"
        "\t{% elif m.role == 'assistant' %}A{{ sep }}{{ m.content }}\n"
        "\t{% else %}S{{ sep }}{{ m.content }}\n"
        "\t{% endif %}\n"
        "  {# inline comment #}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}A{{ sep }}{% endif %}"),
    "tags_after_text": (  # a tag after text on the same line is not stripped: the spaces stay
        "{% for m in messages %}\n"
        "  [{{ m.role }}]  {% if m.role == 'user' %}>{% endif %}  {{ m.content }}\n"
        "  {% if not loop.last %}\n"
        "---\n"
        "  {% endif %}\n"
        "{% endfor %}\n"
        "   {%- if add_generation_prompt %} <gen>{% endif %}"),
}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(INDENTED_TEMPLATES))
def test_render_chat_indented_block_tags_as_transformers(name, add_generation_prompt):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as HFTokenizer
    template = INDENTED_TEMPLATES[name]
    tok = _tiny_chat_tokenizer(template)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=HFTokenizer.from_str(tok._hf.to_str()),
                                              bos_token="<s>", eos_token="</s>", chat_template=template)
    for msgs in CHATS:
        ours = tok.render_chat(msgs, add_generation_prompt=add_generation_prompt)
        ref = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours == ref, f"{name}: {ours!r} != {ref!r}"
    # the template does depend on the whitespace control: plain jinja2 renders something else
    import jinja2
    plain = jinja2.Environment().from_string(template).render(
        messages=CHATS[1], add_generation_prompt=add_generation_prompt, bos_token="<s>", eos_token="</s>")
    assert plain != tok.render_chat(CHATS[1], add_generation_prompt=add_generation_prompt)
    trim_only = jinja2.Environment(trim_blocks=True).from_string(template).render(
        messages=CHATS[1], add_generation_prompt=add_generation_prompt, bos_token="<s>", eos_token="</s>")
    assert trim_only != tok.render_chat(CHATS[1], add_generation_prompt=add_generation_prompt)


def test_render_chat_without_template_is_chatml():
    tok = _tiny_chat_tokenizer(None)
    assert tok.render_chat([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert "im_start" in CHATML_TEMPLATE


# ---------------------------------------------------------------------------------------------
# other pre-tokenizers: small GGUF files holding only a tokenizer, checked against llama.cpp

EXTRA_WORDS = ["Ġqwertyuiop", "xyzzyplugh", "Ġ$zork"]
EXTRA_TEXTS = ["x 1234567 y 42", "12345678901", " qwertyuiop xyzzyplugh $zork", "1 22 333 4444 55555"]


def _write_vocab_gguf(path: Path, *, tokens, types, merges, pre: str | None, add_bos=None,
                      bos=1, eos=2) -> None:
    w = gguf.GGUFWriter(str(path), arch="qwen2")
    # llama.cpp reads the hyperparameters even for a vocab-only load
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(16)
    w.add_head_count(1)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="session")
def smollm2_vocab(smollm2_reader):
    r = smollm2_reader
    types = list(r.fields["tokenizer.ggml.token_type"].contents())
    tokens = list(r.fields["tokenizer.ggml.tokens"].contents())
    # vary the token types llama.cpp looks at: a user-defined token, and "<|im_end|>" typed as a
    # normal token (llama.cpp promotes it to control by its text)
    types[5] = 4
    types[2] = 1
    merges = list(r.fields["tokenizer.ggml.merges"].contents())
    # SmolLM2 spells numbers digit by digit; add digit pairs and triples (Qwen2 splits digits one
    # by one, Llama 3 in threes) and whole-word tokens no merge reaches (Llama 3 ignores merges
    # for a piece that is a token)
    digits = "0123456789"
    for a in digits:
        for b in digits:
            tokens.append(a + b)
            merges.append(f"{a} {b}")
    for a in digits:
        for b in digits:
            for c in digits:
                tokens.append(a + b + c)
                merges.append(f"{a}{b} {c}")
    tokens += EXTRA_WORDS
    types += [1] * (len(tokens) - len(types))
    return tokens, types, merges


@pytest.mark.parametrize("pre,add_bos", [("qwen2", None), ("llama-bpe", None), ("gpt-2", False),
                                         ("default", True), ("smollm", None), (None, None)])
def test_pre_tokenizers_equal_llama_cpp(tmp_path_factory, smollm2_vocab, pre, add_bos):
    tokens, types, merges = smollm2_vocab
    path = tmp_path_factory.mktemp("vocab") / f"{pre}.gguf"
    _write_vocab_gguf(path, tokens=tokens, types=types, merges=merges, pre=pre, add_bos=add_bos)
    llm = _llama(path)
    spec = spec_from_gguf(gguf.GGUFReader(path))
    tok = Tokenizer.from_spec(spec)
    # without the flag in the file, llama.cpp adds BOS only for the Llama 3 family
    assert spec.add_bos is (add_bos if add_bos is not None else pre == "llama-bpe")
    texts = TEXTS + EXTRA_TEXTS + _random_texts(150, seed=11) + ["<file_sep>x", "a<file_sep> <|im_end|>"]
    _assert_same_tokens(tok, llm, texts)
    # encode's default and llama.cpp's "add special tokens" agree on BOS
    assert [tok.encode(t) for t in texts[:5]] == [
        llm.tokenize(t.encode(), add_bos=True, special=True) for t in texts[:5]]
    assert sorted(spec.eos_ids) == _llama_eog(llm)
    for text in texts:
        assert tok.decode(tok.encode(text, add_bos=False)) == text


def test_unsupported_gguf_tokenizers_are_named(tmp_path, smollm2_vocab):
    tokens, types, merges = smollm2_vocab
    path = tmp_path / "bad_pre.gguf"
    _write_vocab_gguf(path, tokens=tokens[:300], types=types[:300], merges=[], pre="no-such-pre")
    with pytest.raises(ValueError, match="no-such-pre"):
        spec_from_gguf(gguf.GGUFReader(path))
    path = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", "▁a"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="'llama'"):
        spec_from_gguf(gguf.GGUFReader(path))


# ---------------------------------------------------------------------------------------------
# Hugging Face layout dirs against transformers

def _train_bytelevel(tmp_path: Path) -> Path:
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<|eot|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    hf.train_from_iterator(TEXTS * 4, trainer)
    d = tmp_path / "hf"
    d.mkdir()
    hf.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "add_bos_token": True,
        "chat_template": "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}"
                         "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    return d


def test_hf_dir_encode_equals_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    d = _train_bytelevel(tmp_path)
    spec = spec_from_hf_dir(d)
    assert spec.bos_id == 0 and spec.eos_ids == [1, 2] and spec.add_bos is True
    tok = Tokenizer.from_spec(spec)
    ref = transformers.AutoTokenizer.from_pretrained(str(d))
    for text in TEXTS + _random_texts(100, seed=13):
        ours = tok.encode(text, add_bos=False)
        assert ours == ref.encode(text, add_special_tokens=False)
        assert tok.decode(ours) == text
        assert "".join(_stream(tok, ours)) == text
    msgs = CHATS[1]
    assert tok.render_chat(msgs) == ref.apply_chat_template(msgs, tokenize=False,
                                                            add_generation_prompt=True)


def _llama2_style_dir(tmp_path: Path) -> Path:
    """A SentencePiece-style BPE (Metaspace, byte fallback, decoder strips the first space), the
    layout of Llama 2 / Mistral tokenizer.json files."""
    from tokenizers import Tokenizer as HFTokenizer, models, normalizers, trainers
    hf = HFTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    hf.train_from_iterator(["hello world, the cat sat on the mat", "a b c d e f g"] * 10, trainer)
    doc = json.loads(hf.to_str())
    vocab = doc["model"]["vocab"]
    for b in range(256):  # byte-fallback tokens
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    doc["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    d = tmp_path / "spm"
    d.mkdir()
    (d / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "add_bos_token": True, "clean_up_tokenization_spaces": False}))
    return d


def test_hf_dir_sentencepiece_style_stream_and_bos(tmp_path):
    transformers = pytest.importorskip("transformers")
    d = _llama2_style_dir(tmp_path)
    spec = spec_from_hf_dir(d)
    assert spec.add_bos is True and spec.bos_id == 1 and spec.eos_ids == [2]
    tok = Tokenizer.from_spec(spec)
    ref = transformers.AutoTokenizer.from_pretrained(str(d))
    for text in ["hello world", " the  cat", "日本 🎉 ü", "mat\n\nsat 12"] + _random_texts(50, seed=17):
        ids = tok.encode(text)
        assert ids[0] == 1
        assert ids[1:] == ref.encode(text, add_special_tokens=False)
        full = tok.decode(ids[1:])
        assert full == ref.decode(ids[1:])
        pieces = _stream(tok, ids[1:])
        assert "".join(pieces) == full
        assert all("\ufffd" not in p for p in pieces) or "\ufffd" in full


def test_hf_dir_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json"):
        spec_from_hf_dir(tmp_path)


def test_hf_dir_bos_from_post_processor_as_transformers(tmp_path):
    """No add_bos_token in tokenizer_config: BOS is added when the document's post-processor
    adds it, as transformers does."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as HFTokenizer, processors
    d = _train_bytelevel(tmp_path)
    hf = HFTokenizer.from_file(str(d / "tokenizer.json"))
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    hf.save(str(d / "tokenizer.json"))
    config = json.loads((d / "tokenizer_config.json").read_text())
    del config["add_bos_token"]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_spec(spec_from_hf_dir(d))
    ref = transformers.AutoTokenizer.from_pretrained(str(d))
    for text in TEXTS[:8]:
        assert tok.encode(text) == ref.encode(text) and tok.encode(text)[0] == 0


def test_encode_chat_adds_bos_once(smollm2, smollm2_llama):
    text = smollm2.render_chat(CHATS[0])
    assert smollm2.encode_chat(CHATS[0]) == smollm2_llama.tokenize(text.encode(), add_bos=True,
                                                                   special=True)
    from tokenizers import Tokenizer as HFTokenizer, models
    hf = HFTokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    hf.add_special_tokens(["<s>", "</s>"])
    with_bos = Tokenizer(hf.to_str(), bos_id=0, eos_ids=[1], add_bos=True,
                         chat_template="{{ bos_token }}{% for m in messages %}</s>{% endfor %}")
    without = Tokenizer(hf.to_str(), bos_id=0, eos_ids=[1], add_bos=True,
                        chat_template="{% for m in messages %}</s>{% endfor %}")
    assert with_bos.encode_chat(CHATS[0]) == without.encode_chat(CHATS[0]) == [0, 1]


# ---------------------------------------------------------------------------------------------
# hostile chat templates: jinja2's sandbox, bounded (tests/test_fuzz.py fuzzes the rest)

SANDBOX_ESCAPES = {
    "mro": "{{ ''.__class__.__mro__ }}",
    "cycler-globals": "{{ cycler.__init__.__globals__ }}",
    "joiner-os": "{{ joiner.__init__.__globals__.os.system('true') }}",
    "self": "{{ self.__init__.__globals__ }}",
    "subclasses": "{{ messages.__class__.__base__.__subclasses__() }}",
    "format-attr": "{{ '{0.__class__}'.format(messages) }}",
    "mutation": "{{ messages.append(1) }}",
}
BOUNDS = {  # template, what the one-line error says
    "huge-range": ("{% for i in range(10**9) %}x{% endfor %}", r"range\(\) of 1,000,000,000 items"),
    "nested-loops": ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
                     r"rendering took more than 0.2 s"),
    "loops-over-strings": ("{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
                           r"rendering took more than 0.2 s"),
    "recursion": ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recursion too deep"),
    "branching-recursion": ("{% macro f(n) %}{% if n < 500 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}"
                            "{{ f(0) }}", "rendering took more than 0.2 s|recursion too deep"),
    "megabytes-out": ("{% for i in range(1000) %}{{ 'x' * 100000 }}{% endfor %}", "the prompt grew past 1,04"),
    "string-times-int": ("{{ 'x' * 10**9 }}", r"a \* product of 1,000,000,000 items"),
    "doubling-by-tilde": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
                          "a ~ concatenation of"),
    "doubling-by-plus": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
                         r"a \+ sum of"),
    "center-filter": ("{{ 'x'|center(10**9) }}", r"center\(\) was given 1000000000"),
    "ljust-method": ("{{ 'x'.ljust(10**9) }}", r"ljust\(\) was given 1000000000"),
    "format-width": ("{{ '{:>999999999}'.format(1) }}", "format string with a huge width"),
    "format-nested-width": ("{{ '{:>{}}'.format(1, 10**9) }}", "format string with a huge width"),
    "percent-width": ("{{ '%0999999999d' % 1 }}", "format string with a huge width"),
    "percent-star": ("{{ '%*d' % (10**9, 1) }}", "format string with a huge width"),
    "power-tower": ("{{ 9 ** (9 ** 9) }}", "a power too large"),
    "power-of-a-power": ("{% set a = 2 ** 60000 %}{{ a ** 60000 }}", "a power too large"),
    "product-growth": ("{% set ns = namespace(n=2 ** 1000) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}"
                       "{% endfor %}", "a product of integers too large"),
    "replace-growth": ("{% set ns = namespace(s='xxxxxxxxxx') %}{% for i in range(30) %}"
                       "{% set ns.s = ns.s|replace('x', 'xxxxxxxxxx') %}{% endfor %}", r"replace\(\)'s result"),
    "join-growth": ("{{ range(100000)|join('x' * 100000) }}", "join's result"),
    "indent-growth": ("{{ ('a\\n' * 100000)|indent('z' * 9999) }}", "indent's result"),
    "lipsum": ("{{ lipsum(10**6) }}", r"lipsum\(\) was given 1000000"),
    "list-of-big-strings-out": ("{{ ['x' * 1000000] * 1000 }}", "an output of"),
    "list-of-big-strings-joined": ("{{ (['x' * 1000000] * 1000)|join }}", "join's result"),
    "list-of-big-strings-concatenated": ("{{ 'a' ~ (['x' * 1000000] * 1000) }}", "a ~ concatenation"),
    "list-of-big-strings-formatted": ("{{ '%s' % [['x' * 1000000] * 1000] }}", "a % formatting"),
    "list-of-big-strings-as-json": ("{{ (['x' * 1000000] * 1000)|tojson }}", "tojson's result"),
    "tojson-indent": ("{{ messages|tojson(indent=10**9) }}", r"tojson\(\) was given 1000000000"),
    "batch-fill": ("{{ messages|batch(10**9, 'x')|list }}", r"batch\(\) was given 1000000000"),
    "strftime-width": ("{{ strftime_now('%0999999999Y') }}", "format string with a huge width"),
}


def _render_limited(source: str, seconds: float = 0.2):
    from flashinfer_cli.tokenizer import ChatTemplate, TemplateLimits

    return ChatTemplate(source, TemplateLimits(seconds=seconds)).render(CHATS[1], add_generation_prompt=True)


@pytest.mark.parametrize("name", sorted(SANDBOX_ESCAPES))
def test_chat_template_cannot_leave_the_sandbox(name):
    """Python's internals stay out of reach: a one-line error, or (str.format's sandboxed
    formatter) nothing rendered where the attribute was."""
    from flashinfer_cli.tokenizer import ChatTemplateError

    try:
        out = _render_limited(SANDBOX_ESCAPES[name])
    except ChatTemplateError as exc:
        assert re.search("unsafe|not safely callable", str(exc)) and "\n" not in str(exc)
    else:
        assert name == "format-attr" and out == ""


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_chat_template_bounds(name):
    """Loops without end, recursion, megabytes of output and the operations that would build a
    huge value in one step are stopped with a one-line error, in about the time limit, before
    allocating what they ask for."""
    import time
    import tracemalloc

    from flashinfer_cli.tokenizer import ChatTemplateError

    source, fault = BOUNDS[name]
    start = time.monotonic()
    tracemalloc.start()
    try:
        with pytest.raises(ChatTemplateError, match=fault) as info:
            _render_limited(source)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "\n" not in str(info.value)
    assert time.monotonic() - start < 5  # 0.2 s of rendering, on a busy machine
    assert peak < 64 << 20, f"{peak:,} bytes"


def test_chat_template_limits_leave_real_templates_alone(smollm2):
    """Markdown's ** in a % format, a long conversation echoed back, loops over messages: within
    every limit."""
    from flashinfer_cli.tokenizer import ChatTemplate

    long_chat = [{"role": "user", "content": "word " * 200_000}] * 3  # 3 MB: beyond 1 MiB of output
    assert len(smollm2.render_chat(long_chat)) > 3_000_000
    assert ChatTemplate("{{ '**%s**' % 'bold' }}{{ '%5.2f' % 3.14159 }}").render([]) == "**bold** 3.14"


# ---------------------------------------------------------------------------------------------
# hostile tokenizer files: TokenizerError, one line (tests/test_fuzz.py fuzzes them)

@pytest.mark.parametrize("name,content,fault", [
    ("tokenizer_config.json", "[1, 2]", "not a JSON object"),                                   # was AttributeError
    ("tokenizer_config.json", "[" * 100_000, "unreadable JSON"),                                 # was RecursionError
    ("tokenizer_config.json", json.dumps({"chat_template": [{"name": ["x"], "template": "t"}]}), None),  # was TypeError
    ("tokenizer_config.json", json.dumps({"chat_template": 5}), "chat_template is not a string"),
    ("chat_template.jinja", b"\xff\xfe{{ x }}", "not UTF-8"),                                    # was UnicodeDecodeError
    ("tokenizer.json", b"\xff\xfe", "not UTF-8"),
    ("tokenizer.json", '{"model": {"type": "BPE", "vocab": 5}}', "not a tokenizers document"),
])
def test_hostile_hf_tokenizer_files(tmp_path, name, content, fault):
    from flashinfer_cli.tokenizer import TokenizerError

    d = _train_bytelevel(tmp_path)
    if name == "chat_template.jinja":
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        del cfg["chat_template"]
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    if fault is None:
        assert spec_from_hf_dir(d).chat_template is None
        return
    with pytest.raises(TokenizerError, match=fault) as info:
        spec_from_hf_dir(d)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("entry,fault", [
    ({"bos_id": "1", "eos_ids": [2]}, "bad tokenizer entry"),
    ({"bos_id": None, "eos_ids": "abc"}, "bad tokenizer entry"),            # was three eos ids 'a', 'b', 'c'
    ({"bos_id": None, "eos_ids": [2], "add_bos": "yes"}, "bad tokenizer entry"),
    ({"bos_id": None, "eos_ids": [2], "chat_template": 5}, "bad tokenizer entry"),
    ({"bos_id": 10 ** 6, "eos_ids": [2]}, "outside the vocabulary"),        # would index past the embedding
    ([1, 2], "not an object"),
])
def test_hostile_manifest_tokenizer_entry(tmp_path, entry, fault):
    from flashinfer_cli.tokenizer import TokenizerError

    d = _train_bytelevel(tmp_path)
    with pytest.raises(TokenizerError, match=fault):
        Tokenizer.from_model_dir(d, entry)


@pytest.mark.parametrize("text", [b"\xff\xfe", b"{not json", b'{"model": 5}'])
def test_unreadable_model_tokenizer_json(tmp_path, text):
    """A damaged tokenizer.json in a model directory: TokenizerError (a ValueError), not the
    tokenizers library's bare Exception or UnicodeDecodeError."""
    from flashinfer_cli.tokenizer import TokenizerError

    (tmp_path / "tokenizer.json").write_bytes(text)
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_model_dir(tmp_path, {"bos_id": None, "eos_ids": []})


@pytest.mark.parametrize("key,vtype,value,fault", [
    ("tokenizer.ggml.pre", "ARR", ("STR", [b"qwen2"]), "unsupported GGUF pre-tokenizer"),   # was TypeError (unhashable)
    ("tokenizer.ggml.model", "U32", 2, "unsupported GGUF tokenizer model"),
    ("tokenizer.ggml.bos_token_id", "F32", float("nan"), "not a token id"),                 # was ValueError from int(nan)
    ("tokenizer.ggml.token_type", "ARR", ("I32", [1, 2]), "token_type has 2 entries"),      # was IndexError
    ("tokenizer.ggml.merges", "U32", 5, "not a list of str"),                               # was TypeError
    ("tokenizer.chat_template", "U32", 5, "chat_template is not a string"),
    ("tokenizer.ggml.tokens", "ARR", ("STR", [b"a", b"\xff"]), "unreadable"),              # was UnicodeDecodeError
])
def test_hostile_gguf_tokenizer_metadata(tmp_path, key, vtype, value, fault):
    import _fuzz
    from _fuzz import gguf_bytes, gguf_parts, write_seed_gguf
    from flashinfer_cli.checkpoint import _open_gguf_reader
    from flashinfer_cli.tokenizer import TokenizerError

    kvs, tensors, data = gguf_parts(write_seed_gguf(tmp_path / "seed.gguf"))
    if vtype == "ARR":
        value = (getattr(_fuzz, value[0]), value[1])
    kvs = [kv for kv in kvs if kv[0] != key] + [(key, getattr(_fuzz, vtype), value)]
    (tmp_path / "bad.gguf").write_bytes(gguf_bytes(kvs, tensors, data))
    with pytest.raises(TokenizerError, match=fault):
        spec_from_gguf(_open_gguf_reader(tmp_path / "bad.gguf"))
