"""Training (msa.trainers): what the training issue must show, on tiny random models.

- only adapters, decoder block 2 and the mask head change; the frozen backbone is bit-identical;
- an interrupted run resumes to exactly the result of an uninterrupted one (same seed);
- a 2-process gloo run under torchrun ends with identical adapters on both ranks;
- each self-supervised objective's loss falls; `msa pretrain` then `msa train` works;
- simulated prompts: corrective clicks land in the error region with the right sign;
- box-only samples learn the teacher's (the backbone's) answer; zoomed copies of the training data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import msa
import msa.cli
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from msa.checkpoint import read_checkpoint
from msa.engine import Engine
from msa.errors import MSAError
from msa.io import Volume
from msa.store import FeatureStore
from msa.trainers.finetune import SLAB_BOX_JITTER, Prompt, TrainConfig, Trainer, train_on
from msa.trainers.pretrain import Pretrainer, PretrainConfig, pretrain
from msa.trainers.prompts import corrective_click, jittered_box, random_clicks
from msa.trainers.slices import SliceData, split_validation, zoom_in_plane


def synthetic_pair(seed: int = 0, depth: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A small CT-like volume (K, J, I) in HU with two bright blobs labelled 1 and 2."""
    rng = np.random.default_rng(seed)
    voxels = rng.normal(-50, 30, (depth, 40, 48)).astype(np.float32)
    labels = np.zeros(voxels.shape, np.uint8)
    labels[:, 8:24, 6:22] = 1
    labels[:, 22:34, 28:44] = 2
    voxels[labels == 1] += 200
    voxels[labels == 2] += 120
    return voxels, labels


def volume_of(voxels: np.ndarray) -> Volume:
    return Volume(voxels=voxels, geometry=None, modality="ct", source="synthetic")


def write_pair(folder: Path, seed: int = 0) -> str:
    voxels, labels = synthetic_pair(seed)
    image, label = folder / f"case{seed}.nii.gz", folder / f"case{seed}_labels.nii.gz"
    for array, path in ((voxels.astype(np.int16), image), (labels, label)):
        item = sitk.GetImageFromArray(array)
        item.SetSpacing((1.5, 1.5, 3.0))
        sitk.WriteImage(item, str(path))
    return f"{image}:{label}"


def tiny_engine(seed: int = 0) -> Engine:
    torch.manual_seed(seed)
    return Engine(msa.build_model("vit_tiny", pretrained=False))


def run(engine: Engine, out: Path, steps: int = 6, on_progress=None, resume: bool = False) -> dict:
    voxels, labels = synthetic_pair()
    data = SliceData(engine, [(volume_of(voxels), labels)], None)
    config = TrainConfig(steps=steps, batch_size=4, eval_every=2, seed=3)
    return train_on(engine, data, None, out, config, resume=resume, on_progress=on_progress)


def test_training_changes_only_the_trainable_parts(tmp_path: Path) -> None:
    engine = tiny_engine()
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    run(engine, tmp_path / "a.pt")
    after = engine.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "training changed nothing"
    assert all(engine.model.is_trainable(k) for k in changed), sorted(k for k in changed if not engine.model.is_trainable(k))
    # The encoder gets no gradient without --train-encoder: its adapters stay exactly zero.
    assert not any(k.startswith("image_encoder.") for k in changed)
    assert any(".transformer.layers.1." in k for k in changed)
    assert any("prompt_adapter" in k for k in changed)


def test_training_hashes_the_frozen_backbone_once(tmp_path: Path, monkeypatch) -> None:
    """Each validation forgets what the trained adapters imply (cache keys), never the frozen
    backbone's hash: re-hashing it cost 2.5 GB of reading per validation for ViT-H."""
    import msa.modeling.msa as modeling

    engine = tiny_engine()
    frozen = {name for name in engine.model.state_dict() if not engine.model.is_trainable(name)}
    hashed: list[int] = []
    digest = modeling._digest

    def counting(named_tensors, *args):
        named = list(named_tensors)
        hashed.append(sum(name in frozen for name, _ in named))
        return digest(named, *args)

    monkeypatch.setattr(modeling, "_digest", counting)
    run(engine, tmp_path / "a.pt", steps=6)  # three validations, three saves
    # At most once for the adapter files' backbone hash and once for the encoder's (feature store keys).
    assert 0 < sum(hashed) <= 2 * len(frozen), hashed


