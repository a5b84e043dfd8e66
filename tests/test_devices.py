"""devices.py: --device, --amp auto on each kind of hardware (capability queries mocked), worker counts."""

import pytest
import torch

import devices
from errors import InputError


@pytest.mark.parametrize(
    "capability, expected",
    [((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)],
    ids=["V100", "T4", "A100", "H100"],
)
def test_auto_amp_on_gpus_follows_native_bf16_not_is_bf16_supported(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what V100/T4 answer too
    dtype, reason = devices.auto_amp(torch.device("cuda", 0))
    assert dtype == expected
    assert f"{capability[0]}.{capability[1]}" in reason
    assert devices.resolve_amp("auto", torch.device("cuda", 0)) == expected
    assert devices.resolve_amp("auto", torch.device("cuda", 0), training=False) == expected


@pytest.mark.parametrize(
    "flags, expected",
    [({"avx512f", "avx512_bf16"}, torch.bfloat16), ({"amx_bf16", "amx_tile"}, torch.bfloat16),
     ({"avx512f", "avx512bw"}, None), (set(), None)],
    ids=["avx512-bf16", "amx", "avx512-only", "unknown"],
)  # fmt: skip
def test_auto_amp_on_cpus_is_bf16_only_where_it_is_native(monkeypatch, flags, expected):
    monkeypatch.setattr(devices, "cpu_flags", lambda: flags)
    dtype, reason = devices.auto_amp(torch.device("cpu"))
    assert dtype == expected and reason.startswith("bf16" if expected else "off")
    assert devices.resolve_amp("auto", torch.device("cpu")) == expected
    assert devices.resolve_amp("auto", torch.device("cpu"), training=False) is None  # evaluation stays exact


def test_cpu_flags_reads_this_machine():
    flags = devices.cpu_flags()
    with open("/proc/cpuinfo") as handle:
        assert ("avx512_bf16" in flags) == ("avx512_bf16" in handle.read().split())


def test_explicit_amp_choices():
    cpu = torch.device("cpu")
    assert devices.resolve_amp("off", cpu) is None
    assert devices.resolve_amp("bf16", cpu) == torch.bfloat16
    with pytest.raises(InputError, match="--amp fp16 needs a CUDA device"):
        devices.resolve_amp("fp16", cpu)


def test_devices_resolve_to_the_local_gpu(monkeypatch):
    assert devices.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert devices.resolve_device("cuda", local_rank=3) == torch.device("cuda", 3)
    assert devices.resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert devices.resolve_device("cuda:2", local_rank=1) == torch.device("cuda", 2)
    with pytest.raises(InputError, match=r"--device cuda:4: this machine has 4 GPU\(s\), cuda:0 to cuda:3"):
        devices.resolve_device("cuda:4")
    with pytest.raises(InputError, match="local rank 4, and this machine has 4 GPU.*--nproc_per_node"):
        devices.resolve_device("auto", local_rank=4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="CUDA is not available"):
        devices.resolve_device("cuda")
    with pytest.raises(InputError, match="not a device name"):
        devices.resolve_device("gpu0")
    with pytest.raises(InputError, match="--device mps: not supported"):
        devices.resolve_device("mps")  # a torch device type this repository does not train on


def test_workers_are_capped_by_the_processes_on_this_machine(monkeypatch):
    monkeypatch.setattr(devices, "available_cpus", lambda: 16)
    assert devices.usable_workers(8, processes=1) == 8
    assert devices.usable_workers(8, processes=4) == 4  # 4 local processes share 16 CPUs
    assert devices.usable_workers(8, processes=32) == 0


def test_an_explicit_gpu_index_under_torchrun_is_refused(monkeypatch, tiny_demo_data, tmp_path, capsys):
    import train_triplet
    from tests.training_data import common_args

    monkeypatch.setenv("WORLD_SIZE", "2")
    args = [*common_args(tiny_demo_data, tmp_path / "run"), "--device", "cuda:0", "--epochs", "1"]
    assert train_triplet.main([str(a) for a in args]) == 2
    assert "would put every process on one GPU" in capsys.readouterr().err
