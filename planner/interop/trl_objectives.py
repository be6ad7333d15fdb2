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
  ``apo_zero_unpaired`` has no KL rows) and ``sync_ref_model`` (TR-DPO: a separate reference model) are refused;
* ``precompute_ref_log_probs`` and ``precompute_ref_batch_size``: the pass before training
  (``--precompute-ref-log-probs``, ``planner.memory.precompute``);
* ``use_peft`` not true: full fine-tuning with a reference model loaded from the same checkpoint;
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
                 "f_alpha_divergence_coef", "discopop_tau", "ld_alpha", "ref_model_mixup_alpha", "ref_model_sync_steps"}
#: the keys of TRL's precompute_ref_log_probs pass (DPO and KTO)
PRECOMPUTE_KEYS = {"precompute_ref_log_probs", "precompute_ref_batch_size"}
#: every DPOConfig key the SFT reader does not know (TRL 1.16 ``DPOConfig`` minus ``SFTConfig``)
DPO_KEYS = DPO_NO_EFFECT | PRECOMPUTE_KEYS | {"disable_dropout", "sync_ref_model"}
#: KTOConfig keys with no memory term, and every KTOConfig key the SFT reader does not know (``KTOConfig`` minus
#: ``SFTConfig``; ``loss_type`` is SFTConfig's too)
KTO_NO_EFFECT = {"beta", "desirable_weight", "undesirable_weight", "ref_model_mixup_alpha", "ref_model_sync_steps"}
KTO_KEYS = KTO_NO_EFFECT | PRECOMPUTE_KEYS | {"disable_dropout", "sync_ref_model"}
#: GRPOConfig keys with no memory term: the loss's arithmetic on ``B x C`` per-token values, reward bookkeeping,
#: logging, and settings of the paths the reader refuses (vLLM's, continuous batching's)
GRPO_NO_EFFECT = {
    "epsilon", "epsilon_high", "delta", "importance_sampling_level", "scale_rewards", "reward_weights",
    "multi_objective_aggregation", "mask_truncated_completions", "top_entropy_quantile", "entropy_coef",
    "entropy_coef_delta", "entropy_coef_max", "entropy_coef_min", "entropy_target", "use_adaptive_entropy",
    "use_bias_correction_kl", "off_policy_mask_threshold", "sapo_temperature_neg", "sapo_temperature_pos",
    "vespo_k_neg", "vespo_k_pos", "vespo_lambda_neg", "vespo_lambda_pos", "log_completions",
    "log_completions_hub_repo", "log_multimodal", "log_unique_prompts", "num_completions_to_print",
    "num_generations_eval", "chat_template_kwargs", "max_tool_calling_iterations", "ds3_gather_for_generation",
    "disable_dropout", "ref_model_mixup_alpha", "ref_model_sync_steps", "cast_lm_head_to_fp32"}
#: GRPOConfig's sampling settings and their defaults: other values add logits processors' N x V tensors (not planned)
GRPO_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": None, "repetition_penalty": 1.0}
GRPO_MAPPED = {"num_generations", "max_completion_length", "steps_per_generation", "generation_batch_size", "beta",
               "max_prompt_length", "use_vllm", "vllm_mode", "vllm_gpu_memory_utilization", "vllm_enable_sleep_mode"}
#: vLLM's settings with no memory term on the trainer's GPU (the server's address, vLLM's importance-sampling
#: correction: arithmetic on per-token log-probabilities; its extra scoring pass is counted in the FLOPs)
VLLM_NO_EFFECT = {"vllm_server_base_url", "vllm_server_host", "vllm_server_port", "vllm_server_timeout",
                  "vllm_group_port", "vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
                  "vllm_importance_sampling_clip_max", "vllm_importance_sampling_clip_min", "vllm_importance_sampling_cap",
                  "vllm_model_impl", "vllm_structured_outputs_regex"}
