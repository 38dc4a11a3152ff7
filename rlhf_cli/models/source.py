"""Where a model or tokenizer comes from (`builtin:tiny-llama`, a local folder, a run-dir stage, a hub id) and
`load_pretrained`, which turns every failure a user can fix into a `UserError` naming the path and what to do.

Torch-free: `explain`, config checks and tokenizer loads import this without loading torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from rlhf_cli.errors import UserError
from rlhf_cli.models.weights import check_weight_files, error_summary, is_unreadable_file_error

if TYPE_CHECKING:
    from rlhf_cli.config.schema import ModelConfig

BUILTIN_TINY = "builtin:tiny-llama"
# A folder marker per kind of load, used to accept a run-dir stage folder (`runs/x/sft`) for its `final/`.
MODEL_MARKER, TOKENIZER_MARKERS = ("config.json",), ("tokenizer_config.json", "tokenizer.json")


def is_builtin(name: str | None) -> bool:
    """True for `builtin:*` names; an unknown builtin is a UserError rather than a hub lookup."""
    if name is None or not name.startswith("builtin:"):
        return False
    if name != BUILTIN_TINY:
        raise UserError(
            f"unknown built-in model '{name}' (model.name_or_path / model.tokenizer); the only one is '{BUILTIN_TINY}'"
        )
    return True


def resolve_source(name: str, markers: tuple[str, ...] = MODEL_MARKER) -> tuple[str, bool]:
    """(what to pass to from_pretrained, is it a local folder).

    An existing folder is used as is, or its `final/` when the folder is a run-dir stage output
    (e.g. `runs/demo/sft`) that holds the model one level down. A name that cannot be a hub id (absolute or
    relative path syntax, too many slashes, illegal characters) and does not exist is a "no such folder" error,
    so a typo in a path never turns into a confusing hub lookup.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        final = path / "final"
        if not any((path / m).exists() for m in markers) and any((final / m).exists() for m in markers):
            return str(final), True
        return str(path), True
    if path.exists():
        raise UserError(f"'{name}' is a file; expected a Hugging Face model folder or a hub id")
    if _looks_like_path(name):
        raise UserError(
            f"'{name}': no such folder. Check model.name_or_path / model.tokenizer (relative paths start from "
            f"the current directory: {Path.cwd()}), or give a hub id like 'org/model'."
        )
    return name, False


def _looks_like_path(name: str) -> bool:
    if name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name or name.count("/") > 1:
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def _load_failed(name: str, local: bool, revision: str | None, err: BaseException) -> UserError:
    """The UserError for an OSError from from_pretrained: a broken local folder, or a hub id not fetchable."""
    reason = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
    if local:
        return UserError(f"'{name}' is not a loadable Hugging Face folder: {reason}")
    offline = " (HF_HUB_OFFLINE is set)" if hf_constants.is_offline_mode() else ""
    rev = f" at revision '{revision}'" if revision else ""
    return UserError(
        f"could not fetch '{name}'{rev} from the Hugging Face hub{offline}: {reason}. Check the id (and that "
        f"you have access if it is gated); if you meant a local folder, it does not exist here. Without network "
        f"or with HF_HUB_OFFLINE=1 the files must already be in the HF cache (`hf download {name}` on a machine "
        f"with network), or point model.name_or_path to a local folder."
    )


def load_pretrained(
    auto_cls: Any, name: str, model_cfg: ModelConfig, markers: tuple[str, ...] = MODEL_MARKER, **kwargs: Any
) -> Any:
    """`auto_cls.from_pretrained(name, revision, trust_remote_code, **kwargs)` with user-fixable failures turned
    into UserError. Shared by every loader (tokenizer, causal LM, and sequence-classification heads)."""
    source, local = resolve_source(name, markers)
    if local and _reads_weights(auto_cls):
        check_weight_files(Path(source))
    try:
        return auto_cls.from_pretrained(
            source, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code, **kwargs
        )
    except OSError as e:  # includes huggingface_hub's HTTP, offline and not-found errors
        if is_unreadable_file_error(e):
            raise _corrupt_weights(name, source, local, e) from e
        raise _load_failed(name, local, model_cfg.revision, e) from e
    except (ImportError, ValueError) as e:
        if "trust_remote_code" in str(e):
            raise UserError(f"'{name}' ships its own code; set model.trust_remote_code=true to run it") from e
        about_attention = "attention" in str(e).lower() or "attn" in str(e).lower()
        if "attn_implementation" in kwargs and (about_attention or isinstance(e, ImportError)):
            raise _attn_error(model_cfg, e) from e
        if isinstance(e, ImportError):
            raise UserError(f"loading '{name}' needs a package that is not installed: {e}") from e
        raise
    except Exception as e:  # a weight file the header check could not judge (a hub download, an old .bin)
        if not is_unreadable_file_error(e):
            raise
        raise _corrupt_weights(name, source, local, e) from e


def _reads_weights(auto_cls: Any) -> bool:
    """False for loaders that read only JSON (configs, tokenizers): the folder's weights are not theirs to judge.
    Judged by class name, so this module never imports transformers' torch-backed classes."""
    light = {"AutoConfig", "AutoTokenizer", "PretrainedConfig", "PreTrainedConfig", "PreTrainedTokenizerBase"}
    return not (isinstance(auto_cls, type) and any(base.__name__ in light for base in auto_cls.__mro__))


def _corrupt_weights(name: str, source: str, local: bool, err: BaseException) -> UserError:
    """The UserError for a weight file the library could not read (the fallback of `check_weight_files`)."""
    what = error_summary(err)
    if local:
        return UserError(f"the weights in {source} are incomplete or corrupt ({what}): re-export or re-download them")
    return UserError(
        f"the cached weights of '{name}' are incomplete or corrupt ({what}): remove them from the Hugging Face cache "
        f"(`hf cache rm model/{name}`; the cache is {hf_constants.HF_HUB_CACHE}) and download them again"
    )


def _attn_error(model_cfg: ModelConfig, err: BaseException) -> UserError:
    return UserError(
        f"model.attn_implementation='{model_cfg.attn_implementation}' is not usable here: "
        f"{str(err).strip().rstrip('.')}. 'sdpa' and 'eager' always work."
    )
