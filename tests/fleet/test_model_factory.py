import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from fleet.cli import app
from fleet.model_factory import ARCHITECTURES, folder_digest, make_model, model_config


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_factory_folder_loads_and_generates_offline(model_factory, arch: str) -> None:
    path = model_factory(arch)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert json.loads((path / "config.json").read_text())["model_type"] == arch

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello, café 🚀"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert out.shape == (1, ids.shape[1] + 8)
    assert tokenizer.decode(ids[0]) == prompt  # byte-level BPE round-trips


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_auto_tokenizer_ids_match_tokenizer_json(model_factory, arch: str) -> None:
    from tokenizers import Tokenizer

    path = model_factory(arch)
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(path)
    text = "Straße  naïve\n\n  def f(x):\treturn x**2 日本語 🚀<|im_end|>"
    assert auto(text).input_ids == raw.encode(text).ids


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path) -> None:
    a = make_model(tmp_path / "a", arch="qwen2", seed=3)
    b = make_model(tmp_path / "b", arch="qwen2", seed=3)
    c = make_model(tmp_path / "c", arch="qwen2", seed=4)
    assert folder_digest(a) == folder_digest(b)
    assert folder_digest(a) != folder_digest(c)


def test_small_size_is_about_100m_parameters() -> None:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config("llama", "small", 1024))
    assert 90e6 < sum(p.numel() for p in model.parameters()) < 110e6


def test_make_model_command(tmp_path) -> None:
    result = CliRunner().invoke(app, ["make-model", str(tmp_path / "m"), "--arch", "mistral"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "model.safetensors").exists()
    bad = CliRunner().invoke(app, ["make-model", str(tmp_path / "x"), "--arch", "gpt9"])
    assert bad.exit_code != 0 and "unknown architecture" in bad.output
