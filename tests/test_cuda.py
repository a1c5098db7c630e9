"""The model on a GPU (skipped where there is none): same numbers as on the CPU."""

from __future__ import annotations

import pytest
import torch

import msa

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_lite_medsam_tiny_on_cuda_matches_cpu(tmp_path, monkeypatch):
    """encode / decode on cuda match the CPU to atol 1e-3 (3D, non-zero adapters); adapter files
    saved from the GPU model load into a CPU model, on the CPU."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # full fp32 on the GPU too
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    cpu = msa.build_model("lite_medsam_tiny", three_d=True)
    with torch.no_grad():
        for module in cpu.modules():
            if isinstance(module, msa.Adapter):
                torch.nn.init.normal_(module.up.weight, std=0.02)
            if hasattr(module, "attention_biases"):
                module.attention_biases.normal_()
    gpu = msa.build_model("lite_medsam_tiny", three_d=True, device="cuda")
    gpu.load_state_dict(cpu.state_dict())  # into an eval model on the GPU: cached biases refreshed there
    cpu.load_state_dict(cpu.state_dict())  # (the in-place change above bypassed the CPU model's cache)
    assert gpu.device.type == "cuda" and not gpu.training
    assert all(p.is_cuda for p in gpu.parameters()) and all(b.is_cuda for b in gpu.buffers())
    images = torch.rand(3, 3, 256, 256) * 255
    points = (torch.tensor([[[60.0, 70.0], [200.0, 10.0]]] * 3), torch.tensor([[1, 0]] * 3))
    boxes = torch.tensor([[30.0, 40.0, 150.0, 200.0]] * 3)
    with torch.no_grad():
        expected_e = cpu.encode(images, depth=3)
        expected = cpu.decode(expected_e, points=points, boxes=boxes, multimask_output=True)
        got_e = gpu.encode(images.cuda(), depth=3)
        got = gpu.decode(got_e, points=tuple(t.cuda() for t in points), boxes=boxes.cuda(), multimask_output=True)
    assert got_e.is_cuda and got[0].is_cuda
    torch.testing.assert_close(got_e.cpu(), expected_e, atol=1e-3, rtol=0)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.cpu(), e, atol=1e-3, rtol=0)

    path = tmp_path / "adapters.pt"
    msa.save_adapters(gpu, path)
    fresh = msa.build_model("lite_medsam_tiny", three_d=True)
    fresh.load_state_dict({k: v for k, v in cpu.state_dict().items() if not cpu.is_trainable(k)}, strict=False)
    msa.load_adapters(fresh, path)
    assert all(v.device.type == "cpu" for v in fresh.state_dict().values())
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in cpu.state_dict().items())
