"""freezert.integrations.transformers: a real transformers.Trainer on a tiny BERT (built from a config, nothing
downloaded) with a FrozenModel in the loop, default TrainingArguments: naive freezing's losses, eval_loss, metrics
and predictions; the Trainer drops the columns the model does not take; schedules step and checkpoint;
checkpoints load with from_pretrained."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers.Trainer needs it (the hf extra installs it)
warnings.filterwarnings("ignore", module="transformers")

import freezert  # noqa: E402
from freezert import Linear  # noqa: E402
from freezert.integrations.transformers import STATE_FILE, FreezertCallback  # noqa: E402


def tiny_bert():
    cfg = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=48,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=32,
        num_labels=3,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg)


class Data(torch.utils.data.Dataset):
    """Token ids, a mask and labels, plus a column the model does not take (``idx``): the Trainer drops it."""

    def __init__(self, n=32, seed=1):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 64, (n, 12), generator=g)
        self.mask = torch.ones(n, 12, dtype=torch.long)
        self.mask[::3, 8:] = 0
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i], "idx": i}


def train(model, tmp_path, name, callbacks=(), resume=None, **kw):
    args = dict(
        output_dir=str(tmp_path / name),
        per_device_train_batch_size=8,
        max_steps=8,
        learning_rate=1e-3,
        logging_steps=1,
        use_cpu=True,
        report_to=[],
        seed=0,
        save_strategy="no",
        disable_tqdm=True,
    )
    args.update(kw)
    trainer = transformers.Trainer(
        model=model, args=transformers.TrainingArguments(**args), train_dataset=Data(), callbacks=list(callbacks)
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_with_a_wrapped_bert_gives_naive_freezings_losses(tmp_path):
    naive = tiny_bert()
    for m in (naive.bert.embeddings, *naive.bert.encoder.layer[:2]):
        m.requires_grad_(False)
    _, ref = train(naive, tmp_path, "naive")
    fm = freezert.wrap(tiny_bert(), freeze=2)
    trainer, got = train(fm, tmp_path, "fz", callbacks=[FreezertCallback()])
    assert len(got) == 8 and got == pytest.approx(ref, rel=1e-4)
    for (n, a), b in zip(naive.named_parameters(), fm.module.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), n
    # config falls through; save_pretrained of the plain model writes config + plain keys that load back
    assert fm.config.num_hidden_layers == 4
    fm.module.save_pretrained(tmp_path / "out")
    back = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "out")
    for a, b in zip(back.parameters(), fm.module.parameters()):
        assert torch.equal(a, b)


def test_gradient_checkpointing_on_the_trainable_layers_gives_the_same_losses(tmp_path):
    naive = tiny_bert()
    for m in (naive.bert.embeddings, *naive.bert.encoder.layer[:2]):
        m.requires_grad_(False)
    _, ref = train(naive, tmp_path, "naive", max_steps=4, gradient_checkpointing=True)
    fm = freezert.wrap(tiny_bert(), freeze=2)
    _, got = train(fm, tmp_path, "fz", max_steps=4, gradient_checkpointing=True, callbacks=[FreezertCallback()])
    assert fm.module.bert.encoder.layer[3].gradient_checkpointing  # the call fell through to the user's model
    assert got == pytest.approx(ref, rel=1e-5)


def test_a_schedule_steps_with_the_trainer_and_resumes_from_its_checkpoint(tmp_path):
    fm = freezert.wrap(tiny_bert(), freeze=Linear(0.25, 1.0))
    trainer, _ = train(fm, tmp_path, "a", callbacks=[FreezertCallback()], save_strategy="steps", save_steps=4)
    assert fm.frozen_indices == [0, 1, 2]  # int((1 - .25) / .75 * 3) blocks at the end
    frozen = {id(p) for p in fm.frozen_parameters()}
    assert not frozen & {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert (tmp_path / "a" / "checkpoint-4" / STATE_FILE).exists()
    # resume at step 4 into a new model object: the Trainer must build its optimizer over what trained then
    fm2 = freezert.wrap(tiny_bert(), freeze=Linear(0.25, 1.0))
    cb = FreezertCallback()
    cb.load(fm2, str(tmp_path / "a" / "checkpoint-4"))
    at4 = fm2.frozen_indices
    assert at4 == [0]  # progress 0.5 -> int(1/3 * 3) = 1 block
    train(fm2, tmp_path, "a", callbacks=[cb], save_strategy="no", resume=str(tmp_path / "a" / "checkpoint-4"))
    assert fm2.frozen_indices == [0, 1, 2]
    for a, b in zip(fm.module.parameters(), fm2.module.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_unfreezing_under_the_trainer_adds_a_group_its_lr_scheduler_drives(tmp_path):
    from freezert import Unfreeze

    fm = freezert.wrap(tiny_bert(), freeze=Unfreeze(at=0.5, lr=5e-4, blocks=2))
    assert fm.frozen_indices == [0, 1]
    trainer, losses = train(fm, tmp_path, "u", callbacks=[FreezertCallback()])
    assert fm.frozen_indices == [] and len(losses) == 8
    groups = trainer.optimizer.param_groups
    assert len(groups) == 4  # the Trainer's decay / no-decay groups, and one new group for each
    assert all(g["lr"] < 5e-4 for g in groups[2:])  # the linear decay scheduled the new groups too
    layers = {id(p) for m in fm.module.bert.encoder.layer[:2] for p in m.parameters()}
    assert {id(p) for g in groups[2:] for p in g["params"]} == layers
    # the embeddings (the stem, frozen with block 0) train again too, in whichever group holds them
    in_opt = {id(p) for g in groups for p in g["params"]}
    assert all(p.requires_grad and id(p) in in_opt for p in fm.module.bert.embeddings.parameters())


def naive_bert():
    naive = tiny_bert()
    for m in (naive.bert.embeddings, *naive.bert.encoder.layer[:2]):
        m.requires_grad_(False)
    return naive


def accuracy(p):
    return {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}


def test_evaluate_and_predict_equal_the_plain_models_with_default_arguments(tmp_path):
    # Default TrainingArguments: no label_names, remove_unused_columns=True. The Trainer reads the label names and
    # the columns to keep from type(model).forward, which a FrozenModel's class takes from the wrapped model.
    got = []
    for name, model in (("naive", naive_bert()), ("fz", freezert.wrap(tiny_bert(), freeze=2))):
        seen = []
        model.register_forward_pre_hook(lambda m, a, kw, seen=seen: seen.append(set(kw)), with_kwargs=True)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / name), max_steps=4, use_cpu=True, report_to=[], save_strategy="no", seed=0
        )
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=Data(), eval_dataset=Data(16, seed=2), compute_metrics=accuracy
        )
        trainer.train()
        got.append((trainer.evaluate(), trainer.predict(Data(16, seed=3)), seen))
    (ev_n, pr_n, seen_n), (ev_f, pr_f, seen_f) = got
    assert {"eval_loss", "eval_accuracy"} <= set(ev_f)
    assert ev_f["eval_loss"] == pytest.approx(ev_n["eval_loss"], rel=1e-4)
    assert ev_f["eval_accuracy"] == ev_n["eval_accuracy"]
    assert pr_f.metrics["test_loss"] == pytest.approx(pr_n.metrics["test_loss"], rel=1e-4)
    assert (pr_f.label_ids == pr_n.label_ids).all()
    assert torch.allclose(torch.as_tensor(pr_f.predictions), torch.as_tensor(pr_n.predictions), rtol=1e-4, atol=1e-5)
    # the Trainer dropped the column the model does not take (idx), and only that one
    assert seen_f == seen_n and all(k >= {"input_ids", "attention_mask", "labels"} and "idx" not in k for k in seen_f)


def test_a_checkpoint_loads_with_from_pretrained(tmp_path):
    fm = freezert.wrap(tiny_bert(), freeze=2)
    assert isinstance(fm, transformers.BertForSequenceClassification)
    train(fm, tmp_path, "ck", callbacks=[FreezertCallback()], save_strategy="steps", save_steps=8)
    folder = tmp_path / "ck" / "checkpoint-8"
    assert (folder / "config.json").exists() and not (folder / STATE_FILE).exists()  # no schedule, no state
    back = transformers.BertForSequenceClassification.from_pretrained(folder)
    assert all(torch.equal(a, b) for a, b in zip(back.parameters(), fm.module.parameters()))


# transformers' Trainer._save calls save_pretrained (config.json + weights) only when isinstance(model,
# PreTrainedModel), else it writes the state dict alone, which from_pretrained cannot load: the class of a wrapped
# PreTrainedModel is a subclass of the model's class.
def test_save_model_round_trips_through_from_pretrained(tmp_path):
    fm = freezert.wrap(tiny_bert(), freeze=2)
    trainer, _ = train(fm, tmp_path, "s", max_steps=2)
    trainer.save_model(str(tmp_path / "saved"))
    back = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "saved")
    assert all(torch.equal(a, b) for a, b in zip(back.parameters(), fm.module.parameters()))
