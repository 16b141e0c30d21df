"""The fused quantized projection on the GPU (issue 32, items 3 and 6; ops/triton_quant.py):
Llama-3-8B's four projection shapes in W4A16 (groups of 128, asymmetric) and W8A16 (per channel),
at batch 1, 16, 64 and 256: the kernel's time against the bf16 matmul over the same weights
dequantized (cuBLAS, what serving bf16 costs) and against its own floor (the bytes the quantized
weight takes / the measured bandwidth), and its error against the reference (dequantize, then
F.linear) in bf16. --smoke runs toy shapes (on CPU: interpreted, float32; numbers meaningless)."""
from __future__ import annotations

import torch

LLAMA3_8B_PROJECTIONS = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096),
                         "down_proj": (4096, 14336)}


def quant_kernels(device: torch.device, dtype: torch.dtype, smoke: bool, gb_s: float, timed) -> list[dict]:
    from vidya.models import quant
    from vidya.ops import triton_quant
    shapes = {"toy": (96, 256)} if smoke else LLAMA3_8B_PROJECTIONS
    batches = (1, 5) if smoke else (1, 16, 64, 256)
    out = []
    for method in ("int4", "int8"):
        qc = quant.online(method)
        for name, (n, k) in shapes.items():
            torch.manual_seed(0)
            lin = quant.QuantLinear.from_weight(torch.randn(n, k) * 0.02, qc).to(device)
            dense = lin.dequantize(dtype)
            weight_bytes = lin.qweight.numel() + lin.scales.numel() * lin.scales.element_size() + lin.zeros.numel()
            for m in batches:
                x = torch.randn(m, k, device=device).to(dtype)
                want = torch.nn.functional.linear(x, dense)
                got = triton_quant.quant_linear(x, lin)
                err = (got.float() - want.float()).abs().max().item()
                bound = 2e-2 * max(1.0, want.float().abs().max().item())
                repeat = 2 if smoke else 50
                fused_ms = 1e3 * timed(lambda: triton_quant.quant_linear(x, lin), device, repeat)
                bf16_ms = 1e3 * timed(lambda: torch.nn.functional.linear(x, dense), device, repeat)
                floor_ms = 1e3 * weight_bytes / (gb_s * 1e9)
                out.append({"method": qc.describe(), "projection": name, "n": n, "k": k, "batch": m,
                            "dtype": str(dtype), "max_abs_err": err, "err_bound": bound, "ok": err <= bound,
                            "fused_ms": fused_ms, "bf16_matmul_ms": bf16_ms, "speedup_vs_bf16": bf16_ms / fused_ms,
                            "floor_ms": floor_ms, "fraction_of_floor": floor_ms / fused_ms})
    return out
