"""A plain MAE, written as the official ``models_mae.py`` is, to time the product's step against.

``bench``'s first figure is the product's training step over this reference's step at the same
size, batch and ratio: timm blocks, gather-based random masking, fp32, plain AdamW, no tricks.
Nothing in the product imports it; it exists to keep the comparison honest.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from .models import PRESETS, patchify, sincos_pos_embed_2d


class ReferenceMAE(nn.Module):
    """The official MAE model (facebookresearch/mae ``models_mae.py``) at a preset's size, written plainly.

    timm ``PatchEmbed`` and ``Block`` (LayerNorm eps 1e-6, qkv bias, timm's default attention), a
    frozen 2-D sin-cos position table, ``random_masking`` by argsort + ``gather``, a decoder that
    restores the token order with ``gather``, MSE on per-patch normalised pixels of hidden patches.
    """

    def __init__(
        self,
        img_size: int = 28,
        in_chans: int = 1,
        patch_size: int = 4,
        embed_dim: int = 128,
        depth: int = 4,
        num_heads: int = 4,
        decoder_dim: int = 64,
        decoder_depth: int = 1,
        decoder_heads: int = 4,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
    ):
        super().__init__()
        from timm.layers import PatchEmbed
        from timm.models.vision_transformer import Block

        norm = partial(nn.LayerNorm, eps=1e-6)
        self.patch_size, self.norm_pix_loss = patch_size, norm_pix_loss
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        pos = torch.cat([torch.zeros(1, embed_dim), sincos_pos_embed_2d(embed_dim, grid, grid)])[None]
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)
        )
        self.norm = norm(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        dpos = torch.cat([torch.zeros(1, decoder_dim), sincos_pos_embed_2d(decoder_dim, grid, grid)])[None]
        self.decoder_pos_embed = nn.Parameter(dpos, requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(decoder_depth)
        )
        self.decoder_norm = norm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size**2 * in_chans)
        torch.nn.init.normal_(self.cls_token, std=0.02)
        torch.nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def random_masking(self, x: torch.Tensor, mask_ratio: float):
        n, length, d = x.shape
        len_keep = int(length * (1 - mask_ratio))
        noise = torch.rand(n, length, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, d))
        mask = torch.ones([n, length], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return x_masked, mask, ids_restore

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75) -> torch.Tensor:
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio)
        cls = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls.expand(x.shape[0], -1, -1), x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x))
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:, :]
        target = patchify(imgs, self.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()


class ReferenceStep:
    """The plain MAE training step: forward, backward, AdamW (no clipping, no autocast), loss read-back.

    ``setup`` is a :class:`masking_bench.bench.BenchSetup` (device, dataset, preset, batch, ratio).
    """

    def __init__(self, setup, seed: int = 0):
        cfg = dict(PRESETS[setup.preset])
        torch.manual_seed(seed)
        ds = setup.dataset
        self.model = ReferenceMAE(img_size=ds.image_size, in_chans=ds.channels, **cfg).to(setup.device)
        decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.ndim < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
            lr=1.5e-4,
            betas=(0.9, 0.95),
        )
        self.ratio = setup.ratio
        self.x = setup.batch
        self.model.train()

    def __call__(self) -> float:
        loss = self.model(self.x, self.ratio)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()

    def flops_per_image(self) -> float:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            self.model(self.x, self.ratio).backward()
        self.model.zero_grad(set_to_none=True)
        return counter.get_total_flops() / self.x.shape[0]
