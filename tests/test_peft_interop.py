"""LoRA adapters <-> Hugging Face PEFT adapter folders (t5x_lite/hf/peft.py), both ways, on random tiny T5 and BERT:
the adapted logits agree with PEFT's (float32, atol 1e-4), and the folder is what PEFT writes."""

from __future__ import annotations

import copy
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5x_lite import adapters, hf
from t5x_lite.adapters import lora
from t5x_lite.hf import peft as peft_io
from tests.hf.conftest import hf_logits, random_hf_t5, random_inputs

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

RANK, ALPHA = 4, 8.0


def t5_case():
    """(HF model, its logits function, ours, HF target modules) of a random tiny T5 v1.1."""
    enc, dec = random_inputs(96)
    return (random_hf_t5("t5_v1_1"), lambda m: hf_logits(m, enc, dec),
            lambda n: np.asarray(n(jnp.asarray(enc), jnp.asarray(dec))), ["q", "v"])


def bert_case():
    """The same of a random tiny BertForMaskedLM (its MLM logits)."""
    from tests.hf.test_bert import hf_outputs, our_outputs, random_hf_bert
    from tests.hf.test_bert import random_inputs as bert_inputs

    tokens, types = bert_inputs()
    return (random_hf_bert("mlm"), lambda m: hf_outputs(m, tokens, types).logits.numpy(),
            lambda n: our_outputs(n, tokens, types)["logits"], ["query", "value"])


CASES = {"t5": t5_case, "bert": bert_case}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(HF base, its folder, HF logits fn, our logits fn, target modules)."""
    model, hf_logits_of, our_logits_of, targets = CASES[request.param]()
    folder = tmp_path_factory.mktemp(f"{request.param}_base")
    model.save_pretrained(folder)
    return model, folder, hf_logits_of, our_logits_of, targets


def with_params(network: nnx.Module, params: dict) -> nnx.Module:
    state = nnx.state(network, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(network, state)
    return network


def test_a_peft_adapter_imports_with_peft_logits(case, tmp_path):
    model, folder, hf_logits_of, our_logits_of, targets = case
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=RANK, lora_alpha=ALPHA,
                                                                           target_modules=targets))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)  # PEFT starts B at zero, which would hide a wrong mapping
    peft_model.eval().save_pretrained(tmp_path)
    expected = hf_logits_of(peft_model)
    network, _ = hf.from_pretrained(folder)
    base = nnx.to_pure_dict(nnx.state(network, nnx.Param))
    adapter_params, fields = peft_io.load_adapter(tmp_path, base, network.config)
    assert (fields["rank"], fields["alpha"]) == (RANK, ALPHA)
    lora.apply_lora(network, lora.LoRAConfig(**fields), nnx.Rngs(0))
    with_params(network, adapters.merge_params(base, adapter_params))
    logits = our_logits_of(network)
    assert np.abs(logits - expected).max() < 1e-4
    assert np.abs(logits - hf_logits_of(model)).max() > 1e-2  # the adapter does change them


def test_our_adapter_exports_as_peft_loads_it(case, tmp_path):
    model, folder, hf_logits_of, our_logits_of, targets = case
    network, _ = hf.from_pretrained(folder)
    config = lora.LoRAConfig(rank=RANK, alpha=ALPHA)
    lora.apply_lora(network, config, nnx.Rngs(0))
    for i, (_, variable) in enumerate(nnx.to_flat_state(nnx.state(network, lora.LoRAParam))):
        variable[...] = np.random.default_rng(i).normal(0.0, 0.2, variable.shape).astype(np.float32)
    params = nnx.to_pure_dict(nnx.state(network, nnx.Param))
    out = peft_io.save_adapter(params, network.config, config, tmp_path / "adapter", base_model=str(folder))
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["target_modules"] == targets and written["r"] == RANK and written["lora_alpha"] == ALPHA
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(model), out).eval()
    # The keys are the ones PEFT itself writes for this adapter.
    peft_model.save_pretrained(tmp_path / "resaved")
    from safetensors.numpy import load_file

    assert set(load_file(tmp_path / "resaved" / "adapter_model.safetensors")) == set(
        load_file(out / "adapter_model.safetensors"))
    np.testing.assert_allclose(hf_logits_of(peft_model), our_logits_of(network), atol=1e-4, rtol=0)
