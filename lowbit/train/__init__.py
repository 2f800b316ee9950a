"""Training: one jitted step over pure params for every method that trains (QLoRA, OneBit, learned
bit allocation), with checkpoints that resume bit-identically.

* :mod:`.optim`  -- :class:`OptimCfg` and :func:`build_optimizer`: MultiSteps(clip + AdamW + warmup/schedule)
* :mod:`.step`   -- :func:`partition_params` (trainable / frozen), :class:`TrainState`,
  :func:`make_train_step` (gradients of the trainable leaves only, bf16 compute, float32 masters)
* :mod:`.losses` -- :func:`cross_entropy`, :func:`kd_kl`, :func:`hidden_mse`, :func:`forward_train`
  (remat per block), the loss builders :func:`causal_lm_loss` and :func:`distill_loss`
* :mod:`.data`   -- :class:`TokenWindows` (packed windows, seed-defined order, data position = step),
  :func:`corpus_tokens`, :func:`train_eval_tokens` (disjoint fixed splits)
* :mod:`.ckpt`   -- :class:`TrainCheckpoints` (orbax CheckpointManager; corrupt steps set aside,
  config mismatches refused)
* :mod:`.loop`   -- :class:`TrainCfg` and :func:`train` (progress bar, metrics.csv, loss.png)
* :mod:`.lora`   -- :class:`LoraWeight` adapters over dense or quantized bases (:func:`add_lora`,
  :func:`merge_lora`, :func:`lora_loss`, :func:`qlora_optim`: the QLoRA recipe)
"""

from lowbit.train.ckpt import ConfigMismatchError, TrainCheckpoints, tree_checksums
from lowbit.train.data import TokenWindows, corpus_tokens, train_eval_tokens
from lowbit.train.loop import NonFiniteLossError, TrainCfg, TrainResult, read_metrics, step_memory, train
from lowbit.train.lora import (LoraWeight, add_lora, count_trainable, load_lora_model, lora_loss, lora_paths,
                               merge_lora, qlora_dropout, qlora_optim, save_lora_model, strip_lora, trainable_regex,
                               with_dropout)
from lowbit.train.losses import (causal_lm_loss, cross_entropy, distill_loss, forward_train, hidden_mse, kd_kl)
from lowbit.train.optim import OptimCfg, build_optimizer, grad_norm_of
from lowbit.train.step import (Partition, TrainState, init_state, loss_and_grads, make_eval_step, make_train_step,
                               partition_params)

__all__ = ["OptimCfg", "build_optimizer", "grad_norm_of", "Partition", "partition_params", "TrainState", "init_state",
           "loss_and_grads", "make_train_step", "make_eval_step", "cross_entropy", "kd_kl", "hidden_mse",
           "forward_train", "causal_lm_loss", "distill_loss", "TokenWindows", "corpus_tokens", "train_eval_tokens",
           "TrainCheckpoints", "ConfigMismatchError", "tree_checksums", "TrainCfg", "TrainResult",
           "NonFiniteLossError", "train", "step_memory", "read_metrics", "LoraWeight", "add_lora", "lora_paths", "trainable_regex",
           "with_dropout", "merge_lora", "strip_lora", "count_trainable", "lora_loss", "qlora_optim",
           "qlora_dropout", "save_lora_model", "load_lora_model"]
