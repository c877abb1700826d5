"""Networks: pretrained backbones split into body and head (backbones), the device (devices),
running a model forward (inference)."""
