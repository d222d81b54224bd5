"""Wan2.1 causal video VAE: 8x spatial and 4x temporal compression to 16 latent channels.

Heavy imports stay in the submodules; ``turbowan.load_vae`` is the public entry point.
"""
