"""The traced training step: build, quantize, adapt, optimize, run ``steps`` steps under the tracker.

Each function mirrors one part of what a real run does (sources in each docstring); the model,
quantization and LoRA objects come from ``qplan.hf``, the same mapping the backends load with.
"""

from __future__ import annotations

import contextlib
import inspect
import tempfile
import time
from typing import Any

from qplan.hf import (
    bnb_config,
    cast_adapters,
    hf_config,
    lora_config,
    method_config,
    model_class,
    model_from_config,
    require_optimizer,
    task_of,
    torch_dtype,
)
from qplan.planner.vocab import KBIT
from qplan.planner.vocab import optimizer as optimizer_row

from ..existing import classify_model, register_model
from ..recompute import wrap_recompute
from ..summary import Curve
from ..tracker import LiveTensorTracker, LogitsRule
from . import autocast as emu
from . import patches
from .settings import MAX_GRAD_NORM, TraceSettings
from .stand_ins import bnb_stand_ins, cpu_kernel_stand_ins, meta_stand_ins


def run_trace(config: dict, s: TraceSettings, wrap: Any = None) -> dict:
    """Trace ``s.steps`` training steps of ``config`` (see ``qplan.observe.trace``). ``wrap(model,
    stack)``, if given, returns the module the step runs (the PEFT model sharded by FSDP2, or
    wrapped by DDP: ``qplan.observe.trace.dist``), made after the adapters and before the optimizer."""
    import torch

    t0 = time.perf_counter()
    notes: list[str] = []
    paged: list = []
    current: dict[str, Any] = {"tracker": None}
    with contextlib.ExitStack() as stack:
        stack.enter_context(patches.bnb_quant_maps_restored())
        stack.enter_context(patches.bnb_matmul_cuda_path())
        stack.enter_context(patches.paged_state_stand_in(paged))
        stack.enter_context(patches.quiet_libraries())
        amp = None
        if s.device == "meta":
            stack.enter_context(patches.fused_adamw_on_meta())
            stack.enter_context(patches.torchao_step_on_meta())
            amp = stack.enter_context(patches.EmulatedAutocast(s.amp_device, s.kernels))
            stack.enter_context(patches.packed_sequences_on_meta())
            stack.enter_context(patches.padding_on_meta(s.padded))
        stack.enter_context(torch.random.fork_rng(devices=[]))
        torch.manual_seed(s.seed)
        hf = hf_config(config)
        if s.loss == "cce":
            from .cce import cce_patched

            stack.enter_context(cce_patched(hf))
        if s.loss == "liger" or s.liger_kernels:  # axolotl's LigerPlugin patches the classes before the model loads
            from .liger import gpu_kernels_on_meta as liger_kernels_on_meta
            from .liger import liger_patched

            stack.enter_context(liger_patched(hf, ("flce",) * (s.loss == "liger") + tuple(s.liger_kernels)))
            stack.enter_context(liger_kernels_on_meta(s.amp_device))
        model = build_model(hf, s, stack)
        peft_model = apply_peft(model, s, notes)
        dpo = None
        if s.loss == "trl":  # SFTTrainer (DPOTrainer) patches the causal LM under the PEFT wrapper
            from .trl_head import add_sft_fused_head, gpu_kernels_on_meta

            if s.objective == "grpo":  # GRPOTrainer._compute_loss on a micro-batch (observe.trace.grpo)
                from .grpo import add_grpo_fused_head, grpo_forward, grpo_trainer_state

                add_grpo_fused_head(base_model(peft_model))
                dpo = (grpo_trainer_state(peft_model, s.prompt_len, s.beta), lambda: None, grpo_forward)
            elif s.objective in ("dpo", "kto"):
                from .dpo import add_dpo_fused_head, dpo_forward, dpo_trainer_state
                from .kto import add_kto_fused_head, kto_forward, kto_trainer_state

                dpo_side = s.objective == "dpo"
                add_head = add_dpo_fused_head if dpo_side else add_kto_fused_head
                add_head(base_model(peft_model))
                kwargs = {"use_reentrant": True} if s.reentrant else None
                state = (dpo_trainer_state if dpo_side else kto_trainer_state)(peft_model, kwargs)
                state.precompute_ref_logps = s.precompute_ref
                if s.full and not s.precompute_ref:  # no adapter to disable: TRL loads the reference, a second model
                    state.ref_model = reference_model(hf, s, add_head)
                dpo = (state,
                       # TRL switches checkpointing off for the reference and back on: new checkpoint functions
                       (lambda: recompute_context(peft_model, s, current, amp)) if s.grad_ckpt else (lambda: None),
                       dpo_forward if dpo_side else kto_forward)
            else:
                add_sft_fused_head(base_model(peft_model))
            stack.enter_context(gpu_kernels_on_meta(s.amp_device))
        if s.objective == "reward":  # RewardTrainer.compute_loss on the pairs' rows (observe.trace.reward)
            from .reward import reward_forward, reward_trainer_state

            dpo = (reward_trainer_state(peft_model), lambda: None, reward_forward)
        step_model = wrap(peft_model, stack) if wrap is not None else peft_model
        if s.grad_ckpt:
            recompute_context(peft_model, s, current, amp)
        opt = make_optimizer(peft_model, s)  # first: LoRA-FA's optimizer freezes lora_A
        trainable, total = trainable_and_total(peft_model)
        if amp is not None:
            amp.redirect()
        if s.precompute_pass:  # the reference's log-probabilities before training (observe.trace.precompute)
            from .precompute import run_precompute

            res = run_precompute(peft_model, hf.get_text_config().vocab_size, s, amp, dpo[0], step_stand_ins(s))
        else:
            res = run_steps(step_model, opt, hf.get_text_config().vocab_size, s, amp, paged, current, dpo=dpo)
    add_notes(res, peft_model, s, notes)
    res["trainable_params"] = int(trainable)
    res["all_params"] = int(total)
    res["seconds"] = time.perf_counter() - t0
    res["notes"] = notes
    return res


