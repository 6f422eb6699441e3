"""mtnt_tpu: fine-tune Gemma to translate, on every core of a TPU slice."""