GRPO_REFUSED = {"num_iterations", "sync_ref_model", "generation_kwargs", "cache_implementation",
                "use_transformers_continuous_batching", "use_transformers_paged", "loss_type", "vllm_tensor_parallel_size",
                "vllm_max_model_length"}
GRPO_KEYS = GRPO_NO_EFFECT | set(GRPO_SAMPLING) | GRPO_MAPPED | GRPO_REFUSED | VLLM_NO_EFFECT | {
    "transformers_continuous_batching_config"}
#: each objective's own keys (the TRL reader does not refuse them as another trainer's)
OWN_KEYS = {"dpo": DPO_KEYS, "kto": KTO_KEYS, "grpo": GRPO_KEYS}
#: each objective's loss_type (its default), the one its trace runs
LOSS_TYPES = {"dpo": ["sigmoid"], "kto": "kto"}


def read_grpo(r: Any, o: dict[str, Any]) -> None:
    """A TRL ``grpo`` config (``trl grpo --config FILE``; TRL 1.16 ``GRPOConfig``): the generation settings mapped to
    ``--num-generations`` / ``--max-completion-length`` / ``--steps-per-generation`` (``generation_batch_size`` divided by
    the batch and ranks) / ``--beta``, ``max_prompt_length`` (older TRL's; 1.16 does not truncate prompts, so it stands
    for the longest prompt) to ``--max-prompt-length``; vLLM, continuous batching, a static cache, ``num_iterations > 1``
    (an old-policy pass), ``generation_kwargs``, vLLM tensor parallelism and a ``loss_type`` outside TRL's per-token
    losses refused; sampling
    settings other than TRL's defaults warned about (their logits processors' ``N x V`` tensors are not planned);
    ``use_vllm`` with ``vllm_mode`` to ``--vllm``, colocate's ``vllm_gpu_memory_utilization`` (TRL's 0.3 by default) and
    ``vllm_enable_sleep_mode`` to ``--vllm-gpu-memory-utilization`` / ``--vllm-sleep``;
    GRPOConfig's ``disable_dropout`` defaults to false (LoRA's dropout runs, in generation too)."""
    r.used.update(GRPO_NO_EFFECT | GRPO_MAPPED | set(GRPO_SAMPLING) | VLLM_NO_EFFECT | {
        "dataset_name", "dataset_config", "dataset_train_split", "dataset_test_split"})
    for key in ("use_transformers_continuous_batching", "use_transformers_paged"):
        if r.get(key, False) is True:
            raise QPlanError(f"trl config: {key}: {shown(r.cfg[key])}: generation is planned with transformers' "
                             "generate and a dynamic cache, or vLLM (continuous batching is not planned yet)")
    if r.get("use_vllm", False) is True:
        mode = r.get("vllm_mode", "colocate")
        if mode not in ("colocate", "server"):
            raise QPlanError(f"trl config: vllm_mode must be colocate or server, got {shown(mode)}")
        o["vllm"] = mode
        if mode == "colocate":
            o["vllm_gpu_memory_utilization"] = r.get("vllm_gpu_memory_utilization", 0.3)
            sleep = r.get("vllm_enable_sleep_mode", False)
            if sleep not in (True, False):
                raise QPlanError(f"trl config: vllm_enable_sleep_mode must be true or false, got {shown(sleep)}")
            o["vllm_sleep"] = sleep
    for key, default in (("num_iterations", 1), ("cache_implementation", None), ("generation_kwargs", None),
                         ("sync_ref_model", False), ("vllm_tensor_parallel_size", 1), ("vllm_max_model_length", None)):
        if key in r.cfg and r.cfg[key] not in (default, {}):
            raise QPlanError(f"trl config: {key}: {shown(r.cfg[key])} changes what GRPO runs in a way qplan does not "
                             f"plan yet (planned: {shown(default)})")
    loss = r.get("loss_type", "dapo")
    if loss not in ("dapo", "grpo", "bnpo", "dr_grpo", "cispo", "sapo", "luspo", "vespo"):
        raise QPlanError(f"trl config: loss_type {shown(loss)} is not one of GRPOTrainer's losses")
    if r.get("disable_dropout", False):
        o["dropout"] = 0.0
    for key, default in GRPO_SAMPLING.items():
        if key in r.cfg and r.cfg[key] != default:
            r.warnings.append(note("approximated", f"trl config: {key}: {shown(r.cfg[key])} adds a logits processor "
                                                   "in generation (an N x vocabulary tensor or a few per token), not "
                                                   "planned: the generation moment is planned as at TRL's defaults"))
    for key, opt in (("num_generations", "num_generations"), ("max_completion_length", "max_completion_length"),
                     ("steps_per_generation", "steps_per_generation"), ("max_prompt_length", "max_prompt_length")):
        if r.cfg.get(key) is not None:
            o[opt] = r.cfg[key]
    if r.cfg.get("generation_batch_size") is not None:
        rows = o.get("batch_size", 8) * o.get("gpus", 1) * o.get("nodes", 1)
        gbs = r.cfg["generation_batch_size"]
        if not isinstance(gbs, int) or isinstance(gbs, bool) or gbs % rows:
            raise QPlanError(f"trl config: generation_batch_size {shown(gbs)} must be a multiple of the global batch "
                             f"({rows})")
        o["steps_per_generation"] = gbs // rows
    if "beta" in r.cfg:
        o["beta"] = r.cfg["beta"]
    if r.cfg.get("max_prompt_length") is None:
        r.warnings.append(note("data", "trl config: the prompts' length is not in the file (TRL 1.16 does not truncate "
                                       "them): planned at --max-prompt-length's default, 512; give yours"))
    if r.cfg.get("dataset_name"):
        r.warnings.append(note("data", f"trl config: dataset_name {shown(r.cfg['dataset_name'])} is not read: its "
                                       "prompts are planned as long as --max-prompt-length"))
    o.pop("seq_len", None)  # a GRPO row is the prompt plus the completion
    o["loss"] = "trl"
    o["objective"] = "grpo"


