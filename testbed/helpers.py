"""Helpers shared by the tests: the fixture hub, a user project, manifests."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save

from ops.localhub import LocalHub

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo" / "demo-tiny"
TOKEN = "hf_TestSecretToken0123456789abcdef"


def shard_files(n: int = 4, mb: float = 2.0, seed: int = 0) -> dict[str, bytes]:
    """A multi-shard model of random safetensors, with its index, like large hub models."""
    g = torch.Generator().manual_seed(seed)
    files: dict[str, bytes] = {}
    weight_map = {}
    numel = int(mb * 1e6 / 4)
    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        files[name] = save({f"layer{i}.weight": torch.rand(numel, generator=g)})
        weight_map[f"layer{i}.weight"] = name
    files["model.safetensors.index.json"] = repr({"weight_map": weight_map}).replace("'", '"').encode()
    files["config.json"] = b'{"model_type": "random-shards"}\n'
    return files


def random_lm_files() -> dict[str, Path | bytes]:
    """An untrained GPT-2 with a long context and the demo tokenizer: it rarely stops by itself."""
    import tempfile

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=401, n_positions=4096, n_embd=128, n_layer=2, n_head=4, bos_token_id=400, eos_token_id=400)
    with tempfile.TemporaryDirectory(prefix="random-lm-") as tmp:
        GPT2LMHeadModel(config).save_pretrained(tmp)
        files: dict[str, Path | bytes] = {p.name: p.read_bytes() for p in Path(tmp).iterdir()}
    files.update({name: DEMO / name for name in ("tokenizer.json", "tokenizer_config.json")})
    return files


def random_llama_files() -> dict[str, Path | bytes]:
    """A small untrained Llama (head_dim 64, which vLLM's CPU attention supports) with the demo tokenizer."""
    import tempfile

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=401, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=2048, bos_token_id=400, eos_token_id=400)
    with tempfile.TemporaryDirectory(prefix="random-llama-") as tmp:
        LlamaForCausalLM(config).save_pretrained(tmp)
        files: dict[str, Path | bytes] = {p.name: p.read_bytes() for p in Path(tmp).iterdir()}
    files.update({name: DEMO / name for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")})
    return files


@dataclass
class Hub:
    hub: LocalHub
    commits: dict[str, str]

    @property
    def endpoint(self) -> str:
        return self.hub.endpoint

    def git_url(self, repo_id: str) -> str:
        return f"git+file://{self.hub.repo_path(repo_id)}"


def start_hub(root: Path) -> Hub:
    hub = LocalHub(root)
    commits = {
        "bakehouse/demo-tiny": hub.add_repo("bakehouse/demo-tiny", {p.name: p for p in DEMO.iterdir()}),
        "test/shards": hub.add_repo("test/shards", shard_files()),
        "test/big": hub.add_repo("test/big", shard_files(n=2, mb=24, seed=1)),
        "test/random-lm": hub.add_repo("test/random-lm", random_lm_files()),
        "test/random-llama": hub.add_repo("test/random-llama", random_llama_files()),
    }
    hub.start()
    return Hub(hub, commits)


@dataclass
class Project:
    """A working directory with models.toml, as a user has one."""

    dir: Path
    endpoint: str

    @property
    def store(self) -> Path:
        return self.dir / "models"

    def write_manifest(self, text: str) -> None:
        (self.dir / "models.toml").write_text(text)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "BAKEHOUSE_", "MODELS_DIR"))}
        env.update(HF_ENDPOINT=self.endpoint, HF_HUB_DISABLE_XET="1", HF_HOME=str(self.dir / ".hf"), MODELS_DIR=str(self.store), PYTHONPATH=str(ROOT))
        env.update(extra)
        return env

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ops.models", *args], cwd=self.dir, env=env or self.env(), capture_output=True, text=True, timeout=300)

    def popen(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "ops.models", *args], cwd=self.dir, env=env or self.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def manifest(**models: str) -> str:
    """models.toml text: manifest(demo='source = "hf://…"\\nrevision = "main"')."""
    return "".join(f"[models.{name}]\n{body}\n\n" for name, body in models.items())


HF_DEMO = 'source = "hf://bakehouse/demo-tiny"\nrevision = "main"'
HF_SHARDS = 'source = "hf://test/shards"\nrevision = "main"'
HF_RANDOM_LM = 'source = "hf://test/random-lm"\nrevision = "main"'
HF_RANDOM_LLAMA = 'source = "hf://test/random-llama"\nrevision = "main"'
HF_BIG = 'source = "hf://test/big"\nrevision = "main"'
