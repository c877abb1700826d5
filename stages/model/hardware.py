"""What the stages that run inference over whole splits (cache-features, evaluate) ask of the
machine and record of it: whether the CPU computes in bf16 (params.yaml's cpu_bf16), the precision
of devices.autocast, and the device's name."""
import torch


def precision(device: torch.device, cpu_bf16: bool = False) -> str:
    """What autocast() computes in, as the stages record it."""
    return "bfloat16" if device.type == "cuda" or cpu_bf16 else "float32"


def bf16_on_cpu(setting) -> bool:
    """Whether inference on the CPU runs under bf16 autocast: params.yaml's cpu_bf16 (auto or false)."""
    return setting == "auto" and cpu_has_bf16()


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX), rather than emulating it."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"
