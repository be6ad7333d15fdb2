"""A TRL config read for ``--objective dpo|kto`` (``qplan estimate --from-config dpo.yaml --objective dpo``): TRL
1.16's ``DPOConfig`` / ``KTOConfig`` keys beside the ``SFTConfig`` ones the TRL reader maps.

A TRL config file does not name its trainer (``trl dpo --config FILE`` does), so the objective comes from the command
line. ``DPOTrainer.__init__`` and ``KTOTrainer.__init__`` prepare the model as ``SFTTrainer.__init__`` does
(trl/trainer/dpo_trainer.py, kto_trainer.py 1.16: the same ``get_peft_model`` call, the trainable parameters of a
quantized model cast to bf16, no ``prepare_model_for_kbit_training``), and their configs share SFTConfig's
``max_length`` (1024: every row is cut to it), batch and checkpointing defaults: the TRL reader's mapping holds. Then:

* the loss keys are arithmetic on per-row log-probabilities: no memory term — DPO's ``beta``, ``label_smoothing``
  (cDPO), ``loss_weights``, ``use_weighting``, the f-divergence and DiscoPOP/LD-DPO coefficients; KTO's ``beta``,
  ``desirable_weight`` and ``undesirable_weight``;
* ``loss_type`` other than DPO's ``sigmoid`` / KTO's ``kto`` (the losses the traces run; KTO's
  ``apo_zero_unpaired`` has no KL rows), ``precompute_ref_log_probs`` (a pass before training) and
  ``sync_ref_model`` (TR-DPO: a separate reference model) are refused;
* ``disable_dropout`` (default true) sets every dropout to 0, ``lora_dropout`` included;
  ``disable_dropout: false`` with a LoRA dropout is refused (both are planned at dropout 0);
* ``padding_free`` is turned off by ``DPOTrainer`` itself (it warns and pads): planned padded;
* ``label_smoothing_factor`` (the Trainer's label smoother) is never used by ``DPOTrainer.compute_loss``;
* the dataset is not read as preference pairs or unpaired rows: every row is planned at ``max_length``.
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
#: KTOConfig keys with no memory term, and every KTOConfig key the SFT reader does not know (``KTOConfig`` minus
#: ``SFTConfig``; ``loss_type`` is SFTConfig's too)
KTO_NO_EFFECT = {"beta", "desirable_weight", "undesirable_weight", "precompute_ref_batch_size", "ref_model_mixup_alpha",
                 "ref_model_sync_steps"}
KTO_KEYS = KTO_NO_EFFECT | {"disable_dropout", "precompute_ref_log_probs", "sync_ref_model"}
#: each objective's own keys (the TRL reader does not refuse them as another trainer's)
OWN_KEYS = {"dpo": DPO_KEYS, "kto": KTO_KEYS}
#: each objective's loss_type (its default), the one its trace runs
LOSS_TYPES = {"dpo": ["sigmoid"], "kto": "kto"}


def read_objective(r: Any, o: dict[str, Any], objective: str) -> None:
    """The DPO or KTO settings of a TRL config, onto the options the TRL reader made (see the module docstring)."""
    name = objective.upper()
    r.used.update((DPO_NO_EFFECT if objective == "dpo" else KTO_NO_EFFECT)
                  | {"label_smoothing_factor", "padding_free", "dataset_name", "dataset_config", "dataset_train_split",
                     "dataset_test_split", "dataset_text_field", "loss_type"})
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
    loss = r.get("loss_type", LOSS_TYPES[objective])
    if objective == "dpo" and ([loss] if isinstance(loss, str) else loss) != ["sigmoid"]:
        raise QPlanError(f"trl config: loss_type {shown(loss)}: qplan plans DPO's sigmoid loss (the one its trace runs)")
    if objective == "kto" and loss != "kto":
        raise QPlanError(f"trl config: loss_type {shown(loss)}: qplan plans KTO's kto loss (the one its trace runs, with "
                         "the KL term's rows)")
    disable = r.get("disable_dropout", True)
    if disable not in (True, False):
        raise QPlanError(f"trl config: disable_dropout must be true or false, got {shown(disable)}")
    if not 0 <= o.get("dropout", 0.0) < 1:  # NaN too: PEFT's LoRA dropout is an nn.Dropout(p)
        raise QPlanError(f"trl config: lora_dropout must be in [0, 1), got {shown(o.get('dropout'))}")
    if not disable and o.get("dropout"):
        raise QPlanError(f"trl config: disable_dropout: false keeps lora_dropout {o['dropout']:g}: {name} is planned at "
                         "dropout 0 (set disable_dropout: true, TRL's default, or lora_dropout: 0)")
    if o.get("dropout"):
        r.warnings.append(note("ignored", f"trl config: lora_dropout {o['dropout']:g} does nothing: disable_dropout "
                                          f"({name}Config's default) sets every dropout to 0"))
    o["dropout"] = 0.0
    if r.cfg.get("padding_free") and objective == "dpo":
        r.warnings.append(note("ignored", "trl config: padding_free: TRL 1.16's DPOTrainer turns it off and pads "
                                          "(planned padded)"))
    if r.cfg.get("label_smoothing_factor"):
        r.warnings.append(note("ignored", f"trl config: label_smoothing_factor: {name}Trainer computes its own loss"
                                          + (" (cDPO smoothing is label_smoothing)" if objective == "dpo" else "")))
    if r.cfg.get("dataset_name"):
        what = "preference pairs" if objective == "dpo" else "unpaired rows"
        r.warnings.append(note("data", f"trl config: dataset_name {shown(r.cfg['dataset_name'])} is not read as "
                                       f"{what}: every row is planned at max_length ({o['seq_len']})"))
    o["loss"] = "trl"  # DPOTrainer and KTOTrainer always score through TRL's fused LM head
    o["objective"] = objective
