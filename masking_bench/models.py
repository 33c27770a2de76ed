"""The ViT encoder (timm blocks, fused attention, fixed 2-D sin-cos positions) and the two MIM heads.

``method="mae"``: the encoder sees only visible tokens; a light decoder re-inserts a learned mask
token and predicts normalised pixels of hidden patches (He et al. 2021; docs/strategies.md §1.3, §1.4).
``method="simmim"``: hidden patch embeddings are replaced by a learned mask token inside the
encoder; a linear head predicts raw pixels, L1 on hidden pixels (Xie et al. 2021; docs/strategies.md §1.4).

A strategy's :class:`~masking_bench.masking.MaskPlan` drives both: its boolean mask (True = hidden)
may have a different count per sample — the MAE encoder then pads to the batch's largest visible
set and blocks padded keys with an attention mask, so a hidden patch is never visible (docs/strategies.md §1.5).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from .errors import BenchError

# name -> encoder width/depth/heads and MAE decoder width/depth/heads
PRESETS: dict[str, dict] = {
    # ≈0.86M parameters: the size measured in the developers' guide (28x28, patch 4 -> 7x7 tokens)
    "cpu-tiny": dict(
        patch_size=4, embed_dim=128, depth=4, num_heads=4, decoder_dim=64, decoder_depth=1, decoder_heads=4
    ),
    "cpu-small": dict(
        patch_size=4, embed_dim=192, depth=6, num_heads=3, decoder_dim=128, decoder_depth=2, decoder_heads=4
    ),
    "vit-tiny": dict(
        patch_size=16, embed_dim=192, depth=12, num_heads=3, decoder_dim=256, decoder_depth=4, decoder_heads=8
    ),
    "vit-small": dict(
        patch_size=16, embed_dim=384, depth=12, num_heads=6, decoder_dim=256, decoder_depth=4, decoder_heads=8
    ),
    "vit-base": dict(
        patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_dim=512, decoder_depth=8, decoder_heads=16
    ),
    "vit-large": dict(
        patch_size=16, embed_dim=1024, depth=24, num_heads=16, decoder_dim=512, decoder_depth=8, decoder_heads=16
    ),
}
METHODS = ("mae", "simmim")


@contextmanager
def explicit_attention(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, every timm attention layer of ``model`` computes softmax(q kᵀ) v explicitly
    instead of calling SDPA; the previous choice is restored afterwards.

    Used for bf16 autocast on CPU only: there SDPA's backward is ~15x slower than the explicit form
    at these token counts (docs/performance.md), while fp32 and CUDA keep fused SDPA.
    """
    layers = [m for m in model.modules() if hasattr(m, "fused_attn")] if enabled else []
    saved = [m.fused_attn for m in layers]
    for m in layers:
        m.fused_attn = False
    try:
        yield
    finally:
        for m, flag in zip(layers, saved, strict=True):
            m.fused_attn = flag


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position table (grid_h*grid_w, dim): half the channels encode the row,
    half the column, each as sin/cos at geometrically spaced frequencies (as in MAE / MoCo v3)."""
    if dim % 4:
        raise BenchError(f"embedding width {dim} must be a multiple of 4 for 2-D sin-cos positions")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    # column (w) first then row (h), matching the MAE table layout
    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), tokens row-major, pixels (p, p, C) inside a token."""
    n, c, h, w = imgs.shape
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, p: int, c: int, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    n = tokens.shape[0]
    h, w = grid
    x = tokens.reshape(n, h, w, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(n, c, h * p, w * p)


@dataclass
class ModelOutput:
    """What one MIM forward returns: per-token pixel predictions and what produced them."""

    pred: torch.Tensor  # (N, L, p*p*C)
    mask: torch.Tensor  # (N, L) bool, True = hidden
    attention: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (N, heads, T, T) probs
    attention_logits: dict[int, torch.Tensor] = field(default_factory=dict)


def _neg_inf_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean 'may attend' -> additive mask (0 / -inf) that works in fused and explicit attention."""
    out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return out.masked_fill(~allowed, float("-inf"))


class MIMViT(nn.Module):
    """A ViT encoder plus the pre-training head of one MIM method (``mae`` or ``simmim``)."""

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
        method: str = "mae",
        norm_pix_loss: bool = True,
        drop_path: float = 0.0,
    ):
        super().__init__()
        if method not in METHODS:
            raise BenchError(f"unknown MIM method '{method}': accepted are {', '.join(METHODS)}")
        if img_size % patch_size:
            raise BenchError(f"image size {img_size} is not a multiple of patch size {patch_size}")
        self.method = method
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.embed_dim = embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        pos = sincos_pos_embed_2d(embed_dim, *self.grid)
        self.register_buffer("pos_embed", torch.cat([torch.zeros(1, embed_dim), pos])[None], persistent=False)
        dpr = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=dpr[i]) for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        out_dim = patch_size * patch_size * in_chans
        if method == "mae":
            self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
            dpos = sincos_pos_embed_2d(decoder_dim, *self.grid)
            self.register_buffer(
                "decoder_pos_embed", torch.cat([torch.zeros(1, decoder_dim), dpos])[None], persistent=False
            )
            self.decoder_blocks = nn.ModuleList(
                Block(decoder_dim, decoder_heads, mlp_ratio, qkv_bias=True) for _ in range(decoder_depth)
            )
            self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
            self.head = nn.Linear(decoder_dim, out_dim)
        else:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            self.head = nn.Linear(embed_dim, out_dim)  # = SimMIM's 1x1 conv + PixelShuffle
        self._init_weights()

    # ----------------------------------------------------------------------------------- setup
    def _init_weights(self) -> None:
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Parameters of the encoder alone (what the evaluation keeps)."""
        mods = [self.patch_embed, self.blocks, self.norm]
        return [self.cls_token] + [p for m in mods for p in m.parameters()]

    # ---------------------------------------------------------------------------- encoder parts
    def embed(self, imgs: torch.Tensor) -> torch.Tensor:
        """Patch embeddings plus positions, (N, L, D), cls not appended (what SBAM's salience reads)."""
        return self.patch_embed(imgs) + self.pos_embed[:, 1:]

    def _with_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1)

    def _run_blocks(self, blocks, x, attn_mask, record: tuple[int, ...], out: ModelOutput | None):
        for i, blk in enumerate(blocks):
            if out is not None and i in record:
                x = self._block_with_probs(blk, x, attn_mask, i, out)
            else:
                x = blk(x, attn_mask=attn_mask)
        return x

    @staticmethod
    def _block_with_probs(blk: Block, x, attn_mask, index: int, out: ModelOutput):
        """A timm block computed with explicit attention so its logits/probabilities can be returned."""
        a = blk.attn
        h = blk.norm1(x)
        n, t, c = h.shape
        qkv = a.qkv(h).reshape(n, t, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)
        logits = (q * a.scale) @ k.transpose(-2, -1)
        masked = logits if attn_mask is None else logits + attn_mask
        probs = masked.softmax(dim=-1)
        out.attention_logits[index] = logits
        out.attention[index] = probs
        y = (a.attn_drop(probs) @ v).transpose(1, 2).reshape(n, t, c)
        y = a.proj_drop(a.proj(a.norm(y)))
        x = x + blk.drop_path1(blk.ls1(y))
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))

    def block_attention(self, imgs: torch.Tensor, index: int = 0) -> torch.Tensor:
        """Attention probabilities (N, heads, 1+L, 1+L) of encoder block ``index`` on all tokens (cls first)."""
        out = ModelOutput(pred=None, mask=None)  # type: ignore[arg-type]
        x = self._with_cls(self.embed(imgs))
        for i, blk in enumerate(self.blocks[: index + 1]):
            x = self._block_with_probs(blk, x, None, i, out) if i == index else blk(x)
        return out.attention[index]

    def forward_features(self, imgs: torch.Tensor, pool: str = "mean") -> torch.Tensor:
        """Frozen-feature view used by every evaluation: all tokens, no mask; ``mean`` or ``cls`` pooling."""
        x = self._with_cls(self.embed(imgs))
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x[:, 0] if pool == "cls" else x[:, 1:].mean(dim=1)

    # ------------------------------------------------------------------------------- MIM forward
    def forward(
        self,
        imgs: torch.Tensor,
        mask: torch.Tensor,
        isolate_mask_tokens: bool = False,
        record_attention: tuple[int, ...] = (),
    ) -> ModelOutput:
        """Encode ``imgs`` under ``mask`` (True = hidden) and predict every token's pixels.

        ``isolate_mask_tokens``: visible queries (and cls) may not attend to mask-token keys, in the
        layers where mask tokens exist (MTO's recalibration, docs/strategies.md §1.6). ``record_attention``: indices
        of the blocks holding mask tokens (encoder for simmim, decoder for mae) whose attention
        probabilities are returned for auxiliary losses.
        """
        if self.method == "mae":
            return self._forward_mae(imgs, mask, isolate_mask_tokens, record_attention)
        return self._forward_simmim(imgs, mask, isolate_mask_tokens, record_attention)

    def _isolation_mask(self, mask: torch.Tensor, dtype) -> torch.Tensor:
        """(N, 1, 1+L, 1+L) additive mask: a visible query (or cls) never attends to a hidden key."""
        n = mask.shape[0]
        hidden = torch.cat([torch.zeros(n, 1, dtype=torch.bool, device=mask.device), mask], dim=1)
        allowed = ~((~hidden)[:, :, None] & hidden[:, None, :])
        return _neg_inf_mask(allowed[:, None], dtype)

    def _forward_mae(self, imgs, mask, isolate, record) -> ModelOutput:
        out = ModelOutput(pred=None, mask=mask)  # type: ignore[arg-type]
        tokens = self.embed(imgs)
        n, length, d = tokens.shape
        visible = (~mask).sum(dim=1)
        k_max = int(visible.max())
        # visible tokens first, in index order (order is irrelevant: positions are already added)
        ids_keep = torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, :k_max]
        x = torch.gather(tokens, 1, ids_keep[..., None].expand(-1, -1, d))
        ragged = bool((visible != k_max).any())
        valid = torch.arange(k_max, device=mask.device)[None] < visible[:, None]
        attn_mask = None
        if ragged:  # key padding: a padded (hidden) token is never visible as a key (docs/strategies.md §1.5)
            keys = torch.cat([torch.ones(n, 1, dtype=torch.bool, device=mask.device), valid], dim=1)
            attn_mask = _neg_inf_mask(keys[:, None, None, :], x.dtype)
        x = self._run_blocks(self.blocks, self._with_cls(x), attn_mask, (), None)
        x = self.decoder_embed(self.norm(x))
        dd = x.shape[-1]
        mask_tok = self.mask_token.to(x.dtype)
        src = torch.where(valid[..., None], x[:, 1:], mask_tok) if ragged else x[:, 1:]
        full = mask_tok.expand(n, length, dd).scatter(1, ids_keep[..., None].expand(-1, -1, dd), src)
        y = torch.cat([x[:, :1], full], dim=1) + self.decoder_pos_embed
        dec_mask = self._isolation_mask(mask, y.dtype) if isolate else None
        y = self._run_blocks(self.decoder_blocks, y, dec_mask, record, out)
        out.pred = self.head(self.decoder_norm(y))[:, 1:]
        return out

    def _forward_simmim(self, imgs, mask, isolate, record) -> ModelOutput:
        out = ModelOutput(pred=None, mask=mask)  # type: ignore[arg-type]
        tokens = self.patch_embed(imgs)
        w = mask[..., None].to(tokens.dtype)
        tokens = tokens * (1 - w) + self.mask_token.to(tokens.dtype) * w
        x = self._with_cls(tokens + self.pos_embed[:, 1:])
        attn_mask = self._isolation_mask(mask, x.dtype) if isolate else None
        x = self._run_blocks(self.blocks, x, attn_mask, record, out)
        out.pred = self.head(self.norm(x))[:, 1:]
        return out

    # -------------------------------------------------------------------------------------- loss
    def reconstruction_loss(self, pred: torch.Tensor, target_imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean per-patch error over hidden patches, normalised by the batch's hidden count (docs/strategies.md §1.4).

        mae: MSE against per-patch normalised pixels (``norm_pix_loss``, unbiased var, eps 1e-6).
        simmim: L1 against the (dataset-normalised) pixels, as SimMIM's masked-pixel L1 / channels.
        """
        pred = pred.float()  # the loss and the target normalisation stay fp32 under bf16 autocast
        target = patchify(target_imgs, self.patch_size).float()
        if self.method == "mae":
            if self.norm_pix_loss:
                mean = target.mean(dim=-1, keepdim=True)
                var = target.var(dim=-1, keepdim=True)
                target = (target - mean) / (var + 1e-6) ** 0.5
            per_patch = ((pred - target) ** 2).mean(dim=-1)
        else:
            per_patch = (pred - target).abs().mean(dim=-1)
        m = mask.to(per_patch.dtype)
        return (per_patch * m).sum() / m.sum().clamp(min=1.0)


def build_model(preset: str, method: str, img_size: int, in_chans: int, **overrides) -> MIMViT:
    """A :class:`MIMViT` from a named preset; ``overrides`` replace preset fields (e.g. ``depth``)."""
    if preset not in PRESETS:
        raise BenchError(f"unknown model preset '{preset}': accepted are {', '.join(PRESETS)}")
    cfg = {**PRESETS[preset], **overrides}
    return MIMViT(img_size=img_size, in_chans=in_chans, method=method, **cfg)