def build_model(hf: Any, s: TraceSettings, stack: contextlib.ExitStack) -> Any:
    """``model_class(cfg).from_config(cfg, dtype=load_dtype, attn_implementation=attn_impl)``;
    ``load_dtype`` = the compute dtype for nf4/fp4/int8, else the weight dtype. On meta, quantized
    in place as ``from_pretrained`` would (``quantize_on_meta``); on the CPU with seeded random
    weights, saved and re-loaded with ``from_pretrained(dir, quantization_config=...,
    device_map="cpu")``: the real bitsandbytes CPU path."""
    task = task_of(s.objective)[0]
    if s.device == "meta":
        model = model_from_config(hf, dtype=s.load_dtype, attn_impl=s.attn_impl, device="meta", task=task)
        if s.quant in KBIT:
            quantize_on_meta(model, s)
        return model
    model = model_from_config(hf, dtype=s.load_dtype, attn_impl=s.attn_impl, device="cpu", task=task)
    if s.quant in KBIT:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="qplan-trace-"))
        model.save_pretrained(tmp)
        del model
        model = model_class(hf).from_pretrained(
            tmp, quantization_config=bnb_config(s.quant_section), device_map="cpu",
            dtype=torch_dtype(s.load_dtype), attn_implementation=s.attn_impl)
    return model


def quantize_on_meta(model: Any, s: TraceSettings) -> None:
    """``from_pretrained``'s quantization, with the weights made on meta: transformers' own
    ``AutoHfQuantizer.from_config(bnb_config).preprocess_model`` (= ``get_modules_to_not_convert`` +
    ``replace_with_bnb_linear``), then each weight through the code of
    ``transformers.integrations.bitsandbytes.Bnb4bitQuantize.convert`` /
    ``Bnb8bitQuantize.convert``: ``Params4bit(...)._quantize`` / ``Int8Params(...)._quantize`` on
    meta tensors, i.e. bitsandbytes' real ``quantize_4bit`` / ``int8_vectorwise_quant`` run through
    its registered fake (meta) kernels. A 4-bit layer holds exactly: packed uint8 [ceil(n/2), 1],
    code fp32[16], absmax fp32[ceil(n/64)] or (double quant) absmax uint8[ceil(n/64)] + offset
    fp32[] + nested absmax fp32[ceil(blocks/256)] + nested code fp32[256]. int8: int8 [out, in]
    (CB shares its storage) + SCB fp32[out]. Biases stay in the load dtype."""
    import bitsandbytes as bnb
    import torch
    from transformers.quantizers.auto import AutoHfQuantizer

    load = torch_dtype(s.load_dtype)
    hfq = AutoHfQuantizer.from_config(bnb_config(s.quant_section), pre_quantized=False)
    hfq.preprocess_model(model=model, dtype=load, device_map={"": "meta"}, checkpoint_files=None, use_kernels=False)
    meta = torch.device("meta")
    for _, module in model.named_modules():
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            out_f, in_f = module.out_features, module.in_features
            value = torch.empty(out_f, in_f, dtype=load, device=meta)
            old = module.weight
            if isinstance(module, bnb.nn.Linear4bit):
                new = bnb.nn.Params4bit(value, requires_grad=False, **old.__dict__)._quantize(meta)
            else:
                kw = dict(old.__dict__)
                kw.pop("SCB", None)
                new = bnb.nn.Int8Params(value, requires_grad=False, **kw)._quantize(meta)
            module.weight = new
            if module.bias is not None:
                module.bias = torch.nn.Parameter(torch.empty(out_f, dtype=load, device=meta), requires_grad=False)
            module._is_hf_initialized = True
            del old
    model.hf_quantizer = hfq
    hfq.postprocess_model(model)


