"""`hived export --format hf`: models trained by the real command line, exported, and loaded by
`transformers` itself (AutoModelForCausalLM, AutoTokenizer), which must compute what hived
computes; and the export loaded back by hived."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from hived.config import ConfigError, ModelConfig
from hived.export.architectures import family
from hived.generate import SamplingParams, generate_ids
from hived.inference import load_model

from conftest import FAST, free_port, hived, make_corpus

transformers = pytest.importorskip("transformers")

ARCHITECTURES = {
    "llama": ({}, "LlamaForCausalLM"),
    "qwen3": ({"qk_norm": True}, "Qwen3ForCausalLM"),
    "gpt2": ({"pos": "learned", "norm": "layernorm", "mlp": "gelu"}, "GPT2LMHeadModel"),
}
PROMPT = "The night was dark and the sea"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    (tmp / "corpus.txt").write_text(make_corpus(), encoding="utf-8")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "cache"), "PYTHONUNBUFFERED": "1"}
    return tmp, env


@pytest.fixture(scope="module", params=[(a, t) for a in ARCHITECTURES for t in ("char", "bpe")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def exported(request, workdir):
    """A small model of the architecture, trained a few steps by `hived train`, and exported."""
    arch, tokenizer = request.param
    tmp, env = workdir
    name = f"{arch}-{tokenizer}"
    model = {"n_layer": 2, "n_embd": 64, "n_head": 4, **ARCHITECTURES[arch][0]}
    config = tmp / f"{name}.toml"
    config.write_text("[model]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in model.items()))
    run = tmp / name
    hived("train", "--config", str(config), "--data", str(tmp / "corpus.txt"), "--tokenizer", tokenizer,
          "--vocab-size", "320", "--steps", "8", "--out", str(run), "--no-ui", *FAST, env=env, timeout=180)
    out = tmp / "exports" / name
    said = hived("export", "--checkpoint", str(run / "final.pt"), "--format", "hf", "--out", str(out), env=env).stdout
    assert ARCHITECTURES[arch][1] in said
    return arch, run / "final.pt", out, env


def test_transformers_computes_what_hived_does(exported):
    arch, checkpoint, out, _ = exported
    ours, tok = load_model(checkpoint, "cpu")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    their_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert type(theirs).__name__ == ARCHITECTURES[arch][1]
    ids = tok.encode(PROMPT).tolist()
    assert their_tok(PROMPT, add_special_tokens=False)["input_ids"] == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        mine, _ = ours(x, x)
        difference = (mine - theirs(x).logits).abs().max().item()
    assert difference < 1e-4
    greedy = [int(t) for t in generate_ids(ours, ids, SamplingParams(max_tokens=24, temperature=0))]
    with torch.no_grad():
        theirs_greedy = theirs.generate(x, max_new_tokens=24, do_sample=False, pad_token_id=0,
                                        eos_token_id=None)[0, len(ids):].tolist()
    assert theirs_greedy == greedy
    assert their_tok.decode(greedy) == tok.decode(greedy)


def test_tied_embeddings_are_stored_once(exported):
    _, _, out, _ = exported
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in names
    assert (out / "generation_config.json").is_file() and (out / "tokenizer_config.json").is_file()


def test_the_export_comes_back_to_hived(exported):
    """`hived generate` and `hived chat` take the folder as they take the checkpoint."""
    _, checkpoint, out, env = exported
    args = ["--prompt", PROMPT, "--max-tokens", "20", "--temperature", "0"]
    from_checkpoint = hived("generate", "--checkpoint", str(checkpoint), *args, env=env).stdout
    assert hived("generate", "--checkpoint", str(out), *args, env=env).stdout == from_checkpoint
    chat = subprocess.run([sys.executable, "-m", "hived.cli", "chat", "--checkpoint", str(out)],
                          input="/temp 0\n/max 5\nhello\n/quit\n", capture_output=True, text=True, env=env,
                          timeout=120)
    assert chat.returncode == 0 and "bot> " in chat.stdout, chat.stderr


def test_a_served_export_answers_under_its_folders_name(exported):
    arch, _, out, env = exported
    if arch != "llama":
        pytest.skip("one architecture is enough: serving reads the folder as generate does")
    import urllib.request

    from test_api import wait_for

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hived.cli", "serve", "--checkpoint", str(out), "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/api/status", proc)
        models = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models"))
        assert [m["id"] for m in models["data"]] == [out.name]
        status = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status"))
        assert status["info"]["step"] == 8
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.parametrize("options, advice", [
    ({"norm": "layernorm"}, 'norm = "rmsnorm" (under [model])'),
    ({"mlp": "gelu"}, 'mlp = "swiglu"'),
    ({"pos": "learned"}, 'norm = "layernorm" and mlp = "gelu"'),
    ({"pos": "learned", "norm": "layernorm", "mlp": "gelu", "qk_norm": True}, "qk_norm = false"),
    ({"qk_norm": True, "bias": True}, "bias = false"),
    ({"window": 16}, "window = 0"),
    ({"parallel": True}, "parallel = false"),
])
def test_a_model_no_architecture_fits_is_refused_with_the_option_to_change(options, advice):
    with pytest.raises(ConfigError, match=re.escape(advice)):
        family(ModelConfig(**options))


@pytest.fixture(scope="module")
def gguf_files(exported):
    """The same model as GGUF, f16 and q8_0, by `hived export`."""
    _, checkpoint, out, env = exported
    files = {}
    for quant in ("f16", "q8_0"):
        files[quant] = out.parent / f"{out.name}-{quant}.gguf"
        hived("export", "--checkpoint", str(checkpoint), "--format", "gguf", "--quant", quant,
              "--out", str(files[quant]), env=env)
    return files


def test_a_gguf_holds_the_weights_and_the_tokenizer(exported, gguf_files):
    """Read back with the gguf package's own reader: every tensor is there, the embeddings are
    hived's to the precision of the format, and the vocabulary is the model's."""
    import gguf

    arch, checkpoint, _, _ = exported
    ours, tok = load_model(checkpoint, "cpu")
    for quant, path in gguf_files.items():
        reader = gguf.GGUFReader(path)
        fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
        assert fields["general.architecture"] == arch
        assert len(fields["tokenizer.ggml.tokens"]) == tok.vocab_size == ours.cfg.vocab_size
        assert fields[f"{arch}.context_length"] == ours.cfg.block_size
        tensors = {t.name: t for t in reader.tensors}
        assert len(tensors) == len(family(ours.cfg).slots)
        embedding = tensors["token_embd.weight"]
        values = torch.from_numpy(gguf.quants.dequantize(embedding.data, embedding.tensor_type).copy())
        wte = ours.wte.weight.detach()
        assert values.shape == wte.shape
        tolerance = 1e-3 if quant == "f16" else 2e-2 * wte.abs().max().item()
        assert (values - wte).abs().max().item() < tolerance, quant
        assert embedding.tensor_type == (gguf.GGMLQuantizationType.F16 if quant == "f16"
                                         else gguf.GGMLQuantizationType.Q8_0)


def test_llama_cpp_continues_as_hived_does(exported, gguf_files):
    """llama.cpp itself (llama-cpp-python, built from source: not installed in CI, see
    docs/benchmarks.md for the recorded run) reads the prompt into the same tokens and
    continues it greedily with the same 32 tokens, from the f16 file."""
    llama_cpp = pytest.importorskip("llama_cpp")
    _, checkpoint, _, _ = exported
    ours, tok = load_model(checkpoint, "cpu")
    ids = tok.encode(PROMPT).tolist()
    llm = llama_cpp.Llama(str(gguf_files["f16"]), n_ctx=ours.cfg.block_size, n_threads=2, verbose=False,
                          logits_all=True)  # without it, llama-cpp-python keeps no logits to read
    assert llm.tokenize(PROMPT.encode(), add_bos=False, special=False) == ids
    theirs: list[int] = []
    llm.eval(ids)
    for _ in range(32):
        theirs.append(int(llm.scores[llm.n_tokens - 1].argmax()))
        llm.eval(theirs[-1:])
    greedy = [int(t) for t in generate_ids(ours, ids, SamplingParams(max_tokens=32, temperature=0))]
    assert theirs == greedy
