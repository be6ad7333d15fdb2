"""Measured oracles of GRPO's memory on the CPU (``tests/planner/test_grpo.py``, ``bench/grpo_cpu_runs.py``): a real
transformers ``generate`` and a real TRL ``GRPOTrainer`` run, on a model built from a config with random weights,
every live tensor tracked (``observe.tracker``).

* ``tracked_generate``: one generation batch as TRL 1.16's ``_generate_single_turn`` runs it (``no_grad``, the
  model in train mode as the Trainer leaves it, TRL's sampling settings), left-padded prompts; the live bytes beyond
  the model's own at the prefill, the last decode forward and the last sampling, and the cache ``generate`` returns.
* ``tracked_grpo_run``: ``GRPOTrainer.train`` for 3 steps with ``MeasureCallback`` (steps 2-3 measured), the
  generation marked as its own phase: the tensor peak and each phase's peak.

Torch, transformers, PEFT and TRL are imported inside the functions."""

from __future__ import annotations

import itertools
import tempfile
from typing import Any


def _random_peft_model(config: dict[str, Any], dtype: str, r: int, dropout: float) -> tuple[Any, str]:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from qplan.backends.modelsrc import build_random_model_dir
    from qplan.hf import lora_config

    folder = tempfile.mkdtemp(prefix="qplan-grpo-")
    build_random_model_dir(config, folder, seed=0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
    lora = lora_config({"r": r, "alpha": 2 * r, "target_modules": "all-linear", "dropout": dropout})
    return get_peft_model(model, lora), folder


def tracked_generate(config: dict[str, Any], n: int, prompt: int, completion: int, dtype: str = "bfloat16",
                     dropout: float = 0.0, r: int = 16) -> dict[str, int]:
    """Generate ``completion`` tokens for ``n`` random prompts of ``prompt`` tokens (the first row left-padded by 2)
    with TRL 1.16's ``GenerationConfig`` settings (sampling, temperature 1, top_p 1, top_k 0; no EOS, so every row
    runs to the end, as planned); the peaks beyond the live bytes before the call: ``prefill`` (the first forward),
    ``decode`` (the last forward), ``sample`` (the last sampling); ``kv_cache``: the bytes of the returned cache's
    tensors; ``positions``: its length."""
    import torch
    from transformers import GenerationConfig

    from qplan.observe.existing import register_model
    from qplan.observe.tracker import LiveTensorTracker

    model, _ = _random_peft_model(config, dtype, r, dropout)
    model.train()  # the Trainer's model: TRL's generation runs it in train mode (LoRA dropout included)
    ids = torch.randint(3, int(config["vocab_size"]), (n, prompt))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    gen = GenerationConfig(max_new_tokens=completion, do_sample=True, pad_token_id=2, bos_token_id=1, eos_token_id=None,
                           temperature=1.0, top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0,
                           cache_implementation=None, disable_compile=True, return_dict_in_generate=True)
    calls = [0]
    with torch.no_grad(), LiveTensorTracker("cpu") as tr:
        register_model(tr, model)
        tr.add_existing(ids, "input")
        tr.add_existing(mask, "input")

        def before(*_: Any) -> None:
            calls[0] += 1
            tr.set_phase("prefill" if calls[0] == 1 else "decode", calls[0])

        hooks = [model.base_model.model.register_forward_pre_hook(before),
                 model.base_model.model.register_forward_hook(lambda *_: tr.set_phase("sample", calls[0]))]
        tr.set_phase("start", 0)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
        tr.set_phase("end", 0)
        for h in hooks:
            h.remove()
    delta = [0] * (tr.event + 1)
    for rec in tr.records:
        if rec.alloc >= 0:
            delta[rec.alloc] += rec.nbytes
            if rec.free is not None:
                delta[rec.free] -= rec.nbytes
    live = list(itertools.accumulate(delta))
    marks = [*tr.marks, (tr.event, "end", 0)]
    peaks = {"prefill": 0, "decode": 0, "sample": 0}
    for (lo, phase, step), (hi, _, _) in zip(marks, marks[1:]):
        last = step == calls[0] or phase == "prefill"
        if phase in peaks and last and hi > lo:
            peaks[phase] = max(peaks[phase], max(live[lo:hi]))
    cache = out.past_key_values
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    return {**peaks, "kv_cache": sum(t.numel() * t.element_size() for t in tensors),
            "positions": int(tensors[0].shape[-2]), "forwards": calls[0]}


def tracked_grpo_run(config: dict[str, Any], batch: int, generations: int, prompt: int, completion: int,
                     grad_accum: int = 1, steps_per_generation: int | None = None, grad_ckpt: bool = True,
                     dropout: float = 0.0, r: int = 16) -> dict[str, Any]:
    """Three steps of TRL 1.16's ``GRPOTrainer`` (bf16, LoRA on every linear layer, a toy reward: the completion's
    length) on prompts of exactly ``prompt`` tokens, steps 2-3 tracked: ``tensor_peak`` and ``phase_peaks`` (the
    generation its own phase)."""
    import warnings

    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from qplan.backends.grpo_train import generation_marked
    from qplan.backends.measure import MeasureCallback, Probe
    from qplan.observe.tracker import LogitsRule

    model, folder = _random_peft_model(config, "bfloat16", r, dropout)
    tok = AutoTokenizer.from_pretrained(folder)
    probe = Probe("cpu")
    probe.vocab = int(config["vocab_size"])
    probe.logits = LogitsRule.for_step(probe.vocab, batch, prompt + completion)
    meter = MeasureCallback(probe, tokens_per_step=batch * (prompt + completion) * grad_accum, warmup_steps=1,
                            measure_steps=2)
    word = tok("hello", add_special_tokens=False)["input_ids"]
    text = tok.decode((word * prompt)[:prompt])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = GRPOConfig(output_dir=folder + "/out", per_device_train_batch_size=batch, num_generations=generations,
                          max_completion_length=completion, gradient_accumulation_steps=grad_accum,
                          steps_per_generation=steps_per_generation or grad_accum, max_steps=3, logging_steps=1,
                          report_to=[], use_cpu=True, bf16=True, activation_checkpointing=grad_ckpt,
                          save_strategy="no", learning_rate=1e-4, disable_tqdm=True)
        trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [float(len(c)) for c in completions],
                              args=args, train_dataset=Dataset.from_dict({"prompt": [text] * 64}),
                              processing_class=tok, callbacks=[meter])
    with warnings.catch_warnings(), generation_marked(trainer, probe):  # the probe then summarizes it as a phase
        warnings.simplefilter("ignore", FutureWarning)  # TRL calls transformers' deprecated checkpointing names
        trainer.train()
    mem = probe.memory()
    return {"tensor_peak": mem["tensor_peak"], "phase_peaks": mem["phase_peaks"],
            "prompt_tokens": len(tok(text)["input_ids"])}