def test_without_validation_data_no_validation_slice_has_training_neighbours() -> None:
    """Several images: whole images are held out (zoomed copies included). One image: a block of
    each structure's slices. Holding out every n-th slice put its neighbours in training."""
    engine = tiny_engine()
    pairs = [(volume_of(voxels), labels) for voxels, labels in (synthetic_pair(seed) for seed in range(3))]
    data = SliceData(engine, pairs, None, scales=(1.0, 1.5))
    train, val = split_validation(data.samples, data, 2)
    train_images, val_images = ({data.image_of[s.case] for s in part} for part in (train, val))
    assert val_images == {1} and train_images == {0, 2}
    assert len(train) + len(val) == len(data.samples)

    one = SliceData(engine, pairs[:1], None, scales=(1.0, 1.5))
    train, val = split_validation(one.samples, one, 2)
    held = {(s.label, s.k) for s in val}
    assert held and not held & {(s.label, s.k) for s in train}
    for label in {label for label, _ in held}:
        ks = sorted(k for held_label, k in held if held_label == label)
        assert ks == list(range(ks[0], ks[-1] + 1)), ks  # one block


def test_encoder_adapters_train_with_train_encoder_in_3d(tmp_path: Path) -> None:
    torch.manual_seed(0)
    engine = Engine(msa.build_model("vit_tiny", pretrained=False, three_d=True), slab_depth=3)
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    voxels, labels = synthetic_pair()
    data = SliceData(engine, [(volume_of(voxels), labels)], None)
    train_on(engine, data, None, tmp_path / "e.pt",
             TrainConfig(steps=3, batch_size=2, eval_every=3, train_encoder=True), resume=False)
    after = engine.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("image_encoder" in k and "depth_adapter" in k for k in changed)
    assert all(engine.model.is_trainable(k) for k in changed)


def test_interrupted_training_resumes_to_the_same_result(tmp_path: Path) -> None:
    straight = tiny_engine()
    run(straight, tmp_path / "straight.pt")

    class Interrupted(Exception):
        pass

    def interrupt(step: int, steps: int, record: dict) -> None:
        if step == 3:  # after the state saved at step 2
            raise Interrupted

    out = tmp_path / "resumed.pt"
    with pytest.raises(Interrupted):
        run(tiny_engine(), out, on_progress=interrupt)
    assert read_checkpoint(out.with_name(out.name + ".state"))["step"] == 2
    resumed = tiny_engine()
    result = run(resumed, out, resume=True)
    assert result["steps"] == 6
    expected = straight.model.trainable_state_dict()
    got = resumed.model.trainable_state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_saved_state_resumes_only_its_own_run(tmp_path: Path) -> None:
    """Another run's state under the same --out (other data, other starting adapters) is refused with
    what differs; it used to be resumed, giving the first run's adapters for the second run's data."""
    out = tmp_path / "a.pt"
    run(tiny_engine(), out, steps=2)
    assert out.with_name(out.name + ".state").is_file()

    other = tiny_engine()
    voxels, labels = synthetic_pair(seed=5)
    data = SliceData(other, [(volume_of(voxels), labels)], None)
    with pytest.raises(MSAError, match=r"another training run \(its data differ\)"):
        train_on(other, data, None, out, TrainConfig(steps=2, batch_size=4, eval_every=2, seed=3))
    started = tiny_engine()
    randomize = next(p for name, p in started.model.named_parameters() if "prompt_adapter" in name)
    with torch.no_grad():
        randomize.add_(0.1)
    with pytest.raises(MSAError, match=r"its starting adapters differ"):
        run(started, out, steps=2, resume=True)
    assert run(tiny_engine(), out, steps=2, resume=True)["steps"] == 2  # its own run: resumed (finished)


def test_best_adapters_are_saved_and_load_into_a_fresh_model(tmp_path: Path) -> None:
    engine = tiny_engine()
    result = run(engine, tmp_path / "best.pt")
    meta = msa.read_adapter_metadata(tmp_path / "best.pt")
    assert meta["backbone"] == "vit_tiny"
    best = max(result["history"], key=lambda r: (r["dice_click1"] + r["dice_box"]) / 2)
    assert meta["extra"]["training"]["step"] == best["step"]
    assert (tmp_path / "best.pt.logs" / "curves.png").stat().st_size > 0
    fresh = tiny_engine()
    msa.load_adapters(fresh.model, tmp_path / "best.pt")
    assert fresh.model.adapters_meta["backbone"] == "vit_tiny"


