"""Fine-tune a chat model with LoRA under SPLoRA's watch, then compare layer-selection rules.

    python recipes/finetune.py recipes/configs/cpu-demo.yaml [--override KEY=VALUE ...]
    accelerate launch recipes/finetune.py recipes/configs/llama2-7b-dialogsum-harmful.yaml

One script driven by YAML: a new setup is a new YAML, not a new script. This file is the one to
copy. What it runs, in the order ``main`` runs it:

1. inputs (``recipe_data.prepare``): the data (disjoint seeded prompt splits, task and harmful
   fine-tune pairs), the (base, aligned) models (Hub ids, or built locally by ``demo_models.py`` /
   ``tiny_models.py``) and the safety probe;
2. train (``train`` below): PEFT ``LoraConfig(**lora)`` + ``Trainer(args=TrainingArguments(**training_args))``
   + ``SPLoRACallback(SPLoRAConfig(**splora))``, logits and loss on the response tokens only
   (``pad_batch(labelled_logits_only=True)`` + ``compute_loss_func=labelled_token_loss``: the same
   loss as the model's own, without the LM head on prompt tokens); the drift dashboard goes to W&B when
   ``training_args.report_to`` has ``wandb``, else to ``splora_report.html``. The Trainer's last
   checkpoint keeps the unpruned adapter (copied to ``adapter-lora/``); the callback prunes the live
   model at the end and ``trainer.save_model`` writes the pruned adapter (``adapter/``);
3. evaluate (``evaluation_run.run_evaluation``, also a script of its own for a finished run): the aligned
   model, the LoRA model and every selection rule at several numbers of pruned layers, against
   uniform and module-kind-matched random choices; ``results.py`` writes results.md / .json / .png.

The YAML's sections and what each becomes are listed in ``recipe_config.py``.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import evaluation_run
import results as result_files
import torch
from recipe_config import (
    argument_parser,
    load_config,
    lora_config,
    setup_environment,
    splora_config,
    stage,
    training_arguments,
)
from recipe_data import prepare, training_examples
from recipe_sections import data_section, evaluation_section

from splora_callback.headline import patch_words


def load_model(path: str, dtype: str) -> tuple[Any, Any]:
    """Tokenizer (with a pad token: Llama-2 has none, eos stands in) and causal LM of a checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{path}: the tokenizer has no chat template; the recipe trains chat turns")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    return tokenizer, model


def train(
    config: dict[str, Any], base: str, aligned: str, data: dict[str, Any], probe: Any
) -> dict[str, Any]:
    """LoRA fine-tune of the aligned model with ``SPLoRACallback``; writes ``adapter-lora/`` (unpruned),
    ``adapter/`` (as the callback left it) and the callback's ``splora_report.json`` / ``.html``.

    Returns ``{"trainer_log", "callback", "dropped", "examples", "is_main", "report_to"}``.
    """
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import Trainer

    from splora_callback.callback import SPLoRACallback
    from splora_callback.data import accepts_logits_mask, labelled_token_loss, pad_batch

    output_dir = Path(config["output_dir"])
    tokenizer, model = load_model(aligned, config["model"]["dtype"])
    sizes = data_section(config)
    examples, dropped = training_examples(
        tokenizer,
        data["task_train"] + data["harmful_train"],
        sizes.max_length,
        sizes.min_response_tokens,
        config["seed"],
    )
    model = get_peft_model(model, lora_config(config["lora"]))
    args = training_arguments(config)
    if args.gradient_checkpointing:  # transformers 5 keeps it equal to activation_checkpointing
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need an input grad
    utility = None
    if splora_config(config, base, probe, None).rule.needs_utility:  # the task pairs only, as the evaluation's rules
        utility = evaluation_run.task_probe(tokenizer, data["task_train"], evaluation_section(config), config["seed"])
    callback = SPLoRACallback(splora_config(config, base, probe, utility))
    labelled_only = accepts_logits_mask(model)  # the LM head only where the loss is: the same loss, less memory
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(examples),
        data_collator=functools.partial(pad_batch, pad_token_id=tokenizer.pad_token_id,
                                        labelled_logits_only=labelled_only),
        compute_loss_func=labelled_token_loss if labelled_only else None,
        callbacks=[callback],
        processing_class=tokenizer,  # saved with the adapter; the repair's refusal-rate stop generates with it
    )
    trainer.train()
    trainer.save_model(str(output_dir / "adapter"))  # as the callback left it (pruned); every rank calls it
    is_main = trainer.is_world_process_zero()
    if is_main:
        copy_adapter(last_checkpoint(Path(args.output_dir)), output_dir / "adapter-lora")
        for name in ("splora_report.json", "splora_report.html"):
            if (Path(args.output_dir) / name).is_file():
                shutil.copy2(Path(args.output_dir) / name, output_dir / name)
        tokenizer.save_pretrained(output_dir / "adapter")
    summary = {
        "trainer_log": trainer.state.log_history,
        "callback": callback,
        "dropped": dropped,
        "examples": len(examples),
        "is_main": is_main,
        "report_to": list(args.report_to),
    }
    del trainer, model
    gc.collect()
    return summary


