"""An independent, functional rendering of the public reference `PixelFlowModel.forward` (eval mode),
written from its maths and run directly on a reference-format state dict. Tests compare our converted
model against it; it shares no code with pixelflow/."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def reference_state_dict(depth, heads, head_dim, patch, classes, text_dim=None, seed=0) -> dict[str, torch.Tensor]:
    """Random weights under the reference's key names and shapes."""
    g = torch.Generator().manual_seed(seed)
    d = heads * head_dim

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    sd = {
        "patch_embed.proj.weight": w(d, 3, patch, patch),
        "patch_embed.proj.bias": w(d),
        "timestep_embedder.linear_1.weight": w(d, 256),
        "timestep_embedder.linear_1.bias": w(d),
        "timestep_embedder.linear_2.weight": w(d, d),
        "timestep_embedder.linear_2.bias": w(d),
        "latent_size_embedder.linear_1.weight": w(d, 256),
        "latent_size_embedder.linear_1.bias": w(d),
        "latent_size_embedder.linear_2.weight": w(d, d),
        "latent_size_embedder.linear_2.bias": w(d),
        "proj_out_1.weight": w(2 * d, d),
        "proj_out_1.bias": w(2 * d),
        "proj_out_2.weight": w(patch * patch * 3, d),
        "proj_out_2.bias": w(patch * patch * 3),
    }
    if classes:
        sd["class_embedder.embedding_table.weight"] = w(classes + 1, d)
    for i in range(depth):
        b = f"transformer_blocks.{i}."
        sd[b + "norm1.linear.weight"], sd[b + "norm1.linear.bias"] = w(6 * d, d), w(6 * d)
        attentions = [("attn1.", d)] + ([("attn2.", text_dim)] if text_dim else [])
        for name, kv in attentions:
            for proj, fan_in in (("q_proj", d), ("k_proj", kv), ("v_proj", kv), ("o_proj", d)):
                sd[b + name + proj + ".weight"], sd[b + name + proj + ".bias"] = w(d, fan_in), w(d)
            sd[b + name + "q_norm.weight"], sd[b + name + "k_norm.weight"] = 1 + w(d), 1 + w(d)
        if text_dim:
            sd[b + "norm2.weight"] = 1 + w(d)
        sd[b + "norm3.weight"] = 1 + w(d)
        sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = w(4 * d, d), w(4 * d)
        sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = w(d, 4 * d), w(d)
    return sd


def timestep_features(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / (half - 1))
    angles = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # flip_sin_to_cos


def reference_pos_embed(side: int, head_dim: int) -> torch.Tensor:
    """The pipeline's get_2d_rotary_pos_embed(...) stacked to (L, head_dim, 2)."""
    grid_h = np.linspace(0, side, side, endpoint=False, dtype=np.float32)
    grid_w = np.linspace(0, side, side, endpoint=False, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)

    def one_axis(dim, pos):
        freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32)[: dim // 2] / dim))
        angles = torch.outer(torch.from_numpy(pos), freqs)
        return angles.cos().repeat_interleave(2, 1), angles.sin().repeat_interleave(2, 1)

    cos_a, sin_a = one_axis(head_dim // 2, grid[0].reshape(-1))
    cos_b, sin_b = one_axis(head_dim // 2, grid[1].reshape(-1))
    return torch.stack([torch.cat([cos_a, cos_b], 1), torch.cat([sin_a, sin_b], 1)], -1)


def rotate(x, pos):  # x (B, H, L, D)
    cos, sin = pos[..., 0][None, None], pos[..., 1][None, None]
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], -1).flatten(3)
    return x * cos + rotated * sin


def rms(x, weight, eps=1e-6):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def attention(sd, prefix, xq, xkv, heads, pos, mask=None, cross=False):
    b, lq, _ = xq.shape
    lk = xkv.shape[1]
    q = rms(F.linear(xq, sd[prefix + "q_proj.weight"], sd[prefix + "q_proj.bias"]), sd[prefix + "q_norm.weight"])
    k = rms(F.linear(xkv, sd[prefix + "k_proj.weight"], sd[prefix + "k_proj.bias"]), sd[prefix + "k_norm.weight"])
    v = F.linear(xkv, sd[prefix + "v_proj.weight"], sd[prefix + "v_proj.bias"])
    q, k, v = (t.view(b, n, heads, -1).transpose(1, 2) for t, n in ((q, lq), (k, lk), (v, lk)))
    q = rotate(q, pos)
    if not cross:
        k = rotate(k, pos)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, lq, -1)
    return F.linear(out, sd[prefix + "o_proj.weight"], sd[prefix + "o_proj.bias"])


def reference_forward(
    sd,
    depth,
    heads,
    patch,
    hidden_states,
    timestep,
    class_labels,
    latent_size,
    pos_embed,
    encoder_hidden_states=None,
    encoder_attention_mask=None,
):
    b, c, h, w = hidden_states.shape
    x = F.conv2d(hidden_states.float(), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)

    def mlp2(prefix, features):
        hidden = F.silu(F.linear(features, sd[prefix + "linear_1.weight"], sd[prefix + "linear_1.bias"]))
        return F.linear(hidden, sd[prefix + "linear_2.weight"], sd[prefix + "linear_2.bias"])

    cond = mlp2("timestep_embedder.", timestep_features(timestep))
    if "class_embedder.embedding_table.weight" in sd:
        cond = cond + sd["class_embedder.embedding_table.weight"][class_labels]
    cond = cond + mlp2("latent_size_embedder.", timestep_features(latent_size))
    mask = None
    if encoder_attention_mask is not None:
        mask = ((1 - encoder_attention_mask.float()) * -10000.0)[:, None, None, :]
    for i in range(depth):
        p = f"transformer_blocks.{i}."
        mod = F.linear(F.silu(cond), sd[p + "norm1.linear.weight"], sd[p + "norm1.linear.bias"])[:, None]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        normed = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale_msa) + shift_msa
        x = x + gate_msa * attention(sd, p + "attn1.", normed, normed, heads, pos_embed)
        if p + "attn2.q_proj.weight" in sd:
            normed = rms(x, sd[p + "norm2.weight"])
            x = x + attention(sd, p + "attn2.", normed, encoder_hidden_states, heads, pos_embed, mask, cross=True)
        normed = rms(x, sd[p + "norm3.weight"]) * (1 + scale_mlp) + shift_mlp
        hidden = F.gelu(F.linear(normed, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]), approximate="tanh")
        x = x + gate_mlp * F.linear(hidden, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    shift, scale = F.linear(F.silu(cond), sd["proj_out_1.weight"], sd["proj_out_1.bias"]).chunk(2, dim=1)
    x = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    x = F.linear(x, sd["proj_out_2.weight"], sd["proj_out_2.bias"])
    x = x.reshape(b, h // patch, w // patch, patch, patch, 3)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, 3, h, w)