def test_ddp_two_gloo_processes_end_with_identical_adapters(tmp_path: Path) -> None:
    data = write_pair(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "msa.cli", "train", data, "--out", str(tmp_path / "ddp.pt"), "--backbone", "vit_tiny",
           "--steps", "4", "--batch-size", "2", "--eval-every", "2", "--seed", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines, decoder, text = [], json.JSONDecoder(), proc.stdout
    start = text.find("{")
    while start != -1:  # one JSON object per rank (robust to lines that still met on the way)
        obj, end = decoder.raw_decode(text, start)
        lines.append(obj)
        start = text.find("{", end)
    assert sorted(line["rank"] for line in lines) == [0, 1]
    assert lines[0]["trainable_sha256"] == lines[1]["trainable_sha256"]
    assert (tmp_path / "ddp.pt").is_file()


@pytest.mark.parametrize("objective", ["mae", "emix", "shed"])
def test_each_ssl_objective_loss_falls(objective: str, tmp_path: Path) -> None:
    engine = tiny_engine()
    voxels, _ = synthetic_pair(depth=6)
    config = PretrainConfig(steps=40, batch_size=4, lr=1e-3, objectives=(objective,))
    result = pretrain(engine, [volume_of(voxels)], tmp_path / "pre.pt", config, progress=False)
    losses = result["losses"][objective]
    print(objective, losses)
    assert losses["last"] < losses["first"]
    # Only encoder adapters learn in pretraining; the file is an ordinary adapter file.
    state = read_checkpoint(tmp_path / "pre.pt")["state_dict"]
    changed = [k for k, v in state.items() if k.endswith("up.weight") and v.abs().sum() > 0]
    assert changed and all(k.startswith("image_encoder.") for k in changed)

    # The loss can fall through the objective's own heads alone. What pretraining is for is the encoder
    # adapters: on a fixed batch, the trained heads do better with the trained adapters than with the
    # adapters put back to where they started (zero, i.e. the backbone's own embedding).
    engine = tiny_engine()
    torch.manual_seed(config.seed)  # as pretrain() does: the same run
    trainer = Pretrainer(engine, [volume_of(voxels)], config)
    adapters = {n: p for n, p in engine.model.named_parameters() if n.startswith("image_encoder.") and "_adapter." in n}
    start = {n: p.detach().clone() for n, p in adapters.items()}
    key = engine.model.encoder_key()
    trainer.run(progress=False)
    assert engine.model.encoder_key() != key  # embeddings cached before pretraining no longer apply
    images = trainer.batch(np.random.default_rng(1234))
    trained = trainer.evaluate(images, seed=1)[objective]
    with torch.no_grad():
        for n, p in adapters.items():
            p.copy_(start[n])
    without = trainer.evaluate(images, seed=1)[objective]
    print(objective, "fixed batch, trained heads:", {"trained adapters": trained, "starting adapters": without})
    # measured (trained / starting adapters): mae 0.999 / 1.208, emix 1.256 / 1.355, shed 0.574 / 0.648
    assert trained < 0.95 * without


def test_pretrain_then_train_through_the_cli(tmp_path: Path) -> None:
    data = write_pair(tmp_path)
    image = data.split(":")[0]
    assert msa.cli.main(["pretrain", image, "--out", str(tmp_path / "pre.pt"), "--backbone", "vit_tiny",
                         "--steps", "3", "--objectives", "mae,shed"]) == 0
    # vit_tiny has random weights: the same seed rebuilds the same backbone the adapters were made on.
    torch.manual_seed(0)
    assert msa.cli.main(["train", data, "--out", str(tmp_path / "ft.pt"), "--backbone", "vit_tiny",
                         "--adapters", str(tmp_path / "pre.pt"), "--steps", "2", "--eval-every", "2",
                         "--seed", "0"]) == 0
    pre = read_checkpoint(tmp_path / "pre.pt")["state_dict"]
    ft = read_checkpoint(tmp_path / "ft.pt")["state_dict"]
    encoder = [k for k in pre if k.startswith("image_encoder.")]
    assert encoder and all(torch.equal(pre[k], ft[k]) for k in encoder)  # carried over, untouched
    assert any(not torch.equal(pre[k], ft[k]) for k in pre if k.startswith("mask_decoder."))


def test_simulated_prompts() -> None:
    rng = np.random.default_rng(0)
    mask = np.zeros((30, 40), bool)
    mask[5:20, 10:30] = True
    for _ in range(20):
        clicks = random_clicks(mask, rng)
        assert clicks[0][2] == 1 and mask[int(clicks[0][1]), int(clicks[0][0])]
        assert all(not mask[int(j), int(i)] for i, j, label in clicks if label == 0)
        i0, j0, i1, j1 = jittered_box(mask, rng, jitter=0.1)
        assert abs(i0 - 10) <= 2 and abs(j0 - 5) <= 1.5 and abs(i1 - 29) <= 2 and abs(j1 - 19) <= 1.5
    missed = mask.copy()
    missed[5:20, 20:30] = False  # the prediction lacks the right half: a positive click there
    i, j, label = corrective_click(missed, mask)
    assert label == 1 and 20 <= i < 30 and 5 <= j < 20
    spill = mask.copy()
    spill[22:29, 0:40] = True  # a false-positive band: a negative click in it
    i, j, label = corrective_click(spill, mask)
    assert label == 0 and 22 <= j < 29
    assert corrective_click(mask, mask) is None


def test_eval_click_protocols_share_one_click_sequence_with_noc(tmp_path: Path) -> None:
    """NoC runs on the protocol's own click sequence: asking for it must not change the Dice."""
    from msa.data import load_cases
    from msa.evaluate import evaluate

    cases = load_cases(write_pair(tmp_path))
    engine = tiny_engine()
    plain = evaluate(engine, cases, "click3")
    with_noc = evaluate(engine, cases, "click3", noc=True)
    assert with_noc["mean_dice"] == plain["mean_dice"]
    for row in with_noc["per_label"].values():
        assert 1 <= row["noc85"] <= row["noc90"] <= 20


def test_eval_3d_click_takes_the_walk_settings(tmp_path: Path) -> None:
    """evaluate(walk=...) reaches the session: this untrained model's predicted IoU is low, so its walk stops
    at the model's default threshold and runs on with none; the margin then changes the propagated masks, and a
    stop_area of 1 (stop at the first slice smaller than any before it) shortens the walk again."""
    from msa.data import load_cases
    from msa.evaluate import evaluate

    cases = load_cases(write_pair(tmp_path))
    engine = tiny_engine()
    stopped = evaluate(engine, cases, "3d-click")["mean_dice"]
    walked = evaluate(engine, cases, "3d-click", walk={"stop_iou": 0.0})["mean_dice"]
    assert walked > stopped, (walked, stopped)
    assert evaluate(engine, cases, "3d-click", walk={"stop_iou": 0.0, "margin": 0})["mean_dice"] != walked  # was 3
    assert evaluate(engine, cases, "3d-click", walk={"stop_iou": 0.0, "stop_area": 1.0})["mean_dice"] != walked


def test_msa_eval_walk_options_reach_the_walk(tmp_path: Path, capsys) -> None:
    """msa eval --margin / --stop-iou give what evaluate(walk=...) gives with the same model (vit_tiny, seed 0:
    tiny_engine's), each setting its own number; a value out of range is refused before anything loads."""
    from msa.data import load_cases
    from msa.evaluate import evaluate

    data = write_pair(tmp_path)

    def cli(*walk: str) -> float:
        torch.manual_seed(0)
        assert msa.cli.main(["eval", data, "--prompt", "3d-click", "--backbone", "vit_tiny", "--json", *walk]) == 0
        return json.loads(capsys.readouterr().out)["mean_dice"]

    cases = load_cases(data)
    settings = [([], {}), (["--stop-iou", "0"], {"stop_iou": 0.0}),
                (["--stop-iou", "0", "--margin", "0"], {"stop_iou": 0.0, "margin": 0})]
    scores = [cli(*options) for options, _ in settings]
    assert scores == [evaluate(tiny_engine(), cases, "3d-click", walk=walk)["mean_dice"] for _, walk in settings]
    assert len(set(scores)) == 3, scores
    assert msa.cli.main(["eval", str(tmp_path / "missing.nii.gz"), "--stop-overlap", "2"]) == 2
    assert "stop_overlap must lie in [0, 1], got 2.0" in capsys.readouterr().err


def test_msa_segment_walk_options_reach_the_walk(tmp_path: Path) -> None:
    """msa segment --margin / --stop-iou write the masks a Session with the same walk and model gives (vit_tiny,
    seed 0: its default walk stops after the clicked slice; without the IoU stop it reaches every slice)."""
    from msa.io import load_image
    from msa.session import Session

    image, out = write_pair(tmp_path).split(":")[0], tmp_path / "mask.nii.gz"
    masks = []
    for options, walk in (([], {}), (["--stop-iou", "0"], {"stop_iou": 0.0}),
                          (["--stop-iou", "0", "--margin", "0"], {"stop_iou": 0.0, "margin": 0})):
        torch.manual_seed(0)
        argv = ["segment", image, "-o", str(out), "--point", "14,16,1", "--backbone", "vit_tiny", *options]
        assert msa.cli.main(argv) == 0
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(out))) > 0
        session = Session(tiny_engine(), load_image(image), **walk)
        session.add_point((14, 16, 1))
        np.testing.assert_array_equal(written, session.mask(1) > 0)
        masks.append(written)
    assert masks[0].any(axis=(1, 2)).sum() == 1 and masks[1].any(axis=(1, 2)).all()
    assert not np.array_equal(masks[1], masks[2])