def last_checkpoint(trainer_dir: Path) -> Path:
    """The highest ``checkpoint-N`` folder (``save_strategy: steps`` also saves at the last step)."""
    checkpoints = sorted(trainer_dir.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    if not checkpoints:
        raise FileNotFoundError(
            f"no checkpoint-N folder in {trainer_dir}: the unpruned adapter was not saved "
            "(training_args.save_strategy must save at least at the end: 'steps' or 'epoch')"
        )
    return checkpoints[-1]


def copy_adapter(source: Path, target: Path) -> None:
    """Copy a PEFT adapter (config + weights) to ``target``."""
    from splora_callback.adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    target.mkdir(parents=True, exist_ok=True)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        shutil.copy2(source / name, target / name)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Run a recipe; returns the evaluation results (None on non-main processes)."""
    parser = argument_parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--train-only", action="store_true",
        help="train and save the adapters and the report, skip the evaluation (run evaluation_run.py later)",
    )
    args = parser.parse_args(argv)
    config = load_config(args.config, args.override)
    setup_environment(config)
    output_dir = Path(config["output_dir"])
    output_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    data, base, aligned, probe = prepare(config, timings)
    with stage("LoRA fine-tune with SPLoRACallback", timings):
        trained = train(config, base, aligned, data, probe)
        callback = trained["callback"]
        patched = patch_words({"action": callback.action_report or {}})
        acted = patched or (f"callback selected {result_files.selected_words(callback.selected, callback.config.to_dict())}, "
                            f"action {callback.config.action}")
        print(f"{trained['examples']} training examples ({trained['dropped']} dropped as too long); {acted}")
    if not trained["is_main"]:
        return None
    if args.train_only:
        timings["total"] = time.perf_counter() - start
        (output_dir / "training.json").write_text(json.dumps({"timings": timings, "load": list(os.getloadavg())}))
        print(f"\nTrained in {timings['total']:.1f} s; evaluate with recipes/evaluation_run.py")
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # evaluation runs on this process alone
    results = evaluation_run.run_evaluation(
        config,
        base=base,
        aligned=aligned,
        data=data,
        probe=probe,
        timings=timings,
        callback_report=json.loads((output_dir / "splora_report.json").read_text()),
    )
    timings["total"] = time.perf_counter() - start
    payload = result_files.write_results(output_dir, results, timings, config)
    if "wandb" in trained["report_to"]:
        result_files.log_to_wandb(payload, output_dir)
    print(f"\nTotal: {timings['total']:.1f} s. Results in {output_dir}/results.md")
    return results


if __name__ == "__main__":
    main()
