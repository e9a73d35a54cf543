"""One record per algorithm: the registry is built from the modules' RECORDs, and config validation asks them."""

from __future__ import annotations

import types

import pytest

import metatrain.pipeline.algorithms as algorithms
from metatrain.pipeline.algorithms import (
    ALGORITHMS,
    AlgorithmConfig,
    AlgorithmConfigError,
    AlgorithmRecord,
    algorithm_names,
    get_algorithm,
    get_record,
    register,
    unregister,
)
from metatrain.pipeline.algorithms.gradient import maml
from metatrain.pipeline.algorithms.learned import meta_lstm
from metatrain.pipeline.config import MODEL_NAMES, Config, ConfigError, DataConfig, ModelConfig


def test_every_registered_module_has_its_record():
    assert ALGORITHMS == algorithm_names() and len(set(ALGORITHMS)) == len(ALGORITHMS)
    for name in ALGORITHMS:
        module = get_algorithm(name)
        assert isinstance(module.RECORD, AlgorithmRecord)
        assert module.RECORD.name == name == module.NAME
        assert get_record(name) is module.RECORD
        assert module.RECORD.family in ("gradient", "memory", "metric", "learned", "sequence", "fastweight")
        assert module.RECORD.models and set(module.RECORD.models) <= set(MODEL_NAMES)
        for f in algorithms.INTERFACE:
            assert callable(getattr(module, f))


def test_records_agree_with_the_modules():
    for name in ALGORITHMS:
        rec = get_record(name)
        if rec.family == "gradient":
            assert rec.adapts_weights and rec.predict == "adapt"
        elif rec.optimizee_tasks:  # a learned optimizer: no few-shot episodes, nothing to predict
            assert rec.family == "learned" and rec.predict == "none" and not rec.adapts_weights
        else:  # a learned update rule writes the weights; memory and metric learners leave them
            assert rec.adapts_weights == (rec.family == "learned")
        assert (rec.predict == "none") == rec.optimizee_tasks
        if rec.predict in ("softmax", "sigmoid", "probability"):
            assert callable(get_algorithm(name).scores)
        # only the sequence models (Santoro sequences, SNAIL) batch on the CPU
        assert rec.auto_batched == (rec.sequence_episodes or rec.family == "sequence")
    prefixes = [get_record(n).param_prefix for n in ALGORITHMS if get_record(n).param_prefix]
    assert prefixes == [algorithms.LR_PREFIX, meta_lstm.PREFIX]  # Meta-SGD's rates (old checkpoints load), the LSTM
    assert len(set(prefixes)) == len(prefixes)


def test_forbidden_settings_come_from_the_record():
    forbidding = {n: get_record(n).forbidden for n in ALGORITHMS if get_record(n).forbidden}
    assert forbidding, "some algorithm forbids a setting"
    for name, forbidden in forbidding.items():
        for setting, _ in forbidden:
            assert not get_record(name).first_order_allowed or setting != "first_order"
            with pytest.raises(AlgorithmConfigError, match=rf"^{setting}: "):
                AlgorithmConfig(name=name, **{setting: True})


def test_unknown_name_names_the_field():
    with pytest.raises(AlgorithmConfigError, match=r"^name: unknown 'mamll' \(did you mean 'maml'\?"):
        AlgorithmConfig(name="mamll")
    with pytest.raises(AlgorithmConfigError, match=r"^algorithm: unknown"):
        get_algorithm("nope")


def test_config_errors_name_the_field():
    gradient = next(n for n in ALGORITHMS if get_record(n).family == "gradient")
    with pytest.raises(ConfigError, match=r"model\.name"):
        Config(model=ModelConfig(name=get_record("protonet").models[0]), algorithm=AlgorithmConfig(name=gradient))
    with pytest.raises(ConfigError, match=r"data\.eval_ways"):
        Config(data=DataConfig(ways=5, eval_ways=10), algorithm=AlgorithmConfig(name=gradient))


def _toy_module(name: str, **record) -> types.ModuleType:
    """A throw-away algorithm in one module: MAML's functions under a new record."""
    mod = types.ModuleType(f"toy_{name}")
    mod.RECORD = AlgorithmRecord(name=name, family="gradient", models=("conv4", "mlp"), predict="adapt",
                                 adapts_weights=True, **record)
    mod.NAME = name
    for f in algorithms.INTERFACE:
        setattr(mod, f, getattr(maml, f))
    return mod


def test_an_algorithm_registers_from_one_module():
    mod = _toy_module("toy", forbidden=(("per_step_bn", "toy has no per-step batch norm"),), eval_ways_free=True)
    with pytest.raises(AlgorithmConfigError, match="name: unknown 'toy'"):
        AlgorithmConfig(name="toy")
    register(mod)
    try:
        assert get_algorithm("toy") is mod and "toy" in algorithm_names() and "toy" not in ALGORITHMS
        cfg = Config(data=DataConfig(ways=5, eval_ways=10), algorithm=AlgorithmConfig(name="toy"))
        assert cfg.algorithm.record is mod.RECORD and not cfg.sequence_episodes
        with pytest.raises(AlgorithmConfigError, match="^per_step_bn: toy has no per-step batch norm"):
            AlgorithmConfig(name="toy", per_step_bn=True)
        with pytest.raises(AlgorithmConfigError, match="already registered"):
            register(_toy_module("toy"))
    finally:
        unregister("toy")
    assert "toy" not in algorithm_names()


def test_register_checks_the_module():
    with pytest.raises(AlgorithmConfigError, match="RECORD"):
        register(types.ModuleType("empty"))
    half = _toy_module("half")
    del half.evaluate
    with pytest.raises(AlgorithmConfigError, match="evaluate"):
        register(half)
    assert "half" not in algorithm_names()


def test_gradient_modules_share_one_implementation():
    from metatrain.pipeline.algorithms.gradient import anil, fomaml, metasgd

    for mod in (maml, fomaml, metasgd, anil):
        assert mod.adapt.__qualname__ == "interface.<locals>.adapt"
        assert mod.SPEC.algo == mod.RECORD.name
    assert metasgd.init_extra_params.__module__ == metasgd.__name__
