"""Data sources for training and evaluation (synthetic NIfTI files, tiny random models):

- DATA::key=value options: case numbers, labels by name, whole-structure unions, label tables, axes;
- every structure of every source is drawn alike (a small structure as often as a large one),
  sources by weight;
- bad input fails before anything is encoded: no requested structure in a source, a label map on
  another grid, an unknown option or label name, a cache folder that cannot be written;
- `msa train` on two sources with --cache-dir; the same command again starts without encoding;
- `msa eval` in another slice direction and on a union structure.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import msa
import msa.cli
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from msa.data import parse_source
from msa.engine import Engine
from msa.errors import MSAError
from msa.io import load_image, reslice
from msa.trainers.slices import SliceData


def write_case(folder: Path, number: int, big: int = 1, small: int = 2, depth: int = 5, shape=(40, 48),
               spacing=(1.5, 1.5, 3.0)) -> tuple[Path, Path]:
    """case<number>.nii.gz (+ _labels): a large blob labelled `big` and a small one labelled `small`."""
    rng = np.random.default_rng(number)
    voxels = rng.normal(-50, 30, (depth, *shape)).astype(np.int16)
    labels = np.zeros(voxels.shape, np.uint8)
    labels[:, 4:30, 4:30] = big
    labels[:, 32:37, 36:42] = small
    voxels[labels == big] += 200
    voxels[labels == small] += 120
    paths = folder / f"case{number:02d}.nii.gz", folder / f"case{number:02d}_labels.nii.gz"
    for array, path in ((voxels, paths[0]), (labels, paths[1])):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(spacing)
        sitk.WriteImage(image, str(path))
    return paths


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    for n in range(4):
        write_case(data, n)
    (data / "labels.json").write_text(json.dumps({"1": "liver", "2": "adrenal"}))
    return data


def test_source_options(folder: Path) -> None:
    source = parse_source(f"{folder}::cases=1-2::labels=adrenal::whole=abdomen::axes=k,j::stride=2::weight=0.5")
    assert [c.name for c in source.cases] == ["case01", "case02"]
    assert source.cases[0].names == {1: "liver", 2: "adrenal"}  # the folder's labels.json
    assert source.structures(source.cases[0], {0, 1, 2}) == {"adrenal": (2,), "abdomen": (1, 2)}
    assert parse_source(f"{folder}::labels=none::whole=all").structures(source.cases[0], {0, 1, 2}) == {"all": (1, 2)}
    assert (source.axes, source.stride, source.weight, source.name) == (("k", "j"), 2, 0.5, "data")
    assert parse_source(str(folder), labels="liver").labels == "liver"  # the default of labels=
    brain = parse_source(f"{folder}::names=freesurfer-aseg")
    assert brain.cases[0].names[17] == "Left-Hippocampus"


@pytest.mark.parametrize("spec, message", [
    ("::cases=7", "no case numbered 7"),
    ("::labels=spleen", "unknown label 'spleen' \\(names known: adrenal, liver\\)"),
    ("::colour=red", "bad source option 'colour=red'"),
    ("::axes=x", "axes must be some of k, j, i"),
    ("::stride=0", "stride must be >= 1"),
    ("::names=nosuch", "neither a label table shipped with msa"),
    ("::preset=pet", "unknown preset 'pet'"),
])
def test_bad_source_options_are_one_clear_error(folder: Path, spec: str, message: str) -> None:
    with pytest.raises(MSAError, match=message):
        parse_source(f"{folder}{spec}")


def test_every_structure_is_drawn_alike_and_sources_by_weight(folder: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    write_case(other, 9, big=1, small=3)
    engine = Engine(msa.build_model("vit_tiny", pretrained=False))
    data = SliceData.from_sources(engine, [parse_source(str(folder)), parse_source(f"{other}::weight=3")])
    assert engine.encoded_slices == 0  # reading and sampling encode nothing
    drawn = data.draw(np.random.default_rng(0), 4000)
    counts = {}
    for s in drawn:
        key = (data.source_names[data.source_of[s.case]], s.label)
        counts[key] = counts.get(key, 0) + 1
    # Four structures; "other" weighs 3: 3/8 of draws for each of its structures, 1/8 for each of folder's.
    assert set(counts) == {("data", "liver"), ("data", "adrenal"), ("other", "1"), ("other", "3")}
    for key, share in ((("data", "liver"), 1 / 8), (("data", "adrenal"), 1 / 8), (("other", "1"), 3 / 8),
                       (("other", "3"), 3 / 8)):
        assert abs(counts[key] / 4000 - share) < 0.03, counts


def test_bad_data_fails_before_any_encoding(folder: Path, tmp_path: Path) -> None:
    engine = Engine(msa.build_model("vit_tiny", pretrained=False))
    no_match = tmp_path / "no_match"
    no_match.mkdir()
    write_case(no_match, 5, big=4, small=5)
    with pytest.raises(MSAError, match="no training samples in source 'no_match': none of its cases holds the structures"):
        SliceData.from_sources(engine, [parse_source(str(folder)), parse_source(f"{no_match}::labels=1,2")])
    # A label map of another, larger scan: its structure lies outside this image.
    image, _ = write_case(tmp_path, 6, shape=(40, 48))
    other = np.zeros((5, 90, 120), np.uint8)
    other[:, 50:80, 20:100] = 1
    labels = tmp_path / "other_labels.nii.gz"
    item = sitk.GetImageFromArray(other)
    item.SetSpacing((1.5, 1.5, 3.0))
    sitk.WriteImage(item, str(labels))
    with pytest.raises(MSAError, match="does not lie on the grid"):
        SliceData.from_sources(engine, [parse_source(f"{image}:{labels}")])
    assert engine.encoded_slices == 0


def test_reslice_gives_the_other_directions_with_their_spacing(folder: Path) -> None:
    vol = load_image(folder / "case00.nii.gz")  # (K, J, I) = (5, 40, 48), spacing (i, j, k) = (1.5, 1.5, 3)
    ref = np.arange(5 * 40 * 48).reshape(5, 40, 48)
    along_j, ref_j = reslice(vol, ref, "j")
    assert along_j.voxels.shape == (40, 5, 48) and np.array_equal(along_j.voxels[7], vol.voxels[:, 7, :])
    assert np.array_equal(ref_j[7], ref[:, 7, :])
    assert along_j.geometry.GetSpacing() == (1.5, 3.0, 1.5)
    along_i, ref_i = reslice(vol, ref, "i")
    assert along_i.voxels.shape == (48, 5, 40) and np.array_equal(ref_i[11], ref[:, :, 11])


def test_train_two_sources_then_rerun_with_a_warm_cache(folder: Path, tmp_path: Path, capsys) -> None:
    other = tmp_path / "other"
    other.mkdir()
    write_case(other, 8)
    cache, out = tmp_path / "cache", tmp_path / "a.pt"
    args = ["train", f"{folder}::cases=0-2::labels=liver,adrenal", f"{other}::axes=k,i::stride=2",
            "--val", f"{folder}::cases=3", "--backbone", "lite_medsam_tiny", "--steps", "2", "--batch-size", "2",
            "--eval-every", "2", "--encoder-blocks", "1", "--cache-dir", str(cache), "--restart", "--out", str(out)]
    assert msa.cli.main(args) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["encoded_slices"] > 0
    per_source = first["best"]["per_source"]["data"]
    assert set(per_source["structures"]) == {"liver", "adrenal"} and 0 <= per_source["click1"] <= 1
    assert msa.cli.main(args) == 0  # the same command again: every slice comes from the cache
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["encoded_slices"] == 0
    assert second["trainable_sha256"] == first["trainable_sha256"]  # and the run is the same


def test_train_3d_slabs_from_a_2d_adapter_file(folder: Path, tmp_path: Path, capsys) -> None:
    """A 2D adapter file starts a 3D model; its depth adapters in the last block learn on slabs (with
    --depth-only, alone)."""
    common = ["--backbone", "lite_medsam_tiny", "--steps", "2", "--batch-size", "4", "--eval-every", "2",
              "--encoder-blocks", "1", "--cache-dir", str(tmp_path / "cache"), "--val", f"{folder}::cases=3"]
    assert msa.cli.main(["train", f"{folder}::cases=0-2", "--out", str(tmp_path / "2d.pt"), *common]) == 0
    assert msa.cli.main(["train", f"{folder}::cases=0-2", "--out", str(tmp_path / "3d.pt"), "--three-d",
                         "--adapters", str(tmp_path / "2d.pt"), *common]) == 0
    state = msa.checkpoint.read_checkpoint(tmp_path / "3d.pt")
    assert state["metadata"]["three_d"] is True
    # The file says what it was trained on and from which adapter file it started.
    extra, parent = state["metadata"]["extra"], msa.checkpoint.read_checkpoint(tmp_path / "2d.pt")["metadata"]
    assert [source["images"] for source in extra["data"]] == [[f"case{n:02d}.nii.gz" for n in range(3)]]
    assert [source["images"] for source in extra["validation"]] == [["case03.nii.gz"]]
    assert extra["parent_adapters"]["file"] == "2d.pt" and parent["extra"]["parent_adapters"] is None
    assert extra["parent_adapters"]["sha256"] == hashlib.sha256((tmp_path / "2d.pt").read_bytes()).hexdigest()
    depth = {k: v for k, v in state["state_dict"].items() if "depth_adapter.up." in k}
    last = "image_encoder.layers.3.blocks.0."
    assert any(v.any() for k, v in depth.items() if k.startswith(last))
    assert not any(v.any() for k, v in depth.items() if not k.startswith(last))
    model = msa.build_model("lite_medsam_tiny", pretrained=False, three_d=True)
    with pytest.raises(MSAError, match="three_d=False"):
        msa.load_adapters(model, tmp_path / "2d.pt")  # outside training, a 2D file never loads into 3D

    # --depth-only: the depth adapters learn and every other tensor stays the 2D file's, so 2D answers stay.
    assert msa.cli.main(["train", f"{folder}::cases=0-2", "--out", str(tmp_path / "depth.pt"), "--three-d",
                         "--depth-only", "--adapters", str(tmp_path / "2d.pt"), *common]) == 0
    depth_only = msa.checkpoint.read_checkpoint(tmp_path / "depth.pt")["state_dict"]
    start = msa.checkpoint.read_checkpoint(tmp_path / "2d.pt")["state_dict"]
    moved = {k for k, v in depth_only.items() if k not in start or not torch.equal(v, start[k])}
    assert moved and all(".depth_adapter." in k for k in moved), moved
    assert any(depth_only[k].any() for k in moved if k.startswith(last) and ".depth_adapter.up." in k)
    for bad in (["--depth-only"], ["--depth-only", "--three-d", "--encoder-blocks", "0"]):  # 2D; no trained block
        assert msa.cli.main(["train", f"{folder}::cases=0-2", "--out", str(tmp_path / "bad.pt"),
                             *common, *bad]) == 2, bad
    assert not (tmp_path / "bad.pt").exists()


def test_eval_in_another_direction_and_on_a_union(folder: Path, capsys) -> None:
    torch.manual_seed(0)
    args = ["eval", f"{folder}::cases=0::axes=j::whole=abdomen::labels=adrenal", "--prompt", "box",
            "--backbone", "vit_tiny", "--json"]
    assert msa.cli.main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["per_label"]) == {"adrenal", "abdomen"}
    # Along j, the adrenal (rows 32-36) is on 5 slices and the abdomen (rows 4-36) on 31, each >= 10 voxels.
    assert summary["per_label"]["adrenal"]["n"] == 5 and summary["per_label"]["abdomen"]["n"] == 31


def test_training_slabs_are_the_slabs_inference_encodes(folder: Path, tmp_path: Path) -> None:
    """One slab rule (msa.engine.slab_of): a 3D training sample's embedding, computed from the cached inputs
    of the trained block, is exactly what the engine's full 3D pass gives that slice at inference, also when
    samples are strided and the labelled slices do not start on the grid; held-out samples never train."""
    write_case(tmp_path, 11, depth=12)
    labels = sitk.ReadImage(str(tmp_path / "case11_labels.nii.gz"))
    array = sitk.GetArrayFromImage(labels)
    array[:2] = 0  # labelled slices 2-11: a slab centred on a sample, or starting at slice 2, is off the grid
    cut = sitk.GetImageFromArray(array)
    cut.CopyInformation(labels)
    sitk.WriteImage(cut, str(tmp_path / "case11_labels.nii.gz"))
    torch.manual_seed(0)
    model = msa.build_model("lite_medsam_tiny", pretrained=False, three_d=True)
    with torch.no_grad():  # a trained depth branch in the last block (the one that trains on slabs) only
        for name, param in model.named_parameters():
            if name.startswith("image_encoder.layers.3.") and "depth_adapter." in name:
                param.add_(0.5 * torch.randn_like(param))
    engine = Engine(model, slab_depth=4)
    data = SliceData.from_sources(engine, [parse_source(f"{tmp_path}/case11.nii.gz:{tmp_path}/case11_labels.nii.gz"
                                                        "::stride=3")])
    assert sorted({s.k for s in data.samples}) == [2, 5, 8, 11]
    for anchor in data.samples:
        assert data.slab(anchor.case, anchor.k) == list(range(anchor.k // 4 * 4, anchor.k // 4 * 4 + 4))

    from msa.store import FeatureStore
    from msa.trainers.finetune import TrainConfig, Trainer

    engine.store = FeatureStore(tmp_path / "features")
    data.held_out = {(0, k, "1") for k in range(12) if k % 2}  # odd slices of structure 1: validation only
    trainer = Trainer(engine, data, data.samples[:1], data, TrainConfig(batch_size=8, encoder_blocks=1), tmp_path / "a.pt")
    data.prepare(3, slabs=True)
    inference = Engine(model, slab_depth=4)  # no store: the whole encoder, in 3D, on the engine's slabs
    seen = set()
    for step in range(6):
        samples, embeddings = trainer._slab_batch(np.random.default_rng(step))
        assert len(samples) == len(embeddings)
        for sample, embedding in zip(samples, embeddings):
            expected = inference.embeddings(data.volumes[sample.case], [sample.k])[0]
            torch.testing.assert_close(embedding.detach(), expected, atol=1e-4, rtol=1e-4)
        seen |= {(s.k, s.label) for s in samples}
    assert not {(k, "1") for k in range(1, 12, 2)} & seen
    assert {(k, "1") for k in range(2, 12, 2)} & seen and any(k % 3 != 2 for k, _ in seen)  # slab slices, not just anchors


def test_a_2d_adapter_file_serves_a_3d_model_as_2d_and_says_so(tmp_path: Path, caplog) -> None:
    torch.manual_seed(0)
    model_2d = msa.build_model("lite_medsam_tiny", pretrained=False)
    backbone = tmp_path / "backbone.pt"
    torch.save({k: v for k, v in model_2d.state_dict().items() if "_adapter." not in k}, backbone)
    with torch.no_grad():
        for name, param in model_2d.named_parameters():
            if model_2d.is_trainable(name):
                param.add_(0.05 * torch.randn_like(param))
    msa.save_adapters(model_2d, tmp_path / "2d.pt")
    with caplog.at_level("WARNING", logger="msa"):
        model_3d = msa.build_model("lite_medsam_tiny", checkpoint=backbone, adapters=tmp_path / "2d.pt", three_d=True)
    assert "holds 2D adapters" in caplog.text
    images = Engine(model_2d).model_input(load_image(write_case(tmp_path, 12)[0]), [0, 1, 2, 3])
    with torch.no_grad():
        assert torch.allclose(model_3d.encode(images, depth=4), model_2d.encode(images), atol=1e-5)


def sidecar_cases(folder: Path, names: dict[int, dict[int, str]]) -> None:
    """case<n>.nii.gz + _labels.nii.gz (labels 1 and 2) with its own names in case<n>_labels.json."""
    folder.mkdir()
    for number, table in names.items():
        write_case(folder, number)
        (folder / f"case{number:02d}_labels.json").write_text(json.dumps({"labels": table}))


def test_label_names_resolve_against_every_case_not_the_first(tmp_path: Path) -> None:
    """Each case names its labels in its own sidecar JSON: a name is checked against every case
    when the source is parsed (before any image is read), and one that a case does not know is an
    error naming that case; the same name may mean another id in another case."""
    data = tmp_path / "sidecars"
    sidecar_cases(data, {0: {1: "liver", 2: "adrenal"}, 1: {1: "adrenal", 2: "liver"}, 2: {1: "liver", 2: "spleen"}})
    with pytest.raises(MSAError, match=r"unknown label 'adrenal' in 1 of 3 cases: case02_labels.nii.gz "
                                       r"\(names known in case02_labels.nii.gz: liver, spleen\)"):
        parse_source(f"{data}::labels=adrenal")
    with pytest.raises(MSAError, match=r"unknown label 'spleen' in 2 of 3 cases: case00_labels.nii.gz, "
                                       r"case01_labels.nii.gz"):
        parse_source(f"{data}::labels=liver,spleen")
    source = parse_source(f"{data}::labels=adrenal::cases=0-1")  # both know it, under other ids
    assert [source.structures(case, {0, 1, 2}) for case in source.cases] == [{"adrenal": (2,)}, {"adrenal": (1,)}]
    assert parse_source(f"{data}::labels=liver,1").labels == "liver,1"  # ids need no name


def test_a_label_is_present_when_any_case_holds_it_under_its_own_id(tmp_path: Path) -> None:
    """The first case calls id 5 'adrenal' but its map holds only 1 and 2; the second case's
    'adrenal' is its label 2, which its map holds: the label is present."""
    data = tmp_path / "sidecars"
    sidecar_cases(data, {0: {1: "liver", 2: "spleen", 5: "adrenal"}, 1: {1: "liver", 2: "adrenal"}})
    parse_source(f"{data}::labels=adrenal").check_labels_present()
    with pytest.raises(MSAError, match="label 'adrenal' is not present in case00_labels.nii.gz"):
        parse_source(f"{data}::labels=adrenal::cases=0").check_labels_present()


def test_training_labels_keep_the_files_compact_integer_type(tmp_path: Path) -> None:
    """Training holds every volume's label map in memory: a uint8 file stays uint8 (1 byte a voxel, not 8),
    a float label map becomes integers, and the values are the file's either way."""
    from msa.io import resample_labels_to

    image, labels = msa.data.sample_ct()
    volume = load_image(image)
    reference = resample_labels_to(labels, volume)
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(labels)))
    assert expected.dtype == np.uint8 and reference.dtype == np.uint8
    assert reference.nbytes == reference.size
    assert set(np.unique(reference).tolist()) == set(np.unique(expected).tolist())

    as_float = sitk.Cast(sitk.ReadImage(str(labels)), sitk.sitkFloat32)
    sitk.WriteImage(as_float, str(tmp_path / "float_labels.nii.gz"))
    from_float = resample_labels_to(tmp_path / "float_labels.nii.gz", volume)
    assert np.issubdtype(from_float.dtype, np.integer)
    np.testing.assert_array_equal(from_float, reference)


