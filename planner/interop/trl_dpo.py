"""A TRL config read for ``--objective dpo`` (``qplan estimate --from-config dpo.yaml --objective dpo``): TRL 1.16's
``DPOConfig`` keys beside the ``SFTConfig`` ones the TRL reader maps.

A TRL config file does not name its trainer (``trl dpo --config FILE`` does), so the objective comes from the command
line. ``DPOTrainer.__init__`` prepares the model as ``SFTTrainer.__init__`` does (trl/trainer/dpo_trainer.py 1.16:
the same ``get_peft_model`` call, the trainable parameters of a quantized model cast to bf16, no
``prepare_model_for_kbit_training``), and its ``DPOConfig`` shares SFTConfig's ``max_length`` (1024: chosen and
rejected rows are each cut to it), batch and checkpointing defaults: the TRL reader's mapping holds. Then:

* the loss keys (``beta``, ``label_smoothing`` (cDPO), ``loss_weights``, ``use_weighting``, the f-divergence and
  DiscoPOP/LD-DPO coefficients) are arithmetic on per-row log-probabilities: no memory term;
* ``loss_type`` other than ``sigmoid`` (the loss the trace runs), ``precompute_ref_log_probs`` (a pass before
  training) and ``sync_ref_model`` (TR-DPO: a separate reference model) are refused;
* ``disable_dropout`` (default true) sets every dropout to 0, ``lora_dropout`` included;
  ``disable_dropout: false`` with a LoRA dropout is refused (DPO is planned at dropout 0);
* ``padding_free`` is turned off by the trainer itself (``DPOTrainer`` warns and pads): planned padded;
* ``label_smoothing_factor`` (the Trainer's label smoother) is never used by ``DPOTrainer.compute_loss``;
* the dataset is not read as preference pairs: every pair is planned at ``max_length``.
"""

from __future__ import annotations

import math
from typing import Any

from qplan.planner.errors import QPlanError, shown
from qplan.planner.interop.notes import note

#: DPOConfig keys with no memory term (loss arithmetic on per-row log-probabilities; the reference's own settings)
DPO_NO_EFFECT = {"beta", "label_smoothing", "loss_weights", "use_weighting", "f_divergence_type",
                 "f_alpha_divergence_coef", "discopop_tau", "ld_alpha", "precompute_ref_batch_size",
                 "ref_model_mixup_alpha", "ref_model_sync_steps"}
#: every DPOConfig key the SFT reader does not know (TRL 1.16 ``DPOConfig`` minus ``SFTConfig``)
DPO_KEYS = DPO_NO_EFFECT | {"disable_dropout", "precompute_ref_log_probs", "sync_ref_model"}


def read_dpo(r: Any, o: dict[str, Any]) -> None:
    """The DPO settings of a TRL config, onto the options the TRL reader made (see the module docstring)."""
    r.used.update(DPO_NO_EFFECT | {"label_smoothing_factor", "padding_free", "dataset_name", "dataset_config",
                                   "dataset_train_split", "dataset_test_split", "dataset_text_field"})
    if r.get("precompute_ref_log_probs", False):
        raise QPlanError(f"trl config: precompute_ref_log_probs: {shown(r.cfg['precompute_ref_log_probs'])} runs the "
                         "reference over the whole dataset before training, which qplan does not plan yet: leave it "
                         "false")
    if r.get("sync_ref_model", False):
        raise QPlanError(f"trl config: sync_ref_model: {shown(r.cfg['sync_ref_model'])} (TR-DPO) keeps a separate "
                         "reference model, which qplan does not plan yet")
    beta = r.get("beta", 0.1)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta):
        raise QPlanError(f"trl config: beta must be a finite number, got {shown(beta)}")
    loss = r.get("loss_type", ["sigmoid"])
    losses = [loss] if isinstance(loss, str) else loss
    if losses != ["sigmoid"]:
        raise QPlanError(f"trl config: loss_type {shown(loss)}: qplan plans DPO's sigmoid loss (the one its trace runs)")
    disable = r.get("disable_dropout", True)
    if disable not in (True, False):
        raise QPlanError(f"trl config: disable_dropout must be true or false, got {shown(disable)}")
    if not 0 <= o.get("dropout", 0.0) < 1:  # NaN too: PEFT's LoRA dropout is an nn.Dropout(p)
        raise QPlanError(f"trl config: lora_dropout must be in [0, 1), got {shown(o.get('dropout'))}")
    if not disable and o.get("dropout"):
        raise QPlanError(f"trl config: disable_dropout: false keeps lora_dropout {o['dropout']:g}: DPO is planned at "
                         "dropout 0 (set disable_dropout: true, TRL's default, or lora_dropout: 0)")
    if o.get("dropout"):
        r.warnings.append(note("ignored", f"trl config: lora_dropout {o['dropout']:g} does nothing: disable_dropout "
                                          "(DPOConfig's default) sets every dropout to 0"))
    o["dropout"] = 0.0
    if r.cfg.get("padding_free"):
        r.warnings.append(note("ignored", "trl config: padding_free: TRL 1.16's DPOTrainer turns it off and pads "
                                          "(planned padded)"))
    if r.cfg.get("label_smoothing_factor"):
        r.warnings.append(note("ignored", "trl config: label_smoothing_factor: DPOTrainer computes its own loss (cDPO "
                                          "smoothing is label_smoothing)"))
    if r.cfg.get("dataset_name"):
        r.warnings.append(note("data", f"trl config: dataset_name {shown(r.cfg['dataset_name'])} is not read as "
                                       f"preference pairs: every pair is planned at max_length ({o['seq_len']})"))
    o["loss"] = "trl"  # DPOTrainer always scores through TRL's fused LM head
    o["objective"] = "dpo"
