"""The Triton path as torch custom ops, so per-block torch.compile(fullgraph=True) keeps it whole.

`efficient_attention_triton(q, k, v)` is differentiable: `titan_linear::efficient_attn_fwd`
returns the output and what the backward needs (the state after each chunk, in fp32, and the
log2 z at each chunk's end: O((T / C) · d²) memory, linear in T), and
`titan_linear::efficient_attn_bwd` returns dq, dk, dv. Kernels: triton_fwd.py, triton_bwd.py.

On a machine without a GPU the same kernels run under Triton's interpreter
(TRITON_INTERPRET=1 before the first import of triton), which is how CPU tests check them.
"""

import torch
import triton

from .naive import check_qkv
from .triton_blocks import (block_bwd_dk_kernel, block_bwd_dv_kernel, block_bwd_query_kernel, block_dq_kernel,
                            block_output_kernel)
from .triton_bwd import bwd_key_kernel, bwd_query_kernel
from .triton_common import reverse_scan_kernel, state_scan_kernel
from .triton_fwd import chunk_output_kernel, chunk_summary_kernel, state_fill_kernel
from .triton_tuning import HEAD_DIMS, LaunchConfig, launch_config


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the Triton path takes these inputs (the caller falls back to chunk.py if not)."""
    # fp32 keys beside bf16 / fp16 q and v: the decay's keys (models/hybrid/linear_options.py);
    # the kernels read every key as fp32 anyway.
    return (
        q.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and k.dtype in (q.dtype, torch.float32)
        and v.dtype == q.dtype
        and q.shape[-1] in HEAD_DIMS
        and v.shape[-1] in HEAD_DIMS
    )


def _like_bthd(x: torch.Tensor, d: int, dtype: torch.dtype) -> torch.Tensor:
    """(bs, heads, seqlen, d) stored as (bs, seqlen, heads, d): the layout torchtitan's attention
    transposes from and back to, so `.transpose(1, 2).contiguous()` after the op is free."""
    bs, heads, seqlen = x.shape[:3]
    return torch.empty(bs, seqlen, heads, d, dtype=dtype, device=x.device).transpose(1, 2)


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _unit_stride(*xs: torch.Tensor) -> list[torch.Tensor]:
    return [x if x.stride(-1) == 1 else x.contiguous() for x in xs]


def _forward_states(local: torch.Tensor, lse2: torch.Tensor, cfg: LaunchConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(s_end, z_end): the state after each chunk and the log2 z at its end (state_scan_kernel)."""
    bh, nc, d_k, d_v = local.shape
    s_end, z_end = torch.empty_like(local), torch.empty_like(lse2)
    state_scan_kernel[(bh, triton.cdiv(d_k * d_v, cfg.scan_block))](
        local, lse2, s_end, z_end, nc, d_k * d_v, W=d_v, NB=cfg.scan_chunks, BLK=cfg.scan_block)
    return s_end, z_end


def _reverse_scan(u: torch.Tensor, z_end: torch.Tensor, cfg: LaunchConfig) -> torch.Tensor:
    bh, nc, d_k, width = u.shape
    x = torch.empty_like(u)
    reverse_scan_kernel[(bh, triton.cdiv(d_k * width, cfg.scan_block))](
        u, z_end, x, nc, d_k * width, W=width, NB=cfg.scan_chunks, BLK=cfg.scan_block)
    return x


