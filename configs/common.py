"""Shared defaults for every experiment; an experiment file changes only what differs."""

import dataclasses

import ml_collections

from mtnt_tpu.data import noise


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.variant = 'gemma_2b'  # mtnt_tpu.model.VARIANTS
  # Kaggle Flax checkpoint dir (the orbax tree holding {'transformer': ...}),
  # e.g. .../gemma/flax/2b/2/2b. Empty: random init (tiny variants only).
  c.model.checkpoint = ''
  c.model.param_dtype = 'float32'  # master weights and optimizer state
  c.model.compute_dtype = 'float32'  # 'bfloat16' casts params for the forward pass
  # Rematerialisation in the backward pass: 'none' keeps every activation,
  # 'block' recomputes each transformer block, 'matmuls' saves only matmul outputs.
  c.model.remat = 'none'
  # The loss forms the [tokens, vocab] logits this many tokens (of the global
  # batch) at a time, never whole: a chip holds about loss_chunk / (batch
  # shards) x vocab fp32 logits at once. 0: whole logits, as gemma computes them.
  c.model.loss_chunk = 8192
  # > 0 (with loss_chunk): logits only where a target is, up to this fraction
  # of each row's positions (a batch with a fuller row forms them everywhere,
  # so the loss is exact either way). The prompt is about half of a
  # translation example, so 0.75 skips about a third of the unembedding.
  c.model.loss_positions = 0.0
  # Instruction-tuned (-it) checkpoints: wrap each example in Gemma chat turns.
  c.model.chat_template = False

  c.lora = ml_collections.ConfigDict()
  # rank > 0: train low-rank adapters only; the base stays frozen in base_dtype
  # and checkpoints hold only the adapters (the base is config.model.checkpoint).
  c.lora.rank = 0
  c.lora.alpha = 16.0  # adapters are scaled by alpha / rank
  c.lora.targets = 'both'  # 'attention' projections, 'ffw' feed-forward, or 'both'
  c.lora.base_dtype = 'bfloat16'

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.path = ''  # SentencePiece model, e.g. .../gemma/flax/2b/2/tokenizer.model

  c.data = ml_collections.ConfigDict()
  c.data.dir = ''  # holds {train,valid}.array_record (python -m mtnt_tpu.prepare)
  c.data.train_split = 'train'
  c.data.eval_split = 'valid'
  c.data.dst_lang = 'French'
  c.data.max_len = 128  # tokens per row
  c.data.packing = True  # several examples per row; False pads one example per row
  c.data.overlong = 'truncate'  # or 'drop': examples longer than max_len
  c.data.shuffle_seed = 0
  # Fraction of training sources given MTNT-style noise (typos, casing, emoji,
  # slang...: mtnt_tpu/data/noise.py), drawn anew each epoch; 0 = clean.
  c.data.noise = 0.0
  # The rate of each kind of noise in a noised source (defaults: noise.Noise).
  c.data.noise_rates = ml_collections.ConfigDict(dataclasses.asdict(noise.Noise()))
  # The split is read as this many shards, each packed into its own rows of
  # every batch; 0 = one per process. Fix it (to a multiple of every host
  # count you use) to get the same batches on any number of hosts.
  c.data.num_shards = 0
  c.data.num_workers = 0  # Grain worker processes for tokenization (0: in-process)

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 32  # global rows per step (all hosts together)
  c.train.num_steps = 1000
  c.train.seed = 0
  c.train.log_every = 10
  c.train.eval_every = 200  # and always at the last step
  c.train.eval_at_start = True  # the baseline every later eval is read against
  c.train.checkpoint_every = 200  # and always at the last step
  c.train.keep_checkpoints = 3
  # Comma-separated regexes over parameter paths (as in sharding.py's table);
  # matching parameters get no gradient, no optimizer state and no update.
  # 'embedder/' freezes Gemma's tied embedding (63% of Gemma 3 270M).
  c.train.freeze = ''

  c.eval = ml_collections.ConfigDict()
  # Translation quality at every eval: greedy-decode the eval split and score
  # with sacrebleu. 0 turns decoding off; -1 decodes the whole split.
  c.eval.decode_examples = -1
  # The eval loss over the whole eval split at every eval; False skips it (a
  # time-boxed run that is judged by BLEU alone).
  c.eval.loss = True
  c.eval.max_decode_len = 64  # new tokens per translation
  # Sentences per decoded batch (rounded up to the mesh's batch axes), apart
  # from the train batch: decoding is memory-bound, so larger batches are faster.
  c.eval.decode_batch_size = 64
  # 1: greedy. K > 1: beam search over K hypotheses per sentence, scored
  # log P / ((5 + len) / 6) ** length_penalty (GNMT; 0 = no penalty).
  c.eval.beam_size = 1
  c.eval.length_penalty = 0.6
  c.eval.num_logged_examples = 8  # source/reference/hypothesis triples per eval
  c.eval.best_metric = 'eval_bleu'  # checkpoints/best keeps the best by this
  c.eval.best_mode = 'max'

  c.profile = ml_collections.ConfigDict()
  c.profile.steps = ''  # e.g. '10:13' captures a profile of steps 10, 11, 12

  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'adamw'  # or 'sgd'
  c.optim.learning_rate = 1e-5
  c.optim.warmup_steps = 100
  c.optim.end_learning_rate_ratio = 0.1  # cosine decays to lr * this at num_steps
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.0
  c.optim.momentum = 0.9  # sgd only
  c.optim.clip_norm = 1.0  # global-norm clipping; 0 disables
  c.optim.grad_accum_steps = 1  # micro-batches per step; batch_size must divide

  c.runtime = ml_collections.ConfigDict()
  # > 0: run on the CPU with this many faked devices (development and tests).
  c.runtime.cpu_devices = 0
  # JAX's persistent compilation cache: '' = WORKDIR/jax_cache, 'off' = none.
  c.runtime.compilation_cache = ''
  # Peak dense FLOP/s per device for MFU; 0 = the chip's datasheet figure
  # (TPU v4/v5e/v5p/v6e, H100/H200), or a measured matmul on the CPU.
  c.runtime.peak_tflops = 0.0

  c.mesh = ml_collections.ConfigDict()
  # Axis sizes multiply to the device count; -1 takes the rest. Batches are
  # sharded over both axes, parameters and optimizer state over fsdp.
  c.mesh.dcn_data = 1  # slices in a multislice run (data parallel over DCN)
  c.mesh.data = 1
  c.mesh.fsdp = -1
  return c
