"""freezert.integrations.ultralytics: one real Ultralytics epoch with the callback equals train(freeze=10)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("ultralytics")
np = pytest.importorskip("numpy")
Image = pytest.importorskip("PIL.Image")

from freezert._errors import FreezeError  # noqa: E402
from freezert.integrations.ultralytics import FreezertCallback, augmentation_in_use  # noqa: E402


def make_dataset(root):
    """Eight 64 px training images (four for validation), one coloured box each, YOLO labels, a data yaml."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            img = (rng.random((64, 64, 3)) * 60).astype(np.uint8)
            x0, y0 = rng.integers(4, 30, 2)
            w, h = rng.integers(12, 30, 2)
            img[y0 : y0 + h, x0 : x0 + w] = rng.integers(150, 255, 3)
            Image.fromarray(img).save(root / "images" / split / f"{i}.png")
            cx, cy = (x0 + w / 2) / 64, (y0 + h / 2) / 64
            (root / "labels" / split / f"{i}.txt").write_text(f"0 {cx:.5f} {cy:.5f} {w / 64:.5f} {h / 64:.5f}\n")
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: box\n")
    return root / "data.yaml"


def train(data, project, name, callback=None, **kw):
    from ultralytics import YOLO

    model = YOLO("yolov8n.yaml")
    seen = {}
    if callback is not None:
        callback.register(model)

        def on_train_epoch_end(trainer):  # mid-training view of what the trainer holds
            seen["model"] = type(trainer.model).__name__
            seen["segment"] = callback.frozen.segment is not None
            seen["unwrapped"] = type(__import__("ultralytics").utils.torch_utils.unwrap_model(trainer.model)).__name__

        model.add_callback("on_train_epoch_end", on_train_epoch_end)
    args = dict(
        data=str(data),
        imgsz=64,
        epochs=1,
        batch=4,
        workers=0,
        device="cpu",
        plots=False,
        freeze=10,
        seed=0,
        deterministic=True,
        amp=False,
        project=str(project),
        name=name,
        exist_ok=True,
        verbose=False,
    )
    args.update(kw)
    model.train(**args)
    return model, seen


@pytest.mark.slow
def test_one_epoch_with_the_callback_equals_ultralytics_freeze(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    data = make_dataset(tmp_path / "ds")
    ref, _ = train(data, tmp_path / "runs", "ref")
    cb = FreezertCallback()
    fz, seen = train(data, tmp_path / "runs", "fz", callback=cb)
    assert seen == {"model": "_TrainerModel", "segment": True, "unwrapped": "DetectionModel"}
    for k, v in ref.trainer.tloss.items():
        assert torch.allclose(fz.trainer.tloss[k], v, rtol=1e-5, atol=1e-6), k
    # The plain model was handed back at on_train_end; the checkpoint holds a plain DetectionModel equal to the
    # reference's.
    assert cb.frozen._unwrapped
    ck_ref = torch.load(tmp_path / "runs" / "ref" / "weights" / "last.pt", weights_only=False)
    ck_fz = torch.load(tmp_path / "runs" / "fz" / "weights" / "last.pt", weights_only=False)
    assert type(ck_fz["model"]).__name__ == "DetectionModel"  # strip_optimizer moved the EMA to "model"
    sd_ref, sd_fz = ck_ref["model"].float().state_dict(), ck_fz["model"].float().state_dict()
    assert sd_ref.keys() == sd_fz.keys()
    for k in sd_ref:
        # fp16 storage: one half-precision ulp of a rounding difference in the folded frozen prefix
        assert torch.allclose(sd_ref[k], sd_fz[k], rtol=1e-3, atol=3e-4), k
    assert ref.trainer.metrics == pytest.approx(fz.trainer.metrics, rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_an_interrupted_run_resumes_with_the_callback(tmp_path, monkeypatch):
    """Ultralytics' resume (train(resume=True) on an interrupted run's last.pt) keeps freeze=10; the callback
    wraps the resumed trainer's model again."""
    from ultralytics import YOLO

    monkeypatch.setenv("YOLO_OFFLINE", "1")
    data = make_dataset(tmp_path / "ds")

    class Interrupt(Exception):
        pass

    def interrupt(trainer):  # after epoch 0's last.pt is written, before training ends (which strips it)
        raise Interrupt

    model = YOLO("yolov8n.yaml")
    FreezertCallback().register(model)
    model.add_callback("on_fit_epoch_end", interrupt)
    with pytest.raises(Interrupt):
        model.train(
            data=str(data),
            imgsz=64,
            epochs=2,
            batch=4,
            workers=0,
            device="cpu",
            plots=False,
            freeze=10,
            amp=False,
            val=False,
            project=str(tmp_path / "runs"),
            name="r",
            exist_ok=True,
            verbose=False,
        )
    resumed = YOLO(tmp_path / "runs" / "r" / "weights" / "last.pt")
    cb = FreezertCallback().register(resumed)
    seen = []
    resumed.add_callback("on_train_epoch_start", lambda tr: seen.append((tr.epoch, cb.frozen.frozen_indices)))
    resumed.train(resume=True, data=str(data))
    assert seen == [(1, list(range(10)))]


@pytest.mark.slow
def test_a_schedule_steps_at_epoch_starts_and_leaves_the_optimizer(tmp_path, monkeypatch):
    from ultralytics import YOLO

    from freezert import Linear

    monkeypatch.setenv("YOLO_OFFLINE", "1")
    data = make_dataset(tmp_path / "ds")
    model = YOLO("yolov8n.yaml")
    cb = FreezertCallback(freeze=Linear(0.0, 1.0)).register(model)
    seen = []

    def look(trainer):
        in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        frozen = {id(p) for p in cb.frozen.frozen_parameters()}
        seen.append((trainer.epoch, cb.frozen.frozen_indices, bool(frozen & in_opt)))

    model.add_callback("on_train_batch_start", look)
    model.train(
        data=str(data),
        imgsz=64,
        epochs=2,
        batch=8,
        workers=0,
        device="cpu",
        plots=False,
        amp=False,
        val=False,
        project=str(tmp_path / "runs"),
        name="s",
        exist_ok=True,
        verbose=False,
    )
    n = len(cb.frozen.blocks)
    assert seen == [(0, [], False), (1, list(range(int(0.5 * (n - 1)))), False)]


def test_cache_is_refused_under_augmentation():
    class Args:
        mosaic, fliplr, hsv_h, scale, freeze, compile = 1.0, 0.5, 0.0, (1.0, 1.0), 10, False

    assert augmentation_in_use(Args) == ["mosaic", "fliplr"]

    class Trainer:
        args = Args
        model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))

    with pytest.raises(FreezeError, match="mosaic=1.0, fliplr=0.5"):
        FreezertCallback(cache="fp16").on_pretrain_routine_end(Trainer)
    Args.mosaic = Args.fliplr = 0.0
    FreezertCallback(cache="fp16", freeze=1).on_pretrain_routine_end(Trainer)
    assert type(Trainer.model).__name__ == "_TrainerModel"


def test_register_needs_an_ultralytics_object():
    with pytest.raises(FreezeError, match="YOLO model or trainer"):
        FreezertCallback().register(object())