def apply_peft(model: Any, s: TraceSettings, notes: list[str]) -> Any:
    """As qplan's peft backend: ``use_cache=False``; for k-bit plans with the upcast, the real
    ``prepare_model_for_kbit_training`` (freezes everything, casts fp16/bf16 parameters that are
    not 4-bit to fp32, enables checkpointing with ``use_reentrant=False``); the real
    ``get_peft_model`` (adapters in fp32); then checkpointing as ``Trainer`` enables it
    (``model.activation_checkpointing_enable(None)``: non-reentrant ``torch.utils.checkpoint`` +
    ``enable_input_require_grads``)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    model.config.use_cache = False
    if s.full:
        return full_model(model, s)
    if s.upcast_kbit and s.quant in KBIT:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=s.grad_ckpt,
            gradient_checkpointing_kwargs={"use_reentrant": s.reentrant} if s.grad_ckpt else None)
    elif s.upcast_kbit:
        notes.append(f"upcast_kbit ignored for quant={s.quant}: prepare_model_for_kbit_training is for k-bit models")
    with contextlib.ExitStack() as st:
        if s.device == "meta":
            import torch

            # tensors PEFT makes without a device (e.g. bnb Params4bit.__deepcopy__ for DoRA
            # starts from torch.empty(0)) must be meta to be combined with meta data
            st.enter_context(torch.device("meta"))
        if s.method:  # (IA)³'s vectors and prompt tuning's prompt stay fp32 (get_peft_model's autocast_adapter_dtype)
            pm = get_peft_model(model, method_config(s.method, s.section))
        else:
            pm = cast_adapters(get_peft_model(model, lora_config(s.lora_section, task_of(s.objective)[1])),
                               s.lora_section)
    if s.grad_ckpt:
        pm.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": True} if s.reentrant else None)
    return pm


def recompute_context(model: Any, s: TraceSettings, current: dict[str, Any], amp: Any) -> None:
    """Mark recomputations for the tracker and, on meta, re-enter the forward's function mode and
    emulated autocast state during recomputation (torch.utils.checkpoint does this on real devices)."""
    import torch

    def around():
        state = (torch.is_autocast_enabled(s.amp_device), torch.get_autocast_dtype(s.amp_device),
                 torch.is_autocast_cache_enabled())

        @contextlib.contextmanager
        def enter():
            with contextlib.ExitStack() as st:
                if amp is not None:
                    # the autograd engine runs the recomputation without the forward's mode stack
                    if amp.fmode not in torch.overrides._get_current_function_mode_stack():
                        st.enter_context(amp.fmode)
                    if state[0]:
                        st.enter_context(emu.AmpContext(s.amp_device, state[1], True, state[2]))
                yield

        return enter

    wrap_recompute(model, lambda: current["tracker"], around)


def make_optimizer(model: Any, s: TraceSettings) -> Any:
    """``Trainer.get_optimizer_cls_and_kwargs`` with ``TrainingArguments``' field defaults (the
    dataclass is not instantiated: that would set up accelerate's process-wide state) and the
    plan's ``optim`` (``vocab.Optimizer.trainer_optim``), Trainer's two weight-decay groups;
    ``foreach=True`` where torch picks it for CUDA parameters (the table's ``foreach``)."""
    import dataclasses
    import types

    from transformers import Trainer, TrainingArguments
    from transformers.training_args import OptimizerNames

    row = optimizer_row(s.optimizer)
    require_optimizer(s.optimizer)
    if row.peft:  # PEFT's own optimizer (LoRA-FA), as the backends hand it to the Trainer
        from qplan.hf import peft_optimizer

        return peft_optimizer(model, s.optimizer, s.lora_section, lr=1e-4)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainingArguments) if f.default is not dataclasses.MISSING}
    args = types.SimpleNamespace(**dict(defaults, optim=OptimizerNames(row.trainer_optim)))
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    decay = set(Trainer.get_decay_parameter_names(None, model))  # does not use `self`
    wd = args.weight_decay
    groups = [
        {"params": [p for n, p in model.named_parameters() if n in decay and p.requires_grad], "weight_decay": wd},
        {"params": [p for n, p in model.named_parameters() if n not in decay and p.requires_grad], "weight_decay": 0.0},
    ]
    kwargs = dict(kwargs)
    if row.foreach:
        kwargs["foreach"] = True
    opt = cls(groups, **kwargs)
    if callable(getattr(opt, "train", None)):  # schedule-free: Trainer puts it in train mode before its steps
        opt.train()
    return opt


