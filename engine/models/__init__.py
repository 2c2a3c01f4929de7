"""Local Hugging Face models: loading (safetensors only), LoRA/QLoRA wrapping, built-in models."""
