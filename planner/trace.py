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
  ``prepare_model_for_kbit_training``, so its non-reentrant setting is the one in effect.
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

Stand-ins (each allocates, at the same moment, tensors of the sizes and dtypes the CUDA code does)
---------------------------------------------------------------------------------------------------
* ``bitsandbytes::gemm_4bit`` (4-bit forward, MatMul4Bit / matmul_4bit) -> the CUDA fallback
  ``_dequant_linear_fallback`` (bitsandbytes/backends/cuda/ops.py), which is also
  ``_gemm_4bit_default_impl`` (backends/default/ops.py): [double quant: dequantized absmax
  fp32[blocks] and absmax+offset fp32[blocks]], dequantized weight [N, K] in the input dtype,
  ``F.linear`` output.  CUDA uses a fused kernel without the dequantized weight for some shapes
  with M = batch*seq <= 1536 (``_gemm_4bit_use_custom_cuda``, GPU-architecture dependent); the
  trace always takes the fallback, so in forward it can over-count by one transient
  dequantized weight for such shapes.  The 4-bit backward (``F.dequantize_4bit`` + matmul) is
  traced as is: its ops allocate only their outputs on CUDA too.
* ``bitsandbytes::int8_vectorwise_quant`` (MatMul8bitLt forward) -> the CUDA kernel's allocations
  (backends/cuda/ops.py): row_stats fp32[M], int8 [M, K]; with ``threshold > 0``: |A| fp16 [M, K]
  (freed at once), outlier mask bool [M, K], column mask bool[K], outlier column index.  On meta
  the number of outlier columns is data dependent and is taken as 0 (bitsandbytes' own fake
  kernel would return a dynamic size); outliers would add M x n_outliers fp16 per layer.
* ``bitsandbytes::int8_mixed_scaled_mm`` / ``int8_scaled_mm`` -> the default (Python) kernels
  that CUDA also uses (backends/default/ops.py), with the CUDA ``int8_linear_matmul`` (int32 [M, N])
  and ``int8_mm_dequant`` (fp16 [M, N], then ``.to(dtype)``) allocations.
* ``bitsandbytes.matmul`` -> always ``MatMul8bitLt`` (the CUDA path).  bitsandbytes switches to
  ``MatMul8bitFp`` for cpu/xpu inputs in training; the cpu oracle is made to run the CUDA path.
* ``Optimizer8bit.get_state_buffer`` (bitsandbytes/optim/optimizer.py): paged optimizers allocate
  state tensors of >= 1e5 elements with ``cudaMallocManaged`` (``F.get_paged``); the stand-in
  allocates the same bytes with ``torch.zeros_like`` and books them under ``optimizer_paged``,
  which is *not* part of ``tensor_peak`` (unified memory lives outside the device allocator and
  pages out under pressure).  Smaller tensors are ordinary device tensors, as in bitsandbytes.
* Autocast on meta (torch has no autocast for meta tensors): a ``TorchFunctionMode`` applies
  torch's autocast policy to meta tensors at the outermost torch API call: CUDA lists copied from
  ATen/autocast_mode.h of torch 2.13 (``AT_FORALL_LOWER_PRECISION_FP``, ``AT_FORALL_FP32``,
  ``AT_FORALL_FP32_SET_OPT_DTYPE``, ``AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE``,
  ``AT_FORALL_PROMOTE``), the CPU lists from aten/src/ATen/autocast_mode.cpp (``kernels="cpu"``,
  used to compare with the cpu oracle), with ``cached_cast``'s weight-cast cache (fp32 leaves that
  require grad, dropped when the outermost autocast exits).  The autocast TLS of the emulated
  device is really set, so ``torch.is_autocast_enabled()`` answers as on that device (PEFT's bnb
  LoRA layers branch on it).  ``transformers.utils.generic.maybe_autocast`` (a no-op on meta) is
  redirected to the emulated device; checkpoint recomputation re-enters the autocast state of
  the forward, as torch.utils.checkpoint does on real devices.  Limitation: torch composites
  written in Python that are not themselves in the lists (``F.normalize``) are not looked into.
* ``F.scaled_dot_product_attention`` on meta (meta picks the math backend): routed to the kernel
  the target device would run: ``kernels="cuda"``: flash attention (fp16/bf16, no mask, head dim
  <= 256, GQA native; q/k/v padded to a multiple of 8), else memory-efficient attention (no GQA;
  boolean mask converted to the query dtype and padded to a multiple of 16), else the math
  decomposition (torch 2.13 sdp_utils: flash takes GQA natively, memory-efficient does not);
  ``kernels="cpu"``: ``_scaled_dot_product_flash_attention_for_cpu``, or math when dropout > 0
  (sdp_utils_cpp.cpp ``check_for_dropout``): what the cpu oracle runs.  The meta kernels of these
  aten ops give the outputs the real kernels allocate (out, logsumexp, RNG state).
* Autocast casts the arguments of an op right to left (``WrapFunction`` evaluates
  ``cached_cast(arg)...`` as C++ call arguments; GCC evaluates them right to left); the emulation
  does the same, so the transient casts appear in the same order.
* ``F.dropout`` on meta, ``kernels="cuda"``: routed to ``aten.native_dropout`` (output + bool
  mask, the mask saved), which is what CUDA inputs take (Dropout.cpp ``is_fused_kernel_acceptable``);
  meta and CPU inputs take ``_dropout_impl`` (noise in the input dtype, saved by ``input * noise``).
* ``kernels="cpu"`` only: CPU ``native_layer_norm`` returns mean/rstd in the parameter dtype, the
  meta kernel (like CUDA) in fp32: the stand-in gives the CPU dtypes.
* ``aten._grouped_mm`` (transformers' MoE experts): the meta kernel repeats the CUDA kernel's
  bf16-only check; for other dtypes (fp32 experts after ``prepare_model_for_kbit_training``,
  which the CPU kernel runs) the stand-in returns the output the kernel would.

Ops that cannot run on meta and how they are handled: bitsandbytes kernels (CPU/CUDA only): their
registered fake kernels run instead (same output tensors); ``outliers.any()`` in the int8 stand-in
(data dependent): taken as False; ``cudaMallocManaged`` (paged optimizers): stand-in above;
transformers' ``find_packed_sequence_indices`` (``.all()`` on the position ids, used when there is
no cache, e.g. with gradient checkpointing): returns None on meta, the answer for the unpacked
rows traced here; ``torch.autocast("meta")`` (PEFT's ``_LoraFactorsProxy`` for MoE expert
tensors): the emulated device's autocast; the loss' ``num_items_in_batch`` stays a device tensor,
no ``.item()`` is needed; ``GradScaler`` (``found_inf.item()``): not modelled.  MoE layers are
traced through transformers' ``grouped_mm`` experts path, whose shapes do not depend on the
routing (tokens x top-k rows); a model whose code branches on routing results would raise
"Tensor.item() cannot be called on meta tensors".

The function patches process-global state while it runs (bitsandbytes, torch autocast hooks,
transformers helpers; all restored on exit): it is not thread-safe.  With ``QPLAN_TRACE_DEBUG=1``
each storage record also keeps (shape, dtype, op) for inspection.

