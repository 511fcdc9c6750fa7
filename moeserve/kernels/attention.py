"""Causal grouped-query attention of new queries against a sequence's keys.

Queries are the `t` newest tokens of one sequence, at absolute positions `q_pos .. q_pos+t-1`;
keys/values are all `L = q_pos + t` tokens of that sequence (cache plus the new ones). KV head j
serves query heads j*g .. j*g+g-1 (torch SDPA's `enable_gqa`), so K/V are never copied per head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeserve.kernels.metadata import AttentionMetadata


def causal_mask(q_pos: int, t: int, total: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean [t, total] mask (True = attend), or None when plain causal `is_causal` suffices."""
    if window is None and q_pos == 0:
        return None
    if window is None and t == 1:
        return None  # one query at the end sees every key
    qi = torch.arange(q_pos, q_pos + t, device=device).unsqueeze(1)
    kj = torch.arange(total, device=device).unsqueeze(0)
    mask = kj <= qi
    if window is not None:
        mask &= (qi - kj) < window
    return mask


def gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: int, window: int | None = None,
                  scale: float | None = None) -> torch.Tensor:
    """q [t, nh, hd], k/v [L, nkv, hd] -> [t, nh*hd]."""
    t, nh, hd = q.shape
    total = k.shape[0]
    mask = causal_mask(q_pos, t, total, window, q.device)
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # heads first
    out = F.scaled_dot_product_attention(
        qh.unsqueeze(0), kh.unsqueeze(0).to(q.dtype), vh.unsqueeze(0).to(q.dtype),
        attn_mask=mask, is_causal=mask is None and t > 1, scale=scale, enable_gqa=nh != kh.shape[0],
    )
    return out[0].transpose(0, 1).reshape(t, nh * hd)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                     window: int | None = None, scale: float | None = None) -> torch.Tensor:
    """One new query per sequence for B sequences at once: q [B, nh, hd], k/v [B, L, nkv, hd]
    (each sequence's keys padded to the longest, L), q_pos [B] -> [B, nh*hd].

    Sequence b attends to its keys 0..q_pos[b] (inside the window); padding is masked out. One SDPA
    call for the whole decode batch instead of B small ones.
    """
    B, nh, hd = q.shape
    j = torch.arange(k.shape[1], device=q.device)
    mask = j.unsqueeze(0) <= q_pos.unsqueeze(1)
    if window is not None:
        mask &= (q_pos.unsqueeze(1) - j.unsqueeze(0)) < window
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype),
        attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=nh != k.shape[2],
    )
    return out.reshape(B, nh * hd)


class PagedAttention:
    """The reference attention of one layer over the paged KV pool (any device, any pool dtype).

    `(q [T, nh, hd], k/v [T, nkv, hd], meta) -> [T, nh * hd]`: the step's k/v are stored at their slots
    (`meta.slot_mapping`; k/v None: the projection stored them); then every decode row (a sequence adding one
    token to its cache) is answered by one batched call that gathers those sequences' keys through their block
    tables, and each prefill chunk by SDPA over its keys: a chunk that starts a sequence uses its own rows (or
    reads them from the pool when the projection stored them), a later chunk reads its earlier keys back from
    the pool.
    """

    def __init__(self, layer: int, n_heads: int, n_kv_heads: int, head_dim: int, window: int | None) -> None:
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim, self.window = (
            layer, n_heads, n_kv_heads, head_dim, window)

    def store(self, k: torch.Tensor | None, v: torch.Tensor | None, meta: AttentionMetadata) -> None:
        """The step's k/v into this layer's pool at their slots, cast to its dtype (nothing when the step has no
        pool, or when k/v are None: the projection stored them)."""
        kv = meta.kv
        if kv is not None and meta.slot_mapping is not None and k is not None and v is not None:
            kc, vc = kv.k[self.layer], kv.v[self.layer]
            kc.index_copy_(0, meta.slot_mapping, k.to(kc.dtype))
            vc.index_copy_(0, meta.slot_mapping, v.to(vc.dtype))

    def __call__(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                 meta: AttentionMetadata) -> torch.Tensor:
        kv = meta.kv
        self.store(k, v, meta)
        if meta.decode_only:
            return self.decode(q, meta.block_tables, meta.seq_lens, max(meta.seq_lens_host), meta)
        out = torch.empty(q.shape[0], self.n_heads * self.head_dim, dtype=q.dtype, device=q.device)
        split = meta.decode_split
        if split.seqs:
            rows = split.rows
            out[rows] = self.decode(q[rows], meta.block_tables[split.seq_index], meta.seq_lens[split.seq_index],
                                    split.max_len, meta)
        for b in split.prefills:
            rows = slice(meta.query_start[b], meta.query_start[b + 1])
            ctx = meta.context_lens[b]
            if ctx == 0 and k is not None and v is not None:
                keys, values = k[rows], v[rows]
            else:
                assert kv is not None, "a sequence with cached context needs the KV pool"
                slots = meta.key_slots(b)
                keys, values = kv.k[self.layer][slots], kv.v[self.layer][slots]
            out[rows] = self.attend(q[rows], keys, values, ctx)
        return out

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, q_pos: int) -> torch.Tensor:
        """One sequence: queries at positions q_pos.. against all of its keys."""
        return gqa_attention(q, keys, values, q_pos, self.window)

    def decode(self, q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, max_len: int,
               meta: AttentionMetadata) -> torch.Tensor:
        """One new query per sequence (q [B, nh, hd]; its keys are 0 .. lens[b] in the pool through tables [B, nb]),
        all sequences' keys gathered into one padded batch and one SDPA call."""
        assert meta.kv is not None
        bs = meta.kv.block_size
        j = torch.arange(max_len, device=tables.device)
        slots = tables[:, j // bs] * bs + j % bs
        # padding repeats the sequence's first slot: never-written slots may hold NaN, and 0 * NaN poisons SDPA
        slots = torch.where(j.unsqueeze(0) < lens.unsqueeze(1), slots, slots[:, :1])
        B, L = slots.shape
        kc, vc = meta.kv.k[self.layer], meta.kv.v[self.layer]
        keys = kc.index_select(0, slots.reshape(-1)).view(B, L, *kc.shape[1:])
        values = vc.index_select(0, slots.reshape(-1)).view(B, L, *vc.shape[1:])
        return decode_attention(q, keys, values, lens - 1, self.window)
