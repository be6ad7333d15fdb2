"""Exact live-tensor trace of one LoRA / QLoRA training step, on the meta device.

``trace_training_step`` builds the model of a Hugging Face config with transformers, quantizes it
the way ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` does, applies the real
``peft.get_peft_model``, and runs one (or more) complete training steps the way
``transformers.Trainer`` does them, while a ``TorchDispatchMode`` records every tensor storage that
torch allocates and frees.  On ``device="meta"`` nothing is allocated, so a 70B model traces in
seconds on a laptop; on ``device="cpu"`` the same step runs on real tensors (real bitsandbytes
kernels for quantized plans) under the same tracker and is the oracle the meta trace is tested
against (tests/planner/test_trace.py).

What is counted
---------------
Bytes of live *tensor storages* on the model's device (``untyped_storage().nbytes()``, views share a
storage and are counted once), from op outputs seen by the dispatch mode plus everything that exists
before the step (parameters, buffers, bitsandbytes quant states, the batch).  Not counted: memory
that kernels allocate without creating a torch tensor (cuBLAS / flash-attention workspaces), the
CUDA caching allocator's rounding (512 B blocks) and fragmentation, the CUDA context.  A storage is
freed when its last reference dies (``weakref.finalize`` on the untyped storage; storage PyObjects
are preserved while any tensor, including an autograd-saved one, holds the StorageImpl).  All peaks
are computed after the run from the (alloc event, free event, bytes) records.

The training step (what is mirrored, and from where)
----------------------------------------------------
* Model: ``AutoConfig.for_model`` + ``AutoModelForCausalLM.from_config(cfg, dtype=load_dtype,
  attn_implementation=attn_impl)``; ``load_dtype`` = ``compute_dtype`` for nf4/fp4/int8, else the
  weight dtype of ``quant``.  On meta under ``torch.device("meta")``; on cpu with seeded random
  weights (quantized plans: saved with ``save_pretrained`` and re-loaded with
  ``from_pretrained(dir, quantization_config=..., device_map="cpu")``: the real bnb CPU path).
* Quantization on meta uses transformers' own machinery: ``AutoHfQuantizer.from_config(bnb_config)``
  ``.preprocess_model`` (= ``get_modules_to_not_convert`` + ``replace_with_bnb_linear``: only
  ``type(m) is nn.Linear`` / ``Conv1D``, output head and tied weights skipped), then each weight
  goes through the code of ``transformers.integrations.bitsandbytes.Bnb4bitQuantize.convert`` /
  ``Bnb8bitQuantize.convert``: ``Params4bit(...)._quantize`` / ``Int8Params(...)._quantize`` run
  on meta tensors, i.e. the real ``bitsandbytes.functional.quantize_4bit`` /
  ``int8_vectorwise_quant`` executed through bitsandbytes' registered fake (meta) kernels
  (bitsandbytes/_ops.py).  A 4-bit layer therefore holds exactly: packed uint8 [ceil(n/2), 1],
  code fp32[16] (per module), absmax fp32[ceil(n/64)] or, double-quant, absmax uint8[ceil(n/64)]
  + offset fp32[] + nested absmax fp32[ceil(blocks/256)] + nested code fp32[256].  int8: int8
  [out, in] (CB shares its storage) + SCB fp32[out].  Biases stay in ``load_dtype``.
* ``model.config.use_cache = False`` (qplan's peft backend sets it after loading; otherwise the
  forward would build a ``DynamicCache`` holding every layer's K/V).
* ``upcast_kbit`` (k-bit quants only, as in qplan's peft backend): the real
  ``peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=grad_ckpt,
  gradient_checkpointing_kwargs={"use_reentrant": False} if grad_ckpt else None)``
  (peft/utils/other.py): freezes everything, casts every fp16/bf16 parameter that is not a
  ``Params4bit`` (embeddings, head, norms, biases; MoE expert tensors) to fp32, and with
  ``grad_ckpt`` enables gradient checkpointing (and transformers then hooks the input embeddings
  to require grad).
* LoRA: the real ``peft.get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", ...))`` (adapters
  in fp32: ``autocast_adapter_dtype=True``); counts from ``get_nb_trainable_parameters()``.
* Gradient checkpointing as ``Trainer`` enables it in this transformers version (trainer.py,
  "Activate activation checkpointing"): ``model.activation_checkpointing_enable(None)`` ->
  ``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` + ``enable_input_require_grads``
  (modeling_utils.py ``_activation_checkpointing_enable``).  Trainer runs it after
  ``prepare_model_for_kbit_training``, so its non-reentrant setting is the one in effect.  A
  ``reentrant`` plan passes ``{"use_reentrant": True}`` to both (axolotl's and LLaMA-Factory's
  ``gradient_checkpointing_kwargs``): torch's ``CheckpointFunction``, whose backward recomputes
  the whole layer, then runs its backward (it works on meta as on the CPU: to the byte).
* Mixed precision: ``Trainer`` leaves autocast to accelerate (trainer.py
  ``autocast_smart_context_manager`` is a no-op); ``Accelerator.prepare_model`` wraps
  ``model.forward`` in ``torch.autocast(device, dtype)`` and ``convert_outputs_to_fp32``
  (accelerate/accelerator.py, accelerate/utils/operations.py).  This is done when
  ``compute_dtype`` is bf16/fp16 (Trainer ``bf16=True``/``fp16=True``); the fp32 copy of the bf16
  logits that ``convert_to_fp32`` makes is therefore in the trace.  fp16's ``GradScaler`` is not
  modelled (it allocates a handful of scalars).
* Step: ``model.train()``; forward with ``input_ids`` and ``labels`` (random ids, batch x seq;
  labels a separate copy, as the collator makes it; no attention mask: full packed blocks) and,
  when the model's forward takes ``**kwargs`` (Trainer's ``model_accepts_loss_kwargs``),
  ``num_items_in_batch = labels[..., 1:].ne(-100).sum()``; the
  outputs are dropped once the loss is taken (Trainer ``compute_loss``); ``loss.backward()``;
  ``clip_grad_norm_(params, 1.0)`` (Trainer's default ``max_grad_norm``); ``optimizer.step()``;
  ``optimizer.zero_grad(set_to_none=True)``.
* Optimizers from ``Trainer.get_optimizer_cls_and_kwargs`` (with ``TrainingArguments``' field
  defaults: lr, betas, eps, weight_decay=0; the dataclass is not instantiated, which would set
  up accelerate's process-wide state) and Trainer's two weight-decay groups
  (``get_decay_parameter_names``).  ``adamw_torch`` and ``sgd`` are given ``foreach=True``: what
  torch picks by default for CUDA parameters (torch/optim/optimizer.py
  ``_default_to_fused_or_foreach``); on cpu/meta it would pick the single-tensor loop.
  ``adamw_torch_fused`` (TrainingArguments' default ``optim`` in this version) runs
  ``aten._fused_adamw_`` (meta kernel; ``step`` then lives on the device).  Non-fused torch
  optimizers keep ``step`` on the host: not counted.  bitsandbytes 8-bit/paged optimizers run
  their real Python code; their update kernels run through bitsandbytes' fake kernels on meta (no
  allocation, as on CUDA) and the real CPU kernels on cpu.
* ``attn_impl``: "sdpa" or "eager" (gemma2 needs "eager": transformers refuses sdpa with logit
  softcapping).

Where the parts are
-------------------
``settings`` (``TraceSettings``), ``run`` (build, quantize, adapt, optimize, step), ``patches``
(each process-global patch a named context manager), ``autocast`` (autocast / SDPA / dropout
emulation on meta), ``stand_ins`` (bitsandbytes' CUDA allocations, CPU and meta kernel
differences); the tracker, its categories and the recomputation marks are ``qplan.observe``'s,
shared with ``qplan run``'s measurement.

Ops that cannot run on meta and how they are handled: bitsandbytes kernels (CPU/CUDA only): their
registered fake kernels run instead (same output tensors); ``outliers.any()`` in the int8 stand-in
(data dependent): taken as False; ``cudaMallocManaged`` (paged optimizers): a stand-in, booked
as ``optimizer_paged``; transformers' ``find_packed_sequence_indices``: None on meta;
``torch.autocast("meta")``: the emulated device's autocast; the loss' ``num_items_in_batch``
stays a device tensor, no ``.item()`` is needed; ``GradScaler`` (``found_inf.item()``): not
modelled.  MoE layers are traced through transformers' ``grouped_mm`` experts path, whose shapes
do not depend on the routing (tokens x top-k rows); a model whose code branches on routing
results would raise "Tensor.item() cannot be called on meta tensors".

The trace patches process-global state while it runs (all restored on exit): it is not
thread-safe.  With ``QPLAN_TRACE_DEBUG=1`` each storage record also keeps (shape, dtype, op).
Categories at the peak (``breakdown_at_peak``): see ``qplan.observe.summary``; the sum of the
categories other than optimizer_paged is ``tensor_peak``.
"""

