"""Image-to-video pipeline: conditioning, dual-expert sampling, decoding, video files, demo.

Submodules are imported on use; ``turbowan.I2VPipeline`` is the public entry point.
"""
