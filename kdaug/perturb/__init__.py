"""Teacher-labelled perturbations of existing frames: rattling and adversarial search."""
