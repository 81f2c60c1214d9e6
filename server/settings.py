"""`polyprompt serve` settings: every field is a flag and a POLYPROMPT_* variable (generated,
see `registry.settings`); a flag wins. `engine_config` is the one place their names map to
the engine's (which imports no settings library)."""

from __future__ import annotations

from pydantic import Field

from registry.settings import ENV_ONLY, RegistrySettings


class Settings(RegistrySettings):
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, description="port")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    dtype: str = Field("auto", description="auto (float16 on CUDA, float32 on CPU), float32, float16, bfloat16")
    quantize: str = Field("none", description="none, or int8: every matmul on per-channel int8 weights with "
                          "each row's activations quantized on the fly (CPU with AVX512-VNNI; changes outputs "
                          "slightly, see the README)")
    kv_cache_dtype: str = Field("auto", description="auto (the model's dtype), or int8: keys and values as int8 "
                                "with a float32 scale per head and position (CPU with the native kernels; about "
                                "half a bf16 cache's memory and decode-attention reads; changes outputs slightly, "
                                "see the README)")
    max_batch_size: int = Field(128, description="running sequences at once (KV-cache slots; also capped by "
                                "--kv-cache-gb)")
    max_queue: int = Field(1024, description="waiting requests before 503")
    max_queue_wait: float = Field(30.0, description="seconds: a request whose expected queue wait is longer "
                                                    "gets 503 at once; 0 = off")
    drain_timeout: float = Field(30.0, description="seconds after SIGTERM for accepted requests to finish "
                                                   "before they are ended")
    target_utilisation: float = Field(0.9, gt=0, le=1, description="the engine's busy share (time in its step "
                                      "over wall time, last 10 s) this replica aims to stay under: /health and "
                                      "/metrics report it next to the measured share, for readiness and autoscaling")
    max_num_batched_tokens: int = Field(2048, description="tokens per forward pass (prefill chunk budget)")
    kv_cache_gb: float = Field(10.0, description="KV-cache memory budget (allocated up front, its pages "
                               "touched as slots fill: 128 slots of 1,024 positions of the 124M model in fp32 "
                               "are 9.7 GB)")
    prefix_cache_mb: float = Field(1024.0, description="prefix-KV cache memory cap")
    response_cache_mb: float = Field(64.0, ge=0, description="memory cap of the cache of answers to identical "
                                     "deterministic requests (greedy or seeded, same task version, prompt and "
                                     "sampling fields); 0 = off")
    admission_window_ms: float = Field(10.0, description="an idle engine starts once arrivals pause this long "
                                                         "(batches a burst)")
    admission_max_wait_ms: float = Field(200.0, description="longest an idle engine waits for a burst to finish "
                                                            "arriving")
    cuda_graphs: bool = Field(True, description="capture decode steps as CUDA graphs on GPU")
    engine_main_thread: bool = Field(True, description="run the engine loop on the main thread, HTTP on another "
                                                       "(--engine-thread: the engine on a secondary thread)")
    api_key: str | None = Field(None, description="user key (environment only)", json_schema_extra=ENV_ONLY)
    admin_key: str | None = Field(None, description="admin key (environment only)", json_schema_extra=ENV_ONLY)
    reload_interval: float = Field(0.5, description="seconds between registry change polls")
    max_body_mb: float = Field(64.0, description="largest request body (413 above it)")
    log_level: str = Field("info", description="debug, info, warning")
    stop_on_repetition: bool = Field(False, description="end an output that loops (finish_reason 'repetition') "
                                     "unless the request says otherwise; off: greedy output stays PEFT's")
    loop_max_period: int = Field(16, ge=1, le=256, description="longest repeated block loop truncation looks for "
                                 "(tokens)")
    loop_min_repeats: int = Field(4, ge=2, le=1024, description="times the block must repeat back to back")
    loop_min_span: int = Field(32, ge=2, le=4096, description="tokens the repeated tail must cover at least")
    chat_template: str | None = Field(None, description="Jinja chat template for /v1/chat/completions, or the path "
                                                        "of a file holding one (default: a plain 'Role: text' "
                                                        "template ending in 'Assistant:')")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * (1 << 20))

    def engine_config(self):  # -> server.engine.request.EngineConfig
        """The engine's configuration from these settings (its own names and units)."""
        from server.engine.request import EngineConfig

        return EngineConfig(
            max_num_seqs=self.max_batch_size,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_queue=self.max_queue,
            max_queue_wait_s=self.max_queue_wait or None,
            kv_cache_bytes=int(self.kv_cache_gb * (1 << 30)),
            kv_cache_dtype=self.kv_cache_dtype,
            prefix_cache_bytes=int(self.prefix_cache_mb * (1 << 20)),
            static_decode=None if self.cuda_graphs else False,  # None: CUDA graphs on GPU only
            admission_window_s=self.admission_window_ms / 1e3,
            admission_max_wait_s=self.admission_max_wait_ms / 1e3,
        )
