"""The ensemble as transformers + PEFT: one base model holding every adapter of a manifest.

The reference implementation of scoring (`sift evaluate`, the `peft` serving backend, the
parity test of the vLLM backend): each adapter is activated in turn over the same prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.ensemble import labels
from engine.ensemble.manifest import LoadedManifest
from engine.errors import SiftError
from engine.models import builtin, load


@dataclass
class EnsembleModel:
    manifest: LoadedManifest
    tokenizer: object
    model: object  # peft.PeftModel with every adapter loaded under its manifest name
    # The first decoder layer any adapter changes, when scoring may share the layers below it
    # between models (labels.Shared); None: every model runs the whole decoder.
    shared_from: int | None = None

    @classmethod
    def load(cls, manifest: LoadedManifest, trust_remote_code: bool = False) -> "EnsembleModel":
        from peft import PeftModel

        path = builtin.resolve(manifest.base_model)
        base = load.load_causal_lm(path, quantize=manifest.quantize, trust_remote_code=trust_remote_code)
        first = manifest.adapters[0]
        model = _loading(first, lambda: PeftModel.from_pretrained(base, first.path, adapter_name=first.name))
        if torch.cuda.is_available() and manifest.quantize == "none":
            model = model.cuda()
        ensemble = cls(manifest.model_copy(update={"adapters": [first]}), load.load_tokenizer(path, trust_remote_code),
                       model)
        ensemble.update(manifest)
        return ensemble

    def update(self, manifest: LoadedManifest) -> None:
        """Hold the adapters of `manifest` (a later version of this one, on the same base; adapters
        are known by name): new ones are loaded, dropped ones deleted, the base is not loaded again."""
        if (manifest.base_model, manifest.quantize) != (self.manifest.base_model, self.manifest.quantize):
            raise SiftError(f"cannot switch an ensemble on {self.manifest.base_model} ({self.manifest.quantize}) to "
                            f"one on {manifest.base_model} ({manifest.quantize}): load it instead")
        held = {a.name for a in self.manifest.adapters}
        wanted = {a.name for a in manifest.adapters}
        for entry in manifest.adapters:
            if entry.name not in held:
                _loading(entry, lambda: self.model.load_adapter(entry.path, adapter_name=entry.name))
        self.model.set_adapter(manifest.adapters[0].name)  # never delete the active adapter
        for name in held - wanted:
            self.model.delete_adapter(name)
        self.model.eval()
        self.manifest = manifest
        self.shared_from = self._shared_from()

    def _shared_from(self) -> int | None:
        """labels.first_adapted_layer, kept only where running the decoder from that layer gives
        this model's own next-token log-probabilities (checked on a probe prompt), so an
        architecture whose forward does more than run its layers is scored whole."""
        layer = labels.first_adapted_layer(self.model)
        if not layer:
            return None
        probe = [self.tokenizer("Is this the same number either way?\nAnswer:")["input_ids"]]
        tokens = list(range(min(512, self.tokenizer.vocab_size)))
        pad = self.tokenizer.pad_token_id
        whole = labels.next_token_logprobs(self.model, probe, tokens, pad)
        split = labels.next_token_logprobs(self.model, probe, tokens, pad, labels.shared_prefix(self.model, probe, pad, layer))
        return layer if torch.allclose(whole, split, atol=1e-4, rtol=1e-4) else None

    def label_logprobs(self, task: str, texts: list[str], adapters: list[str | None] | None = None,
                       batch: int = 32) -> dict[str | None, torch.Tensor]:
        """Per adapter (default: every model the task's prediction needs; None: the bare base),
        (B, L) next-token log-probabilities of the task's label tokens after each text's prompt."""
        entry = self.manifest.task(task)
        names = adapters if adapters is not None else self.manifest.models(task)
        for name in names:
            if name is not None:
                self.manifest.adapter(name)
        token_ids = labels.label_token_ids(self.tokenizer, self.manifest.answer, entry.labels)
        prompts = [labels.prompt_ids(self.tokenizer, self.manifest, t, task) for t in texts]
        return self.logprobs(prompts, token_ids, names, batch)

    def logprobs(self, prompts: list[list[int]], token_ids: list[int], models: list[str | None],
                 batch: int = 32) -> dict[str | None, torch.Tensor]:
        """Per model (an adapter name, or None for the bare base), (B, L) next-token
        log-probabilities of `token_ids` after each prompt. Per batch, the layers below the
        first adapted one run once for every model (`shared_from`)."""
        pad = self.tokenizer.pad_token_id
        out: dict[str | None, list[torch.Tensor]] = {name: [] for name in models}
        for i in range(0, len(prompts), batch):
            chunk = prompts[i:i + batch]
            shared = None if self.shared_from is None else labels.shared_prefix(self.model, chunk, pad, self.shared_from)
            for name in models:
                with labels.active(self.model, name):
                    out[name].append(labels.next_token_logprobs(self.model, chunk, token_ids, pad, shared))
        return {name: torch.cat(parts) for name, parts in out.items()}

    def classify(self, task: str, texts: list[str]) -> tuple[torch.Tensor, dict[str | None, torch.Tensor]]:
        """The ensemble's class probabilities (B, L) and each model's label log-probabilities."""
        per_model = self.label_logprobs(task, texts)
        return labels.combine(per_model, self.manifest, task), per_model


def _loading(entry, action):
    """Run a PEFT adapter load; a failure names the adapter in one line."""
    try:
        return action()
    except Exception as exc:  # peft raises assorted types for a mismatched adapter
        raise SiftError(f"adapter {entry.name!r} ({entry.path}) does not load: {str(exc).splitlines()[0]}") from None
