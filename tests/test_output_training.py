"""Output-level training (progressive and e2e) on a tiny model: the top-k KL, learning, resume,
activation checkpointing, starting checkpoints, every state component and dtype."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from less_exp import checkpoints, eval as eval_job, factory, train as train_job
from less_exp.adapter import attention_modules, compression_of
from less_exp.errors import ConfigError
from less_exp.models import load_model
from less_exp.training import e2e, output, teacher
from tiny_training import EVAL, TINY, train_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

PROGRESSIVE = [*TINY, "training=progressive", "training.num_sequences=6", "training.epochs=2", "training.lr=3e-2"]
E2E = [*TINY, "training=e2e", "training.num_sequences=6", "training.epochs=2", "training.lr=3e-2", "training.save_every=2"]


# ------------------------------------------------------------------------------ the loss
def _full_kl(p_logits, q_logits):
    p, q = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return (p.exp() * (p - q)).sum(-1)


def test_top_k_kl_is_the_exact_kl_at_full_k_and_a_lower_bound_below():
    gen = torch.Generator().manual_seed(0)
    p_logits = 3 * torch.randn(2, 5, 50, generator=gen)
    q_logits = p_logits + torch.randn(2, 5, 50, generator=gen)
    full = _full_kl(p_logits, q_logits)
    exact = teacher.top_k_kl(q_logits, teacher.top_k_targets(p_logits, 50))
    torch.testing.assert_close(exact.double(), full, rtol=1e-5, atol=1e-6)
    previous = torch.zeros_like(full)
    for k in (1, 4, 16, 49):
        bound = teacher.top_k_kl(q_logits, teacher.top_k_targets(p_logits, k)).double()
        assert (bound >= -1e-6).all() and (bound <= full + 1e-5).all()
        assert (bound >= previous - 1e-5).all(), "keeping more tokens can only tighten the bound"
        previous = bound
    assert teacher.top_k_kl(p_logits, teacher.top_k_targets(p_logits, 8)).abs().max() < 1e-5


def test_top_k_targets_keep_the_leftover_mass_exactly():
    logits = torch.randn(3, 40)
    target = teacher.top_k_targets(logits, 10)
    total = torch.cat([target.logp, target.log_rest[:, None]], -1).logsumexp(-1)
    torch.testing.assert_close(total, torch.zeros(3), atol=1e-6, rtol=0)
    assert torch.equal(target.index, torch.log_softmax(logits, -1).topk(10).indices)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_top_k_kl_from_half_precision_logits_is_finite_and_close(dtype):
    gen = torch.Generator().manual_seed(1)
    p_logits = 4 * torch.randn(64, 1000, generator=gen)
    q_logits = p_logits + 0.3 * torch.randn(64, 1000, generator=gen)
    reference = _full_kl(p_logits.to(dtype), q_logits.to(dtype))
    kl = teacher.top_k_kl(q_logits.to(dtype), teacher.top_k_targets(p_logits.to(dtype), 64))
    assert torch.isfinite(kl).all() and (kl <= reference.float() + 1e-4).all()
    assert kl.mean() > 0.5 * reference.mean(), "64 of 1000 tokens hold most of a peaked distribution's KL"


# ------------------------------------------------------------------------------ progressive
def _states(root):
    return {layer: load_file(str(checkpoints.layer_file(root, layer))) for layer in sorted(checkpoints.done_layers(root))}


def _assert_same_states(a, b):
    ta, tb = _states(a), _states(b)
    assert ta.keys() == tb.keys() and ta
    for layer in ta:
        for key in ta[layer]:
            assert torch.equal(ta[layer][key], tb[layer][key]), f"layer {layer} {key} differs"


@pytest.fixture
def run(compose_config, tmp_path):
    def _run(base, *overrides, checkpoint="ckpt"):
        return train_job.train(compose_config("train", [*base, f"checkpoint={tmp_path / checkpoint}", *overrides]))

    return _run


def test_progressive_lowers_the_output_kl_layer_by_layer(run, tmp_path):
    metrics = run(PROGRESSIVE)
    assert metrics["complete"] and metrics["layers_trained"] == [0, 1]
    assert metrics["val_kl"] < 0.7 * metrics["initial_val_kl"]
    assert metrics["val_kl"] < metrics["plain_val_kl"]
    layers = metrics["layers"]
    assert layers["0"]["stage_first"] == 0 and layers["1"]["stage_first"] == 1
    assert layers["1"]["initial_val_kl"] < layers["0"]["initial_val_kl"], "stage 1 starts from stage 0's trained layer"
    manifest = checkpoints.read_manifest(tmp_path / "ckpt")
    assert manifest["training"] == {"mode": "progressive", "data": "wikitext2", "init_from": None, "window": 1, "after": "init"}
    assert not list((tmp_path / "ckpt" / "progress").glob("*.pt"))


def test_progressive_killed_mid_way_resumes_to_the_same_states(run, tmp_path, monkeypatch):
    run(PROGRESSIVE, checkpoint="whole")
    save, calls = checkpoints.save_progress, []

    def killed_in_stage_1_after_its_first_epoch(root, name, progress):
        save(root, name, progress)
        calls.append(name)
        if name == "stage_001":
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "save_progress", killed_in_stage_1_after_its_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        run(PROGRESSIVE, checkpoint="killed")
    monkeypatch.setattr(checkpoints, "save_progress", save)
    assert checkpoints.done_layers(tmp_path / "killed") == {0}
    assert checkpoints.load_progress(tmp_path / "killed", "stage_001")["epoch"] == 1
    resumed = run(PROGRESSIVE, checkpoint="killed")
    assert resumed["layers_trained"] == [1]
    _assert_same_states(tmp_path / "whole", tmp_path / "killed")
    whole = checkpoints.read_manifest(tmp_path / "whole")["layers"]["1"]["val_history"]
    assert checkpoints.read_manifest(tmp_path / "killed")["layers"]["1"]["val_history"] == whole


def test_progressive_from_a_layerwise_checkpoint_and_the_after_choice(run, tmp_path, compose_config):
    start = train_checkpoint(tmp_path / "layerwise", "training.epochs=2")
    init = run(PROGRESSIVE, f"training.init_from={start}", "training.window=2", "training.epochs=1", checkpoint="init")
    layerwise_kl = init["initial_val_kl"]
    assert init["val_kl"] <= layerwise_kl and init["layers"]["0"]["stage_last"] == 1
    assert checkpoints.read_manifest(tmp_path / "init")["training"]["init_from"] == str(start.resolve())
    plain_after = run(PROGRESSIVE, f"training.init_from={start}", "training.after=plain", "training.epochs=1",
                      checkpoint="plain_after")
    assert plain_after["layers"]["0"]["initial_val_kl"] != pytest.approx(layerwise_kl), \
        "with after=plain layer 1 runs the plain policy while layer 0 trains"
    metrics = eval_job.evaluate(compose_config("eval", [*EVAL, "task=perplexity", f"checkpoint={tmp_path / 'init'}"]))
    assert metrics["perplexity"] > 0


def test_a_start_from_another_setup_is_refused_naming_the_setting(run, tmp_path):
    start = train_checkpoint(tmp_path / "layerwise", "training.epochs=1")
    with pytest.raises(ConfigError, match=r"training\.init_from=.* holds states trained with .*recent.*8.*this job has .*recent.*6"):
        run(PROGRESSIVE, f"training.init_from={start}", "policy.recent=6")
    with pytest.raises(ConfigError, match=r"training\.init_from=.*nowhere: no manifest\.json"):
        run(PROGRESSIVE, f"training.init_from={tmp_path / 'nowhere'}")


# ------------------------------------------------------------------------------ e2e
def test_e2e_lowers_the_output_kl_and_loads_in_eval(run, tmp_path, compose_config):
    metrics = run(E2E)
    assert metrics["complete"] and metrics["val_kl"] < 0.7 * metrics["initial_val_kl"]
    assert metrics["val_kl"] < metrics["plain_val_kl"]
    assert checkpoints.read_manifest(tmp_path / "ckpt")["training"]["mode"] == "e2e"
    trained = eval_job.evaluate(compose_config("eval", [*EVAL, "task=perplexity", f"checkpoint={tmp_path / 'ckpt'}"]))
    assert torch.isfinite(torch.tensor(trained["perplexity"]))


def test_e2e_killed_between_epochs_steps_resumes_to_the_same_states(run, tmp_path, monkeypatch):
    run(E2E, checkpoint="whole")
    save = checkpoints.save_progress

    def killed_at_the_first_step_save(root, name, progress):
        save(root, name, progress)
        if progress["step"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "save_progress", killed_at_the_first_step_save)
    with pytest.raises(KeyboardInterrupt):
        run(E2E, checkpoint="killed")
    monkeypatch.setattr(checkpoints, "save_progress", save)
    saved = checkpoints.load_progress(tmp_path / "killed", "e2e")
    assert (saved["epoch"], saved["step"]) == (0, 2) and not checkpoints.done_layers(tmp_path / "killed")
    run(E2E, checkpoint="killed")
    _assert_same_states(tmp_path / "whole", tmp_path / "killed")


def _student(compose_config, *overrides, dtype="float32"):
    cfg = compose_config("train", [*E2E, f"model.dtype={dtype}", *overrides])
    model, _ = load_model(cfg.model, torch.device("cpu"))
    states = factory.make_states(cfg, model)
    comp = output.attach(cfg, model, states)
    return cfg, model, comp


def test_activation_checkpointing_gives_the_same_gradients(compose_config):
    _, model, comp = _student(compose_config, "feature_map.dropout=0.3")
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        comp.plain_layers = frozenset(range(len(comp.states)))
        target = teacher.top_k_targets(model(input_ids=ids).logits[:, :-1] * 3, 16)
        comp.plain_layers = frozenset()
    comp.states.requires_grad_(True).train()
    calls = []
    hook = attention_modules(model)[0].register_forward_pre_hook(lambda *a: calls.append(1))

    def grads():
        comp.states.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        output.losses(model, ids, target)[0].backward()
        return {n: p.grad.clone() for n, p in comp.states.named_parameters() if p.grad is not None}

    plain = grads()
    assert len(calls) == 1
    with e2e.checkpointed(model):
        checkpointed = grads()
    hook.remove()
    assert len(calls) == 3, "the checkpointed layer runs again in the backward pass"
    assert plain.keys() == checkpointed.keys() and any(g.abs().sum() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-8, msg=name)
    assert not model.training and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_e2e_trains_in_every_dtype(run, tmp_path, dtype):
    metrics = run(E2E, f"model.dtype={dtype}", "training.epochs=1", checkpoint=dtype)
    assert all(torch.isfinite(torch.tensor(v)) for v in (metrics["val_kl"], metrics["val_ppl"], metrics["initial_val_kl"]))
    history = checkpoints.read_manifest(tmp_path / dtype)["layers"]["0"]["train_history"]
    assert history and all(torch.isfinite(torch.tensor(history)))
    assert metrics["val_kl"] < metrics["initial_val_kl"]


@pytest.mark.parametrize(
    "state",
    [
        ["feature_map=elu1"],
        ["feature_map=performer"],
        ["feature_map=taylor"],
        ["feature_map=dijiang"],
        ["feature_map=hedgehog"],
        ["reweighting=leapformer", "feature_map.features=4"],
        ["normalizer=norm"],
        ["gating=decay", "gating.learned=true"],
        ["gating=scalar_gate"],
        ["feature_map=elu1", "gating=vector_gate"],
    ],
    ids=lambda s: "+".join(o.split("=")[1] for o in s if "." not in o.split("=")[0]),
)
def test_every_state_component_trains_on_the_output(run, compose_config, tmp_path, state):
    base = [o for o in E2E if not o.startswith("feature_map.")] if state[0].startswith("feature_map=") else E2E
    overrides = [*state, *(["feature_map.key_scale_init=1.0"] if state[0].startswith("feature_map=") else []),
                 "training.epochs=1", "training.save_every=null"]
    metrics = run(base, *overrides)
    assert torch.isfinite(torch.tensor(metrics["val_kl"])) and metrics["val_kl"] < metrics["initial_val_kl"]
    cfg = compose_config("train", [*base, *overrides])
    torch.manual_seed(cfg.seed)  # the job's untrained state
    untrained = factory.make_states(cfg, load_model(cfg.model, torch.device("cpu"))[0])[0].state_dict()
    trained = _states(tmp_path / "ckpt")[0]
    assert trained.keys() == untrained.keys()
    assert any(not torch.equal(trained[k], untrained[k].float()) for k in trained), "training moved the state"


def test_progressive_with_the_layer_mse_term(run, tmp_path):
    metrics = run(PROGRESSIVE, "training.mse_weight=10", "training.epochs=1")
    assert metrics["val_kl"] < metrics["initial_val_kl"]
    assert not list((tmp_path / "records").glob("stage_outputs/layer_*/*.pt")), "the stage's records are removed"


def test_plain_layers_run_the_policy_alone(compose_config):
    _, model, comp = _student(compose_config)
    ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        comp.plain_layers = frozenset(range(len(comp.states)))
        plain = model(input_ids=ids).logits
        comp.states = None
        reference = model(input_ids=ids).logits
    torch.testing.assert_close(plain, reference, rtol=0, atol=0)
    assert compression_of(model) is comp


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["training=progressive", "training.window=0"], r"training\.window=0 must be a positive integer"),
        (["training=progressive", "training.after=later"], r"training\.after='later' must be one of"),
        (["training=e2e", "training.top_k=0"], r"training\.top_k=0 must be a positive integer"),
        (["training=e2e", "training.epochs=true"], r"training\.epochs=True must be a positive integer"),
        (["experiment=layerwise_cpu", "training.layers_per_recording=true"], r"training\.layers_per_recording=True must be a positive integer or null \(null: every layer in one recording\)"),
        (["training=e2e", "training.save_every=0"], r"training\.save_every=0 must be a positive integer or null \(null: progress saved every epoch only\)"),
        (["training=progressive", "training.mse_weight=-1"], r"training\.mse_weight=-1"),
        (["training=e2e", "training.gradient_checkpointing=maybe"], r"training\.gradient_checkpointing='maybe' must be true or false"),
        (["training=e2e", "training.init_from=/no/such/folder"], r"training\.init_from=/no/such/folder: no manifest\.json"),
    ],
)
def test_bad_output_training_configs_fail_before_the_model_loads(compose_config, monkeypatch, overrides, match):
    def must_not_load(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(train_job, "load_model", must_not_load)
    with pytest.raises(ConfigError, match=match):
        train_job.train(compose_config("train", [*TINY, *overrides]))


def test_wandb_gets_the_loss_the_stage_kl_and_the_validation_perplexity(compose_config, tmp_path):
    from wandb_records import read_run

    train_job.train(compose_config("train", [*PROGRESSIVE, "logger=wandb", "training.epochs=1"]))
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    history = read_run(run_dir)["history"]
    assert any("stage_001/loss" in row and "stage_001/train_kl" in row for row in history)
    assert [row["stage_001/val_ppl"] for row in history if "stage_001/val_kl" in row]


def test_e2e_on_a_mixture_of_c4_and_wikitext(run):
    metrics = run(E2E, "data=c4_wikitext2", "training.num_sequences=8", "training.val_fraction=0.25")
    assert metrics["num_layers"] == 2 and metrics["val_kl"] < metrics["initial_val_kl"]
    assert metrics["layers"]["0"]["num_val"] == 2, "one validation window from each domain"


def test_a_non_finite_validation_is_an_error_not_a_result(run, tmp_path, monkeypatch):
    from less_exp.errors import NonFiniteError

    real, calls = output.evaluate, []

    def nan_after_the_start(*args):
        calls.append(1)
        return real(*args) if len(calls) <= 2 else {"kl": float("nan"), "ppl": float("nan")}

    monkeypatch.setattr(output, "evaluate", nan_after_the_start)
    with pytest.raises(NonFiniteError, match=r"validation KL / perplexity is nan"):
        run(E2E)
    assert not checkpoints.done_layers(tmp_path / "ckpt")
    assert '"status": "ok"' not in (tmp_path / "results.json").read_text()
