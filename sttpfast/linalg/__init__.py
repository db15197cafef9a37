"""Pure tensor math (no nn.Module): Householder frames, tensor-train helpers."""
