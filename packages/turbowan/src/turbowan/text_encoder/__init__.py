"""umT5-xxl text encoder and its tokenizer.

Submodules: ``config`` (presets, config from shapes), ``naming`` (upstream <-> HF/ComfyUI keys),
``fp8`` (ComfyUI fp8-scaled weights), ``model`` (the encoder), ``tokenizer`` (SentencePiece /
tokenizer.json, prompt cleaning), ``loading`` (``load_text_encoder``). Nothing heavy is imported
here, so ``turbowan manifest``/``check`` only pay for what they use.
"""
