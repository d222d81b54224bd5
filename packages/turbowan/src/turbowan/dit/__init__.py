"""The Wan2.2 I2V DiT (one expert): configuration, model, checkpoint loading."""