def _fill_states(k, v, s_end, z_end, cfg: LaunchConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s_end, z_end, flags) after every block of cfg.fill positions instead of every chunk
    (LaunchConfig.fill): state_fill_kernel walks each chunk from the scan's state before it."""
    bs, n_kv, seqlen, d_k = k.shape
    d_v = v.shape[-1]
    bh, nc = s_end.shape[:2]
    nf = nc * (cfg.chunk // cfg.fill)  # the last chunk's blocks past T included
    bk, bv = _key_block(d_k), min(d_v, 64)
    f32 = dict(dtype=torch.float32, device=k.device)
    sf = torch.empty(bh, nf, d_k, d_v, **f32)
    zf = torch.empty(bh, nf, d_k, **f32)
    ff = torch.empty(bh, nf, d_k // bk, dtype=torch.int32, device=k.device)
    state_fill_kernel[(nc, bh, (d_k // bk) * (d_v // bv))](
        k, v, s_end, z_end, sf, zf, ff, *_strides(k), *_strides(v), seqlen, n_kv, nc,
        C=cfg.chunk, c=cfg.fill, DK=d_k, DV=d_v, BK=bk, BV=bv, PREC=cfg.prec, SPAN=cfg.span,
        num_warps=4)
    return sf, zf, ff.amax(dim=-1).to(torch.int32)


def _per_chunk_config(cfg: LaunchConfig) -> LaunchConfig:
    """The config the carried-state kernels run with: with fill, one chunk per filled block (they
    take the flagged blocks, walking each in sub-chunks)."""
    return cfg._replace(chunk=cfg.fill) if cfg.fill else cfg


def _key_block(d_k: int) -> int:
    """Key features per step of the filled-state kernels (triton_blocks.py)."""
    return min(d_k, 64)


def _value_block(d_v: int, cfg: LaunchConfig) -> int:
    """The value features per program, d_v / v_split (LaunchConfig.v_split); ValueError if that
    is not a whole block of at least 16 (the products' smallest tile)."""
    if d_v % cfg.v_split or d_v // cfg.v_split < 16:
        raise ValueError(f"v_split = {cfg.v_split} is not allowed for d_v = {d_v}: a divisor of d_v "
                         "leaving blocks of at least 16 value features")
    return d_v // cfg.v_split


def _register_cap(cfg: LaunchConfig) -> dict:
    """Triton's maxnreg launch option when the config caps registers (LaunchConfig.max_registers)."""
    return {"maxnreg": cfg.max_registers} if cfg.max_registers else {}


def _per_chunk(kernel, grid, args: tuple, group: int, d_k: int, d_v: int, cfg: LaunchConfig,
               variants: tuple[bool, ...] = (True, False)) -> None:
    """Launch both compiled variants of a per-chunk kernel (triton_diag.py): FAST for the chunks
    the summary left unflagged, then the exact one for the flagged; each variant's programs
    return at once for the other's chunks. One program per (chunk, kv head, value block).
    With fill only the exact variant (variants=(False,)): triton_blocks.py takes the rest."""
    for fast in variants:
        kernel[(*grid, cfg.v_split)](*args, G=group, C=cfg.chunk, c=cfg.sub_chunk, DK=d_k, DV=d_v,
                                     BV=_value_block(d_v, cfg), PREC=cfg.prec, FAST=fast, num_warps=cfg.warps,
                                     **_register_cap(cfg))


# The custom ops take the LaunchConfig's fields as arguments (triton_tuning.py), so a traced
# graph records them and the backward runs with its forward's chunking.
@torch.library.custom_op("titan_linear::efficient_attn_fwd", mutates_args=())
def efficient_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    chunk: int, sub_chunk: int, warps: int, scan_chunks: int, scan_block: int, prec: str, span: float,
    v_split: int, max_registers: int, fill: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (o, s_end, z_end, flags): o (bs, n_heads, seqlen, d_v); s_end (bs · n_kv_heads,
    chunks, d_k, d_v) fp32 state after each chunk; z_end (bs · n_kv_heads, chunks, d_k) fp32 log2
    z; flags (bs · n_kv_heads, chunks) int32, the chunks the exact kernels take. The remaining
    arguments are a LaunchConfig's fields (triton_tuning.py)."""
    cfg = LaunchConfig(chunk, sub_chunk, warps, scan_chunks, scan_block, prec, span, v_split, max_registers, fill)
    group = check_qkv(q, k, v)
    q, k, v = _unit_stride(q, k, v)
    bs, n_heads, seqlen, d_k = q.shape
    n_kv, d_v = k.shape[1], v.shape[-1]
    nc = triton.cdiv(seqlen, chunk)
    f32 = dict(dtype=torch.float32, device=q.device)
    local = torch.empty(bs * n_kv, nc, d_k, d_v, **f32)
    lse2 = torch.empty(bs * n_kv, nc, d_k, **f32)
    flags = torch.empty(bs * n_kv, nc, dtype=torch.int32, device=q.device)
    grid = (nc, bs * n_kv)
    chunk_summary_kernel[(*grid, v_split)](
        k, v, local, lse2, flags, *_strides(k), *_strides(v), seqlen, n_kv, nc,
        C=chunk, SB=max(min(chunk, 64), sub_chunk), c=sub_chunk, DK=d_k, DV=d_v, BV=_value_block(d_v, cfg),
        PREC=prec, SPAN=span, num_warps=warps, **_register_cap(cfg),
    )
    s_end, z_end = _forward_states(local, lse2, cfg)
    o = _like_bthd(q, d_v, q.dtype)
    variants = (True, False)
    if fill:
        s_end, z_end, flags = _fill_states(k, v, s_end, z_end, cfg)
        grid = (s_end.shape[1], bs * n_kv)
        block_output_kernel[(grid[0], bs * n_heads)](
            q, k, v, o, s_end, z_end, flags, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            seqlen, n_kv, grid[0], G=group, F=fill, DK=d_k, DV=d_v, BK=_key_block(d_k), PREC=prec,
            num_warps=warps, **_register_cap(cfg))
        variants = (False,)
    _per_chunk(chunk_output_kernel, grid, (
        q, k, v, o, s_end, z_end, flags, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        seqlen, n_kv, grid[0]), group, d_k, d_v, _per_chunk_config(cfg), variants)
    return o, s_end, z_end, flags


@efficient_attn_fwd.register_fake
def _(q, k, v, chunk, sub_chunk, warps, scan_chunks, scan_block, prec, span, v_split, max_registers, fill):
    bs, n_heads, seqlen, d_k = q.shape
    n_kv, d_v = k.shape[1], v.shape[-1]
    nc = -(-seqlen // chunk) * (chunk // fill if fill else 1)
    s_end = q.new_empty(bs * n_kv, nc, d_k, d_v, dtype=torch.float32)
    z_end = q.new_empty(bs * n_kv, nc, d_k, dtype=torch.float32)
    return _like_bthd(q, d_v, q.dtype), s_end, z_end, q.new_empty(bs * n_kv, nc, dtype=torch.int32)


@torch.library.custom_op("titan_linear::efficient_attn_bwd", mutates_args=())
def efficient_attn_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    s_end: torch.Tensor, z_end: torch.Tensor, flags: torch.Tensor,
    chunk: int, sub_chunk: int, warps: int, scan_chunks: int, scan_block: int, prec: str, span: float,
    v_split: int, max_registers: int, fill: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv from the output gradient and efficient_attn_fwd's saved s_end, z_end, flags,
    with the forward's launch config (with fill, s_end and z_end are per filled block:
    triton_blocks.py takes the unflagged blocks, the carried-state kernels the flagged ones)."""
    cfg = _per_chunk_config(
        LaunchConfig(chunk, sub_chunk, warps, scan_chunks, scan_block, prec, span, v_split, max_registers, fill))
    chunk = cfg.chunk
    group = check_qkv(q, k, v)
    do, q, k, v = _unit_stride(do, q, k, v)
    bs, n_heads, seqlen, d_k = q.shape
    n_kv, d_v = k.shape[1], v.shape[-1]
    nc = s_end.shape[1]
    f32 = dict(dtype=torch.float32, device=q.device)
    dq = _like_bthd(q, d_k, q.dtype)
    cdp = torch.empty(v_split, bs, n_heads, seqlen, d_k, **f32)
    refs = torch.empty(bs * n_kv, nc, chunk // sub_chunk, d_k, **f32)
    later = torch.empty(bs * n_kv, nc, d_k, d_v + 1, **f32)
    # With value blocks (v_split > 1) each block writes its part of dq, c and lb (triton_bwd.py)
    # into fp32 buffers that are summed here; with one, the kernel writes them in place.
    split = v_split > 1
    dq_parts = torch.empty(v_split, bs, seqlen, n_heads, d_k, **f32).transpose(2, 3) if split else dq[None]
    lb_parts = torch.empty(v_split, bs * n_kv, nc, d_k, **f32) if split else later[None, ..., d_v]
    # The kernels take v − m (triton_bwd.py: any m gives the same gradients; one near the values'
    # common mean keeps its rounding out of dq and dk). m: the mean over features of the state
    # after the last chunk, a weighted mean of all values, already at hand (reading v for its
    # own mean would be one more pass over v).
    v_shift = s_end[:, -1].mean(dim=1).contiguous()
    grid = (nc, bs * n_kv)
    variants = (True, False)
    blocks = dict(G=group, F=chunk, DK=d_k, DV=d_v, BK=_key_block(d_k), PREC=prec, num_warps=warps,
                  **_register_cap(cfg))
    key_blocks = (d_k // _key_block(d_k), nc, bs * n_kv)
    if fill:  # v_split is 1 (triton_tuning._check)
        block_bwd_query_kernel[key_blocks](
            q, k, v, do, cdp, s_end, z_end, later, flags, v_shift,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), seqlen, n_kv, nc, **blocks)
        block_dq_kernel[(nc, bs * n_heads)](
            q, cdp, dq, flags, *_strides(q), *_strides(dq), seqlen, n_kv, nc, G=group, F=chunk, DK=d_k,
            num_warps=warps)
        variants = (False,)
    _per_chunk(bwd_query_kernel, grid, (
        q, k, v, do, dq_parts, cdp, s_end, z_end, refs, later, lb_parts, flags, v_shift,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq_parts[0]),
        dq_parts.stride(0) if split else 0, cdp.stride(0) if split else 0,
        lb_parts.stride(0) if split else 0, lb_parts.stride(2), lb_parts.stride(3),
        seqlen, n_kv, nc), group, d_k, d_v, cfg, variants)
    if split:
        dq.copy_(dq_parts.sum(0))
        cdp = cdp.sum(0, keepdim=True)
        later[..., d_v] = lb_parts.sum(0)
    # Reverse scan: slot n receives chunk n + 1's summary, decayed from Z_{n+1} to Z_n.
    later = _reverse_scan(later, z_end, cfg)
    dk = _like_bthd(k, d_k, k.dtype)
    dv = _like_bthd(v, d_v, v.dtype)
    dk_parts = torch.empty(v_split, bs, seqlen, n_kv, d_k, **f32).transpose(2, 3) if split else dk[None]
    if fill:
        block_bwd_dk_kernel[key_blocks](
            q, k, v, do, cdp, z_end, later, dk, flags, v_shift,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), seqlen, n_kv, nc, **blocks)
        block_bwd_dv_kernel[grid](
            q, k, do, z_end, later, dv, flags,
            *_strides(q), *_strides(k), *_strides(do), *_strides(dv), seqlen, n_kv, nc, **blocks)
    _per_chunk(bwd_key_kernel, grid, (
        q, k, v, do, cdp, z_end, refs, later, dk_parts, dv, flags, v_shift,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk_parts[0]),
        dk_parts.stride(0) if split else 0, *_strides(dv),
        seqlen, n_kv, nc), group, d_k, d_v, cfg, variants)
    if split:
        dk.copy_(dk_parts.sum(0))
    return dq, dk, dv


@efficient_attn_bwd.register_fake
def _(do, q, k, v, s_end, z_end, flags, *config):
    return _like_bthd(q, q.shape[-1], q.dtype), _like_bthd(k, k.shape[-1], k.dtype), _like_bthd(v, v.shape[-1], v.dtype)


def _setup_context(ctx, inputs, output):
    q, k, v, *config = inputs
    _, s_end, z_end, flags = output
    ctx.save_for_backward(q, k, v, s_end, z_end, flags)
    ctx.config = config


def _backward(ctx, do, _ds_end, _dz_end, _dflags):
    q, k, v, s_end, z_end, flags = ctx.saved_tensors
    return (*efficient_attn_bwd(do, q, k, v, s_end, z_end, flags, *ctx.config), *(None for _ in ctx.config))


efficient_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def efficient_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal efficient attention by the Triton kernels; same contract as efficient_attention.
    Launch parameters: triton_tuning.launch_config(max(d_k, d_v), dtype).

    Args:
        q: (bs, n_heads, seqlen, d_k), bf16 / fp16 / fp32, d_k in 16, 32, 64, 128.
        k: (bs, n_kv_heads, seqlen, d_k).
        v: (bs, n_kv_heads, seqlen, d_v).

    Returns:
        (bs, n_heads, seqlen, d_v) in the dtype of q, stored as (bs, seqlen, n_heads, d_v).
    """
    cfg = launch_config(max(q.shape[-1], v.shape[-1]), q.dtype)
    return efficient_attn_fwd(q, k, v, *cfg)[0]
