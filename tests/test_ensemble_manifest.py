"""The ensemble manifest's checks and the reference (transformers + PEFT) label scoring."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine.ensemble import labels, manifest
from engine.ensemble.model import EnsembleModel
from engine.errors import SiftError
from engine.models import builtin, load


def _edited(tiny_manifest, tmp_path, edit) -> str:
    folder = tmp_path / "copy"
    shutil.copytree(tiny_manifest.parent, folder)
    raw = json.loads((folder / manifest.FILENAME).read_text())
    edit(raw, folder)
    (folder / manifest.FILENAME).write_text(json.dumps(raw))
    return str(folder / manifest.FILENAME)


def test_load_makes_adapter_paths_absolute(tiny_manifest):
    loaded = manifest.load(tiny_manifest.parent)
    assert [a.name for a in loaded.adapters] == ["group-0", "group-1", "group-2"]
    assert all(a.path.startswith("/") for a in loaded.adapters)


@pytest.mark.parametrize("edit, message", [
    (lambda raw, folder: shutil.rmtree(folder / "adapters/group-1"),
     "adapter 'group-1': .* is not a PEFT adapter folder"),
    (lambda raw, folder: raw["tasks"]["wordnet-animal-plant"]["weights"].update({"group-9": 0.0}),
     "task 'wordnet-animal-plant' weights unknown adapter\\(s\\) \\['group-9'\\]"),
    (lambda raw, folder: raw["tasks"]["fortunes-law-politics"]["weights"].update({"group-1": 0.9}),
     "weights sum to 1.3000, not 1"),
    (lambda raw, folder: raw.update(max_lora_rank=2), "has rank 4 > max_lora_rank 2"),
    (lambda raw, folder: raw["adapters"][0].update(rank=8), "has rank 4, the manifest says 8"),
    (lambda raw, folder: raw["adapters"][2].update(name="group-0"), "adapter names repeat"),
    (lambda raw, folder: raw["tasks"]["fortunes-law-politics"].update(boost=[{"adapter": "boost-9", "step": 0.5}]),
     "task 'fortunes-law-politics' boosts with unknown adapter\\(s\\) \\['boost-9'\\]"),
    (lambda raw, folder: raw["tasks"]["fortunes-law-politics"].update(boost=[{"adapter": "group-2", "step": 0}]),
     "step: Input should be greater than 0"),
    (lambda raw, folder: raw.update(anchor="nope"), "anchor 'nope' is not an adapter of the manifest"),
])
def test_bad_manifests_fail_in_one_line(tiny_manifest, tmp_path, edit, message):
    with pytest.raises(SiftError, match=message) as err:
        manifest.load(_edited(tiny_manifest, tmp_path, edit))
    assert "\n" not in str(err.value)


def test_unknown_task_and_adapter_are_named(tiny_manifest):
    loaded = manifest.load(tiny_manifest)
    with pytest.raises(SiftError, match="unknown task 'nope'; the manifest has wordnet-animal-plant"):
        loaded.task("nope")
    with pytest.raises(SiftError, match="unknown adapter 'nope'"):
        loaded.adapter("nope")


def test_labels_sharing_a_first_token_are_refused():
    tokenizer = load.load_tokenizer(builtin.resolve("tiny-llama"))
    # " negative" and " neutral" both start with the tiny tokenizer's " ne".
    with pytest.raises(SiftError, match="labels \\['negative', 'neutral'\\] start with the same token"):
        labels.label_token_ids(tokenizer, " {label}", ["negative", "neutral", "positive"])


def test_reference_scoring_matches_a_plain_forward_per_adapter(tiny_manifest):
    from peft import PeftModel

    ensemble = EnsembleModel.load(manifest.load(tiny_manifest))
    texts = ["A small furry animal that climbs trees.", "A tall plant with yellow flowers growing in fields of grain"]
    probs, per_adapter = ensemble.classify("wordnet-animal-plant", texts)
    assert set(per_adapter) == {"group-0", "group-1", "group-2"}
    assert torch.allclose(probs.sum(-1), torch.ones(2, dtype=probs.dtype))
    # Adapters differ (random non-zero weights), so a mix-up would show.
    assert (per_adapter["group-0"] - per_adapter["group-1"]).abs().max() > 1e-3
    # Each adapter alone, the plain way: a fresh PeftModel, full logits, unpadded prompts.
    tokenizer = ensemble.tokenizer
    ids = tokenizer(" animal", add_special_tokens=False)["input_ids"][0], \
        tokenizer(" plant", add_special_tokens=False)["input_ids"][0]
    for name in ["group-0", "group-2"]:
        base = load.load_causal_lm(builtin.resolve("tiny-llama"))
        single = PeftModel.from_pretrained(base, ensemble.manifest.adapter(name).path).eval()
        for i, text in enumerate(texts):
            prompt = tokenizer(f"{text}\nAnswer:", return_tensors="pt")["input_ids"]
            with torch.no_grad():
                logp = single(prompt).logits[0, -1].log_softmax(-1)
            assert torch.allclose(per_adapter[name][i], logp[list(ids)], atol=1e-5)
    weights = ensemble.manifest.task("wordnet-animal-plant").weights
    expected = sum(w * torch.softmax(per_adapter[n].double(), -1) for n, w in weights.items())
    assert torch.allclose(probs, expected)


def test_prompts_are_formatted_with_the_task_as_in_training(tiny_manifest):
    loaded = manifest.load(tiny_manifest).model_copy(update={"prompt": "{task}: {text}\nAnswer:"})
    tokenizer = load.load_tokenizer(builtin.resolve("tiny-llama"))
    ids = labels.prompt_ids(tokenizer, loaded, "a cat", "wordnet-animal-plant")
    assert ids == tokenizer("wordnet-animal-plant: a cat\nAnswer:")["input_ids"]


def test_an_adapter_that_fails_to_load_is_named(tiny_manifest, tmp_path):
    def corrupt(raw, folder):
        (folder / "adapters/group-2/adapter_model.safetensors").write_bytes(b"not a safetensors file")

    broken = manifest.load(_edited(tiny_manifest, tmp_path, corrupt))
    with pytest.raises(SiftError, match="adapter 'group-2' \\(.*group-2\\) does not load") as err:
        EnsembleModel.load(broken)
    assert "\n" not in str(err.value)


def test_update_swaps_adapters_without_reloading_the_base(tiny_manifest, tmp_path):
    full = manifest.load(tiny_manifest)
    ensemble = EnsembleModel.load(full)
    base = ensemble.model.get_base_model()

    def drop_group_2(raw, folder):
        raw["adapters"] = raw["adapters"][:2]
        raw["tasks"]["wordnet-animal-plant"]["weights"] = {"group-0": 0.5, "group-1": 0.5}
        raw["tasks"]["fortunes-law-politics"]["weights"] = {"group-1": 1.0}

    smaller = manifest.load(_edited(tiny_manifest, tmp_path, drop_group_2))
    ensemble.update(smaller)
    assert set(ensemble.model.peft_config) == {"group-0", "group-1"}
    assert ensemble.model.get_base_model() is base
    texts = ["A small furry animal that climbs trees."]
    fresh = EnsembleModel.load(smaller).label_logprobs("wordnet-animal-plant", texts)
    updated = ensemble.label_logprobs("wordnet-animal-plant", texts)
    for name in fresh:
        assert torch.allclose(fresh[name], updated[name])
    ensemble.update(full)
    assert set(ensemble.model.peft_config) == {"group-0", "group-1", "group-2"}


def test_boosting_steps_are_added_in_label_logit_space(tiny_manifest, tmp_path):
    """A boosted task's prediction: softmax(log mixture + nu * (boost adapter - anchor)), the
    anchor being the bare base here; the models it needs are scored by default."""
    def boost_with_group_2(raw, folder):
        raw["tasks"]["fortunes-law-politics"]["weights"] = {"group-0": 0.7, "group-1": 0.3}
        raw["tasks"]["fortunes-law-politics"]["boost"] = [{"adapter": "group-2", "step": 0.5}]

    loaded = manifest.load(_edited(tiny_manifest, tmp_path, boost_with_group_2))
    assert loaded.models("fortunes-law-politics") == ["group-0", "group-1", "group-2", None]
    assert loaded.models("wordnet-animal-plant") == ["group-0", "group-1", "group-2"]
    ensemble = EnsembleModel.load(loaded)
    texts = ["Laws are made to be broken.", "Politics is the art of the possible."]
    probs, per_model = ensemble.classify("fortunes-law-politics", texts)
    assert set(per_model) == {"group-0", "group-1", None, "group-2"}
    mixed = 0.7 * torch.softmax(per_model["group-0"].double(), -1) + 0.3 * torch.softmax(per_model["group-1"].double(), -1)
    expected = torch.softmax(mixed.log() + 0.5 * (per_model["group-2"] - per_model[None]).double(), -1)
    assert torch.allclose(probs, expected)
    assert not torch.allclose(probs, mixed, atol=1e-3)  # the step changes the prediction


def test_renaming_adapters_renames_every_reference(tiny_manifest, tmp_path):
    def boost_with_group_2(raw, folder):
        raw["tasks"]["fortunes-law-politics"]["boost"] = [{"adapter": "group-2", "step": 0.5}]
        raw["adapters"][2]["kind"] = "anchor"
        raw["anchor"] = "group-2"

    loaded = manifest.load(_edited(tiny_manifest, tmp_path, boost_with_group_2))
    renamed = loaded.renamed({a.name: f"{a.name}__v2" for a in loaded.adapters})
    assert renamed.models("fortunes-law-politics") == ["group-1__v2", "group-2__v2"]
    assert renamed.anchor == "group-2__v2" and [a.name for a in renamed.adapters][0] == "group-0__v2"


def test_a_written_manifest_moves_with_its_folder(tiny_manifest, tmp_path):
    """A loaded manifest holds absolute adapter paths; written back, they are relative again, so
    the folder can be uploaded to object storage and loaded from a copy elsewhere."""
    from pathlib import Path

    from engine.ensemble import manifest

    source = tmp_path / "ensemble"
    shutil.copytree(Path(tiny_manifest).parent if Path(tiny_manifest).is_file() else tiny_manifest, source)
    manifest.write(manifest.load(source), source)
    moved = tmp_path / "moved"
    shutil.move(source, moved)
    loaded = manifest.load(moved)
    assert all(Path(a.path).is_relative_to(moved.resolve()) for a in loaded.adapters)
