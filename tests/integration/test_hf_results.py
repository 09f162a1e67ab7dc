"""A Hugging Face user's round trip: bf16 Llama folders with tokenizers in, a result that loads as it is out.

A tiny random Llama (``transformers`` builds it from a config: nothing is downloaded) is saved as a base
and two fine-tunes (base + small perturbations), each with a tokenizer built here from scratch and a
generation config; the folders go to S3, a TIES job runs on the real worker, and every artifact is
downloaded into one folder with the client (what ``mudsc download`` does). That folder must load with
``AutoModelForCausalLM`` and ``AutoTokenizer`` and generate.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from scripts.localstack import upload_folder
from tests.tiny_llama import tiny_llama

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

RUN = uuid.uuid4().hex[:8]
VOCAB = ["<unk>", "<s>", "</s>", "the", "model", "merge", "a", "of", "two", "is", "good", "and", "."]


def _tokenizer() -> Any:
    words = {word: i for i, word in enumerate(VOCAB)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def _llama(seed: int, base: Any | None = None) -> Any:
    model = tiny_llama(seed, base, vocab_size=len(VOCAB), bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return model.to(torch.bfloat16)


def _upload(s3: Any, bucket: str, prefix: str, model: Any, tokenizer: Any, work: Path) -> str:
    folder = work / prefix.strip("/").replace("/", "_")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    transformers.GenerationConfig(
        max_new_tokens=4, do_sample=False, bos_token_id=1, eos_token_id=2, pad_token_id=2
    ).save_pretrained(folder)
    (folder / "modeling_evil.py").write_text("raise SystemExit('never fetched')\n")  # not on the allow-list
    return upload_folder(s3, bucket, prefix, folder)


@pytest.fixture(scope="module")
def downloaded(stack: Any, stack_client: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    work = tmp_path_factory.mktemp("hf")
    s3, bucket = stack.s3_client(), stack.buckets["models"]
    base = _llama(0)
    uris = {"base": _upload(s3, bucket, f"hf-{RUN}/base/", base, _tokenizer(), work)}
    for i in (1, 2):
        uris[f"ft{i}"] = _upload(s3, bucket, f"hf-{RUN}/ft{i}/", _llama(i, base.float()), _tokenizer(), work)
    job = stack_client.submit(
        {
            "method": {"name": "ties", "params": {"density": 0.5, "scaling_factor": 1.0}},
            "models": [{"uri": uris["ft1"]}, {"uri": uris["ft2"], "weight": 0.5}],
            "base_model": {"uri": uris["base"]},
            "output": {"dtype": "bfloat16"},
            "labels": {"run": RUN},
        }
    )
    finished = stack_client.wait(job["id"], timeout=300)
    assert finished["status"] == "succeeded", finished.get("error")
    out = work / "result"
    stack_client.download(job["id"], out)
    return out, finished


def test_the_downloaded_result_loads_and_generates(downloaded: tuple[Path, dict]) -> None:
    folder, _ = downloaded
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert model.dtype == torch.bfloat16
    inputs = tokenizer("the model is", return_tensors="pt")
    assert inputs["input_ids"].shape == (1, 3)
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == 3 + 4
    assert all(0 <= int(t) < len(VOCAB) for t in generated[0])
    assert tokenizer.decode(generated[0]).startswith("the model is")


def test_the_result_carries_the_base_tokenizer_and_the_output_dtype(downloaded: tuple[Path, dict]) -> None:
    folder, job = downloaded
    names = {p.name for p in folder.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"} <= names
    assert "modeling_evil.py" not in names
    assert job["spec"]["output"]["tokenizer_source"] == "base"  # the default, resolved in the job record
    config = json.loads((folder / "config.json").read_text())
    assert [config[k] for k in ("dtype", "torch_dtype") if k in config] and all(
        config[k] == "bfloat16" for k in ("dtype", "torch_dtype") if k in config
    )
    card = (folder / "README.md").read_text()
    assert "merge_method: ties" in card and "density: 0.5" in card and "weight: 0.5" in card