def batch(vocab: int, s: TraceSettings) -> Any:
    """Random ids, batch x seq (meta: no values); labels are a separate copy, as the collator makes."""
    import torch

    if s.device == "meta":
        return torch.empty(s.rows, s.seq_len, dtype=torch.long, device="meta")
    g = torch.Generator().manual_seed(s.seed + 1)
    return torch.randint(0, vocab, (s.rows, s.seq_len), generator=g)


def reference_model(hf: Any, s: TraceSettings, add_head: Any) -> Any:
    """The reference a full fine-tuning DPO/KTO trainer loads (TRL 1.16 ``DPOTrainer.__init__``: ``ref_model=None``
    without PEFT: ``create_model_from_path`` of the policy's checkpoint, in the policy's dtype and attention): the
    model again, its parameters left as ``from_pretrained`` leaves them (``requires_grad``: TRL does not freeze them;
    autocast caches the casts of such weights), no checkpointing (the Trainer enables it on the policy only), the fused
    head added, in eval mode (``accelerator.prepare_model(..., evaluation_mode=True)``, which also wraps its forward
    under autocast: ``run_steps``)."""
    ref = model_from_config(hf, dtype=s.load_dtype, attn_impl=s.attn_impl, device=s.device,
                            task=task_of(s.objective)[0])
    ref.config.use_cache = False
    add_head(ref)
    return ref.eval()


def full_model(model: Any, s: TraceSettings) -> Any:
    """Full fine-tuning as ``Trainer`` runs a model it is handed without PEFT: every parameter trains (a model built
    from a config already has ``requires_grad`` everywhere; set here so that nothing is left frozen), and checkpointing
    as ``Trainer`` enables it (``activation_checkpointing_enable``, non-reentrant unless asked)."""
    for p in model.parameters():
        p.requires_grad_(True)
    if s.grad_ckpt:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": True} if s.reentrant else None)
    return model