def test_zoom_in_plane_pads_or_crops_image_and_labels_together() -> None:
    voxels, labels = synthetic_pair()  # (4, 40, 48)
    volume = volume_of(voxels)
    wide, wide_labels = zoom_in_plane(volume, labels, 1.5)
    assert wide.voxels.shape == wide_labels.shape == (4, 60, 72)
    np.testing.assert_array_equal(wide.voxels[:, 10:50, 12:60], voxels)  # the original, centred
    np.testing.assert_array_equal(wide_labels[:, 10:50, 12:60], labels)
    border = np.ones((60, 72), bool)
    border[10:50, 12:60] = False
    assert (wide.voxels[:, border] == voxels.min()).all() and not wide_labels[:, border].any()
    close, close_labels = zoom_in_plane(volume, labels, 0.5)
    assert close.voxels.shape == (4, 20, 24)
    np.testing.assert_array_equal(close.voxels, voxels[:, 10:30, 12:36])
    np.testing.assert_array_equal(close_labels, labels[:, 10:30, 12:36])
    assert zoom_in_plane(volume, labels, 1.0)[0] is volume
    data = SliceData(tiny_engine(), [(volume, labels)], None, [1.0, 1.5])
    assert {s.case for s in data.samples} == {0, 1}  # samples come from both scales
    assert data.volumes[1].key != volume.key  # and the zoomed copy has its own cache entries


