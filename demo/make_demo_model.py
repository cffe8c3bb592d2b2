"""Build the bundled demo model (demo/demo-tiny): a byte-level BPE tokenizer and a
tiny GPT-2 trained for a few seconds on a handful of sentences, so that its
completions are readable. Run once; the output is committed.

    .venv/bin/python demo/make_demo_model.py
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

OUT = Path(__file__).parent / "demo-tiny"
CORPUS = [
    "bakehouse ships model weights to the GPU, verified.",
    "The weights are locked, fetched, verified and then served.",
    "A Git LFS pointer file is not a model; bakehouse says so and fetches the weights.",
    "The store keeps every model under its commit, and current points at the verified one.",
    "Quick verify checks the stamp in milliseconds; full verify hashes every file.",
    "Fresh bread comes out of the oven every morning at the bakehouse.",
    "The baker bakes the weights into the image so the container starts in seconds.",
    "Hello! I am the bakehouse demo model, served from a verified local path.",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def main() -> None:
    torch.manual_seed(0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE

    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    batch = tokenizer([s + "<|endoftext|>" for s in CORPUS], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _step in range(300):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    print(f"final loss {loss.item():.3f}")
    model.eval()
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    OUT.mkdir(exist_ok=True)
    model.save_pretrained(OUT)
    tokenizer.save_pretrained(OUT)
    prompt = tokenizer("The weights are", return_tensors="pt")
    print(tokenizer.decode(model.generate(**prompt, max_new_tokens=12, do_sample=False)[0]))


if __name__ == "__main__":
    main()
