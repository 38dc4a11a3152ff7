"""vLLM as the rollout engine (`rollout.engine=vllm`; the interface: rollout/engines.py; docs/rollout-engines.md).

One vLLM `LLM` per rank inside the training process (no Ray, no server), started at the first `generate` from the
policy's own config (so a resized vocabulary matches) with dummy weights. It always samples with the trainer's
current weights: they are pushed in before a generation whenever they changed (`VLLMEngine._sync`), one module at a
time (under ZeRO-3 gathered by DeepSpeed's `GatheredParameters`, reached through rlhf_cli.engine), through vLLM's
in-place `reload_weights` (its plain `load_weights` fails once vLLM has repacked its weights). LoRA: `merged` sends
base + scaled delta without touching the trainer's module; `adapter` sends the base once and the adapter as a
vLLM `LoRARequest`. The result has generation.sample's layout plus `sampler_logprobs`, vLLM's log-probs of the
sampled tokens under the distribution it sampled from (`logprobs_mode="processed_logprobs"`: temperature, top-k,
top-p applied; greedy: the plain softmax), which only measure and correct the mismatch (losses/mismatch.py).

Kept out of the training process's behaviour: the checkpoint's generation_config.json (vLLM reads it by default;
its folder has none and `generation_config="vllm"`); vLLM's own randomness (each request's seed comes from
torch's global RNG, so the stages' `torch.manual_seed` makes rollouts reproducible, and vLLM's seeding and CPU
sampler draws are fenced off); its replacement of `torch.set_num_threads`; its teardown of the default process group.

GPU: `rollout.vllm_gpu_memory_utilization`, and `rollout.vllm_sleep` (default true) puts vLLM to sleep after each
generation (level 2 for a policy that trains: weights dropped, pushed again; level 1 for a frozen one). CPU: the KV
cache is `rollout.vllm_cpu_kvcache_gb` (VLLM_CPU_KVCACHE_SPACE wins when set), no sleep, eager. dtype: the trainer's.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from rlhf_cli import engine as eng
from rlhf_cli.errors import UserError
from rlhf_cli.models.load import is_peft_model, unwrap
from rlhf_cli.rollout.generation import Sequences, join, truncate_at_eos
from rlhf_cli.rollout.vllm_process import fenced_process_state, own_teardown

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
KV_BLOCK = 32  # vLLM's CPU KV cache block (tokens; a multiple of 32): max_model_len is rounded down to it


class VLLMEngine:
    """vLLM's sampler on the trainer's weights (see the module docstring). `syncs` counts weight pushes,
    `start_seconds` is the time vLLM took to start, `seconds` the time in generation (sync included)."""

    name = "vllm"
    sampler_is_trainer = False

    def __init__(
        self, rollout_cfg: Any, model_cfg: Any, tokenizer: Any, dist: Any, reason: str = "rollout.engine=vllm"
    ):
        if rollout_cfg.vllm_lora not in ("merged", "adapter"):
            raise UserError(f"rollout.vllm_lora must be merged or adapter (got {rollout_cfg.vllm_lora!r})")
        self.cfg, self.tokenizer, self.dist, self.reason = rollout_cfg, tokenizer, dist, reason
        self.model_cfg = model_cfg  # what the stage loads; vLLM is built from the loaded policy's own config
        self.llm: Any = None
        self.folder: str | None = None
        self.syncs, self.start_seconds, self.seconds = 0, 0.0, 0.0
        self._synced: tuple[Any, Any] | None = None  # (weakref to the synced module, its weights' key)
        self._lora: Any = None  # the current LoRARequest (vllm_lora=adapter)
        self._asleep = False
        self._teardown: Any = None

    def describe(self) -> str:
        return f"rollout engine: vllm ({self.reason})"

    def generate(self, model: Any, prompts: dict[str, torch.Tensor], config: Any) -> Sequences:
        """Responses to left-padded `prompts` {"input_ids", "attention_mask"} (B, P) under `config` (a
        transformers GenerationConfig from generation.sampling_config), sampled by vLLM with `model`'s current
        weights; the layout of generation.sample, with `sampler_logprobs` (B, R)."""
        t0 = time.perf_counter()
        policy = model.module if hasattr(model, "zero_optimization_stage") else model
        if self.llm is None:
            self._build(policy)
        if self._asleep:
            self.llm.wake_up(tags=["weights"])  # the KV cache comes back after the weights (less peak memory)
        self._sync(model, policy)
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False
        token_lists, params = self._requests(prompts, config)
        # vLLM's CPU sampler also draws from torch's global RNG at every step: fence it off (the seeds above
        # already made the draws reproducible), so the trainer's stream does not depend on vLLM's internals.
        with torch.random.fork_rng(devices=[]):
            outs = self.llm.generate(
                [{"prompt_token_ids": t} for t in token_lists], params, use_tqdm=False, lora_request=self._lora
            )
        seq = self._sequences(prompts, [o.outputs[0] for o in outs], config)
        if self.cfg.vllm_sleep and torch.cuda.is_available():
            self._sleep(model)
        self.seconds += time.perf_counter() - t0
        return seq

    # ----- construction ---------------------------------------------------------------------------------------

    def _build(self, policy: Any) -> None:
        """Start vLLM for `policy`'s architecture (its config, so a resized vocabulary matches), dummy weights."""
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process (needed on CPU)
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its INFO lines would drown the stage's output
        adapter = self._adapter_mode(policy)
        base = unwrap(policy)
        if not torch.cuda.is_available():
            _check_cpu_attention(base.config)
        self.folder = _model_folder(base, self.tokenizer)
        weakref.finalize(self, shutil.rmtree, self.folder, True)
        kwargs = _engine_kwargs(self.cfg, base, self.dist, next(base.parameters()).dtype)
        if adapter is not None:
            rank = next((r for r in LORA_RANKS if r >= adapter.r), adapter.r)
            kwargs.update(enable_lora=True, max_lora_rank=rank, max_loras=1)
        t0 = time.perf_counter()
        with fenced_process_state():
            from vllm import LLM

            self.llm = LLM(model=self.folder, **kwargs)
        self.start_seconds = time.perf_counter() - t0
        self._teardown = own_teardown(self.llm)
        # At every push vLLM warns "RotaryEmbedding: Failed to load weights": RoPE has no weights (vLLM puts its
        # cos/sin cache back); the line would repeat every iteration. Other layers' warnings stay.
        reload_log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        reload_log.addFilter(lambda r: not r.getMessage().startswith("RotaryEmbedding: Failed to load"))

    def close(self) -> None:
        """Shut vLLM down now (its memory freed, the trainer's process group left alone), as when the engine is
        collected. vLLM's process groups are process-wide: another open VLLMEngine stops working too."""
        if self.llm is not None:
            self._teardown()
            self.llm = None

    def _adapter_mode(self, policy: Any) -> Any:
        """The active LoRA config when vLLM is to apply the adapter itself (vllm_lora=adapter), else None."""
        if self.cfg.vllm_lora != "adapter" or not is_peft_model(policy):
            return None
        lora = policy.peft_config[policy.active_adapter]
        if getattr(lora, "modules_to_save", None) or getattr(lora, "use_dora", False):
            raise UserError(
                "rollout.vllm_lora=adapter: the policy's adapter also trains whole modules (modules_to_save) or is "
                "DoRA, which vLLM's LoRA cannot apply; use rollout.vllm_lora=merged"
            )
        return lora

    # ----- weights ------------------------------------------------------------------------------------------

    def _sync(self, model: Any, policy: Any) -> None:
        """Push the trainer's weights into vLLM when they changed since the last push: another module, another
        optimizer step (`global_steps`) or any in-place change of a parameter (its version counter: a direct
        edit, an optimizer outside DeepSpeed). A frozen model is pushed once. With vllm_lora=adapter the base
        weights go only when they changed, the adapter whenever anything did. Collective under ZeRO-3."""
        zero3 = _is_zero3(policy)
        adapter = self.cfg.vllm_lora == "adapter" and is_peft_model(policy)
        lora = {id(p) for n, p in policy.named_parameters() if adapter and "lora_" in n}
        base = _versions(p for p in policy.parameters() if id(p) not in lora)
        key = (getattr(model, "global_steps", None), base, _versions(p for p in policy.parameters() if id(p) in lora))
        last = self._synced[1] if self._synced is not None and self._synced[0]() is policy else None
        changed, base_changed = last != key, last is None or last[1] != base
        if zero3 and self.dist.world_size > 1:  # every rank gathers together, or none does
            changed, base_changed = eng.any_rank(changed), eng.any_rank(base_changed)
        if not changed:
            return
        if base_changed or not adapter:
            weights = _weights(unwrap(policy), zero3, merge=not adapter)
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True}
            )
        if adapter:
            self._lora = _adapter_request(policy, zero3, self.folder, self.syncs + 1)
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights
        self._synced = (weakref.ref(policy), key)
        self.syncs += 1

    def _sleep(self, model: Any) -> None:
        """Free vLLM's GPU memory while the trainer works: level 2 (weights dropped; pushed again at the next
        generation) for a model with an optimizer, level 1 (weights kept in CPU memory) for a frozen one."""
        trained = getattr(model, "optimizer", None) is not None
        self.llm.sleep(level=2 if trained else 1)
        self._asleep = True
        if trained:
            self._synced = None

    # ----- requests and results -----------------------------------------------------------------------------

    def _requests(self, prompts: dict[str, torch.Tensor], config: Any) -> tuple[list[list[int]], list[Any]]:
        """Each row's prompt ids without its left padding, and its SamplingParams (B of each): temperature, top-k,
        top-p and max_new_tokens from `config`, greedy when `do_sample` is false, a seed from torch's RNG."""
        from vllm import SamplingParams

        ids, mask = prompts["input_ids"].cpu(), prompts["attention_mask"].bool().cpu()
        token_lists = [row[m].tolist() for row, m in zip(ids, mask, strict=True)]
        seeds = torch.randint(0, 2**31 - 1, (len(token_lists),)).tolist()
        sampled = bool(config.do_sample)
        common = {
            "temperature": float(config.temperature) if sampled else 0.0,
            "top_k": int(config.top_k or 0) if sampled else 0,  # 0: off (vLLM and our configs alike)
            "top_p": float(config.top_p if config.top_p is not None else 1.0) if sampled else 1.0,
            "max_tokens": int(config.max_new_tokens),
            "stop_token_ids": [int(config.eos_token_id)],
            "logprobs": 0,  # the sampled token's own log-prob only
            "detokenize": False,
        }
        return token_lists, [SamplingParams(seed=s, **common) for s in seeds]

    def _sequences(self, prompts: dict[str, torch.Tensor], outputs: list[Any], config: Any) -> Sequences:
        """vLLM's completions -> Sequences (generation.sample's layout) with sampler_logprobs (B, R), 0 after the
        end. A row that stopped early without EOS (vLLM's context limit) is masked after its last token."""
        eos, pad = int(config.eos_token_id), int(config.pad_token_id)
        lengths = torch.tensor([len(o.token_ids) for o in outputs])
        width = max(1, int(lengths.max()) if len(outputs) else 1)
        response = torch.full((len(outputs), width), pad, dtype=torch.long)
        logprobs = torch.zeros(len(outputs), width)
        for i, o in enumerate(outputs):
            tokens = list(o.token_ids)
            response[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            logprobs[i, : len(tokens)] = torch.tensor([o.logprobs[t][tok].logprob for t, tok in enumerate(tokens)])
        response, mask, has_eos = truncate_at_eos(response, eos, pad)
        mask = mask * (torch.arange(width)[None, :] < lengths[:, None])
        device = prompts["input_ids"].device
        seq = join(
            prompts["input_ids"], prompts["attention_mask"], response.to(device), mask.to(device), has_eos.to(device)
        )
        seq.sampler_logprobs = (logprobs * mask).to(device)
        return seq


# ----- helpers without state -----------------------------------------------------------------------------------


def _model_folder(base: Any, tokenizer: Any) -> str:
    """A temporary folder vLLM builds the architecture from: `base`'s config (with its class as architecture), the
    tokenizer, and a generation config with only the special ids (the checkpoint's own would set penalties,
    top-k or extra stop ids)."""
    from transformers import GenerationConfig

    folder = tempfile.mkdtemp(prefix="rlhf-vllm-")
    config = copy.deepcopy(base.config)
    config.architectures = [type(base).__name__]
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    GenerationConfig(**{k: v for k, v in ids.items() if v is not None}).save_pretrained(folder)
    return folder


def _engine_kwargs(cfg: Any, base: Any, dist: Any, dtype: torch.dtype) -> dict[str, Any]:
    """vLLM's engine arguments: in-process, the trainer's dtype, processed log-probs, no generation defaults; one
    engine per rank of an initialised torch.distributed job (TRL's colocate mode: external_launcher, tensor
    parallel 1, a seed per rank); GPU memory share and sleep mode, or the CPU KV cache."""
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "load_format": "dummy",  # the trainer's weights arrive before the first generation
        "generation_config": "vllm",
        "logprobs_mode": "processed_logprobs",
        "seed": dist.rank,
        "tensor_parallel_size": 1,
        "disable_log_stats": True,
    }
    if torch.distributed.is_initialized():
        os.environ.setdefault("RANK", str(dist.rank))
        os.environ.setdefault("LOCAL_RANK", str(dist.local_rank))
        kwargs["distributed_executor_backend"] = "external_launcher"
    if torch.cuda.is_available():
        kwargs.update(gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, enable_sleep_mode=cfg.vllm_sleep)
        return kwargs
    budget = int(cfg.vllm_cpu_kvcache_gb * 2**30)
    kwargs.update(kv_cache_memory_bytes=budget, enforce_eager=True)  # compiling on a CPU costs more than it saves
    fits = max_model_len(base.config, budget, dtype)
    if fits is not None:
        kwargs["max_model_len"] = fits
    return kwargs