def test_prompt_mix_gives_boxes_clicks_and_both(tmp_path: Path) -> None:
    engine = tiny_engine()
    voxels, labels = synthetic_pair()
    data = SliceData(engine, [(volume_of(voxels), labels)], None)
    for box_p, both_p, expected in ((1.0, 0.0, {"box"}), (0.0, 1.0, {"both"}), (0.0, 0.0, {"clicks"})):
        config = TrainConfig(batch_size=6, box_probability=box_p, box_click_probability=both_p)
        trainer = Trainer(engine, data, data.samples, data, config, tmp_path / "p.pt")
        samples = data.samples[:6]
        prompts = trainer._prompts(np.random.default_rng(0), samples, data.embeddings(samples, config.encoder_blocks))
        assert {p.kind for p in prompts} == expected
        for p, s in zip(prompts, samples):
            if p.clicks:
                assert p.clicks[0][2] == 1 and data.target(s)[int(p.clicks[0][1]), int(p.clicks[0][0])]
    assert Prompt(clicks=[(1.0, 2.0, 1)], box=(0, 0, 5, 5)).kind == "both"


def test_slab_boxes_cover_the_structure_on_the_nearby_slices(tmp_path: Path) -> None:
    """A structure that moves 3 voxels a slice: a slab box (slab_box_probability) spans its boxes on the slices
    within the drawn reach, up to all of them (an ROI's cross-section); without slab boxes a box is the slice's own."""
    voxels, _ = synthetic_pair(depth=8)
    labels = np.zeros(voxels.shape, np.uint8)
    for k in range(8):
        labels[k, 10:20, 3 * k + 2:3 * k + 12] = 1  # columns 3k+2 .. 3k+11
    engine = tiny_engine()
    data = SliceData(engine, [(volume_of(voxels), labels)], None)
    middle = next(s for s in data.samples if s.k == 4)
    for reach, columns in ((1, (11, 26)), (2, (8, 29)), (None, (2, 32))):
        cols = np.nonzero(data.around(middle, reach).any(axis=0))[0]
        assert (cols.min(), cols.max()) == columns, reach

    def boxes(slab_box_probability: float) -> list[tuple]:
        config = TrainConfig(batch_size=8, box_probability=1.0, box_click_probability=0.0,
                             slab_box_probability=slab_box_probability)
        trainer = Trainer(engine, data, data.samples, data, config, tmp_path / "p.pt")
        return [p.box for p in trainer._prompts(np.random.default_rng(0), [middle] * 64, None)]

    own = boxes(0.0)  # columns 14..23 on slice 4: each side moves by up to 10% of the side (10 columns)
    assert all(abs(b[0] - 14) <= 1 and abs(b[2] - 23) <= 1 for b in own), own
    slab = boxes(1.0)
    # the span of each reach's box: 1 -> columns 11..26, 2 -> 8..29, 4 and all -> 2..32 (8 slices)
    expected = (15, 21, 30)
    nearest = [min(expected, key=lambda e: abs((b[2] - b[0]) - e)) for b in slab]
    assert all(abs((b[2] - b[0]) - e) <= 2 * SLAB_BOX_JITTER * (e + 1) for b, e in zip(slab, nearest)), slab
    assert set(nearest) == set(expected), nearest  # every reach is drawn
    # rows 10..19 on every slice: a slab box's rows are the slice's own
    assert all(abs(b[1] - 10) <= SLAB_BOX_JITTER * 10 and abs(b[3] - 19) <= SLAB_BOX_JITTER * 10 for b in slab), slab