from __future__ import annotations

from typing import Any

from .settings import TraceSettings

__all__ = ["TraceSettings", "trace_plan", "trace_training_step"]


def trace_training_step(config: dict, *, quant: str, double_quant: bool, compute_dtype: str, upcast_kbit: bool,
                        lora: dict, batch_size: int, seq_len: int, grad_ckpt: bool, optimizer: str,
                        attn_impl: str = "sdpa", device: str = "meta", steps: int = 1, seed: int = 0,
                        kernels: str = "cuda", count_flops: bool = False, reentrant: bool = False,
                        loss: str = "full", liger_kernels: tuple[str, ...] = (), full: bool = False,
                        method: str = "", section: dict | None = None, objective: str = "sft",
                        padded: bool = False, prompt_len: int = 0, beta: float = 0.0, precompute_ref: bool = False,
                        precompute_pass: bool = False, precompute_batch: int = 0) -> dict:
    """Trace ``steps`` LoRA (``full``: full fine-tuning) training steps and return the live-tensor peak and its breakdown.

    ``kernels`` (meta only) picks whose kernels the meta trace mirrors: ``"cuda"`` (the default,
    what a GPU run allocates) or ``"cpu"`` (what ``device="cpu"`` really runs), used to check the
    meta trace against the cpu oracle byte for byte.  Returned bytes are Python ints.
    """
    if "model_type" not in config:
        raise ValueError("config has no 'model_type': is this a Hugging Face config.json?")
    s = TraceSettings(quant=quant, double_quant=bool(double_quant), compute_dtype=compute_dtype,
                      upcast_kbit=bool(upcast_kbit), lora=dict(lora or {}), batch_size=int(batch_size),
                      seq_len=int(seq_len), grad_ckpt=bool(grad_ckpt), optimizer=optimizer, attn_impl=attn_impl,
                      device=device, steps=int(steps), seed=int(seed),
                      kernels=kernels if device == "meta" else "cpu", count_flops=bool(count_flops),
                      reentrant=bool(reentrant), loss=loss, liger_kernels=tuple(liger_kernels),
                      full=bool(full), method=method, section=dict(section) if section else None,
                      objective=objective, padded=bool(padded), prompt_len=int(prompt_len), beta=float(beta),
                      precompute_ref=bool(precompute_ref), precompute_pass=bool(precompute_pass),
                      precompute_batch=int(precompute_batch))
    from .run import run_trace

    return run_trace(dict(config), s)


