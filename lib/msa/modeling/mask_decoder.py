"""MSA on SAM's mask decoder: three adapters in the first two-way block; batches kept apart."""

from __future__ import annotations

import torch
from segment_anything.modeling.mask_decoder import MaskDecoder
from segment_anything.modeling.transformer import TwoWayAttentionBlock
from torch import nn

from .adapter import Adapter, AdapterConfig


class MSATwoWayBlock(nn.Module):
    """SAM's first two-way attention block with the paper's three decoder adapters.

    prompt_adapter: after the prompt-to-image cross attention; the prompt embedding (the block's
                    query positional input, i.e. the prompt tokens) is compressed by a second
                    down-projection and added before the activation.
    mlp_adapter:    parallel to the MLP, scaled by s.
    image_adapter:  after the image-to-prompt cross attention residual, then a residual add and
                    the block's own layer norm (norm4), so a zero adapter leaves the block unchanged.
    """

    def __init__(self, block: TwoWayAttentionBlock, config: AdapterConfig) -> None:
        super().__init__()
        for name in ("self_attn", "norm1", "cross_attn_token_to_image", "norm2", "mlp", "norm3",
                     "norm4", "cross_attn_image_to_token"):
            setattr(self, name, getattr(block, name))
        self.skip_first_layer_pe = block.skip_first_layer_pe
        dim = block.norm1.normalized_shape[0]
        self.mlp_scale = config.mlp_scale
        self.prompt_adapter = Adapter(dim, config, skip=True, prompt_dim=dim)
        self.mlp_adapter = Adapter(dim, config, skip=False)
        self.image_adapter = Adapter(dim, config, skip=True)

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)

        q, k = queries + query_pe, keys + key_pe
        attn_out = self.cross_attn_token_to_image(q=q, k=k, v=keys)
        queries = self.norm2(queries + self.prompt_adapter(attn_out, prompt=query_pe))

        queries = self.norm3(queries + self.mlp(queries) + self.mlp_scale * self.mlp_adapter(queries))

        q, k = queries + query_pe, keys + key_pe
        keys = keys + self.cross_attn_image_to_token(q=k, k=q, v=queries)
        keys = self.norm4(self.image_adapter(keys))
        return queries, keys


class MSAMaskDecoder(nn.Module):
    """SAM's MaskDecoder with MSATwoWayBlock first; same attribute names, so checkpoints load.

    Unlike SAM's decoder, a batch of B embeddings pairs with a batch of B prompt sets one to one
    (SAM repeats each embedding for every prompt, which mixes prompts across images). One
    embedding (B=1) may still be shared by many prompts.
    """

    def __init__(self, decoder: MaskDecoder, config: AdapterConfig) -> None:
        super().__init__()
        self.transformer_dim = decoder.transformer_dim
        self.transformer = decoder.transformer
        self.transformer.layers[0] = MSATwoWayBlock(self.transformer.layers[0], config)
        self.num_multimask_outputs = decoder.num_multimask_outputs
        self.iou_token, self.num_mask_tokens, self.mask_tokens = (
            decoder.iou_token, decoder.num_mask_tokens, decoder.mask_tokens)
        self.output_upscaling = decoder.output_upscaling
        self.output_hypernetworks_mlps = decoder.output_hypernetworks_mlps
        self.iou_prediction_head = decoder.iou_prediction_head

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embeddings (B or 1, C, h, w); sparse (B, N, C); dense (B, C, h, w).

        Returns mask logits (B, M, 4h, 4w) and predicted IoU (B, M), M = 3 if multimask_output else 1.
        """
        b = sparse_prompt_embeddings.shape[0]
        if image_embeddings.shape[0] not in (1, b):
            raise ValueError(f"{image_embeddings.shape[0]} image embeddings for {b} prompt sets")
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings], dim=1)

        src = image_embeddings.expand(b, -1, -1, -1) + dense_prompt_embeddings
        pos_src = image_pe.expand(b, -1, -1, -1)
        _, c, h, w = src.shape
        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        upscaled = self.output_upscaling(src.transpose(1, 2).view(b, c, h, w))
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        _, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
        iou_pred = self.iou_prediction_head(iou_token_out)

        picked = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, picked], iou_pred[:, picked]
