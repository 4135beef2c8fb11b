"""Our Llama-family implementation and loader against transformers on the same folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from engine_helpers import ARCHS, hf_greedy, hf_logits, random_prompts
from safetensors.torch import load_file, save_file

from replica import SamplingParams
from replica.engine.config import ModelConfig
from replica.kernels import get_ops
from replica.models import AttentionMetadata, load_model


def _prefill_logits(path, ids: list[int], dtype=torch.float32) -> torch.Tensor:
    """Logits of every position from one prefill through our model and a paged cache."""
    cfg = ModelConfig.from_folder(path)
    model = load_model(path, cfg, get_ops("torch"), dtype, torch.device("cpu"), 256)
    block_size, num_blocks = 16, -(-len(ids) // 16) + 1
    shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    caches = [torch.zeros(shape, dtype=dtype) for _ in range(2 * cfg.num_layers)]
    model.bind_kv_cache(caches[: cfg.num_layers], caches[cfg.num_layers :])
    n = len(ids)
    order = torch.arange(num_blocks - 1, -1, -1, dtype=torch.int32)  # blocks in reverse order
    positions = torch.arange(n)
    meta = AttentionMetadata(
        slot_mapping=order[positions // block_size].long() * block_size + positions % block_size,
        block_tables=order[None, :],
        seq_lens=torch.tensor([n], dtype=torch.int32),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        max_seq_len=n,
        max_query_len=n,
    )
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), positions, meta))


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_logits_match_transformers(arch, tiny_models) -> None:
    ids = random_prompts([37], seed=40)[0]
    ours = _prefill_logits(tiny_models[arch], ids)
    torch.testing.assert_close(ours, hf_logits(tiny_models[arch], ids), atol=2e-5, rtol=1e-4)


def test_config_reads_architecture_flags(tiny_models) -> None:
    qwen2 = ModelConfig.from_folder(tiny_models["qwen2"])
    qwen3 = ModelConfig.from_folder(tiny_models["qwen3"])
    llama = ModelConfig.from_folder(tiny_models["llama"])
    assert qwen2.qkv_bias and not qwen2.o_bias and qwen2.tie_word_embeddings
    assert qwen3.qk_norm and not qwen3.qkv_bias
    assert not llama.tie_word_embeddings and llama.rope_theta == 500000.0
    assert llama.eos_token_ids[0] == 2 and len(llama.eos_token_ids) == 2


def test_sharded_checkpoint_with_index(tiny_models, tmp_path, make_llm) -> None:
    source = tiny_models["qwen2"]
    target = tmp_path / "sharded"
    shutil.copytree(source, target)
    tensors = load_file(str(target / "model.safetensors"))
    (target / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(target / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (target / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ids = random_prompts([20], seed=41)[0]
    torch.testing.assert_close(_prefill_logits(target, ids), _prefill_logits(source, ids))


def test_llama3_rope_scaling_matches_transformers(tmp_path, make_llm) -> None:
    from fleet.model_factory import make_model

    scaling = {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_theta": 500000.0,
    }  # fmt: skip
    # The model_factory fixture keys its cache on hashable overrides only, so build it here.
    path = make_model(tmp_path / "llama3-rope", arch="llama", rope_parameters=scaling)
    assert ModelConfig.from_folder(path).rope_scaling["rope_type"] == "llama3"
    ids = random_prompts([150], seed=42)[0]  # past the original context, where scaling matters
    torch.testing.assert_close(
        _prefill_logits(path, ids), hf_logits(path, ids), atol=2e-5, rtol=1e-4
    )
    out = make_llm(path).generate(ids, SamplingParams(temperature=0, max_tokens=10))[0]
    assert out.outputs[0].token_ids == hf_greedy(path, ids, 10)


def test_bfloat16_stays_close_to_transformers(tiny_models, make_llm) -> None:
    """bf16 rounding makes long greedy runs diverge: compare logits and a short run."""
    from transformers import AutoModelForCausalLM

    path = tiny_models["llama"]
    ids = random_prompts([30], seed=43)[0]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].float()
    ours = _prefill_logits(path, ids, torch.bfloat16)
    assert (ours - want).abs().max() < 0.1
    assert (ours.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
    llm = make_llm(path, dtype="bfloat16")
    first = llm.generate(ids, SamplingParams(temperature=0, max_tokens=1))[0].outputs[0].token_ids
    assert first == [want[-1].argmax().item()]
