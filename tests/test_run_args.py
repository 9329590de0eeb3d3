"""What `fic run`'s first argument means: a model (store or catalog name, a .gguf file or a Hugging
Face directory converted on first use, a repo id) or the start of the prompt."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from _tiny import make_checkpoint  # noqa: E402
from flashinfer_cli import fmt, pull  # noqa: E402
from flashinfer_cli.cli import DEFAULT_MODEL, _model_and_prompt, cli  # noqa: E402
from flashinfer_cli.convert import ConvertOptions, convert  # noqa: E402
from flashinfer_cli.store import Store  # noqa: E402

MAX = 8


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """(Hugging Face directory, transformers model, transformers tokenizer)."""
    root = tmp_path_factory.mktemp("hf")
    hf = make_checkpoint("llama_tied", root / "tiny-hf", seed=3)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(root / "tiny-hf" / "tokenizer.json"))
    tok.chat_template = json.loads((root / "tiny-hf" / "tokenizer_config.json").read_text())["chat_template"]
    return root / "tiny-hf", hf, tok


@pytest.fixture
def home(tmp_path, monkeypatch) -> Store:
    monkeypatch.setenv("FIC_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FIC_CATALOG", raising=False)
    return Store()


def transformers_answer(hf, tok, prompt: str) -> str:
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    out = hf.generate(torch.tensor([list(ids)]), max_new_tokens=MAX, do_sample=False, eos_token_id=2,
                      pad_token_id=2)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


def invoke(*args: str, stdin: str | None = None):
    return CliRunner().invoke(cli, list(args), input=stdin)


def test_a_word_that_names_no_model_is_the_prompt(home, hf_dir):
    """`fic run hello` asks the default model "hello" (here the default's name holds the tiny model,
    so nothing is pulled)."""
    path, hf, tok = hf_dir
    convert(path, home.path(DEFAULT_MODEL), name=DEFAULT_MODEL,
            options=ConvertOptions(quant="f32", expert_size=32), progress=False)
    res = invoke("run", "hello", "--max-tokens", str(MAX))
    assert res.exit_code == 0, res.output
    assert res.stdout == transformers_answer(hf, tok, "hello") + "\n"
    assert res.stderr == ""  # "hello" is no model's near-miss: nothing to say
    res = invoke("run", "hello", "there", "--max-tokens", str(MAX))
    assert res.exit_code == 0 and res.stdout == transformers_answer(hf, tok, "hello there") + "\n"


def test_a_near_miss_of_a_model_name_is_said(home, capsys):
    assert _model_and_prompt(["smollm2", "hi"]) == (DEFAULT_MODEL, ["smollm2", "hi"])
    assert capsys.readouterr().err == (f"fic: 'smollm2' names no model here; taking it as the prompt to "
                                       f"{DEFAULT_MODEL} (did you mean 'smollm2-135m'?)\n")
    assert _model_and_prompt(["qwen2.5-coder-05b", "hi"])[0] == DEFAULT_MODEL
    assert "did you mean 'qwen2.5-coder-0.5b'?" in capsys.readouterr().err
    assert _model_and_prompt(["Tell", "me", "a", "joke"]) == (DEFAULT_MODEL, ["Tell", "me", "a", "joke"])
    assert capsys.readouterr().err == ""


def test_what_the_first_argument_names(home, tmp_path, monkeypatch, capsys):
    assert _model_and_prompt([]) == (DEFAULT_MODEL, [])
    assert _model_and_prompt(["smollm2-135m", "hi"]) == ("smollm2-135m", ["hi"])  # a catalog name
    assert _model_and_prompt(["What is 3/4 of 12?"]) == (DEFAULT_MODEL, ["What is 3/4 of 12?"])
    assert _model_and_prompt(["Qwen/Qwen2.5-0.5B-Instruct", "hi"]) == ("Qwen/Qwen2.5-0.5B-Instruct", ["hi"])
    assert _model_and_prompt(["./x.gguf", "hi"]) == ("./x.gguf", ["hi"])
    # a store name that is a path here too: the store's model, and said
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135m").mkdir()
    assert _model_and_prompt(["smollm2-135m", "hi"]) == ("smollm2-135m", ["hi"])
    assert "'smollm2-135m' is a model name and a path here; using the model" in capsys.readouterr().err


@pytest.mark.parametrize("arg", ["./missing.gguf", "missing.gguf", "/no/such/dir", "~/no-such-model-dir/"])
def test_a_path_where_nothing_is_says_no_such_file(home, arg):
    res = invoke("run", arg, "hi")
    assert res.exit_code == 1
    assert res.stderr == f"fic: no such file: {arg}\n"


def test_a_file_that_is_no_model_is_said(home, tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("hello")
    res = invoke("run", str(junk), "hi")
    assert res.exit_code == 1 and res.stderr.startswith(f"fic: {junk}: not a model") and res.stderr.count("\n") == 1


def test_a_hugging_face_directory_runs_by_path(home, hf_dir, tmp_path, monkeypatch):
    """Converted into the store on first use (with a note), run, then found there the next time."""
    path, hf, tok = hf_dir
    local = tmp_path / "my-model"
    shutil.copytree(path, local)
    monkeypatch.chdir(tmp_path)
    want = transformers_answer(hf, tok, "What is the capital of Germany?") + "\n"
    res = invoke("run", "./my-model", "What is the capital of Germany?", "--max-tokens", str(MAX), "--verbose")
    assert res.exit_code == 0, res.output
    assert res.stdout == want
    assert "fic: converting ./my-model into the store as my-model (first use" in res.stderr
    assert "pull duration:" in res.stderr and "load duration:" in res.stderr
    assert home.exists("my-model")
    res = invoke("run", "./my-model", "What is the capital of Germany?", "--max-tokens", str(MAX), "--verbose")
    assert res.exit_code == 0 and res.stdout == want
    assert "converting" not in res.stderr and "pull duration:" not in res.stderr
    # the store name now runs too, and another directory of the same name is not mistaken for it
    assert invoke("run", "my-model", "What is the capital of Germany?", "--max-tokens", str(MAX)).stdout == want
    other = tmp_path / "elsewhere" / "my-model"
    shutil.copytree(path, other)
    res = invoke("run", str(other), "hi")
    assert res.exit_code == 1 and "came from" in res.stderr and "--name" in res.stderr


def test_a_gguf_file_runs_by_path_and_is_converted_again_when_it_changes(home, tmp_path):
    from test_convert import tiny_model, write_gguf

    gguf_path = tmp_path / "Tiny-Model.Q8_0.gguf"
    write_gguf(gguf_path, tiny_model("llama", seed=5))
    said: list[str] = []
    got = pull.resolve_model(str(gguf_path), log=said.append)
    assert got == home.path("tiny-model.q8_0") and said[0].startswith(f"fic: converting {gguf_path}")
    res = invoke("run", str(gguf_path), "--raw", "!!", "--max-tokens", "4")
    assert res.exit_code == 0 and "converting" not in res.stderr, res.output
    direct = invoke("run", str(got), "--raw", "!!", "--max-tokens", "4")
    assert res.stdout == direct.stdout
    said.clear()
    assert pull.resolve_model(str(gguf_path), log=said.append) == got and said == []
    # a file rewritten since: converted again, and said
    write_gguf(gguf_path, tiny_model("llama", seed=6))
    later = time.time() + 5
    os.utime(gguf_path, (later, later))
    assert pull.resolve_model(str(gguf_path), log=said.append) == got
    assert said[0] == f"fic: {gguf_path} changed since it was converted; converting it again"
    stamp = fmt.parse_manifest(got / fmt.MANIFEST_FILE).provenance
    assert stamp["source_mtime_ns"] == os.stat(gguf_path).st_mtime_ns  # the new file's conversion
    res = invoke("run", str(gguf_path), "--raw", "!!", "--max-tokens", "4")
    assert res.exit_code == 0 and "converting" not in res.stderr


def test_show_does_not_convert_a_path(home, hf_dir):
    res = invoke("show", str(hf_dir[0]))
    assert res.exit_code == 1 and "is not converted yet: `fic pull" in res.stderr
    assert not home.exists("tiny-hf")
