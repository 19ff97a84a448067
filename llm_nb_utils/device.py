"""Which device and precision a run really gets, decided once at the start and announced."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import SuiteError
from .memory import peak_rss_mb, reset_peak_rss


class DeviceError(SuiteError, RuntimeError):
    """No usable device for what was asked."""


@dataclass
class Precision:
    device: torch.device
    device_name: str
    dtype: str              # what actually runs: float32 | bfloat16 | float16
    autocast_dtype: torch.dtype | None
    use_grad_scaler: bool
    note: str               # why, when it differs from what was asked

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype,
                              enabled=self.autocast_dtype is not None)


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda":
        if not torch.cuda.is_available():
            build = torch.version.cuda or "CPU-only"
            raise DeviceError(
                f"device='cuda' was requested but no usable CUDA GPU is visible (torch {torch.__version__}, "
                f"{build} build). Fix: on Kaggle, Settings > Accelerator > GPU; on Colab, Runtime > Change "
                "runtime type > GPU; or run on the CPU with device=cpu (or device=auto) and a small preset.")
        check_gpu_supported()
        return torch.device("cuda")
    return torch.device("cpu")


def default_preset() -> tuple[str, str]:
    """The preset this machine can run: `paper` where a CUDA GPU is usable, else `small`; and why."""
    if not torch.cuda.is_available():
        return "small", (f"no usable CUDA GPU (torch {torch.__version__}, "
                         f"{'CUDA ' + torch.version.cuda if torch.version.cuda else 'a CPU-only'} build)")
    try:
        check_gpu_supported()
    except DeviceError as e:
        return "small", str(e).split(". Fix:")[0]
    return "paper", f"CUDA GPU {torch.cuda.get_device_name(0)}"


def check_gpu_supported(index: int = 0) -> None:
    """Refuse a GPU the installed torch has no kernels for (e.g. a P100, sm_60, under a new torch)."""
    major, minor = torch.cuda.get_device_capability(index)
    arch_list = torch.cuda.get_arch_list()
    if not arch_list:
        return
    sms = {int(a.split("_")[1]) for a in arch_list if a.startswith("sm_") and a.split("_")[1].isdigit()}
    ptx = {int(a.split("_")[1]) for a in arch_list if a.startswith("compute_") and a.split("_")[1].isdigit()}
    cap = major * 10 + minor
    # Same-major binaries run on later minors; PTX is JIT-compiled for any newer GPU.
    if any(s // 10 == major and s <= cap for s in sms) or any(p <= cap for p in ptx):
        return
    name = torch.cuda.get_device_name(index)
    raise DeviceError(
        f"this torch ({torch.__version__}) has no kernels for {name} (sm_{cap}); it was built for "
        f"{', '.join(arch_list)}. Fix: install a torch build that still supports sm_{cap} (e.g. "
        "pip install 'torch<2.8' for a P100 on Kaggle), or pick a T4 / newer GPU.")


def resolve_precision(requested_dtype: str, device: torch.device, force: bool = False) -> Precision:
    """bf16 where the GPU has it natively (capability >= 8.0), fp16 + GradScaler on older GPUs,
    fp32 on the CPU unless `force`. torch.cuda.is_bf16_supported() is not used: it also says yes
    for the emulated bf16 of a T4."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        native_bf16 = torch.cuda.get_device_capability(device)[0] >= 8
        if requested_dtype == "bfloat16" and not native_bf16:
            return Precision(device, name, "float16", torch.float16, True,
                             f"{name} has no native bfloat16: using float16 autocast with a gradient scaler")
        if requested_dtype == "bfloat16":
            return Precision(device, name, "bfloat16", torch.bfloat16, False, "")
        if requested_dtype == "float16":
            return Precision(device, name, "float16", torch.float16, True, "")
        return Precision(device, name, "float32", None, False, "")
    import platform
    name = platform.processor() or platform.machine() or "cpu"
    threads = torch.get_num_threads()
    name = f"CPU ({name}, {threads} thread{'' if threads == 1 else 's'})"
    if requested_dtype == "float32":
        return Precision(device, name, "float32", None, False, "")
    if force:
        # fp16 gradients underflow without loss scaling, on a CPU as on a P100: a forced fp16 run
        # takes the same GradScaler path as a GPU without native bf16.
        fp16 = requested_dtype == "float16"
        return Precision(device, name, requested_dtype, torch.float16 if fp16 else torch.bfloat16, fp16,
                         f"{requested_dtype} autocast on CPU (forced)")
    return Precision(device, name, "float32", None, False,
                     f"{requested_dtype} requested but this is a CPU: training in float32 (low precision "
                     "is emulated and much slower on most CPUs; set force_dtype=True to insist)")


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall-clock reading means what it says."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator statistics on a GPU, the process's RSS high-water mark on a CPU."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(MB, what was measured) since the last reset_peak_memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated_mb"
    return peak_rss_mb(), "process_peak_rss_mb"


def maybe_compile(model: torch.nn.Module, requested: bool, device: torch.device, log=print):
    """torch.compile when asked for and Triton can generate code for the GPU (capability >= 7.0)."""
    if not requested:
        return model
    if device.type != "cuda":
        log("compile=True ignored: torch.compile is only used on a CUDA GPU here")
        return model
    if torch.cuda.get_device_capability(device)[0] < 7:
        log(f"compile=True ignored: Triton does not support {torch.cuda.get_device_name(device)} (compute capability < 7.0)")
        return model
    return torch.compile(model)