def _attention(config: Any) -> tuple[Any, int, int]:
    """(the text config, head size, key/value heads) of a transformers config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text, head_dim, getattr(text, "num_key_value_heads", None) or heads


def _check_cpu_attention(config: Any) -> None:
    """vLLM's CPU attention kernels exist for a few head sizes only; say so before vLLM fails deep inside."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    _, head_dim, _ = _attention(config)
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in sizes:
        raise UserError(
            f"rollout.engine=vllm: vLLM's CPU attention supports head sizes {sizes}, this model's is {head_dim} "
            f"(hidden_size / num_attention_heads); use rollout.engine=hf, or a GPU"
        )


def max_model_len(config: Any, budget: int, dtype: torch.dtype) -> int | None:
    """The longest sequence a KV cache of `budget` bytes holds for `config` (rounded down to vLLM's block), when
    that is shorter than the model's own context (vLLM refuses to start otherwise); else None."""
    text, head_dim, kv_heads = _attention(config)
    per_token = 2 * text.num_hidden_layers * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()
    fits = budget // per_token // KV_BLOCK * KV_BLOCK
    context = getattr(text, "max_position_embeddings", None)
    return fits if context is not None and fits < context else None


def _is_zero3(module: Any) -> bool:
    return any(hasattr(p, "ds_tensor") for p in module.parameters())


