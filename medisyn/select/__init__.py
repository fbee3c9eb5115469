"""The select stage: FID per epoch checkpoint, the best one exported as a diffusers pipeline."""
