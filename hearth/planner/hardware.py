"""Accelerator catalogue (memory, bandwidth, dense FLOP/s, each with its source) and `auto`: this machine, with
memory read bandwidth measured by a short probe and cached under $HEARTH_HOME. torch is imported only to find a GPU."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import platform
import threading
import time
from dataclasses import dataclass, field

from hearth.config import hearth_home

logger = logging.getLogger(__name__)

GiB, TB, TFLOPS = 1 << 30, 1e12, 1e12


@dataclass(slots=True)
class Hardware:
    """One device, or `devices` identical ones (tensor parallel: memory, bandwidth and FLOP/s add up)."""

    name: str
    kind: str  # "gpu" | "apple" | "npu" | "cpu"
    memory_bytes: int
    bandwidth: float  # bytes/s
    flops: dict[str, float]  # dense FLOP/s by compute type: "bf16", "fp8", "fp4"
    source: str
    devices: int = 1
    note: str = ""
    host_memory_bytes: int = 0  # auto: CPU RAM beside a GPU, for offload advice
    extra: dict[str, object] = field(default_factory=dict)

    def scaled(self, devices: int) -> Hardware:
        """`devices` of this device (an 8× node); a scaled entry scales from its single-device values."""
        if devices < 1:
            raise ValueError(f"--devices must be at least 1, got {devices}")
        one = self.devices
        return dataclasses.replace(
            self, memory_bytes=self.memory_bytes // one * devices, bandwidth=self.bandwidth / one * devices,
            flops={k: v / one * devices for k, v in self.flops.items()}, devices=devices,
        )  # fmt: skip

    @property
    def label(self) -> str:
        return self.name if self.devices == 1 else f"{self.devices}× {self.name}"


def _gpu(name: str, mem_gb: float, tb_s: float, bf16: float, fp8: float = 0, fp4: float = 0, source: str = "",
         kind: str = "gpu", note: str = "") -> Hardware:  # fmt: skip
    # NOTE: GPU/unified memory is marketed in "GB" but sized in GiB (an H100 80GB reports 81559 MiB), so × 2^30.
    flops = {k: v * TFLOPS for k, v in (("bf16", bf16), ("fp8", fp8), ("fp4", fp4)) if v}
    return Hardware(name, kind, int(mem_gb * GiB), tb_s * TB, flops, source, note=note)


_APPLE_NOTE = "macOS lets the GPU wire about 75% of unified memory by default (raise with sysctl iogpu.wired_limit_mb)"
# Dense (no sparsity) tensor throughput. Values as of 2025; GeForce figures are with FP32 accumulate.
CATALOGUE: dict[str, Hardware] = {h.name.lower().replace(" ", "-"): h for h in [
    _gpu("H100", 80, 3.35, 989, 1979, source="NVIDIA H100 Tensor Core GPU datasheet (H100 SXM5 80GB)"),
    _gpu("H200", 141, 4.8, 989, 1979, source="NVIDIA H200 Tensor Core GPU datasheet (H200 SXM)"),
    _gpu("B200", 180, 8.0, 2250, 4500, 9000, source="NVIDIA DGX B200 datasheet (1440 GB, 64 TB/s per 8 GPUs; dense)"),
    _gpu("A100-40GB", 40, 1.555, 312, source="NVIDIA A100 Tensor Core GPU datasheet (A100 40GB SXM)"),
    _gpu("A100-80GB", 80, 2.039, 312, source="NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM)"),
    _gpu("L40S", 48, 0.864, 362, 733, source="NVIDIA L40S GPU datasheet"),
    _gpu("RTX 3090", 24, 0.936, 71, source="NVIDIA Ampere GA102 GPU architecture whitepaper (RTX 3090)"),
    _gpu("RTX 4090", 24, 1.008, 165.2, 330.3, source="NVIDIA Ada GPU architecture whitepaper (RTX 4090)"),
    _gpu("RTX 5090", 32, 1.792, 209.5, 419, 838, source="NVIDIA RTX Blackwell GPU architecture whitepaper (RTX 5090)"),
    _gpu("MI300X", 192, 5.3, 1307.4, 2614.9, source="AMD Instinct MI300X accelerator data sheet"),
    # Apple: GPU FP32-rate FLOP/s (cores × 128 ALUs × 2 × clock); bf16 runs at that rate on the GPU.
    _gpu("M3 Max", 128, 0.4, 16.4, source="Apple M3 Max announcement, Oct 2023 (40-core GPU, 128GB, 400GB/s)",
         kind="apple", note=_APPLE_NOTE),
    _gpu("M4 Max", 128, 0.546, 18.4, source="Apple M4 Max announcement, Oct 2024 (40-core GPU, 128GB, 546GB/s)",
         kind="apple", note=_APPLE_NOTE),
    _gpu("M2 Ultra", 192, 0.8, 27.2, source="Apple M2 Ultra announcement, Jun 2023 (76-core GPU, 192GB, 800GB/s)",
         kind="apple", note=_APPLE_NOTE),
    _gpu("Ascend 910B", 64, 1.6, 313, source="Huawei Ascend 910B: public spec summaries (no official datasheet; "
         "910B3 figures, approximate)", kind="npu"),  # fmt: skip
]}  # fmt: skip
ALIASES = {"h100-80gb": "h100", "h100-sxm": "h100", "a100": "a100-80gb", "3090": "rtx-3090", "4090": "rtx-4090",
           "5090": "rtx-5090", "910b": "ascend-910b", "m3-max": "m3-max", "mi300": "mi300x"}  # fmt: skip


def hardware_names() -> list[str]:
    return [*CATALOGUE, "auto"]


def get_hardware(name: str = "auto", devices: int = 1) -> Hardware:
    """A catalogue entry by name (case-insensitive, spaces or dashes), or `auto` for this machine."""
    key = name.lower().replace(" ", "-").replace("_", "-")
    if key == "auto":
        hw = auto_hardware()
    else:
        key = ALIASES.get(key, key)
        if key not in CATALOGUE:
            raise ValueError(f"unknown hardware {name!r} (known: {', '.join(hardware_names())})")
        hw = CATALOGUE[key]
    return hw if devices == 1 else hw.scaled(devices)


def ram_bytes() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _cpu_info() -> tuple[str, float, int]:
    """(model name, clock in GHz, fp32 FLOPs per cycle per core) from /proc/cpuinfo; defaults elsewhere."""
    model, ghz, flags = platform.processor() or platform.machine(), 2.5, ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value
                elif key == "cpu MHz" and ghz == 2.5:
                    ghz = float(value) / 1000 or 2.5
                elif key == "flags" and not flags:
                    flags = value
    except OSError:
        pass
    fl = flags.split()
    # two FMA pipes × vector width (fp32 lanes) × 2 FLOPs: AVX-512 64, AVX2 32; NEON / unknown 16
    per_cycle = 64 if "avx512f" in fl else 32 if "avx2" in fl and "fma" in fl else 16
    return model, ghz, per_cycle


def measure_read_bandwidth(seconds: float = 0.5, threads: int = 2, size: int = 256 << 20) -> float:
    """Best bytes/s read by `threads` threads each reducing its share of `size` bytes (well past the caches; numpy's
    max over uint64 releases the GIL and runs at memory speed), repeated for `seconds` and at least 3 times. Reads,
    as decode reads its weights: a copy also writes, which costs some machines more than others."""
    import numpy as np

    src = np.ones(size // 8, dtype=np.uint64)  # written, so its pages are resident before timing
    parts = np.array_split(src, threads)
    best, runs, deadline = 0.0, 0, time.perf_counter() + seconds
    while runs < 3 or time.perf_counter() < deadline:
        runs += 1
        start = time.perf_counter()
        workers = [threading.Thread(target=np.max, args=(p,)) for p in parts]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, size / (time.perf_counter() - start))
    return best


def _gpu_probe() -> dict | None:
    """The first CUDA/ROCm GPU through torch, with a device-copy bandwidth probe; None without torch or a GPU."""
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    x = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        y.copy_(x)
    torch.cuda.synchronize()
    bandwidth = 2 * x.numel() * reps / (time.perf_counter() - start)
    del x, y
    match = next((h for h in CATALOGUE.values() if h.kind == "gpu" and h.name.lower() in props.name.lower()), None)
    flops = dict(match.flops) if match else {}
    return {"name": props.name, "memory_bytes": props.total_memory, "bandwidth": bandwidth, "flops": flops,
            "count": torch.cuda.device_count()}  # fmt: skip


PROBE_VERSION = 2  # 2: CPU read probe (1 measured copies); a cache from another version is probed again


def _fingerprint() -> str:
    model, _, _ = _cpu_info()
    return f"{platform.node()}|{model}|{os.cpu_count()}|{ram_bytes()}|probe {PROBE_VERSION}"


def auto_hardware(refresh: bool = False) -> Hardware:
    """This machine: its GPU if torch sees one, else its CPU and RAM. Probes are cached in $HEARTH_HOME."""
    cache = os.path.join(hearth_home(), "hardware.json")
    fp = _fingerprint()
    if not refresh and os.path.isfile(cache):
        try:
            with open(cache, encoding="utf-8") as f:
                data = json.load(f)
            if data.get("fingerprint") == fp:
                return Hardware(**data["hardware"])
        except (OSError, ValueError, TypeError, KeyError):
            logger.debug("ignoring unreadable hardware cache %s", cache)
    hw = _probe()
    try:
        os.makedirs(hearth_home(), exist_ok=True)
        with open(cache, "w", encoding="utf-8") as f:
            json.dump({"fingerprint": fp, "hardware": dataclasses.asdict(hw)}, f, indent=1)
    except OSError:
        logger.debug("cannot write hardware cache %s", cache)
    return hw


def _probe() -> Hardware:
    model, ghz, per_cycle = _cpu_info()
    cores, ram = os.cpu_count() or 1, ram_bytes()
    threads = min(2, cores)
    gpu = None
    try:
        gpu = _gpu_probe()
    except Exception:  # a broken driver must not break `plan`
        logger.debug("GPU probe failed", exc_info=True)
    if gpu:
        source = f"this machine: torch device properties, device copy probe ({gpu['count']} GPU(s) seen, planning 1)"
        if not gpu["flops"]:
            source += "; FLOP/s unknown for this GPU, prefill estimate omitted"
        return Hardware(gpu["name"], "gpu", gpu["memory_bytes"], gpu["bandwidth"], gpu["flops"], source,
                        host_memory_bytes=ram, extra={"cpu": model, "cores": cores})  # fmt: skip
    bandwidth = measure_read_bandwidth(threads=threads)
    flops = cores * ghz * 1e9 * per_cycle
    source = (f"this machine: MemTotal, numpy read probe ({threads} threads, 0.5 s), FLOP/s = {cores} cores × "
              f"{ghz:.2f} GHz × {per_cycle} fp32 FLOPs/cycle")  # fmt: skip
    return Hardware(f"{model} ({cores} cores)", "cpu", ram, bandwidth, {"bf16": flops}, source,
                    host_memory_bytes=ram, extra={"cores": cores})  # fmt: skip