def read_precompute(r: Any, o: dict[str, Any]) -> None:
    """``precompute_ref_log_probs`` (a pass over the dataset before training, no reference forward in the step) and
    ``precompute_ref_batch_size`` (its batches; ``per_device_train_batch_size`` when unset)."""
    r.used.update(PRECOMPUTE_KEYS)
    pre, size = r.cfg.get("precompute_ref_log_probs", False), r.cfg.get("precompute_ref_batch_size")
    if pre is not True and pre is not False:  # 1 == True: a number is not a boolean here
        raise QPlanError(f"trl config: precompute_ref_log_probs must be true or false, got {shown(pre)}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise QPlanError(f"trl config: precompute_ref_batch_size must be a positive integer, got {shown(size)}")
    if pre:
        o["precompute_ref_log_probs"] = True
        if size is not None:
            o["precompute_ref_batch_size"] = size
    elif size is not None:
        r.warnings.append(note("ignored", "trl config: precompute_ref_batch_size without precompute_ref_log_probs "
                                          "does nothing"))


def read_objective(r: Any, o: dict[str, Any], objective: str) -> None:
    """The DPO or KTO settings of a TRL config, onto the options the TRL reader made (see the module docstring)."""
    if objective == "grpo":
        read_grpo(r, o)
        return
    name = objective.upper()
    r.used.update((DPO_NO_EFFECT if objective == "dpo" else KTO_NO_EFFECT)
                  | {"label_smoothing_factor", "padding_free", "dataset_name", "dataset_config", "dataset_train_split",
                     "dataset_test_split", "dataset_text_field", "loss_type"})
    read_precompute(r, o)
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
    if not o.get("full"):  # full fine-tuning has no LoRA dropout (the model's own dropout is not planned)
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
