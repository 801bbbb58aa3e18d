"""EngineConfig refuses settings the engine would fail on later (or silently misread), each with
an error naming the setting, before any model is loaded."""

import pytest

from tandem_worker.engine.config import EngineConfig


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"block_size": 12}, "block_size must be a power of two"),
        ({"kv_cache_bytes": 0}, "kv_cache_bytes must be positive"),
        ({"kv_cache_memory_fraction": 1.5}, "kv_cache_memory_fraction must be in"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens must be at least 1"),
        ({"max_num_seqs": 0}, "max_num_seqs must be at least 1"),
        ({"max_model_len": 1}, "max_model_len must be at least 2"),
        ({"kv_send_backlog_bytes": 0}, "kv_send_backlog_bytes and kv_send_backlog_total_bytes"),
        ({"admission_watermark_blocks_per_seq": -1}, "admission_watermark_blocks_per_seq must be >= 0"),
        ({"lora_files_check_interval_s": -1.0}, "lora_files_check_interval_s must be >= 0"),
        ({"load_format": "pt"}, "load_format must be"),
        ({"cuda_graph_max_batch": -1}, "cuda_graph_max_batch must be >= 0"),
        ({"cuda_graph_max_lora_rank": -1}, "cuda_graph_max_lora_rank must be >= 0"),
        ({"cuda_graph_lora_fold_rank": -1}, "cuda_graph_lora_fold_rank must be >= 0"),
        ({"device": "tpu"}, "is not a device name"),
        ({"device": "mps"}, "Tandem runs on cpu or cuda"),
    ],
)
def test_bad_settings_are_refused_by_name(setting, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**setting)


def test_the_admission_watermark_reaches_the_scheduler(model_dir):
    from tandem_worker.engine.llm_engine import LLMEngine

    engine = LLMEngine(model=str(model_dir), kv_cache_bytes=4 * 2**20, admission_watermark_blocks_per_seq=0)
    assert engine.scheduler.watermark_blocks_per_seq == 0
    assert LLMEngine(model=str(model_dir), kv_cache_bytes=4 * 2**20).scheduler.watermark_blocks_per_seq == 1


def test_the_adapter_files_check_interval_reaches_the_lora_manager(model_dir):
    from tandem_worker.engine.llm_engine import LLMEngine

    engine = LLMEngine(model=str(model_dir), kv_cache_bytes=4 * 2**20, lora_files_check_interval_s=0.0)
    assert engine.lora.files_check_interval_s == 0.0
