"""Autocast and SDPA emulation for meta tensors: what a CUDA (or CPU) step would allocate.

torch has no autocast for the meta device, and meta picks SDPA's math backend. While a meta
trace runs:

* ``MetaFunctionMode`` (a ``TorchFunctionMode``) applies the autocast policy of the emulated
  device at the outermost torch API call: the CUDA lists copied from ATen/autocast_mode.h of torch
  2.13 (``AT_FORALL_LOWER_PRECISION_FP``, ``AT_FORALL_FP32``, ``AT_FORALL_FP32_SET_OPT_DTYPE``,
  ``AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE``, ``AT_FORALL_PROMOTE``), the CPU lists from
  aten/src/ATen/autocast_mode.cpp (``kernels="cpu"``, used to compare with the CPU oracle), with
  ``cached_cast``'s weight-cast cache (fp32 leaves that require grad, dropped when the outermost
  autocast exits). Autocast casts an op's arguments right to left (``WrapFunction`` evaluates
  ``cached_cast(arg)...`` as C++ call arguments; GCC evaluates them right to left); so does the
  emulation, so the transient casts appear in the same order. Limitation: torch composites
  written in Python that are not themselves in the lists (``F.normalize``) are not looked into.
* ``F.scaled_dot_product_attention`` is routed to the kernel the target device would run:
  ``kernels="cuda"``: flash attention (fp16/bf16, no mask, head dim <= 256, GQA native; q/k/v
  padded to a multiple of 8), else memory-efficient attention (no GQA; boolean mask converted to
  the query dtype and padded to a multiple of 16), else the math decomposition (torch 2.13
  sdp_utils); ``kernels="cpu"``: ``_scaled_dot_product_flash_attention_for_cpu``, or math when
  dropout > 0 (sdp_utils_cpp.cpp ``check_for_dropout``). The meta kernels of these aten ops give
  the outputs the real kernels allocate (out, logsumexp, RNG state).
* ``F.dropout`` (``kernels="cuda"``) is routed to ``aten.native_dropout`` (output + bool mask,
  the mask saved), which CUDA inputs take (Dropout.cpp ``is_fused_kernel_acceptable``); meta and
  CPU inputs would take ``_dropout_impl`` (noise in the input dtype, saved by ``input * noise``).
* ``AmpContext`` is ``torch.autocast.__enter__/__exit__`` for the emulated device minus the
  availability check, so ``torch.is_autocast_enabled()`` answers as on that device (PEFT's bnb
  LoRA layers branch on it); ``maybe_autocast`` stands in for transformers' helper.
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref

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



class AmpContext:
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
            clear_emulated_caches()
        torch.set_autocast_enabled(self.device, self.prev)
        torch.set_autocast_dtype(self.device, self.prev_dtype)
        torch.set_autocast_cache_enabled(self.prev_cache)
        return False


_EMU_MODES: weakref.WeakSet = weakref.WeakSet()  # live MetaFunctionMode instances


def clear_emulated_caches():
    """The emulated autocast weight-cast caches, dropped whenever torch's would be (outermost
    autocast exit: ``torch.clear_autocast_cache``)."""
    for mode in list(_EMU_MODES):
        mode.clear_cache()


_META_AMP: list[str] = []  # emulated autocast device of the meta trace(s) running now
_ORIG_MAYBE_AUTOCAST: list = []  # transformers' own maybe_autocast


@contextlib.contextmanager
def meta_queries_answer_for(device):
    """``torch.is_autocast_enabled("meta")`` / ``torch.get_autocast_dtype("meta")`` answer as for ``device`` (the
    emulated one) while the context is open: code that asks about its tensors' device (Unsloth's kernels, TRL's
    fused LM head) sees the autocast state ``AmpContext`` set for that device."""
    import torch

    orig_enabled, orig_dtype = torch.is_autocast_enabled, torch.get_autocast_dtype

    def is_autocast_enabled(*a, **k):
        if k.get("device_type") == "meta":
            k["device_type"] = device
        return orig_enabled(*((device,) if a and a[0] == "meta" else a), **k)

    def get_autocast_dtype(device_type):
        return orig_dtype(device if device_type == "meta" else device_type)

    torch.is_autocast_enabled, torch.get_autocast_dtype = is_autocast_enabled, get_autocast_dtype
    try:
        yield
    finally:
        torch.is_autocast_enabled, torch.get_autocast_dtype = orig_enabled, orig_dtype


def maybe_autocast(device_type, dtype=None, enabled=True, cache_enabled=None):
    """transformers.utils.generic.maybe_autocast, with ``device_type="meta"`` (a no-op there)
    standing for the emulated device while a meta trace runs."""
    import torch

    if device_type == "meta" and _META_AMP:
        dev = _META_AMP[-1]
        if torch.is_autocast_enabled(dev) or enabled:
            return AmpContext(dev, dtype, enabled, cache_enabled)
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


@functools.cache
def meta_function_mode_cls():
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


