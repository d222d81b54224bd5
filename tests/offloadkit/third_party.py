"""Real third-party models at tiny sizes: transformers and diffusers classes built from their
config objects with random weights (no downloads, no hub), and one input each.

Each builder returns ``(model, run)``: ``run(model)`` calls the model the way its library's
users do and returns one tensor, so a test can compare it bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Run = Callable[[torch.nn.Module], torch.Tensor]


def _tokens(vocab: int, length: int = 8) -> torch.Tensor:
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(3))


def _noise(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(4))


def _logits(vocab: int) -> Run:
    tokens = _tokens(vocab)
    return lambda model: model(input_ids=tokens).logits


def llama() -> tuple[torch.nn.Module, Run]:
    """Grouped-query attention: 4 query heads share 2 key/value heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval(), _logits(128)


def gpt2() -> tuple[torch.nn.Module, Run]:
    """The LM head's weight is the token embedding (tied)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=128, n_embd=32, n_layer=4, n_head=4, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval(), _logits(128)


def qwen2_moe() -> tuple[torch.nn.Module, Run]:
    """Mixture of experts: 4 routed experts (2 per token) and a shared expert per layer."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                            moe_intermediate_size=16, shared_expert_intermediate_size=32,
                            num_experts=4, num_experts_per_tok=2, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2)
    return Qwen2MoeForCausalLM(config).eval(), _logits(128)


def wan() -> tuple[torch.nn.Module, Run]:
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2,
                                  attention_head_dim=12, in_channels=4, out_channels=4,
                                  text_dim=16, freq_dim=32, ffn_dim=32, num_layers=4,
                                  rope_max_seq_len=32)
    latents, text = _noise(1, 4, 2, 4, 4), _noise(1, 5, 16)
    timestep = torch.tensor([500])
    return model.eval(), lambda m: m(hidden_states=latents, timestep=timestep,
                                     encoder_hidden_states=text).sample


def flux() -> tuple[torch.nn.Module, Run]:
    """Two block lists: double-stream ``transformer_blocks``, then ``single_transformer_blocks``."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2,
                                   num_single_layers=2, attention_head_dim=16,
                                   num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
    image, text, pooled = _noise(1, 16, 16), _noise(1, 6, 32), _noise(1, 32)
    image_ids, text_ids = torch.zeros(16, 3), torch.zeros(6, 3)
    image_ids[:, 1], image_ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    timestep = torch.tensor([0.5])
    return model.eval(), lambda m: m(hidden_states=image, encoder_hidden_states=text,
                                     pooled_projections=pooled, timestep=timestep,
                                     img_ids=image_ids, txt_ids=text_ids).sample


def unet() -> tuple[torch.nn.Module, Run]:
    """Blocks of very unequal size, lists of mixed block types (down/up), a mid block."""
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8)
    sample, text = _noise(1, 4, 8, 8), _noise(1, 5, 32)
    timestep = torch.tensor([10])
    return model.eval(), lambda m: m(sample, timestep, encoder_hidden_states=text).sample


def autoencoder_kl() -> tuple[torch.nn.Module, Run]:
    from diffusers import AutoencoderKL

    model = AutoencoderKL(block_out_channels=(16, 32), latent_channels=4, norm_num_groups=8,
                          down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2)
    image = _noise(1, 3, 16, 16)
    return model.eval(), lambda m: m(image, sample_posterior=False).sample


MODELS: dict[str, Callable[[], tuple[torch.nn.Module, Run]]] = {
    "llama": llama,
    "gpt2": gpt2,
    "qwen2_moe": qwen2_moe,
    "wan": wan,
    "flux": flux,
    "unet": unet,
}


def build(name: str, seed: int = 0) -> tuple[torch.nn.Module, Run]:
    torch.manual_seed(seed)
    return {**MODELS, "autoencoder_kl": autoencoder_kl}[name]()