Categories at the peak (``breakdown_at_peak``), decided after the run from each storage's history:
weights (frozen parameters, buffers, quant states), adapters (trainable parameters), gradients
(storages that were a trainable parameter's ``.grad`` by then), optimizer (optimizer state),
optimizer_paged (see above; outside ``tensor_peak``), logits ([batch, seq(-1), vocab] tensors: the
head's output, its fp32 copies, log-softmax and their gradients), activations (the batch, and
storages allocated in the forward or in a checkpoint recomputation that autograd saved or that
outlived that forward / recomputation), temporaries (everything else: transients, gradients in
flight, optimizer scratch).  The sum of the categories other than optimizer_paged is
``tensor_peak``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import tempfile
import time
import weakref

QUANTS = ("nf4", "fp4", "int8", "bf16", "fp16", "fp32")
KBIT = ("nf4", "fp4", "int8")
OPTIMIZERS = (
    "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd",
    "adafactor",
)
CATEGORIES = (
    "weights",
    "adapters",
    "gradients",
    "optimizer",
    "optimizer_paged",
    "activations",
    "logits",
    "temporaries",
)
_DTYPES = ("bf16", "fp16", "fp32")
_TORCH_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
MAX_GRAD_NORM = 1.0  # TrainingArguments.max_grad_norm default

# --------------------------------------------------------------------------------------------
# Autocast policies (aten op names).  CUDA: torch/include/ATen/autocast_mode.h (torch 2.13),
# macros AT_FORALL_LOWER_PRECISION_FP / AT_FORALL_FP32 / AT_FORALL_FP32_SET_OPT_DTYPE /
# AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE / AT_FORALL_PROMOTE, which autocast_mode.cpp registers
# for AutocastCUDA.  CPU: the KERNEL_CPU registrations of aten/src/ATen/autocast_mode.cpp.
# --------------------------------------------------------------------------------------------
CUDA_AUTOCAST = {
    "lower": (
        "_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d",
        "conv_transpose2d", "conv_transpose3d", "convolution", "prelu", "addmm", "addmv", "addr",
        "matmul", "einsum", "mm", "mv", "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm",
        "chain_matmul", "linalg_multi_dot", "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell",
        "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
        "_scaled_dot_product_flash_attention", "scaled_dot_product_attention",
    ),
    "fp32": (
        "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p",
        "reciprocal", "rsqrt", "sinh", "tan", "pow", "softplus", "layer_norm", "native_layer_norm",
        "rms_norm", "group_norm", "frobenius_norm", "nuclear_norm", "cosine_similarity",
        "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d",
        "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss",
        "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
        "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm",
        "logsumexp", "upsample_nearest1d", "_upsample_nearest_exact1d", "upsample_nearest2d",
        "_upsample_nearest_exact2d", "upsample_nearest3d", "_upsample_nearest_exact3d",
        "upsample_linear1d", "upsample_bilinear2d", "_upsample_bilinear2d_aa",
        "upsample_trilinear3d", "upsample_bicubic2d", "_upsample_bicubic2d_aa",
    ),
    "fp32_set_opt_dtype": (
        "prod", "softmax", "log_softmax", "cumprod", "cumsum", "linalg_vector_norm",
        "linalg_matrix_norm", "sum",
    ),
    "fp32_append_dtype": ("norm",),
    "promote": (
        "addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler",
        "index_put", "tensordot", "scatter_add",
    ),
}
# registered for AutocastCUDA outside the AT_FORALL_* macros (autocast_mode.cpp): the cudnn
# convolutions, and binary_cross_entropy, which autocast refuses ("banned": it raises).
CUDA_AUTOCAST_EXTRA = {"lower": ("cudnn_convolution", "cudnn_convolution_transpose"),
                       "banned": ("binary_cross_entropy",)}
CPU_AUTOCAST = {
    "lower": (
        "conv1d", "conv2d", "conv3d", "bmm", "mm", "linalg_vecdot", "baddbmm", "addmm", "addbmm",
        "linear", "_convolution", "matmul", "conv_tbc", "mkldnn_rnn_layer", "conv_transpose1d",
        "conv_transpose2d", "conv_transpose3d", "prelu", "scaled_dot_product_attention",
        "_native_multi_head_attention", "_addmm_activation",
    ),
    "fp32": (
        "avg_pool3d", "binary_cross_entropy", "grid_sampler", "polar", "prod", "quantile",
        "nanquantile", "stft", "cdist", "grid_sampler_2d", "grid_sampler_3d", "trace",
        "view_as_complex", "cholesky", "cholesky_inverse", "cholesky_solve", "inverse", "lu_solve",
        "orgqr", "ormqr", "pinverse", "max_pool3d", "max_unpool2d", "max_unpool3d",
        "adaptive_avg_pool3d", "reflection_pad1d", "reflection_pad2d", "replication_pad1d",
        "replication_pad2d", "replication_pad3d", "mse_loss", "cosine_embedding_loss", "nll_loss",
        "nll_loss2d", "hinge_embedding_loss", "poisson_nll_loss", "smooth_l1_loss",
        "cross_entropy_loss", "l1_loss", "huber_loss", "margin_ranking_loss", "soft_margin_loss",
        "triplet_margin_loss", "multi_margin_loss", "ctc_loss", "kl_div", "multilabel_margin_loss",
        "binary_cross_entropy_with_logits", "fft_fft", "fft_ifft", "fft_fft2", "fft_ifft2",
        "fft_fftn", "fft_ifftn", "fft_rfft", "fft_irfft", "fft_rfft2", "fft_irfft2", "fft_rfftn",
        "fft_irfftn", "fft_hfft", "fft_ihfft", "linalg_cond", "linalg_matrix_rank", "linalg_solve",
        "linalg_cholesky", "linalg_svdvals", "linalg_eigvals", "linalg_eigvalsh", "linalg_inv",
        "linalg_householder_product", "linalg_tensorinv", "linalg_tensorsolve",
        "fake_quantize_per_tensor_affine",
        "geqrf", "_lu_with_info", "qr", "svd", "triangular_solve", "fractional_max_pool2d",
        "fractional_max_pool3d", "adaptive_max_pool3d", "multilabel_margin_loss_forward",
        "linalg_qr", "linalg_cholesky_ex", "linalg_svd", "linalg_eig", "linalg_eigh", "linalg_lstsq",
        "linalg_inv_ex", "_grid_sampler_2d_cpu_fallback",
    ),
    "fp32_set_opt_dtype": (),
    "fp32_append_dtype": (),
    "promote": ("stack", "cat", "index_copy"),
}


def trace_training_step(
    config: dict,
    *,
    quant: str,
    double_quant: bool,
    compute_dtype: str,
    upcast_kbit: bool,
    lora: dict,
    batch_size: int,
    seq_len: int,
    grad_ckpt: bool,
    optimizer: str,
    attn_impl: str = "sdpa",
    device: str = "meta",
    steps: int = 1,
    seed: int = 0,
    kernels: str = "cuda",
) -> dict:
    """Trace ``steps`` LoRA training steps and return the live-tensor peak and its breakdown.

    ``kernels`` (meta only) picks whose kernels the meta trace mirrors: ``"cuda"`` (the default,
    what a GPU run allocates) or ``"cpu"`` (what ``device="cpu"`` really runs: CPU autocast
    lists and the CPU flash-attention kernel), used to check the meta trace against the cpu
    oracle byte for byte.  Returned bytes are Python ints; see the module docstring for what is
    counted.
    """
    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {QUANTS}, got {quant!r}")
    if compute_dtype not in _DTYPES:
        raise ValueError(f"compute_dtype must be one of {_DTYPES}, got {compute_dtype!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if device not in ("meta", "cpu"):
        raise ValueError(f"device must be 'meta' or 'cpu', got {device!r}")
    if kernels not in ("cuda", "cpu"):
        raise ValueError(f"kernels must be 'cuda' or 'cpu', got {kernels!r}")
    if steps < 1 or batch_size < 1 or seq_len < 2:
        raise ValueError("steps >= 1, batch_size >= 1 and seq_len >= 2 are required")
    if "model_type" not in config:
        raise ValueError("config has no 'model_type': is this a Hugging Face config.json?")
    return _Run(
        config=dict(config), quant=quant, double_quant=bool(double_quant), compute_dtype=compute_dtype,
        upcast_kbit=bool(upcast_kbit), lora=dict(lora), batch_size=int(batch_size), seq_len=int(seq_len),
        grad_ckpt=bool(grad_ckpt), optimizer=optimizer, attn_impl=attn_impl, device=device,
        steps=int(steps), seed=int(seed), kernels=kernels if device == "meta" else "cpu",
    ).run()


# ============================================================================================
# Tracker
# ============================================================================================


class _Rec:
    """History of one untyped storage."""

    __slots__ = (
        "nbytes", "alloc", "free", "phase", "step", "rc", "kind", "saved", "grad_at", "opt",
        "host", "paged", "logits", "late", "info",
    )

    def __init__(self, nbytes, alloc, phase, step, rc, logits):
        self.nbytes = nbytes
        self.alloc = alloc
        self.free = None
        self.phase = phase
        self.step = step
        self.rc = rc  # id of the checkpoint recomputation that allocated it, else None
        self.kind = None  # "frozen" | "trainable" | "input" | None
        self.saved = False
        self.grad_at = None
        self.opt = False
        self.host = False
        self.paged = False
        self.logits = logits
        self.late = False
        self.info = None


@functools.lru_cache(maxsize=None)
def _tracker_cls():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Tracker(TorchDispatchMode):
        """Records every storage created by an op on ``device_type`` (and ones first seen as op
        inputs, which existed before the step).  ``mirrors`` maps an OpOverload to a stand-in
        ``fn(reg, *args, **kwargs)`` that performs the op's allocations with sub-ops whose outputs
        it hands to ``reg``."""

        def __init__(self, device_type, mirrors, logits_numels, vocab):
            super().__init__()
            self.device_type = device_type
            self.mirrors = mirrors
            self.logits_numels = logits_numels
            self.vocab = vocab
            self.live = {}
            self.records = []
            self.finalizers = []
            self.event = 0
            self.phase = "setup"
            self.step = 0
            self.rc = None  # current recomputation id
            self.rc_end = {}  # recomputation id -> event at its end
            self.marks = []
            self.debug = bool(os.environ.get("QPLAN_TRACE_DEBUG"))
            self.debug_op = None

        # -- bookkeeping -------------------------------------------------------------------
        def _is_logits(self, t):
            return (
                self.vocab is not None
                and t.dim() >= 2
                and t.shape[-1] == self.vocab
                and t.numel() in self.logits_numels
            )

        def reg(self, t, late=False):
            if not isinstance(t, torch.Tensor) or t.device.type != self.device_type:
                return t
            st = t.untyped_storage()
            key = id(st)
            rec = self.live.get(key)
            if rec is not None:
                n = st.nbytes()
                if n != rec.nbytes:  # resize_ of an existing storage
                    self._close(key, rec)
                    self._open(st, key, t, late)
                return t
            self._open(st, key, t, late)
            return t

        def _open(self, st, key, t, late):
            # A storage first seen as an op input was made without an op: before the step it is
            # pre-existing (counted from the start); during the step it was made from Python data
            # (``torch.tensor(...)``, no dispatch) and counts from now.
            pre = late and self.phase == "setup"
            rec = _Rec(st.nbytes(), -1 if pre else self.event, self.phase, self.step, self.rc,
                       self._is_logits(t))
            rec.late = late
            if late and not pre and self.device_type == "cpu" and self.phase == "optimizer" and t.dim() == 0:
                # cpu oracle only: a 0-dim tensor made from Python data inside optimizer.step()
                # (foreach AdamW's `torch.tensor(1.0, device="cpu")` step increment) is host
                # memory when the parameters are on CUDA (and is not counted on meta either).
                rec.host = True
            if self.debug:
                rec.info = (tuple(t.shape), str(t.dtype).removeprefix("torch."), self.debug_op)
            self.event += 1
            self.live[key] = rec
            self.records.append(rec)
            self.finalizers.append(weakref.finalize(st, self._finalize, key, rec))
            return rec

        def _finalize(self, key, rec):
            if self.live.get(key) is rec:
                self._close(key, rec)

        def _close(self, key, rec):
            del self.live[key]
            rec.free = self.event
            self.event += 1

        def lookup(self, t):
            if not isinstance(t, torch.Tensor) or t.device.type != self.device_type:
                return None
            return self.live.get(id(t.untyped_storage()))

        def reg_tree(self, out):
            if isinstance(out, torch.Tensor):
                self.reg(out)
            elif isinstance(out, (tuple, list)):
                for o in out:
                    self.reg_tree(o)
            return out

        def mark(self, label):
            self.marks.append((self.event, label))

        def detach(self):
            for f in self.finalizers:
                f.detach()
            self.finalizers.clear()

        # -- dispatch ----------------------------------------------------------------------
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.namespace == "profiler":  # record_function handles: host-side, not memory
                return func(*args, **kwargs)
            if self.debug:
                self.debug_op = str(func)
            for a in args:
                if isinstance(a, torch.Tensor):
                    if a.device.type == self.device_type and id(a.untyped_storage()) not in self.live:
                        self.reg(a, late=True)
                elif isinstance(a, (list, tuple)):
                    for b in a:
                        if (
                            isinstance(b, torch.Tensor)
                            and b.device.type == self.device_type
                            and id(b.untyped_storage()) not in self.live
                        ):
                            self.reg(b, late=True)
            mirror = self.mirrors.get(func)
            if mirror is not None:
                return mirror(self.reg, *args, **kwargs)
            out = func(*args, **kwargs)
            return self.reg_tree(out)

    return Tracker


# ============================================================================================
# bitsandbytes stand-ins (run inside Tracker.__torch_dispatch__; sub-op outputs go to ``reg``)
# ============================================================================================


def _bnb_mirrors(device_type):
    import torch

    bops = torch.ops.bitsandbytes
    real = device_type != "meta"

    def gemm_4bit(reg, A, B, shapeB, absmax, blocksize, quant_type, bias=None, absmax_8bit=None,
                  absmax_code=None, absmax_offset=None):
        """bitsandbytes/backends/cuda/ops.py ``_dequant_linear_fallback`` (= default
        ``_gemm_4bit_default_impl``): nested absmax -> fp32[blocks] (+offset -> fp32[blocks]),
        dequantized weight [N, K] in A.dtype, then F.linear."""
        if absmax_8bit is not None:
            absmax_dq = reg(bops.dequantize_blockwise.default(absmax_8bit, absmax, absmax_code, 256,
                                                              torch.float32))
            absmax = reg(absmax_dq + absmax_offset)
        B_dq = reg(bops.dequantize_4bit.default(B, absmax, blocksize, quant_type, list(shapeB), A.dtype))
        return reg(torch.nn.functional.linear(A, B_dq, bias))

    def int8_vectorwise_quant(reg, A, threshold=0.0):
        """bitsandbytes/backends/cuda/ops.py ``int8_vectorwise_quant`` (CUDA kernel)."""
        rows = A.numel() // A.shape[-1]
        row_stats = reg(torch.empty(rows, device=A.device, dtype=torch.float32))
        out_row = reg(torch.empty(A.shape, device=A.device, dtype=torch.int8))
        if real:
            cb, rs, _ = bops.int8_vectorwise_quant.default(A, threshold)
            out_row.copy_(cb)
            row_stats.copy_(rs)
            del cb, rs
        outlier_cols = None
        if threshold > 0.0:
            outliers = reg(reg(A.abs()) >= threshold)
            anyv = reg(outliers.any())
            has = bool(anyv) if real else False  # meta: data dependent, taken as no outliers
            if has:
                outlier_cols = reg(torch.argwhere(reg(outliers.any(dim=0)))).view(-1)
            else:
                outlier_cols = reg(torch.empty(0, device=A.device, dtype=torch.int64))
            del outliers, anyv
        if rows > 1 and outlier_cols is not None and outlier_cols.numel():
            out_row[:, outlier_cols] = 0
        return out_row, row_stats, outlier_cols

    def int8_mm_dequant(reg, A, row_stats, col_stats, dtype=None, bias=None):
        """CUDA ``int8_mm_dequant``: fp16 [M, N] (+bias in place), then ``.to(dtype)``."""
        out = reg(torch.empty_like(A, dtype=torch.float16))
        if bias is not None and bias.dtype != torch.float16:
            out.add_(bias)
        res = out.to(dtype or torch.float16)
        return reg(res)

    def int8_scaled_mm(reg, A, B, row_stats, col_stats, bias=None, dtype=None):
        """default ``int8_scaled_mm`` = CUDA ``int8_linear_matmul`` (int32 [M, N]) +
        ``int8_mm_dequant``."""
        out_i32 = reg(torch.empty((*A.shape[:-1], B.shape[0]), device=A.device, dtype=torch.int32))
        res = int8_mm_dequant(reg, out_i32, row_stats, col_stats, dtype=dtype or torch.float16, bias=bias)
        del out_i32
        if real:
            res.copy_(bops.int8_scaled_mm.default(A, B, row_stats, col_stats, bias=bias, dtype=dtype))
        return res

    def int8_mixed_scaled_mm(reg, A, CA, CB, SCA, SCB, outlier_cols=None, bias=None):
        """backends/default/ops.py ``int8_mixed_scaled_mm`` (the kernel CUDA runs)."""
        subB = None
        if outlier_cols is not None and outlier_cols.numel():
            subA = reg(reg(A[:, outlier_cols]).contiguous())
            cbo = reg(reg(CB[:, outlier_cols]).contiguous())
            deq = reg(reg(cbo * SCB.view(-1, 1)) * 7.874015718698502e-3)
            subB = reg(deq.to(A.dtype)).t()
            del cbo, deq
        else:
            subA = reg(torch.empty(0, device=A.device, dtype=A.dtype))
        output = int8_scaled_mm(reg, CA, CB, SCA, SCB, bias=bias, dtype=A.dtype)
        if subB is not None:
            output = reg(output.addmm(subA, subB))
        return output, subA

    return {
        bops.gemm_4bit.default: gemm_4bit,
        bops.int8_vectorwise_quant.default: int8_vectorwise_quant,
        bops.int8_mixed_scaled_mm.default: int8_mixed_scaled_mm,
        bops.int8_scaled_mm.default: int8_scaled_mm,
    }


def _cpu_kernel_mirrors():
    """Meta kernels whose outputs differ from the CPU kernels' (used with ``kernels="cpu"``)."""
    import torch

    aten = torch.ops.aten

    def native_layer_norm(reg, input, normalized_shape, weight, bias, eps):
        """CPU layer_norm (aten/src/ATen/native/layer_norm.cpp, mixed-type kernel) returns
        mean/rstd in the parameter dtype (input dtype without weight); the meta kernel (like
        CUDA) returns fp32 statistics for fp16/bf16 inputs."""
        out, mean, rstd = aten.native_layer_norm.default(input, normalized_shape, weight, bias, eps)
        dt = weight.dtype if weight is not None else input.dtype
        if mean.dtype != dt:
            mean = torch.empty(mean.shape, dtype=dt, device=mean.device)
            rstd = torch.empty(rstd.shape, dtype=dt, device=rstd.device)
        return reg(out), reg(mean), reg(rstd)

    return {aten.native_layer_norm.default: native_layer_norm}


def _meta_mirrors():
    """Stand-ins for meta kernels that refuse inputs the real kernels accept."""
    import torch

    aten = torch.ops.aten

    def grouped_mm(reg, mat_a, mat_b, offs=None, bias=None, out_dtype=None):
        """``aten._grouped_mm``'s meta kernel repeats the bf16-only check of the CUDA kernel
        (torch/_meta_registrations.py ``_meta_grouped_mm_common``); the CPU kernel (and
        transformers' MoE with fp32 experts after ``prepare_model_for_kbit_training``) also takes
        fp32.  Output: the shape the meta kernel gives for bf16 operands, in
        ``out_dtype or mat_a.dtype``."""
        if mat_a.dtype == torch.bfloat16 and mat_b.dtype == torch.bfloat16:
            return reg(aten._grouped_mm.default(mat_a, mat_b, offs, bias, out_dtype))
        a = torch.empty(mat_a.shape, dtype=torch.bfloat16, device="meta")
        b = torch.empty(mat_b.shape, dtype=torch.bfloat16, device="meta")
        shape = aten._grouped_mm.default(a, b, offs, None, None).shape
        return reg(torch.empty(shape, dtype=out_dtype or mat_a.dtype, device=mat_a.device))

    return {aten._grouped_mm.default: grouped_mm}


# ============================================================================================
# Autocast + SDPA emulation for meta tensors
# ============================================================================================


class _AmpContext:
    """``torch.autocast.__enter__/__exit__`` (torch/amp/autocast_mode.py) for ``device``, minus the
    availability check (CUDA autocast state is set on a CPU-only build)."""

    def __init__(self, device, dtype=None, enabled=True, cache_enabled=None):
        self.device = device
        self.dtype = dtype
        self.enabled = enabled
        self.cache_enabled = cache_enabled

    def __enter__(self):
        import torch

        self.prev_cache = torch.is_autocast_cache_enabled()
        self.prev = torch.is_autocast_enabled(self.device)
        self.prev_dtype = torch.get_autocast_dtype(self.device)
        torch.set_autocast_enabled(self.device, self.enabled)
        torch.set_autocast_dtype(self.device, self.dtype or self.prev_dtype)
        torch.autocast_increment_nesting()
        if self.cache_enabled is not None:
            torch.set_autocast_cache_enabled(self.cache_enabled)
        return self

    def __exit__(self, *exc):
        import torch

        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
            _clear_emulated_caches()
        torch.set_autocast_enabled(self.device, self.prev)
        torch.set_autocast_dtype(self.device, self.prev_dtype)
        torch.set_autocast_cache_enabled(self.prev_cache)
        return False


_EMU_MODES: weakref.WeakSet = weakref.WeakSet()  # live MetaFunctionMode instances


def _clear_emulated_caches():
    """The emulated autocast weight-cast caches, dropped whenever torch's would be (outermost
    autocast exit: ``torch.clear_autocast_cache``)."""
    for mode in list(_EMU_MODES):
        mode.clear_cache()


_META_AMP: list[str] = []  # emulated autocast device of the meta trace(s) running now
_ORIG_MAYBE_AUTOCAST: list = []  # transformers' own maybe_autocast


def _maybe_autocast(device_type, dtype=None, enabled=True, cache_enabled=None):
    """transformers.utils.generic.maybe_autocast, with ``device_type="meta"`` (a no-op there)
    standing for the emulated device while a meta trace runs."""
    import torch

    if device_type == "meta" and _META_AMP:
        dev = _META_AMP[-1]
        if torch.is_autocast_enabled(dev) or enabled:
            return _AmpContext(dev, dtype, enabled, cache_enabled)
        return contextlib.nullcontext()
    return _ORIG_MAYBE_AUTOCAST[0](device_type, dtype, enabled, cache_enabled)


def _callables_for(names):
    """Python entry points (torch.X, Tensor.X, F.X, torch._C._nn.X, torch.linalg.X, dunders) of
    the aten ops ``names``."""
    import torch
    import torch.nn.functional as F

    out = set()
    for n in names:
        cands = [getattr(torch, n, None), getattr(torch.Tensor, n, None), getattr(F, n, None),
                 getattr(torch._C._nn, n, None)]
        if n.startswith("linalg_"):
            cands.append(getattr(torch.linalg, n[len("linalg_"):], None))
        if n.startswith("fft_"):
            cands.append(getattr(torch.fft, n[len("fft_"):], None))
        if n == "pow":
            cands += [torch.Tensor.__pow__, torch.Tensor.__rpow__]
        if n == "matmul":
            cands += [torch.Tensor.__matmul__, torch.Tensor.__rmatmul__]
        if n == "cross_entropy_loss":
            cands.append(F.cross_entropy)
        for c in cands:
            if c is not None and callable(c):
                out.add(c)
    return out


@functools.lru_cache(maxsize=None)
def _meta_function_mode_cls():
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    class MetaFunctionMode(TorchFunctionMode):
        """Autocast policy of ``amp_device`` (``"cuda"``/``"cpu"``) applied to meta tensors, and
        SDPA routed to that device's kernel (see module docstring)."""

        def __init__(self, amp_device, tables, kernels):
            super().__init__()
            self.amp_device = amp_device
            self.kernels = kernels
            self.policy = {}
            for pol in ("lower", "fp32", "fp32_set_opt_dtype", "fp32_append_dtype", "promote", "banned"):
                for c in _callables_for(tables.get(pol, ())):
                    self.policy[c] = pol
            # CUDA autocast has no kernel for cross_entropy_loss: it decomposes into
            # log_softmax (fp32_set_opt_dtype) + nll_loss (fp32).
            if F.cross_entropy not in self.policy:
                self.policy[F.cross_entropy] = "cross_entropy_decomposed"
            self.cache = {}
            _EMU_MODES.add(self)

        # -- autocast --------------------------------------------------------------------------
        def clear_cache(self):
            self.cache.clear()

        def _eligible(self, t):
            return (
                isinstance(t, torch.Tensor)
                and t.device.type == "meta"
                and t.is_floating_point()
                and t.dtype != torch.float64
            )

        def _cast(self, t, dtype, lower):
            if not self._eligible(t) or t.dtype == dtype:
                return t
            # aten/src/ATen/autocast_mode.cpp cached_cast
            if (
                lower
                and t.dtype == torch.float32
                and t.requires_grad
                and t.is_leaf
                and not t._is_view()
                and torch.is_autocast_cache_enabled()
            ):
                hit = self.cache.get(id(t))
                if hit is not None and hit[0]() is t:
                    return hit[1]
                c = t.to(dtype)
                self.cache[id(t)] = (weakref.ref(t), c)
                return c
            return t.to(dtype)

        def _cast_all(self, args, kwargs, dtype, lower):
            # autocast's WrapFunction evaluates cached_cast(arg)... as C++ call arguments, which
            # GCC evaluates right to left: cast the last argument first.
            def f(a):
                if isinstance(a, torch.Tensor):
                    return self._cast(a, dtype, lower)
                if isinstance(a, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in a):
                    return type(a)(reversed([self._cast(x, dtype, lower) for x in reversed(a)]))
                return a

            new_kwargs = {k: f(v) for k, v in reversed(list(kwargs.items()))}
            new_args = tuple(reversed([f(a) for a in reversed(args)]))
            return new_args, dict((k, new_kwargs[k]) for k in kwargs)

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.dropout and self.kernels == "cuda":
                return self._dropout(*args, **kwargs)
            pol = self.policy.get(func)
            if pol is None and func is not F.scaled_dot_product_attention:
                return func(*args, **kwargs)
            enabled = torch.is_autocast_enabled(self.amp_device)
            if enabled and pol is not None:
                lowp = torch.get_autocast_dtype(self.amp_device)
                if pol == "lower":
                    args, kwargs = self._cast_all(args, kwargs, lowp, True)
                elif pol == "fp32":
                    args, kwargs = self._cast_all(args, kwargs, torch.float32, False)
                elif pol in ("fp32_set_opt_dtype", "fp32_append_dtype"):
                    first = args[0] if args else None
                    has_dtype = kwargs.get("dtype") is not None or any(
                        isinstance(a, torch.dtype) for a in args)
                    if not has_dtype and self._eligible(first):
                        kwargs = dict(kwargs, dtype=torch.float32)
                elif pol == "promote":
                    ts = [a for a in list(args) + list(kwargs.values()) if self._eligible(a)]
                    if ts:
                        widest = functools.reduce(torch.promote_types, [t.dtype for t in ts])
                        args, kwargs = self._cast_all(args, kwargs, widest, False)
                elif pol == "cross_entropy_decomposed":
                    return self._cross_entropy(*args, **kwargs)
                elif pol == "banned":
                    raise RuntimeError(
                        f"{getattr(func, '__name__', func)} is unsafe to autocast (torch refuses it "
                        "under CUDA autocast); use binary_cross_entropy_with_logits")
            if func is F.scaled_dot_product_attention:
                return self._sdpa(*args, **kwargs)
            return func(*args, **kwargs)

        def _cross_entropy(self, input, target, weight=None, size_average=None, ignore_index=-100,
                           reduce=None, reduction="mean", label_smoothing=0.0):
            if not self._eligible(input) or input.dtype == torch.float32 or label_smoothing or \
                    target.is_floating_point():
                return F.cross_entropy(input, target, weight, size_average, ignore_index, reduce,
                                       reduction, label_smoothing)
            lsm = torch.log_softmax(input, 1, dtype=torch.float32)
            return F.nll_loss(lsm, target, weight, size_average, ignore_index, reduce, reduction)

        # -- dropout -----------------------------------------------------------------------------
        @staticmethod
        def _dropout(input, p=0.5, training=True, inplace=False):
            # aten/src/ATen/native/Dropout.cpp ``dropout``: a CUDA input takes the fused kernel
            # (``is_fused_kernel_acceptable``: 0 < p < 1, numel > 0) -> ``native_dropout``, which
            # saves a bool mask; meta (like the CPU) would take ``_dropout_impl`` (a mask in the
            # input dtype, then ``input * noise``).
            if (input.device.type == "meta" and training and not inplace and 0.0 < p < 1.0
                    and input.numel() > 0):
                return torch.native_dropout(input, p, True)[0]
            return F.dropout(input, p, training, inplace)

        # -- SDPA --------------------------------------------------------------------------------
        def _sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  enable_gqa=False):
            if query.device.type != "meta":
                return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask,
                                                      dropout_p=dropout_p, is_causal=is_causal,
                                                      scale=scale, enable_gqa=enable_gqa)
            def math_backend():
                # the meta device dispatches SDPA to the math composite
                return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask,
                                                      dropout_p=dropout_p, is_causal=is_causal,
                                                      scale=scale, enable_gqa=enable_gqa)

            def float_mask(mask):
                # at::native convert_boolean_attn_mask: where(mask, 0, -inf) in the query dtype
                if mask is None or mask.dtype != torch.bool:
                    return mask
                zero = torch.scalar_tensor(0.0, dtype=query.dtype, device=query.device)
                ninf = torch.scalar_tensor(-math.inf, dtype=query.dtype, device=query.device)
                return torch.where(mask, zero, ninf)

            if self.kernels == "cpu":
                if dropout_p > 0.0:  # sdp_utils_cpp.cpp use_flash_attention_cpp: check_for_dropout
                    return math_backend()
                attn_mask = float_mask(attn_mask)
                return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]
            D, Dv = query.shape[-1], value.shape[-1]
            lowp = query.dtype in (torch.float16, torch.bfloat16)
            if lowp and attn_mask is None and D == Dv and D <= 256:
                og = D
                if D % 8:
                    pad = 8 - D % 8
                    query, key, value = (F.pad(t, (0, pad)) for t in (query, key, value))
                out = torch.ops.aten._scaled_dot_product_flash_attention(
                    query, key, value, dropout_p, is_causal, False, scale=scale)[0]
                return out[..., :og] if og != out.shape[-1] else out
            heads_equal = query.shape[-3] == key.shape[-3] == value.shape[-3]
            if heads_equal and query.dtype in (torch.float16, torch.bfloat16, torch.float32):
                attn_mask = float_mask(attn_mask)
                if attn_mask is not None:
                    S = attn_mask.shape[-1]
                    if S % 16:
                        attn_mask = F.pad(attn_mask, (0, 16 - S % 16))[..., :S]
                    attn_mask = attn_mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
                need_lse = query.requires_grad or key.requires_grad or value.requires_grad
                return torch.ops.aten._scaled_dot_product_efficient_attention(
                    query, key, value, attn_mask, need_lse, dropout_p, is_causal, scale=scale)[0]
            return math_backend()

    return MetaFunctionMode


