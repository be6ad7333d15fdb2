"""The moments of a training step and its peak: the one formula ``qplan estimate`` and ``qplan fit`` use.

The peak of a training step is the largest of these moments (``MemoryModel``):

* **loss** (end of the forward) — weights + adapters + optimizer states (from step 2 on) + every
  saved activation + the logits and the loss's fp32 copies;
* **start of backward** — the same activations + three fp32 ``T x V`` tensors of the loss's
  backward (the peak of almost every real plan);
* **layer-0 backward** — the other layers' gradients + layer 0's activations (recomputed with
  checkpointing) + the incoming gradient (the peak when the vocabulary is small);
* **last layer's backward** (with checkpointing) — the same layer moment without the other layers'
  gradients but with every layer's checkpointed input (MoE layers at long sequences);
* **optimizer step** — weights + adapters + gradients + optimizer states + the step's temporaries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qplan.planner.memory.activations import ZERO, Lin, activation_terms, precision
from qplan.planner.memory.full import cached_weight_casts
from qplan.planner.memory.generation import GenerationShape, generation_terms
from qplan.planner.memory.lin import most
from qplan.planner.memory.loss import loss_terms, loss_time_activation
from qplan.planner.memory.precompute import precompute_pass_bytes
from qplan.planner.memory.terms import (
    GrpoSettings,
    TrainingSettings,
    adapter_bytes,
    dequant_temp_bytes,
    dims,
    gradient_bytes,
    optimizer_state_bytes,
    optimizer_step_temp_bytes,
    overhead_bytes,
    stepped_counts,
)
from qplan.planner.model.lora import ModuleCount
from qplan.planner.model.spec import ModelSpec
from qplan.planner.model.weights import QuantSettings
from qplan.planner.vocab import BYTES, CATEGORIES, MOMENTS_OF_PHASE, PREFERENCE_OBJECTIVES


def training_memory(spec: ModelSpec, counts: list[ModuleCount], lora_r: int, dropout: float,
                    q: QuantSettings, t: TrainingSettings, weights: int, loss: str = "full",
                    kernels: str = "cuda", dora: bool = False) -> dict[str, Any]:
    """All terms and the peak, for one plan.  ``loss``: ``planner.memory.loss.LOSS_KINDS``; ``kernels="cpu"``: what
    the same step allocates when it runs on the CPU (``qplan run --device cpu`` compares against that)."""
    return MemoryModel.build(spec, counts, lora_r, dropout, q, t.grad_ckpt, t.optimizer, t.attn_impl,
                             weights, loss, kernels, t.padded, dora, t.liger_kernels,
                             t.objective, t.grpo, t.grad_accum, t.precompute_rows).evaluate(*t.shape, t.grad_accum)


@dataclass(frozen=True)
class MemoryModel:
    """The terms of a plan that do not depend on batch x sequence, and the linear forms of those
    that do; ``evaluate(b, s)`` gives the phases and the peak.  ``qplan estimate`` and ``qplan fit``
    both use it, so a plan's numbers are the same whichever command prints them.

    Moments (the peak is their maximum):

    * ``forward``: static + saved activations + the loss's logits (``logits_terms['forward']``);
    * ``backward``: the start of backward: the same activations + ``logits_terms['backward']``
      (``12 T V``);
    * ``layers``: backward reaching layer 0, after the logits are freed: the gradients of the
      other layers, the incoming gradient (two ``R h T``), layer 0's activations (recomputed with
      checkpointing, with the recomputation's transients) — the peak of small-vocabulary models;
    * ``optimizer``: static + gradients + the step's temporaries;
    * ``attention`` (eager attention with checkpointing only): a layer's forward at its softmax,
      the ``s^2`` score tensors that nothing saves (``eager_forward_transient``).

    ``static`` = weights + adapters + optimizer states (from step 2 on), paged optimizer state
    excluded; with gradient accumulation the gradients are alive in every phase.
    """

    weights: int
    adapters: int
    gradients: int
    optimizer: int
    optimizer_paged: int
    temps_opt: int
    temps_dq: int
    saved: Lin
    layers: Lin
    attn_fwd: Lin
    layers_grads: int
    loss_extra: Lin
    #: the loss's moments at the end of the forward and the start of the backward (``loss_terms``: the largest counts)
    logits_fwd: tuple[Any, ...]
    logits_bwd: tuple[Any, ...]
    #: the transient parts of ``layers`` and ``attn_fwd`` (for ``composition`` only)
    layers_temps: Lin = ZERO
    attn_temps: Lin = ZERO
    #: the other layers' checkpointed inputs the last layer's backward holds (``activation_terms``)
    ckpt_inputs: Lin = ZERO
    #: moments inside a MoE layer's backward (``moe.moe_backward_moments``): the largest at ``T`` is
    #: added to both layer moments
    layer_moments: tuple[Lin, ...] = ()
    #: without checkpointing, the last layer's down projection in the forward (``activation_terms``): what the loss
    #: moment holds but the loss, and the MLP's transients (``mlp_fwd_temps``) — the peak when the loss makes no logits
    mlp_fwd: Lin = ZERO
    mlp_fwd_temps: Lin = ZERO
    #: gradients alive at the last layer's backward (full fine-tuning: the head's, ``full_layer_grads``)
    last_grads: int = 0
    #: full fine-tuning: gradients at the embeddings' backward, without and with gradient accumulation
    #: (``full_layer_grads``); () otherwise
    end_grads: tuple[int, ...] = ()
    #: of those, what is a parameter's ``.grad`` (the rest: autograd's buffer summing a tied weight's gradients)
    end_in_grad: tuple[int, ...] = ()
    #: alive at the embeddings' backward besides the gradients, kept and transient
    #: (``masks.embeddings_backward_activation``)
    end_acts: tuple[Lin, Lin] = (ZERO, ZERO)
    #: DPO: what the reference's forward holds beyond the policy's forward moment (``dpo_reference_extra``)
    reference: Lin = ZERO
    #: GRPO (on a GPU): the fused head scores the completion's positions only (``logits_to_keep``), this many a row;
    #: 0: every position
    keep: int = 0
    #: GRPO: the generation phase's terms for a micro-batch of ``b`` rows (``generation.generation_terms``), and
    #: whether the gradients are alive when it runs (a generation batch that starts inside an accumulation window)
    generation: Callable[[int], dict[str, int]] | None = None
    generation_grads: bool = False
    #: DPO/KTO with ``precompute_ref_log_probs``: the pass before training, beyond the weights and adapters, at ``s``
    #: tokens a row (``precompute.precompute_pass_bytes``); None: no pass
    precompute: Callable[[int], dict[str, int]] | None = None

    @classmethod
    def build(cls, spec, counts, lora_r, dropout, q, grad_ckpt, optimizer, attn_impl, weights, loss="full",
              kernels="cuda", padded=False, dora=False, liger=(), objective="sft", grpo=None, grad_accum=1,
              precompute_rows=0):
        # adapters of modules a text-only step never runs (a vision tower) get no gradient or state
        stepped = stepped_counts(spec, counts)
        opt = optimizer_state_bytes(stepped, optimizer)
        L = dims(spec).L
        acts = activation_terms(spec, stepped, lora_r, dropout, q, grad_ckpt, attn_impl, kernels, padded, dora,
                                head_linear=loss not in ("cce", "trl", "liger"), liger=liger)
        # KTO's and GRPO's fused heads compute no top-1 (``outputs=("log_probs", "entropy"[, "mean_logits"])``)
        full = any(c.kind == "full" for c in counts)  # full fine-tuning trains the head (TRL's fused head: its grad)
        lg = loss_terms(spec, q, loss, kernels, top1=objective not in ("kto", "grpo"),
                        head_grad=BYTES[q.unquantized_dtype] if full else 0)
        ref = objective in PREFERENCE_OBJECTIVES and not precompute_rows  # precomputed: no reference forward
        return cls(
            weights=weights, adapters=adapter_bytes(counts), gradients=gradient_bytes(stepped),
            optimizer=opt["device"] + opt["paged"], optimizer_paged=opt["paged"],
            temps_opt=optimizer_step_temp_bytes(stepped, optimizer, kernels),
            temps_dq=dequant_temp_bytes(spec, q, precision(q).c),
            saved=acts["saved"], layers=acts["layers"], attn_fwd=acts["attn_fwd"],
            # entering layer 0's backward, the other layers' gradients exist (full fine-tuning: and the head's)
            layers_grads=acts["grads"][0] if acts["grads"] else gradient_bytes(stepped) * (L - 1) // max(1, L),
            last_grads=acts["grads"][1] if acts["grads"] else 0,
            end_grads=acts["grads"][2:4] if acts["grads"] else (), end_in_grad=acts["grads"][4:] if acts["grads"] else (),
            end_acts=acts["end"],
            loss_extra=acts["loss_extra"] + objective_inputs(objective), logits_fwd=lg["forward"],
            logits_bwd=lg["backward"],
            reference=dpo_reference_extra(spec, stepped, q, grad_ckpt, 13 if objective == "kto" else 14) if ref
            else ZERO,
            layers_temps=acts["layers_temps"], attn_temps=acts["attn_fwd_temps"], ckpt_inputs=acts["ckpt_inputs"],
            layer_moments=acts["layer_moments"], mlp_fwd=acts["mlp_fwd"], mlp_fwd_temps=acts["mlp_fwd_temps"],
            **({} if grpo is None else grpo_fields(spec, counts, dropout, q, kernels, grpo, grad_accum)),
            precompute=(lambda s: precompute_pass_bytes(spec, q, lg["forward"], precompute_rows, s, objective,
                                                        kernels, full, padded)) if precompute_rows else None,
        )

    def phases(self, b: int, s: int, grad_accum: int = 1) -> dict[str, int]:
        """Live tensor bytes at each moment of the step (the one formula both commands use)."""
        T = b * s
        H = b * self.keep if self.keep else T  # the rows the fused head scores
        # paged optimizer state lives in CUDA unified memory, outside the device allocator
        static = self.weights + self.adapters + self.optimizer - self.optimizer_paged
        # gradients stay alive between micro-batches when accumulating
        g = self.gradients if grad_accum > 1 else 0
        acts = self.saved.at(T, s)
        out = {
            "forward": static + g + acts + self.loss_extra.at(T, s) + most(self.logits_fwd, H, s),
            "backward": static + g + acts + most(self.logits_bwd, H, s),
            "layers": static + (self.gradients if grad_accum > 1 else self.layers_grads) + self.layers.at(T, s)
            + self.moment(T, s),
        }
        if self.ckpt_inputs != ZERO:
            out["layers_last"] = (static + (g or self.last_grads) + (self.layers + self.ckpt_inputs).at(T, s)
                                  + self.moment(T, s))
        if self.reference != ZERO:  # DPO: the reference's forward, after the policy's
            out["reference"] = out["forward"] + self.reference.at(T, s)
        if self.end_grads:
            out["embeddings"] = static + self.end_grads[grad_accum > 1] + sum(x.at(T, s) for x in self.end_acts)
        out["optimizer"] = static + self.gradients + self.temps_opt
        if self.attn_fwd != ZERO:
            out["attention"] = static + g + self.attn_fwd.at(T, s)
        if self.mlp_fwd != ZERO:
            out["mlp_forward"] = static + g + self.mlp_fwd.at(T, s)
        if self.generation is not None:
            out["generation"] = static + (self.gradients if self.generation_grads else 0) + self.generation(b)["peak"]
        if self.precompute is not None:  # before training: no optimizer state, no gradients
            out["precompute"] = self.weights + self.adapters + self.precompute(s)["peak"]
        return out

    def moment(self, T: int, s: int) -> int:
        """The largest of ``layer_moments`` at ``T`` tokens (0 for a dense model)."""
        return max((m.at(T, s) for m in self.layer_moments), default=0)

    def composition(self, b: int, s: int, grad_accum: int = 1) -> dict[str, dict[str, int]]:
        """What the bytes of each moment of ``phases`` are, in the tracker's categories
        (``vocab.CATEGORIES`` less ``optimizer_paged``, which is outside the peak): each moment's
        parts add up to its total in ``phases`` exactly.  A report draws the moment where a run's
        peak was measured from this, beside the measured ``breakdown_at_peak``."""
        T = b * s
        H = b * self.keep if self.keep else T
        g = self.gradients if grad_accum > 1 else 0
        static = {"weights": self.weights, "adapters": self.adapters,
                  "optimizer": self.optimizer - self.optimizer_paged}
        acts = self.saved.at(T, s)
        layers_t = self.layers_temps.at(T, s) + self.moment(T, s)
        parts = {
            # the loss-time extras are made in the forward and not saved: transients to a tracker
            "forward": {"gradients": g, "activations": acts, "logits": most(self.logits_fwd, H, s),
                        "temporaries": self.loss_extra.at(T, s)},
            "backward": {"gradients": g, "activations": acts, "logits": most(self.logits_bwd, H, s)},
            "layers": {"gradients": self.gradients if grad_accum > 1 else self.layers_grads,
                       "activations": self.layers.at(T, s) + self.moment(T, s) - layers_t, "temporaries": layers_t},
        }
        if self.reference != ZERO:  # the policy's kept rows and outputs, less autocast's cache: transient to a tracker
            fwd = parts["forward"]
            parts["reference"] = {**fwd, "temporaries": fwd["temporaries"] + self.reference.at(T, s)}
        if self.ckpt_inputs != ZERO:
            parts["layers_last"] = {"gradients": g or self.last_grads,
                                    "activations": (self.layers + self.ckpt_inputs).at(T, s) + self.moment(T, s) - layers_t,
                                    "temporaries": layers_t}
        if self.end_grads:
            end = self.end_grads[grad_accum > 1]
            kept, transient = (x.at(T, s) for x in self.end_acts)
            in_grad = self.end_in_grad[grad_accum > 1]
            parts["embeddings"] = {"gradients": in_grad, "activations": kept, "temporaries": end - in_grad + transient}
        parts["optimizer"] = {"gradients": self.gradients, "temporaries": self.temps_opt}
        if self.attn_fwd != ZERO:
            attn_t = self.attn_temps.at(T, s)
            parts["attention"] = {"gradients": g, "activations": self.attn_fwd.at(T, s) - attn_t,
                                  "temporaries": attn_t}
        if self.mlp_fwd != ZERO:
            mt = self.mlp_fwd_temps.at(T, s)
            parts["mlp_forward"] = {"gradients": g, "activations": self.mlp_fwd.at(T, s) - mt, "temporaries": mt}
        if self.generation is not None:  # no autograd: every byte of generate's is a transient to a tracker
            parts["generation"] = {"gradients": self.gradients if self.generation_grads else 0,
                                   "temporaries": self.generation(b)["peak"]}
        if self.precompute is not None:  # the batch existed before: an activation to a tracker; the rest transient
            pre = self.precompute(s)
            parts["precompute"] = {"optimizer": 0, "activations": pre["inputs"],
                                   "temporaries": pre["peak"] - pre["inputs"]}
        order = [c for c in CATEGORIES if c != "optimizer_paged"]
        return {moment: {c: int({**static, **p}.get(c, 0)) for c in order} for moment, p in parts.items()}

    def peak(self, b: int, s: int, grad_accum: int = 1) -> int:
        """tensor_peak only (the inner loop of ``qplan fit``)."""
        return max(self.phases(b, s, grad_accum).values())

    def evaluate(self, b: int, s: int, grad_accum: int = 1) -> dict[str, Any]:
        T = b * s
        phases = self.phases(b, s, grad_accum)
        acts = self.saved.at(T, s)
        tensor_peak = max(phases.values())
        phase = next(k for k, v in phases.items() if v == tensor_peak)
        over = overhead_bytes(tensor_peak)
        return {
            "adapters": self.adapters,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "optimizer_paged": self.optimizer_paged,
            "activations": acts,
            "logits": most(self.logits_bwd, b * self.keep if self.keep else T, s),
            "temporaries": max(self.temps_dq, self.temps_opt),
            "overhead": sum(over.values()),
            "cuda_context": over["cuda_context"],
            "allocator_slack": over["allocator_slack"],
            "tensor_peak": tensor_peak,
            "peak": tensor_peak + sum(over.values()),
            "peak_phase": phase,
            "phases": phases,
            "composition": self.composition(b, s, grad_accum),
            **({} if self.generation is None else {"generation": self.generation(b)}),
        }



def dpo_inputs() -> Lin:
    """DPO's batch beyond SFT's ids and labels, alive through the forward: ``DataCollatorForPreference``'s
    ``attention_mask`` and ``completion_mask``, int64 (``16 T``; TRL 1.16 ``dpo_trainer.py``)."""
    return Lin(tok=16)


def kto_inputs() -> Lin:
    """KTO's batch beyond SFT's ids and labels, alive through the step (TRL 1.16 ``kto_trainer.py``,
    ``DataCollatorForUnpairedPreference``): ``attention_mask`` and ``completion_mask``, and the KL term's mismatched
    rows ``KL_input_ids``, ``KL_attention_mask`` and ``KL_completion_mask`` (int64, planned as wide as the batch:
    ``40 T``), and each row's ``label`` (int64, ``8`` a row)."""
    return Lin(tok=40, rows=8)


