"""Server settings: every field is a flag and a POLYPROMPT_* variable; a flag wins."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="POLYPROMPT_", extra="ignore", protected_namespaces=())

    model: str = "gpt2"
    db: str | None = None  # default: SQLite file in data_dir
    data_dir: str = "polyprompt-data"
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (float16 on CUDA, float32 on CPU) | float32 | float16 | bfloat16
    max_batch_size: int = 64  # running sequences (KV-cache slots)
    max_queue: int = 1024  # waiting requests before 503
    max_queue_wait: float = 30.0  # seconds: 503 at once when the expected queue wait is longer; 0 = off
    drain_timeout: float = 30.0  # seconds after SIGTERM for running requests to finish
    max_num_batched_tokens: int = 2048  # tokens per forward pass (prefill chunking budget)
    kv_cache_gb: float = 6.0  # memory budget of the KV cache
    prefix_cache_mb: float = 1024.0  # memory cap of the per-task prefix-KV cache
    admission_window_ms: float = 10.0  # an idle engine waits until arrivals pause this long...
    admission_max_wait_ms: float = 200.0  # ...but no longer than this, to batch a burst
    cuda_graphs: bool = True  # capture decode steps on CUDA
    engine_main_thread: bool = True  # engine loop on the main thread, HTTP on another
    api_key: str | None = None
    admin_key: str | None = None
    reload_interval: float = 0.5  # seconds between registry change polls
    max_body_mb: float = 64.0  # larger bodies get 413
    log_level: str = "info"

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * (1 << 20))