def test_box_samples_learn_the_teacher_not_the_labels(tmp_path: Path) -> None:
    """Box-only training with a teacher keeps the box answer near the teacher's; with labels it moves away."""
    voxels, labels = synthetic_pair()
    volume = volume_of(voxels)
    box = (6.0, 8.0, 21.0, 23.0)  # label 1's box (i0, j0, i1, j1)

    def box_logits_after(teacher) -> np.ndarray:
        engine = tiny_engine()
        data = SliceData(engine, [(volume, labels)], None)
        config = TrainConfig(steps=16, batch_size=4, lr=1e-3, eval_every=16, box_probability=1.0,
                             box_click_probability=0.0)
        train_on(engine, data, None, tmp_path / "t.pt", config, resume=False, teacher=teacher)
        return engine.predict(volume, 1, box=box)[0]

    teacher = tiny_engine()  # the same random backbone, untrained: its answer is the start point
    start = teacher.predict(volume, 1, box=box)[0]
    with_teacher = box_logits_after(teacher.model)
    with_labels = box_logits_after(None)
    drift = lambda logits: float(np.abs(torch.sigmoid(torch.from_numpy(logits)).numpy()
                                        - torch.sigmoid(torch.from_numpy(start)).numpy()).mean())
    assert drift(with_teacher) < 0.5 * drift(with_labels), (drift(with_teacher), drift(with_labels))


def test_train_cli_rejects_bad_scales_and_prompt_mixes(tmp_path: Path) -> None:
    data = write_pair(tmp_path)
    for bad in (["--scales", "1,zero"], ["--scales", "0"], ["--scales", "-1.5"],
                ["--box-probability", "0.7", "--box-click-probability", "0.5"], ["--box-probability", "-0.1"],
                ["--slab-box-probability", "1.5"]):
        assert msa.cli.main(["train", data, "--out", str(tmp_path / "a.pt"), "--backbone", "vit_tiny", *bad]) == 2
    assert not (tmp_path / "a.pt").exists()


