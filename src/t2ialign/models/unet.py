"""A small conditional UNet: v_theta(x_s, s, text) with cross-attention to the prompt's tokens.

Levels run at H, H/2, H/4, ...; each level has ``blocks`` residual blocks (time-conditioned by
scale and shift) and, at the levels in ``attn_levels``, self-attention over positions and
cross-attention to the text tokens. Counting and binding need global context, so the lowest levels
attend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class UNetConfig:
    in_channels: int = 3
    channels: tuple[int, ...] = (32, 64, 96)  # per level, level 0 at full resolution
    blocks: int = 1  # residual blocks per level (down path; the up path has blocks + 1)
    attn_levels: tuple[int, ...] = (1, 2)
    heads: int = 4
    text_dim: int = 64
    groups: int = 8


def timestep_embedding(s: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the noise level s in [0, 1] (scaled by 1000): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=s.device, dtype=torch.float32) / half)
    args = 1000.0 * s.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(tdim, 2 * cout)
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(t))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Self-attention over positions, then cross-attention to the text tokens."""

    def __init__(self, c: int, text_dim: int, heads: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, c), c)
        self.self_attn = nn.MultiheadAttention(c, heads, batch_first=True)
        self.norm2 = nn.GroupNorm(min(groups, c), c)
        self.cross_attn = nn.MultiheadAttention(c, heads, kdim=text_dim, vdim=text_dim, batch_first=True)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm1(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        x = x + self.self_attn(h, h, h, need_weights=False)[0].transpose(1, 2).reshape(B, C, H, W)
        h = self.norm2(x).flatten(2).transpose(1, 2)
        a = self.cross_attn(h, ctx, ctx, key_padding_mask=~ctx_mask, need_weights=False)[0]
        return x + a.transpose(1, 2).reshape(B, C, H, W)


class UNet(nn.Module):
    """(x_s (B, C, H, W), s (B,), ctx (B, L, text_dim), ctx_mask (B, L)) -> v (B, C, H, W)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.channels
        tdim = 4 * ch[0]
        self.time = nn.Sequential(nn.Linear(ch[0], tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.ctx_pool = nn.Linear(cfg.text_dim, tdim)  # pooled prompt added to the time embedding
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        skips = [ch[0]]
        c = ch[0]
        for lvl, cl in enumerate(ch):
            for _ in range(cfg.blocks):
                blk = nn.ModuleList([ResBlock(c, cl, tdim, cfg.groups)])
                if lvl in cfg.attn_levels:
                    blk.append(AttnBlock(cl, cfg.text_dim, cfg.heads, cfg.groups))
                self.down.append(blk)
                c = cl
                skips.append(c)
            if lvl < len(ch) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(c, c, 3, stride=2, padding=1)]))
                skips.append(c)
        self.mid1 = ResBlock(c, c, tdim, cfg.groups)
        self.mid_attn = AttnBlock(c, cfg.text_dim, cfg.heads, cfg.groups)
        self.mid2 = ResBlock(c, c, tdim, cfg.groups)
        self.up = nn.ModuleList()
        for lvl in reversed(range(len(ch))):
            cl = ch[lvl]
            for i in range(cfg.blocks + 1):
                blk = nn.ModuleList([ResBlock(c + skips.pop(), cl, tdim, cfg.groups)])
                if lvl in cfg.attn_levels:
                    blk.append(AttnBlock(cl, cfg.text_dim, cfg.heads, cfg.groups))
                c = cl
                if lvl > 0 and i == cfg.blocks:
                    blk.append(nn.Upsample(scale_factor=2, mode="nearest"))
                    blk.append(nn.Conv2d(c, c, 3, padding=1))
                self.up.append(blk)
        self.norm_out = nn.GroupNorm(min(cfg.groups, c), c)
        self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _run_block(self, blk: nn.ModuleList, h, t, ctx, ctx_mask):
        for m in blk:
            if isinstance(m, ResBlock):
                h = m(h, t)
            elif isinstance(m, AttnBlock):
                h = m(h, ctx, ctx_mask)
            else:
                h = m(h)
        return h

    def forward(self, x_s: torch.Tensor, s: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor):
        m = ctx_mask.unsqueeze(-1).float()
        pooled = (ctx * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, text_dim)
        t = self.time(timestep_embedding(s, self.cfg.channels[0])) + self.ctx_pool(pooled)
        h = self.conv_in(x_s)
        hs = [h]
        for blk in self.down:
            h = self._run_block(blk, h, t, ctx, ctx_mask)
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, t), ctx, ctx_mask), t)
        for blk in self.up:
            h = self._run_block(blk, torch.cat([h, hs.pop()], dim=1), t, ctx, ctx_mask)
        return self.conv_out(F.silu(self.norm_out(h)))
