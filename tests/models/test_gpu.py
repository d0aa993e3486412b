"""GPU paths, on a machine with an NVIDIA GPU and NVML (skipped elsewhere).

Without a GPU the same code is covered by the absent-series tests: no NVML means no GPU
series at all. Here the readings come from the real device.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import httpx
import pytest

from autoscaler.sources import Load, PodMetrics
from models.config import ModelConfig
from models.runtime import ModelRuntime
from models.utilisation import GpuMonitor
from protocol.errors import ConfigError
from tests.support import bazaar_process, free_port, wait_until

pytestmark = pytest.mark.skipif(not GpuMonitor().available, reason="needs an NVIDIA GPU and NVML")

# Keeps the GPU busy for a while (torch ships on GPU machines; the product does not need it).
GPU_LOAD = """
import time, torch
x = torch.randn(8192, 8192, device="cuda")
end = time.time() + {seconds}
while time.time() < end:
    x = (x @ x).clamp_(-1, 1)
torch.cuda.synchronize()
"""


def test_nvml_reads_the_real_gpu() -> None:
    readings = GpuMonitor().read()
    assert readings
    for reading in readings:
        assert 0.0 <= reading.utilization <= 1.0
        assert 0 < reading.memory_used_bytes < reading.memory_total_bytes
        assert reading.name


def test_pod_exports_gpu_series_that_follow_load(demo_repository: Path, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["model-server", "--model-repository", str(demo_repository), "--model", "mlp"]
    with bazaar_process(
        [*args, "--port", str(port)], tmp_path / "pod.log", f"{url}/v2/health/ready"
    ):
        text = httpx.get(f"{url}/metrics").text
        assert 'bazaar_gpu_memory_total_bytes{gpu="0"' in text
        load = subprocess.Popen([sys.executable, "-c", GPU_LOAD.format(seconds=20)])
        try:
            wait_until(lambda: _gpu_utilization(url) > 0.5, 30, "GPU utilisation > 50 % under load")
            # The autoscaler's pod source reads the same signal into its Sample.
            with ThreadPoolExecutor(1) as thread:  # its own event loop, off pytest's
                pod_load = thread.submit(asyncio.run, _autoscaler_reading(url)).result()
            assert pod_load.gpu_utilization is not None
            assert pod_load.gpu_utilization > 0.5
            assert pod_load.busy_ratio is not None
        finally:
            load.kill()
            load.wait()


async def _autoscaler_reading(url: str) -> Load:
    async with aiohttp.ClientSession() as session:
        return await PodMetrics(session=session).read("mlp", [url])


def _gpu_utilization(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith('bazaar_gpu_utilization_ratio{gpu="0"'):
            return float(line.rsplit(" ", 1)[1])
    return -1.0


def test_without_the_cuda_provider_auto_falls_back_and_cuda_says_why(demo_repository: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime build has CUDA: the fallback cannot be shown")
    path = demo_repository / "mlp" / "1" / "model.onnx"
    runtime = ModelRuntime("mlp", 1, path, ModelConfig(device="auto"))
    try:
        assert runtime.providers == ["CPUExecutionProvider"]
    finally:
        runtime.close()
    with pytest.raises(ConfigError, match="CUDAExecutionProvider"):
        ModelRuntime("mlp", 1, path, ModelConfig(device="cuda"))