def test_train_encodes_the_frozen_trunks_with_the_runtime(folder: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """--runtime openvino (auto on a CPU) encodes the trunks training reads (the input of the first trained
    block) through an OpenVINO export, within float16 rounding of PyTorch's."""
    pytest.importorskip("openvino", reason="openvino is a dependency of msa: install the package")
    from msa.store import FeatureStore

    exports = tmp_path / "exports"
    monkeypatch.setenv("MSA_EXPORT_DIR", str(exports))
    assert msa.cli.main(["train", f"{folder}::cases=0-1", "--val", f"{folder}::cases=3", "--backbone",
                         "lite_medsam_tiny", "--steps", "1", "--batch-size", "2", "--eval-every", "1",
                         "--encoder-blocks", "1", "--runtime", "openvino", "--cache-dir", str(tmp_path / "ov"),
                         "--out", str(tmp_path / "o.pt")]) == 0
    capsys.readouterr()
    assert any(exports.iterdir())  # the export the trunks came from
    stored = sorted((tmp_path / "ov").rglob("*.npy"))  # <space>/<image>/<k>.npy
    assert {p.parent.parent.name.rsplit("-block", 1)[1] for p in stored} == {"3"}  # lite_medsam_tiny: 4 blocks
    torch.manual_seed(0)  # the CLI's seed: the same random backbone
    engine = Engine(msa.build_model("lite_medsam_tiny", pretrained=False), store=FeatureStore(tmp_path / "torch"))
    for n in (0, 1, 3):
        volume = load_image(folder / f"case{n:02d}.nii.gz")
        ks = sorted(int(p.stem) for p in stored if p.parent.name.startswith(volume.key[:20]))
        assert ks, n
        reference = engine.trunks(volume, ks, 3).float()
        image = next(p.parent for p in stored if p.parent.name.startswith(volume.key[:20]))
        trunks = torch.stack([torch.from_numpy(np.load(image / f"{k}.npy")).float() for k in ks])
        assert (trunks - reference).abs().max() <= 1e-3 * max(reference.abs().max().item(), 1.0)
