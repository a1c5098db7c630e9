"""The OpenVINO encoder runtime (msa.runtime): the same embeddings and masks as PyTorch, exports named by
what they compute and kept on disk, built in the background for a server, and refusals that say why."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from msa.errors import MSAError

pytest.importorskip("openvino", reason="openvino is a dependency of msa: install the package")


def _randomise_adapters(model, scale: float = 0.05) -> None:
    """Non-zero adapters everywhere (space, MLP and depth): the export must carry them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_adapter." in name:
                p.normal_(0, scale)
    model.weights_changed()


@pytest.mark.parametrize("backbone", ["vit_tiny", "lite_medsam_tiny"])
@pytest.mark.parametrize("three_d", [False, True], ids=["2d", "3d"])
def test_openvino_embeddings_equal_pytorch(backbone, three_d, tiny_volume, tmp_path):
    """Every slice of a volume, 2D or in slabs (including the shorter last slab): within 1e-4 of PyTorch,
    with adapters and the depth branch non-zero, and cached under the runtime's own key."""
    import msa
    from msa.engine import Engine
    from msa.runtime import make_encoder

    model = msa.build_model(backbone, three_d=three_d, pretrained=False)
    _randomise_adapters(model)
    ks = list(range(tiny_volume.voxels.shape[0]))
    reference = Engine(model, slab_depth=4).embeddings(tiny_volume, ks)
    encoder = make_encoder(model, "openvino", export_dir=tmp_path)
    engine = Engine(model, slab_depth=4, encoder=encoder)
    out = engine.embeddings(tiny_volume, ks)
    assert engine.runtime_label == "openvino-fp32"
    assert engine.encoded_slices == len(ks)  # nothing came from a PyTorch-keyed entry
    scale = reference.abs().max().item()
    assert (out - reference).abs().max().item() < 1e-4 * max(scale, 1.0)
    # The depth branch is in the export: without it the 3D embeddings would equal the 2D ones.
    if three_d:
        flat = Engine(model, slab_depth=4).model.encode(engine.model_input(tiny_volume, ks[:4]), depth=1)
        assert (out[:4] - flat).abs().max().item() > 1e-3
    depths = {4, len(ks) % 4} - {0} if three_d else {1}
    assert all(encoder.ready(d) for d in depths)


def test_exports_are_kept_on_disk_and_named_by_the_adapters(tiny_model, tiny_volume, tmp_path, monkeypatch):
    """A second encoder on the same folder loads the export instead of tracing again; other adapter
    weights get another export (never a stale graph)."""
    import copy

    from msa.engine import Engine
    from msa.runtime import OpenVINOEncoder

    model = copy.deepcopy(tiny_model)
    first = OpenVINOEncoder(model, export_dir=tmp_path)
    Engine(model, encoder=first).embeddings(tiny_volume, [0])
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 1

    exported = []
    monkeypatch.setattr(OpenVINOEncoder, "_export", lambda self, *a: exported.append(a) or pytest.fail("re-export"))
    second = OpenVINOEncoder(model, export_dir=tmp_path)
    again = Engine(model, encoder=second).embeddings(tiny_volume, [0])
    assert exported == [] and second.ready(1)
    monkeypatch.undo()

    _randomise_adapters(model)
    changed = Engine(model, encoder=OpenVINOEncoder(model, export_dir=tmp_path)).embeddings(tiny_volume, [0])
    reference = Engine(model).embeddings(tiny_volume, [0])
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2
    assert (changed - reference).abs().max().item() < 1e-4
    assert (changed - again).abs().max().item() > 1e-3  # the new adapters, not the first export


def test_background_export_answers_with_pytorch_until_ready(tiny_model, tiny_volume, tmp_path):
    """A server's encoder: the first call does not wait for the export (PyTorch answers, exactly), and
    once the export is built OpenVINO serves."""
    from msa.engine import Engine
    from msa.runtime import OpenVINOEncoder

    encoder = OpenVINOEncoder(tiny_model, export_dir=tmp_path, background=True)
    calls = []
    encoder.torch.encode = lambda images, depth, run=encoder.torch.encode: calls.append(1) or run(images, depth)
    engine = Engine(tiny_model, encoder=encoder, use_cache=False)
    encoder.prepare(1, background=True)
    first = engine.embeddings(tiny_volume, [0])
    reference = Engine(tiny_model, use_cache=False).embeddings(tiny_volume, [0])
    encoder.wait()
    assert encoder.ready(1)
    calls_before = len(calls)
    later = engine.embeddings(tiny_volume, [0])
    assert len(calls) == calls_before  # OpenVINO served
    assert (later - reference).abs().max().item() < 1e-4
    if calls_before:  # the first call came while the export was being built: PyTorch's exact answer
        assert torch.equal(first, reference)


