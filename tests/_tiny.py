"""Tiny random checkpoints in Hugging Face layout, made with transformers (torch CPU), for tests.

Each has a small byte-level BPE tokenizer trained here and a ChatML chat template, so the whole
path (convert, tokenizer, engine, CLI) runs on it in a fraction of a second.
"""
from __future__ import annotations

import json
from pathlib import Path

VOCAB = 320
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
          " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXT = ("The quick brown fox jumps over the lazy dog. Berlin is the capital of Germany. "
        "def f(x):\n    return x * 2\n  1. 2. 3. caf\u00e9 na\u00efve \u65e5\u672c 12345 ") * 20

# name -> (architecture class, config overrides)
KINDS = {
    "llama": ("LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama_tied": ("LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama3_rope": ("LlamaForCausalLM", dict(tie_word_embeddings=True, max_position_embeddings=512, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}, rope_theta=500000.0)),
    "qwen2": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3ForCausalLM", dict(tie_word_embeddings=False, head_dim=32)),
}


def make_tokenizer(dest: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    tok.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "add_bos_token": False, "chat_template": CHATML}))


def make_checkpoint(kind: str, dest: Path, *, seed: int = 0, n_layers: int = 2):
    """Save a random model of `kind` (see KINDS) with a tokenizer in `dest`; returns the torch model."""
    import torch
    import transformers

    cls_name, over = KINDS[kind]
    cls = getattr(transformers, cls_name)
    cfg_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    torch.manual_seed(seed)
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
              rope_theta=10000.0, bos_token_id=None, eos_token_id=2, pad_token_id=0)
    kw.update(over)
    model = cls(cfg_cls(**kw)).eval()
    widen_weights(model)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    make_tokenizer(dest)
    return model


def widen_weights(model, std: float = 0.15) -> None:
    """transformers' random init is tiny (std 0.02): widen it so logits (and a mixture's routes) have
    structure. Matrices (and stacked experts) N(0, std), biases N(0, 0.1), norms U(0.8, 1.2)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, std)
            elif "bias" in name:
                p.normal_(0, 0.1)
            else:
                p.uniform_(0.8, 1.2)


def add_gguf_tokenizer(w, vocab_size: int) -> None:
    """A byte-level BPE vocabulary of vocab_size tokens (two specials, printable characters, one
    merge) in a gguf.GGUFWriter: enough for llama.cpp to load a tiny file."""
    tokens = ["<|endoftext|>", "<|im_end|>"] + [chr(c) for c in range(33, 33 + vocab_size - 3)] + ["!!"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    w.add_token_merges(["! !"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)


def convert_tiny_experts(root: Path) -> Path:
    """A 3-layer tied Llama converted to fic's format in root / "plain": f32, 8 experts of 16 neurons
    per layer (calibration and selection tests)."""
    from flashinfer_cli.convert import ConvertOptions, convert

    make_checkpoint("llama_tied", root / "hf", seed=1, n_layers=3)
    return Path(convert(root / "hf", root / "plain", name="tiny", progress=False,
                        options=ConvertOptions(quant="f32", expert_size=16)))


def copy_model(src: Path, parent: Path, name: str = "tiny") -> Path:
    """A copy of the model directory src as parent / name (a test's own to rewrite)."""
    import shutil

    dest = parent / name
    shutil.copytree(src, dest)
    return dest