def trace_plan(plan: dict[str, Any], device: str = "meta", steps: int = 2, count_flops: bool = False,
               precompute_pass: bool = False) -> dict[str, Any]:
    """Trace the training step of a plan document (``qplan estimate --method trace``); an Unsloth
    plan is traced by Unsloth's own code in its venv (``unsloth_mode``, ``unsloth_run``). ``precompute_pass``: a DPO/KTO
    plan with ``precompute_ref_log_probs``: the pass before training instead of the step."""
    from qplan.planner.errors import QPlanError

    if plan.get("backend") == "unsloth":
        if device != "meta" or count_flops:
            raise QPlanError("the Unsloth trace runs on the meta device and counts no FLOPs")
        from .unsloth_run import trace_unsloth_plan

        return trace_unsloth_plan(plan, steps=steps)

    lora, q, t = plan["lora"] or {}, plan["quant"], plan["training"]
    try:
        return trace_training_step(
            plan["model"]["config"],
            quant=q["quant"],
            double_quant=bool(q.get("double_quant", False)),
            compute_dtype={"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[q["compute_dtype"]],
            upcast_kbit=bool(q.get("prepare_model_for_kbit_training", False)),
            lora=lora, batch_size=t["batch_size"], seq_len=t["seq_len"], grad_ckpt=t["grad_ckpt"] != "off",
            optimizer=t["optimizer"], attn_impl=t["attn_impl"], device=device, steps=steps,
            count_flops=count_flops, reentrant=t["grad_ckpt"] == "reentrant", loss=t.get("loss", "full"),
            liger_kernels=tuple(t.get("liger_kernels") or ()), full=plan.get("method") == "full",
            method=plan.get("method", "") if plan.get("method") not in (None, "full") else "",
            section=plan.get(plan.get("method") or ""), objective=t.get("objective", "sft"),
            padded=bool(t.get("padded", False)), prompt_len=(t.get("grpo") or {}).get("prompt_length", 0),
            beta=(t.get("grpo") or {}).get("beta", 0.0),
            precompute_ref=bool(t.get("precompute_ref_log_probs", False)), precompute_pass=precompute_pass,
            precompute_batch=int(t.get("precompute_ref_batch_size") or t["batch_size"]),
        )
    except ImportError as exc:  # pragma: no cover - only without the train extra
        if (exc.name or "").split(".")[0] == "trl":
            raise QPlanError("--method trace of a --loss trl plan runs TRL's own fused LM head: pip install trl") from exc
        if (exc.name or "").split(".")[0] in ("liger_kernel", "triton"):
            raise QPlanError("--method trace of a --loss liger plan runs Liger's own fused linear cross-entropy: pip "
                             "install liger-kernel==0.8.0 triton") from exc
        raise QPlanError(f"--method trace needs the train extra ({exc.name} missing): pip install 'qplan[train]'") from exc
