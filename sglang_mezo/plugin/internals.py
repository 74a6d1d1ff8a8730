"""Every SGLang 0.5.23 internal sglang-mezo touches, named once: what we hook, call, construct, extend or read, in
which of our modules, and why. ``tests/test_sglang_internals.py`` checks each against the installed SGLang, and
that our code imports nothing from SGLang that is not listed here. A new SGLang release is checked by running that
test against it; the plugin's hooks take their targets from :data:`HOOKS`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Use(str, enum.Enum):
    HOOK = "hook"
    """Patched through SGLang's hook registry."""
    CALL = "call"
    CONSTRUCT = "construct"
    EXTEND = "extend"
    """Subclassed, or a list/dispatcher appended to."""
    READ = "read"
    """An attribute or global read (or written), not a documented API."""


@dataclass(frozen=True)
class Internal:
    target: str
    """Dotted path: ``module.name`` or ``module.Class.attribute``."""
    use: Use
    where: str
    """Our module that touches it."""
    why: str
    instance: bool = False
    """An attribute its class sets on instances (``self.x = …``), not one the class itself has."""

    @property
    def owner(self) -> str:
        return self.target.rsplit(".", 1)[0]

    @property
    def name(self) -> str:
        return self.target.rsplit(".", 1)[1]


_SERVER_ARGS = "sglang.srt.server_args.ServerArgs"
_SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
_TOKENIZER_MANAGER = "sglang.srt.managers.tokenizer_manager.TokenizerManager"
_REQ = "sglang.srt.managers.schedule_batch.Req"
_IO = "sglang.srt.managers.io_struct"

HOOK_ADD_CLI_ARGS = Internal(f"{_SERVER_ARGS}.add_cli_args", Use.HOOK, "plugin", "add --enable-mezo and --mezo-*")
HOOK_FROM_CLI_ARGS = Internal(f"{_SERVER_ARGS}.from_cli_args", Use.HOOK, "plugin",
                              "ServerArgs is sealed: keep our values in ServerArgs._mezo, which travels to schedulers")
HOOK_SCHEDULER_DISPATCHER = Internal(f"{_SCHEDULER}.init_request_dispatcher", Use.HOOK, "plugin",
                                     "add the handlers of our IPC messages to the scheduler")
HOOK_HTTP_SETUP = Internal("sglang.srt.entrypoints.http_server._setup_and_run_http_server", Use.HOOK, "plugin",
                           "mount /mezo/* on SGLang's app before uvicorn starts (main process only)")
HOOKS = (HOOK_ADD_CLI_ARGS, HOOK_FROM_CLI_ARGS, HOOK_SCHEDULER_DISPATCHER, HOOK_HTTP_SETUP)

_LORA_MANAGER = "sglang.srt.lora.lora_manager.LoRAManager"
_LORA_POOL = "sglang.srt.lora.mem_pool.LoRAMemoryPool"
_LORA_REGISTRY = "sglang.srt.lora.lora_registry.LoRARegistry"
CPU_LORA_HOOKS = tuple(
    Internal(f"{_LORA_MANAGER}.{method}", Use.HOOK, "plugin.pinning",
             f"--enable-lora without CUDA: SGLang pins host tensors ({why}) and pinning needs a CUDA driver "
             "(SGLang issue 31894): pinning is off while this runs, in processes without CUDA only")
    for method, why in (("__init__", "the layers' offsets"), ("update_lora_info", "the layers' offsets"),
                        ("prepare_lora_batch", "the torch-native backend's batch indices"),
                        ("load_lora_adapter", "an adapter read and registered"),
                        ("load_lora_adapter_from_tensors", "an adapter registered from tensors"),
                        ("fetch_new_loras", "adapters made resident for a step's probes")))
"""Registered only where CUDA is absent, so not among :data:`HOOKS` (which ``--enable-mezo`` requires)."""

