"""Real models built without a hub: tiny Llama, SmolLM2-135M, MiniLM; LoRA and QLoRA on CPU."""

from __future__ import annotations

import json

import pytest
import torch

from engine.errors import SiftError
from engine.config import LoraSpec
from engine.models import builtin, load, lora


@pytest.fixture(scope="module")
def tiny():
    path = builtin.tiny_llama()
    return path, load.load_tokenizer(path)


def test_tiny_llama_is_seeded_and_finite(tiny):
    path, tok = tiny
    a, b = load.load_causal_lm(path), load.load_causal_lm(path)
    batch = tok(["the cat sat on the mat", "stocks fell today"], return_tensors="pt", padding=True)
    with torch.no_grad():
        la, lb = a(**batch).logits, b(**batch).logits
    assert torch.isfinite(la).all() and torch.equal(la, lb)
    assert la.shape[-1] == len(tok) == builtin.TINY_VOCAB


def test_lora_is_seeded_and_only_adapters_train(tiny):
    path, _ = tiny
    spec = LoraSpec(r=4, seed=7)
    one = lora.add_lora(load.load_causal_lm(path), spec)
    two = lora.add_lora(load.load_causal_lm(path), spec)
    other = lora.add_lora(load.load_causal_lm(path), spec.model_copy(update={"seed": 8}))
    trainable = {n: p for n, p in one.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    state = lambda m: {n: p for n, p in m.named_parameters() if "lora_A" in n}  # noqa: E731
    assert all(torch.equal(p, state(two)[n]) for n, p in state(one).items())
    assert not all(torch.equal(p, state(other)[n]) for n, p in state(one).items())


def test_qlora_backward_on_cpu(tiny):
    path, tok = tiny
    model = lora.add_lora(load.load_causal_lm(path, quantize="nf4"), LoraSpec(r=4))
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    model.train()
    batch = tok(["a quantized model still learns"], return_tensors="pt")
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert torch.isfinite(loss)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()


def test_adapter_roundtrip_in_safetensors(tiny, tmp_path):
    path, tok = tiny
    model = lora.add_lora(load.load_causal_lm(path), LoraSpec(r=4, seed=3))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    again = lora.load_adapter(load.load_causal_lm(path), tmp_path / "adapter")
    batch = tok(["same outputs after reload"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, again(**batch).logits, atol=1e-6)


def test_safetensors_only_and_clear_model_errors(tmp_path):
    with pytest.raises(SiftError, match="model folder not found"):
        load.load_causal_lm(tmp_path / "missing")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(SiftError, match="no .safetensors weights .sift loads safetensors only"):
        load.load_causal_lm(pickled)
    with pytest.raises(SiftError, match="not a PEFT adapter folder"):
        lora.load_adapter(None, tmp_path)
    with pytest.raises(SiftError, match="neither a built-in"):
        builtin.resolve("gpt-17")


def test_adapter_of_another_model_is_named(tiny, tmp_path):
    path, _ = tiny
    smol = lora.add_lora(load.load_causal_lm(builtin.smollm2_135m()), LoraSpec(r=4))
    smol.save_pretrained(tmp_path / "smol-adapter")
    with pytest.raises(SiftError, match="smol-adapter: adapter does not fit this model"):
        lora.load_adapter(load.load_causal_lm(path), tmp_path / "smol-adapter")


def test_smollm2_loads_and_predicts_sensibly():
    path = builtin.smollm2_135m()
    tok, model = load.load_tokenizer(path), load.load_causal_lm(path)
    batch = tok(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits[0, -1]
    assert torch.isfinite(logits).all()
    top = tok.decode(logits.topk(5).indices[:, None].flatten().tolist()[:1])
    assert "Paris" in top or "paris" in top.lower(), top


def test_minilm_embeddings_are_finite_and_meaningful():
    path = builtin.minilm()
    tok, model = load.load_tokenizer(path), load.load_encoder(path)
    texts = ["A dog runs in the park.", "A puppy is running on the grass.", "Stock markets fell sharply."]
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb.shape == (3, 384) and torch.isfinite(emb).all()
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.3
