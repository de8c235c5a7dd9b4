"""The reference's SIM-O speaker model: WavLM + ECAPA-TDNN from UniSpeech's speaker verification
(`wavlm_large_finetune.pth`), loaded from that file.  Runs in the evaluation worker only (imports torch).

The file: `torch.save({"model": state_dict, ...})` of an ECAPA-TDNN whose front end is s3prl's WavLM upstream:
    feature_extract.model.<WavLM (unilm naming)>   the WavLM weights (feature_extractor.conv_layers.*,
                                                   layer_norm, post_extract_proj, encoder.pos_conv.0.weight_g/_v,
                                                   encoder.layers.N.self_attn.{q,k,v,out}_proj / grep_linear /
                                                   grep_a / relative_attention_bias, fc1, fc2, ...)
    feature_weight                                 softmax weights over WavLM's hidden states (layers + 1)
    layer1 .. layer4, conv, pooling, bn, linear    the ECAPA-TDNN (channels 512, embedding 256)
    loss_calculator.projection.weight              the training loss's (dropped, as the reference does)
Sizes (layers, width, heads, FFN, channels, embedding) are read from the tensor shapes, so a smaller model
saved in the same format loads too (the tests use a randomly initialised one).  WavLM runs as transformers'
`WavLMModel` with the weights renamed; its hidden states are s3prl's (the input of every layer, then the
encoder's normalised output).  The embedding of a clip: waveform at 16 kHz, normalised to zero mean and unit
variance (WavLM-large's `normalize`), WavLM hidden states, their learned weighted sum, instance norm, ECAPA.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PREFIX = "feature_extract.model."
DROPPED = ("loss_calculator.",)  # training-only tensors of the file
DROPPED_WAVLM = ("label_embs_concat", "final_proj.", "project_q.", "quantizer.")
CONV_KERNELS_STRIDES = ((10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2))  # wav2vec2-style front end
MAX_DISTANCE = 800  # WavLM's relative position range (not stored in the weights)


# --------------------------------------------------------------------------------------------- ECAPA-TDNN


class ConvReluBn(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int = 1, padding: int = 0, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, kernel, padding=padding, dilation=dilation)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.relu(self.conv(x)))


class Res2ConvReluBn(nn.Module):
    """Res2Net block: channel groups, each convolved after adding the previous group's result."""

    def __init__(self, channels: int, kernel: int, padding: int, dilation: int, scale: int):
        super().__init__()
        self.width = channels // scale
        self.convs = nn.ModuleList(nn.Conv1d(self.width, self.width, kernel, padding=padding, dilation=dilation)
                                   for _ in range(scale - 1))  # fmt: skip
        self.bns = nn.ModuleList(nn.BatchNorm1d(self.width) for _ in range(scale - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = torch.split(x, self.width, dim=1)
        out, carry = [], None
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            carry = groups[i] if i == 0 else carry + groups[i]
            carry = bn(F.relu(conv(carry)))
            out.append(carry)
        out.append(groups[len(self.convs)])  # the last group passes through
        return torch.cat(out, dim=1)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, bottleneck: int):
        super().__init__()
        self.linear1 = nn.Linear(channels, bottleneck)
        self.linear2 = nn.Linear(bottleneck, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.linear2(F.relu(self.linear1(x.mean(dim=2)))))
        return x * gate.unsqueeze(2)


class SERes2Block(nn.Module):
    # attribute names are the file's (UniSpeech's module names)
    def __init__(self, channels: int, dilation: int, scale: int = 8, bottleneck: int = 128):
        super().__init__()
        self.Conv1dReluBn1 = ConvReluBn(channels, channels)
        self.Res2Conv1dReluBn = Res2ConvReluBn(channels, 3, dilation, dilation, scale)
        self.Conv1dReluBn2 = ConvReluBn(channels, channels)
        self.SE_Connect = SqueezeExcite(channels, bottleneck)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.SE_Connect(self.Conv1dReluBn2(self.Res2Conv1dReluBn(self.Conv1dReluBn1(x))))


class AttentiveStatsPool(nn.Module):
    def __init__(self, channels: int, attention: int = 128):
        super().__init__()
        self.linear1 = nn.Conv1d(channels, attention, 1)
        self.linear2 = nn.Conv1d(attention, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = torch.softmax(self.linear2(torch.tanh(self.linear1(x))), dim=2)
        mean = (alpha * x).sum(dim=2)
        var = (alpha * x * x).sum(dim=2) - mean * mean
        return torch.cat([mean, var.clamp(min=1e-9).sqrt()], dim=1)


class EcapaHead(nn.Module):
    """ECAPA-TDNN over weighted WavLM hidden states: [B, feat_dim, T] -> [B, emb_dim]."""

    def __init__(self, num_states: int, feat_dim: int, channels: int, pooled: int, emb_dim: int):
        super().__init__()
        self.feature_weight = nn.Parameter(torch.zeros(num_states))
        self.instance_norm = nn.InstanceNorm1d(feat_dim)
        self.layer1 = ConvReluBn(feat_dim, channels, kernel=5, padding=2)
        self.layer2 = SERes2Block(channels, dilation=2)
        self.layer3 = SERes2Block(channels, dilation=3)
        self.layer4 = SERes2Block(channels, dilation=4)
        self.conv = nn.Conv1d(channels * 3, pooled, 1)
        self.pooling = AttentiveStatsPool(pooled)
        self.bn = nn.BatchNorm1d(pooled * 2)
        self.linear = nn.Linear(pooled * 2, emb_dim)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """states: [num_states, B, T, feat_dim] (WavLM's hidden states)."""
        w = torch.softmax(self.feature_weight, dim=-1)[:, None, None, None]
        x = self.instance_norm((w * states).sum(dim=0).transpose(1, 2) + 1e-6)
        out2 = self.layer2(out1 := self.layer1(x))
        out3 = self.layer3(out2)
        out4 = self.layer4(out3)
        x = F.relu(self.conv(torch.cat([out2, out3, out4], dim=1)))
        return self.linear(self.bn(self.pooling(x)))


# --------------------------------------------------------------------------------------------- WavLM


def wavlm_key(name: str) -> str | None:
    """A WavLM weight's name in the file (unilm/s3prl, PREFIX removed) -> its name in transformers' WavLMModel
    (None: a training-only tensor)."""
    if name.startswith(DROPPED_WAVLM):
        return None
    rules = (
        (r"feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)", r"feature_extractor.conv_layers.\1.conv.\2"),
        (r"feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
        (r"feature_extractor\.conv_layers\.0\.2\.(weight|bias)", r"feature_extractor.conv_layers.0.layer_norm.\1"),
        (r"layer_norm\.(weight|bias)", r"feature_projection.layer_norm.\1"),
        (r"post_extract_proj\.(weight|bias)", r"feature_projection.projection.\1"),
        (r"mask_emb", "masked_spec_embed"),
        (r"encoder\.pos_conv\.0\.weight_g", "encoder.pos_conv_embed.conv.parametrizations.weight.original0"),
        (r"encoder\.pos_conv\.0\.weight_v", "encoder.pos_conv_embed.conv.parametrizations.weight.original1"),
        (r"encoder\.pos_conv\.0\.bias", "encoder.pos_conv_embed.conv.bias"),
        (r"encoder\.layer_norm\.(weight|bias)", r"encoder.layer_norm.\1"),
        (r"encoder\.layers\.(\d+)\.self_attn\.([qkv]_proj|out_proj)\.(weight|bias)", r"encoder.layers.\1.attention.\2.\3"),
        (r"encoder\.layers\.(\d+)\.self_attn\.grep_linear\.(weight|bias)", r"encoder.layers.\1.attention.gru_rel_pos_linear.\2"),
        (r"encoder\.layers\.(\d+)\.self_attn\.grep_a", r"encoder.layers.\1.attention.gru_rel_pos_const"),
        (r"encoder\.layers\.(\d+)\.self_attn\.relative_attention_bias\.weight", r"encoder.layers.\1.attention.rel_attn_embed.weight"),
        (r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", r"encoder.layers.\1.layer_norm.\2"),
        (r"encoder\.layers\.(\d+)\.fc1\.(weight|bias)", r"encoder.layers.\1.feed_forward.intermediate_dense.\2"),
        (r"encoder\.layers\.(\d+)\.fc2\.(weight|bias)", r"encoder.layers.\1.feed_forward.output_dense.\2"),
        (r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"encoder.layers.\1.final_layer_norm.\2"),
    )  # fmt: skip
    for pattern, target in rules:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, target, name)
    raise KeyError(name)


def wavlm_config(sd: dict[str, torch.Tensor]):
    """transformers' WavLMConfig for the WavLM weights in `sd` (file naming), sizes read from the shapes."""
    from transformers import WavLMConfig

    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
    convs = sorted({int(m.group(1)) for k in sd if (m := re.match(r"feature_extractor\.conv_layers\.(\d+)\.0\.weight", k))})
    kernels = tuple(int(sd[f"feature_extractor.conv_layers.{i}.0.weight"].shape[2]) for i in convs)
    if kernels != tuple(k for k, _ in CONV_KERNELS_STRIDES):
        raise ValueError(f"unexpected WavLM convolution kernels {kernels}, expected {[k for k, _ in CONV_KERNELS_STRIDES]}")
    dim = int(sd["encoder.layers.0.self_attn.k_proj.weight"].shape[0])
    heads = int(sd["encoder.layers.0.self_attn.relative_attention_bias.weight"].shape[1])
    pos = sd["encoder.pos_conv.0.weight_v"]
    return WavLMConfig(
        hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=int(sd["encoder.layers.0.fc1.weight"].shape[0]),
        conv_dim=tuple(int(sd[f"feature_extractor.conv_layers.{i}.0.weight"].shape[0]) for i in convs),
        conv_kernel=kernels, conv_stride=tuple(s for _, s in CONV_KERNELS_STRIDES),
        conv_bias="feature_extractor.conv_layers.0.0.bias" in sd,
        feat_extract_norm="layer" if "feature_extractor.conv_layers.0.2.1.weight" in sd else "group",
        do_stable_layer_norm=True,  # WavLM-large: layer norm first (pre-LN)
        num_conv_pos_embeddings=int(pos.shape[2]), num_conv_pos_embedding_groups=dim // int(pos.shape[1]),
        num_buckets=int(sd["encoder.layers.0.self_attn.relative_attention_bias.weight"].shape[0]),
        max_bucket_distance=MAX_DISTANCE, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        feat_proj_dropout=0.0, layerdrop=0.0, apply_spec_augment=False,
    )  # fmt: skip


def load_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The file's state dict ("model"), loaded without running arbitrary pickled code."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"{path}: expected a dict with a 'model' state dict (UniSpeech's wavlm_large_finetune.pth format)")
    return ckpt["model"]


class WavlmEcapa(nn.Module):
    def __init__(self, sd: dict[str, torch.Tensor], source: str = "the file"):
        super().__init__()
        from transformers import WavLMModel

        sd = {k: v for k, v in sd.items() if not k.startswith(DROPPED)}
        wavlm_sd = {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}
        head_sd = {k: v for k, v in sd.items() if not k.startswith(PREFIX)}
        if not wavlm_sd or "layer1.conv.weight" not in head_sd:
            raise ValueError(f"{source}: not a WavLM + ECAPA-TDNN state dict (no {PREFIX}* or layer1.* tensors)")
        self.wavlm = WavLMModel(wavlm_config(wavlm_sd))
        mapped = {}
        for k, v in wavlm_sd.items():
            try:
                target = wavlm_key(k)
            except KeyError:
                raise ValueError(f"{source}: unexpected WavLM tensor {PREFIX}{k}") from None
            if target is not None:
                mapped[target] = v
        self.wavlm.load_state_dict(mapped, strict=True)
        layer1 = head_sd["layer1.conv.weight"]
        self.head = EcapaHead(num_states=int(head_sd["feature_weight"].shape[0]), feat_dim=int(layer1.shape[1]),
                              channels=int(layer1.shape[0]), pooled=int(head_sd["conv.weight"].shape[0]),
                              emb_dim=int(head_sd["linear.weight"].shape[0]))  # fmt: skip
        self.head.load_state_dict(head_sd, strict=True)
        if self.head.feature_weight.shape[0] != self.wavlm.config.num_hidden_layers + 1:
            raise ValueError(f"{source}: feature_weight has {self.head.feature_weight.shape[0]} entries for "
                             f"{self.wavlm.config.num_hidden_layers} WavLM layers (expected layers + 1)")  # fmt: skip
        self.eval()

    @torch.no_grad()
    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """wave: [B, samples] at 16 kHz -> [B, emb_dim] (not normalised)."""
        wave = F.layer_norm(wave, wave.shape[-1:])  # WavLM-large's input normalisation
        states = self.wavlm(wave, output_hidden_states=True).hidden_states
        return self.head(torch.stack(states, dim=0))


class WavlmEcapaModel:
    """The evaluation worker's speaker model for --sim-model wavlm-ecapa."""

    def __init__(self, spec: dict[str, Any], device: str):
        self.device = torch.device(device)
        self.model = WavlmEcapa(load_checkpoint(spec["source"]), spec["source"]).to(self.device)
        self.details = {**spec["details"], "layers": self.model.wavlm.config.num_hidden_layers,
                        "hidden_size": self.model.wavlm.config.hidden_size,
                        "embedding": int(self.model.head.linear.out_features)}  # fmt: skip

    def embed(self, wave: np.ndarray, rate: int) -> np.ndarray:
        from .service import _resample

        x = torch.from_numpy(_resample(wave, rate)).to(self.device)[None]
        return self.model(x)[0].float().cpu().numpy()
