"""Hub checkpoints written by transformers 4 next to copies saved by transformers 5 (found on the real
all-MiniLM-L6-v2, tests/integration/test_pretrained_checkpoint.py).

- Its config.json names few keys; ``save_pretrained`` of transformers 5 writes every default. The folders
  describe one network: the API compares only the keys both configs hold, the worker compares the configs
  with their class defaults filled in (so a left-out key whose default differs is still refused).
- Its model.safetensors holds the int64 buffer ``embeddings.position_ids`` (saved before transformers 4.31,
  ignored on load by transformers 5): integer bookkeeping, not a weight the API refuses for its dtype.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from mudsc_core.architectures import trace_architecture
from mudsc_core.architectures import transformers as hf
from mudsc_core.errors import IncompatibleModels
from mudsc_core.files import LocalInputs, merge_files
from mudsc_core.formats.hf_config import agree
from mudsc_core.formats.safetensors import FLOAT_DTYPES, is_bookkeeping
from mudsc_core.permutation.permute import permute_state_dict, random_permutations
from mudsc_core.schema import JobSpec
from mudsc_core.schema.architectures import TransformersConfig

transformers = pytest.importorskip("transformers")

# What a hub config.json of transformers 4.8 holds for a BertModel (no add_cross_attention, is_decoder, ...).
OLD_CONFIG: dict[str, Any] = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 16,
    "model_type": "bert",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
    "transformers_version": "4.8.2",
    "type_vocab_size": 2,
    "vocab_size": 40,
}


def _old_folder(folder: Path) -> tuple[Path, Any]:
    """A BertModel folder as transformers 4.8 wrote it: the short config, the int64 position_ids buffer."""
    config = transformers.BertConfig.from_dict({k: v for k, v in OLD_CONFIG.items() if k != "transformers_version"})
    model = transformers.BertModel(config).eval()
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(OLD_CONFIG))
    state = {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}
    state["embeddings.position_ids"] = torch.arange(OLD_CONFIG["max_position_embeddings"])[None]
    save_file(state, folder / "model.safetensors")
    return folder, model


def test_integer_position_ids_are_bookkeeping_and_integer_weights_are_not() -> None:
    assert is_bookkeeping("embeddings.position_ids") and is_bookkeeping("bn.num_batches_tracked")
    assert not is_bookkeeping("embeddings.word_embeddings.weight") and "I64" not in FLOAT_DTYPES


def test_the_api_compares_only_the_keys_both_configs_hold() -> None:
    saved_by_v5 = transformers.BertConfig.from_dict(OLD_CONFIG).to_dict()
    assert "add_cross_attention" in saved_by_v5 and "add_cross_attention" not in OLD_CONFIG
    agree([OLD_CONFIG, saved_by_v5], ["old", "new"])
    with pytest.raises(IncompatibleModels, match="hidden_size"):
        agree([OLD_CONFIG, {**saved_by_v5, "hidden_size": 64}], ["old", "new"])


def test_the_worker_fills_class_defaults_before_it_compares(tmp_path: Path) -> None:
    old, new, other = tmp_path / "old", tmp_path / "new", tmp_path / "other"
    folders = {old: OLD_CONFIG, new: transformers.BertConfig.from_dict(OLD_CONFIG).to_dict()}
    # a key the old config leaves out, set in the other to a value that is not its class default
    folders[other] = {**folders[new], "is_decoder": True}
    for folder, config in folders.items():
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
    resolved = hf.resolve(TransformersConfig(), [old, new], ["old", "new"])
    assert resolved.as_dict()["transformers_version"] == "4.8.2"  # model 0's config.json, as it is
    agree([OLD_CONFIG, folders[other]], ["old", "other"])  # the API cannot tell: is_decoder is one-sided
    with pytest.raises(IncompatibleModels, match="is_decoder"):
        hf.resolve(TransformersConfig(), [old, other], ["old", "other"])


def test_an_old_folder_and_its_permuted_copy_saved_by_transformers_5_merge_back(tmp_path: Path) -> None:
    old, model = _old_folder(tmp_path / "old")
    spec = trace_architecture({"name": "transformers", "config": OLD_CONFIG}, free_outputs=True).spec
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    model.load_state_dict(permute_state_dict(spec, state, random_permutations(spec, torch.Generator().manual_seed(1))))
    model.save_pretrained(tmp_path / "new")
    folders = [old, tmp_path / "new"]
    job = JobSpec.model_validate(
        {
            "method": {"name": "git_rebasin", "params": {"patience": 1}},
            "models": [{"uri": "s3://models/old/"}, {"uri": "s3://models/new/"}],
            "architecture": {"name": "transformers"},
        }
    )
    report = merge_files(job, LocalInputs(models=folders), tmp_path / "out", device="cpu")
    assert report["architecture"]["config"]["transformers_version"] == "4.8.2"
    original, merged = load_file(old / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert set(original) - set(merged) == {"embeddings.position_ids"}
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, original[name], msg=name)