INTERNALS: tuple[Internal, ...] = HOOKS + CPU_LORA_HOOKS + (
    # -- the plugin machinery
    Internal("sglang.srt.plugins.hook_registry.HookRegistry.register", Use.CALL, "plugin", "register the hooks"),
    Internal("sglang.srt.plugins.hook_registry.HookType", Use.READ, "plugin", "BEFORE / AFTER"),
    Internal("sglang.srt.plugins.hook_registry.HookRegistry._patched", Use.READ, "plugin",
             "fail loudly: SGLang logs and carries on when a hook does not apply"),
    Internal("sglang.srt.managers.tokenizer_control_mixin._COMMUNICATOR_SPECS", Use.EXTEND, "plugin",
             "a fan-out communicator for our reply type (tm.mezo_communicator)"),
    Internal("sglang.srt.environ.envs", Use.READ, "plugin",
             "refuse --enable-mezo without pickle IPC (SGLANG_USE_PICKLE_IPC): our records travel pickled"),
    Internal("sglang.srt.entrypoints.http_server.app", Use.EXTEND, "plugin", "the FastAPI app the routes join"),
    # -- IPC, in the HTTP process
    Internal("sglang.srt.utils.auth.auth_level", Use.CALL, "server.routes",
             "each route's level for SGLang's --api-key/--admin-api-key middleware"),
    Internal("sglang.srt.utils.auth.AuthLevel", Use.READ, "server.routes",
             "ADMIN_OPTIONAL for routes that train, evaluate, reset, save; NORMAL for job status"),
    Internal("sglang.srt.utils.auth.add_api_key_middleware", Use.READ, "server.app",
             "matches a route and reads its endpoint's level: our routes join the app flat, not as a router"),
    Internal(f"{_IO}.BaseReq", Use.EXTEND, "scheduler.messages", "our envelopes are SGLang control messages"),
    Internal(f"{_IO}.GenerateReqInput", Use.CONSTRUCT, "server.sglang_adapters",
             "evaluations score and generate as user traffic"),
    Internal(f"{_TOKENIZER_MANAGER}.generate_request", Use.CALL, "server.sglang_adapters", "evaluation requests"),
    Internal(f"{_TOKENIZER_MANAGER}.auto_create_handle_loop", Use.CALL, "server.sglang_adapters",
             "the reply loop must run before a communicator waits on it"),
    Internal(f"{_TOKENIZER_MANAGER}._update_weight_version_if_provided", Use.CALL, "server.sglang_adapters",
             "/model_info reports the label our commits and restores give"),
    Internal(f"{_TOKENIZER_MANAGER}.rid_to_state", Use.READ, "server.sglang_adapters",
             "the user requests in flight, which training waits for between chunks", instance=True),
    Internal(f"{_TOKENIZER_MANAGER}.tokenizer", Use.READ, "server.app", "tokenize examples as requests are",
             instance=True),
    Internal(f"{_TOKENIZER_MANAGER}.context_len", Use.READ, "server.app", "refuse examples longer than the context",
             instance=True),
    Internal(f"{_TOKENIZER_MANAGER}.model_config", Use.READ, "server.app", "the served dtype", instance=True),
    Internal(f"{_TOKENIZER_MANAGER}.served_model_name", Use.READ, "server.app",
             "the base model's name: /v1/models, fine-tuned names, the metrics' label (the server args' may be unset)",
             instance=True),
    # -- adapter jobs: SGLang's LoRA registry (HTTP process) and LoRA manager and pool (scheduler)
    Internal("sglang.srt.lora.lora_registry.LoRARef", Use.CONSTRUCT, "scheduler.lora_pool, server.sglang_adapters",
             "each trained adapter version and probe adapter is an SGLang adapter under its own id"),
    Internal(f"{_TOKENIZER_MANAGER}.lora_registry", Use.READ, "server.sglang_adapters",
             "point an adapter's name at its new version", instance=True),
    Internal(f"{_TOKENIZER_MANAGER}.lora_update_lock", Use.READ, "server.sglang_adapters",
             "swap a name's version as SGLang's own loads and unloads do, one at a time", instance=True),
    Internal(f"{_LORA_REGISTRY}._registry_lock", Use.READ, "server.sglang_adapters",
             "the swap of a name's id is one write under the registry's lock: a request sees the old or the new",
             instance=True),
    Internal(f"{_LORA_REGISTRY}._registry", Use.READ, "server.sglang_adapters",
             "drop the name's old ref inside that one write (unregister takes the lock itself)", instance=True),
    Internal(f"{_LORA_REGISTRY}._register_adapter", Use.CALL, "server.sglang_adapters",
             "add the new ref inside that one write (register takes the lock itself)"),
    Internal(f"{_LORA_REGISTRY}.wait_for_unload", Use.CALL, "server.sglang_adapters",
             "retire an old version once the requests that resolved to it are done"),
    Internal("sglang.srt.model_executor.model_runner.ModelRunner.lora_manager", Use.READ, "scheduler.serving",
             "the LoRA manager adapter jobs train in", instance=True),
    Internal(f"{_LORA_MANAGER}.load_lora_adapter_from_tensors", Use.CALL, "scheduler.lora_pool",
             "register a version or probe adapter from the master's tensors"),
    Internal(f"{_LORA_MANAGER}.unload_lora_adapter", Use.CALL, "scheduler.lora_pool",
             "drop retired versions and a finished job's probe adapters"),
    Internal(f"{_LORA_MANAGER}.fetch_new_loras", Use.CALL, "scheduler.lora_pool",
             "make a step's probe adapters resident before writing their slots"),
    Internal(f"{_LORA_MANAGER}.memory_pool", Use.READ, "scheduler.adapters", "the slots", instance=True),
    Internal(f"{_LORA_MANAGER}.lora_refs", Use.READ, "scheduler.lora_pool", "the ref to unload by id",
             instance=True),
    Internal(f"{_LORA_MANAGER}.max_loras_per_batch", Use.READ, "scheduler.adapters",
             "refuse a job whose probes do not fit the pool", instance=True),
    Internal(f"{_LORA_MANAGER}.num_pinned_loras", Use.READ, "scheduler.adapters",
             "slots pinned adapters hold", instance=True),
    Internal(f"{_LORA_MANAGER}.dtype", Use.READ, "scheduler.adapters", "the pool's dtype (CPU copies in it)",
             instance=True),
    Internal(f"{_LORA_POOL}.A_buffer", Use.READ, "scheduler.lora_pool", "slot views of lora_A", instance=True),
    Internal(f"{_LORA_POOL}.B_buffer", Use.READ, "scheduler.lora_pool", "slot views of lora_B", instance=True),
    Internal(f"{_LORA_POOL}.uid_to_buffer_id", Use.READ, "scheduler.lora_pool", "which slot an adapter is in",
             instance=True),
    # -- the scheduler: dispatch, serving around a chunk
    Internal("sglang.utils.TypeBasedDispatcher", Use.CONSTRUCT, "scheduler.handler", "dispatch our messages"),
    Internal(f"{_SCHEDULER}._request_dispatcher", Use.EXTEND, "scheduler.handler", "our handlers join it",
             instance=True),
    Internal(f"{_SCHEDULER}.pause_generation", Use.CALL, "scheduler.serving",
             "retract user requests: none is computed with perturbed weights"),
    Internal(f"{_SCHEDULER}.continue_generation", Use.CALL, "scheduler.serving", "resume after a chunk"),
    Internal(f"{_SCHEDULER}._engine_paused", Use.READ, "scheduler.serving",
             "do not resume an engine someone else paused", instance=True),
    Internal(f"{_SCHEDULER}.flush_cache", Use.CALL, "scheduler.serving", "no prefix KV of older weights is reused"),
    Internal(f"{_SCHEDULER}.record_weight_version_change", Use.CALL, "scheduler.serving",
             "label every weight change (mezo-JOB-k)"),
    Internal(f"{_SCHEDULER}.forward_stream", Use.READ, "scheduler.serving",
             "let an overlapped forward finish before perturbing; make it wait for our last pass", instance=True),
    Internal(f"{_SCHEDULER}.schedule_stream", Use.READ, "scheduler.serving",
             "the stream SGLang's forwards wait on: make it wait for our last pass (the launch replay's too)",
             instance=True),
    Internal(f"{_IO}.PauseGenerationReqInput", Use.CONSTRUCT, "scheduler.serving", "pause_generation's argument"),
    Internal(f"{_IO}.ContinueGenerationReqInput", Use.CONSTRUCT, "scheduler.serving",
             "continue_generation's argument"),
    Internal(f"{_SCHEDULER}.server_args", Use.READ, "scheduler.serving", "the checkpoint path to re-read",
             instance=True),
    Internal("sglang.srt.runtime_context.get_serving", Use.CALL, "scheduler.serving",
             "the weight version a save writes"),
    Internal("sglang.srt.distributed.get_tp_group", Use.CALL, "scheduler.serving",
             "the TP ranks' CPU group for agreeing (one replica)"),
    Internal("sglang.srt.utils.common.init_custom_process_group", Use.CALL, "scheduler.replicas",
             "--dp-size: a gloo group of every replica's scheduler processes, beside SGLang's own groups"),
    Internal("sglang.srt.runtime_context.get_parallel", Use.CALL, "scheduler.serving", "this replica's DP rank"),
    Internal("sglang.srt.runtime_context.ParallelContext.dp_rank", Use.READ, "scheduler.serving",
             "which replica this scheduler is (--dp-size)"),
    # -- the scheduler: the weights and the scoring batch
    Internal("sglang.srt.runtime_context.get_parallel", Use.CALL, "scheduler.scoring", "this rank's TP rank and size"),
    Internal(f"{_SCHEDULER}.tp_worker", Use.READ, "scheduler.scoring", "the model and its forward", instance=True),
    Internal("sglang.srt.managers.tp_worker.TpModelWorker.forward_batch_generation", Use.CALL, "scheduler.scoring",
             "SGLang's own forward of our scoring batch"),
    Internal(f"{_SCHEDULER}.model_config", Use.READ, "scheduler.scoring",
             "layers, context length, vocabulary, EOS ids, the real head counts", instance=True),
    Internal(f"{_SCHEDULER}.max_prefill_tokens", Use.READ, "scheduler.scoring", "our batch bypasses chunked "
             "prefill: split it ourselves", instance=True),
    Internal(f"{_SCHEDULER}.max_total_num_tokens", Use.READ, "scheduler.scoring", "the KV pool's size",
             instance=True),
    Internal(f"{_SCHEDULER}.max_running_requests", Use.READ, "scheduler.scoring", "requests per forward",
             instance=True),
    Internal(f"{_SCHEDULER}.req_to_token_pool", Use.READ, "scheduler.scoring", "request rows", instance=True),
    Internal(f"{_SCHEDULER}.token_to_kv_pool_allocator", Use.READ, "scheduler.scoring", "KV slots", instance=True),
    Internal(f"{_SCHEDULER}.tree_cache", Use.READ, "scheduler.scoring", "evictable KV; release without insert",
             instance=True),
    Internal(f"{_SCHEDULER}.enable_overlap", Use.READ, "scheduler.scoring", "ScheduleBatch.init_new's argument",
             instance=True),
    Internal(f"{_SCHEDULER}.spec_algorithm", Use.READ, "scheduler.scoring", "ScheduleBatch.init_new's argument",
             instance=True),
    Internal(f"{_SCHEDULER}.future_map", Use.READ, "scheduler.scoring", "resolve_forward_inputs' argument",
             instance=True),
    Internal(_REQ, Use.CONSTRUCT, "scheduler.scoring", "one request per scored sequence"),
    Internal(f"{_REQ}.init_next_round_input", Use.CALL, "scheduler.scoring", "no prefix match (other weights' KV)"),
    Internal(f"{_REQ}.logprob_start_len", Use.READ, "scheduler.scoring", "log-probs from the completion on",
             instance=True),
    Internal(f"{_REQ}.skip_radix_cache_insert", Use.READ, "scheduler.scoring", "keep our KV out of the cache",
             instance=True),
    Internal(f"{_REQ}.extend_end", Use.READ, "scheduler.scoring", "extend the whole sequence", instance=True),
    Internal(f"{_REQ}.full_untruncated_fill_ids", Use.READ, "scheduler.scoring", "the sequence's length",
             instance=True),
    Internal(f"{_REQ}.kv", Use.READ, "scheduler.scoring", "release only what the request holds", instance=True),
    Internal("sglang.srt.managers.schedule_batch.ScheduleBatch.init_new", Use.CALL, "scheduler.scoring",
             "our scoring batch"),
    Internal("sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_extend", Use.CALL, "scheduler.scoring",
             "a prefill"),
    Internal("sglang.srt.managers.overlap_utils.resolve_forward_inputs", Use.CALL, "scheduler.scoring",
             "the batch's forward inputs"),
    Internal("sglang.srt.mem_cache.common.release_kv_cache", Use.CALL, "scheduler.scoring",
             "return KV slots and request rows, whatever happens"),
    Internal("sglang.srt.sampling.sampling_params.SamplingParams", Use.CONSTRUCT, "scheduler.scoring",
             "max_new_tokens = 0: a prefill only"),
    Internal("sglang.srt.layers.logits_processor.LogitsProcessorOutput.input_token_logprobs", Use.READ,
             "scheduler.scoring", "the scored log-probs", instance=True),
    # -- the served layout of the weights, mapped back to checkpoint tensors
    *(Internal(f"sglang.srt.layers.linear.QKVParallelLinear.{attr}", Use.READ, "scheduler.weights",
               "which q/k/v rows of the checkpoint a rank's qkv_proj holds", instance=True)
      for attr in ("head_size", "v_head_size", "num_heads", "num_kv_heads", "num_kv_head_replicas",
                   "total_num_heads", "total_num_kv_heads")),
    *(Internal(f"sglang.srt.layers.vocab_parallel_embedding.VocabParallelEmbedding.{attr}", Use.READ,
               "scheduler.weights", "which vocabulary rows a rank holds, without its padding", instance=True)
      for attr in ("shard_indices", "org_vocab_size")),
    Internal("sglang.srt.configs.update_config.adjust_config_with_unaligned_cpu_tp", Use.READ, "scheduler.weights",
             "on a CPU it pads heads a TP degree does not divide, keeping the real counts in hf_config.original_*"),
    Internal("sglang.srt.configs.update_config.update_intermediate_size", Use.READ, "scheduler.weights",
             "pads the MLP width likewise, keeping hf_config.original_intermediate_size"),
    # -- what those objects hold, one attribute deeper
    Internal("sglang.srt.managers.tp_worker.TpModelWorker.model_runner", Use.READ, "scheduler.scoring",
             "the model runner", instance=True),
    Internal("sglang.srt.model_executor.model_runner.ModelRunner.model", Use.READ, "scheduler.scoring",
             "the served nn.Module: its parameters are what MeZO moves", instance=True),
    Internal("sglang.srt.managers.utils.GenerationBatchResult.logits_output", Use.READ, "scheduler.scoring",
             "the forward's log-probs", instance=True),
    Internal("sglang.srt.sampling.sampling_params.SamplingParams.normalize", Use.CALL, "scheduler.scoring",
             "as SGLang normalises a request's sampling parameters"),
    Internal("sglang.srt.mem_cache.memory_pool.ReqToTokenPool.available_size", Use.CALL, "scheduler.scoring",
             "free request rows"),
    Internal("sglang.srt.mem_cache.allocator.base.BaseTokenToKVPoolAllocator.available_size", Use.CALL,
             "scheduler.scoring", "free KV slots"),
    Internal("sglang.srt.mem_cache.base_prefix_cache.BasePrefixCache.evictable_size", Use.CALL, "scheduler.scoring",
             "KV slots the cache would give up"),
    *(Internal(f"sglang.srt.configs.model_config.ModelConfig.{attr}", Use.READ, "scheduler.scoring",
               "the served model's shape and vocabulary", instance=True)
      for attr in ("hf_config", "context_len", "vocab_size", "hf_eos_token_id")),
    Internal("sglang.srt.configs.model_config.ModelConfig.dtype", Use.READ, "server.app",
             "the served dtype: half-precision weights train only through fp32 masters", instance=True),
    Internal("sglang.srt.runtime_context.ParallelContext.tp_rank", Use.READ, "scheduler.scoring",
             "this rank's place in tensor parallelism"),
    Internal("sglang.srt.server_args.ServerArgs.tp_size", Use.READ, "scheduler.scoring",
             "get_parallel().tp_size reads this configured width"),
    Internal("sglang.srt.distributed.parallel_state.GroupCoordinator.cpu_group", Use.READ, "scheduler.serving",
             "a gloo group: agreeing costs no device sync", instance=True),
    Internal("sglang.utils.TypeBasedDispatcher.__iadd__", Use.CALL, "scheduler.handler",
             "join the scheduler's dispatcher"),
    *(Internal(f"sglang.srt.server_args.ServerArgs.{attr}", Use.READ, where, why) for attr, where, why in (
        ("model_path", "scheduler.serving", "the base checkpoint resets re-read"),
        ("weight_version", "server.app", "the base weights' label"),
        ("device", "server.app", "Rademacher z by default on a CPU"),
        ("enable_metrics", "server.app", "MeZO metrics only with SGLang's"),
        ("skip_tokenizer_init", "plugin", "training examples are text: refuse without a tokenizer"),
        ("host", "plugin", "warn when the admin routes are open to the network"),
        ("api_key", "plugin", "is any key set"),
        ("admin_api_key", "plugin", "is any key set"),
        ("dp_size", "plugin", "--dp-size: a loopback address for the replicas' group"),
        ("dp_size", "scheduler.serving", "how many replicas share each step"),
        ("dp_size", "server.app", "a job's config records how many replicas share its steps"),
        ("enable_dp_attention", "plugin", "refuse DP attention (its DP ranks share one TP group)"))),
)
"""Everything, in the order a request meets it."""