def grpo_fields(spec: ModelSpec, counts: list[ModuleCount], dropout: float, q: QuantSettings, kernels: str,
                grpo: GrpoSettings, grad_accum: int) -> dict[str, Any]:
    """GRPO's ``MemoryModel`` fields: on a GPU the fused head scores the ``max_completion_length`` positions of each
    row (TRL's ``logits_to_keep``; its labels are ``-100`` elsewhere, and Triton's head projects the valid rows only;
    the CPU's projects every position); the generation phase (``generation.generation_terms``) of ``b x
    steps_per_generation`` rows, the LoRA targets and the adapters' dtype read from ``counts``; it runs with the
    gradients alive when a generation batch starts inside an accumulation window (``steps_per_generation`` not a
    multiple of ``grad_accum``: TRL generates every ``steps_per_generation`` micro-batches; the Trainer frees the
    gradients after each optimizer step)."""
    keep = {"keep": grpo.max_completion_length if kernels == "cuda" else 0}
    if grpo.vllm is not None:  # vLLM generates: on the server's GPUs, or inside its reservation here (colocate)
        if grpo.vllm == "colocate" and grpo.vllm_sleep:  # it wakes for each generation beside the trainer's static
            return {**keep, "generation": lambda b: {"peak": grpo.vllm_reserved},
                    "generation_grads": grpo.steps_per_generation % grad_accum != 0}
        return keep
    lora = [c for c in counts if c.kind == "lora"]
    targets = frozenset(c.module.rsplit(".", 1)[-1] for c in lora)
    adapter = lora[0].dtype if lora else q.unquantized_dtype
    shape = (grpo.prompt_length, grpo.max_completion_length)
    # a GPU's bitsandbytes dequantizes a 4-bit weight for a matmul of several rows (gemv only for one); its CPU path
    # under no_grad makes no dequantized copy (measured: tests/backends/test_preference_run.py, the nf4 GRPO run)
    dq = dequant_temp_bytes(spec, q, precision(q).c) if q.kbit and kernels == "cuda" else 0

    def generation(b: int) -> dict[str, int]:
        t = generation_terms(spec, q, adapter, targets, GenerationShape(grpo.sequences(b), *shape), dropout, kernels)
        return {**t, "peak": t["peak"] + dq, "dequant": dq}

    return {**keep, "generation": generation, "generation_grads": grpo.steps_per_generation % grad_accum != 0}


