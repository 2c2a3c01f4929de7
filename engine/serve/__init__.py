"""Serving an adapter ensemble: `sift serve`.

- `service.py`: what the API does, whatever the backend (validation, prompts, label scoring,
  the weighted mixture, the ensemble's choice among free-form outputs).
- `backends.py`: the backend interface and `peft` (transformers + PEFT, the reference, built on
  engine.ensemble.model.EnsembleModel); `vllm_backend.py`: vLLM multi-LoRA, imported only when
  asked for.
- `app.py`: the FastAPI app, the Ray Serve deployment that wraps it, and `serve()` for the CLI.
"""
