"""The training half: mixed DFT/synthetic sampling, losses, knowledge distillation and the student loop."""