def trainable_and_total(model: Any) -> tuple[int, int]:
    """PEFT's ``get_nb_trainable_parameters`` of a PEFT model; for a plain model the same sums over its parameters
    (a tied weight counted once: ``parameters()`` yields each once)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def base_model(model: Any) -> Any:
    """The transformers model under a PEFT (and a DDP) wrapper; a plain model is its own."""
    m = getattr(model, "module", model)
    return m.get_base_model() if hasattr(m, "get_base_model") else m


def step_stand_ins(s: TraceSettings) -> dict:
    """The ops stood in while the step runs: bitsandbytes' (any device); on meta the device's kernels, TRL's boolean
    masks, KTO's ``nonzero``, Liger's scalars."""
    dev = s.device
    stand_ins = bnb_stand_ins(dev)
    if dev == "meta":
        stand_ins.update(meta_stand_ins(s.kernels))
        if s.kernels == "cpu":
            stand_ins.update(cpu_kernel_stand_ins())
        if s.loss == "trl":
            from .trl_head import boolean_mask_stand_ins

            # GRPO's labels are -100 but on the completion: its fused head's valid rows are C a row
            stand_ins.update(boolean_mask_stand_ins(s.seq_len - s.prompt_len if s.objective == "grpo" else 0))
        if s.objective == "kto":
            from .kto import nonzero_stand_ins

            stand_ins.update(nonzero_stand_ins())
        if s.loss == "liger" or s.liger_kernels:
            from .liger import meta_scalar_stand_ins

            stand_ins.update(meta_scalar_stand_ins())
    return stand_ins


def run_steps(model: Any, opt: Any, vocab: int, s: TraceSettings, amp: Any, paged: list,
              current: dict[str, Any], host: list | None = None, chunked_logits: bool = False,
              dpo: tuple[Any, Any, Any] | None = None) -> dict:
    """``model.train()``; per step as ``Trainer`` does it: forward with ``input_ids``, ``labels`` and
    (when the forward takes ``**kwargs``) ``num_items_in_batch``, under autocast with accelerate's
    ``convert_to_fp32`` of the outputs; ``loss.backward()``; ``clip_grad_norm_(params, 1.0)``;
    ``optimizer.step()``; ``zero_grad(set_to_none=True)``.  ``host`` (the Unsloth mode): tensors
    that stand for pinned host memory, existing before the step (``host_peak``: their peak);
    ``chunked_logits``: flag logits of any number of rows (a chunked cross-entropy); ``dpo``: the DPO (KTO) trainer's
    stand-in state, what to run after each of its forwards and the forward (``observe.trace.dpo``,
    ``observe.trace.kto``): the step's forward is ``DPOTrainer._compute_loss`` on ``2 B`` rows (``KTOTrainer``'s on
    ``B``), under autocast, and no ``num_items_in_batch``."""
    import torch
    from accelerate.utils.operations import convert_to_fp32

    dev = s.device
    stand_ins = step_stand_ins(s)
    rule = LogitsRule.for_step(vocab, s.rows, s.seq_len + s.virtual_tokens, chunked_logits)
    tracker = LiveTensorTracker(dev, logits=rule,
                                stand_ins=stand_ins, host_scalars_phase="optimizer" if dev == "cpu" else None)
    ids = batch(vocab, s)
    # DPO: the collator's completion_mask (every position a completion token); _compute_loss makes the labels
    labels = ids.clone() if dpo is None else torch.ones_like(ids)
    base = base_model(model)  # DDP wraps the PEFT model
    accepts = getattr(base, "accepts_loss_kwargs", None)
    if accepts is None:
        accepts = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in inspect.signature(base.forward).parameters.values())
    num_items = labels[..., 1:].ne(-100).sum() if accepts and dpo is None else None
    trainable = [p for p in model.parameters() if p.requires_grad]

    def grad_hook(p):
        rec = tracker.lookup(p.grad)
        if rec is not None and rec.grad_at is None:
            rec.grad_at = tracker.event

    def pack(t):
        rec = tracker.lookup(t)
        if rec is not None:
            rec.saved = True
        return t

    def amp_ctx():
        if not s.amp:
            return contextlib.nullcontext()
        if dev == "meta":
            return emu.AmpContext(s.amp_device, torch_dtype(s.compute_dtype), True, True)
        return torch.autocast("cpu", dtype=torch_dtype(s.compute_dtype))

    def forward():
        if dpo is not None:
            return dpo[2](dpo[0], model, ids, labels, dpo[1])
        kwargs = {"input_ids": ids, "labels": labels}
        if s.loss == "trl":
            kwargs["fused_lm_head"] = True  # SFTTrainer.compute_loss
        if num_items is not None:
            kwargs["num_items_in_batch"] = num_items
        with amp_ctx():
            outputs = model(**kwargs)
        if s.amp:
            outputs = convert_to_fp32(outputs)
        loss = outputs["loss"]
        del outputs
        return loss

    def prepared(module):  # accelerate's prepare: the forward under autocast, its outputs converted to fp32
        inner = module.forward

        def amp_forward(*a, **k):
            with amp_ctx():
                out = inner(*a, **k)
            return convert_to_fp32(out) if s.amp else out

        module.forward = amp_forward

    if dpo is not None:
        prepared(model)
        if getattr(dpo[0], "ref_model", None) is not None:  # the reference, prepared for evaluation the same way
            prepared(dpo[0].ref_model)
    hooks = [p.register_post_accumulate_grad_hook(grad_hook) for p in trainable]
    host_step = optimizer_row(s.optimizer).host_step
    model.train()
    counter = None
    flops_at: list[int] = []
    with contextlib.ExitStack() as stack:
        if amp is not None:
            stack.enter_context(amp.fmode)
        if s.count_flops:
            from torch.utils.flop_counter import FlopCounterMode

            counter = stack.enter_context(FlopCounterMode(display=False))
        stack.enter_context(tracker)
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
        current["tracker"] = tracker
        for t in (ids, labels, num_items):
            tracker.add_existing(t, "input")
        register_model(tracker, model, as_weights=s.full)  # full fine-tuning: the trained weights are weights
        if dpo is not None and getattr(dpo[0], "ref_model", None) is not None:
            register_model(tracker, dpo[0].ref_model, as_weights=True)  # the reference's weights
        for t in host or ():
            tracker.add_existing(t, None).host = True
        for state in opt.state.values():
            for v in state.values():
                tracker.add_existing(v, None)
        for step in range(1, s.steps + 1):
            if counter is not None:
                flops_at.append(counter.get_total_flops())
            tracker.set_phase("forward", step)
            loss = forward()
            tracker.set_phase("backward")
            loss.backward()
            del loss
            tracker.set_phase("optimizer")
            torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
            opt.step()
            for buf in paged:
                rec = tracker.lookup(buf)
                if rec is not None:
                    rec.paged = True
            paged.clear()
            opt.zero_grad(set_to_none=True)
            tracker.set_phase("end")
            classify_model(tracker, model, opt, host_step=host_step)
        if counter is not None:
            flops_at.append(counter.get_total_flops())
        current["tracker"] = None
    for h in hooks:
        h.remove()
    tracker.detach()
    res = Curve(tracker).summarize()
    if host is not None:
        res["host_peak"] = host_peak(tracker.records)
    late = sum(r.nbytes for r in tracker.records if r.late and not r.host)
    res["late_bytes"] = late
    for key in ("peak_phase", "peak_event"):
        res.pop(key)
    if counter is not None:
        res["flops_per_step"] = [int(b - a) for a, b in zip(flops_at, flops_at[1:])]
    # the last step's kernel launches by phase (on meta the optimizer phase runs torch's per-tensor loops, where CUDA
    # runs the foreach kernels: compare forward and backward)
    res["kernel_launches"] = {ph: n for (st, ph), n in tracker.launches.items() if st == s.steps}
    if tracker.collectives:  # a multi-GPU plan's collectives (the full-size tensor's bytes), by phase and op
        res["collectives"] = {f"{ph}:{op}": n for (st, ph, op), n in tracker.collectives.items() if st == s.steps}
    return res


def host_peak(records: list) -> int:
    """The most bytes of host-booked storages alive at once (records of one tracker)."""
    ev = sorted([(r.alloc, r.nbytes) for r in records if r.host]
                + [(r.free, -r.nbytes) for r in records if r.host and r.free is not None], key=lambda e: (e[0], e[1]))
    cur = peak = 0
    for _, b in ev:
        cur += b
        peak = max(peak, cur)
    return peak


def add_notes(res: dict, model: Any, s: TraceSettings, notes: list[str]) -> None:
    import bitsandbytes as bnb

    late = res.pop("late_bytes", 0)
    if late:
        notes.append(f"{late} bytes of storages were first seen as op inputs (made without an op)")
    notes.insert(0, "live tensor bytes: excludes allocator rounding/fragmentation, kernel workspaces "
                    "(cuBLAS, flash attention) and the CUDA context")
    if s.device == "meta":
        notes.append(f"kernels mirrored: {s.kernels}")
    if s.quant in ("nf4", "fp4") and s.kernels == "cuda":
        biggest = max((m.out_features * m.in_features for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)),
                      default=0)
        notes.append(
            "4-bit forward traced as bitsandbytes' CUDA dequantize+linear fallback; for "
            f"batch*seq <= 1536 the fused kernel may skip the transient dequantized weight "
            f"(up to {biggest * torch_dtype(s.compute_dtype).itemsize} bytes for the largest layer)")
    if s.quant == "int8" and s.device == "meta":
        notes.append("int8: LLM.int8() outlier columns (threshold 6.0) taken as none on meta")
    if res["breakdown_at_peak"]["optimizer_paged"] or "paged" in s.optimizer:
        notes.append("optimizer_paged (cudaMallocManaged state) is not part of tensor_peak")
    if s.compute_dtype == "fp16":
        notes.append("fp16: GradScaler's few scalar tensors are not modelled")