def objective_inputs(objective: str) -> Lin:
    """What the objective's batch holds beyond SFT's ids and labels."""
    # a reward model's batch is input_ids and attention_mask: as many bytes as SFT's ids and labels
    return {"dpo": dpo_inputs, "kto": kto_inputs}[objective]() if objective in ("dpo", "kto") else ZERO


def dpo_reference_extra(spec: ModelSpec, counts: list[ModuleCount], q: QuantSettings, grad_ckpt: str,
                        outputs: int = 14) -> Lin:
    """What the reference's forward (TRL 1.16 ``DPOTrainer._compute_loss``: the model again, adapters disabled, under
    ``no_grad``) holds at its head beyond the policy's own forward moment at its head. The reference's head moment
    has its own final norm output and valid rows, as the policy's had, plus what the policy keeps for its backward:
    its valid rows' hidden states (``hidden[mask]``, saved by the fused head: ``R h`` a row) and its outputs
    (log-probabilities, entropy, mean logits: fp32; top-1 and label mask: bool; ``outputs`` = ``14`` a row; KTO's
    head computes no top-1: ``13``), rows planned as ``T`` as the head's terms are. KTO's reference runs the KL rows
    and then the batch's rows, one after the other: the same moment. Less, with checkpointing under autocast, the
    cached casts of the adapters (``loss.loss_time_activation``'s constant): accelerate's autocast around the
    policy's forward has exited, so its cache is gone (without checkpointing those casts are saved, and stay). With
    full fine-tuning the reference is a second model (``profiles.reference_weights``), prepared by accelerate with its
    forward under autocast and its parameters left requiring grad: autocast caches the casts of its decoder layers'
    weights until its forward returns, the moment at its head included (``full.cached_weight_casts``)."""
    d = dims(spec)
    p = precision(q)
    cached = loss_time_activation(spec, counts, q, grad_ckpt).const if grad_ckpt != "off" and p.amp else 0
    # full fine-tuning: the reference is a second model whose parameters TRL leaves requiring grad, so autocast caches
    # the casts of its layers' weights through its forward as it did the policy's (``full.cached_weight_casts``)
    ref_cache = cached_weight_casts(spec, p, q.unquantized_dtype) if any(c.kind == "full" for c in counts) else 0
    return Lin(tok=p.R * d.h + outputs, const=ref_cache - cached)


def moment_in_phase(phases: dict[str, int], observed_phase: str | None) -> str | None:
    """The planner's moment for a peak an observer saw in ``observed_phase`` (``vocab.PHASES``):
    of the moments in that phase (``vocab.MOMENTS_OF_PHASE``), the one predicted largest, the
    earliest on a tie.  ``None`` when the phase is not a step phase or the plan has none of them."""
    cands = [m for m in MOMENTS_OF_PHASE.get(observed_phase or "", ()) if m in phases]
    return max(cands, key=lambda m: phases[m]) if cands else None
