"""Per-example LoRA gradients: hooks, vmap and the plain loop agree; f is the spec's function."""

from __future__ import annotations

import pytest
import torch

from engine.config import LoraSpec
from engine.features import answers
from engine.features.per_example import METHODS, AnswerScore, clipped_logit_odds, hook_grads, loop_grads
from engine.models import builtin, load, lora


def _model(spec: LoraSpec, quantize: str = "none"):
    path = builtin.tiny_llama()
    model = lora.add_lora(load.load_causal_lm(path, quantize=quantize), spec)
    with torch.no_grad():  # a fresh LoRA has B = 0, which would make every lora_A gradient zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return load.load_tokenizer(path), model.eval()


def _batch(tok):
    rows = [("short one\nAnswer:", " yes"), ("a much longer prompt " * 9 + "\nAnswer:", " no way at all"),
            ("middle sized prompt here\nAnswer:", " positive"), ("x\nAnswer:", " negative")]
    return answers.collate([answers.encode(tok, p, a, 64) for p, a in rows], tok.pad_token_id)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def test_three_methods_agree_in_float32():
    tok, model = _model(LoraSpec(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    score, batch = AnswerScore(model), _batch(tok)
    f_ref, g_ref = METHODS["loop"](score, batch)
    assert all(g.abs().sum() > 0 for g in g_ref.values())
    for method in ("hooks", "vmap"):
        f, g = METHODS[method](score, batch)
        assert g.keys() == g_ref.keys()
        assert _relative(f, f_ref) < 1e-5, method
        for name in g_ref:
            assert g[name].shape == (len(batch), g_ref[name].shape[1])
            assert _relative(g[name], g_ref[name]) < 1e-5, (method, name)


def test_batched_gradients_do_not_depend_on_batch_mates():
    tok, model = _model(LoraSpec(r=4))
    score, batch = AnswerScore(model), _batch(tok)
    _, together = hook_grads(score, batch)
    _, alone = hook_grads(score, batch.example(1))
    for name in together:
        assert _relative(together[name][1:2], alone[name]) < 1e-5


def test_only_chosen_layers_get_gradients():
    tok, model = _model(LoraSpec(r=4, layers=[1]))
    _, grads = hook_grads(AnswerScore(model), _batch(tok))
    assert grads and all(".layers.1." in name for name in grads)
    _, reference = loop_grads(AnswerScore(model), _batch(tok))
    assert all(_relative(grads[n], reference[n]) < 1e-5 for n in grads)


def test_f_is_the_mean_clipped_logit_odds_of_the_answer_tokens():
    tok, model = _model(LoraSpec(r=4))
    batch = _batch(tok)
    with torch.no_grad():
        f = AnswerScore(model)(*batch.tensors())
        for i in range(len(batch)):
            one = batch.example(i)
            logits = model(input_ids=one.input_ids).logits[0].float()
            probs = logits.softmax(-1)
            terms = []
            for pos, gold in zip(one.answer_pos[0].tolist(), one.answer_ids[0].tolist()):
                p = probs[pos, gold].item()
                p = p - 0.01 if p > 0.9 else (p + 0.01 if p < 0.001 else p)
                terms.append(torch.log(torch.tensor(p / (1 - p))).item())
            assert f[i].item() == pytest.approx(sum(terms) / len(terms), rel=1e-4, abs=1e-4)


def test_clipping_keeps_the_gradient_of_the_unclipped_function():
    logp = torch.log(torch.tensor([0.95, 0.0005, 0.5], dtype=torch.float64)).requires_grad_(True)
    clipped_logit_odds(logp).sum().backward()
    p = logp.exp().detach() + torch.tensor([-0.01, 0.01, 0.0], dtype=torch.float64)
    assert torch.allclose(logp.grad, logp.exp().detach() / (p * (1 - p)))


def test_qlora_hooks_match_the_loop():
    tok, model = _model(LoraSpec(r=4), quantize="nf4")
    score, batch = AnswerScore(model), _batch(tok)
    (f1, g1), (f2, g2) = hook_grads(score, batch), loop_grads(score, batch)
    assert _relative(f1, f2) < 1e-4
    assert all(_relative(g1[n], g2[n]) < 1e-4 for n in g1)


def _choices(tok):
    """Prompts with their labels' first tokens, the gold one first (an objective.choice_batch)."""
    from engine.features import objective

    labels = [tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in ("yes", "no", "maybe")]
    prompts = [tok(p)["input_ids"] for p in ("short one\nAnswer:", "a much longer prompt " * 9 + "\nAnswer:",
                                             "middle\nAnswer:")]
    rows = [(prompts[0], [labels[0], labels[1], labels[2]]), (prompts[1], [labels[1], labels[0]]),
            (prompts[2], [labels[2], labels[0], labels[1]])]
    return objective.choice_batch(rows, tok.pad_token_id), rows


def test_labels_f_is_the_clipped_log_odds_of_the_gold_label_among_its_tasks_labels():
    """objective=labels: f = log(p / (1 - p)) of the gold label renormalised over the row's labels
    only (a row with two labels ignores the third token column), and the three gradient methods
    agree on it."""
    tok, model = _model(LoraSpec(r=4))
    batch, rows = _choices(tok)
    score = AnswerScore(model, "labels")
    with torch.no_grad():
        f = score(*batch.tensors())
        for i, (prompt, choices) in enumerate(rows):
            logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].float()
            p = logits[choices].softmax(-1)[0].item()
            p = p - 0.01 if p > 0.9 else (p + 0.01 if p < 0.001 else p)
            assert f[i].item() == pytest.approx(float(torch.log(torch.tensor(p / (1 - p)))), rel=1e-4, abs=1e-4)
    f_ref, g_ref = loop_grads(score, batch)
    for method in ("hooks", "vmap"):
        f2, g2 = METHODS[method](score, batch)
        assert _relative(f2, f_ref) < 1e-5, method
        assert all(_relative(g2[n], g_ref[n]) < 1e-5 for n in g_ref), method