def test_failed_export_is_reported_and_pytorch_answers(tiny_model, tiny_volume, tmp_path, caplog):
    """An export that cannot be written: a warning naming it, PyTorch's answer, and prepare() refuses."""
    from msa.engine import Engine
    from msa.runtime import OpenVINOEncoder

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    encoder = OpenVINOEncoder(tiny_model, export_dir=blocker)
    with caplog.at_level(logging.WARNING, logger="msa.runtime"):
        out = Engine(tiny_model, encoder=encoder).embeddings(tiny_volume, [0])
    assert any("openvino export" in r.message and "failed" in r.message for r in caplog.records)
    assert torch.equal(out, Engine(tiny_model).embeddings(tiny_volume, [0]))
    with pytest.raises(MSAError, match="openvino export of the encoder failed"):
        encoder.prepare(1)


def test_runtime_and_precision_refusals(tiny_model):
    from msa.runtime import bf16_supported, make_encoder

    with pytest.raises(MSAError, match="runtime 'onnx'"):
        make_encoder(tiny_model, "onnx")
    with pytest.raises(MSAError, match="torch runtime runs fp32"):
        make_encoder(tiny_model, "torch", "bf16")
    with pytest.raises(MSAError, match="precision 'int4'"):
        make_encoder(tiny_model, "openvino", "int4")
    if bf16_supported():
        assert make_encoder(tiny_model, "openvino", "bf16").label == "openvino-bf16"
    else:
        with pytest.raises(MSAError, match="no bfloat16 instructions"):
            make_encoder(tiny_model, "openvino", "bf16")
    assert make_encoder(tiny_model, "auto").name == "openvino"  # the default on a CPU


def test_real_litemedsam_openvino_masks_equal_pytorch(lite_medsam, ct_volume, ct_reference, tmp_path):
    """The bundled LiteMedSAM with the shipped adapters (encoder adapters non-zero): on two slices of the
    sample CT, embeddings within 1e-4 and the box masks of every structure identical."""
    import copy

    from msa.checkpoint import load_adapters
    from msa.engine import Engine
    from msa.modeling.build import default_adapters
    from msa.runtime import make_encoder
    from msa.session import mask_box

    model = copy.deepcopy(lite_medsam)
    load_adapters(model, default_adapters("lite_medsam", False))
    assert not model.encoder_is_backbone()
    torch_engine = Engine(model)
    ov_engine = Engine(model, encoder=make_encoder(model, "openvino", export_dir=tmp_path))
    ks = [12, 18]
    diff = (ov_engine.embeddings(ct_volume, ks) - torch_engine.embeddings(ct_volume, ks)).abs().max().item()
    assert diff < 1e-4
    compared = 0
    for k in ks:
        for label in np.unique(ct_reference[k])[1:]:
            box = mask_box(ct_reference[k] == label)
            a, _ = torch_engine.predict(ct_volume, k, box=box)
            b, _ = ov_engine.predict(ct_volume, k, box=box)
            assert np.array_equal(a > 0, b > 0), (k, label)
            compared += 1
    assert compared >= 4


def test_fp32_runtimes_share_cached_embeddings(tiny_model, tiny_volume, tmp_path):
    """A server answers with PyTorch until its OpenVINO export is ready: the slices PyTorch encoded are
    not encoded again in OpenVINO (fp32 in both, within 1e-5), so a session's next click stays cheap."""
    from msa.engine import Engine
    from msa.runtime import OpenVINOEncoder

    torch_engine = Engine(tiny_model)
    torch_engine.embeddings(tiny_volume, [0, 1])
    ov_engine = Engine(tiny_model, cache=torch_engine.cache, encoder=OpenVINOEncoder(tiny_model, export_dir=tmp_path))
    ov_engine.embeddings(tiny_volume, [0, 1, 2])
    assert ov_engine.encoded_slices == 1  # slice 2 only