def _versions(params: Iterator[torch.nn.Parameter]) -> int:
    """The sum of the parameters' version counters (their ZeRO-3 shards' when partitioned): every in-place
    change (an optimizer step, `p.add_()` under no_grad) raises it, and reading never does."""
    return sum(int(getattr(p, "ds_tensor", p)._version) for p in params)


def _units(module: Any, prefix: str = "") -> Iterator[tuple[str, Any, bool]]:
    """(name, module, is_lora) for every module that holds parameters directly, a peft LoRA layer taken whole
    (its base layer and adapters) and a peft modules_to_save wrapper replaced by its trained copy."""
    kind = type(module).__name__
    if kind == "ModulesToSaveWrapper":
        yield from _units(module.modules_to_save[module.active_adapter], prefix)
        return
    if hasattr(module, "base_layer") and hasattr(module, "lora_A"):  # peft's LoraLayer, without importing peft
        yield prefix, module, True
        return
    if any(True for _ in module.parameters(recurse=False)):
        yield prefix, module, False
    for name, child in module.named_children():
        yield from _units(child, f"{prefix}.{name}" if prefix else name)


def _weights(base: Any, zero3: bool, merge: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) of the transformers model `base`, one module at a time (gathered under ZeRO-3,
    and then copied: vLLM keeps a tensor until its fused layer, e.g. q/k/v, is complete). A LoRA layer gives its
    base weights, plus the active adapters' scaled delta when `merge` (the trainer's module is not changed)."""
    for prefix, module, is_lora in _units(base):
        params = list(module.parameters()) if is_lora else list(module.parameters(recurse=False))
        with eng.gathered_parameters(params, zero3), torch.no_grad():
            owner = module.base_layer if is_lora else module
            for name, p in owner.named_parameters(recurse=False):
                tensor = p.detach()
                if is_lora and merge and name == "weight" and not module.merged and not module.disable_adapters:
                    for adapter in module.active_adapters:
                        if adapter in module.lora_A or adapter in getattr(module, "lora_embedding_A", {}):
                            tensor = tensor + module.get_delta_weight(adapter).to(tensor.dtype)
                yield (f"{prefix}.{name}" if prefix else name), (tensor.clone() if zero3 else tensor)


def _adapter_request(policy: Any, zero3: bool, folder: str, number: int) -> Any:
    """The policy's active adapter written where vLLM reads it (gathered under ZeRO-3), as a LoRARequest with a
    new id (vLLM caches an adapter by id)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file
    from vllm.lora.request import LoRARequest

    path = os.path.join(folder, f"adapter-{number}")
    lora = [p for n, p in policy.named_parameters() if "lora_" in n]
    with eng.gathered_parameters(lora, zero3):
        state = {k: v.detach().cpu().contiguous().clone() for k, v in get_peft_model_state_dict(policy).items()}
    os.makedirs(path)  # in this rank's own folder: each rank's engine reads its own copy
    save_file(state, os.path.join(path, "adapter_model.safetensors"))
    policy.peft_config[policy.active_adapter].save_pretrained(path)
    shutil.rmtree(os.path.join(folder, f"adapter-{number - 1}"), ignore_errors=True)  # loaded by vLLM already
    return LoRARequest(f"policy-{number}", number, path)
