"""Independent PyTorch oracles for parity tests: diffusers' Wan transformer with tiny random configs."""

from __future__ import annotations

import numpy as np
import torch

from dfjax.config import WanConfig


def tiny_diffusers_transformer(cfg: WanConfig, seed: int = 0):
    """A diffusers WanTransformer3DModel of cfg's sizes with every weight random (no zero inits)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    m = WanTransformer3DModel(
        patch_size=cfg.patch, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=cfg.eps, rope_max_seq_len=cfg.rope_max_pos,
    ).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            scale = 0.5 if "norm" in name else 1.0 / np.sqrt(p.shape[-1])
            p.copy_(torch.randn_like(p) * scale + (1.0 if "norm" in name and "weight" in name else 0.0))
    return m


class MaskedSelfAttention:
    """Wraps diffusers' Wan attention processor to give self-attention a fixed boolean mask."""

    def __init__(self, inner, mask: torch.Tensor):
        self.inner, self.mask = inner, mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self.inner(attn, hidden_states, encoder_hidden_states, self.mask, rotary_emb)


def set_self_attention_mask(model, mask: np.ndarray) -> None:
    """mask [L, L] bool, True = may attend (query row, key column)."""
    m = torch.from_numpy(mask)[None, None]
    for blk in model.blocks:
        blk.attn1.set_processor(MaskedSelfAttention(blk.attn1.processor, m))


def diffusers_forward(model, x_cfhw: np.ndarray, t_per_frame: np.ndarray, context: np.ndarray, tokens_per_frame: int):
    """x [B, C, F, H, W], t [B, F] (repeated over each frame's tokens) -> flow [B, C, F, H, W]."""
    t_tok = np.repeat(t_per_frame, tokens_per_frame, axis=1)
    with torch.no_grad():
        out = model(hidden_states=torch.from_numpy(x_cfhw), timestep=torch.from_numpy(t_tok),
                    encoder_hidden_states=torch.from_numpy(context), return_dict=False)[0]
    return out.numpy()
