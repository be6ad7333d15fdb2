"""Stand-ins: ops whose meta (or CPU) kernels allocate differently from the kernels a GPU runs.

Each stand-in runs inside the tracker's ``__torch_dispatch__`` as ``fn(reg, *args, **kwargs)``
and performs, at the same moment, the allocations of the CUDA code it mirrors, handing sub-op
outputs to ``reg``:

* ``bitsandbytes::gemm_4bit`` (4-bit forward, MatMul4Bit / matmul_4bit) -> the CUDA fallback
  ``_dequant_linear_fallback`` (bitsandbytes/backends/cuda/ops.py), which is also
  ``_gemm_4bit_default_impl``: [double quant: dequantized absmax fp32[blocks] and absmax+offset
  fp32[blocks]], the dequantized weight [N, K] in the input dtype, the ``F.linear`` output. CUDA
  uses a fused kernel without the dequantized weight for some shapes with M = batch*seq <= 1536
  (``_gemm_4bit_use_custom_cuda``), so in the forward the trace can over-count one transient
  dequantized weight for such shapes. The 4-bit backward is traced as is.
* ``bitsandbytes::int8_vectorwise_quant`` (MatMul8bitLt forward) -> the CUDA kernel's
  allocations: row_stats fp32[M], int8 [M, K]; with ``threshold > 0``: |A| fp16 [M, K] (freed at
  once), outlier mask bool [M, K], column mask bool[K], outlier column index. On meta the number
  of outlier columns is data dependent and taken as 0; outliers would add M x n_outliers fp16.
* ``bitsandbytes::int8_mixed_scaled_mm`` / ``int8_scaled_mm`` -> the default (Python) kernels
  CUDA also uses, with the CUDA ``int8_linear_matmul`` (int32 [M, N]) and ``int8_mm_dequant``
  (fp16 [M, N], then ``.to(dtype)``) allocations.
* ``kernels="cpu"``: CPU ``native_layer_norm`` returns mean/rstd in the parameter dtype.
* ``aten._scaled_dot_product_flash_attention`` on meta with CUDA kernels: the output in CUDA's ``[b, s, nh, hd]``
  layout whatever the query's strides.
* ``aten.embedding_dense_backward`` (full fine-tuning) on meta: the kernels' gradient in its own dtype, not the
  decomposition's fp32 buffer.
* ``aten._grouped_mm`` (transformers' MoE experts) on meta: the meta kernel repeats the CUDA
  kernel's bf16-only check; other dtypes get the output the kernel would give.
"""

from __future__ import annotations

from typing import Any


class TritonLaunch:
    """``kernel[grid](...)``: a Triton launch that writes only into tensors it is given (nothing to allocate)."""

    def __getitem__(self, grid: Any) -> Any:
        return lambda *args, **kwargs: None


def bnb_stand_ins(device_type):
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


def cpu_kernel_stand_ins():
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


def meta_stand_ins(kernels: str = "cuda"):
    """Stand-ins for meta kernels that refuse inputs the real kernels accept, or allocate otherwise than ``kernels``'
    (``cuda`` or ``cpu``)."""
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

    def embedding_dense_backward(reg, grad, indices, num_weights, padding_idx, scale_grad_by_freq):
        """The embedding's weight gradient (full fine-tuning: the embeddings train). torch's decomposition, which the
        meta device runs, accumulates in fp32 (``elementwise_dtypes`` upcasts bf16/fp16) and casts back; the CUDA
        kernel (``embedding_dense_backward_cuda``, aten/src/ATen/native/cuda/Embedding.cu) and the CPU one
        (``embedding_dense_backward_cpu``) make ``zeros(num_weights, dim)`` in the gradient's dtype and add into it;
        CUDA's fp32 partial sums per segment of sorted indices (``grad_weight_per_segment``, at most one row per token)
        are freed before it returns."""
        partial = None
        if kernels == "cuda":  # alive until the kernel returns
            partial = reg(torch.empty(indices.numel(), grad.shape[-1], dtype=torch.float32, device=grad.device))
        out = reg(torch.zeros(num_weights, grad.shape[-1], dtype=grad.dtype, device=grad.device))
        del partial
        return out

    def flash_attention(reg, query, *args, **kwargs):
        """``aten._scaled_dot_product_flash_attention``'s output in the CUDA kernel's layout. CUDA runs the kernel on
        ``query.transpose(1, 2)`` and makes the output with ``empty_like`` of that ``[b, s, nh, hd]`` view
        (flash_api.cpp ``mha_fwd``): contiguous in ``[b, s, nh, hd]`` whatever the query's strides, so transformers'
        ``attn_output.transpose(1, 2).contiguous()`` copies nothing. The meta kernel makes ``empty_like(query)``, which
        keeps that layout only for a dense query: q sliced from a fused projection (Phi-3's ``qkv_proj``) gets a
        contiguous ``[b, nh, s, hd]`` output there, and the ``contiguous()`` a copy CUDA does not make."""
        out = aten._scaled_dot_product_flash_attention.default(query, *args, **kwargs)
        b, nh, s, hd = out[0].shape
        attention = torch.empty((b, s, nh, hd), dtype=out[0].dtype, device=out[0].device).transpose(1, 2)
        return tuple(reg(t) if isinstance(t, torch.Tensor) else t for t in (attention, *out[1:]))

    stand = {aten._grouped_mm.default: grouped_mm, aten.embedding_dense_backward.default: embedding_dense_backward}
    if kernels == "cuda":
        stand[aten._scaled_dot_product_flash_attention.default] = flash_attention
    return stand


