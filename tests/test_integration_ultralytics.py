"""freezert.integrations.ultralytics: one real Ultralytics epoch with the callback equals train(freeze=10)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("ultralytics")
np = pytest.importorskip("numpy")
Image = pytest.importorskip("PIL.Image")

from freezert._errors import CacheError, FreezeError  # noqa: E402
from freezert.integrations.ultralytics import (  # noqa: E402
    AUGMENTATION_ARGS,
    FROZEN_FILE,
    STORE_DIR,
    FreezertCallback,
    augmentation_in_use,
)


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
    # fp16 storage: one half-precision ulp of a rounding difference in the folded (and, on CPU, channels_last)
    # frozen prefix. AdamW (Ultralytics' choice for a short run) moves an element whose gradient is about zero by
    # about lr either way, so such a difference may flip the step of a lone element: allow two, by less than 1e-3.
    off = {}
    for k in sd_ref:
        far = ~torch.isclose(sd_ref[k], sd_fz[k], rtol=1e-3, atol=3e-4)
        if far.any():
            off[k] = (int(far.sum()), float((sd_ref[k] - sd_fz[k]).abs().max()))
    assert sum(n for n, _ in off.values()) <= 2 and all(d < 1e-3 for _, d in off.values()), off
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


def _trainer(**kw):
    """A stand-in for an Ultralytics trainer at on_pretrain_routine_end: the args the callback reads, a model."""
    base = dict.fromkeys(AUGMENTATION_ARGS, 0.0)
    base.update(close_mosaic=0, freeze=1, compile=False, epochs=5)
    base.update(kw)
    args = SimpleNamespace(**base)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    return SimpleNamespace(args=args, model=model, epochs=args.epochs, start_epoch=0, epoch=0)


def test_a_feature_cache_is_refused_under_augmentation_that_never_repeats():
    class Args:
        mosaic, fliplr, hsv_h, scale, freeze, compile = 1.0, 0.5, 0.0, (1.0, 1.0), 10, False

    assert augmentation_in_use(Args) == ["mosaic", "fliplr"]
    with pytest.raises(FreezeError, match=r"augmentation on \(hsv_h=0.015, translate=0.1\)"):
        FreezertCallback(feature_cache="fp16").on_pretrain_routine_end(_trainer(hsv_h=0.015, translate=0.1))
    with pytest.raises(FreezeError, match=r"augmentation on \(mosaic=1.0\).*close_mosaic=N"):
        FreezertCallback(feature_cache="fp16").on_pretrain_routine_end(_trainer(mosaic=1.0))  # close_mosaic=0
    with pytest.raises(FreezeError, match="augmentations="):
        FreezertCallback(feature_cache="fp16").on_pretrain_routine_end(_trainer(augmentations=["Blur"]))
    tr = _trainer(hsv_h=0.015)
    FreezertCallback(feature_cache="fp16", allow_augmented_cache=True).on_pretrain_routine_end(tr)
    assert type(tr.model).__name__ == "_TrainerModel"


def test_flips_are_served_and_mosaic_defers_the_cache_to_close_mosaic():
    tr = _trainer(fliplr=0.5, flipud=0.5, bgr=0.1)  # finite variants: each is a row of its own
    cb = FreezertCallback(feature_cache="fp16")
    cb.on_pretrain_routine_end(tr)
    assert type(tr.model).__name__ == "_TrainerModel" and cb.frozen.cache is cb.store
    assert cb.store.where == "disk" and cb.store.path is None  # no save_dir here: a temporary store
    tr = _trainer(mosaic=1.0, mixup=0.2, close_mosaic=2, fliplr=0.5, epochs=5)
    cb = FreezertCallback(feature_cache="fp16")
    cb.on_pretrain_routine_end(tr)
    plain = cb.frozen.module
    for epoch, cached in ((0, False), (2, False), (3, True), (4, True)):  # Ultralytics closes mosaic at epoch 5 - 2
        tr.epoch = epoch
        cb.on_train_epoch_start(tr)
        assert (cb.frozen.cache is not None) == cached, epoch
        assert tr.model.frozen is cb.frozen and cb.frozen.module is plain
    cb.on_train_end(tr)
    assert tr.model is plain and cb.store is None  # the store the callback made is closed


def test_cache_is_the_old_name_of_feature_cache():
    with pytest.warns(DeprecationWarning, match="feature_cache="):
        cb = FreezertCallback(cache="fp16", freeze=1)
    assert cb.feature_cache == cb.cache == "fp16"
    tr = _trainer()
    cb.on_pretrain_routine_end(tr)
    assert cb.frozen.cache is not None
    with pytest.raises(FreezeError, match="feature_cache= only"):
        FreezertCallback(cache="fp16", feature_cache="fp16")
    with pytest.raises(FreezeError, match="feature_cache=3"):
        FreezertCallback(feature_cache=3)


def test_register_needs_an_ultralytics_object():
    with pytest.raises(FreezeError, match="YOLO model or trainer"):
        FreezertCallback().register(object())


NO_AUGMENTATION = dict(mosaic=0.0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, translate=0.0, scale=0.0, fliplr=0.0)


@pytest.mark.slow
def test_the_feature_store_lives_beside_the_checkpoints_and_a_resume_reopens_it(tmp_path, monkeypatch):
    """An interrupted run's rows are served to train(resume=True) from <save_dir>/freezert_cache; a run of another
    frozen setup into that folder is refused, as any store of another setup is."""
    from ultralytics import YOLO

    monkeypatch.setenv("YOLO_OFFLINE", "1")
    data = make_dataset(tmp_path / "ds")

    class Interrupt(Exception):
        pass

    def interrupt(trainer):
        raise Interrupt

    def watch(cb, seen, weights):
        def on_train_epoch_end(trainer):
            st = cb.frozen.cache.stats()
            seen.append((trainer.epoch, st["hits"], st["misses"]))
            weights.append({k: v.clone() for k, v in cb.frozen.module.model[:10].state_dict().items()})

        return on_train_epoch_end

    run = dict(imgsz=64, batch=4, workers=0, device="cpu", plots=False, amp=False, val=False, verbose=False)
    run.update(NO_AUGMENTATION, project=str(tmp_path / "runs"), name="r", exist_ok=True)
    model = YOLO("yolov8n.yaml")
    cb = FreezertCallback(feature_cache="fp16").register(model)
    seen: list = []
    frozen: list = []
    model.add_callback("on_train_epoch_end", watch(cb, seen, frozen))
    model.add_callback("on_fit_epoch_end", interrupt)
    with pytest.raises(Interrupt):
        model.train(data=str(data), epochs=2, freeze=10, **run)
    store = tmp_path / "runs" / "r" / STORE_DIR
    assert (store / "header.json").exists() and (store / "index.pt").exists()  # written with last.pt
    assert (tmp_path / "runs" / "r" / FROZEN_FILE).exists()
    assert seen == [(0, 0, 8)]  # 8 training images stored once
    cb.store.close()  # the interrupted process ends here (releasing its lock on the store)

    resumed = YOLO(tmp_path / "runs" / "r" / "weights" / "last.pt")
    cb2 = FreezertCallback(feature_cache="fp16").register(resumed)
    seen2: list = []
    resumed.add_callback("on_train_epoch_end", watch(cb2, seen2, frozen))
    resumed.train(resume=True, data=str(data))
    assert seen2 == [(1, 8, 0)]  # every image of the resumed epoch served from the store, nothing recomputed
    # last.pt holds the weights in float16; the callback gave the resumed run the exact frozen weights back
    assert frozen[0].keys() == frozen[1].keys()
    assert all(torch.equal(frozen[0][k], frozen[1][k]) for k in frozen[0])
    assert any(not torch.equal(v, v.half().float()) for v in frozen[0].values() if v.is_floating_point())
    assert cb2.store is None and cb2.frozen._unwrapped  # closed and unwrapped at on_train_end

    other = YOLO("yolov8n.yaml")
    FreezertCallback(feature_cache="fp16").register(other)
    with pytest.raises(CacheError, match="holds features of fingerprint"):
        other.train(data=str(data), epochs=1, freeze=8, **run)


@pytest.mark.slow
def test_mosaic_runs_uncached_until_close_mosaic_then_the_cache_serves_flips(tmp_path, monkeypatch):
    """A real run with mosaic on and close_mosaic=1: epoch 0 runs the prefix uncached, the callback wraps the model
    again with the cache at epoch 1's start (the optimizer and the EMA keep their parameters), and training goes on."""
    from ultralytics import YOLO

    monkeypatch.setenv("YOLO_OFFLINE", "1")
    data = make_dataset(tmp_path / "ds")
    model = YOLO("yolov8n.yaml")
    cb = FreezertCallback(feature_cache="fp16").register(model)
    seen = []

    def look(trainer):
        fm = cb.frozen
        in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        trains = {id(p) for p in fm.module.parameters() if p.requires_grad}
        st = None if fm.cache is None else (fm.cache.stats()["lookups"], fm.cache.stats()["misses"])
        seen.append((trainer.epoch, st, trains <= in_opt, unwrap(trainer.model) is fm.module))

    model.add_callback("on_train_epoch_end", look)
    run = dict(imgsz=64, batch=4, workers=0, device="cpu", plots=False, amp=False, val=False, verbose=False)
    run.update(NO_AUGMENTATION, mosaic=1.0, close_mosaic=1, fliplr=0.5)
    model.train(data=str(data), epochs=2, freeze=10, project=str(tmp_path / "runs"), name="m", **run)
    assert seen == [(0, None, True, True), (1, (8, 8), True, True)]
    assert cb.store is None  # closed at the end


def unwrap(m):
    from ultralytics.utils.torch_utils import unwrap_model

    return unwrap_model(m)