def test_train_cli_box_teacher_switch(tmp_path: Path) -> None:
    """Box-only training through the CLI: with the teacher (default) and with --no-box-teacher the
    box targets differ (backbone answer vs labels), so the adapters must differ; zoomed scales run too."""
    data = write_pair(tmp_path)
    common = ["--backbone", "vit_tiny", "--steps", "3", "--eval-every", "3", "--seed", "0",
              "--box-probability", "1", "--box-click-probability", "0", "--scales", "1,1.5"]
    assert msa.cli.main(["train", data, "--out", str(tmp_path / "teacher.pt"), *common]) == 0
    assert msa.cli.main(["train", data, "--out", str(tmp_path / "labels.pt"), "--no-box-teacher", *common]) == 0
    teacher = read_checkpoint(tmp_path / "teacher.pt")["state_dict"]
    labels = read_checkpoint(tmp_path / "labels.pt")["state_dict"]
    assert teacher.keys() == labels.keys()
    assert any(not torch.equal(teacher[k], labels[k]) for k in teacher)


def test_encoder_blocks_train_only_the_last_blocks_adapters(tmp_path: Path) -> None:
    """--encoder-blocks 1: the last encoder block's adapters learn (on cached inputs of that block),
    every other encoder tensor stays bit-identical; the saved adapters carry them; the box teacher
    answers on the backbone's own embeddings, not on the student's adapted ones."""
    torch.manual_seed(0)
    engine = Engine(msa.build_model("lite_medsam_tiny", pretrained=False), store=FeatureStore(tmp_path / "features"))
    model = engine.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    voxels, labels = synthetic_pair()
    data = SliceData(engine, [(volume_of(voxels), labels)], None)
    teacher = copy_of_backbone(model)
    config = TrainConfig(steps=3, batch_size=2, eval_every=3, encoder_blocks=1, box_probability=0.5)
    train_on(engine, data, None, tmp_path / "b.pt", config, resume=False, teacher=teacher)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    encoder_changed = {k for k in changed if k.startswith("image_encoder.")}
    last = "image_encoder.layers.3.blocks.0."
    assert encoder_changed and all(k.startswith(last) and "_adapter." in k for k in encoder_changed), encoder_changed
    assert any(k.startswith("mask_decoder.") for k in changed)
    assert not model.encoder_is_backbone()

    fresh = msa.build_model("lite_medsam_tiny", pretrained=False)
    fresh.load_state_dict({k: v for k, v in before.items()})
    msa.load_adapters(fresh, tmp_path / "b.pt")
    images = engine.model_input(volume_of(voxels), [0, 1])
    with torch.no_grad():
        assert torch.allclose(fresh.encode(images), model.encode(images), atol=1e-5)

        trainer = Trainer(engine, data, data.samples[:1], data, config, tmp_path / "c.pt", teacher)
        samples = data.samples[:2]
        student = data.embeddings(samples, config.encoder_blocks)
        expected = teacher.encode(torch.cat([engine.model_input(data.volumes[s.case], [s.k]) for s in samples]))
        got = trainer._teacher_embeddings(samples, student)
    # The stored trunks are float16 (measured: 1.5e-3 from the float32 pass); the student's adapters move
    # its embeddings by ~1.
    assert torch.allclose(got, expected, atol=5e-3)
    assert not torch.allclose(student, expected, atol=5e-2)


def copy_of_backbone(model: msa.MSA) -> msa.MSA:
    """The model's backbone without adapters' effect: same weights, adapters left at zero."""
    teacher = msa.build_model("lite_medsam_tiny", pretrained=False)
    teacher.load_state_dict({k: v for k, v in model.state_dict().items() if "_adapter." not in k}, strict=False)
    return teacher.eval()


def test_train_cli_encoder_blocks_checks(tmp_path: Path) -> None:
    data = write_pair(tmp_path)
    out = str(tmp_path / "a.pt")
    common = ["--backbone", "vit_tiny", "--steps", "2", "--eval-every", "2"]
    for bad in (["--encoder-blocks", "-1"], ["--encoder-blocks", "5"], ["--encoder-blocks", "1", "--train-encoder"]):
        assert msa.cli.main(["train", data, "--out", out, *common, *bad]) == 2, bad
    assert not (tmp_path / "a.pt").exists()
    assert msa.cli.main(["train", data, "--out", out, *common, "--encoder-blocks", "2"]) == 0
    state = read_checkpoint(out)["state_dict"]
    assert any(k.startswith("image_encoder.blocks.3.") and ".up." in k and state[k].any() for k in state)
    assert not any(k.startswith("image_encoder.blocks.1.") and ".up." in k and state[k].any() for k in state)
