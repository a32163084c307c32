"""vats-vision: ViT-2D image and ViT-3D video encoders on vats-core."""
