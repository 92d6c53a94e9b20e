"""`align.stages.sharded`: after training under FSDP or ZeRO-3 the main process gets a whole, unsharded copy
with the trained weights (gathered state dict loaded into a fresh build); other engines keep the trainer's
model; gathered weights that do not fit the model are refused. The sharded engine is faked here (one
process, no GPUs): what is checked is the rebuild-and-load step main runs after the collective gather."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from align.errors import TrainingError
from align.stages.sharded import shards_parameters, trained_model


def _lora(tiny_base, seed: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(model, config)


def _trainer(model, distributed_type, zero_stage=None, state=None):
    plugin = SimpleNamespace(zero_stage=zero_stage)
    accelerator = SimpleNamespace(distributed_type=distributed_type, state=SimpleNamespace(deepspeed_plugin=plugin),
                                  get_state_dict=lambda wrapped: state if state is not None else wrapped.state_dict())
    return SimpleNamespace(accelerator=accelerator, model=model, model_wrapped=model,
                           args=SimpleNamespace(device=torch.device("cpu")))


def test_only_fsdp_and_zero3_count_as_sharding():
    assert shards_parameters(_trainer(None, DistributedType.FSDP).accelerator)
    assert shards_parameters(_trainer(None, DistributedType.DEEPSPEED, 3).accelerator)
    assert not shards_parameters(_trainer(None, DistributedType.DEEPSPEED, 2).accelerator)
    assert not shards_parameters(_trainer(None, DistributedType.MULTI_GPU).accelerator)


def test_a_replicated_engine_keeps_the_trainers_model(tiny_base):
    model = _lora(tiny_base, 0)
    assert trained_model(_trainer(model, DistributedType.MULTI_CPU), lambda: pytest.fail("rebuilt")) is model


def test_a_sharded_engine_gives_main_a_fresh_copy_with_the_trained_weights(tiny_base):
    trained = _lora(tiny_base, 0)
    copy = trained_model(_trainer(trained, DistributedType.FSDP), lambda: _lora(tiny_base, 1))
    assert copy is not trained
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(copy(ids).logits, trained(ids).logits)
        assert not torch.allclose(_lora(tiny_base, 1)(ids).logits, trained(ids).logits)  # the rebuild alone differs


def test_gathered_weights_missing_a_trained_tensor_are_refused(tiny_base):
    trained = _lora(tiny_base, 0)
    state = {k: v for k, v in trained.state_dict().items() if "lora_A" not in k}
    with pytest.raises(TrainingError, match="trained weights missing"):
        trained_model(_trainer(trained, DistributedType.FSDP, state=state), lambda: _lora(tiny_base, 1))
