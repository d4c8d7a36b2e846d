"""The whole HunyuanImage-3.0 model: backbone, text head, image I/O modules, ViT and VAE.

`HunyuanImage3ForCausalMM` only composes the parts under the official attribute names (so its
`state_dict()` names are the checkpoint keys) and offers the per-phase entry points the engine calls:
token embeddings, condition-image tokens (VAE latents through `patch_embed` at t=0, SigLIP2 features
through the aligner), generated-image tokens for a timestep, the flat-batch backbone forward, text logits
(`ln_f` + `lm_head`, fp32) and the diffusion velocity (`final_layer` on the pre-`ln_f` hidden states).
Where embeddings are placed in a sequence is the caller's business (prompt spans), which keeps this class
free of any batching layout.

Tensor parallel (`parallel=ParallelContext(tp_size > 1)`, one process per rank): the backbone is sharded
(see `backbone`), `lm_head` is vocab-parallel (each rank computes its vocabulary slice; `logits` gathers the
full row on every rank). `patch_embed`, `final_layer`, the timestep / guidance embedders, the ViT + aligner and
the VAE run REPLICATED, whole, on every rank: they are small next to the 80B backbone (a few GB in all), they sit
outside the decoder's all-reduces, and given identical inputs (the plan every rank receives) every rank computes
the same embeddings / velocity / images itself, so no rank ever waits for a broadcast of activations; rank 0's
copy of the outputs (tokens, latents, images) is the one returned.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from diffgentor.engine.os_process import release_host_memory
from diffgentor.engine.parallel import ParallelContext
from diffgentor.kernels.attention import AttentionMetadata
from diffgentor.kernels.kv_cache import PagedKVCache

from .backbone import HunyuanImage3Backbone, MoEBlock, StepRows, keep_fp32_param
from .config import HunyuanImage3Config
from .image_embed import TimestepEmbedder, UNetDown, UNetUp
from .vae import AutoencoderKLConv3D, DiagonalGaussian
from .vision import VisionAligner, build_vision_tower, run_vision_tower
from .weights import fp8_expert_quantizer, hunyuan_key_transforms, hunyuan_shard_plan, load_state_into


def keep_fp32_for_model(name: str) -> bool:
    """Routers (official fp32 module) and the VAE (official config says fp32; it runs under fp16 autocast)."""
    return keep_fp32_param(name) or name.startswith("vae.")


class HunyuanImage3ForCausalMM(nn.Module):
    def __init__(
        self, config: HunyuanImage3Config, attn_backend: str = "torch", moe_impl: str | None = "eager",
        parallel: ParallelContext | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.parallel = parallel or ParallelContext()
        hidden = config.hidden_size
        self.model = HunyuanImage3Backbone(config, attn_backend=attn_backend, moe_impl=moe_impl, parallel=parallel)
        # vocab-parallel under tensor parallel: this rank's rows [local_vocab, H] of the checkpoint's lm_head
        self.lm_head = nn.Linear(hidden, len(self.parallel.vocab_range(config.vocab_size)), bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.wte.weight
        self.vae = AutoencoderKLConv3D(config.vae)
        if config.has_vision:
            self.vision_model = build_vision_tower(config.vit)
            self.vision_aligner = VisionAligner(config.vit_aligner)
        self.patch_embed = UNetDown.from_config(config)
        self.final_layer = UNetUp.from_config(config)
        self.timestep_emb = TimestepEmbedder(hidden)
        self.time_embed = TimestepEmbedder(hidden)
        self.time_embed_2 = TimestepEmbedder(hidden)
        if config.cfg_distilled:
            self.guidance_emb = TimestepEmbedder(hidden)
        if config.use_meanflow:
            self.timestep_r_emb = TimestepEmbedder(hidden)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        ckpt_dir: str | Path,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        attn_backend: str = "torch",
        moe_impl: str | None = "eager",
        parallel: ParallelContext | None = None,
        quantization: str | None = None,
    ) -> HunyuanImage3ForCausalMM:
        """Build from `config.json` and load every tensor strictly (any folder name, dots included).

        attn_backend / moe_impl name the kernel implementations (ModelConfig.attn_impl / moe_impl); the
        fast paths fall back to the torch references, with one warning, where the device cannot run them.
        parallel: this process's tensor / expert parallel rank (`engine.parallel.init_distributed`); the rank
        then reads only its slices of the big tensors. None: the single-process model.
        quantization: ModelConfig.quantization; "fp8" / "fp8_block" store the routed and shared expert weights
        as float8_e4m3fn (per-channel / 128x128 block scales), quantised tensor by tensor as they are read.
        """
        config = HunyuanImage3Config.from_pretrained(ckpt_dir)
        with torch.device("meta"):  # no memory until the loader assigns the checkpoint's tensors
            model = cls(config, attn_backend=attn_backend, moe_impl=moe_impl, parallel=parallel)
        load_state_into(
            model,
            ckpt_dir,
            dtype=dtype,
            device=device,
            keep_fp32=keep_fp32_for_model,
            key_transforms=hunyuan_key_transforms(config),
            shard_plan=hunyuan_shard_plan(config, parallel),
            quantize=fp8_expert_quantizer(quantization),
        )
        # Stack each layer's experts into the [E, ...] tensors the grouped kernels read now, layer by layer, and
        # hand the freed per-expert copies and loader temporaries back to the OS: stacking lazily at the first
        # forward held two copies of every expert at once and left the freed ones resident (measured in
        # bench/results/cpu-tp-memory.json: a TP=2 rank peaked at 0.84 of the single process instead of ~0.5).
        for layer in model.model.layers:
            stack = getattr(layer.mlp, "_stacked", None)
            if stack is not None:
                stack()
                release_host_memory()
        return model.eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.model.wte.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.wte.weight.device

    def tune_kernels(self, max_tokens: int, moe_workspace_bytes: int | None = None) -> int:
        """Start-up tuning of the kernels that profile their tactics (FlashInfer's fused MoE, once per process and
        weight shape) for steps of up to `max_tokens` tokens, and their one reused workspace (`moe_workspace_bytes`:
        the memory plan's size); the number of MoE layers that tuned."""
        return sum(m.tune(max_tokens, self.dtype, moe_workspace_bytes) for m in self.modules()
                   if isinstance(m, MoEBlock))

    def make_kv_cache(self, num_blocks: int, block_size: int) -> PagedKVCache:
        return self.model.make_kv_cache(num_blocks, block_size, device=self.device)

    # ------------------------------------------------------------------ embeddings
    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_tokens(input_ids)

    def timestep_tokens(self, t: Tensor) -> Tensor:
        """`<timestep>` slot embeddings for noise levels t (=1000*sigma; 0 for condition images)."""
        return self.timestep_emb(t).to(self.dtype)

    def guidance_tokens(self, g: Tensor) -> Tensor:
        return self.guidance_emb(g).to(self.dtype)

    def timestep_r_tokens(self, r: Tensor) -> Tensor:
        return self.timestep_r_emb(r).to(self.dtype)

    def image_tokens(self, latents: Tensor, t: Tensor) -> Tensor:
        """Latents [B, C, h, w] at noise level t [B] -> `<img>` slot embeddings [B, h*w, H]."""
        t_emb = self.time_embed(t)
        return self.patch_embed(latents.to(self.dtype), t_emb).to(self.dtype)

    def encode_condition_vae(self, pixels: Tensor) -> DiagonalGaussian:
        """VAE pixels [B, 3, H, W] in [-1, 1] -> the posterior (unscaled), fp16 autocast on CUDA."""
        autocast = getattr(torch, self.config.vae_autocast_dtype, torch.float16)
        return self.vae.encode(pixels.to(self.vae_dtype), autocast_dtype=autocast)

    def scale_latents(self, sample: Tensor) -> Tensor:
        """Posterior sample -> the model's latent space (shift then scale, as officially)."""
        shift = self.config.vae_shift_factor
        if shift:
            sample = sample - shift
        return sample * self.config.vae_scaling_factor

    def condition_vit_tokens(
        self, pixel_values: Tensor, pixel_attention_mask: Tensor, spatial_shapes: Tensor
    ) -> Tensor:
        """SigLIP2 NaFlex patches [B, P, 3*p*p] -> aligned `<img>` embeddings [B, P, H] (padding kept)."""
        feats = run_vision_tower(
            self.vision_model,
            pixel_values.to(self.vision_dtype),
            pixel_attention_mask,
            spatial_shapes,
        )
        return self.vision_aligner(feats).to(self.dtype)

    @property
    def vae_dtype(self) -> torch.dtype:
        return self.vae.decoder.conv_in.weight.dtype

    @property
    def vision_dtype(self) -> torch.dtype:
        return next(self.vision_model.parameters()).dtype

    # ------------------------------------------------------------------ backbone and heads
    def forward(
        self,
        hidden_states: Tensor,
        positions: Tensor,
        attn_metadata: AttentionMetadata,
        kv_cache: PagedKVCache,
    ) -> Tensor:
        """Flat batch of assembled embeddings [N, H] -> last hidden states [N, H] (no ln_f)."""
        return self.model(hidden_states, positions, attn_metadata, kv_cache)

    def forward_sequence_parallel(
        self, whole: StepRows | None, sharded: StepRows, kv_cache: PagedKVCache
    ) -> tuple[Tensor | None, Tensor]:
        """A forward whose `sharded` rows (denoising image blocks) are split over the sequence-parallel group while the
        `whole` rows run on every rank (`HunyuanImage3Backbone.forward_sequence_parallel`)."""
        return self.model.forward_sequence_parallel(whole, sharded, kv_cache)

    @property
    def sequence_parallel(self) -> bool:
        """Image steps are split over a sequence-parallel group (sequence_parallel_size > 1)."""
        return self.model.sp_attn is not None

    def logits(self, hidden_states: Tensor) -> Tensor:
        """Text logits (fp32) for hidden states [n, H] (the full vocabulary on every rank under tensor parallel)."""
        local = self.lm_head(self.model.final_norm(hidden_states)).float()
        if not self.parallel.is_parallel:
            return local
        return self.parallel.all_gather_last_dim(local, self.parallel.vocab_sizes(self.config.vocab_size))

    def velocity(self, image_hidden: Tensor, grid_hw: tuple[int, int], t: Tensor) -> Tensor:
        """Image-token hidden states [B, h*w, H] at noise level t [B] -> velocity [B, C, h, w] (fp32)."""
        t_emb = self.time_embed_2(t)
        return self.final_layer(image_hidden, grid_hw, t_emb).float()

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Model-space latents [B, C, h, w] -> the last decoded frame [B, 3, H, W] in [-1, 1] (fp32)."""
        z = latents / self.config.vae_scaling_factor
        shift = self.config.vae_shift_factor
        if shift:
            z = z + shift
        return self.vae.decode_image(z.to(self.vae_dtype), autocast_dtype=torch.float16).float()