# ============================================================================================
# The run
# ============================================================================================


class _Run:
    def __init__(self, **kw):
        self.__dict__.update(kw)
        self.notes: list[str] = []
        self.tracker = None  # set while the steps run (read by the checkpoint wrapper)
        self.fmode = None

    # ---------------------------------------------------------------------------------------
    def run(self) -> dict:
        import torch

        t0 = time.perf_counter()
        self.torch = torch
        self.cdt = getattr(torch, _TORCH_DTYPE[self.compute_dtype])
        self.amp = self.compute_dtype in ("bf16", "fp16")
        self.amp_device = "cuda" if self.kernels == "cuda" else "cpu"
        if self.quant in KBIT:
            self.load_dtype = self.cdt
        else:
            self.load_dtype = getattr(torch, _TORCH_DTYPE[self.quant])
        with contextlib.ExitStack() as stack:
            self._stack = stack
            self._patch(stack)
            rng = torch.random.fork_rng(devices=[])
            stack.enter_context(rng)
            torch.manual_seed(self.seed)
            model = self._build_model(stack)
            peft_model = self._apply_peft(model)
            trainable, total = peft_model.get_nb_trainable_parameters()
            opt = self._make_optimizer(peft_model)
            res = self._trace(peft_model, opt)
        self._add_notes(res, peft_model)
        res["trainable_params"] = int(trainable)
        res["all_params"] = int(total)
        res["seconds"] = time.perf_counter() - t0
        res["notes"] = self.notes
        return res

    def _add_notes(self, res, model):
        import bitsandbytes as bnb

        n = self.notes
        n.insert(0, "live tensor bytes: excludes allocator rounding/fragmentation, kernel workspaces "
                    "(cuBLAS, flash attention) and the CUDA context")
        if self.device == "meta":
            n.append(f"kernels mirrored: {self.kernels}")
        if self.quant in ("nf4", "fp4") and self.kernels == "cuda":
            biggest = max((m.out_features * m.in_features for m in model.modules()
                           if isinstance(m, bnb.nn.Linear4bit)), default=0)
            n.append(
                "4-bit forward traced as bitsandbytes' CUDA dequantize+linear fallback; for "
                f"batch*seq <= 1536 the fused kernel may skip the transient dequantized weight "
                f"(up to {biggest * self.cdt.itemsize} bytes for the largest layer)")
        if self.quant == "int8" and self.device == "meta":
            n.append("int8: LLM.int8() outlier columns (threshold 6.0) taken as none on meta")
        if res["breakdown_at_peak"]["optimizer_paged"] or "paged" in self.optimizer:
            n.append("optimizer_paged (cudaMallocManaged state) is not part of tensor_peak")
        if self.compute_dtype == "fp16":
            n.append("fp16: GradScaler's few scalar tensors are not modelled")

    # ---------------------------------------------------------------------------------------
    def _patch(self, stack):
        """Global patches, undone on exit."""
        import logging

        import bitsandbytes
        import bitsandbytes.optim.optimizer as bnb_optim
        import torch
        from bitsandbytes.autograd import _functions as bnb_fn

        def patch(obj, name, value):
            old = getattr(obj, name)
            setattr(obj, name, value)
            stack.callback(setattr, obj, name, old)

        # bitsandbytes caches its quantization maps process-wide on the device of their first use
        # (functional.py ``name2qmap["dynamic"] = create_dynamic_map().to(A.device)``, used by
        # double quantization): a map first made on meta would break every later real
        # quantization in the process ("Cannot copy out of meta tensor").  Restore it on exit.
        import bitsandbytes.functional as bnb_F

        qmaps = dict(bnb_F.name2qmap)

        def restore_qmaps():
            bnb_F.name2qmap.clear()
            bnb_F.name2qmap.update(qmaps)

        stack.callback(restore_qmaps)

        # bitsandbytes.matmul: always the CUDA MatMul8bitLt path (autograd/_functions.py matmul)
        def matmul(A, B, out=None, state=None, threshold=0.0, bias=None):
            state = state or bnb_fn.MatmulLtState()
            if threshold > 0.0:
                state.threshold = threshold
            return bnb_fn.MatMul8bitLt.apply(A, B, out, bias, state)

        patch(bitsandbytes, "matmul", matmul)
        patch(bnb_fn, "matmul", matmul)

        run = self

        def get_state_buffer(self, p, dtype=torch.float32):
            # bitsandbytes/optim/optimizer.py Optimizer8bit.get_state_buffer, CUDA branch.
            buf = torch.zeros_like(p, dtype=dtype, device=p.device)
            if self.is_paged and p.numel() >= 1e5:
                run.paged_pending.append(buf)
            return buf

        self.paged_pending = []
        patch(bnb_optim.Optimizer8bit, "get_state_buffer", get_state_buffer)

        lg = logging.getLogger("bitsandbytes.autograd._functions")
        old_level = lg.level
        lg.setLevel(logging.ERROR)
        stack.callback(lg.setLevel, old_level)

        import transformers

        tlog = transformers.utils.logging
        old_v = tlog.get_verbosity()
        tlog.set_verbosity_error()
        stack.callback(tlog.set_verbosity, old_v)
        if tlog.is_progress_bar_enabled():  # save_pretrained / from_pretrained of the cpu oracle
            tlog.disable_progress_bar()
            stack.callback(tlog.enable_progress_bar)
        try:
            from huggingface_hub import utils as hub_utils

            if not hub_utils.are_progress_bars_disabled():
                hub_utils.disable_progress_bars()
                stack.callback(hub_utils.enable_progress_bars)
        except ImportError:  # pragma: no cover
            pass
        import warnings

        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")

        if self.device == "meta":
            import torch.optim.optimizer as torch_optim

            orig_fused = torch_optim._get_fused_kernels_supported_devices
            # fused AdamW (`adamw_torch_fused`) on meta: aten._fused_adamw_ has a meta kernel
            patch(torch_optim, "_get_fused_kernels_supported_devices", lambda: [*orig_fused(), "meta"])
            if self.kernels == "cuda":
                tables = dict(CUDA_AUTOCAST, lower=CUDA_AUTOCAST["lower"] + CUDA_AUTOCAST_EXTRA["lower"],
                              banned=CUDA_AUTOCAST_EXTRA["banned"])
            else:
                tables = CPU_AUTOCAST
            self.fmode = _meta_function_mode_cls()(self.amp_device, tables, self.kernels)
            orig_clear = torch.clear_autocast_cache

            def clear_autocast_cache():  # a real torch.autocast exiting to nesting 0
                _clear_emulated_caches()
                orig_clear()

            patch(torch, "clear_autocast_cache", clear_autocast_cache)
            from transformers.utils import generic

            amp_device = self.amp_device
            _META_AMP.append(amp_device)
            stack.callback(_META_AMP.pop)
            if not _ORIG_MAYBE_AUTOCAST:
                _ORIG_MAYBE_AUTOCAST.append(generic.maybe_autocast)
            self._orig_maybe = _ORIG_MAYBE_AUTOCAST[0]
            stack.callback(self._unpatch_maybe_autocast)  # runs last: modules imported meanwhile
            self._patch_maybe_autocast(stack)

            from transformers import masking_utils

            orig_find = masking_utils.find_packed_sequence_indices

            def find_packed_sequence_indices(position_ids):
                # `(mask[:, -1] == 0).all()` is data dependent; the traced batch is one unpacked
                # sequence per row (position_ids = arange), for which the original returns None.
                if position_ids.device.type == "meta":
                    return None
                return orig_find(position_ids)

            patch(masking_utils, "find_packed_sequence_indices", find_packed_sequence_indices)

            orig_autocast = torch.autocast

            def autocast(device_type, dtype=None, enabled=True, cache_enabled=None):
                # torch.autocast("meta") is unsupported; meta stands for the emulated device
                if device_type == "meta":
                    return _AmpContext(amp_device, dtype, enabled, cache_enabled)
                return orig_autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)

            patch(torch, "autocast", autocast)
        else:
            self.fmode = None

    def _patch_maybe_autocast(self, stack):
        """Point every loaded transformers module's ``maybe_autocast`` (imported by name) at
        ``_maybe_autocast``; called again after the model is built, since modeling modules are
        imported lazily."""
        import sys

        for mod in list(sys.modules.values()):
            if getattr(mod, "__name__", "").startswith("transformers") and \
                    getattr(mod, "maybe_autocast", None) is self._orig_maybe:
                setattr(mod, "maybe_autocast", _maybe_autocast)
                stack.callback(setattr, mod, "maybe_autocast", self._orig_maybe)

    def _unpatch_maybe_autocast(self):
        """Modules imported while ``generic.maybe_autocast`` was patched bound the patch."""
        import sys

        for mod in list(sys.modules.values()):
            if getattr(mod, "maybe_autocast", None) is _maybe_autocast:
                setattr(mod, "maybe_autocast", self._orig_maybe)

    # ---------------------------------------------------------------------------------------
    def _hf_config(self):
        from transformers import AutoConfig

        cfg = dict(self.config)
        model_type = cfg.pop("model_type")
        for key in ("transformers_version", "_name_or_path", "architectures", "auto_map",
                    "quantization_config", "torch_dtype", "dtype"):
            cfg.pop(key, None)
        return AutoConfig.for_model(model_type, **cfg)

    def _bnb_config(self):
        from transformers import BitsAndBytesConfig

        if self.quant == "int8":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=self.cdt,
        )

    def _build_model(self, stack):
        import torch
        from transformers import AutoModelForCausalLM

        hf_config = self._hf_config()
        kw = {"dtype": self.load_dtype, "attn_implementation": self.attn_impl}
        if self.device == "meta":
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(hf_config, **kw)
            if self.quant in KBIT:
                self._quantize_on_meta(model)
        else:
            model = AutoModelForCausalLM.from_config(hf_config, **kw)
            if self.quant in KBIT:
                tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="qplan-trace-"))
                model.save_pretrained(tmp)
                del model
                model = AutoModelForCausalLM.from_pretrained(
                    tmp, quantization_config=self._bnb_config(), device_map="cpu", **kw)
        self.hf_config = hf_config
        return model

    def _quantize_on_meta(self, model):
        """from_pretrained's quantization, with the weights made on meta (see module docstring)."""
        import bitsandbytes as bnb
        import torch
        from transformers.quantizers.auto import AutoHfQuantizer

        hfq = AutoHfQuantizer.from_config(self._bnb_config(), pre_quantized=False)
        hfq.preprocess_model(model=model, dtype=self.load_dtype, device_map={"": "meta"},
                             checkpoint_files=None, use_kernels=False)
        meta = torch.device("meta")
        for _, module in model.named_modules():
            if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                out_f, in_f = module.out_features, module.in_features
                value = torch.empty(out_f, in_f, dtype=self.load_dtype, device=meta)
                old = module.weight
                if isinstance(module, bnb.nn.Linear4bit):
                    # integrations/bitsandbytes.py Bnb4bitQuantize.convert (a GPT-2 Conv1D
                    # checkpoint weight is transposed there first: [out, in] as made here)
                    new = bnb.nn.Params4bit(value, requires_grad=False, **old.__dict__)._quantize(meta)
                else:
                    # integrations/bitsandbytes.py Bnb8bitQuantize.convert
                    kw = dict(old.__dict__)
                    kw.pop("SCB", None)
                    new = bnb.nn.Int8Params(value, requires_grad=False, **kw)._quantize(meta)
                module.weight = new
                if module.bias is not None:
                    module.bias = torch.nn.Parameter(
                        torch.empty(out_f, dtype=self.load_dtype, device=meta), requires_grad=False)
                module._is_hf_initialized = True
                del old
        model.hf_quantizer = hfq
        hfq.postprocess_model(model)

    # ---------------------------------------------------------------------------------------
    def _apply_peft(self, model):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        model.config.use_cache = False  # as qplan's peft backend does after from_pretrained
        if self.upcast_kbit and self.quant in KBIT:
            # qplan's peft backend (backends/peft_backend.py) calls it for k-bit models only
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=self.grad_ckpt,
                gradient_checkpointing_kwargs={"use_reentrant": False} if self.grad_ckpt else None)
        elif self.upcast_kbit:
            self.notes.append(f"upcast_kbit ignored for quant={self.quant}: prepare_model_for_kbit_training "
                              "is for k-bit models")
        lc = self.lora
        cfg = LoraConfig(
            task_type="CAUSAL_LM",
            r=int(lc.get("r", 8)),
            lora_alpha=lc.get("alpha", lc.get("lora_alpha", 16)),
            lora_dropout=float(lc.get("dropout", lc.get("lora_dropout", 0.0)) or 0.0),
            target_modules=lc.get("target_modules"),
            bias=lc.get("bias", "none") or "none",
            use_dora=bool(lc.get("use_dora", False)),
            use_rslora=bool(lc.get("use_rslora", False)),
            modules_to_save=lc.get("modules_to_save"),
        )
        with contextlib.ExitStack() as st:
            if self.device == "meta":
                # tensors PEFT makes without a device (e.g. bnb Params4bit.__deepcopy__ for DoRA
                # starts from torch.empty(0)) must be meta to be combined with meta data
                st.enter_context(self.torch.device("meta"))
            pm = get_peft_model(model, cfg)
        if self.grad_ckpt:
            # Trainer: model.activation_checkpointing_enable(activation_checkpointing_kwargs=None)
            pm.activation_checkpointing_enable(activation_checkpointing_kwargs=None)
            self._wrap_checkpoint(pm)
        return pm

    def _wrap_checkpoint(self, model):
        """Mark recomputation for the tracker and, on meta, re-enter the forward's autocast state
        during recomputation (torch.utils.checkpoint does this for real devices)."""
        import torch

        run = self
        for m in model.modules():
            orig = m.__dict__.get("_gradient_checkpointing_func")
            if orig is None:
                continue

            def ckpt(fn, *args, _orig=orig, **kw):
                state = (
                    torch.is_autocast_enabled(run.amp_device),
                    torch.get_autocast_dtype(run.amp_device),
                    torch.is_autocast_cache_enabled(),
                )

                def body(*a, **k):
                    tr = run.tracker
                    rc = None
                    if tr is not None and tr.phase == "backward":
                        rc, tr.rc = tr.rc, len(tr.rc_end) + 1
                        tr.rc_end[tr.rc] = None
                    try:
                        with contextlib.ExitStack() as st:
                            if run.fmode is not None:
                                # the autograd engine runs the recomputation without the
                                # forward's torch-function mode stack
                                if run.fmode not in torch.overrides._get_current_function_mode_stack():
                                    st.enter_context(run.fmode)
                                if state[0]:
                                    st.enter_context(_AmpContext(run.amp_device, state[1], True, state[2]))
                            return fn(*a, **k)
                    finally:
                        if tr is not None and tr.phase == "backward":
                            tr.rc_end[tr.rc] = tr.event
                            tr.rc = rc

                return _orig(body, *args, **kw)

            m._gradient_checkpointing_func = ckpt

    # ---------------------------------------------------------------------------------------
    def _make_optimizer(self, model):
        import dataclasses
        import types

        from transformers import Trainer, TrainingArguments
        from transformers.training_args import OptimizerNames

        # TrainingArguments' defaults, read off the dataclass: instantiating it would initialise
        # accelerate's process-wide PartialState, which must stay untouched for a later real run.
        defaults = {
            f.name: f.default
            for f in dataclasses.fields(TrainingArguments)
            if f.default is not dataclasses.MISSING
        }
        args = types.SimpleNamespace(**dict(defaults, optim=OptimizerNames(self.optimizer)))
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        # Trainer.get_decay_parameter_names does not use `self`
        decay = set(Trainer.get_decay_parameter_names(None, model))
        wd = args.weight_decay
        groups = [
            {"params": [p for n, p in model.named_parameters() if n in decay and p.requires_grad],
             "weight_decay": wd},
            {"params": [p for n, p in model.named_parameters() if n not in decay and p.requires_grad],
             "weight_decay": 0.0},
        ]
        kwargs = dict(kwargs)
        if self.optimizer in ("adamw_torch", "sgd"):
            kwargs["foreach"] = True
        # non-fused torch optimizers keep `step` on the host for CUDA parameters
        self.opt_host_step = self.optimizer in ("adamw_torch", "sgd")
        return cls(groups, **kwargs)

    # ---------------------------------------------------------------------------------------
    def _batch(self):
        import torch

        B, S = self.batch_size, self.seq_len
        V = self.hf_config.get_text_config().vocab_size
        if self.device == "meta":
            ids = torch.empty(B, S, dtype=torch.long, device="meta")
        else:
            g = torch.Generator().manual_seed(self.seed + 1)
            ids = torch.randint(0, V, (B, S), generator=g)
        return ids

    def _trace(self, model, opt):
        import inspect

        import torch
        from accelerate.utils.operations import convert_to_fp32

        dev = self.device
        if dev == "meta":
            self._patch_maybe_autocast(self._stack)
        B, S = self.batch_size, self.seq_len
        vocab = self.hf_config.get_text_config().vocab_size
        Tracker = _tracker_cls()
        mirrors = _bnb_mirrors(dev)
        if dev == "meta":
            mirrors.update(_meta_mirrors())
            if self.kernels == "cpu":
                mirrors.update(_cpu_kernel_mirrors())
        tracker = Tracker(dev, mirrors, {B * S * vocab, B * (S - 1) * vocab}, vocab)
        self.tracker = None

        ids = self._batch()
        labels = ids.clone()  # the collator makes a separate labels tensor (backends/data.py)
        base = model.get_base_model()
        accepts = getattr(base, "accepts_loss_kwargs", None)
        if accepts is None:
            accepts = any(p.kind == inspect.Parameter.VAR_KEYWORD
                          for p in inspect.signature(base.forward).parameters.values())
        num_items = labels[..., 1:].ne(-100).sum() if accepts else None

        trainable = [p for p in model.parameters() if p.requires_grad]
        run = self

        def grad_hook(p):
            rec = tracker.lookup(p.grad)
            if rec is not None and rec.grad_at is None:
                rec.grad_at = tracker.event

        hooks = [p.register_post_accumulate_grad_hook(grad_hook) for p in trainable]

        def pack(t):
            rec = tracker.lookup(t)
            if rec is not None:
                rec.saved = True
            return t

        def unpack(t):
            return t

        def amp_ctx():
            if not self.amp:
                return contextlib.nullcontext()
            if dev == "meta":
                return _AmpContext(self.amp_device, self.cdt, True, True)
            return torch.autocast("cpu", dtype=self.cdt)

        def forward():
            kwargs = {"input_ids": ids, "labels": labels}
            if num_items is not None:
                kwargs["num_items_in_batch"] = num_items
            with amp_ctx():
                outputs = model(**kwargs)
            if self.amp:
                outputs = convert_to_fp32(outputs)
            loss = outputs["loss"]
            del outputs
            return loss

        model.train()
        with contextlib.ExitStack() as stack:
            if self.fmode is not None:
                stack.enter_context(self.fmode)
            stack.enter_context(tracker)
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, unpack))
            self.tracker = tracker
            self._register_existing(tracker, model, opt, [ids, labels, num_items])
            for step in range(1, self.steps + 1):
                tracker.step = step
                tracker.mark(f"step{step}:forward")
                tracker.phase = "forward"
                loss = forward()
                tracker.mark(f"step{step}:backward")
                tracker.phase = "backward"
                loss.backward()
                del loss
                tracker.mark(f"step{step}:optimizer")
                tracker.phase = "optimizer"
                torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
                opt.step()
                for buf in self.paged_pending:
                    rec = tracker.lookup(buf)
                    if rec is not None:
                        rec.paged = True
                self.paged_pending.clear()
                opt.zero_grad(set_to_none=True)
                tracker.mark(f"step{step}:end")
                self._classify_persistent(tracker, model, opt)
            self.tracker = None
        for h in hooks:
            h.remove()
        tracker.detach()
        return self._summarize(tracker)

    def _register_existing(self, tracker, model, opt, extra):
        import torch

        def reg(t, kind):
            if isinstance(t, torch.Tensor):
                tracker.reg(t)
                rec = tracker.lookup(t)
                if rec is not None:
                    rec.alloc = -1
                    if kind is not None:
                        rec.kind = kind

        for t in extra:
            reg(t, "input")
        self._walk_model(model, reg)
        for state in opt.state.values():
            for v in state.values():
                reg(v, None)

    def _walk_model(self, model, reg):
        import torch

        for p in model.parameters():
            reg(p, "trainable" if p.requires_grad else "frozen")
        for b in model.buffers():
            reg(b, "frozen")
        for m in model.modules():
            for v in list(vars(m).values()):
                if isinstance(v, torch.Tensor):
                    reg(v, "frozen")
            w = getattr(m, "weight", None)
            qs = getattr(w, "quant_state", None)
            if qs is not None:
                for t in (qs.absmax, qs.code, getattr(qs, "offset", None)):
                    reg(t, "frozen")
                if getattr(qs, "state2", None) is not None:
                    reg(qs.state2.absmax, "frozen")
                    reg(qs.state2.code, "frozen")
            st = getattr(m, "state", None)
            if st is not None and hasattr(st, "SCB"):
                reg(st.CB, "frozen")
                reg(st.SCB, "frozen")
            if w is not None and hasattr(w, "SCB"):
                reg(w.SCB, "frozen")
                reg(getattr(w, "CB", None), "frozen")

    def _classify_persistent(self, tracker, model, opt):
        import torch

        def mark(t, kind):
            rec = tracker.lookup(t)
            if rec is not None and rec.kind is None:
                rec.kind = kind

        self._walk_model(model, mark)
        for state in opt.state.values():
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    rec = tracker.lookup(v)
                    if rec is not None:
                        rec.opt = True
                        if self.opt_host_step and k == "step":
                            rec.host = True  # torch keeps `step` on the host for CUDA params

    # ---------------------------------------------------------------------------------------
    def _summarize(self, tracker):
        """Live bytes after every event, from the records; peaks, and the categories at the peak.
        Host tensors and paged optimizer state are outside the curve."""
        import itertools

        delta = [0] * (tracker.event + 1)
        base = 0
        for r in tracker.records:
            if r.host or r.paged:
                continue
            if r.alloc < 0:
                base += r.nbytes
            else:
                delta[r.alloc] += r.nbytes
            if r.free is not None:
                delta[r.free] -= r.nbytes
        live = list(itertools.accumulate(delta, initial=base))[1:]  # live[e]: after event e
        marks = {label: ev for ev, label in tracker.marks}

        def before(e):
            return live[e - 1] if e > 0 else base

        def seg_max(lo, hi):  # max over events lo..hi-1 (the state entering lo if none)
            best, at = before(lo), lo
            for e in range(lo, hi):
                if live[e] > best:
                    best, at = live[e], e
            return best, at

        baseline = before(marks["step1:forward"])
        per_step, phase_peaks = [], dict.fromkeys(("forward", "backward", "optimizer"), 0)
        peak, peak_at, peak_step = -1, 0, 1
        for s in range(1, self.steps + 1):
            f, b, o, e = (marks[f"step{s}:{x}"] for x in ("forward", "backward", "optimizer", "end"))
            for name, (lo, hi) in (("forward", (f, b)), ("backward", (b, o)), ("optimizer", (o, e))):
                phase_peaks[name] = max(phase_peaks[name], seg_max(lo, hi)[0])
            v, at = seg_max(f, e)
            per_step.append(v)
            if v > peak:
                peak, peak_at, peak_step = v, at, s

        ends = {s: marks[f"step{s}:backward"] for s in range(1, self.steps + 1)}
        ends.update({("rc", k): v for k, v in tracker.rc_end.items()})
        breakdown = dict.fromkeys(CATEGORIES, 0)
        for r in tracker.records:
            if r.host or r.alloc > peak_at or (r.free is not None and r.free <= peak_at):
                continue
            breakdown[self._category(r, peak_at, ends)] += r.nbytes
        late = sum(r.nbytes for r in tracker.records if r.late and not r.host)
        if late:
            self.notes.append(f"{late} bytes of storages were first seen as op inputs (made without an op)")
        if sum(v for k, v in breakdown.items() if k != "optimizer_paged") != peak:  # pragma: no cover
            raise AssertionError(f"breakdown {breakdown} does not add up to the peak {peak}")
        return {
            "tensor_peak": int(peak),
            "breakdown_at_peak": {k: int(v) for k, v in breakdown.items()},
            "baseline": int(baseline),
            "per_step_peak": [int(v) for v in per_step],
            "phase_peaks": {k: int(v) for k, v in phase_peaks.items()},
            "peak_step": peak_step,
        }

    @staticmethod
    def _category(r, P, fwd_end):
        if r.paged:
            return "optimizer_paged"
        if r.kind == "frozen":
            return "weights"
        if r.kind == "trainable":
            return "adapters"
        if r.grad_at is not None and r.grad_at <= P:
            return "gradients"
        if r.opt:
            return "optimizer"
        if r.logits:
            return "logits"
        if r.kind == "input":
            return "activations"
        # allocated by the forward (or a checkpoint recomputation) and saved by autograd or kept
        # past the end of that forward (recomputation): an activation; else a transient
        if r.rc is not None:
            end = fwd_end.get(("rc", r.rc))
        elif r.phase == "forward":
            end = fwd_end.get(r.step)
        else:
            return "temporaries"
        if r.saved or r.free is None or end is None or r.free > end:
            return "activations"
        return "temporaries"
